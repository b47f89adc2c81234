"""Fast paths of the MP building blocks: the formulas of `mapdit.nn`, computed with fewer operators.

Only those that win >= 3 % of the whole eager training step are kept (BENCHMARKS.md, "Fast paths: which
earn their place"; the others were deleted):
  * an MP linear whose weight was just projected onto the sphere (forced weight normalisation) reuses
    the row norms of that projection: its forward is a single multiply of W, its backward one row dot
    product and one multiply-add, instead of the ~10 operators autograd records for normalize(W); in eval
    mode without autograd its effective weight is cached until the weight changes;
  * cosine attention normalises q and k of the fused qkv tensor in one Function, in place;
  * a modulation with a rotation (MaP-DiT's scale+rotate) scales and rotates channel pairs in one Function:
    two multiplies and two multiply-adds into one buffer, forward and backward, no chunk/cat copies.

Every dispatcher here falls back to the plain formula of `mapdit.nn` under torch.compile (Inductor fuses
it by itself; nothing on that path reads `_version` or a Python-side cache, so models compile without graph
breaks) and inside `reference_math()`, the one switch that tests and benchmarks use to run the reference.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .nn import EPS, MPEmbedding, MPLinear, _compiling, _pair_views, normalize, rotate_pairs
from .nn import modulate as nn_modulate

# ------------------------------------------------------------------------------------------------
# The switch: plain formulas instead of fast paths
# ------------------------------------------------------------------------------------------------
FAST_PATHS = {  # name -> what it is, and the plain formula it falls back to
    "linear": "FusedMPLinear: custom weight-normalisation Function and eval cache -> MPLinear.forward",
    "qk": "normalize_qk (cosine attention on the fused qkv tensor): custom Function -> normalize",
    "rotation": "modulate with a rotation: scale and rotation as one pair-mix Function -> nn.modulate",
}
_reference: frozenset[str] = frozenset()


@contextlib.contextmanager
def reference_math(*paths: str) -> Iterator[None]:
    """Within the block, the named fast paths (all of them when none is named) compute the plain formulas.

        with reference_math():                  # the whole model as written in mapdit.nn
            expected = model(x, t, y)
        with reference_math("qk"):               # one fast path off (the benchmark's ablation)
            ...
    Values agree with the fast paths to rounding; nesting adds paths; not thread-local. (Under torch.compile
    every path is plain anyway.)
    """
    global _reference
    unknown = set(paths) - set(FAST_PATHS)
    if unknown:
        raise ValueError(f"unknown fast path(s) {sorted(unknown)}: choose from {sorted(FAST_PATHS)}")
    saved = _reference
    _reference = saved | frozenset(paths or FAST_PATHS)
    try:
        yield
    finally:
        _reference = saved


def reference_enabled(path: str) -> bool:
    """True inside `reference_math` naming `path` (or naming none)."""
    return path in _reference


def _plain(path: str) -> bool:
    """The plain formula for `path`: inside `reference_math`, and always under torch.compile."""
    return _compiling() or path in _reference


# ------------------------------------------------------------------------------------------------
# Row statistics; cosine attention on the fused qkv tensor
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def _row_rms(x: torch.Tensor) -> torch.Tensor:
    """RMS of every row along the last dim, (..., 1), in fp32 (fp64 for fp64 input), outside autograd."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc).div_(math.sqrt(x.shape[-1]))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) over the last dim, keepdim (one fused pass, no product tensor)."""
    return torch.linalg.vecdot(a, b).unsqueeze(-1)


