"""Magnitude-preserving (MP) building blocks: the plain formulas, the reference math of mapdit.

"Magnitude" of a tensor x with n channels is M[x] = sqrt(mean(x**2)) over its last dimension, averaged over
everything else (EDM2's definition, Karras et al. 2024). Every block here is a few lines of plain PyTorch, documented
with the magnitude property it keeps and the equation of EDM2's appendix (or of MaP-DiT) it implements.

The same operations with hand-written backwards, fused operators and caches live in `mapdit.fused`; every fast
path there falls back to the formula here under `fused.reference_math()` (and under torch.compile), and an
equality test holds it to that formula (tests/test_speed_paths.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# sqrt(E[silu(z)^2]) for z ~ N(0, 1), to three digits (EDM2 eq. 81 divides by the same constant).
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
    """Scale every row (along `dim`) to RMS 1, i.e. norm sqrt(n) (EDM2's `normalize`). Output magnitude: 1."""
    dim = (dim,) if isinstance(dim, int) else tuple(dim)
    n = 1
    for d in dim:  # (a loop, not a generator: torch.compile traces it without a graph break)
        n *= x.shape[d]
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # half inputs: norm in fp32
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=acc)
    return x / (norm / math.sqrt(n) + eps).to(x.dtype)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """EDM2 eq. 88: (1-t)*a + t*b divided by sqrt((1-t)^2 + t^2), so that uncorrelated a, b of equal
    magnitude give that magnitude. t = 0.3 for block residuals (EDM2's res_balance), 0.5 for equal partners.
    Written alpha*a + beta*b: one multiply and one add, forward and backward (EDM2's lerp-then-divide costs a
    third pass each way: the demo's Config E step 4 % slower, BENCHMARKS.md), and mixed dtypes (an fp32
    stream and a bf16 branch under autocast) promote as in a + b."""
    alpha, beta = mp_sum_coefficients(t)
    return torch.add(a.to(torch.promote_types(a.dtype, b.dtype)) * alpha, b, alpha=beta)


def mp_sum_coefficients(t: float) -> tuple[float, float]:
    """(alpha, beta) with mp_sum(a, b, t) = alpha * a + beta * b."""
    c = math.sqrt((1 - t) ** 2 + t**2)
    return (1 - t) / c, t / c


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """EDM2 eq. 81: SiLU divided by its RMS under N(0,1) input, so unit-magnitude Gaussian in -> magnitude ~1 out."""
    return F.silu(x) / SILU_RMS


def mp_gelu(x: torch.Tensor) -> torch.Tensor:
    """DiT's tanh-GELU divided by its RMS under N(0,1) input (eq. 81's recipe applied to the MLP's GELU)."""
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


