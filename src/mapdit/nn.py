"""Magnitude-preserving (MP) building blocks, usable in any PyTorch model.

"Magnitude" of a tensor x with n channels is M[x] = sqrt(mean(x**2)) over its last dimension, averaged
over everything else (spec §1). Every block here is documented with the magnitude property it keeps.
Pure functions for the math; two small modules (`MPLinear`, `MPEmbedding`) for the learned parts.

Speed notes (measured in benchmarks/bench.py, see BENCHMARKS.md). Eager PyTorch pays one pass over
memory, and on a busy CPU one thread rendezvous, per operator, so the hot paths here are written as few
operators as possible:
  * row normalisation (of weights, and of q/k in cosine attention) is a custom autograd Function whose
    forward is one multiply and whose backward is one row dot product and one multiply-add, instead of
    the ~10 operators autograd records for x / (||x|| / sqrt(n) + eps);
  * an MP linear whose weight was just projected onto the sphere (forced weight normalisation) reuses
    the row norms of that projection: its forward is a single multiply, computed once per optimizer step;
  * pair rotation (optionally fused with a per-channel scale) is one Function: two multiplies and two
    multiply-adds forward, the same backward, no concatenation.
Under torch.compile (`torch.compiler.is_compiling()`), every block falls back to the plain formulas,
which Inductor fuses by itself; nothing on that path reads `_version` or a Python-side cache, so models
compile without graph breaks.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

# sqrt(E[silu(z)^2]) for z ~ N(0, 1), to three digits (spec §1; EDM2 uses the same constant).
SILU_RMS = 0.596
# sqrt(E[gelu_tanh(z)^2]) for z ~ N(0, 1) (numerical integration): the MP form of DiT's MLP activation.
GELU_RMS = 0.652
EPS = 1e-4


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def magnitude(x: torch.Tensor) -> torch.Tensor:
    """M[x]: root-mean-square over the last (channel) dimension, averaged over all other positions."""
    return x.float().pow(2).mean(dim=-1).sqrt().mean()


def normalize(x: torch.Tensor, dim: int | tuple[int, ...] = -1, eps: float = EPS) -> torch.Tensor:
    """Scale every row (along `dim`) to RMS 1, i.e. norm sqrt(n). Output magnitude: exactly 1 (up to eps).

    The plain, differentiable reference formula; `normalize_rows` computes the same with a cheaper backward.
    """
    dim = (dim,) if isinstance(dim, int) else tuple(dim)
    n = 1
    for d in dim:  # (a loop, not a generator: torch.compile traces it without a graph break)
        n *= x.shape[d]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # half inputs: norm in fp32
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=acc)
    return x / (norm / math.sqrt(n) + eps).to(x.dtype)


@torch.no_grad()
def _row_rms(x: torch.Tensor) -> torch.Tensor:
    """RMS of every row along the last dim, (..., 1), in fp32 (fp64 for fp64 input), outside autograd."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc).div_(math.sqrt(x.shape[-1]))


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) over the last dim, keepdim (one fused pass, no product tensor)."""
    return torch.linalg.vecdot(a, b).unsqueeze(-1)


class _RowNormalize(torch.autograd.Function):
    """y = x * inv with inv = 1 / (rms(x) + eps) per row: `normalize` along the last dim.

    Backward of the exact formula, written on the output: dx = inv * g - y * (g . y) / (n * rms), one row dot
    and two fused elementwise operators (autograd of `normalize` records about ten).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rms = _row_rms(x)
        inv = (rms + EPS).reciprocal_()
        y = x * inv.to(x.dtype)
        ctx.save_for_backward(y, inv, rms)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        y, inv, rms = ctx.saved_tensors
        coef = _rowdot(g, y).div_(rms * y.shape[-1])
        return torch.addcmul(g * inv.to(g.dtype), y, coef.to(g.dtype), value=-1)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """`normalize(x)` along the last dim, equal within rounding, with a cheap backward (see `_RowNormalize`)."""
    if _compiling() or not (torch.is_grad_enabled() and x.requires_grad):
        return normalize(x)
    return _RowNormalize.apply(x)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Blend (1-t)*a + t*b, rescaled so that uncorrelated a, b of equal magnitude give that magnitude."""
    return torch.lerp(a, b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_sum_coefficients(t: float) -> tuple[float, float]:
    """(alpha, beta) with mp_sum(a, b, t) = alpha * a + beta * b."""
    c = math.sqrt((1 - t) ** 2 + t**2)
    return (1 - t) / c, t / c


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its RMS under N(0,1) input: unit-magnitude Gaussian in -> magnitude ~1 out."""
    return F.silu(x) / SILU_RMS


