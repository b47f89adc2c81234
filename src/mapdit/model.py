"""The DiT model with the eight magnitude-preserving options and composable modulation.

Config A (no options, modulation "adaln") is the original DiT of Peebles & Xie: same layers, biases,
initialisation and state-dict names (the patch embedding is a linear over patchified tokens instead of a
strided conv; `convert_dit_state_dict` maps the conv weight). Every option swaps a layer or a function
when the model is built (`DiT.__init__`), so forwards contain no option checks.

The blocks are written as the papers write them (DiT's `DiTBlock`, EDM2's `Block`): modulate the normalised
stream, run the branch, gate it, add it back with a plain or an MP sum (`DiTBlock.residual`). The fast paths
that earn their place (BENCHMARKS.md) sit behind the primitives the blocks call: `fused.modulate`,
`fused.FusedMPLinear`, `fused.normalize_qk`. One build-time choice keeps MP activations free: an MP SiLU/GELU
in front of an MP linear is the plain activation with its 1/RMS folded into that linear's weight scale
(`Layers.act_gain`), the same function.

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
from .fused import FusedMPLinear, modulate, normalize_qk, project_mp_weights_
from .nn import (
    GELU_RMS,
    SILU_RMS,
    MPActivation,
    MPEmbedding,
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
            return MPEmbedding(num, dim)
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


def _mp_sum_half(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """EDM2 eq. 88 for two equal partners: (a + b) / sqrt(2)."""
    return mp_sum(a, b, 0.5)


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


# ------------------------------------------------------------------------------------------------
# Modulation: a composition of {shift, scale, rotate, gate}, with per-sample parameters from c.
# ------------------------------------------------------------------------------------------------
class SiteModulation:
    """How one branch is conditioned, given its slice of the modulation linear's output.

    Parameters arrive as one tensor (N, 1, K) holding, in order, the enabled chunks of
    [shift (D), scale (D), rotate (D/2), gate (D)]; `unpack` names them. The branch input is
    `modulate(h, shift, scale, angle)` (`nn.modulate`'s formula; `fused.modulate` scales and rotates in one
    operator); its output is multiplied by the gate: g (zero init, AdaLN-Zero) or 1+g (identity init).
    """

    WIDTH = {"shift": 1.0, "scale": 1.0, "rotate": 0.5, "gate": 1.0}

    def __init__(self, parts: tuple[str, ...], dim: int, gate_init: str, pairing: str):
        self.widths = [int(dim * self.WIDTH[p]) for p in parts]
        self.width = sum(self.widths)
        self.slot = {p: i for i, p in enumerate(parts)}
        self.pairing = pairing
        self.gate_init = gate_init

    def unpack(self, params: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                                                    torch.Tensor | float]:
        """(shift, scale, angle, gate) of a site's parameters (N, 1, K): None where a modulator is absent,
        gate the factor on the branch output (g, 1+g, or 1.0 without a gate)."""
        m = params.split(self.widths, dim=-1)
        shift, scale, angle, gate = (m[self.slot[p]] if p in self.slot else None for p in MODULATION_PARTS)
        if gate is None:
            return shift, scale, angle, 1.0
        return shift, scale, angle, gate if self.gate_init == "zero" else 1 + gate


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
            self.table = MPEmbedding(num_train_steps, FREQ_DIM)
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
    """x <- x + gate * attn(modulate(norm(x))), then the same for the MLP (DiT's block). With `mp_residual`
    the sums are EDM2's MP sums, mp_sum(x, gate * branch, t) (eq. 88). x: (N, T, D), c: (N, D)."""

    def __init__(self, layers: Layers, dim: int, heads: int, mlp_ratio: float, site: SiteModulation):
        super().__init__()
        self.norm1 = layers.norm(dim)
        self.attn = Attention(layers, dim, heads)
        self.norm2 = layers.norm(dim)
        self.mlp = Mlp(layers, dim, int(dim * mlp_ratio))
        self.adaLN_modulation = layers.modulation(dim, site.widths * 2)  # (N, D) -> (N, 2K): attn, mlp sites
        self.site = site
        blend = layers.residual_blend
        self.a, self.b = (1.0, 1.0) if blend is None else mp_sum_coefficients(blend)

    def residual(self, x: torch.Tensor, gate: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
        """x + gate * y, or the MP sum mp_sum(x, gate * y, t) = a*x + b*gate*y: one multiply-add over the
        tokens (b joins the per-sample gate (N, 1, D); gate 1.0 without a gate)."""
        x = x if self.a == 1.0 else x * self.a
        if not isinstance(gate, torch.Tensor):
            return torch.add(x, y, alpha=self.b * gate)
        return torch.addcmul(x, y, gate if self.b == 1.0 else gate * self.b)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        pairing = self.site.pairing
        p_attn, p_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)  # 2 x (N, 1, K)
        shift, scale, angle, gate = self.site.unpack(p_attn)  # (N, 1, D), angle (N, 1, D/2); None if absent
        x = self.residual(x, gate, self.attn(modulate(self.norm1(x), shift, scale, angle, pairing)))
        shift, scale, angle, gate = self.site.unpack(p_mlp)
        return self.residual(x, gate, self.mlp(modulate(self.norm2(x), shift, scale, angle, pairing)))


class FinalLayer(nn.Module):
    """Norm, modulate (no gate), linear to p*p*out_channels (zero output at init)."""

    def __init__(self, layers: Layers, dim: int, patch: int, out_channels: int, site: SiteModulation):
        super().__init__()
        self.norm_final = layers.norm(dim)
        self.linear = layers.zero_linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = layers.modulation(dim, site.widths)
        self.site = site

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (N,T,D) -> (N,T,p*p*out)
        shift, scale, angle, _ = self.site.unpack(self.adaLN_modulation(c).unsqueeze(1))  # (N, 1, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale, angle, self.site.pairing))


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
