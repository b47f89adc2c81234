"""`mapdit prepare`: encode a class-per-folder image set into VAE latents (format: latents.py).

Images. Files are listed as in image_folder.py (class index = position of the subfolder name in
the sorted list; files sorted by path); file number k is the position in that list. Each file is
opened with PIL, EXIF-rotated and converted to RGB with image_folder's rules (palette, CMYK,
grayscale, 16-bit, alpha composited over black), then cropped the ADM/DiT way: halve with a BOX
filter while the short side is >= 2 x resolution, resize with BICUBIC so the short side equals
the resolution, and take the centered resolution x resolution square.

Too-small images (short side < resolution). Default rule `small_images="skip"`: the file is
skipped and listed in the report and in latents.json as "too small: WxH (short side < R)", so
no latent ever comes from an upsampled image. `small_images="upscale"` (CLI
`--small-images upscale`) keeps them instead: the same crop then enlarges them with BICUBIC
(what ADM/DiT's preprocessing does); they are listed under "upscaled".

Files that cannot be decoded (corrupt, truncated, not an image) are skipped with the PIL error
as the reason. Neither kind of skip stops the run.

Shards. The file list is cut into fixed slices of `shard_size` files: shard i holds the
readable files among k in [i * shard_size, (i + 1) * shard_size), in order (with `flip`, each
image is followed by its flipped copy). Within a shard the VAE sees consecutive chunks of
`batch_size` entries, so a shard's bytes depend only on its files, the VAE and the batch size.
A shard counts as finished only when its .safetensors file (written atomically) and then its
.json done-marker exist and the marker records the file's size; a rerun skips finished
shards and redoes any other, so an interrupted run resumes into the same dataset.

torchrun. Rank r (default: $RANK, of $WORLD_SIZE) encodes the shards i with
i % world_size == r; rank 0 then waits for every marker (polling; `wait_timeout` seconds
without a new shard raise an error) and writes latents.json. A rerun of all ranks resumes.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mapdit import distributed as dist_utils
from mapdit.data import image_folder, uint8_to_model
from mapdit.data.latents import (
    FORMAT,
    INDEX_NAME,
    SETTINGS_NAME,
    json_digest,
    load_vae,
    read_marker,
    shard_name,
    vae_downsample,
    vae_reference,
    vae_weights_sha256,
    write_index,
    write_shard,
)
from mapdit.errors import UserError
from mapdit.runio import read_json, write_json

SMALL_RULES = ("skip", "upscale")
DEFAULT_SHARD_SIZE = 10_000


class TooSmall(Exception):
    """The image's short side is below the resolution and small_images == 'skip'."""


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------
def adm_center_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """RGB PIL image -> (resolution, resolution, 3) uint8: BOX halvings, BICUBIC resize, center crop."""
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = resolution / min(img.size)
    size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
    img = img.resize(size, resample=Image.BICUBIC)
    arr = np.asarray(img, dtype=np.uint8)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[top: top + resolution, left: left + resolution])


def read_image(path: str | Path, resolution: int, small_images: str = "skip") -> tuple[np.ndarray, bool]:
    """One file -> ((resolution, resolution, 3) uint8, upscaled?). Raises for unreadable or too-small files."""
    with Image.open(path) as img:
        img.load()  # decode now: truncated files fail here
        img = ImageOps.exif_transpose(img)
        img = image_folder._to_8bit(img, "RGB")
    w, h = img.size
    small = min(w, h) < resolution
    if small and small_images == "skip":
        raise TooSmall(f"too small: {w}x{h} (short side < {resolution})")
    return adm_center_crop(img, resolution), small


