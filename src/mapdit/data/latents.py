"""VAE latent datasets: the on-disk format, memory-mapped loading, normalisation and decoding.

`mapdit prepare` (mapdit.data.prepare) encodes an image folder once with a diffusers
`AutoencoderKL` and stores, for every image, the posterior mean mu and std sigma. Training then
draws a fresh z = mu + sigma * eps each time and normalises it per channel with the stored
mixture-of-Gaussians statistics:

    m_c   = E[mu_c]                                   (over entries and latent pixels)
    var_c = E[sigma_c^2] + E[(mu_c - m_c)^2]          (moments of the mixture of Gaussians)
    x     = (z - m_c) / sqrt(var_c)                   (no 0.18215 factor)

Folder layout (everything written atomically; see prepare.py for resuming and torchrun):

    out/
      prepare.json                  the settings the folder was started with (checked on reruns)
      shard-00000.safetensors       tensors of the images in file-list slice [0, shard_size)
      shard-00000.json              done-marker, written after the shard: count, bytes, sha256,
                                    skipped files, float64 moments of the stored values
      ...
      latents.json                  the index, written last by rank 0

Shard tensors (n entries; with --flip every image gives two consecutive entries, the second
one encoded from the horizontally flipped image):
    mean    (n, C, h, w) float16   posterior mean mu      (latent_dist.mean)
    std     (n, C, h, w) float16   posterior std sigma    (latent_dist.std)
    label   (n,) int64             class index (position of the folder name in the sorted list)
    index   (n,) int64             position of the source file in the sorted file list
    flipped (n,) bool              entry encodes the horizontally flipped image

latents.json: format, num_items (entries), num_images (source images), shards [{name, count,
bytes, sha256}], resolution (image side), latent_shape [C, h, w], downsample, num_classes,
class_names, vae (hub id or absolute folder), vae_scaling_factor (reference only: it is not
used), stats {mean, std, count} (per channel, float64 from the stored float16 values), flip,
small_images, skipped [{path, reason}], upscaled [paths], image_folder, num_files, settings.

Loading never reads the whole set into memory: the shards are parsed by their safetensors
header and memory-mapped with numpy, and `batch()` gathers only the requested rows.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

from mapdit.data.pixels import to_uint8_images
from mapdit.errors import UserError
from mapdit.runio import read_json, save_tensors, sha256_file, write_json

__all__ = [
    "FORMAT", "INDEX_NAME", "LatentDataset", "load_latents", "load_vae", "latent_decoder",
    "is_latent_folder", "synthetic_latents",
]

FORMAT = "mapdit-latents-1"
INDEX_NAME = "latents.json"
SETTINGS_NAME = "prepare.json"

_ST_DTYPES = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "F64": np.dtype("<f8"),
              "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "BOOL": np.dtype("bool"),
              "U8": np.dtype("u1")}


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def marker_path(shard_path: Path) -> Path:
    return shard_path.with_suffix(".json")


def is_latent_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / INDEX_NAME).is_file()


def json_digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Float64 moments of (mu, sigma), mergeable across shards (Chan et al. pairwise update)
# ------------------------------------------------------------------------------------------------
class Moments:
    """Per channel: count of values, mean of mu, sum of squared deviations of mu, sum of sigma^2."""

    def __init__(self, channels: int):
        self.count = 0
        self.mean = np.zeros(channels, dtype=np.float64)
        self.m2 = np.zeros(channels, dtype=np.float64)
        self.sum_var = np.zeros(channels, dtype=np.float64)

    def update(self, mu: torch.Tensor, sigma: torch.Tensor, chunk: int = 1024) -> "Moments":
        """Add (n, C, h, w) tensors (the stored float16 values), accumulating in float64."""
        for a in range(0, mu.shape[0], chunk):
            m = mu[a: a + chunk].to(torch.float64).transpose(0, 1).reshape(mu.shape[1], -1)
            s = sigma[a: a + chunk].to(torch.float64).transpose(0, 1).reshape(mu.shape[1], -1)
            part = Moments(mu.shape[1])
            part.count = m.shape[1]
            if part.count == 0:
                continue
            part.mean = m.mean(1).numpy()
            part.m2 = ((m - m.mean(1, keepdim=True)) ** 2).sum(1).numpy()
            part.sum_var = (s * s).sum(1).numpy()
            self.merge(part)
        return self

    def merge(self, other: "Moments") -> "Moments":
        if other.count == 0:
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / n)
        self.m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        self.sum_var = self.sum_var + other.sum_var
        self.count = n
        return self

    def stats(self) -> dict:
        """{'mean': m_c, 'std': sqrt(E[sigma^2] + E[(mu - m)^2]), 'count'} as JSON-safe lists."""
        if self.count == 0:
            raise ValueError("no values")
        var = self.sum_var / self.count + self.m2 / self.count
        return {"mean": [float(v) for v in self.mean], "std": [float(math.sqrt(v)) for v in var],
                "count": int(self.count)}

    def to_json(self) -> dict:
        return {"count": int(self.count), "mean": self.mean.tolist(), "m2": self.m2.tolist(),
                "sum_var": self.sum_var.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> "Moments":
        out = cls(len(data["mean"]))
        out.count = int(data["count"])
        out.mean = np.asarray(data["mean"], dtype=np.float64)
        out.m2 = np.asarray(data["m2"], dtype=np.float64)
        out.sum_var = np.asarray(data["sum_var"], dtype=np.float64)
        return out


# ------------------------------------------------------------------------------------------------
# Writing shards and the index (shared by prepare and synthetic_latents)
# ------------------------------------------------------------------------------------------------
def write_shard(out_dir: Path, i: int, tensors: dict[str, torch.Tensor], marker: dict) -> dict:
    """Shard file first (atomic), then its done-marker with size, checksum and moments (atomic)."""
    path = Path(out_dir) / shard_name(i)
    # one metadata key only: safetensors orders metadata keys arbitrarily, and identical shards
    # must be byte-identical (their sha256 goes into the index)
    save_tensors(path, tensors, metadata={"format": FORMAT})
    channels = tensors["mean"].shape[1]
    moments = Moments(channels).update(tensors["mean"], tensors["std"])
    marker = {**marker, "shard": i, "name": path.name, "count": int(tensors["mean"].shape[0]),
              "latent_shape": list(tensors["mean"].shape[1:]), "bytes": path.stat().st_size,
              "sha256": sha256_file(path), "moments": moments.to_json()}
    write_json(marker_path(path), marker)
    return marker


def read_marker(out_dir: Path, i: int) -> dict | None:
    """The done-marker of shard i when the shard is finished (marker valid, file of the recorded size)."""
    path = Path(out_dir) / shard_name(i)
    try:
        marker = json.loads(marker_path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("name") != path.name:
        return None
    try:
        if path.stat().st_size != marker.get("bytes"):
            return None
    except FileNotFoundError:
        return None
    return marker


def write_index(out_dir: Path, markers: list[dict], info: dict) -> dict:
    """Combine the shards' markers into latents.json (written atomically, last)."""
    shapes = {tuple(m["latent_shape"]) for m in markers if m["count"]}
    if len(shapes) > 1:
        raise UserError(f"the shards in {out_dir} disagree on the latent shape ({sorted(shapes)}): "
                        "they were made with different VAEs; prepare into a fresh --out folder")
    channels = next(iter(shapes))[0] if shapes else info["latent_shape"][0]
    moments = Moments(channels)
    skipped, upscaled = [], []
    for m in markers:
        moments.merge(Moments.from_json(m["moments"]))
        skipped += m.get("skipped", [])
        upscaled += m.get("upscaled", [])
    num_items = sum(m["count"] for m in markers)
    if num_items == 0:
        examples = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:3]) or "no files"
        raise UserError(f"no image could be encoded ({len(skipped)} files skipped: {examples}): "
                        "check the image folder and --resolution")
    vae_hashes = {m["vae_sha256"] for m in markers if m.get("vae_sha256")}
    if len(vae_hashes) > 1:
        raise UserError(f"the shards in {out_dir} were encoded with different VAE weights: they cannot form one "
                        "dataset; prepare into a fresh --out folder")
    if vae_hashes:
        info = {**info, "vae_sha256": next(iter(vae_hashes))}
    index = {
        "format": FORMAT,
        "num_items": num_items,
        **info,
        "latent_shape": list(next(iter(shapes))) if shapes else list(info["latent_shape"]),
        "shards": [{"name": m["name"], "count": m["count"], "bytes": m["bytes"], "sha256": m["sha256"]}
                   for m in markers],
        "stats": moments.stats(),
        "skipped": skipped,
        "upscaled": upscaled,
    }
    write_json(Path(out_dir) / INDEX_NAME, index)
    return index