def mp_fourier(c: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Fourier features of a scalar per sample, c (N,) -> (N, 2F): sqrt(2) * [cos(2 pi f c), sin(2 pi f c)].

    Every row has RMS exactly 1 (cos^2 + sin^2 = 1 per pair): EDM2's MP Fourier features (eq. 75, fed with
    c_noise = ln(sigma) / 4), written with sin/cos pairs instead of random phases so the magnitude is exact.
    """
    arg = (2 * math.pi) * c.to(torch.float32)[:, None] * freqs[None].to(torch.float32)
    return torch.cat((torch.cos(arg), torch.sin(arg)), dim=-1) * math.sqrt(2)


# ------------------------------------------------------------------------------------------------
# Rotation of channel pairs and the modulation of a branch
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


def _pair_join(a: torch.Tensor, b: torch.Tensor, pairing: str) -> torch.Tensor:
    """The inverse of `_pair_views`: (..., D/2) twice -> (..., D)."""
    if pairing == "half":
        return torch.cat((a, b), dim=-1)
    return torch.stack((a, b), dim=-1).flatten(-2)


def rotate_pairs(x: torch.Tensor, theta: torch.Tensor, pairing: str = "half") -> torch.Tensor:
    """Rotate D/2 two-dimensional channel pairs of x (..., D) by angles theta (..., D/2) (broadcast).

    An orthogonal map: every token's norm is kept exactly (up to rounding).
    pairing="half": pairs (x_i, x_{i+D/2}) -- contiguous halves, no strided views (our default).
    pairing="interleaved": pairs (x_{2i}, x_{2i+1}) -- the MaP-DiT paper's eq. 6 indexing.
    The two are the same transform up to a fixed channel permutation.
    """
    a, b = _pair_views(x, pairing)
    cos, sin = torch.cos(theta), torch.sin(theta)
    return _pair_join(a * cos - b * sin, a * sin + b * cos, pairing)


def modulate(x: torch.Tensor, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
             angle: torch.Tensor | None = None, pairing: str = "half") -> torch.Tensor:
    """DiT's adaLN modulation x * (1 + scale) + shift, then MaP-DiT's rotation of channel pairs by `angle`.

    x (N, T, D); shift, scale (N, 1, D) and angle (N, 1, D/2) per sample; None: that modulator is absent.
    """
    if scale is not None and shift is not None:
        x = torch.addcmul(shift, x, 1 + scale)  # x * (1 + scale) + shift in one pass
    elif scale is not None:
        x = x * (1 + scale)
    elif shift is not None:
        x = x + shift
    return x if angle is None else rotate_pairs(x, angle, pairing)


# ------------------------------------------------------------------------------------------------
# Attention
# ------------------------------------------------------------------------------------------------
def cosine_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention with q and k normalised per head to norm sqrt(d_h) (EDM2 §2.1's cosine attention).

    q, k, v: (N, heads, T, d_h). With the usual 1/sqrt(d_h) scale the logits become sqrt(d_h)*cos(q, k),
    bounded in [-sqrt(d_h), sqrt(d_h)] whatever the input magnitude (a fixed temperature).
    """
    return F.scaled_dot_product_attention(normalize(q), normalize(k), v)


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
class MPLinear(nn.Module):
    """Bias-free weight-normalised linear layer: y = x @ W_eff.T with W_eff = g * normalize(W) / sqrt(fan_in).

    EDM2 eq. 47: every output row of W_eff has unit L2 norm (times g), so for i.i.d. input of magnitude s the
    output has magnitude g*s.

    normalize_on_use: normalise W in the forward (gradient tangent to the sphere). Off: W used raw
        (still scaled by 1/sqrt(fan_in)), which is what "forced WN without WN" means.
    forced: in training mode, project the stored W onto the sphere (rows of RMS 1) before it is used, once
        per change of W (i.e. once per optimizer step), so ||W|| cannot grow and the effective learning rate
        does not decay (EDM2 eq. 66, forced weight normalisation).
    gain: None (g = 1), or the initial value of a learned scalar gain (0.0 gives a zero output at init).
    input_scale: a constant folded into W_eff (e.g. 1/0.596 when the input is a plain SiLU whose MP
        division is done here, for free); the output is input_scale times the layer above.
    Init: W ~ N(0, 1).

    This is the plain layer; `fused.FusedMPLinear` computes the same with a cheaper backward and an eval cache.
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

    @property
    def scale(self) -> float:
        return self.input_scale / math.sqrt(self.in_features)

    def extra_repr(self) -> str:
        extra = f", input_scale={self.input_scale:g}" if self.input_scale != 1.0 else ""
        return (f"{self.in_features}, {self.out_features}, normalize_on_use={self.normalize_on_use}, "
                f"forced={self.forced}, gain={'learned' if self.gain is not None else 'none'}{extra}")

    @torch.no_grad()
    def project_(self) -> None:
        """Forced weight normalisation of this layer: W <- normalize(W), in place."""
        self.weight.copy_(normalize(self.weight))
        self._after_projection(None)

    def _after_projection(self, new_rms: torch.Tensor | None) -> None:
        """Record that W was just projected (its rows now have RMS `new_rms`, when the caller knows it)."""
        self._projected_version = self.weight._version

    def _project_if_stale(self) -> None:
        """Training with forced WN: project W unless it has not changed since the last projection. Under
        torch.compile the projection must come from outside (`fused.project_mp_weights_`, as the loop does)."""
        if self.training and self.forced and not _compiling() and self.weight._version != self._projected_version:
            self.project_()

    def effective_weight(self) -> torch.Tensor:
        """W_eff = g * input_scale * normalize(W) / sqrt(fan_in), differentiable (out, in)."""
        w = normalize(self.weight) if self.normalize_on_use else self.weight
        return w * (self.gain * self.scale) if self.gain is not None else w * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        self._project_if_stale()
        return F.linear(x, self.effective_weight().to(x.dtype))


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

    def _after_projection(self, new_rms: torch.Tensor | None) -> None:
        self._projected_version = self.weight._version

    def _project_if_stale(self) -> None:
        if self.training and self.forced and not _compiling() and self.weight._version != self._projected_version:
            self.project_()

    def forward(self, index: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, dim)
        self._project_if_stale()
        return normalize(self.weight[index])
