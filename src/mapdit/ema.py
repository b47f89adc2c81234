"""Power-function EMA (EDM2, Karras et al. 2024): track, snapshot, and reconstruct any width post hoc.

An EMA with exponent γ, read at time t (in optimizer steps), averages the training trajectory θ(τ)
with the density  p_t(τ) = (γ+1) τ^γ / t^(γ+1)  on [0, t].  Its relative width is
σ_rel = std(τ)/t = sqrt((γ+1) / ((γ+2)²(γ+3))).

Discrete tracking uses β_t = (1 - 1/t)^(γ+1); unrolled, step k gets the weight
(k^(γ+1) - (k-1)^(γ+1)) / t^(γ+1) = ∫_{k-1}^{k} p_t(τ) dτ.  So the discrete EMA is *exactly* the
continuous profile applied to the piecewise-constant trajectory θ(τ) = θ_k on (k-1, k]; it differs
from the profile of a smooth θ(τ) by at most one step's worth of drift (sup|θ'|), which matters only
while t is small.  That exactness is what lets the reconstruction below work with closed forms.

Post hoc: snapshots of a few widths at many steps span a family of profiles; the least-squares fit
of a target profile in their span (Gram matrix of closed-form inner products) gives coefficients x,
and the same x applied to the snapshot *weights* gives the target EMA.
"""

from __future__ import annotations

import hashlib
import math
import os  # tests stub os.fsync through this module
import re
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mapdit import config
from mapdit.errors import UserError
from mapdit.runio import atomic_write

# Largest σ_rel any power profile has: at γ = φ^-1 - 1 ≈ -0.382, σ_rel² = φ^-5 (φ = golden ratio); stated once,
# in mapdit.config, where the training check uses it too.
SIGMA_REL_MAX = config.SIGMA_REL_MAX

# Relative L2 error of the fitted profile above which reconstruct() refuses: beyond a few percent the
# weights are a visibly different average than the one asked for.
MAX_PROFILE_ERROR = 0.05

# Singular values below RCOND * largest (of the diagonally scaled Gram matrix) are dropped: the
# closed-form entries are exact to ~1e-16, so anything near that is noise, not information.
RCOND = 1e-12

# Measured on a random-walk trajectory (20k params, θ0 ~ N(0,1), 2000 steps, per-step drift 0.01),
# snapshots of σ_rel 0.05 and 0.10 every 100 steps, float64 tracking as the reference. RMS error of
# the reconstruction of σ_rel 0.05 (tracked) / 0.07 (untracked) at the last step:
#   float32  2.8e-08 / 4.5e-05  (the 0.07 figure is the profile fit itself, rel. profile error 2.5e-3)
#   float16  2.3e-04 / 2.0e-04
#   bfloat16 1.8e-03 / 1.6e-03
# RMS gap between the 0.05 and 0.10 EMAs: 4.9e-02 (4.9e-03 with drift 0.001; errors unchanged).
# Same errors with snapshots every 20 steps (cond 1e6): the fit has Σ|x| ≈ 1.5, so it never
# amplifies rounding. float16 error is just the rounding of each weight once: 8x below bfloat16 and
# <= 5% of the 0.05-0.10 gap even at drift 0.001, at half the disk of float32. Pass
# dtype=torch.float32 where neighbouring widths (0.070 vs 0.075) must differ by more than rounding.
# Weights of magnitude-preserving nets are O(1), far from float16's 65504 limit (checked on save).
DEFAULT_SNAPSHOT_DTYPE = getattr(torch, config.DEFAULT_SNAPSHOT_DTYPE)

_META_STEP = "__step__"
_META_SIGMAS = "__sigma_rels__"

# <snapshot dir>/run-id: a random token written with the first snapshot; every snapshot carries it in its
# metadata ("run_id"), so a snapshot copied in from another run is refused by name instead of being averaged in.
RUN_ID_FILE = "run-id"


