"""Read Fashion-MNIST (or any MNIST-style folder) from its IDX files.

IDX layout: 2 zero bytes, a dtype code (0x08 = uint8), the number of dims, then one
big-endian uint32 per dim, then the raw data. Images are idx3 (N, H, W), labels idx1 (N,).
Files may be gzipped (detected by the gzip magic bytes, not the name) or plain.

This module only reads raw tensors; `mapdit.data.load_dataset` applies the resolution rule.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from mapdit.errors import UserError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "MAPDIT_FASHION_MNIST"
ALIASES = ("fashion-mnist", "fmnist", "fashion_mnist")
INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (as root) "
    "or point --data-path at a folder with the four IDX files"
)

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

# split name -> file prefix used by the original distribution
SPLIT_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}
_STEMS = ("images-idx3-ubyte", "labels-idx1-ubyte")


def is_alias(path: str) -> bool:
    """True for the names that mean "the installed Fashion-MNIST"."""
    return str(path).strip().lower() in ALIASES


def default_dir() -> Path:
    """The installed copy, unless MAPDIT_FASHION_MNIST points elsewhere."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def has_idx_files(folder: Path) -> bool:
    """True if `folder` holds at least one of the four standard IDX files."""
    return any(
        _find(folder, f"{prefix}-{stem}") is not None
        for prefix in ("train", "t10k")
        for stem in _STEMS
    )


def _split_prefix(split: str) -> str:
    if split not in SPLIT_PREFIX:
        raise UserError(f"unknown split {split!r}: use 'train' or 'test'")
    return SPLIT_PREFIX[split]


def split_files(folder: Path, split: str) -> tuple[Path, Path]:
    """(images file, labels file) of `split` in `folder`; UserError naming a missing one."""
    prefix = _split_prefix(split)
    found = []
    for stem in _STEMS:
        path = _find(folder, f"{prefix}-{stem}")
        if path is None:
            raise UserError(
                f"{folder / (prefix + '-' + stem)}[.gz] is missing: the folder needs "
                f"the four IDX files (train/t10k images and labels)"
            )
        found.append(path)
    return found[0], found[1]


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one uint8 IDX file with `ndim` dims -> numpy array of that shape."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, zlib.error) as err:
            raise UserError(f"{path} is truncated or corrupt (gzip: {err}): re-download it") from err
    header = 4 + 4 * ndim
    if len(data) < header or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        raise UserError(
            f"{path} is not a uint8 IDX file with {ndim} dims (bad magic number "
            f"{data[:4].hex() or 'none'}, expected 000008{ndim:02x}): replace the file"
        )
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise UserError(
            f"{path} has the wrong size ({len(data)} bytes, header says {expected} "
            f"for shape {tuple(dims)}): the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_split(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 of one split."""
    images_path, labels_path = split_files(folder, split)
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(labels) != len(images):
        raise UserError(
            f"{labels_path} has {len(labels)} labels but {images_path} has {len(images)} "
            f"images: the files do not belong together"
        )
    bad = np.flatnonzero(labels >= len(CLASS_NAMES))
    if len(bad):  # a damaged label file (or another data set): never a new class
        raise UserError(
            f"{labels_path}: label {int(labels[bad[0]])} at index {int(bad[0])} is outside the "
            f"{len(CLASS_NAMES)} classes 0..{len(CLASS_NAMES) - 1} ({len(bad)} such label(s)): "
            f"the label file is damaged, replace it"
        )
    # copy: frombuffer arrays are read-only and torch wants writable memory
    images_t = torch.from_numpy(images.copy()).unsqueeze(1)
    labels_t = torch.from_numpy(labels.astype(np.int64))
    return images_t, labels_t
