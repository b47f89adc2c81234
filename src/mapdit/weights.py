"""Which weights of a run to use: raw, a tracked EMA, or a post-hoc EMA reconstructed from snapshots.

Post-hoc results are cached as run/ema/posthoc/sigma-0.08-step-0000300.safetensors (the width at full
precision: 0.0754 is sigma-0.0754-...), with the signature of the snapshots they were made from (a
rewritten history rebuilds them).
"""
from __future__ import annotations

import contextlib
import copy
import json
import re
import sys
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .ema import check_same_run, list_snapshots, reconstruct, snapshots_signature
from .errors import UserError
from .model import DiT
from .runio import (
    CHECKPOINT_RE,
    DiskFullError,
    NotWritableError,
    check_new_output,
    check_writable,
    clean_temporaries,
    find_resumable_checkpoint,
    list_checkpoints,
    load_run_config,
    load_tensors,
    save_tensors,
    split_prefix,
    verify_checkpoint,
)


# ------------------------------------------------------------------------------------------------
# Loading weights into a model: from a checkpoint's prefixed tensors, or a set of named weights (an EMA)
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def checkpoint_mismatch(path: Path, what: str, hint: str = ""):
    """A state that does not fit (missing or unexpected keys, wrong shapes) while loading checkpoint `path`
    is one line: 'checkpoint PATH does not match WHAT (detail)HINT'."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, IndexError) as err:
        hint = hint or ": it comes from another run or model; pass one of this run's checkpoints"
        raise UserError(f"checkpoint {path} does not match {what} ({state_dict_difference(str(err))}){hint}") \
            from None


def state_dict_difference(message: str) -> str:
    """A short summary of `load_state_dict`'s error (which lists every key and shape, hundreds of lines for a
    checkpoint of another model): '3 tensors missing, 5 unexpected, pos_embed is (1, 64, 96) in the
    checkpoint and (1, 49, 96) in the model'."""
    parts = []
    for label, word in (("Missing key(s)", "missing"), ("Unexpected key(s)", "unexpected")):
        m = re.search(re.escape(label) + r" in state_dict: (.*?)(?:\.\s*(?:Unexpected|size mismatch)|\.?\s*$)",
                      message, re.S)
        if m:
            count = len(re.findall(r'"[^"]+"', m.group(1)))
            parts.append(f"{count} {'tensor' if count == 1 else 'tensors'} {word}")
    sizes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch.Size\(\[([\d, ]*)\]\) from "
                       r"checkpoint, the shape in current model is torch.Size\(\[([\d, ]*)\]\)", message)
    if sizes:
        name, have, want = sizes[0]
        more = f" (and {len(sizes) - 1} more shapes)" if len(sizes) > 1 else ""
        parts.append(f"{name} is ({have}) in the checkpoint and ({want}) in the model{more}")
    if parts:
        return ", ".join(parts)
    first = " ".join(message.split())
    return first[:160] + ("..." if len(first) > 160 else "")


