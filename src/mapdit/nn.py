"""Magnitude-preserving (MP) building blocks, usable in any PyTorch model.

"Magnitude" of a tensor x with n channels is M[x] = sqrt(mean(x**2)) over its last dimension, averaged
over everything else (spec §1). Every block here is documented with the magnitude property it keeps.
Pure functions for the math; two small modules (`MPLinear`, `MPEmbedding`) for the learned parts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# sqrt(E[silu(z)^2]) for z ~ N(0, 1), to three digits (spec §1; EDM2 uses the same constant).
SILU_RMS = 0.596
EPS = 1e-4


def magnitude(x: torch.Tensor) -> torch.Tensor:
    """M[x]: root-mean-square over the last (channel) dimension, averaged over all other positions."""
    return x.float().pow(2).mean(dim=-1).sqrt().mean()


def normalize(x: torch.Tensor, dim: int | tuple[int, ...] = -1, eps: float = EPS) -> torch.Tensor:
    """Scale every row (along `dim`) to RMS 1, i.e. norm sqrt(n). Output magnitude: exactly 1 (up to eps)."""
    dim = (dim,) if isinstance(dim, int) else dim
    n = math.prod(x.shape[d] for d in dim)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # half inputs: norm in fp32
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=acc)
    return x / (norm / math.sqrt(n) + eps).to(x.dtype)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """Blend (1-t)*a + t*b, rescaled so that uncorrelated a, b of equal magnitude give that magnitude."""
    return torch.lerp(a, b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU divided by its RMS under N(0,1) input: unit-magnitude Gaussian in -> magnitude ~1 out."""
    return F.silu(x) / SILU_RMS


class MPSiLU(nn.Module):
    """Module form of `mp_silu` (so a model can pick the activation layer once, at build time)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mp_silu(x)


def rotate_pairs(x: torch.Tensor, theta: torch.Tensor, pairing: str = "half") -> torch.Tensor:
    """Rotate D/2 two-dimensional channel pairs of x (..., D) by angles theta (..., D/2) (broadcast).

    An orthogonal map: every token's norm is kept exactly (up to rounding).
    pairing="half": pairs (x_i, x_{i+D/2}) -- contiguous halves, no strided views (our default).
    pairing="interleaved": pairs (x_{2i}, x_{2i+1}) -- the paper's Eq. 6 indexing.
    The two are the same transform up to a fixed channel permutation.
    """
    cos, sin = torch.cos(theta), torch.sin(theta)
    if pairing == "half":
        a, b = x.chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    if pairing == "interleaved":
        pairs = x.unflatten(-1, (-1, 2))  # (..., D/2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    raise ValueError(f"unknown rotation pairing {pairing!r}: use 'half' or 'interleaved'")


def cosine_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention with q and k normalised per head to norm sqrt(d_h).

    q, k, v: (N, heads, T, d_h). With the usual 1/sqrt(d_h) scale the logits become sqrt(d_h)*cos(q, k),
    bounded in [-sqrt(d_h), sqrt(d_h)] whatever the input magnitude (a fixed temperature).
    """
    return F.scaled_dot_product_attention(normalize(q), normalize(k), v)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain scaled dot-product attention (the original DiT). q, k, v: (N, heads, T, d_h)."""
    return F.scaled_dot_product_attention(q, k, v)


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
    Init: W ~ N(0, 1).
    In eval mode without autograd, the effective weight is computed once and reused until W or g change.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        normalize_on_use: bool = True,
        forced: bool = True,
        gain: float | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.normalize_on_use, self.forced = normalize_on_use, forced
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.gain = None if gain is None else nn.Parameter(torch.tensor(float(gain)))
        self._projected_version = -1  # weight._version right after our last in-place projection
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, normalize_on_use={self.normalize_on_use}, "
                f"forced={self.forced}, gain={'learned' if self.gain is not None else 'none'}")

    @torch.no_grad()
    def project_(self) -> None:
        """Forced weight normalisation of this layer: W <- normalize(W), in place."""
        self.weight.copy_(normalize(self.weight))
        self._projected_version = self.weight._version

    def effective_weight(self) -> torch.Tensor:
        w = normalize(self.weight) if self.normalize_on_use else self.weight
        scale = 1.0 / math.sqrt(self.in_features)
        return w * (self.gain * scale) if self.gain is not None else w * scale

    def _cached_weight(self) -> torch.Tensor:
        key = (self.weight._version, self.weight.data_ptr(),
               None if self.gain is None else (self.gain._version, self.gain.data_ptr()))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.effective_weight())
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            if self.forced and self.weight._version != self._projected_version:
                self.project_()
            self._cache = None
            w = self.effective_weight()
        elif torch.is_grad_enabled():
            w = self.effective_weight()
        else:
            w = self._cached_weight()
        return F.linear(x, w.to(x.dtype))


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
        self._projected_version = self.weight._version

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        if self.training and self.forced and self.weight._version != self._projected_version:
            self.project_()
        return normalize(self.weight[index])


@torch.no_grad()
def project_mp_weights_(module: nn.Module) -> int:
    """Forced weight normalisation of every MPLinear/MPEmbedding with forced=True in `module`, batched.

    One pass of foreach kernels over all weights instead of one small kernel chain per layer; the result
    equals calling `project_()` on each layer. Returns the number of tensors projected.
    """
    layers = [m for m in module.modules() if isinstance(m, (MPLinear, MPEmbedding)) and m.forced]
    if not layers:
        return 0
    weights = [m.weight for m in layers]
    # Row norms of every weight, then the scale sqrt(n)/(norm + eps*sqrt(n)) as in `normalize`.
    norms = [torch.linalg.vector_norm(w, dim=-1, keepdim=True) for w in weights]
    rms = torch._foreach_div(norms, [math.sqrt(w.shape[-1]) for w in weights])
    torch._foreach_add_(rms, EPS)
    torch._foreach_div_(weights, rms)
    for m in layers:
        m._projected_version = m.weight._version
    return len(layers)