class _CosineQKV(torch.autograd.Function):
    """qkv (N, T, 3D) -> the same with q and k normalised per head (heads h, d_h = D / h); v unchanged.

    The per-row factors of q and k (and 1 for v) form a small (N, T, 3, h, 1) tensor, so forward and
    backward are whole-buffer operators on contiguous memory (measured ~2x faster on the CPU than the
    same work on the strided q/k slice). Forward: the norms and one multiply, in place when the input is
    a fresh non-leaf tensor (the qkv projection's output: its backward does not need it). Backward: that
    of normalize on q and k, written on the output, dx = inv * g - y * (g . y) / (n * rms); v's gradient
    multiplied by 1. q, k and v stay in one buffer, so autograd's gradient of the qkv projection is a
    single tensor.
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, inplace: bool) -> torch.Tensor:
        n, t, d3 = qkv.shape
        q5 = qkv.view(n, t, 3, heads, -1)
        rms = _row_rms(q5)  # v's rows too: a contiguous reduction is ~2x faster than one over the q/k slice
        factor = (rms + EPS).reciprocal_()
        factor[:, :, 2] = 1.0  # 1 / (rms + eps) for q and k, 1 for v
        factor = factor.to(qkv.dtype)
        if inplace:
            q5.mul_(factor)
            ctx.mark_dirty(qkv)
            out = qkv
        else:
            out = (q5 * factor).view(n, t, d3)
        ctx.save_for_backward(out, factor, rms)
        ctx.heads = heads
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        out, factor, rms = ctx.saved_tensors
        n, t, _ = out.shape
        y5 = out.view(n, t, 3, ctx.heads, -1)
        g5 = g.reshape(n, t, 3, ctx.heads, -1)
        coef = _rowdot(g5, y5).div_(rms * y5.shape[-1])  # (N, T, 3, h, 1); the v rows are zeroed next
        coef[:, :, 2] = 0.0
        gx = torch.mul(g5, factor)
        gx.addcmul_(y5, coef.to(g.dtype), value=-1)
        return gx.view(n, t, -1), None, None


def normalize_qk(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """qkv (N, T, 3D), the fused projection's output, with q and k normalised per head (cosine attention).

    With autograd: one Function (in place on a fresh non-leaf tensor, the usual case). Without (sampling):
    q and k are normalised in place. Under torch.compile or `reference_math`: the plain formula. Returns (N, T, 3D).
    """
    n, t, d3 = qkv.shape
    if _plain("qk"):
        q5 = qkv.reshape(n, t, 3, heads, -1)
        return torch.cat((normalize(q5[:, :, :2]), q5[:, :, 2:]), dim=2).reshape(n, t, d3)
    if torch.is_grad_enabled() and qkv.requires_grad:
        inplace = not qkv.is_leaf and qkv._base is None and qkv.is_contiguous()
        return _CosineQKV.apply(qkv, heads, inplace)
    if qkv._base is not None or not qkv.is_contiguous():
        qkv = qkv.contiguous()
    q5 = qkv.view(n, t, 3, heads, -1)
    factor = (_row_rms(q5) + EPS).reciprocal_()
    factor[:, :, 2] = 1.0
    q5.mul_(factor.to(qkv.dtype))
    return qkv



# ------------------------------------------------------------------------------------------------
# Modulation: scale and rotation of channel pairs in one operator
# ------------------------------------------------------------------------------------------------
def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast result back to `shape` (sum over the broadcast dimensions)."""
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1 and t.shape[lead + i] != 1]
    return t.sum(dims, keepdim=True).reshape(shape) if dims else t


def _mix_pairs(x, ca, cb, sa, sb, pairing: str) -> torch.Tensor:
    """(a*ca + b*sa | b*cb + a*sb) for every channel pair (a, b) of x, written into one new buffer."""
    a, b = _pair_views(x, pairing)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    oa, ob = _pair_views(out, pairing)
    torch.mul(a, ca, out=oa)
    oa.addcmul_(b, sa)
    torch.mul(b, cb, out=ob)
    ob.addcmul_(a, sb)
    return out


class _PairMix(torch.autograd.Function):
    """out_a = a*ca + b*sa, out_b = b*cb + a*sb for every channel pair (a, b) of x.

    With ca = ka*cos, cb = kb*cos, sa = -kb*sin, sb = ka*sin this is a rotation by theta of x scaled by k.
    Coefficients (..., D/2) broadcast against the pair views. Two multiplies and two multiply-adds
    into one output buffer, forward and backward; no chunk/cat copies.
    """

    @staticmethod
    def forward(ctx, x, ca, cb, sa, sb, pairing: str):
        out = _mix_pairs(x, ca, cb, sa, sb, pairing)
        ctx.save_for_backward(x, ca, cb, sa, sb)
        ctx.pairing = pairing
        return out

    @staticmethod
    def backward(ctx, g):
        x, ca, cb, sa, sb = ctx.saved_tensors
        pairing = ctx.pairing
        a, b = _pair_views(x, pairing)
        g = g.contiguous()
        ga, gb = _pair_views(g, pairing)
        gx = None
        if ctx.needs_input_grad[0]:  # the transpose of the 2x2 map of every pair: sa and sb swap
            gx = _mix_pairs(g, ca, cb, sb, sa, pairing)
        grads = [None] * 4
        if any(ctx.needs_input_grad[1:5]):
            same = g * x  # (ga*a | gb*b): grads of ca, cb
            cross = torch.empty_like(same)  # (ga*b | gb*a): grads of sa, sb
            xa, xb = _pair_views(cross, pairing)
            torch.mul(ga, b, out=xa)
            torch.mul(gb, a, out=xb)
            s_a, s_b = _pair_views(same, pairing)
            grads = [_sum_to(s_a, ca.shape), _sum_to(s_b, cb.shape), _sum_to(xa, sa.shape), _sum_to(xb, sb.shape)]
        return (gx, *grads, None)