# ------------------------------------------------------------------------------------------------
# Memory-mapped shards
# ------------------------------------------------------------------------------------------------
def map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """name -> read-only numpy view into a memory map of the file (nothing is read up front)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("file shorter than a safetensors header")
            n = struct.unpack("<Q", head)[0]
            if n > 100_000_000:
                raise ValueError(f"header of {n} bytes")
            header = json.loads(f.read(n))
        size = path.stat().st_size
        raw = np.memmap(path, dtype=np.uint8, mode="r") if size > 8 + n else np.zeros(0, np.uint8)
        out = {}
        for name, spec in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES[spec["dtype"]]
            a, b = spec["data_offsets"]
            shape = tuple(spec["shape"])
            if 8 + n + b > size or b - a != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise ValueError(f"tensor {name!r} runs past the end of the file (truncated?)")
            out[name] = raw[8 + n + a: 8 + n + b].view(dtype).reshape(shape)
        return out
    except FileNotFoundError:
        raise UserError(f"latent shard {path} is missing: rerun `mapdit prepare` with the same "
                        "arguments to finish the folder") from None
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise UserError(f"latent shard {path} is unreadable ({err}): delete it and its .json marker "
                        "and rerun `mapdit prepare` with the same arguments") from None


# (shard path, recorded sha256, size, mtime) of the shards this process has hashed and found as recorded
_VERIFIED: set[tuple[str, str, int, int]] = set()


class LatentDataset:
    """VAE posteriors on disk, with the ImageDataset interface.

    `batch(index, generator)` returns x float32 (B, C, h, w) = (mu + sigma * eps - m) / std with
    eps ~ N(0, I) drawn from `generator` (a fresh sample each call), and y int64 (B,).
    Without a generator there is no randomness: x = (mu - m) / std (deterministic, like
    ImageDataset without a generator). Results are CPU tensors.
    """

    kind = "latents"

    def __init__(self, root: str | Path, split: str = "train"):
        self.root = Path(root).expanduser().resolve()
        self.path = str(self.root)
        self.split = split
        index = read_json(self.root / INDEX_NAME)
        if index.get("format") != FORMAT:
            raise UserError(f"{self.root / INDEX_NAME} has format {index.get('format')!r}, expected "
                            f"{FORMAT!r}: prepare the latents again with this version")
        self.index = index
        self.latent_shape = tuple(int(v) for v in index["latent_shape"])
        self.class_names = list(index["class_names"])
        self.num_classes = len(self.class_names)
        self.skipped = [(s["path"], s["reason"]) for s in index.get("skipped", [])]
        self.hflip = False
        self.info = {"image_resolution": index["resolution"]}
        stats = index["stats"]
        self.stats_mean = torch.tensor(stats["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.stats_std = torch.tensor(stats["std"], dtype=torch.float32).view(1, -1, 1, 1)

        self._mean: list[np.ndarray] = []
        self._std: list[np.ndarray] = []
        self._shards = [(self.root / shard["name"], shard.get("sha256")) for shard in index["shards"]]
        self._checked: set[int] = set()  # shards this object has verified (or found verified in this process)
        labels = []
        for shard in index["shards"]:
            path = self.root / shard["name"]
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = None
            if size is not None and size != shard["bytes"]:
                raise UserError(f"latent shard {path} has {size} bytes, {shard['bytes']} recorded in "
                                f"{INDEX_NAME} (truncated or replaced): rerun `mapdit prepare`")
            arrays = map_safetensors(path)
            want = (shard["count"], *self.latent_shape)
            for name in ("mean", "std"):
                if name not in arrays or arrays[name].shape != want or arrays[name].dtype != np.float16:
                    got = arrays[name].shape if name in arrays else "missing"
                    raise UserError(f"latent shard {path}: tensor {name!r} is {got}, {INDEX_NAME} says "
                                    f"float16 {want}: rerun `mapdit prepare` into a fresh folder")
            self._mean.append(arrays["mean"])
            self._std.append(arrays["std"])
            labels.append(np.array(arrays["label"], dtype=np.int64))
        self.labels = torch.from_numpy(np.concatenate(labels) if labels else np.zeros(0, np.int64))
        counts = np.array([s["count"] for s in index["shards"]], dtype=np.int64)
        self._ends = np.cumsum(counts)
        self._starts = self._ends - counts
        if len(self.labels) != index["num_items"]:
            raise UserError(f"{self.root / INDEX_NAME} lists {index['num_items']} items but its shards "
                            f"hold {len(self.labels)}: rerun `mapdit prepare`")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def channels(self) -> int:
        return self.latent_shape[0]

    @property
    def resolution(self) -> int:
        """Latent side h (= w): what the model sees."""
        return self.latent_shape[1]

    @property
    def image_resolution(self) -> int:
        return int(self.index["resolution"])

    def verify_shard(self, s: int) -> None:
        """Check shard s against the sha256 latents.json records, once per process (the first read of it): a
        shard damaged or replaced after it was written is named, instead of training on what it now holds."""
        if s in self._checked:
            return
        path, want = self._shards[s]
        st = path.stat()
        key = (str(path), want, st.st_size, st.st_mtime_ns)
        if want is not None and key not in _VERIFIED:
            if sha256_file(path) != want:
                raise UserError(f"latent shard {path} does not match the sha256 recorded in {INDEX_NAME} (damaged "
                                "or replaced after it was written): delete it and its .json marker and rerun "
                                "`mapdit prepare` with the same arguments")
            _VERIFIED.add(key)
        self._checked.add(s)

    def posterior(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored (mu, sigma) float16 (B, C, h, w) for the given entry indices (gathered from the maps)."""
        idx = np.asarray(torch.as_tensor(index).detach().cpu().to(torch.int64).reshape(-1))
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for {n} items")
        idx = np.where(idx < 0, idx + n, idx)
        mu = np.empty((idx.size, *self.latent_shape), dtype=np.float16)
        sd = np.empty_like(mu)
        shard = np.searchsorted(self._ends, idx, side="right")
        if len(self._checked) < len(self._shards):
            for s in np.unique(shard):
                self.verify_shard(int(s))
        if len(self._ends) == 1 or (idx.size and shard.min() == shard.max()):
            s = int(shard[0]) if idx.size else 0
            local = idx - self._starts[s] if idx.size else idx
            np.take(self._mean[s], local, axis=0, out=mu)
            np.take(self._std[s], local, axis=0, out=sd)
        else:
            order = np.argsort(shard, kind="stable")
            bounds = np.flatnonzero(np.diff(shard[order])) + 1
            for group in np.split(order, bounds):
                s = int(shard[group[0]])
                local = idx[group] - self._starts[s]
                mu[group] = self._mean[s][local]
                sd[group] = self._std[s][local]
        return torch.from_numpy(mu), torch.from_numpy(sd)

    def batch(self, index: torch.Tensor, generator: torch.Generator | None = None):
        index = torch.as_tensor(index).to(device="cpu", dtype=torch.int64)
        mu, sd = self.posterior(index)
        z = mu.to(torch.float32)
        if generator is not None:
            eps = torch.randn(z.shape, generator=generator, device=generator.device)
            z.addcmul_(sd.to(torch.float32), eps.to("cpu"))
        x = z.sub_(self.stats_mean).div_(self.stats_std)
        return x, self.labels[index]

    def meta(self) -> dict:
        """JSON-serialisable description, stored with checkpoints and samples (enough to decode)."""
        idx = self.index
        return {
            "kind": self.kind,
            "path": self.path,
            "split": self.split,
            "num_images": len(self),
            "num_source_images": idx.get("num_images"),
            "channels": self.channels,
            "resolution": self.resolution,
            "image_resolution": self.image_resolution,
            "downsample": idx.get("downsample"),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "stats": {"mean": list(idx["stats"]["mean"]), "std": list(idx["stats"]["std"])},
            "vae": idx.get("vae"),
            "vae_scaling_factor": idx.get("vae_scaling_factor"),
            "flip": bool(idx.get("flip", False)),
            "hflip": False,
            "skipped": len(self.skipped),
        }

    def __repr__(self) -> str:
        return (f"LatentDataset({self.path!r}, n={len(self)}, latent={list(self.latent_shape)}, "
                f"image={self.image_resolution}, classes={self.num_classes})")