def load_prefixed(module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """`module.load_state_dict` from the checkpoint tensors under `prefix` ("model.", "ema.")."""
    module.load_state_dict(split_prefix(tensors, prefix))


def copy_weights_(model: torch.nn.Module, named: Mapping[str, torch.Tensor], what: str = "weights"):
    """Copy the parameters in `named` (e.g. an EMA: `ema.averaged(sigma)`) into `model`, in place; names and
    shapes must match the model's. Returns the model."""
    own = dict(model.named_parameters())
    unknown = set(named) - set(own)
    if unknown or not named:
        raise UserError(f"{what} do not match the model (unexpected {sorted(unknown)[:3]})")
    wrong = [n for n, v in named.items() if tuple(v.shape) != tuple(own[n].shape)]
    if wrong:
        raise UserError(f"{what} do not match the model: {wrong[0]} is {tuple(named[wrong[0]].shape)}, the "
                        f"model's is {tuple(own[wrong[0]].shape)}")
    with torch.no_grad():
        for name, value in named.items():
            own[name].copy_(value)
    return model


def model_with_weights(model: torch.nn.Module, named: Mapping[str, torch.Tensor]):
    """A copy of `model` (the plain DiT) with the parameters in `named` loaded, in eval mode, e.g. an EMA:
    model_with_weights(model, ema.averaged(sigma)). The training model is untouched."""
    return copy_weights_(copy.deepcopy(model), named).eval()


POSTHOC_FORMAT = "mapdit-posthoc-ema-1"  # the metadata of a post-hoc EMA file (`mapdit ema` may replace those)


def posthoc_path(run_dir: Path, sigma_rel: float, step: int) -> Path:
    """The cache file of a post-hoc EMA: the width at full precision (0.0754 is not 0.075)."""
    return Path(run_dir) / "ema" / "posthoc" / f"sigma-{float(sigma_rel)!r}-step-{step:07d}.safetensors"


def _cached_posthoc(path: Path, sigma_rel: float, step: int, signature: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a post-hoc cache file made from exactly these snapshots for exactly this width and step,
    all finite; None for anything else (then it is rebuilt in place: it is a cache)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if (meta.get("sigma_rel"), meta.get("step"), meta.get("snapshots")) != (repr(float(sigma_rel)), str(step),
                                                                                 signature):
            return None
        tensors = load_tensors(path)
    except (SafetensorError, OSError, ValueError, UserError):
        return None
    return tensors if all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()) else None


def check_snapshot_files(folder: Path) -> None:
    """Every EMA snapshot must at least have a safetensors header: anything else (a truncated file, a pickle)
    is a one-line error naming it. Nothing is ever unpickled."""
    for path in sorted(Path(folder).glob("sigma-*/step-*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.metadata()
        except (SafetensorError, OSError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{path} is not a readable EMA snapshot ({reason}): move it out of the run folder "
                            "and try again") from None


def posthoc_ema(run_dir: str | Path, sigma_rel: float, step: int | None = None, out: str | Path | None = None,
                progress: bool = True, log=print, cache_optional: bool = False
                ) -> tuple[Path | None, dict[str, torch.Tensor]]:
    """Reconstruct the EMA of width sigma_rel at `step` (None: last snapshot); cached beside the run.

    `out`: write it there instead. `cache_optional` (sampling, which did not ask for a file): when the run's
    ema/posthoc/ cannot be written (a read-only run, a full disk) the result is used without caching, said
    in one line on stderr, and the returned path is None. Otherwise an unwritable place is a one-line
    UserError, checked before the reconstruction starts.
    """
    run_dir = Path(run_dir)
    check_snapshot_files(run_dir / "ema")
    snaps = list_snapshots(run_dir / "ema")
    if not snaps:
        raise UserError(f"no EMA snapshots in {run_dir / 'ema'}: train with --ema-snapshots > 0 "
                        "(or sample with the tracked EMA / raw weights)")
    check_same_run(run_dir / "ema", snaps)
    target = snaps[-1].step if step is None else int(step)
    signature = snapshots_signature([s for s in snaps if s.step <= target])
    path = check_new_output(out, own_format=POSTHOC_FORMAT) if out else posthoc_path(run_dir, sigma_rel, target)
    if out is None and path.parent.is_dir():
        clean_temporaries(path.parent)  # what a killed earlier reconstruction left
    if out is None and path.exists():
        if (cached := _cached_posthoc(path, sigma_rel, target, signature)) is not None:
            return path, cached
        print(f"rebuilding {path}: it does not match the run's snapshots (stale or damaged cache)", file=sys.stderr)
    if not cache_optional:  # the file is what was asked for: fail now, not after the reconstruction
        hint = "pass --out FILE to write it elsewhere" if out is None else "choose another --out"
        check_writable(path.parent, "the folder", hint)
    tensors, sol = reconstruct(run_dir / "ema", sigma_rel, target, progress=progress)
    summary = (f"EMA sigma_rel={sigma_rel:.3f} at step {target}: {len(sol.coeffs)} snapshots, condition number "
               f"{sol.condition_number:.3g}, profile error {sol.profile_rel_error:.2e}")
    try:
        save_tensors(path, tensors, metadata={"format": POSTHOC_FORMAT, "sigma_rel": repr(float(sigma_rel)),
                                              "step": str(target),
                                              "snapshots": signature,
                                              "condition_number": f"{sol.condition_number:.4g}",
                                              "profile_rel_error": f"{sol.profile_rel_error:.4g}"})
    except (DiskFullError, NotWritableError) as err:
        if not cache_optional:
            raise
        reason = getattr(err, "reason", "disk full")
        print(f"{summary}; not cached: cannot write {err.path} ({reason}), so it is reconstructed again next time",
              file=sys.stderr)
        return None, tensors
    log(f"{summary} -> {path}")
    return path, tensors


def resolve_checkpoint(run_dir: Path, ckpt: str | None) -> tuple[int, Path]:
    """(step, path) of `ckpt` (verified: size, checksum, safetensors header) or of the run's newest intact
    checkpoint; damaged newer ones are reported on stderr, one line each, and skipped."""
    if ckpt is not None:
        path = find_checkpoint(Path(run_dir), str(ckpt))
        problem = verify_checkpoint(path)
        if problem:
            raise UserError(f"checkpoint {path} is not usable: {problem}")
        m = CHECKPOINT_RE.search(path.name)
        step = json.loads(path.with_suffix(".json").read_text()).get("step") if m is None else int(m.group(1))
        if not isinstance(step, int):
            raise UserError(f"checkpoint {path}: no step in its name or its .json sidecar")
        return step, path
    found = find_resumable_checkpoint(run_dir, "restore an intact copy, or pass --ckpt",
                                      log=lambda m: print(m, file=sys.stderr))
    if found is None:
        raise UserError(f"no checkpoint in {run_dir / 'checkpoints'}: train first (or pass --ckpt)")
    return found


def find_checkpoint(run_dir: Path, ckpt: str) -> Path:
    """--ckpt as given (a path), else in the run's checkpoints/ folder (a file name, with or without
    .safetensors, or a step number); not found: one line listing the run's checkpoints."""
    folder = run_dir / "checkpoints"
    candidates = [Path(ckpt), folder / ckpt, folder / f"{ckpt}.safetensors"]
    if ckpt.isdigit():
        candidates.append(folder / f"step-{int(ckpt):07d}.safetensors")
    for path in candidates:
        if path.is_file():
            return path
    names = [p.name for _, p in list_checkpoints(run_dir)]
    have = f"the run's checkpoints are {', '.join(names)}" if names else f"{folder} holds no checkpoint"
    raise UserError(f"checkpoint {ckpt} not found (as a path or in {folder}): {have}")


def check_weight_choice(weights: str, ema_std: float | None) -> None:
    """One line (UserError) for a --weights/--ema-std choice that cannot be loaded; call before loading."""
    if weights not in ("ema", "raw"):
        raise UserError(f"--weights {weights!r}: use 'ema' or 'raw'")
    if weights == "raw" and ema_std is not None:
        raise UserError("--ema-std chooses an EMA width, which contradicts --weights raw: drop one of them")


def load_model(run_dir: str | Path, weights: str = "ema", ema_std: float | None = None, ckpt: str | None = None,
               device: str | torch.device = "cpu", log=print, info: dict | None = None) -> tuple[DiT, dict, str]:
    """Build the run's model and load weights. Returns (model in eval mode, run config, description);
    `info`, when given, receives "step" (the checkpoint's) and "ema_std" (None for raw weights).

    weights="raw": the trained parameters; "ema": an EMA of width `ema_std` (default: the smallest
    tracked width), taken from the checkpoint when tracked, else reconstructed post hoc from snapshots.
    """
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    model = DiT(ModelConfig.from_dict(config["model"]))
    step, path = resolve_checkpoint(run_dir, ckpt)
    tensors = load_tensors(path)
    with checkpoint_mismatch(path, "the run's model config"):
        load_prefixed(model, tensors, "model.")
    desc = f"raw weights at step {step}"
    if weights == "ema":
        tracked = config["train"]["ema_stds"]
        sigma = min(tracked) if ema_std is None else float(ema_std)
        if sigma in {float(s) for s in tracked}:  # exactly a tracked width (0.0504 is reconstructed)
            ema = split_prefix(tensors, f"ema.{sigma:.3f}/")
            desc = f"tracked EMA sigma_rel={sigma:.3f} at step {step}"
        else:  # at the checkpoint's step, like the tracked widths (a killed run's snapshots may go further)
            _, ema = posthoc_ema(run_dir, sigma, step=step, progress=True, log=log, cache_optional=True)
            desc = f"post-hoc EMA sigma_rel={sigma!r} at step {step}"
        copy_weights_(model, ema, "EMA weights")
    elif weights != "raw":
        raise UserError(f"--weights {weights!r}: use 'ema' or 'raw'")
    if info is not None:
        info.update(step=step, ema_std=sigma if weights == "ema" else None)
    return model.to(device).eval(), config, desc
