"""Fréchet distances between sample sets in a feature space: FID (Inception-v3 pool features) and
FD_fmnist (the penultimate features of our Fashion-MNIST classifier), with cached reference statistics.

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

Pieces:
  FeatureStats       streaming float64 count / mean / centred sum of outer products (Chan et al.
                     pairwise merge), merge across processes, save/load (safetensors, atomic)
  frechet_distance   float64, symmetric eigenvalue route (never complex, never NaN)
  FeatureExtractor   uint8 images (N, H, W, C) -> float features (N, F); `name`, `dim`:
                       "fmnist"     FmnistFeatures: our classifier's 128-d penultimate features
                       "inception"  InceptionFeatures: torch-fidelity's FeatureExtractorInceptionV3,
                                    2048-d pool features (optional dependency, imported lazily)
                       any module   ModuleFeatures(module, name): float images in [-1, 1] -> features
  compute_stats      streams images (a tensor/array or an iterable of batches) through an extractor
  reference_stats    statistics of a reference set (Fashion-MNIST, image folder, prepared latent
                     folder, ADM reference .npz), computed once per (reference, extractor, count)
                     and cached as safetensors
  evaluate_samples   FD of samples against a reference (+ conditioning accuracy for "fmnist")

Reference sets (`ref`):
  "fashion-mnist" / "fmnist"   the installed Fashion-MNIST, **test split** by default (10k images;
                               `split="train"` for the 60k training images)
  an image folder              one subfolder per class, or a folder of the four IDX files (the
                               `split` applies to IDX folders), loaded with `mapdit.data.load_dataset`
  a prepared latent folder     holds `latents.json`; the latents are decoded to pixels with the
                               dataset's VAE (`mapdit.data.decoder_for`)
  an ADM reference batch .npz  from guided-diffusion's evaluation suite: its `mu`/`sigma` (Inception
                               pool features of the TF graph that torch-fidelity ports) are used as
                               they are when the extractor is "inception"; otherwise the statistics
                               are computed from its images `arr_0` (N, H, W, 3) uint8
`num_samples` takes a fixed random subset (seed 0) of the reference; `data_options` (image_size,
patch_size, channels) are passed to `load_dataset` so the reference can match the samples' geometry.

Grayscale images are replicated to 3 channels for Inception (it needs RGB); the Fashion-MNIST
classifier averages RGB to gray and center-crops 32x32 inputs to 28x28 (see fmnist_classifier).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import unittest.mock
import urllib.error
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from tqdm import tqdm

from mapdit import data
from mapdit.errors import UserError, reading
from mapdit.evaluate.fmnist_classifier import load_classifier
from mapdit.runio import check_writable, load_tensors, save_tensors, sha256_file

STATS_FORMAT = "mapdit-feature-stats-1"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_INSTALL_HINT = ("the Inception feature extractor needs torch-fidelity: "
                          "pip install 'mapdit[fid]' (requires torchvision)")
EXTRACTOR_NAMES = ("fmnist", "inception")
SUBSET_SEED = 0


def default_cache_dir() -> Path:
    """$MAPDIT_CACHE/fid-stats, default ~/.cache/mapdit/fid-stats."""
    return Path(os.environ.get("MAPDIT_CACHE") or "~/.cache/mapdit").expanduser() / "fid-stats"


# ------------------------------------------------------------------------------------------------
# Streaming statistics
# ------------------------------------------------------------------------------------------------
class FeatureStats:
    """Count, mean and centred sum of outer products M2 of features, in float64.

    Batches are folded in with the pairwise update of Chan, Golub & LeVeque: for parts a, b with
    n = na + nb and d = mean_b - mean_a,  mean = mean_a + d nb / n,  M2 = M2a + M2b + d d^T na nb / n.
    This is exact in exact arithmetic and, unlike a raw sum of outer products, does not lose digits
    when the mean is large compared with the spread. `covariance` is M2 / (n - 1) (unbiased).

    Statistics built from a precomputed mean and covariance (`from_moments`, e.g. an ADM reference
    batch) can be compared but not updated or merged.
    """

    def __init__(self, dim: int | None = None, info: dict | None = None):
        self.dim = dim
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        self._cov: torch.Tensor | None = None  # only for moments-only statistics
        self.info: dict = dict(info or {})

    # -------------------------------------------------------------------------------- building
    @classmethod
    def from_moments(cls, mean, cov, count: int | None = None, info: dict | None = None) -> "FeatureStats":
        mean = torch.as_tensor(np.asarray(mean, dtype=np.float64)).reshape(-1)
        cov = torch.as_tensor(np.asarray(cov, dtype=np.float64))
        if cov.shape != (mean.numel(), mean.numel()):
            raise ValueError(f"covariance shape {tuple(cov.shape)} does not match mean ({mean.numel()},)")
        stats = cls(mean.numel(), info)
        stats.count = int(count or 0)
        stats._mean, stats._cov = mean.clone(), cov.clone()
        return stats

    @property
    def moments_only(self) -> bool:
        return self._cov is not None

    def _check_dim(self, dim: int) -> None:
        if self.dim is None:
            self.dim = dim
        elif dim != self.dim:
            raise ValueError(f"features have dimension {dim}, these statistics {self.dim}")

    def _combine(self, nb: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if self.moments_only:
            raise ValueError("statistics built from a mean and covariance cannot be updated")
        if nb == 0:
            return
        if self.count == 0:
            self.count, self._mean, self._m2 = nb, mean_b.clone(), m2_b.clone()
            return
        na = self.count
        n = na + nb
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (nb / n)
        self._m2 = self._m2 + m2_b + torch.outer(delta, delta) * (na * nb / n)
        self.count = n

    def update(self, features) -> "FeatureStats":
        """Fold in a batch of features (N, F)."""
        f = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
        f = f.detach().to(device="cpu", dtype=torch.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (N, F), got shape {tuple(f.shape)}")
        if not torch.isfinite(f).all():
            raise ValueError("features contain NaN or infinite values")
        self._check_dim(f.shape[1])
        if f.shape[0] == 0:
            return self
        mean_b = f.mean(dim=0)
        xc = f - mean_b
        self._combine(f.shape[0], mean_b, xc.T @ xc)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """Fold in another FeatureStats (in place); returns self."""
        if other.moments_only:
            raise ValueError("statistics built from a mean and covariance cannot be merged")
        if other.count == 0:
            return self
        self._check_dim(other.dim)
        self._combine(other.count, other._mean, other._m2)
        return self

    def all_reduce(self) -> "FeatureStats":
        """Merge the statistics of all processes (torch.distributed, when initialised) in rank order,
        so every rank ends with the same result; a no-op in a single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        if self.moments_only:
            raise ValueError("statistics built from a mean and covariance cannot be reduced")
        world = dist.get_world_size()
        meta: list = [None] * world
        dist.all_gather_object(meta, (self.count, self.dim))
        dims = {d for c, d in meta if c > 0}
        if not dims:
            return self
        if len(dims) > 1:
            raise ValueError(f"ranks hold features of different dimensions: {sorted(dims)}")
        dim = dims.pop()
        device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                  else torch.device("cpu"))
        mean = self._mean if self.count else torch.zeros(dim, dtype=torch.float64)
        m2 = self._m2 if self.count else torch.zeros(dim, dim, dtype=torch.float64)
        means = [torch.empty(dim, dtype=torch.float64, device=device) for _ in range(world)]
        m2s = [torch.empty(dim, dim, dtype=torch.float64, device=device) for _ in range(world)]
        dist.all_gather(means, mean.to(device))
        dist.all_gather(m2s, m2.to(device))
        self.count, self._mean, self._m2, self.dim = 0, None, None, dim
        for (count, _), mu, s in zip(meta, means, m2s):
            if count > 0:
                self._combine(count, mu.cpu(), s.cpu())
        return self

    # -------------------------------------------------------------------------------- results
    @property
    def mean(self) -> np.ndarray:
        """float64 (F,)."""
        if self._mean is None:
            raise ValueError("no features were added")
        return self._mean.numpy().copy()

    @property
    def covariance(self) -> np.ndarray:
        """Unbiased covariance float64 (F, F), i.e. M2 / (N - 1)."""
        if self._cov is not None:
            return self._cov.numpy().copy()
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 features, got {self.count}")
        return (self._m2 / (self.count - 1)).numpy().copy()

    # -------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """One safetensors file (written atomically): float64 mean and M2 (or covariance for
        moments-only statistics); count and `info` (as JSON) in the metadata."""
        if self._mean is None:
            raise ValueError("no features were added")
        tensors = {"mean": self._mean}
        if self.moments_only:
            tensors["cov"] = self._cov
        else:
            tensors["m2"] = self._m2
        meta = {"format": STATS_FORMAT, "count": str(self.count), "dim": str(self.dim),
                "info": json.dumps(self.info, sort_keys=True, default=str)}
        return save_tensors(path, tensors, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        tensors = load_tensors(path)
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        if meta.get("format") != STATS_FORMAT:
            raise UserError(f"{path} is not a mapdit feature-statistics file (format {meta.get('format')!r})")
        info = json.loads(meta.get("info") or "{}")
        count = int(meta["count"])
        if "cov" in tensors:
            return cls.from_moments(tensors["mean"], tensors["cov"], count, info)
        stats = cls(int(meta["dim"]), info)
        stats.count, stats._mean, stats._m2 = count, tensors["mean"].to(torch.float64), tensors["m2"].to(torch.float64)
        return stats

    def __repr__(self) -> str:
        return f"FeatureStats(count={self.count}, dim={self.dim}{', moments only' if self.moments_only else ''})"


# ------------------------------------------------------------------------------------------------
# Fréchet distance
# ------------------------------------------------------------------------------------------------
def _as_float64(x, ndim: int, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if ndim == 1:
        a = a.reshape(-1)
    if a.ndim != ndim or (ndim == 2 and a.shape[0] != a.shape[1]):
        raise ValueError(f"{what} must be {'a vector' if ndim == 1 else 'a square matrix'}, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return a


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)) in float64, always finite and >= 0.

    tr((S1 S2)^(1/2)) is computed as sum_i sqrt(max(lambda_i, 0)) over the eigenvalues lambda of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which is similar to S1 S2 (same eigenvalues); S1^(1/2)
    comes from a symmetric eigendecomposition with negative round-off eigenvalues clamped to 0. No
    general (non-symmetric) matrix square root is taken, so there are no complex parts to discard,
    and singular or ill-conditioned covariances (fewer samples than dimensions) are handled.
    """
    mu1, mu2 = _as_float64(mu1, 1, "mu1"), _as_float64(mu2, 1, "mu2")
    s1, s2 = _as_float64(sigma1, 2, "sigma1"), _as_float64(sigma2, 2, "sigma2")
    if not (mu1.shape[0] == mu2.shape[0] == s1.shape[0] == s2.shape[0]):
        raise ValueError(f"dimension mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {s2.shape}")
    s1 = 0.5 * (s1 + s1.T)
    s2 = 0.5 * (s2 + s2.T)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ s2 @ root1
    lam = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_sqrt = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff) + float(np.trace(s1)) + float(np.trace(s2)) - 2.0 * tr_sqrt
    return max(fd, 0.0)