def load_latents(
    path: str | Path,
    split: str = "train",
    image_size: int | None = None,
    patch_size: int = 1,
    channels: int | None = None,
    *,
    hflip: bool = False,
) -> LatentDataset:
    """Open a prepared latent folder, checking the shape arguments of `load_dataset` against it.

    `image_size` may name either the latent side or the image resolution the latents were made at.
    """
    root = Path(path).expanduser()
    if root.is_file() and root.name == INDEX_NAME:
        root = root.parent
    ds = LatentDataset(root, split)
    side, image_side = ds.resolution, ds.image_resolution
    if patch_size < 1:
        raise UserError(f"patch size must be >= 1, got {patch_size}")
    if side % patch_size:
        raise UserError(f"the latent side {side} of {root} ({image_side}px images) is not divisible by "
                        f"the patch size {patch_size}: use a patch size that divides {side}")
    if image_size is not None and image_size not in (side, image_side):
        raise UserError(f"--image-size {image_size} contradicts the latents in {root}: they are "
                        f"{side}x{side} (from {image_side}x{image_side} images); leave --image-size out "
                        f"or prepare the latents again at resolution {image_size}")
    if channels is not None and channels != ds.channels:
        raise UserError(f"channels={channels} contradicts the latents in {root}, which have "
                        f"{ds.channels} channels: leave the channel count out")
    if hflip:
        raise UserError(f"random flips cannot be applied to latents ({root}): flip images at encoding "
                        "time instead (`mapdit prepare --flip`) and train without --hflip")
    return ds


