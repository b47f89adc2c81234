"""Sampling from a run: PNG grids to look at, and ADM-layout npz files (arr_0 images, arr_1 labels) for FID.

Reproducible by construction: sample i belongs to batch i // batch_size, and batch b's noise comes from a
generator seeded by (seed, b). So the same seed gives the same images whatever the batching across ranks.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import distributed as dist_utils
from .data import decoder_for
from .errors import UserError
from .runio import atomic_write, check_outside_training, check_writable, load_run_config
from .samplers import Sampler, SamplerSpec
from .weights import check_weight_choice, load_model


def batch_generator(seed: int, batch_index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)


@torch.no_grad()
def generate(model, labels: torch.Tensor, sampler: Sampler, *, seed: int = 0, batch_size: int = 64,
             progress: bool = False, rank: int = 0, world_size: int = 1) -> dict[int, torch.Tensor]:
    """Samples in model space for `labels` (N,) with a `Sampler` bound to `model`: {batch index: (B, C, H, W)}
    for this rank's batches (batches rank, rank + world_size, ...). One sampler (one scheduler) for all."""
    cfg = model.config
    device = next(model.parameters()).device
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    out = {}
    batches = range(rank, math.ceil(len(labels) / batch_size), world_size)
    for b in tqdm(batches, disable=not progress, unit="batch", desc="sampling"):
        y = labels[b * batch_size:(b + 1) * batch_size].to(device)
        g = batch_generator(seed, b, device)
        noise = torch.randn((len(y), *shape), generator=g, device=device)
        out[b] = sampler(model, y=y, noise=noise, generator=g).cpu()
    return out


def sample_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """Uniform class labels from `seed` (the rule of `mapdit sample --out x.npz` and of the FID samples)."""
    return torch.randint(0, num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_images(model, data_meta: dict, labels: torch.Tensor, spec: SamplerSpec | None = None, *,
                  seed: int = 0, batch_size: int = 64, progress: bool = False, shard: bool = True,
                  decode=None, **spec_fields):
    """THE sampling path (`mapdit sample`, `mapdit fid`, the study, scores and grids during training, the
    Python API): uint8 images (N, H, W, C) numpy of `model` for `labels` (N,) with `spec` (default: the
    default SamplerSpec, `spec_fields` replaced). Sample i gets the noise of batch i // batch_size seeded by
    (seed, batch), so the images do not depend on how batches are spread over ranks.

    shard=True: under torchrun every rank samples and decodes its own batches, rank 0 gets them all (None on
    other ranks); shard=False: this process samples everything (a grid on rank 0 during training).
    decode: model space (N, C, H, W) -> uint8 (N, H, W, C) (default: the data's, `decoder_for(data_meta)`).
    The model's train/eval mode is restored."""
    spec = SamplerSpec.of(spec, **spec_fields)
    run = Sampler.for_model(spec, model, data_meta)
    rank, world = dist_utils.rank_and_world() if shard else (0, 1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        decode = decode or decoder_for(data_meta, device)
        parts = generate(model, labels, run, seed=seed, batch_size=batch_size, progress=progress and rank == 0,
                         rank=rank, world_size=world)
        parts = {b: decode(x.to(device)).cpu().numpy() for b, x in parts.items()}
    finally:
        model.train(was_training)
    if shard:
        parts = dist_utils.gather_on_main(parts)
        if parts is None:
            return None
    return np.concatenate([parts[b] for b in sorted(parts)])


# ------------------------------------------------------------------------------------------------
# Grids and files
# ------------------------------------------------------------------------------------------------
def image_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H', nrow*W', C) uint8 image with white padding."""
    n, h, w, c = images.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return grid


def save_png(path: Path, image: np.ndarray, upscale: int = 1, new: bool = False) -> Path:
    """Write a PNG atomically; `new=True`: never replace a file, take the first free name path, path-1, ...
    race-free (see runio.atomic_write). Returns the path written."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"), new=new)


def save_npz(path: Path, images: np.ndarray, labels: np.ndarray, new: bool = False) -> Path:
    """Write arr_0/arr_1 atomically; `new` as in save_png. Returns the path written."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=images, arr_1=labels)
    return atomic_write(path, write, new=new)


def unused_path(path: Path) -> Path:
    """`path`, or path-1, path-2, ... if it exists. Only a guess: another process may take the name before
    it is written; to write a file that must not replace another, use `new=True` of the writers."""
    if not path.exists():
        return path
    for i in range(1, 10_000):
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise UserError(f"too many files named like {path}")


def grid_name(spec: SamplerSpec, cfg_scale: float, *, step: int, ema_std: float | None,
              prefix: str = "grid") -> str:
    """A grid's file name that says what it shows: checkpoint step, weights (raw, or the EMA width), sampler
    and guidance, e.g. grid-step0004000-ema0.100-dpm++2m20-cfg4.png."""
    weights = "raw" if ema_std is None else f"ema{ema_std:.3f}"
    return f"{prefix}-step{step:07d}-{weights}-{spec.tag(cfg_scale)}.png"


def class_rows(num_classes: int, classes: list[int] | None = None) -> list[int]:
    """The classes of a grid's rows: `classes`, or up to 10 spread over the label range."""
    if classes is not None:
        return list(classes)
    k = min(num_classes, 10)
    return sorted({round(i * (num_classes - 1) / max(k - 1, 1)) for i in range(k)})