# ----------------------------------------------------------------------------------------------
# Closed-form theory (float64 numpy).


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power profile with exponent γ (> -1)."""
    g = float(gamma)
    if not g > -1.0:
        raise UserError(f"EMA exponent gamma must be > -1, got {g}")
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent γ of the power profile with relative width σ_rel (the largest root of the cubic)."""
    s = float(sigma_rel)
    if not 0.0 < s <= SIGMA_REL_MAX:
        raise UserError(f"EMA sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}], got {s}")
    # σ_rel² (γ+2)²(γ+3) = γ+1, expanded and divided by σ_rel².
    roots = np.roots([1.0, 7.0, 16.0 - s**-2, 12.0 - s**-2])
    # Below SIGMA_REL_MAX the roots are real; at it two merge and may pick up a rounding-level
    # imaginary part, so take the real part of the rightmost root.
    return float(roots.real.max())


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """⟨p_a, p_b⟩ = ∫ p_a p_b dτ of two power profiles, broadcasting, float64.

    Integrating (γa+1)(γb+1) τ^(γa+γb) / (t_a^(γa+1) t_b^(γb+1)) up to min(t_a, t_b) gives
    (γa+1)(γb+1)/(γa+γb+1) · (t_a/t_b)^e / max(t_a, t_b), e = γb if t_a < t_b else -γa;
    the ratio is then ≤ 1 for γ ≥ 0, so nothing overflows for sharp profiles.
    """
    t_a, gamma_a, t_b, gamma_b = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    )
    e = np.where(t_a < t_b, gamma_b, -gamma_a)
    num = (gamma_a + 1.0) * (gamma_b + 1.0) * (t_a / t_b) ** e
    return num / ((gamma_a + gamma_b + 1.0) * np.maximum(t_a, t_b))


@dataclass(frozen=True)
class PosthocSolution:
    coeffs: np.ndarray  # float64, one per snapshot: θ̂ = Σ coeffs[i] θ_i
    condition_number: float  # of the diagonally scaled Gram matrix
    profile_rel_error: float  # ||Σ x_i p_i - p_r|| / ||p_r|| (L2 over τ)


def _solve_many(snap_steps, snap_gammas, target_steps, target_gammas):
    """Least-squares fit of m target profiles in the span of n snapshot profiles: (x [n,m], cond, err [m])."""
    t = np.asarray(snap_steps, dtype=np.float64).reshape(-1)
    g = np.asarray(snap_gammas, dtype=np.float64).reshape(-1)
    tr = np.asarray(target_steps, dtype=np.float64).reshape(-1)
    gr = np.asarray(target_gammas, dtype=np.float64).reshape(-1)
    if t.size == 0:
        raise UserError("no EMA snapshots to reconstruct from")
    if t.shape != g.shape or np.any(t <= 0) or np.any(tr <= 0):
        raise ValueError("snapshot/target steps must be positive and match the gammas one-to-one")
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])  # [n, n]
    B = profile_inner(t[:, None], g[:, None], tr[None, :], gr[None, :])  # [n, m]
    # Scale to unit diagonal: profile norms differ by orders of magnitude across widths and steps,
    # and this removes that spread from the condition number for free.
    d = 1.0 / np.sqrt(np.diag(A))
    An = A * d[:, None] * d[None, :]
    U, S, Vt = np.linalg.svd(An)
    keep = S > RCOND * S[0]
    y = Vt[keep].T @ ((U[:, keep].T @ (B * d[:, None])) / S[keep, None])
    x = y * d[:, None]
    # ||Σ x p_i - p_r||² = xᵀAx - 2xᵀB + ⟨p_r,p_r⟩, all closed form; clamp rounding below zero.
    rr = profile_inner(tr, gr, tr, gr)
    err2 = np.einsum("im,ij,jm->m", x, A, x) - 2.0 * np.einsum("im,im->m", x, B) + rr
    rel = np.sqrt(np.maximum(err2, 0.0) / rr)
    cond = float(S[0] / S[-1]) if S[-1] > 0 else math.inf
    return x, cond, rel


def solve_posthoc(snap_steps, snap_gammas, target_step, target_gamma) -> PosthocSolution:
    """Coefficients that turn snapshots (steps, γs) into the EMA with γ_r read at target_step."""
    x, cond, rel = _solve_many(snap_steps, snap_gammas, [target_step], [target_gamma])
    return PosthocSolution(coeffs=x[:, 0].copy(), condition_number=cond, profile_rel_error=float(rel[0]))


def _expressible_range(snap_steps, snap_gammas, target_step, max_error):
    """(lo, hi) σ_rel on a 0.001 grid whose profile fits within max_error, or None."""
    grid = np.round(np.arange(0.001, SIGMA_REL_MAX, 0.001), 3)
    gammas = [sigma_rel_to_gamma(s) for s in grid]
    _, _, rel = _solve_many(snap_steps, snap_gammas, np.full(grid.size, float(target_step)), gammas)
    ok = grid[rel <= max_error]
    return (float(ok.min()), float(ok.max())) if ok.size else None


# ----------------------------------------------------------------------------------------------
# Tracking.


def _named(params) -> dict[str, torch.Tensor]:
    """Accept a name->tensor mapping, (name, tensor) pairs (named_parameters()), or bare tensors."""
    if isinstance(params, Mapping):
        return dict(params)
    items = list(params)
    if items and isinstance(items[0], tuple):
        return dict(items)
    return {str(i): p for i, p in enumerate(items)}


