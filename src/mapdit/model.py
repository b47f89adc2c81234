"""The DiT model with the eight magnitude-preserving options and composable modulation.

Config A (no options, modulation "adaln") is the original DiT of Peebles & Xie: same layers, biases,
initialisation and state-dict names (the patch embedding is a linear over patchified tokens instead of a
strided conv; `convert_dit_state_dict` maps the conv weight). Every option swaps a layer or a function
when the model is built (`DiT.__init__`), so forwards contain no option checks.

Shapes: N batch, C channels, H=W input side, p patch, T=(H/p)^2 tokens, D width.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .nn import (MPEmbedding, MPLinear, MPSiLU, cosine_attention, mp_sincos_pos_embed_2d, mp_sum,
                 project_mp_weights_, rotate_pairs, sincos_pos_embed_2d, softmax_attention)

FREQ_DIM = 256  # width of the timestep features (DiT's frequency_embedding_size)


# ------------------------------------------------------------------------------------------------
# Layer factories: the options decide which layer is built, once.
# ------------------------------------------------------------------------------------------------
class Layers:
    """Picks the layer classes and functions for one ModelConfig."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.mp = cfg.uses_mp_linear

    def linear(self, d_in: int, d_out: int) -> nn.Module:
        if self.mp:
            return MPLinear(d_in, d_out, self.cfg.weight_normalization, self.cfg.forced_weight_normalization)
        return nn.Linear(d_in, d_out)

    def zero_linear(self, d_in: int, d_out: int) -> nn.Module:
        """A linear whose output is exactly zero at init (AdaLN-Zero modulation, final layer)."""
        if self.mp:  # MP weights cannot be zero: a learned scalar gain starting at 0 instead
            return MPLinear(d_in, d_out, self.cfg.weight_normalization, self.cfg.forced_weight_normalization,
                            gain=0.0)
        layer = nn.Linear(d_in, d_out)
        layer.zero_init = True  # read by DiT.initialize_weights
        return layer

    def act(self, mlp: bool = False) -> nn.Module:
        if self.cfg.mp_silu:
            return MPSiLU()
        return nn.GELU(approximate="tanh") if mlp else nn.SiLU()  # DiT: GELU in the MLP, SiLU elsewhere

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
    def attention_fn(self) -> Callable:
        return cosine_attention if self.cfg.cosine_attention else softmax_attention

    @property
    def combine(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Sum of two equally important signals (tokens + positions, timestep + label)."""
        return (lambda a, b: mp_sum(a, b, 0.5)) if self.cfg.mp_residual else torch.add

    @property
    def residual(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        t = self.cfg.residual_blend
        return (lambda x, branch: mp_sum(x, branch, t)) if self.cfg.mp_residual else torch.add


# ------------------------------------------------------------------------------------------------
# Modulation: a composition of {shift, scale, rotate, gate}, with per-sample parameters from c.
# ------------------------------------------------------------------------------------------------
class SiteModulation:
    """How one branch is conditioned, given its slice of the modulation linear's output.

    Parameters arrive as one tensor (N, 1, K) holding, in order, the enabled chunks of
    [shift (D), scale (D), rotate (D/2), gate (D)]. Pre-branch order: scale, shift (one fused addcmul),
    then rotate. The gate multiplies the branch output: g (zero init, AdaLN-Zero) or 1+g (identity init).
    """

    WIDTH = {"shift": 1.0, "scale": 1.0, "rotate": 0.5, "gate": 1.0}

    def __init__(self, parts: tuple[str, ...], dim: int, gate_init: str, pairing: str):
        self.widths = [int(dim * self.WIDTH[p]) for p in parts]
        self.width = sum(self.widths)
        self.slot = {p: i for i, p in enumerate(parts)}
        self.pairing = pairing
        self.pre = self._build_pre(parts)
        self.gate = self._build_gate(parts, gate_init)

    def _build_pre(self, parts) -> Callable:
        shift, scale, rotate = (self.slot.get(p) for p in ("shift", "scale", "rotate"))
        pairing = self.pairing

        def affine(h, m):
            if scale is not None and shift is not None:
                return torch.addcmul(m[shift], h, 1 + m[scale])  # h*(1+s) + b
            if scale is not None:
                return h * (1 + m[scale])
            return h + m[shift]

        if rotate is None:
            return affine
        if scale is None and shift is None:
            return lambda h, m: rotate_pairs(h, m[rotate], pairing)
        return lambda h, m: rotate_pairs(affine(h, m), m[rotate], pairing)

    def _build_gate(self, parts, gate_init) -> Callable:
        if "gate" not in parts:
            return lambda y, m: y
        g = self.slot["gate"]
        if gate_init == "zero":
            return lambda y, m: y * m[g]
        return lambda y, m: y * (1 + m[g])

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return params.split(self.widths, dim=-1)


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
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_features(t)


class TimestepEmbedder(nn.Module):
    """Integer diffusion step (N,) -> (N, D): features (sinusoid, or an MP table indexed by the step) + MLP."""

    def __init__(self, layers: Layers, dim: int, num_train_steps: int):
        super().__init__()
        if layers.cfg.mp_embedding:
            self.table = MPEmbedding(num_train_steps, FREQ_DIM)  # learned, rows of magnitude 1
        else:
            self.table = SinusoidFeatures()
        self.mlp = nn.Sequential(layers.linear(FREQ_DIM, dim), layers.act(), layers.linear(dim, dim))
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
    def __init__(self, layers: Layers, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = layers.linear(dim, 3 * dim)
        self.proj = layers.linear(dim, dim)
        self.attend = layers.attention_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, D) -> (N, T, D)
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3x(N,h,T,dh)
        out = self.attend(q, k, v)  # (N, h, T, dh)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    def __init__(self, layers: Layers, dim: int, hidden: int):
        super().__init__()
        self.fc1 = layers.linear(dim, hidden)
        self.act = layers.act(mlp=True)
        self.fc2 = layers.linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """x <- residual(x, gate(attn(modulate(norm(x))))); the same for the MLP. x: (N, T, D), c: (N, D)."""

    def __init__(self, layers: Layers, dim: int, heads: int, mlp_ratio: float, site: SiteModulation):
        super().__init__()
        self.norm1 = layers.norm(dim)
        self.attn = Attention(layers, dim, heads)
        self.norm2 = layers.norm(dim)
        self.mlp = Mlp(layers, dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(layers.act(), layers.zero_linear(dim, 2 * site.width))
        self.site = site
        self.residual = layers.residual

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        site = self.site
        m_attn, m_mlp = self.adaLN_modulation(c).unsqueeze(1).chunk(2, dim=-1)  # 2 x (N, 1, K)
        m_attn, m_mlp = site.split(m_attn), site.split(m_mlp)
        x = self.residual(x, site.gate(self.attn(site.pre(self.norm1(x), m_attn)), m_attn))
        x = self.residual(x, site.gate(self.mlp(site.pre(self.norm2(x), m_mlp)), m_mlp))
        return x


class FinalLayer(nn.Module):
    """Norm, modulate (no gate), linear to p*p*out_channels (zero output at init)."""

    def __init__(self, layers: Layers, dim: int, patch: int, out_channels: int, site: SiteModulation):
        super().__init__()
        self.norm_final = layers.norm(dim)
        self.linear = layers.zero_linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(layers.act(), layers.zero_linear(dim, site.width))
        self.site = site

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # (N,T,D) -> (N,T,p*p*out)
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
        """DiT's init for plain layers; MP layers keep their own N(0, 1) init (spec §1)."""
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
        c = self.combine(self.t_embedder(t), self.y_embedder(y))  # (N, D)
        for block in self.blocks:
            h = block(h, c)  # (N, T, D)
        h = self.final_layer(h, c)  # (N, T, p*p*out)
        return unpatchify(h, self.patch, self.out_channels)

    def project_weights_(self) -> int:
        """Forced weight normalisation of all MP weights in one batched pass (call before a training step)."""
        return project_mp_weights_(self)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]


def build_model(cfg: ModelConfig) -> DiT:
    return DiT(cfg)


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