def sample_grid_from_model(model, data_meta: dict, path: str | Path, *, per_class: int = 8,
                           classes: list[int] | None = None, spec: SamplerSpec | None = None, seed: int = 0,
                           batch_size: int = 64, step: int | None = None, ema_std: float | None = None,
                           **spec_fields) -> Path:
    """A PNG grid, one row per class (default: up to 10 classes spread over the label range), from `model`
    (the plain DiT with the weights to show, e.g. `model_with_weights(model, ema.averaged(s))`) with `spec`
    (default: the default SamplerSpec). `path`: the file, or (with `step`; `ema_std` None = raw weights) the
    folder that gets a `grid_name`. Single process (call it on rank 0); returns the written path (`path`, or
    path-1.png, ... if it exists)."""
    spec = SamplerSpec.of(spec, **spec_fields)
    labels = torch.tensor(class_rows(model.config.num_classes, classes), dtype=torch.long)
    images = sample_images(model, data_meta, labels.repeat_interleave(per_class), spec, seed=seed,
                           batch_size=batch_size, shard=False)
    path = Path(path)
    if step is not None:
        path = path / grid_name(spec, spec.guidance(model.config.null_class), step=step, ema_std=ema_std)
    upscale = max(1, 64 // images.shape[1])
    return save_png(path, image_grid(images, nrow=per_class), upscale=upscale, new=True)


# ------------------------------------------------------------------------------------------------
# Sampling a run (`mapdit sample`, `mapdit demo`)
# ------------------------------------------------------------------------------------------------
def sample_run(result_dir: str | Path, *, class_label: int | None = None, num_samples: int | None = None,
               out: str | None = None, spec: SamplerSpec | None = None, seed: int = 0, batch_size: int = 64,
               weights: str = "ema", ema_std: float | None = None, ckpt: str | None = None,
               device: str | None = None, **spec_fields) -> Path:
    """A grid (PNG: one row per class, or one class) or an ADM-layout npz (`out` ending in .npz) from a run,
    drawn with `spec` (default: the default SamplerSpec, `spec_fields` replaced); returns the path written (on
    every rank but 0: the run folder). `out` None: a PNG in run/samples/ named by `grid_name`.
    Under torchrun the ranks sample their batches and rank 0 writes."""
    spec = SamplerSpec.of(spec, **spec_fields)  # a bad sampler or a missing diffusers: one line, nothing loaded
    for flag, value in (("--batch-size", batch_size), ("--num-samples", num_samples)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be at least 1")
    check_weight_choice(weights, ema_std)
    run_dir = Path(result_dir)
    load_run_config(run_dir)  # a missing or broken run: one line before anything else
    if out:  # where the result goes must take files: fail before the sampling, not after it
        check_outside_training(out)  # never into a run's checkpoints/ or EMA snapshots
        # the format follows the name, and a folder is not a file name (the grid went to /tmp/p1-1 for
        # --out /tmp/p1/, and a .txt got PNG bytes)
        if out.endswith(("/", os.sep)) or Path(out).is_dir():
            raise UserError(f"--out {out} is a folder: name a .png or .npz file (e.g. {Path(out) / 'grid.png'})")
        if Path(out).suffix.lower() != ".png" and Path(out).suffix != ".npz":
            raise UserError(f"--out {out}: name a .png file (a grid) or an .npz file (arr_0 images, arr_1 labels)")
        check_writable(Path(out).parent, "the folder of --out", "choose another --out")
    else:
        check_writable(run_dir / "samples", "the run's samples folder", "pass --out FILE to write elsewhere")
    d = dist_utils.init(device)
    torch.set_flush_denormal(True)  # CPU: denormal floats make every op ~10x slower
    loaded: dict = {}
    model, config, desc = load_model(run_dir, weights=weights, ema_std=ema_std, ckpt=ckpt, device=d.device,
                                     info=loaded)
    cfg = model.config
    names = config["data"].get("class_names") or [str(i) for i in range(cfg.num_classes)]
    if class_label is not None and not 0 <= class_label < cfg.num_classes:
        raise UserError(f"--class-label {class_label} is out of range: this model has classes "
                        f"0..{cfg.num_classes - 1}")
    npz = out is not None and out.endswith(".npz")
    cfg_scale = spec.guidance(cfg.null_class)
    if npz:
        n = num_samples or 1000
        if class_label is not None:
            labels = torch.full((n,), class_label, dtype=torch.long)
        else:
            labels = sample_labels(n, cfg.num_classes, seed)
    elif class_label is not None:
        n = num_samples or 8
        labels = torch.full((n,), class_label, dtype=torch.long)
    else:  # one row per class
        per = num_samples or 8
        labels = torch.arange(cfg.num_classes).repeat_interleave(per)
    if d.is_main:
        print(f"sampling {len(labels)} images from {run_dir} ({desc}); {spec.sampler} {spec.steps} steps, "
              f"cfg {cfg_scale:g}", file=sys.stderr)
    images = sample_images(model, config["data"], labels, spec, seed=seed, batch_size=batch_size,
                           progress=d.is_main)  # (N, H, W, C) uint8 on rank 0, None elsewhere
    if not d.is_main:
        dist_utils.shutdown(d)
        return run_dir
    if npz:
        path = save_npz(Path(out), images, labels.numpy(), new=True)
    else:
        if out:
            path = Path(out)
        else:
            prefix = f"class{class_label}" if class_label is not None else "grid"
            path = run_dir / "samples" / grid_name(spec, cfg_scale, step=loaded["step"],
                                                   ema_std=loaded["ema_std"], prefix=prefix)
        nrow = len(labels) if class_label is not None else (num_samples or 8)
        upscale = max(1, 64 // images.shape[1])
        path = save_png(path, image_grid(images, nrow=min(nrow, 16)), upscale=upscale, new=True)
        if class_label is None:
            print("rows: " + ", ".join(f"{i}={n}" for i, n in enumerate(names)), file=sys.stderr)
    print(path)
    dist_utils.shutdown(d)
    return path