def _key(sigma_rel: float) -> str:
    return f"{sigma_rel:.3f}"


class PowerEMA:
    """Tracks one EMA per σ_rel over a list of parameter tensors, every step, batched with
    torch._foreach_* ops (no Python loop per tensor for the math).

    The averages live on the parameters' device in `dtype`. float32 (as in EDM2) is fine until the
    per-step increment (γ+1)/t·(θ - ema) nears float32 rounding of the weights (t ~ 1e6 steps);
    pass float64 there.
    """

    def __init__(self, params, sigma_rels=(0.05, 0.10), dtype: torch.dtype = torch.float32):
        named = _named(params)
        if not named:
            raise ValueError("PowerEMA needs at least one parameter")
        self.names = list(named)
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        keys = [_key(s) for s in self.sigma_rels]
        if not keys or len(set(keys)) != len(keys):
            raise UserError(f"EMA widths must be distinct to 3 decimals, got {list(self.sigma_rels)}")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.dtype = dtype
        self.step = 0  # time t of the last update; 0 = nothing averaged yet
        with torch.no_grad():
            # fresh contiguous buffers: safetensors (and our state_dict) need contiguous tensors
            self._emas = {
                k: [torch.empty(p.shape, dtype=dtype, device=p.device).copy_(p) for p in named.values()]
                for k in keys
            }

    def _sources(self, params) -> list[torch.Tensor]:
        named = _named(params)
        if list(named) in (self.names, [str(i) for i in range(len(self.names))]):
            tensors = list(named.values())  # same order, or bare tensors taken by position
        else:
            missing = [n for n in self.names if n not in named]
            if missing or len(named) != len(self.names):
                raise ValueError(f"PowerEMA.update: got {len(named)} tensors for {len(self.names)} tracked "
                                 f"(missing e.g. {missing[:3]})")
            tensors = [named[n] for n in self.names]
        return [p.detach() if p.dtype == self.dtype else p.detach().to(self.dtype) for p in tensors]

    @torch.no_grad()
    def update(self, params, step: int) -> None:
        """Fold in the parameters after optimizer step `step` (time t, 1-based); call every step.

        β = (t_prev/t)^(γ+1) — for t_prev = t-1 that is (1 - 1/t)^(γ+1); a jump of several steps
        gives exactly the profile of parameters that were held constant over the gap.
        """
        step = int(step)
        if step <= self.step:
            raise ValueError(f"PowerEMA.update: step must increase, got {step} after {self.step}")
        src = self._sources(params)
        for key, gamma in zip(self._emas, self.gammas):
            beta = (self.step / step) ** (gamma + 1.0)
            torch._foreach_lerp_(self._emas[key], src, 1.0 - beta)  # ema += (1-β)(θ - ema)
        self.step = step

    def averaged(self, sigma_rel: float) -> dict[str, torch.Tensor]:
        """The current average of width sigma_rel, by parameter name (live tensors: clone to keep)."""
        key = _key(sigma_rel)
        if key not in self._emas:
            raise UserError(f"EMA width {sigma_rel} is not tracked (tracked: {list(self._emas)})")
        return dict(zip(self.names, self._emas[key]))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat and safetensors-compatible: "<σ_rel:.3f>/<name>" plus the step and the widths."""
        sd = {f"{k}/{n}": t for k, ts in self._emas.items() for n, t in zip(self.names, ts)}
        sd[_META_STEP] = torch.tensor([self.step], dtype=torch.int64)
        sd[_META_SIGMAS] = torch.tensor(self.sigma_rels, dtype=torch.float64)
        return sd

    @torch.no_grad()
    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(sd) != expected:
            missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
            raise UserError(
                f"EMA state does not match this run (widths {list(self._emas)}): "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
            )
        for k, ts in self._emas.items():
            for n, t in zip(self.names, ts):
                src = sd[f"{k}/{n}"]
                if src.shape != t.shape:
                    raise UserError(f"EMA state for {k}/{n} has shape {tuple(src.shape)}, model has {tuple(t.shape)}")
                t.copy_(src)
        self.step = int(sd[_META_STEP].reshape(-1)[0])


# ----------------------------------------------------------------------------------------------
# Snapshots on disk: <dir>/sigma-0.050/step-0001000.safetensors, metadata carries step/γ/σ_rel.


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    sigma_rel: float
    gamma: float
    step: int
    run_id: str | None = None  # None: written before snapshots carried their run's identity


def snapshot_run_id(directory, create: bool = False) -> str | None:
    """The run identity of a snapshot folder (the token in <directory>/run-id); `create`: make one if there is
    none yet (hard-linked into place, so two writers agree on one token). None when absent and not created."""
    path = Path(directory) / RUN_ID_FILE
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        token = None
    if token or not create:
        return token or None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{RUN_ID_FILE}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(8) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        if token is None:
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another writer was first: its token wins
        else:
            os.replace(tmp, path)  # an empty file (a crash before its content was durable): nothing used it
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path.read_text().strip()


def save_snapshot(directory, sigma_rel: float, step: int, tensors: Mapping[str, torch.Tensor],
                  dtype: torch.dtype = DEFAULT_SNAPSHOT_DTYPE) -> Path:
    """Write one EMA snapshot atomically (temp file in the same dir, fsync, rename); returns its path."""
    sigma_rel, step = float(sigma_rel), int(step)
    if step < 1:
        raise ValueError(f"snapshot step must be >= 1 (time after that many optimizer steps), got {step}")
    out = {}
    for name, t in tensors.items():
        t = t.detach()
        if t.is_floating_point():
            # fp16 rounds |x| >= 65520 to inf, which would silently poison every reconstruction.
            if dtype == torch.float16 and t.numel() and max(-t.min(), t.max()) >= 65520:
                raise ValueError(f"{name} overflows float16 in the EMA snapshot; save with a wider dtype")
            c = t.to(device="cpu", dtype=dtype).contiguous()
        else:
            c = t.to("cpu").contiguous()
        out[name] = c
    meta = {
        "step": str(step),
        "gamma": repr(sigma_rel_to_gamma(sigma_rel)),
        "sigma_rel": repr(sigma_rel),
        "dtype": str(dtype).removeprefix("torch."),
        "run_id": snapshot_run_id(directory, create=True),
    }
    folder = Path(directory) / f"sigma-{sigma_rel:.3f}"
    final = folder / f"step-{step:07d}.safetensors"
    # temporary file, fsync, rename; a full disk or a read-only place is a one-line UserError naming `final`
    return atomic_write(final, lambda tmp: save_file(out, tmp, metadata=meta))


def list_snapshots(directory) -> list[SnapshotInfo]:
    """All snapshots under directory, from their metadata, sorted by (step, σ_rel)."""
    found = []
    for path in Path(directory).glob("sigma-*/step-*.safetensors"):
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
            found.append(SnapshotInfo(path, float(meta["sigma_rel"]), float(meta["gamma"]), int(meta["step"]),
                                      meta.get("run_id") or None))
        except (KeyError, ValueError, OSError) as e:
            raise UserError(f"{path} is not a readable EMA snapshot ({type(e).__name__}: {e})") from None
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def check_same_run(directory, snaps: list[SnapshotInfo]) -> None:
    """Refuse, naming it, a snapshot that carries another run's identity than the folder's (its run-id file, or
    failing that the newest snapshot's). Snapshots without an identity (older runs) are accepted."""
    own = snapshot_run_id(directory) or next((s.run_id for s in reversed(snaps) if s.run_id), None)
    foreign = [s for s in snaps if s.run_id is not None and s.run_id != own]
    if foreign:
        raise UserError(f"{foreign[0].path} is an EMA snapshot of another run (run id {foreign[0].run_id}, this "
                        f"run's is {own}){f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}: move it "
                        f"out of {directory} and try again")


def snapshots_signature(snaps: list[SnapshotInfo]) -> str:
    """A digest of the snapshots a reconstruction reads (name, step, width, run, size, mtime): it changes when a
    resume rewrites history, so a result derived from the old snapshots is not taken for one of the new."""
    h = hashlib.sha256()
    for s in snaps:
        st = s.path.stat()
        h.update(f"{s.path.parent.name}/{s.path.name}|{s.step}|{s.sigma_rel!r}|{s.run_id}|{st.st_size}|"
                 f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def weights_identity(directory, tracked, weights: str, ema_std: float | None, step: int | None) -> dict:
    """What a run's weights depend on besides its checkpoint, for cache keys: the EMA width at full precision
    and, when it is not exactly one of the `tracked` widths (so it is reconstructed post hoc at `step`, None: the
    last snapshot), the signature of the snapshots in `directory` that the reconstruction reads."""
    if weights == "raw":
        return {"weights": "raw"}
    tracked = [float(s) for s in tracked]
    sigma = min(tracked) if ema_std is None else float(ema_std)
    out = {"weights": "ema", "ema_std": repr(sigma)}
    if sigma not in tracked:
        snaps = list_snapshots(directory) if Path(directory).is_dir() else []
        target = step if step is not None else (snaps[-1].step if snaps else 0)
        out["snapshots"] = snapshots_signature([x for x in snaps if x.step <= target])
    return out


@torch.no_grad()
def reconstruct(directory, sigma_rel: float, step: int | None = None, progress: bool = False,
                max_profile_error: float = MAX_PROFILE_ERROR) -> tuple[dict[str, torch.Tensor], PosthocSolution]:
    """The EMA of width sigma_rel at `step` (None: the last snapshot), from every snapshot at or before it.

    Streams: one tensor of one snapshot is in memory at a time next to float64 accumulators, so the
    peak is ~2 float32 models however many snapshots there are. Returns float32 tensors by name.
    """
    snaps = list_snapshots(directory)
    if not snaps:
        raise UserError(f"no EMA snapshots under {directory} (expected sigma-*/step-*.safetensors)")
    check_same_run(directory, snaps)
    first, last = snaps[0].step, snaps[-1].step
    step = last if step is None else int(step)
    if not first <= step <= last:
        raise UserError(f"EMA step {step} is outside the snapshots' range {first}..{last} in {directory}")
    used = [s for s in snaps if s.step <= step]
    gamma = sigma_rel_to_gamma(sigma_rel)
    steps, gammas = [s.step for s in used], [s.gamma for s in used]
    sol = solve_posthoc(steps, gammas, step, gamma)
    if not sol.profile_rel_error <= max_profile_error:
        ok = _expressible_range(steps, gammas, step, max_profile_error)
        can = f"about {ok[0]:.3f}..{ok[1]:.3f}" if ok else "none"
        raise UserError(
            f"EMA sigma_rel {sigma_rel} at step {step} is not expressible from the snapshots "
            f"(profile error {sol.profile_rel_error:.3f} > {max_profile_error}); expressible: {can}; "
            f"pick a width in that range or snapshot more widths/more often"
        )

    acc: dict[str, torch.Tensor] = {}
    for coeff, info in tqdm(list(zip(sol.coeffs, used)), disable=not progress, unit="snapshot",
                            desc=f"EMA {sigma_rel:.3f}@{step}"):
        with safe_open(info.path, framework="pt") as f:
            keys = list(f.keys())
            if acc and set(keys) != set(acc):
                raise UserError(f"{info.path} holds different tensors than the other snapshots")
            for k in keys:
                t = f.get_tensor(k)
                # one NaN/inf in any snapshot poisons every width reconstructed from it: name the file
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise UserError(f"{info.path} holds non-finite values (in {k}): it is damaged; move it out of "
                                    f"{directory} (the reconstruction then uses the other snapshots)")
                if k not in acc:
                    acc[k] = torch.zeros(t.shape, dtype=torch.float64)
                acc[k].add_(t, alpha=float(coeff))  # promotes to float64 per element, no temp copy
                del t
    # Convert one tensor at a time so float64 and float32 copies never coexist in full.
    out = {}
    for k in list(acc):
        out[k] = acc.pop(k).to(torch.float32)
        if not torch.isfinite(out[k]).all():  # finite inputs, but a value beyond float32's range
            raise UserError(f"the EMA sigma_rel {sigma_rel!r} at step {step} reconstructed from {directory} is not "
                            f"finite (in {k}): pick another width or snapshot more often")
    return out, sol


# ----------------------------------------------------------------------------------------------


_NUM = r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*"


def parse_sweep(text: str) -> list[float]:
    """σ_rel list from "0.05", "0.05,0.1" or "start:stop:step" (inclusive), e.g. "0.03:0.15:0.01"."""
    values: list[float] = []
    for part in str(text).split(","):
        if m := re.fullmatch(_NUM + ":" + _NUM + ":" + _NUM, part):
            start, stop, inc = (float(v) for v in m.groups())
            if inc <= 0 or stop < start:
                raise UserError(f"bad EMA sweep {part.strip()!r}: need start <= stop and step > 0")
            # 1e-9 slack so that float drift in (stop-start)/step never drops the inclusive end.
            n = int(math.floor((stop - start) / inc + 1e-9))
            values += [round(start + i * inc, 10) for i in range(n + 1)]
        elif m := re.fullmatch(_NUM, part):
            values.append(float(m.group(1)))
        else:
            raise UserError(f"bad EMA sweep {text!r}: expected e.g. 0.05, 0.05,0.1 or 0.03:0.15:0.01")
    for v in values:
        if not 0.0 < v <= SIGMA_REL_MAX:
            raise UserError(f"EMA sigma_rel {v} in {text!r} is outside (0, {SIGMA_REL_MAX:.4f}]")
    return values