def mp_gelu(x: torch.Tensor) -> torch.Tensor:
    """DiT's tanh-GELU divided by its RMS under N(0,1) input (the MP flag applied to the MLP's GELU)."""
    return F.gelu(x, approximate="tanh") / GELU_RMS


class MPActivation(nn.Module):
    """Module form of `mp_silu` or `mp_gelu` (so a model picks the activation layer once, at build time).

    When the consumer is an `MPLinear`, a model can instead use the plain activation and give the linear
    `input_scale=1/SILU_RMS` (or 1/GELU_RMS): the same function with the division folded into the weight
    scale (free).
    """

    def __init__(self, gelu: bool = False):
        super().__init__()
        self.gelu = gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mp_gelu(x) if self.gelu else mp_silu(x)


# ------------------------------------------------------------------------------------------------
# Fused multiply-add (gates, residuals, modulation)
# ------------------------------------------------------------------------------------------------
class _MulAdd(torch.autograd.Function):
    """out = base * alpha + y * k, k (and base) broadcast against y; alpha a Python float.

    Forward: one addcmul (plus one scale when alpha != 1). Backward: grad*k for y, sum(grad*y) for k,
    grad (*alpha, summed to base's shape) for base. Autograd's own addcmul formula computes
    grad * (y * value) for k: an extra full-size multiply by the scalar, here avoided.
    """

    @staticmethod
    def forward(ctx, base, y, k, alpha: float):
        if alpha == 1.0:
            out = torch.addcmul(base, y, k)
        else:
            out = torch.mul(base, alpha)
            out = out.addcmul_(y, k) if out.shape == torch.broadcast_shapes(out.shape, y.shape) else out + y * k
        ctx.save_for_backward(y, k)
        ctx.alpha, ctx.base_shape = alpha, base.shape
        return out

    @staticmethod
    def backward(ctx, g):
        y, k = ctx.saved_tensors
        grad_base = grad_y = grad_k = None
        if ctx.needs_input_grad[0]:
            grad_base = _sum_to(g if ctx.alpha == 1.0 else g * ctx.alpha, ctx.base_shape)
        if ctx.needs_input_grad[1]:
            grad_y = _sum_to(g * k, y.shape)
        if ctx.needs_input_grad[2]:
            grad_k = _sum_to(g * y, k.shape)
        return grad_base, grad_y, grad_k, None


