"""Pixels and model space: uint8 images <-> floats in [-1, 1]."""
from __future__ import annotations

import torch


def uint8_to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [-1, 1], same shape: 0 -> -1, 255 -> 1."""
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8_images(x: torch.Tensor) -> torch.Tensor:
    """Model space float (N, C, H, W) -> uint8 (N, H, W, C) by clamp(floor(127.5 x + 128))."""
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, H, W), got shape {tuple(x.shape)}")
    u = (127.5 * x.to(torch.float32) + 128.0).clamp(0.0, 255.0).floor()
    return u.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