# ------------------------------------------------------------------------------------------------
# Feature extractors
# ------------------------------------------------------------------------------------------------
def as_nchw_uint8(images) -> torch.Tensor:
    """uint8 images (N, H, W, C) [documented layout], (N, H, W) or (N, C, H, W) -> uint8 (N, C, H, W)."""
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images, copy=True))
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got {x.dtype}")
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 3):
        return x.permute(0, 3, 1, 2)
    if x.shape[1] in (1, 3):
        return x
    raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(x.shape)}")


class FeatureExtractor:
    """uint8 images (N, H, W, C) -> float32 features (N, dim) on the CPU.

    `name` names the feature space in results ("fid" for inception, "fd_<name>" otherwise);
    `fingerprint` identifies the exact network (it keys the reference-statistics cache).
    """

    name: str = "features"
    dim: int | None = None
    device: torch.device = torch.device("cpu")

    @property
    def fingerprint(self) -> str:
        return self.name

    def extract(self, images_nchw_uint8: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        x = as_nchw_uint8(images)
        f = self.extract(x).flatten(1).to(device="cpu", dtype=torch.float32)
        if self.dim is None:
            self.dim = f.shape[1]
        return f

    def describe(self) -> dict:
        return {"name": self.name, "dim": self.dim, "fingerprint": self.fingerprint}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


class ModuleFeatures(FeatureExtractor):
    """Wrap any module mapping float images (N, C, H, W) in [-1, 1] (u / 127.5 - 1) to features."""

    def __init__(self, module: nn.Module, name: str, dim: int | None = None,
                 device: str | torch.device | None = None, fingerprint: str | None = None):
        self.module = module.eval()
        self.name = name
        self.dim = dim
        if device is None:
            p = next(module.parameters(), None)
            device = p.device if p is not None else "cpu"
        self.device = torch.device(device)
        self._fingerprint = fingerprint or name

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.device).to(torch.float32) / 127.5 - 1.0)


