"""Sampling from a run: PNG grids to look at, and ADM-layout npz files (arr_0 images, arr_1 labels) for FID.

Reproducible by construction: sample i belongs to batch i // batch_size, and batch b's noise comes from a
generator seeded by (seed, b). So the same seed gives the same images whatever the batching across ranks.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import distributed as dist_utils
from .data import clip_denoised_for, decoder_for
from .errors import UserError
from .runio import atomic_write, check_writable, load_run_config
from .samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, check_sampler
from .samplers import sample as run_sampler
from .weights import check_weight_choice, load_model


def batch_generator(seed: int, batch_index: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)


@torch.no_grad()
def generate(model, labels: torch.Tensor, *, sampler: str = "ddpm", steps: int = 250, cfg_scale: float = 1.0,
             seed: int = 0, batch_size: int = 64, guide_channels: int | None = None, eta: float = 0.0,
             progress: bool = False, rank: int = 0, world_size: int = 1,
             clip_denoised: bool = False) -> dict[int, torch.Tensor]:
    """Samples in model space for `labels` (N,): {batch index: (B, C, H, W)} for this rank's batches
    (batches rank, rank + world_size, ...). `clip_denoised`: clip x0 estimates to [-1, 1] (pixel data)."""
    cfg = model.config
    device = next(model.parameters()).device
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if cfg_scale != 1.0 and cfg.null_class is None:
        raise UserError("this model was trained without label dropout (no null class): use --cfg-scale 1")
    out = {}
    batches = range(rank, math.ceil(len(labels) / batch_size), world_size)
    for b in tqdm(batches, disable=not progress, unit="batch", desc="sampling"):
        y = labels[b * batch_size:(b + 1) * batch_size].to(device)
        g = batch_generator(seed, b, device)
        noise = torch.randn((len(y), *shape), generator=g, device=device)
        out[b] = run_sampler(model, shape=(len(y), *shape), y=y, sampler=sampler, steps=steps, eta=eta,
                             cfg_scale=cfg_scale, null_class=cfg.null_class, guide_channels=guide_channels,
                             generator=g, noise=noise, num_train_steps=cfg.num_train_steps,
                             learn_sigma=cfg.learn_sigma, clip_denoised=clip_denoised).cpu()
    return out


def sample_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """Uniform class labels from `seed` (the rule of `mapdit sample --out x.npz` and of the FID samples)."""
    return torch.randint(0, num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_images(model, data_meta: dict, labels: torch.Tensor, *, sampler: str = "ddpm", steps: int = 250,
                  cfg_scale: float = 1.0, seed: int = 0, batch_size: int = 64, progress: bool = False):
    """uint8 images (N, H, W, C) numpy for `labels` on rank 0 (None on other ranks): every rank samples
    and decodes its own batches, then they are gathered once. The model's train/eval mode is restored."""
    rank, world = dist_utils.rank_and_world()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        decode = decoder_for(data_meta, device)
        parts = generate(model, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                         batch_size=batch_size, progress=progress and rank == 0, rank=rank, world_size=world,
                         clip_denoised=clip_denoised_for(data_meta))
        parts = {b: decode(x.to(device)).cpu().numpy() for b, x in parts.items()}
    finally:
        model.train(was_training)
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