# ------------------------------------------------------------------------------------------------
# The VAE
# ------------------------------------------------------------------------------------------------
def vae_reference(vae: str | Path) -> str:
    """What is recorded for a --vae argument: the absolute folder for a local one, else the hub id."""
    p = Path(str(vae)).expanduser()
    return str(p.resolve()) if p.is_dir() else str(vae)


def load_vae(vae: str | Path, device: str | torch.device = "cpu"):
    """A diffusers AutoencoderKL in eval mode on `device`, from a local folder or the hub.

    Order: a local folder (saved with save_pretrained; a pipeline folder with a vae/ subfolder also
    works) -> the hub cache only (local_files_only=True) -> a download. A VAE that cannot be found
    raises UserError.
    """
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("latent data needs diffusers: pip install 'mapdit[vae]' (or 'diffusers>=0.30,<1')") from None
    name = str(vae)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            sub = None
        elif (path / "vae" / "config.json").is_file():
            sub = "vae"
        else:
            raise UserError(f"{path} holds no saved AutoencoderKL (no config.json in it or in {path}/vae): "
                            "pass a folder written by AutoencoderKL.save_pretrained, or a hub id")
        try:
            model = AutoencoderKL.from_pretrained(str(path), subfolder=sub, low_cpu_mem_usage=False)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"could not load an AutoencoderKL from {path}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}") from None
    elif path.exists() or name.startswith((".", "/", "~")):
        raise UserError(f"--vae {name} is not a folder: pass a folder holding a saved AutoencoderKL or a hub id")
    else:
        try:
            model = AutoencoderKL.from_pretrained(name, local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError):
            try:
                model = AutoencoderKL.from_pretrained(name, low_cpu_mem_usage=False)
            except Exception as err:  # noqa: BLE001 - OSError, hub and network errors alike
                detail = str(err).splitlines()[0] if str(err) else ""
                raise UserError(f"VAE weights for {name} not found offline: pass --vae DIR holding a saved "
                                f"AutoencoderKL, or go online once ({type(err).__name__}: {detail})") from None
    model.requires_grad_(False)
    return model.eval().to(device)