class FmnistFeatures(FeatureExtractor):
    """Penultimate (128-d) features of the shipped Fashion-MNIST classifier (or `weights_path`)."""

    name = "fmnist"

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.classifier = load_classifier(weights_path, device=self.device)
        self.dim = self.classifier.feature_dim

    @property
    def fingerprint(self) -> str:
        return f"fmnist-{self.classifier.fingerprint}"

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)

    @torch.no_grad()
    def predict_from_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier.classify_features(features.to(self.device)).argmax(dim=1).cpu()


class InceptionFeatures(FeatureExtractor):
    """2048-d pool features of torch-fidelity's FeatureExtractorInceptionV3 (the TF Inception graph of
    2015-12-05 that FID is defined with). Gray images are replicated to 3 channels; torch-fidelity
    resizes to 299x299 itself (TF1-compatible bilinear)."""

    name = "inception"
    dim = 2048

    def __init__(self, weights_path: str | Path | None = None, device: str | torch.device = "cpu"):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as err:  # torch-fidelity itself, or torchvision which it imports
            raise UserError(f"{INCEPTION_INSTALL_HINT} [{err}]") from None
        self.device = torch.device(device)
        how_to_get = (f"download {INCEPTION_URL} (e.g. on a machine with internet access) and pass "
                      "--inception-weights PATH")
        if weights_path is not None:
            weights_path = Path(weights_path).expanduser()
            if not weights_path.is_file():
                raise UserError(f"Inception weights {weights_path} not found: {how_to_get}")
        else:  # torch-fidelity downloads into the torch hub cache; use a copy already there
            cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
            weights_path = cached if cached.is_file() else None
        self._weights_id = "default"
        if weights_path is not None:  # the cache of reference statistics must not mix different weights
            self._weights_id = sha256_file(weights_path)[:16]
        try:
            # torch-fidelity unpickles the weights file with weights_only=False; only tensors may be loaded
            real_load = torch.load

            def tensors_only_load(f, *args, **kwargs):
                kwargs["weights_only"] = True
                return real_load(f, *args, **kwargs)

            with unittest.mock.patch.object(torch, "load", tensors_only_load):
                model = FeatureExtractorInceptionV3(
                    "inception-v3-compat", ["2048"],
                    feature_extractor_weights_path=None if weights_path is None else str(weights_path))
        except pickle.UnpicklingError:
            raise UserError(f"Inception weights {weights_path} hold more than tensors; refusing to unpickle "
                            f"them: {how_to_get}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            raise UserError(f"could not download the Inception weights ({err}): {how_to_get}") from None
        except OSError as err:
            raise UserError(f"could not get the Inception weights ({err}): {how_to_get}") from None
        except TypeError as err:
            raise UserError(f"this torch-fidelity is too old ({err}): pip install -U torch-fidelity") from None
        self.model = model.to(self.device).eval()

    @property
    def fingerprint(self) -> str:
        return f"inception-v3-2015-12-05-pool2048-{self._weights_id}"

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.model(x.contiguous().to(self.device))[0]


def get_extractor(name: str, weights_path: str | Path | None = None,
                  device: str | torch.device = "cpu") -> FeatureExtractor:
    """"fmnist" (alias "fashion-mnist") or "inception"; `weights_path` overrides the weights."""
    key = str(name).strip().lower()
    if key in ("fmnist", "fashion-mnist", "fashion_mnist"):
        return FmnistFeatures(weights_path, device)
    if key in ("inception", "inception-v3", "inceptionv3"):
        return InceptionFeatures(weights_path, device)
    raise UserError(f"unknown feature extractor {name!r}: use one of {', '.join(EXTRACTOR_NAMES)}")


def _resolve_extractor(extractor, weights_path=None, device="cpu") -> FeatureExtractor:
    if isinstance(extractor, FeatureExtractor):
        return extractor
    if isinstance(extractor, nn.Module):
        return ModuleFeatures(extractor, type(extractor).__name__)
    return get_extractor(extractor, weights_path, device)


# ------------------------------------------------------------------------------------------------
# Streaming images through an extractor
# ------------------------------------------------------------------------------------------------
def _batches(images, batch_size: int) -> Iterable:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        for i in range(0, len(images), batch_size):
            yield images[i: i + batch_size]
        return
    for chunk in images:
        for i in range(0, len(chunk), batch_size):
            yield chunk[i: i + batch_size]


def compute_stats(
    images,
    extractor,
    batch_size: int = 256,
    progress: bool = False,
    on_features: Callable[[torch.Tensor], None] | None = None,
    total: int | None = None,
    desc: str = "features",
) -> FeatureStats:
    """Feature statistics of uint8 images (N, H, W, C): a tensor/array, or an iterable of such batches
    (streamed: only one batch of images and features is held at a time). `on_features(features)` is
    called for every batch (e.g. to classify from the same features)."""
    ext = _resolve_extractor(extractor)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if total is None and isinstance(images, (torch.Tensor, np.ndarray)):
        total = len(images)
    stats = FeatureStats()
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for chunk in _batches(images, batch_size):
            if len(chunk) == 0:
                continue
            with torch.inference_mode():
                f = ext(chunk)
            stats.update(f)
            if on_features is not None:
                on_features(f)
            bar.update(len(chunk))
    stats.info["extractor"] = ext.describe()
    return stats


# ------------------------------------------------------------------------------------------------
# Reference statistics
# ------------------------------------------------------------------------------------------------
def _tree_signature(root: Path) -> list:
    """(relative path, size, mtime) of every file below root: changes when the data changes."""
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            out.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return sorted(out)


def _subset(n_total: int, num_samples: int | None, what: str) -> torch.Tensor | None:
    """Indices of a fixed random subset (seed 0, sorted), or None for all."""
    if num_samples is None or num_samples == n_total:
        return None
    if num_samples < 2:
        raise UserError(f"the reference needs at least 2 images, asked for {num_samples}")
    if num_samples > n_total:
        raise UserError(f"{what} holds {n_total} images, fewer than the {num_samples} asked for")
    g = torch.Generator().manual_seed(SUBSET_SEED)
    return torch.randperm(n_total, generator=g)[:num_samples].sort().values


def _npz_array_shape(path: Path, key: str) -> tuple | None:
    """Shape of array `key` in an .npz without reading its data."""
    try:
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            return tuple(read(f)[0]) if read else None
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return None


def _classify_ref(ref) -> tuple[str, str]:
    """(kind, resolved path) for a reference: fashion-mnist | adm-npz | latents | folder."""
    if data.fashion_mnist.is_alias(str(ref)):
        return "fashion-mnist", str(data.fashion_mnist.default_dir())
    p = Path(ref).expanduser()
    if not p.exists():
        raise UserError(f"reference {ref} does not exist: pass 'fashion-mnist', an image folder, a prepared "
                        "latent folder or an ADM reference batch .npz")
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return "adm-npz", str(p.resolve())
        raise UserError(f"reference {p} is a file but not an .npz: pass an ADM reference batch .npz or a folder")
    if (p / "latents.json").is_file():
        return "latents", str(p.resolve())
    return "folder", str(p.resolve())


def reference_stats(
    ref,
    extractor,
    cache_dir: str | Path | None = None,
    *,
    split: str = "test",
    num_samples: int | None = None,
    data_options: dict | None = None,
    batch_size: int = 256,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> FeatureStats:
    """Feature statistics of a reference set (see the module doc), cached in `cache_dir`.

    The cache file is keyed by the reference's identity (kind, resolved path, split, data options and
    the size and mtime of its files), the extractor's fingerprint and the sample count, so the
    statistics are computed once; `cache_dir=None` disables caching. The returned stats' `info`
    describes the reference (`cached` says whether it came from the cache).
    """
    ext = _resolve_extractor(extractor)
    kind, resolved = _classify_ref(ref)
    data_options = dict(data_options or {})
    identity = {"kind": kind, "path": resolved, "extractor": ext.fingerprint, "num_samples": num_samples}
    if kind == "adm-npz":
        st = Path(resolved).stat()
        identity["file"] = [st.st_size, st.st_mtime_ns]
    else:
        identity.update(split=split if kind != "latents" else None, data_options=data_options,
                        files=hashlib.sha256(json.dumps(_tree_signature(Path(resolved))).encode()).hexdigest())
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    info = {"ref": str(ref), "kind": kind, "path": resolved, "key": key}
    if kind in ("fashion-mnist", "folder"):
        info["split"] = split
    if data_options:
        info["data_options"] = data_options

    # ADM reference batch with precomputed Inception statistics: used as is, nothing to cache
    if kind == "adm-npz" and ext.name == "inception":
        with reading(resolved, "the reference"), np.load(resolved, allow_pickle=False) as npz:
            if "mu" in npz.files and "sigma" in npz.files:
                mu, sigma = npz["mu"], npz["sigma"]
                if ext.dim is not None and mu.shape != (ext.dim,):
                    raise UserError(f"{resolved}: mu has shape {mu.shape}, the {ext.name} features have {ext.dim}")
                shape = _npz_array_shape(Path(resolved), "arr_0")
                info.update(source="npz mu/sigma", num_images=None if shape is None else int(shape[0]),
                            extractor=ext.describe())
                if num_samples is not None:
                    info["note"] = "num_samples ignored: the .npz's precomputed mu/sigma are used"
                return FeatureStats.from_moments(mu, sigma, info["num_images"], info)

    cache_file = None
    if cache_dir is not None:
        slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(resolved).name)[:40] or "ref"
        name = f"ref-{kind}-{slug}-{ext.name}-n{num_samples or 'all'}-{key}.safetensors"
        cache_file = Path(cache_dir).expanduser() / name
        if cache_file.is_file():
            try:
                stats = FeatureStats.load(cache_file)
                stats.info.update(cached=True, cache_file=str(cache_file))
                return stats
            except (UserError, KeyError, ValueError) as err:
                if log:
                    log(f"recomputing reference statistics: cache file {cache_file} is unreadable ({err})")

    if cache_file is not None:  # checked before the work: an unwritable cache only costs the recomputation
        try:
            check_writable(cache_file.parent, "the statistics cache", "computing the reference statistics in "
                           "memory (pass --cache-dir DIR or set MAPDIT_CACHE to keep them)")
        except UserError as err:
            if str(cache_file.parent) not in _UNWRITABLE_WARNED:  # once per process (training scores often)
                _UNWRITABLE_WARNED.add(str(cache_file.parent))
                _warn(log, str(err))
            cache_file = None
    images, total, extra = _reference_images(kind, resolved, ref, split, num_samples, data_options, ext, batch_size)
    info.update(extra)
    stats = compute_stats(images, ext, batch_size=batch_size, progress=progress, total=total,
                          desc=f"reference {Path(resolved).name}")
    stats.info.update(info, source="computed", num_images=stats.count, num_samples=num_samples)
    if cache_file is not None:
        try:
            stats.save(cache_file)
        except UserError as err:  # a full disk or a place that became read-only: the numbers are still good
            _warn(log, f"reference statistics not cached ({err})")
            cache_file = None
    stats.info.update(cached=False, cache_file=None if cache_file is None else str(cache_file))
    return stats


_UNWRITABLE_WARNED: set[str] = set()  # statistics cache folders already reported as unwritable


def _warn(log: Callable[[str], None] | None, message: str) -> None:
    (log or (lambda m: print(m, file=sys.stderr)))(f"warning: {message}")


def _reference_images(kind, resolved, ref, split, num_samples, data_options, ext, batch_size):
    """(images or an iterable of uint8 (B, H, W, C) batches, count, description) of a reference."""
    if kind == "adm-npz":
        with reading(resolved, "the reference"), np.load(resolved, allow_pickle=False) as npz:
            if "arr_0" not in npz.files:
                no_stats = " and no mu/sigma" if "mu" not in npz.files else ""
                raise UserError(f"{resolved} has no images (arr_0){no_stats}: is it an ADM reference batch?")
            arr = npz["arr_0"]
        if arr.dtype != np.uint8 or arr.ndim != 4:
            raise UserError(f"{resolved}: arr_0 must be uint8 (N, H, W, C), got {arr.dtype} {arr.shape}")
        idx = _subset(len(arr), num_samples, resolved)
        arr = arr if idx is None else arr[idx.numpy()]
        return arr, len(arr), {"resolution": list(arr.shape[1:3]), "channels": int(arr.shape[3])}

    if kind == "latents":
        ds = data.load_dataset(resolved)
        decoder = data.decoder_for(ds.meta(), device=ext.device)
        idx = _subset(len(ds), num_samples, resolved)
        idx = torch.arange(len(ds)) if idx is None else idx

        def decoded():
            for i in range(0, len(idx), batch_size):
                x, _ = ds.batch(idx[i: i + batch_size])
                yield decoder(x.to(ext.device)).cpu()
        return decoded(), len(idx), {"dataset": _small_meta(ds.meta()), "resolution": [ds.image_resolution] * 2,
                                     "decoded": "VAE decodes of the posterior means"}

    ds = data.load_dataset(ref if kind == "fashion-mnist" else resolved, split=split, **data_options)
    idx = _subset(len(ds), num_samples, resolved)
    images = ds.images if idx is None else ds.images[idx]
    return images.permute(0, 2, 3, 1), len(images), {"resolution": [ds.resolution] * 2, "channels": ds.channels,
                                                      "dataset": _small_meta(ds.meta())}


def _small_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k not in ("class_names", "stats")}