def list_files(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """[(file, label)] in the fixed order (class folders sorted by name, files by path), class names."""
    folders = image_folder.class_folders(root)
    files = [(p, label) for label, folder in enumerate(folders) for p in image_folder._files(folder)]
    return files, [f.name for f in folders]


def _read_one(path: Path, resolution: int, small_images: str):
    try:
        arr, upscaled = read_image(path, resolution, small_images)
        return arr, None, upscaled
    except TooSmall as err:
        return None, str(err), False
    except Exception as err:  # noqa: BLE001 - any decoding failure means "skip this file"
        return None, f"{type(err).__name__}: {err}", False


class _ReadSet(Dataset):
    def __init__(self, paths: list[Path], resolution: int, small_images: str):
        self.paths, self.resolution, self.small_images = paths, resolution, small_images

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return _read_one(self.paths[i], self.resolution, self.small_images)


def _as_list(batch):
    return batch


def _read_stream(paths: list[Path], resolution: int, small_images: str, num_workers: int):
    """Read results in the order of `paths`, optionally with DataLoader worker processes."""
    if num_workers == 0:
        for p in paths:
            yield _read_one(p, resolution, small_images)
        return
    loader = DataLoader(_ReadSet(paths, resolution, small_images), batch_size=8,
                                         shuffle=False, num_workers=num_workers, collate_fn=_as_list)
    for chunk in loader:
        yield from chunk


# ------------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------------
def encode_images(vae, images: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, H, W, 3) -> posterior mean and std, float16 (B, C, h, w) on the CPU."""
    x = uint8_to_model(torch.from_numpy(np.require(images, np.uint8, ["C", "W"])).permute(0, 3, 1, 2)).to(device)
    with torch.inference_mode():
        dist = vae.encode(x).latent_dist
        return dist.mean.to(torch.float16).cpu(), dist.std.to(torch.float16).cpu()


def _default_device(device):
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _files_digest(root: Path, files: list[tuple[Path, int]]) -> str:
    h = hashlib.sha256()
    for p, label in files:
        h.update(f"{p.relative_to(root).as_posix()}\t{label}\n".encode())
    return h.hexdigest()


def files_fingerprint(paths: list[Path], content: bool = True) -> dict:
    """{"stat": digest of (name, size, mtime) of the files, "content": digest of their bytes (if `content`)}.
    A shard records both; a rerun re-reads a done shard's files only when their stat changed, and redoes the
    shard when their content did (an image replaced under the same name gets a new latent)."""
    stat, data = hashlib.sha256(), hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            stat.update(f"{path.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError as err:
            stat.update(f"{path.name}|{err.errno}\n".encode())
        if content:
            try:
                data.update(hashlib.sha256(Path(path).read_bytes()).digest())
            except OSError as err:
                data.update(f"unreadable {err.errno}".encode())
    return {"stat": stat.hexdigest(), **({"content": data.hexdigest()} if content else {})}


def _files_changed(files: list[tuple[Path, int]], marker: dict) -> bool:
    """Whether the files of a done shard differ in content from what it was encoded from (markers written
    before shards recorded their files' fingerprint: never)."""
    recorded = marker.get("files_fingerprint")
    if not isinstance(recorded, dict):
        return False
    a, b = marker["files"]
    paths = [files[k][0] for k in range(a, b)]
    if files_fingerprint(paths, content=False)["stat"] == recorded.get("stat"):
        return False
    return files_fingerprint(paths)["content"] != recorded.get("content")


def _check_settings(out: Path, settings: dict) -> None:
    """The folder's prepare.json must match these settings once a shard exists; (re)write it otherwise."""
    path = out / SETTINGS_NAME
    if path.exists():
        old = read_json(path)
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        if diff and not any(out.glob("shard-*.json")):
            write_json(path, settings)  # nothing was encoded with the old settings (e.g. a wrong --vae)
        elif diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in diff
                              if k != "files_sha256")
            if "files_sha256" in diff:
                shown = ", ".join(filter(None, [shown, "the image folder's file list changed"]))
            raise UserError(f"{out} was prepared with other settings ({shown}): use a fresh --out folder, "
                            "or the same arguments to resume")
    else:
        write_json(path, settings)


def _validate(image_folder_path, out_dir, resolution, batch_size, num_workers, shard_size, rank,
              world_size, small_images) -> tuple[Path, Path]:
    if not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        raise UserError(f"--resolution must be a positive multiple of 8 (e.g. 128 or 256), got {resolution}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise UserError(f"--num-workers must be >= 0, got {num_workers}")
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in range for world size {world_size}")
    if small_images not in SMALL_RULES:
        raise UserError(f"small_images must be one of {', '.join(SMALL_RULES)}, got {small_images!r}")
    root = Path(image_folder_path).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"--image-folder {root} is not a folder: pass a folder with one subfolder of "
                        "images per class")
    out = Path(out_dir).expanduser().resolve()
    if out == root or root in out.parents:
        raise UserError(f"--out {out} lies inside --image-folder {root}: it would be read as a class "
                        "folder; put the latents elsewhere")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder")
    return root, out


def prepare_latents(
    image_folder: str | Path,
    out_dir: str | Path,
    resolution: int,
    vae: str | Path,
    batch_size: int = 32,
    num_workers: int = 0,
    flip: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    device: str | torch.device | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    *,
    small_images: str = "skip",
    wait_timeout: float = 3600.0,
    poll_interval: float = 2.0,
    log=print,
) -> dict:
    """Encode `image_folder` into latent shards in `out_dir`; rank 0 also writes latents.json.

    Returns the report: encoded (images encoded now), entries (entries written now), skipped
    [(path, reason)] and upscaled [path] among the files read now, shards_written, shards_done
    (finished before, not redone), index (latents.json path on rank 0, else None), num_items and
    stats (rank 0), seconds and images_per_s.
    """
    if rank is None:
        rank = dist_utils.rank_from_env()
    if world_size is None:
        world_size = dist_utils.world_size_from_env()
    root, out = _validate(image_folder, out_dir, resolution, batch_size, num_workers, shard_size, rank,
                          world_size, small_images)
    files, class_names = list_files(root)
    if not class_names:
        raise UserError(f"--image-folder {root} holds no class subfolders: put images in {root}/<class name>/")
    if not files:
        raise UserError(f"the class folders of {root} hold no files: put images in {root}/<class name>/")
    settings = {
        "format": FORMAT, "resolution": resolution, "vae": vae_reference(vae), "flip": bool(flip),
        "shard_size": shard_size, "small_images": small_images, "crop": "adm-center-crop",
        "num_files": len(files), "files_sha256": _files_digest(root, files),
    }
    settings_sha = json_digest(settings)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)

    num_shards = -(-len(files) // shard_size)
    mine = [i for i in range(num_shards) if i % world_size == rank]
    done, pending = [], []
    for i in mine:
        marker = read_marker(out, i)
        if marker is not None and marker.get("settings_sha256") != settings_sha:
            raise UserError(f"{out / shard_name(i)} was made with other settings than {SETTINGS_NAME} "
                            "records: use a fresh --out folder")
        if marker is not None and _files_changed(files, marker):
            log(f"prepare: {shard_name(i)} is encoded again: some of its images changed since it was written")
            marker = None
        (done if marker is not None else pending).append(i)

    for i in pending:  # temporary files of a killed earlier attempt at these shards (ours alone)
        for tmp in out.glob(f".{shard_name(i)[:-len('.safetensors')]}.*.tmp"):
            tmp.unlink(missing_ok=True)

    start = time.perf_counter()
    report = {"out": str(out), "rank": rank, "world_size": world_size, "num_files": len(files),
              "num_shards": num_shards, "encoded": 0, "entries": 0, "skipped": [], "upscaled": [],
              "shards_written": [], "shards_done": [shard_name(i) for i in done], "index": None}
    vae_info = {}
    if pending:
        dev = _default_device(device)
        model = load_vae(vae, dev)
        factor = vae_downsample(model)
        if resolution % factor:
            raise UserError(f"--resolution {resolution} is not divisible by the VAE's downsampling factor "
                            f"{factor}: use a multiple of {factor}")
        latent_shape = [int(model.config.latent_channels), resolution // factor, resolution // factor]
        vae_sha = vae_weights_sha256(model)
        # a resume with other weights at the same --vae (a replaced folder, an updated hub copy) would mix
        # latents of two VAEs in one dataset: refused before encoding anything
        other = next((m for m in map(lambda i: read_marker(out, i) or {}, done)
                      if m.get("vae_sha256") not in (None, vae_sha)), None)
        if other is not None:
            raise UserError(f"{out / other['name']} was encoded with other VAE weights than --vae {vae} holds now "
                            f"(sha256 {other['vae_sha256'][:12]}... vs {vae_sha[:12]}...): resume with the VAE it "
                            "was started with, or prepare into a fresh --out folder")
        vae_info = {"downsample": factor, "vae_scaling_factor": float(model.config.scaling_factor),
                    "vae_sha256": vae_sha}
        _encode_shards(model, dev, root, out, files, pending, resolution, batch_size, num_workers, flip,
                       shard_size, small_images, latent_shape, {**vae_info, "settings_sha256": settings_sha},
                       progress, report)

    if rank == 0:
        markers = _wait_for_shards(out, num_shards, world_size, wait_timeout, poll_interval, log)
        bad = [m["name"] for m in markers if m.get("settings_sha256") != settings_sha]
        if bad:
            raise UserError(f"shards {', '.join(bad[:3])} in {out} were made with other settings: "
                            "use a fresh --out folder")
        first = next(m for m in markers)
        info = {
            "num_images": sum(m["num_images"] for m in markers),
            "resolution": resolution,
            "latent_shape": first["latent_shape"],
            "downsample": first["downsample"],
            "num_classes": len(class_names),
            "class_names": class_names,
            "vae": settings["vae"],
            "vae_scaling_factor": first["vae_scaling_factor"],
            "flip": bool(flip),
            "small_images": small_images,
            "image_folder": str(root),
            "num_files": len(files),
            "settings": settings,
        }
        index = write_index(out, markers, info)
        report.update(index=str(out / INDEX_NAME), num_items=index["num_items"], stats=index["stats"],
                      skipped_total=len(index["skipped"]))
    seconds = time.perf_counter() - start
    report["seconds"] = round(seconds, 3)
    report["images_per_s"] = round(report["encoded"] / seconds, 2) if report["encoded"] and seconds > 0 else None
    _print_report(report, log)
    return report


def _encode_shards(model, device, root, out, files, pending, resolution, batch_size, num_workers, flip,
                   shard_size, small_images, latent_shape, marker_info, progress, report) -> None:
    slices = [(i, i * shard_size, min((i + 1) * shard_size, len(files))) for i in pending]
    paths = [files[k][0] for _, a, b in slices for k in range(a, b)]
    stream = _read_stream(paths, resolution, small_images, num_workers)
    bar = tqdm(total=len(paths), unit="img", desc=f"encoding (rank {report['rank']})" if report["world_size"] > 1
               else "encoding", disable=not progress, dynamic_ncols=True)
    try:
        for i, a, b in slices:
            images, labels, indices, flags, means, stds = [], [], [], [], [], []
            skipped, upscaled = [], []
            num_images = 0

            def flush():
                if images:
                    mu, sd = encode_images(model, np.stack(images), device)
                    means.append(mu)
                    stds.append(sd)
                    images.clear()

            for k in range(a, b):
                arr, reason, was_upscaled = next(stream)
                path, label = files[k]
                bar.update(1)
                if arr is None:
                    skipped.append({"path": str(path), "reason": reason})
                    continue
                num_images += 1
                if was_upscaled:
                    upscaled.append(str(path))
                for flipped, image in ((False, arr), (True, arr[:, ::-1])) if flip else ((False, arr),):
                    images.append(image)
                    labels.append(label)
                    indices.append(k)
                    flags.append(flipped)
                    if len(images) == batch_size:
                        flush()
            flush()
            empty = torch.zeros(0, *latent_shape, dtype=torch.float16)
            tensors = {
                "mean": torch.cat(means) if means else empty,
                "std": torch.cat(stds) if stds else empty,
                "label": torch.tensor(labels, dtype=torch.int64),
                "index": torch.tensor(indices, dtype=torch.int64),
                "flipped": torch.tensor(flags, dtype=torch.bool),
            }
            marker = {**marker_info, "files": [a, b], "num_images": num_images, "skipped": skipped,
                      "upscaled": upscaled, "files_fingerprint": files_fingerprint([files[k][0] for k in range(a, b)])}
            write_shard(out, i, tensors, marker)
            report["shards_written"].append(shard_name(i))
            report["encoded"] += num_images
            report["entries"] += len(labels)
            report["skipped"] += [(s["path"], s["reason"]) for s in skipped]
            report["upscaled"] += upscaled
    finally:
        bar.close()
        stream.close()


def _wait_for_shards(out: Path, num_shards: int, world_size: int, wait_timeout: float, poll_interval: float,
                     log) -> list[dict]:
    markers: dict[int, dict] = {}
    last_progress = time.monotonic()
    announced = False
    while True:
        for i in range(num_shards):
            if i not in markers:
                marker = read_marker(out, i)
                if marker is not None:
                    markers[i] = marker
                    last_progress = time.monotonic()
        missing = [i for i in range(num_shards) if i not in markers]
        if not missing:
            return [markers[i] for i in range(num_shards)]
        if time.monotonic() - last_progress > wait_timeout:
            ranks = sorted({i % world_size for i in missing})
            raise UserError(
                f"waited {wait_timeout:.0f} s without a new shard: {len(missing)} shards missing "
                f"({', '.join(shard_name(i) for i in missing[:3])}{', ...' if len(missing) > 3 else ''}) "
                f"from rank(s) {', '.join(map(str, ranks))}; rerun with the same arguments to finish "
                "(finished shards are kept)")
        if not announced:
            log(f"prepare: rank 0 waiting for {len(missing)} shards from the other ranks ...")
            announced = True
        time.sleep(poll_interval)


def _print_report(report: dict, log) -> None:
    rate = f", {report['images_per_s']} img/s" if report.get("images_per_s") else ""
    log(f"prepare: encoded {report['encoded']} images ({report['entries']} entries) into "
        f"{len(report['shards_written'])} shards in {report['seconds']} s{rate}; "
        f"{len(report['shards_done'])} shards were already done (kept)")
    if report["skipped"]:
        log(f"prepare: skipped {len(report['skipped'])} files:")
        for path, reason in report["skipped"][:20]:
            log(f"  {path}: {reason}")
        if len(report["skipped"]) > 20:
            log(f"  ... and {len(report['skipped']) - 20} more (all listed in {INDEX_NAME})")
    if report["upscaled"]:
        log(f"prepare: upscaled {len(report['upscaled'])} images smaller than the resolution")
    if report.get("index"):
        stats = report["stats"]
        fmt = lambda v: "[" + ", ".join(f"{x:.4f}" for x in v) + "]"  # noqa: E731
        log(f"prepare: wrote {report['index']}: {report['num_items']} entries, stats mean {fmt(stats['mean'])} "
            f"std {fmt(stats['std'])}")