def scale_rotate_pairs(x: torch.Tensor, theta: torch.Tensor, scale: torch.Tensor | None = None,
                       pairing: str = "half") -> torch.Tensor:
    """rotate_pairs(x * scale, theta, pairing) in one fused operator (scale (..., D) or None).

    theta (..., D/2) broadcasts against x (..., D) minus its last dim; so does scale. With scale a per-sample
    (N, 1, D) tensor, all coefficient algebra happens on (N, 1, D/2) tensors; the token-sized work is the
    four multiply(-add)s of `_PairMix`.
    """
    if _plain("rotation"):
        return rotate_pairs(x if scale is None else x * scale, theta, pairing)
    cos, sin = torch.cos(theta), torch.sin(theta)
    if scale is None:
        return _PairMix.apply(x, cos, cos, -sin, sin, pairing)
    ka, kb = _pair_views(scale, pairing)
    return _PairMix.apply(x, ka * cos, kb * cos, -(kb * sin), ka * sin, pairing)


def modulate(x: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
             angle: torch.Tensor | None = None, pairing: str = "half") -> torch.Tensor:
    """`nn.modulate` (DiT's x * (1 + scale) + shift, then MaP-DiT's rotation of channel pairs by `angle`) with
    the scale and the rotation as one fused operator when there is no shift between them. Same values."""
    if angle is None or _plain("rotation"):
        return nn_modulate(x, shift, scale, angle, pairing)
    if shift is not None:
        return scale_rotate_pairs(nn_modulate(x, shift, scale), angle, None, pairing)
    return scale_rotate_pairs(x, angle, None if scale is None else 1 + scale, pairing)


# ------------------------------------------------------------------------------------------------
# Weight-normalised layers
# ------------------------------------------------------------------------------------------------
class _NormalizedWeight(torch.autograd.Function):
    """W_eff = W * inv * k per row, inv = 1 / (rms + eps): `normalize(W) * k` given W's row statistics.

    rms, inv: (out, 1) row statistics of W (measured by the caller: by the forced projection that just put
    W on the sphere, or on the spot). k = gain * scale, gain an optional scalar parameter.
    Forward: one multiply. Backward (exact Jacobian of normalize, with rho = rms):
        dW = k * inv * (G - W * (G . W) * inv / (n * rho)),   dgain = scale * sum_rows inv * (G . W)
    i.e. one row dot product and one multiply-add over W. The tangent projection of the gradient.
    """

    @staticmethod
    def forward(ctx, weight, rms, inv, gain, scale: float):
        coef = inv * scale if gain is None else inv * (gain.detach() * scale)
        ctx.save_for_backward(weight, rms, inv, gain)
        ctx.scale = scale
        return weight * coef.to(weight.dtype)

    @staticmethod
    def backward(ctx, g):
        weight, rms, inv, gain = ctx.saved_tensors
        scale = ctx.scale
        k = scale if gain is None else gain * scale
        dot = _rowdot(g, weight)  # (out, 1): G . W per row
        grad_w = grad_gain = None
        if ctx.needs_input_grad[0]:
            radial = dot * inv * inv / (rms * weight.shape[-1])
            grad_w = torch.addcmul(g * (inv * k).to(g.dtype), weight, (radial * k).to(g.dtype), value=-1)
        if gain is not None and ctx.needs_input_grad[3]:
            grad_gain = (dot * inv).sum().mul_(scale).to(gain.dtype)
        return grad_w, None, None, grad_gain, None


