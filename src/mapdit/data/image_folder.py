"""Read a folder of images with one subfolder per class into memory.

root/<class name>/**/<image file>: the class index is the position of the subfolder name in
the sorted list of (non-hidden) subfolders, so it is stable across machines. Files are
visited in sorted order. Every file is tried with PIL; one that cannot be decoded (corrupt,
truncated, not an image at all) is skipped and recorded as (path, reason).

Per image: EXIF orientation applied, then converted to 8 bits:
  - transparency (RGBA, LA, palette with transparency) is composited over black, the same
    background value (-1 in model space) used for padding;
  - 16-bit / 32-bit integer and float grayscale are scaled down to 0..255;
  - everything else (palette, CMYK, YCbCr, 1-bit, ...) goes through PIL's own convert;
  - finally mode 'RGB' (3 channels) or 'L' (channels=1).
Then the largest centered square is cropped (an odd margin leaves the extra pixel at the
right/bottom) and resized to size x size with PIL bicubic, which antialiases when downscaling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from mapdit.errors import UserError


def class_folders(root: Path) -> list[Path]:
    """Non-hidden subfolders of root, sorted by name (their order defines the labels)."""
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _files(folder: Path) -> list[Path]:
    """All non-hidden files below folder, sorted by path (deterministic order)."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _to_8bit(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image to `mode` ('RGB' or 'L'), handling alpha and high bit depth."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) > 255:  # 16-bit data: 65535 -> 255
            arr = arr * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(mode)


def load_image(path: Path, size: int, mode: str) -> np.ndarray:
    """One file -> (size, size, C) uint8. Raises whatever PIL raises for a bad file."""
    with Image.open(path) as img:
        img.load()  # decode now so truncated files fail here, inside the caller's try
        img = ImageOps.exif_transpose(img)
        img = _to_8bit(img, mode)
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2  # odd margin: the extra pixel is cut at right/bottom
    # crop first, so pixels outside the square never leak in through the bicubic support
    img = img.crop((left, top, left + side, top + side))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def read_image_folder(
    root: Path, size: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[tuple[str, str]]]:
    """Images (N, C, size, size) uint8, labels (N,) int64, class names, skipped (path, reason)."""
    mode = {1: "L", 3: "RGB"}[channels]
    folders = class_folders(root)
    images: list[np.ndarray] = []
    labels: list[int] = []
    skipped: list[tuple[str, str]] = []
    empty: list[str] = []
    for label, folder in enumerate(folders):
        count = len(labels)
        for path in _files(folder):
            try:
                images.append(load_image(path, size, mode))
            except Exception as err:  # noqa: BLE001 - any decoder failure means "skip this file"
                skipped.append((str(path), f"{type(err).__name__}: {err}"))
                continue
            labels.append(label)
        if len(labels) == count:
            empty.append(folder.name)
    if not images:
        examples = "; ".join(f"{p} ({r})" for p, r in skipped[:3]) or "the class folders are empty"
        raise UserError(
            f"no readable image in {root} ({len(folders)} class folders, {len(skipped)} files "
            f"skipped: {examples}): put image files in {root}/<class name>/"
        )
    if empty:  # it would still be a class (a label the model learns nothing about): refuse
        raise UserError(
            f"class folder {root / empty[0]} has no readable image ({len(empty)} such folder(s): "
            f"{', '.join(empty[:5])}): every subfolder of {root} is a class; add images or remove it"
        )
    # (N, H, W, C) -> (N, C, H, W)
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return stacked, torch.tensor(labels, dtype=torch.int64), [f.name for f in folders], skipped
