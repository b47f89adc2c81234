"""The DiT model with the eight magnitude-preserving options and composable modulation.

Config A (no options, modulation "adaln") is the original DiT of Peebles & Xie: same layers, biases,
initialisation and state-dict names (the patch embedding is a linear over patchified tokens instead of a
strided conv; `convert_dit_state_dict` maps the conv weight). Every option swaps a layer or a function
when the model is built (`DiT.__init__`), so forwards contain no option checks.

Magnitude preservation at (nearly) no cost in eager mode -- every rewrite below is exact algebra:
  * MP SiLU before an MP linear is a plain SiLU; the 1/0.596 is folded into the linear's weight scale;
  * a block residual (with or without the MP sum) and its gate are one multiply-add:
    x + (b*g) * branch; the MP sum's factor a on the stream is carried to the next site's modulation
    coefficients (tiny (N, 1, D) tensors) and applied once at the block's end;
  * scale and rotation of a site are one fused operator (`fused.scale_rotate_pairs`); with no LayerNorm the
    carried stream factor joins their coefficients too;
  * cosine attention normalises q and k of the fused qkv tensor in one operator (`fused.normalize_qk`).
A block still takes and returns the true residual stream, so forward hooks see what they always saw.
`DiTBlock.forward_reference` and `FinalLayer.forward_reference` are the same layers written with the plain
formulas of `mapdit.nn`; inside `fused.reference_math()` the model runs them (and every layer its plain
formula) instead, which is how tests and benchmarks get the reference.

Shapes: N batch, C channels, H=W input side, p patch, T=(H/p)^2 tokens, D width.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import MODULATION_PARTS, ModelConfig
from .diffusion import linear_betas
from .fused import (
    FusedMPEmbedding,
    FusedMPLinear,
    mul_add,
    normalize_qk,
    project_mp_weights_,
    reference_enabled,
    scale_rotate_pairs,
)
from .nn import (
    GELU_RMS,
    SILU_RMS,
    MPActivation,
    modulate,
    mp_fourier,
    mp_sincos_pos_embed_2d,
    mp_sum,
    mp_sum_coefficients,
    normalize,
    sincos_pos_embed_2d,
)

FREQ_DIM = 256  # width of the timestep features (DiT's frequency_embedding_size)


# ------------------------------------------------------------------------------------------------
# Layer factories: the options decide which layer is built, once.
# ------------------------------------------------------------------------------------------------
class Layers:
    """Picks the layer classes and functions for one ModelConfig."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.mp = cfg.uses_mp_linear

    def linear(self, d_in: int, d_out: int, after_act: bool = False, mlp: bool = False) -> nn.Module:
        """after_act: the input comes from `act(mlp)` (which may leave its MP division to this layer)."""
        if self.mp:
            return FusedMPLinear(d_in, d_out, self.cfg.weight_normalization, self.cfg.forced_weight_normalization,
                            input_scale=self.act_gain(mlp) if after_act else 1.0)
        return nn.Linear(d_in, d_out)

    def zero_linear(self, d_in: int, d_out: int, after_act: bool = False) -> nn.Module:
        """A linear whose output is exactly zero at init (AdaLN-Zero modulation, final layer)."""
        if self.mp:  # MP weights cannot be zero: a learned scalar gain starting at 0 instead
            return FusedMPLinear(d_in, d_out, self.cfg.weight_normalization, self.cfg.forced_weight_normalization,
                            gain=0.0, input_scale=self.act_gain() if after_act else 1.0)
        layer = nn.Linear(d_in, d_out)
        layer.zero_init = True  # read by DiT.initialize_weights
        return layer

    def modulation(self, d_in: int, widths: list[int]) -> nn.Module:
        """SiLU(c) -> the modulation parameters (N, sum(widths)), zero at init.

        MP models with `modulation_gains="per-modulator"`: one unit-row MP linear and a learned gain per chunk
        (modulator), so scales, shifts, angles and gates grow independently; otherwise one gain for all.
        """
        if self.mp and self.cfg.modulation_gains == "per-modulator":
            linear = FusedMPLinear(d_in, sum(widths), self.cfg.weight_normalization,
                              self.cfg.forced_weight_normalization, input_scale=self.act_gain())
            return nn.Sequential(self.act(), linear, ChunkGains(widths))
        return nn.Sequential(self.act(), self.zero_linear(d_in, sum(widths), after_act=True))

    def act_gain(self, mlp: bool = False) -> float:
        """MP activation feeding an MP linear: the activation is plain and the linear divides by its RMS."""
        if not (self.cfg.mp_silu and self.mp):
            return 1.0
        return 1.0 / (GELU_RMS if mlp and self.cfg.mlp_activation == "gelu" else SILU_RMS)

    def act(self, mlp: bool = False) -> nn.Module:
        """The activation in front of a `linear(..., after_act=True, mlp=mlp)`: DiT's tanh-GELU or SiLU in the
        MLP (`mlp_activation`), SiLU elsewhere; with `mp_silu`, divided by its RMS under N(0, 1) input."""
        gelu = mlp and self.cfg.mlp_activation == "gelu"
        if self.cfg.mp_silu and not self.mp:  # no MP linear after it to fold the division into
            return MPActivation(gelu)
        return nn.GELU(approximate="tanh") if gelu else nn.SiLU()

    def norm(self, dim: int) -> nn.Module:
        if self.cfg.no_layernorm:
            return nn.Identity()
        return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def embedding(self, num: int, dim: int) -> nn.Module:
        if self.cfg.mp_embedding:
            return FusedMPEmbedding(num, dim)
        table = nn.Embedding(num, dim)
        table.dit_std = 0.02
        return table

    @property
    def combine(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Sum of two equally important signals (tokens + positions, timestep + label)."""
        return _mp_sum_half if self.cfg.mp_residual else torch.add

    @property
    def residual_blend(self) -> float | None:
        """t of the block residuals' MP sum (EDM2 eq. 88), or None for DiT's plain sum."""
        return self.cfg.residual_blend if self.cfg.mp_residual else None

    @property
    def residual_coefficients(self) -> tuple[float, float]:
        """(a, b): a block residual is x <- a*x + b*branch (MP sum with blend t, or the plain sum)."""
        return (1.0, 1.0) if self.residual_blend is None else mp_sum_coefficients(self.residual_blend)


_HALF_MP = mp_sum_coefficients(0.5)[0]  # mp_sum(a, b, 0.5) = (a + b) * sqrt(1/2)


def _mp_sum_half(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mp_sum(a, b, 0.5) as one add and one in-place scale (no lerp, no division)."""
    return torch.add(a, b).mul_(_HALF_MP)


def _balanced_sum(t_emb: torch.Tensor, y_emb: torch.Tensor) -> torch.Tensor:
    """mp_sum(normalize(t), normalize(y), 0.5): timestep and label weigh the same and c has RMS 1 (EDM2's
    conditioning: unit-magnitude noise and class embeddings blended half and half). (N, D) -> (N, D)."""
    return _mp_sum_half(normalize(t_emb), normalize(y_emb))


class ChunkGains(nn.Module):
    """One learned gain per chunk of the last dim, zero at init: (N, K) -> (N, K) * gain[chunk of k]."""

    def __init__(self, widths: list[int]):
        super().__init__()
        self.gain = nn.Parameter(torch.zeros(len(widths)))
        chunk = torch.tensor([i for i, w in enumerate(widths) for _ in range(w)])  # sizes known: builds on meta too
        self.register_buffer("chunk", chunk, persistent=False)  # (K,) chunk index of every output

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return m * self.gain[self.chunk].to(m.dtype)


def gated_add(x: torch.Tensor, y: torch.Tensor, coef: torch.Tensor | None, b: float = 1.0,
              a: float = 1.0) -> torch.Tensor:
    """a * x + b * coef * y, fused (coef: a per-sample gate (N, 1, D), or None for no gate)."""
    if coef is None:
        x = x if a == 1.0 else x * a
        return torch.add(x, y, alpha=b) if b != 1.0 else x + y
    return mul_add(x, y, coef if b == 1.0 else coef * b, a)


# ------------------------------------------------------------------------------------------------
# Modulation: a composition of {shift, scale, rotate, gate}, with per-sample parameters from c.
# ------------------------------------------------------------------------------------------------
class SiteModulation:
    """How one branch is conditioned, given its slice of the modulation linear's output.

    Parameters arrive as one tensor (N, 1, K) holding, in order, the enabled chunks of
    [shift (D), scale (D), rotate (D/2), gate (D)]. Pre-branch order: scale, shift (one fused addcmul),
    then rotate (scale and rotate fused when there is no shift). The gate multiplies the branch output:
    g (zero init, AdaLN-Zero) or 1+g (identity init); blocks fold it into the residual (`gate_coef`).
    """

    WIDTH = {"shift": 1.0, "scale": 1.0, "rotate": 0.5, "gate": 1.0}

    def __init__(self, parts: tuple[str, ...], dim: int, gate_init: str, pairing: str):
        self.widths = [int(dim * self.WIDTH[p]) for p in parts]
        self.width = sum(self.widths)
        self.slot = {p: i for i, p in enumerate(parts)}
        self.pairing = pairing
        self.gate_init = gate_init
        self._shift, self._scale, self._rotate, self._gate = (self.slot.get(p) for p in MODULATION_PARTS)

    def pre(self, h: torch.Tensor, m: tuple[torch.Tensor, ...], s: float = 1.0) -> torch.Tensor:
        """The branch input for the stream s*h: h*(1+scale)*s + shift, then the rotation.

        s is a Python float carried from an MP residual; it joins the (N, 1, D) coefficients, never the
        token-sized tensor. Tokens see one operator: an addcmul, a multiply, or the fused scale-rotation.
        """
        shift, scale, rotate = self._shift, self._scale, self._rotate
        k: torch.Tensor | float = 1.0
        if scale is not None:
            k = 1 + m[scale] if s == 1.0 else (1 + m[scale]) * s
        elif s != 1.0:
            k = s
        if shift is not None:
            if isinstance(k, torch.Tensor):
                h = mul_add(m[shift], h, k)  # h*k + b
            else:
                h = torch.add(m[shift], h, alpha=k) if k != 1.0 else h + m[shift]
            k = 1.0
        if rotate is not None:
            return scale_rotate_pairs(h, m[rotate], k, self.pairing)
        return h * k if shift is None else h

    def gate_coef(self, m: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """The per-sample factor (N, 1, D) on the branch output, or None without a gate."""
        if self._gate is None:
            return None
        g = m[self._gate]
        return g if self.gate_init == "zero" else 1 + g

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return params.split(self.widths, dim=-1)

    def unpack(self, params: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                                                    torch.Tensor | float]:
        """(shift, scale, angle, gate) of a site's parameters (N, 1, K): None where a modulator is absent,
        gate the factor on the branch output (g, 1+g, or 1.0 without a gate). For the reference forwards."""
        m = self.split(params)
        shift, scale, angle = (None if i is None else m[i] for i in (self._shift, self._scale, self._rotate))
        gate = self.gate_coef(m)
        return shift, scale, angle, 1.0 if gate is None else gate


# ------------------------------------------------------------------------------------------------
# Embedders
# ------------------------------------------------------------------------------------------------
def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, p*p*C), token channels ordered (row-in-patch, column-in-patch, channel)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """(N, T, p*p*C) -> (N, C, H, W), the inverse of `patchify` for square inputs."""
    n, t, _ = x.shape
    g = int(math.isqrt(t))
    x = x.reshape(n, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, c, g * p, g * p)


class PatchEmbed(nn.Module):
    """Patches -> D-wide tokens. A bias-free MP linear gets a constant-1 input channel instead of a bias."""

    def __init__(self, layers: Layers, patch: int, channels: int, dim: int):
        super().__init__()
        self.patch = patch
        self.bias_channel = layers.mp
        self.proj = layers.linear(patch * patch * channels + int(self.bias_channel), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, T, D)
        tokens = patchify(x, self.patch)
        if self.bias_channel:
            tokens = F.pad(tokens, (0, 1), value=1.0)
        return self.proj(tokens)


def timestep_features(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal timestep features: (N,) -> (N, dim) as [cos(t*w_k), sin(t*w_k)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


class SinusoidFeatures(nn.Module):
    """DiT's features of the integer step; `scale` sqrt(2) gives them RMS 1 (the MP form)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        f = timestep_features(t)
        return f if self.scale == 1.0 else f * self.scale


class NoiseLevelFourier(nn.Module):
    """MP Fourier features of the noise level (EDM2's embedding, its c_noise = ln(sigma) / 4) for DiT's steps.

    Step t of DiT's linear-beta schedule has sigma_t = sqrt((1 - abar_t) / abar_t); its features are
    `mp_fourier(ln(sigma_t) / 4, f)` with fixed frequencies f ~ N(0, 0.5^2) (seeded, not learned, not stored).
    The band is half of EDM2's because DiT's first steps lie 0.35 apart in ln(sigma): with it, neighbouring
    steps keep cosine similarity >= 0.95 (median 0.9999; DiT's sinusoid: 0.97); every row has RMS exactly 1.
    Fractional t (some solvers) interpolates ln(sigma) linearly between the integer steps.
    """

    BANDWIDTH = 0.5

    def __init__(self, num_train_steps: int, dim: int = FREQ_DIM):
        super().__init__()
        abar = torch.cumprod(1 - torch.from_numpy(linear_betas(num_train_steps)), dim=0)
        c_noise = (0.5 * torch.log((1 - abar) / abar) / 4).float()  # ln(sigma_t) / 4, (T,)
        freqs = torch.randn(dim // 2, generator=torch.Generator().manual_seed(0), device="cpu") * self.BANDWIDTH
        here = torch.empty(0).device  # the default device (e.g. meta, for FLOP counting)
        self.register_buffer("c_noise", c_noise.to(here), persistent=False)
        self.register_buffer("freqs", freqs.to(here), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, dim)
        if t.is_floating_point():
            lo = t.floor().clamp(0, len(self.c_noise) - 1)
            hi = (lo + 1).clamp(max=len(self.c_noise) - 1)
            c = torch.lerp(self.c_noise[lo.long()], self.c_noise[hi.long()], (t - lo).float())
        else:
            c = self.c_noise[t]
        return mp_fourier(c, self.freqs)


class TimestepEmbedder(nn.Module):
    """Integer diffusion step (N,) -> (N, D): 256 features (`time_embedding`) + MLP."""

    def __init__(self, layers: Layers, dim: int, num_train_steps: int):
        super().__init__()
        kind = layers.cfg.time_embedding_kind
        if kind == "table":  # upstream MaP-DiT: a learned row of magnitude 1 per integer step
            self.table = FusedMPEmbedding(num_train_steps, FREQ_DIM)
        elif kind == "fourier":
            self.table = NoiseLevelFourier(num_train_steps)
        else:
            self.table = SinusoidFeatures(math.sqrt(2) if kind == "mp-sinusoid" else 1.0)
        self.mlp = nn.Sequential(layers.linear(FREQ_DIM, dim), layers.act(), layers.linear(dim, dim, after_act=True))
        for layer in (self.mlp[0], self.mlp[2]):
            layer.dit_std = 0.02

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.table(t))


class LabelEmbedder(nn.Module):
    """Class label (N,) -> (N, D). Row `num_classes` (when present) is the null class used for CFG.

    Label dropout for classifier-free guidance is done by the training loop (labels -> null class).
    """

    def __init__(self, layers: Layers, num_classes: int, dim: int, with_null: bool):
        super().__init__()
        self.embedding_table = layers.embedding(num_classes + int(with_null), dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


# ------------------------------------------------------------------------------------------------
# Transformer block
# ------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention; cosine attention normalises q and k
    per head first (logits sqrt(d_h) * cos(q, k); `nn.cosine_attention` is the same on separate q, k, v)."""

    def __init__(self, layers: Layers, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = layers.linear(dim, 3 * dim)
        self.proj = layers.linear(dim, dim)
        self.cosine = layers.cfg.cosine_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, D) -> (N, T, D)
        n, t, d = x.shape
        qkv = self.qkv(x)  # (N, T, 3D)
        if self.cosine:
            qkv = normalize_qk(qkv, self.heads)
        q, k, v = qkv.reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (N, h, T, dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, h, T, dh)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, layers: Layers, dim: int, hidden: int):
        super().__init__()
        self.fc1 = layers.linear(dim, hidden)
        self.act = layers.act(mlp=True)
        self.fc2 = layers.linear(hidden, dim, after_act=True, mlp=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """x <- residual(x, gate * attn(modulate(norm(x)))); the same for the MLP. x: (N, T, D), c: (N, D).

    residual(x, y) = a*x + b*y: DiT's plain sum (a = b = 1) or the MP sum with blend t (EDM2 eq. 88), as
    `forward_reference` writes it. `forward` computes the same with fewer operators: x1 = a * x1s with
    x1s = x + (b/a) * gate * y1 (one addcmul); the MLP site reads the stream through its coefficients
    (s = a) when there is no LayerNorm; the block returns a*a*x1s + b * gate * y2 (a multiply and an
    addcmul), the true residual stream.
    """

    def __init__(self, layers: Layers, dim: int, heads: int, mlp_ratio: float, site: SiteModulation):
        super().__init__()
        self.norm1 = layers.norm(dim)
        self.attn = Attention(layers, dim, heads)
        self.norm2 = layers.norm(dim)
        self.mlp = Mlp(layers, dim, int(dim * mlp_ratio))
        self.adaLN_modulation = layers.modulation(dim, site.widths * 2)  # (N, D) -> (N, 2K): attn, mlp sites
        self.site = site
        self.blend = layers.residual_blend
        self.a, self.b = layers.residual_coefficients
        self.fold_stream_scale = isinstance(self.norm2, nn.Identity)

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y if self.blend is None else mp_sum(x, y, self.blend)

    def forward_reference(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The block as DiT and MaP-DiT write it, in the plain formulas of `mapdit.nn` (reference for `forward`).

        The MP activation in front of an MP linear (MLP, modulation) is the plain activation with its 1/RMS
        in that linear's `input_scale` (`Layers.act_gain`): the same function, built that way once.
        """
        pairing = self.site.pairing
        p_attn, p_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)  # 2 x (N, 1, K)
        shift, scale, angle, gate = self.site.unpack(p_attn)  # (N, 1, D), angle (N, 1, D/2); None if absent
        x = self.residual(x, gate * self.attn(modulate(self.norm1(x), shift, scale, angle, pairing)))  # (N, T, D)
        shift, scale, angle, gate = self.site.unpack(p_mlp)
        return self.residual(x, gate * self.mlp(modulate(self.norm2(x), shift, scale, angle, pairing)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if reference_enabled("block"):
            return self.forward_reference(x, c)
        site, a, b = self.site, self.a, self.b
        m_attn, m_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)  # 2 x (N, 1, K)
        m_attn, m_mlp = site.split(m_attn), site.split(m_mlp)
        x1s = gated_add(x, self.attn(site.pre(self.norm1(x), m_attn)), site.gate_coef(m_attn), b / a)  # x1 = a*x1s
        if self.fold_stream_scale:
            h = site.pre(x1s, m_mlp, a)
        else:
            h = site.pre(self.norm2(x1s if a == 1.0 else x1s * a), m_mlp)
        return gated_add(x1s, self.mlp(h), site.gate_coef(m_mlp), b, a * a)


class FinalLayer(nn.Module):
    """Norm, modulate (no gate), linear to p*p*out_channels (zero output at init)."""

    def __init__(self, layers: Layers, dim: int, patch: int, out_channels: int, site: SiteModulation):
        super().__init__()
        self.norm_final = layers.norm(dim)
        self.linear = layers.zero_linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = layers.modulation(dim, site.widths)
        self.site = site

    def forward_reference(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (N,T,D) -> (N,T,p*p*out)
        shift, scale, angle, _ = self.site.unpack(self.adaLN_modulation(c).unsqueeze(1))  # (N, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale, angle, self.site.pairing))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (N,T,D) -> (N,T,p*p*out)
        if reference_enabled("block"):
            return self.forward_reference(x, c)
        m = self.site.split(self.adaLN_modulation(c).unsqueeze(1))
        return self.linear(self.site.pre(self.norm_final(x), m))


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------
class DiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        layers = Layers(cfg)
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch, self.out_channels = p, cfg.out_channels
        grid = cfg.input_size // p

        self.x_embedder = PatchEmbed(layers, p, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(layers, d, cfg.num_train_steps)
        self.y_embedder = LabelEmbedder(layers, cfg.num_classes, d, with_null=cfg.null_class is not None)
        pos = (mp_sincos_pos_embed_2d if cfg.mp_pos_enc else sincos_pos_embed_2d)(d, grid, grid)
        # A frozen parameter, as in DiT (so DiT checkpoints and parameter counts match).
        self.pos_embed = nn.Parameter(pos.float().unsqueeze(0), requires_grad=False)  # (1, T, D)
        self.combine = layers.combine
        self.condition = _balanced_sum if cfg.conditioning_kind == "balanced" else layers.combine

        parts = cfg.modulation_parts
        block_site = SiteModulation(parts, d, cfg.gate_init, cfg.rotation_pairing)
        final_site = SiteModulation(tuple(x for x in parts if x != "gate"), d, cfg.gate_init, cfg.rotation_pairing)
        self.blocks = nn.ModuleList(
            DiTBlock(layers, d, cfg.num_heads, cfg.mlp_ratio, block_site) for _ in range(cfg.depth)
        )
        self.final_layer = FinalLayer(layers, d, p, cfg.out_channels, final_site)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's init for plain layers; MP layers keep their own N(0, 1) init (as EDM2's MPConv)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                if getattr(m, "zero_init", False):
                    nn.init.zeros_(m.weight)
                elif hasattr(m, "dit_std"):
                    nn.init.normal_(m.weight, std=m.dit_std)
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=m.dit_std)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (N, C, H, W), t (N,) integer diffusion steps, y (N,) labels -> (N, out_channels, H, W)."""
        h = self.combine(self.x_embedder(x), self.pos_embed.to(x.dtype))  # (N, T, D)
        c = self.condition(self.t_embedder(t), self.y_embedder(y))  # (N, D)
        for block in self.blocks:
            h = block(h, c)  # (N, T, D)
        h = self.final_layer(h, c)  # (N, T, p*p*out)
        return unpatchify(h, self.patch, self.out_channels)

    def project_weights_(self) -> int:
        """Forced weight normalisation of all MP weights in one batched pass (call before a training step)."""
        return project_mp_weights_(self)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------
# Parameter accounting
# ------------------------------------------------------------------------------------------------
def parameter_breakdown(model: DiT) -> dict[str, int]:
    """Parameters per part; `total` counts the frozen positional table, as DiT's own logger does."""
    parts = {"embedders": 0, "blocks": 0, "modulation": 0, "final_layer": 0}
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name:
            parts["modulation"] += p.numel()
        elif name.startswith("blocks."):
            parts["blocks"] += p.numel()
        elif name.startswith("final_layer."):
            parts["final_layer"] += p.numel()
        else:
            parts["embedders"] += p.numel()
    parts["total"] = sum(p.numel() for p in model.parameters())
    parts["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return parts


def forward_flops(model: DiT, batch: int = 1) -> int:
    """FLOPs of one forward pass (2 per multiply-add), counted by torch.utils.flop_counter on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.config
    with torch.device("meta"):
        meta_model = DiT(cfg).eval()
        x = torch.zeros(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        t = torch.zeros(batch, dtype=torch.long)
        y = torch.zeros(batch, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            meta_model(x, t, y)
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------------
# Original DiT checkpoints -> Config A
# ------------------------------------------------------------------------------------------------
def convert_dit_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a facebookresearch/DiT state dict onto ours: only the conv patch embedding differs.

    DiT's x_embedder.proj.weight is a conv kernel (D, C, p, p); ours is a linear over patchified tokens
    ordered (row, column, channel), i.e. (D, p*p*C).
    """
    out = dict(state)
    w = out["x_embedder.proj.weight"]
    if w.dim() == 4:
        out["x_embedder.proj.weight"] = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()
    return out


def load_dit_checkpoint(path: str, which: str = "ema") -> dict[str, torch.Tensor]:
    """Read an original DiT .pt file without running code: weights_only unpickling, with argparse.Namespace
    (which DiT's train.py pickles beside the tensors) allowed as plain data. Returns our state dict."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and which in obj and isinstance(obj[which], dict):
        obj = obj[which]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    return convert_dit_state_dict(obj)