class FusedMPLinear(MPLinear):
    """`nn.MPLinear` (same parameters, same values) with fast training and eval paths.

    Training: the forced projection measures W's row norms once per optimizer step and keeps them; the
    forward is then one multiply of W (`_NormalizedWeight`); the backward is one row dot and one multiply-add.
    Eval without autograd: W_eff is computed once and reused until W or g change (keyed on their version
    counters). Under torch.compile or `reference_math("linear")`: `MPLinear.forward`, the plain formula.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stats: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (key, rms, inv) of W's rows
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def _weight_key(self) -> tuple:
        return (self.weight._version, self.weight.data_ptr(), self.weight.device)

    @torch.no_grad()
    def project_(self) -> None:
        """W <- normalize(W) in place, keeping the row statistics for the next forward."""
        rms = _row_rms(self.weight)
        denom = rms + EPS
        self.weight.div_(denom.to(self.weight.dtype))
        self._after_projection(rms / denom)

    def _after_projection(self, new_rms: torch.Tensor | None) -> None:
        """Record that W was just projected and that its rows now have RMS `new_rms` (computed, not measured)."""
        super()._after_projection(new_rms)
        self._stats = None if new_rms is None else (self._weight_key(), new_rms, (new_rms + EPS).reciprocal_())

    def _row_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms, inv) of W's rows: from the last projection if W has not changed since, else measured now."""
        stats = self._stats
        if stats is not None and stats[0] == self._weight_key():
            return stats[1], stats[2]
        rms = _row_rms(self.weight)
        return rms, (rms + EPS).reciprocal_()

    def _training_weight(self) -> torch.Tensor:
        if not self.normalize_on_use:
            return self.weight * (self.gain * self.scale) if self.gain is not None else self.weight * self.scale
        rms, inv = self._row_stats()
        return _NormalizedWeight.apply(self.weight, rms, inv, self.gain, self.scale)

    def _training_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._training_weight().to(x.dtype))

    def _cached_weight(self, dtype: torch.dtype) -> torch.Tensor:
        key = (self._weight_key(), dtype,
               None if self.gain is None else (self.gain._version, self.gain.data_ptr()))
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the old one first
            self._cache = (key, self.effective_weight().to(dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain("linear"):
            return super().forward(x)
        if self.training:
            self._project_if_stale()
            self._cache = None
            return self._training_forward(x)
        if torch.is_grad_enabled():
            return self._training_forward(x)
        return F.linear(x, self._cached_weight(x.dtype))


# ------------------------------------------------------------------------------------------------
# Forced weight normalisation of a whole model, batched
# ------------------------------------------------------------------------------------------------
def _concat_row_norms(device: torch.device) -> bool:
    """One norm kernel per group of weights (GPU) or one per weight (CPU; measured 9x faster on DiT-S/2's
    weights there, the concatenation being a copy of all of them)."""
    return device.type != "cpu"


@torch.no_grad()
def project_mp_weights_(module: nn.Module) -> int:
    """Forced weight normalisation of every MPLinear/MPEmbedding with forced=True in `module`, batched.

    W <- normalize(W) for all of them; the result equals calling `project_()` on each layer. Row norms are
    computed per group of weights sharing a row length and device/dtype: on CUDA each group is one
    concatenated norm kernel; on CPU, where a kernel launch is cheap and memory traffic is what counts,
    one norm per weight (the concatenation would be an extra read and write of every weight). The rest is
    foreach arithmetic on the (rows, 1) statistics and one in-place foreach multiply of all weights.
    The layers record the new row statistics, so their next training forward does not measure them again.
    Returns the number of tensors projected.
    """
    layers = [m for m in module.modules() if isinstance(m, (MPLinear, MPEmbedding)) and m.forced]
    if not layers:
        return 0
    groups: dict[tuple, list] = defaultdict(list)
    for m in layers:
        w = m.weight
        groups[(w.shape[-1], w.device, w.dtype)].append(m)
    for (n, device, dtype), members in groups.items():
        weights = [m.weight for m in members]
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        if len(weights) > 1 and _concat_row_norms(device):
            flat = torch.cat([w.reshape(-1, n) for w in weights])
            norms = list(torch.linalg.vector_norm(flat, dim=-1, keepdim=True, dtype=acc)
                         .split([w.shape[0] for w in weights]))
        else:
            norms = [torch.linalg.vector_norm(w, dim=-1, keepdim=True, dtype=acc) for w in weights]
        rms = torch._foreach_div(norms, math.sqrt(n))
        denom = torch._foreach_add(rms, EPS)  # rms + eps, as in `normalize`
        torch._foreach_div_(weights, denom if dtype == acc else [d.to(dtype) for d in denom])
        new_rms = torch._foreach_div(rms, denom)  # the rows' RMS after the projection
        for m, r in zip(members, new_rms):
            m._after_projection(r)
    return len(layers)