# ------------------------------------------------------------------------------------------------
# Evaluating samples
# ------------------------------------------------------------------------------------------------
def metric_name(extractor_name: str) -> str:
    return "fid" if extractor_name == "inception" else f"fd_{extractor_name}"


def evaluate_samples(
    samples_uint8,
    labels,
    ref,
    extractor,
    cache_dir: str | Path | None = None,
    extra_settings: dict | None = None,
    *,
    num_ref: int | None = None,
    split: str = "test",
    data_options: dict | None = None,
    batch_size: int = 256,
    progress: bool = False,
    weights_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = None,
    ref_stats: FeatureStats | None = None,
) -> dict:
    """FD of uint8 samples (N, H, W, C) against `ref` in the feature space of `extractor` (a name,
    a FeatureExtractor or a module). Returns a JSON-serialisable dict (nothing is written):

        {"fid" | "fd_<name>": value, "metric": that key, "num_samples", "num_reference",
         "features": {name, dim, fingerprint}, "reference": {...}, "sample_shape": [H, W, C],
         "settings": extra_settings, ["conditioning_accuracy"], ["warnings"]}

    `conditioning_accuracy` (share of samples classified as their label) is added when the extractor
    is "fmnist" and labels are given; it reuses the features computed for the FD. `ref_stats`: the reference's
    statistics computed beforehand (`reference_stats`, e.g. before a long sampling, so a bad reference fails first).
    """
    ext = _resolve_extractor(extractor, weights_path, device)
    try:
        samples = as_nchw_uint8(samples_uint8)
    except ValueError as err:
        raise UserError(f"samples: {err}") from None
    n = samples.shape[0]
    if n < 2:
        raise UserError(f"a Fréchet distance needs at least 2 samples, got {n}")
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        labels = labels.to(torch.int64).cpu().reshape(-1)
        if labels.shape != (n,):
            raise UserError(f"got {labels.numel()} labels for {n} samples")

    if ref_stats is None:
        ref_stats = reference_stats(ref, ext, cache_dir, split=split, num_samples=num_ref,
                                    data_options=data_options, batch_size=batch_size, progress=progress, log=log)
    preds: list[torch.Tensor] = []
    classify = labels is not None and isinstance(ext, FmnistFeatures)
    stats = compute_stats(samples.permute(0, 2, 3, 1), ext, batch_size=batch_size, progress=progress,
                          on_features=(lambda f: preds.append(ext.predict_from_features(f))) if classify else None,
                          desc="samples")
    if ref_stats.dim != stats.dim:
        raise UserError(f"the reference statistics have dimension {ref_stats.dim} but the {ext.name} features "
                        f"have {stats.dim}: were they computed with another feature network?")
    value = frechet_distance(stats.mean, stats.covariance, ref_stats.mean, ref_stats.covariance)
    key = metric_name(ext.name)
    h, w, c = samples.shape[2], samples.shape[3], samples.shape[1]
    result = {
        key: value,
        "metric": key,
        "num_samples": n,
        "num_reference": ref_stats.count or ref_stats.info.get("num_images"),
        "features": ext.describe(),
        "reference": ref_stats.info,
        "sample_shape": [h, w, c],
        "settings": dict(extra_settings or {}),
    }
    if classify:
        pred = torch.cat(preds)
        result["conditioning_accuracy"] = float((pred == labels).to(torch.float64).mean())
    warnings = []
    res = ref_stats.info.get("resolution")
    cropped = isinstance(ext, FmnistFeatures) and {h, res and res[0]} <= {28, 32}  # the classifier crops 32 -> 28
    if res is not None and list(res) != [h, w] and not cropped:
        warnings.append(f"samples are {h}x{w} but the reference images are {res[0]}x{res[1]}: pass data_options "
                        "(image_size / patch_size) so the reference is prepared like the training data")
    if n < 2 * (ext.dim or 0):
        warnings.append(f"{n} samples for {ext.dim}-d features: the FD is biased upwards at this count; "
                        "compare values only at equal sample counts")
    if warnings:
        result["warnings"] = warnings
    return result
