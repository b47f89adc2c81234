"""In-memory image datasets with one interface: Fashion-MNIST (the default) and image folders.

Pixels are kept as uint8 (N, C, H, W) at the model resolution; `batch()` maps them to model
space [-1, 1] as x = u / 127.5 - 1, and `to_uint8_images` maps back with the DiT rule
u = clamp(floor(127.5 x + 128), 0, 255), i.e. 127.5 x + 127.5 rounded half up (so the round
trip uint8 -> model -> uint8 is exact; plain truncation of 127.5 x + 127.5 would not be).

Resolution rule (the model needs H == W divisible by patch_size):
  - image_size given: resize to image_size x image_size instead of padding, and image_size
    must be divisible by patch_size (else UserError). Fashion-MNIST is resized with torch
    bicubic + antialias; image folders with PIL bicubic (after a center crop to a square).
  - image_size not given: keep the native size (28 for Fashion-MNIST, 32 for image folders,
    which are center-cropped and resized to 32); if it is not divisible by patch_size, pad
    symmetrically with the background value -1 (uint8 0) up to the next multiple, the odd
    pixel (if any) going to the bottom/right: 28 -> 32 for patch 8, 28 stays 28 for 2 and 4.
Channels: Fashion-MNIST is 1 channel (channels=3 repeats it); image folders are RGB unless
channels=1 (PIL 'L'). See image_folder.py for the mode-conversion rules.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from mapdit.data import fashion_mnist, image_folder
from mapdit.data.batches import IndexStream
from mapdit.data.latents import latent_decoder, load_latents
from mapdit.data.pixels import to_uint8_images, uint8_to_model
from mapdit.errors import UserError

__all__ = ["ImageDataset", "IndexStream", "load_dataset", "to_uint8_images", "uint8_to_model"]

DEFAULT_FOLDER_SIZE = 32  # image folders have no native size: this is used when none is given


class ImageDataset:
    """Pixel data in memory: images (N, C, H, W) uint8 at model resolution, labels (N,) int64."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        class_names: list[str],
        kind: str,
        path: str,
        split: str = "train",
        info: dict | None = None,
        skipped: list[tuple[str, str]] | None = None,
        hflip: bool = False,
    ):
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be square, got {tuple(images.shape[2:])}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.kind = kind
        self.path = path
        self.split = split
        self.info = dict(info or {})  # how the images were brought to this resolution
        self.skipped = list(skipped or [])
        self.hflip = hflip  # random horizontal flips in batch(), only when given a generator

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def resolution(self) -> int:
        return self.images.shape[2]

    def batch(self, index: torch.Tensor, generator: torch.Generator | None = None):
        """x float32 (B, C, H, W) in [-1, 1] and y int64 (B,) for the given indices.

        With hflip enabled and a generator, each image is flipped left-right with p = 1/2
        (deterministic given the generator state); otherwise the generator is unused.
        """
        index = index.to(device=self.images.device, dtype=torch.int64)
        x = uint8_to_model(self.images[index])
        if self.hflip and generator is not None:
            flip = torch.rand(len(index), generator=generator, device=generator.device) < 0.5
            x[flip.to(x.device)] = x[flip.to(x.device)].flip(-1)
        return x, self.labels[index]

    def meta(self) -> dict:
        """JSON-serialisable description, stored with checkpoints and samples."""
        return {
            "kind": self.kind,
            "path": self.path,
            "split": self.split,
            "num_images": len(self),
            "channels": self.channels,
            "resolution": self.resolution,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            **self.info,
            "hflip": self.hflip,
            "skipped": len(self.skipped),
        }

    def __repr__(self) -> str:
        return (f"ImageDataset({self.kind}, {self.path!r}, split={self.split}, n={len(self)}, "
                f"C={self.channels}, res={self.resolution}, classes={self.num_classes})")