def mul_add(base: torch.Tensor, y: torch.Tensor, k: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """base * alpha + y * k in one fused operator with a lean backward (see `_MulAdd`).

    Used for gated residuals (base = stream, y = branch, k = per-sample gate (N, 1, D)) and for the
    modulation h * (1 + scale) + shift (base = shift (N, 1, D), y = h, k = 1 + scale).
    """
    if _compiling():
        return torch.addcmul(base if alpha == 1.0 else base * alpha, y, k)
    if not torch.is_grad_enabled():  # sampling: at most one new buffer
        if alpha == 1.0:
            return torch.addcmul(base, y, k)
        out = base * alpha
        return out.addcmul_(y, k) if out.shape == torch.broadcast_shapes(out.shape, y.shape) else out + y * k
    return _MulAdd.apply(base, y, k, alpha)


# ------------------------------------------------------------------------------------------------
# Rotation of channel pairs
# ------------------------------------------------------------------------------------------------
def _pair_views(x: torch.Tensor, pairing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two members (a, b) of every channel pair of x (..., D), as views of shape (..., D/2)."""
    if pairing == "half":
        pairs = x.unflatten(-1, (2, -1))  # (..., 2, D/2)
        return pairs[..., 0, :], pairs[..., 1, :]
    if pairing == "interleaved":
        pairs = x.unflatten(-1, (-1, 2))  # (..., D/2, 2)
        return pairs[..., 0], pairs[..., 1]
    raise ValueError(f"unknown rotation pairing {pairing!r}: use 'half' or 'interleaved'")


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast result back to `shape` (sum over the broadcast dimensions)."""
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, s in enumerate(shape) if s == 1 and t.shape[lead + i] != 1]
    return t.sum(dims, keepdim=True).reshape(shape) if dims else t


class _PairMix(torch.autograd.Function):
    """out_a = a*ca + b*sa, out_b = b*cb + a*sb for every channel pair (a, b) of x.

    With ca = ka*cos, cb = kb*cos, sa = -kb*sin, sb = ka*sin this is a rotation by theta of x scaled by k.
    Coefficients (..., D/2) broadcast against the pair views. Two multiplies and two multiply-adds
    into one output buffer, forward and backward; no chunk/cat copies.
    """

    @staticmethod
    def forward(ctx, x, ca, cb, sa, sb, pairing: str):
        a, b = _pair_views(x, pairing)
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        oa, ob = _pair_views(out, pairing)
        torch.mul(a, ca, out=oa)
        oa.addcmul_(b, sa)
        torch.mul(b, cb, out=ob)
        ob.addcmul_(a, sb)
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
        if ctx.needs_input_grad[0]:  # the transpose of the 2x2 map of every pair
            gx = torch.empty_like(x, memory_format=torch.contiguous_format)
            gxa, gxb = _pair_views(gx, pairing)
            torch.mul(ga, ca, out=gxa)
            gxa.addcmul_(gb, sb)
            torch.mul(gb, cb, out=gxb)
            gxb.addcmul_(ga, sa)
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


def scale_rotate_pairs(x: torch.Tensor, theta: torch.Tensor, scale: torch.Tensor | float | None = None,
                       pairing: str = "half") -> torch.Tensor:
    """rotate_pairs(x * scale, theta, pairing) in one fused operator (scale: (..., D), a float, or None).

    theta (..., D/2) broadcasts against x (..., D) minus its last dim; so does scale. With scale a per-sample
    (N, 1, D) tensor, all coefficient algebra happens on (N, 1, D/2) tensors; the token-sized work is the
    four multiply(-add)s of `_PairMix`.
    """
    cos, sin = torch.cos(theta), torch.sin(theta)
    if scale is None or isinstance(scale, (int, float)):
        k = 1.0 if scale is None else float(scale)
        ca = cb = cos if k == 1.0 else cos * k
        sb = sin if k == 1.0 else sin * k
        sa = -sb
    else:
        ka, kb = _pair_views(scale, pairing)
        ca, cb, sa, sb = ka * cos, kb * cos, -(kb * sin), ka * sin
    if _compiling():  # the same arithmetic in plain operators: Inductor fuses it
        a, b = _pair_views(x, pairing)
        return _pair_join(a * ca + b * sa, b * cb + a * sb, pairing)
    return _PairMix.apply(x, ca, cb, sa, sb, pairing)


def _pair_join(a: torch.Tensor, b: torch.Tensor, pairing: str) -> torch.Tensor:
    if pairing == "half":
        return torch.cat((a, b), dim=-1)
    return torch.stack((a, b), dim=-1).flatten(-2)


def rotate_pairs(x: torch.Tensor, theta: torch.Tensor, pairing: str = "half") -> torch.Tensor:
    """Rotate D/2 two-dimensional channel pairs of x (..., D) by angles theta (..., D/2) (broadcast).

    An orthogonal map: every token's norm is kept exactly (up to rounding).
    pairing="half": pairs (x_i, x_{i+D/2}) -- contiguous halves, no strided views (our default).
    pairing="interleaved": pairs (x_{2i}, x_{2i+1}) -- the paper's Eq. 6 indexing.
    The two are the same transform up to a fixed channel permutation.
    """
    return scale_rotate_pairs(x, theta, None, pairing)


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------
def cosine_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention with q and k normalised per head to norm sqrt(d_h).

    q, k, v: (N, heads, T, d_h). With the usual 1/sqrt(d_h) scale the logits become sqrt(d_h)*cos(q, k),
    bounded in [-sqrt(d_h), sqrt(d_h)] whatever the input magnitude (a fixed temperature).
    """
    return F.scaled_dot_product_attention(normalize_rows(q), normalize_rows(k), v)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain scaled dot-product attention (the original DiT). q, k, v: (N, heads, T, d_h)."""
    return F.scaled_dot_product_attention(q, k, v)


class _CosineQKV(torch.autograd.Function):
    """qkv (N, T, 3D) -> the same with q and k normalised per head (heads h, d_h = D / h); v unchanged.

    The per-row factors of q and k (and 1 for v) form a small (N, T, 3, h, 1) tensor, so forward and
    backward are whole-buffer operators on contiguous memory (measured ~2x faster on the CPU than the
    same work on the strided q/k slice). Forward: the norms and one multiply, in place when the input is
    a fresh non-leaf tensor (the qkv projection's output: its backward does not need it). Backward: the
    `_RowNormalize` formula on q and k, v's gradient multiplied by 1. q, k and v stay in one buffer, so
    autograd's gradient of the qkv projection is a single tensor.
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
    q and k are normalised in place. Under torch.compile: the plain formula. Returns (N, T, 3D).
    """
    n, t, d3 = qkv.shape
    if _compiling():
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
# Positional tables
# ------------------------------------------------------------------------------------------------
def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positional table (T=grid_h*grid_w, dim), float64, the MAE/DiT recipe.

    The first dim/2 channels encode the column index, the last dim/2 the row index (DiT's order);
    each half is [sin(pos*w_k), cos(pos*w_k)] with w_k = 10000^(-k/(dim/4)). Every token has RMS 1/sqrt(2).
    """
    if dim % 4:
        raise ValueError(f"sin-cos positional encoding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (T,) -> (T, dim/2)
        angles = pos[:, None] * omega[None]
        return torch.cat((angles.sin(), angles.cos()), dim=1)

    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    return torch.cat((encode(cols.flatten()), encode(rows.flatten())), dim=1)


def mp_sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """The sin-cos table with every token scaled to RMS 1 (an exact x sqrt(2) for sin-cos)."""
    return normalize(sincos_pos_embed_2d(dim, grid_h, grid_w))


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


class _NormalizedLinearRows(torch.autograd.Function):
    """y = x @ (W * c)^T computed as (x @ W^T) * c, c = k * inv per output: for few input rows.

    When x has fewer rows than W has columns (the modulation linears see one conditioning vector per
    sample, not per token), scaling the small output is cheaper than scaling W, and the backward of the
    normalisation can be taken in output space: with z = x @ W^T, (G . W)_i = sum_rows g_i z_i, so
        dW = (g * c)^T @ x - W * (k * inv^2 * dot / (n * rho)),   dx = (g * c) @ W
    i.e. one matmul and one multiply-add over W, nothing else of W's size. Same values as
    `_NormalizedWeight` followed by F.linear.
    """

    @staticmethod
    def forward(ctx, x, weight, rms, inv, gain, scale: float):
        k = scale if gain is None else gain.detach() * scale
        c = (inv * k).reshape(-1).to(x.dtype)  # (out,)
        z = F.linear(x, weight)
        ctx.save_for_backward(x, weight, rms, inv, gain, z, c)
        ctx.scale = scale
        return z * c

    @staticmethod
    def backward(ctx, g):
        x, weight, rms, inv, gain, z, c = ctx.saved_tensors
        scale = ctx.scale
        g2, z2, x2 = g.reshape(-1, g.shape[-1]), z.reshape(-1, z.shape[-1]), x.reshape(-1, x.shape[-1])
        gc = g2 * c
        dot = (g2 * z2).sum(0).unsqueeze(-1)  # (out, 1): G . W per row, from the small output space
        grad_x = grad_w = grad_gain = None
        if ctx.needs_input_grad[0]:
            grad_x = (gc @ weight).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            k = scale if gain is None else gain * scale
            radial = dot * inv * inv * k / (rms * weight.shape[-1])
            grad_w = (gc.t() @ x2).addcmul_(weight, radial.to(weight.dtype), value=-1)
        if gain is not None and ctx.needs_input_grad[4]:
            grad_gain = (dot * inv).sum().mul_(scale).to(gain.dtype)
        return grad_x, grad_w, None, None, grad_gain, None


class MPLinear(nn.Module):
    """Bias-free weight-normalised linear layer: y = x @ W_eff.T with W_eff = g * normalize(W) / sqrt(fan_in).

    Every output row of W_eff has unit L2 norm (times g), so for i.i.d. input of magnitude s the output
    has magnitude g*s (spec §1, "row-normalised linear").

    normalize_on_use: normalise W in the forward (gradient tangent to the sphere). Off: W used raw
        (still scaled by 1/sqrt(fan_in)), which is what "forced WN without WN" means.
    forced: in training mode, project the stored W onto the sphere (rows of RMS 1) before it is used,
        so ||W|| cannot grow and the effective learning rate does not decay (EDM2's scheme).
        A model can project all its layers at once (`project_mp_weights_`); the layer then skips it.
    gain: None (g = 1), or the initial value of a learned scalar gain (0.0 gives a zero output at init).
    input_scale: a constant folded into W_eff (e.g. 1/0.596 when the input is a plain SiLU whose MP
        division is done here, for free); the output is input_scale times the layer above.
    Init: W ~ N(0, 1).

    Cost of the weight normalisation (eager): the projection measures the row norms once per optimizer
    step and keeps them; the training forward is then one multiply of W and the backward one row dot and
    one multiply-add (`_NormalizedWeight`). In eval mode without autograd, W_eff is computed once and reused
    until W or g change (keyed on their version counters). Under torch.compile the forward is the plain
    formula and the in-place projection must come from outside (`project_mp_weights_`, as the training
    loop does before every step).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        normalize_on_use: bool = True,
        forced: bool = True,
        gain: float | None = None,
        input_scale: float = 1.0,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.normalize_on_use, self.forced = normalize_on_use, forced
        self.input_scale = float(input_scale)
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.gain = None if gain is None else nn.Parameter(torch.tensor(float(gain)))
        self._projected_version = -1  # weight._version right after our last in-place projection
        self._stats: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (key, rms, inv) of W's rows
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def scale(self) -> float:
        return self.input_scale / math.sqrt(self.in_features)

    def extra_repr(self) -> str:
        extra = f", input_scale={self.input_scale:g}" if self.input_scale != 1.0 else ""
        return (f"{self.in_features}, {self.out_features}, normalize_on_use={self.normalize_on_use}, "
                f"forced={self.forced}, gain={'learned' if self.gain is not None else 'none'}{extra}")

    def _weight_key(self) -> tuple:
        return (self.weight._version, self.weight.data_ptr(), self.weight.device)

    @torch.no_grad()
    def project_(self) -> None:
        """Forced weight normalisation of this layer: W <- normalize(W), in place."""
        rms = _row_rms(self.weight)
        denom = rms + EPS
        self.weight.div_(denom.to(self.weight.dtype))
        self._after_projection(rms / denom)

    def _after_projection(self, new_rms: torch.Tensor) -> None:
        """Record that W was just projected and that its rows now have RMS `new_rms` (computed, not measured)."""
        self._projected_version = self.weight._version
        self._stats = (self._weight_key(), new_rms, (new_rms + EPS).reciprocal_())

    def effective_weight(self) -> torch.Tensor:
        """The plain differentiable formula (reference; used under torch.compile and with grad in eval)."""
        w = normalize(self.weight) if self.normalize_on_use else self.weight
        return w * (self.gain * self.scale) if self.gain is not None else w * self.scale

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
        rows = x.numel() // max(1, x.shape[-1])
        if self.normalize_on_use and 2 * rows <= self.in_features and x.dtype == self.weight.dtype:
            rms, inv = self._row_stats()  # few rows (per-sample conditioning): normalise in output space
            return _NormalizedLinearRows.apply(x, self.weight, rms, inv, self.gain, self.scale)
        return F.linear(x, self._training_weight().to(x.dtype))

    def _cached_weight(self, dtype: torch.dtype) -> torch.Tensor:
        key = (self._weight_key(), dtype,
               None if self.gain is None else (self.gain._version, self.gain.data_ptr()))
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the old one first
            self._cache = (key, self.effective_weight().to(dtype))
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _compiling():
            w = self.effective_weight()
        elif self.training:
            if self.forced and self.weight._version != self._projected_version:
                self.project_()
            self._cache = None
            return self._training_forward(x)
        elif torch.is_grad_enabled():
            return self._training_forward(x)
        else:
            return F.linear(x, self._cached_weight(x.dtype))
        return F.linear(x, w.to(x.dtype))


def mp_fourier(c: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Fourier features of a scalar per sample, c (N,) -> (N, 2F): sqrt(2) * [cos(2 pi f c), sin(2 pi f c)].

    Every row has RMS exactly 1 (cos^2 + sin^2 = 1 per pair): EDM2's MPFourier (its Eq. 75 embedding of
    c_noise = ln(sigma) / 4), written with sin/cos pairs instead of random phases so the magnitude is exact.
    """
    arg = (2 * math.pi) * c.to(torch.float32)[:, None] * freqs[None].to(torch.float32)
    return torch.cat((torch.cos(arg), torch.sin(arg)), dim=-1) * math.sqrt(2)


class MPEmbedding(nn.Module):
    """Embedding table whose rows are normalised to RMS 1 on use: every looked-up vector has magnitude 1.

    forced: in training mode the stored table is projected onto the sphere before use (as MPLinear).
    Init: N(0, 1).
    """

    def __init__(self, num_embeddings: int, dim: int, forced: bool = True):
        super().__init__()
        self.forced = forced
        self.weight = nn.Parameter(torch.randn(num_embeddings, dim))
        self._projected_version = -1

    @torch.no_grad()
    def project_(self) -> None:
        self.weight.copy_(normalize(self.weight))
        self._after_projection(None)

    def _after_projection(self, new_rms) -> None:
        self._projected_version = self.weight._version

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        if self.training and self.forced and not _compiling() and self.weight._version != self._projected_version:
            self.project_()
        return normalize_rows(self.weight[index])


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