def vae_weights_sha256(model) -> str:
    """sha256 of a VAE's weights (names, dtypes, shapes and bytes of its state dict, sorted by name): the same
    hub id or folder can hold other weights on another day, and latents from two VAEs must never be mixed."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def vae_downsample(model) -> int:
    return 2 ** (len(model.config.block_out_channels) - 1)


_VAE_CACHE: dict[tuple[str, str], object] = {}


def cached_vae(vae: str, device: str | torch.device):
    key = (vae_reference(vae), str(torch.device(device)))
    if key not in _VAE_CACHE:
        _VAE_CACHE[key] = load_vae(vae, device)
    return _VAE_CACHE[key]


def latent_decoder(data_meta: dict, device: str | torch.device = "cpu", *, vae: str | None = None,
                   batch_size: int = 32):
    """fn(x (N, C, h, w) in model space) -> uint8 (N, H, W, 3): x * std + mean, VAE decode, clamp to
    [-1, 1], then `to_uint8_images`. The VAE (data_meta['vae'] unless `vae` is given) is loaded now,
    once per (VAE, device) and cached, so a missing VAE fails before any sampling."""
    stats = data_meta.get("stats") or {}
    if "mean" not in stats or "std" not in stats:
        raise UserError("the data description has no latent stats: it was not made from a prepared latent folder")
    name = vae or data_meta.get("vae")
    if not name:
        raise UserError("the latent data records no VAE (synthetic latents?): pass the VAE to decode with")
    device = torch.device(device)
    mean = torch.tensor(stats["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(stats["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    model = cached_vae(name, device)
    if model.config.latent_channels != mean.shape[1]:
        raise UserError(f"the VAE {name} has {model.config.latent_channels} latent channels, the data "
                        f"{mean.shape[1]}: pass the VAE the latents were made with")

    def decode(x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != mean.shape[1]:
            raise ValueError(f"expected (N, {mean.shape[1]}, h, w) latents, got {tuple(x.shape)}")
        out = []
        with torch.inference_mode():
            for chunk in x.split(batch_size):
                z = chunk.to(device=device, dtype=torch.float32) * std + mean
                images = model.decode(z).sample.clamp(-1.0, 1.0)
                out.append(to_uint8_images(images.float().cpu()))
        if not out:
            return torch.zeros(0, 0, 0, 3, dtype=torch.uint8)
        return torch.cat(out)

    return decode


# ------------------------------------------------------------------------------------------------
# Synthetic sets (benchmarks, training-loop tests without a VAE)
# ------------------------------------------------------------------------------------------------
def synthetic_latents(out_dir: str | Path, num_items: int, latent_shape=(4, 32, 32), num_classes: int = 10,
                      shard_size: int = 10_000, seed: int = 0, vae: str | None = None) -> Path:
    """Write a random latent folder in the prepared format (mu ~ N(0, 4), sigma ~ U(0.05, 0.5))."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    markers = []
    for i, a in enumerate(range(0, num_items, shard_size)):
        n = min(shard_size, num_items - a)
        tensors = {
            "mean": (2.0 * torch.randn(n, *latent_shape, generator=gen)).to(torch.float16),
            "std": (0.05 + 0.45 * torch.rand(n, *latent_shape, generator=gen)).to(torch.float16),
            "label": torch.randint(0, num_classes, (n,), generator=gen),
            "index": torch.arange(a, a + n, dtype=torch.int64),
            "flipped": torch.zeros(n, dtype=torch.bool),
        }
        markers.append(write_shard(out, i, tensors, {"skipped": [], "upscaled": []}))
    info = {"num_images": num_items, "resolution": latent_shape[-1] * 8, "latent_shape": list(latent_shape),
            "downsample": 8, "num_classes": num_classes, "class_names": [f"class {k}" for k in range(num_classes)],
            "vae": vae, "vae_scaling_factor": None, "flip": False, "small_images": "skip",
            "image_folder": None, "num_files": num_items, "settings": {"synthetic": True, "seed": seed}}
    write_index(out, markers, info)
    return out