def pad_to_multiple(images: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, list[int]]:
    """Pad uint8 (N, C, H, W) with 0 (= -1 in model space) up to multiples of patch_size.

    Returns the padded images and [top, bottom, left, right]; the extra odd pixel goes last.
    """
    n, c, h, w = images.shape
    th, tw = -(-h // patch_size) * patch_size, -(-w // patch_size) * patch_size
    top, left = (th - h) // 2, (tw - w) // 2
    if (th, tw) == (h, w):
        return images, [0, 0, 0, 0]
    out = images.new_zeros(n, c, th, tw)
    out[:, :, top: top + h, left: left + w] = images
    return out, [top, th - h - top, left, tw - w - left]


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bicubic + antialias resize of uint8 (N, C, H, W) to (N, C, size, size), in chunks."""
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i: i + chunk].to(torch.float32)
        y = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[i: i + chunk] = y.round().clamp(0, 255).to(torch.uint8)
    return out


def _check_args(image_size: int | None, patch_size: int, channels: int | None) -> None:
    if patch_size < 1:
        raise UserError(f"patch size must be >= 1, got {patch_size}")
    if image_size is not None:
        if image_size < 1:
            raise UserError(f"--image-size must be positive, got {image_size}")
        if image_size % patch_size:
            raise UserError(
                f"--image-size {image_size} is not divisible by the patch size {patch_size}: "
                f"use a multiple of {patch_size} (or leave it out to pad the native size)"
            )
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")


def _load_idx(folder: Path, shown_path: str, split: str, image_size, patch_size, channels, hflip):
    images, labels = fashion_mnist.read_split(folder, split)
    h, w = images.shape[2:]
    info = {"resolved_path": str(folder), "original_size": [h, w],
            "image_size": image_size, "patch_size": patch_size}
    if image_size is not None:
        if (h, w) != (image_size, image_size):
            images = resize_uint8(images, image_size)
        info.update(rule="resize", pad=[0, 0, 0, 0], interpolation="bicubic-antialias (torch)")
    elif h != w:
        raise UserError(f"{folder} holds {h}x{w} images, not square: pass --image-size to resize them")
    else:
        images, pad = pad_to_multiple(images, patch_size)
        info.update(rule="pad" if any(pad) else "none", pad=pad, pad_value=-1.0)
    if channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    names = list(fashion_mnist.CLASS_NAMES)  # read_split refused labels outside these 10 classes
    return ImageDataset(images, labels, names, "fashion-mnist", shown_path, split, info, hflip=hflip)


def _load_folder(root: Path, split: str, image_size, patch_size, channels, hflip):
    size = image_size or DEFAULT_FOLDER_SIZE
    images, labels, names, skipped = image_folder.read_image_folder(root, size, channels or 3)
    info = {"original_size": None, "image_size": image_size, "patch_size": patch_size,
            "interpolation": "center-crop + bicubic (PIL)"}
    images, pad = pad_to_multiple(images, patch_size)  # only ever pads the default size
    info.update(rule="center-crop+resize" + ("+pad" if any(pad) else ""), pad=pad, pad_value=-1.0)
    return ImageDataset(images, labels, names, "image-folder", str(root), split, info, skipped, hflip)


def load_dataset(
    path: str,
    split: str = "train",
    image_size: int | None = None,
    patch_size: int = 1,
    channels: int | None = None,
    *,
    hflip: bool = False,
) -> ImageDataset:
    """Load "fashion-mnist"/"fmnist", a folder of IDX files, or a class-per-subfolder folder.

    `split` selects train/test for IDX data; image folders have no splits (it is only recorded).
    A folder holding latents.json (made by `mapdit prepare`) loads as a LatentDataset (latents.py).
    """
    path = str(path)
    if not fashion_mnist.is_alias(path):
        candidate = Path(path).expanduser()
        if (candidate / "latents.json").is_file() or (candidate.name == "latents.json" and candidate.is_file()):
            return load_latents(candidate, split, image_size, patch_size, channels, hflip=hflip)
    _check_args(image_size, patch_size, channels)
    if fashion_mnist.is_alias(path):
        folder = fashion_mnist.default_dir()
        if not folder.is_dir() or not fashion_mnist.has_idx_files(folder):
            env = f" (from ${fashion_mnist.ENV_VAR})" if os.environ.get(fashion_mnist.ENV_VAR) else ""
            raise UserError(f"Fashion-MNIST not found at {folder}{env}: {fashion_mnist.INSTALL_HINT}")
        return _load_idx(folder, path, split, image_size, patch_size, channels, hflip)

    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(
            f"data path {root} does not exist: pass 'fashion-mnist' or a folder with the IDX "
            f"files or with one subfolder of images per class"
        )
    if not root.is_dir():
        raise UserError(f"data path {root} is a file: pass a folder (IDX files or one subfolder per class)")
    if fashion_mnist.has_idx_files(root):
        return _load_idx(root, str(root), split, image_size, patch_size, channels, hflip)
    if image_folder.class_folders(root):
        return _load_folder(root, split, image_size, patch_size, channels, hflip)
    raise UserError(
        f"data path {root} holds no class subfolders and no IDX files: put images in "
        f"{root}/<class name>/ or the four Fashion-MNIST IDX files in {root}"
    )


def clip_denoised_for(data_meta: dict) -> bool:
    """Whether samplers should clip their x0 estimate to [-1, 1]: yes for pixel data, which lives there
    (as ADM samples pixel models), no for VAE latents, which are unbounded (as DiT samples them)."""
    return data_meta.get("kind") != "latents"


def decoder_for(data_meta: dict, device: str | torch.device = "cpu"):
    """A function mapping model-space samples (N, C, H, W) to uint8 images (N, H, W, C) for this data.

    Pixel datasets need no decoder beyond `to_uint8_images`; latent datasets are decoded by their VAE.
    """
    if data_meta.get("kind") == "latents":
        return latent_decoder(data_meta, device)
    return to_uint8_images