def sample_grid_from_model(model, data_meta: dict, path: str | Path, *, per_class: int = 8,
                           classes: list[int] | None = None, sampler: str = "ddpm", steps: int = 50,
                           cfg_scale: float | None = None, seed: int = 0, batch_size: int = 64) -> Path:
    """A PNG grid, one row per class (default: up to 10 classes spread over the label range), from `model`
    (the plain DiT with the weights to show, e.g. `model_with_weights(model, ema.averaged(s))`).
    cfg_scale None: 4 when the model has a null class, else 1. Single process (call it on rank 0);
    returns the written path (`path`, or path-1.png, ... if it exists)."""
    cfg = model.config
    if classes is None:
        k = min(cfg.num_classes, 10)
        classes = sorted({round(i * (cfg.num_classes - 1) / max(k - 1, 1)) for i in range(k)})
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    scale = (4.0 if cfg.null_class is not None else 1.0) if cfg_scale is None else cfg_scale
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        parts = generate(model, labels, sampler=sampler, steps=steps, cfg_scale=scale, seed=seed,
                         batch_size=batch_size, clip_denoised=clip_denoised_for(data_meta))
        x = torch.cat([parts[b] for b in sorted(parts)])
        images = decoder_for(data_meta, device)(x.to(device)).cpu().numpy()
    finally:
        model.train(was_training)
    upscale = max(1, 64 // images.shape[1])
    return save_png(Path(path), image_grid(images, nrow=per_class), upscale=upscale, new=True)


# ------------------------------------------------------------------------------------------------
# Sampling a run (`mapdit sample`, `mapdit demo`)
# ------------------------------------------------------------------------------------------------
def sample_run(result_dir: str | Path, *, class_label: int | None = None, num_samples: int | None = None,
               out: str | None = None, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
               cfg_scale: float | None = None,
               guide_channels: int | None = None, clip_denoised: str = "auto", seed: int = 0,
               batch_size: int = 64, weights: str = "ema", ema_std: float | None = None, ckpt: str | None = None,
               device: str | None = None) -> Path:
    """A grid (PNG: one row per class, or one class) or an ADM-layout npz (`out` ending in .npz) from a run;
    returns the path written (on every rank but 0: the run folder). `out` None: a PNG in run/samples/.
    Under torchrun the ranks sample their batches and rank 0 writes."""
    check_sampler(sampler)  # an unknown name or a missing diffusers: one line before anything is loaded
    for flag, value in (("--steps", steps), ("--batch-size", batch_size), ("--num-samples", num_samples)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be at least 1")
    check_weight_choice(weights, ema_std)
    run_dir = Path(result_dir)
    load_run_config(run_dir)  # a missing or broken run: one line before anything else
    if out:  # where the result goes must take files: fail before the sampling, not after it
        check_writable(Path(out).parent, "the folder of --out", "choose another --out")
    else:
        check_writable(run_dir / "samples", "the run's samples folder", "pass --out FILE to write elsewhere")
    d = dist_utils.init(device)
    torch.set_flush_denormal(True)  # CPU: denormal floats make every op ~10x slower
    model, config, desc = load_model(run_dir, weights=weights, ema_std=ema_std, ckpt=ckpt, device=d.device)
    cfg = model.config
    names = config["data"].get("class_names") or [str(i) for i in range(cfg.num_classes)]
    if class_label is not None and not 0 <= class_label < cfg.num_classes:
        raise UserError(f"--class-label {class_label} is out of range: this model has classes "
                        f"0..{cfg.num_classes - 1}")
    npz = out is not None and out.endswith(".npz")
    clip = clip_denoised_for(config["data"]) if clip_denoised == "auto" else clip_denoised == "yes"
    cfg_scale = cfg_scale if cfg_scale is not None else (1.0 if npz else 4.0)
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
        print(f"sampling {len(labels)} images from {run_dir} ({desc}); {sampler} {steps} steps, "
              f"cfg {cfg_scale}", file=sys.stderr)
    parts = generate(model, labels, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
                     batch_size=batch_size, guide_channels=guide_channels, progress=d.is_main,
                     rank=d.rank, world_size=d.world_size, clip_denoised=clip)
    parts = dist_utils.gather_on_main(parts)  # every rank's batches on rank 0, once
    if not d.is_main:
        dist_utils.shutdown(d)
        return run_dir
    x = torch.cat([parts[b] for b in sorted(parts)])
    images = decoder_for(config["data"], d.device)(x).numpy()  # (N, H, W, C) uint8
    if npz:
        path = save_npz(Path(out), images, labels.numpy(), new=True)
    else:
        if out:
            path = Path(out)
        else:
            tag = f"class{class_label}" if class_label is not None else "per-class"
            path = run_dir / "samples" / f"{tag}-{sampler}{steps}-cfg{cfg_scale:g}.png"
        nrow = len(labels) if class_label is not None else (num_samples or 8)
        upscale = max(1, 64 // images.shape[1])
        path = save_png(path, image_grid(images, nrow=min(nrow, 16)), upscale=upscale, new=True)
        if class_label is None:
            print("rows: " + ", ".join(f"{i}={n}" for i, n in enumerate(names)), file=sys.stderr)
    print(path)
    dist_utils.shutdown(d)
    return path
