"""Sampling from a run: PNG grids to look at, and ADM-layout npz files (arr_0 images, arr_1 labels) for FID.

Reproducible by construction: sample i belongs to batch i // batch_size, and batch b's noise comes from a
generator seeded by (seed, b). So the same seed gives the same images whatever the batching across ranks.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist_utils
from .data import clip_denoised_for, decoder_for
from .errors import UserError
from .runio import atomic_write, check_writable, load_run_config
from .samplers import SAMPLER_CHOICES, check_sampler
from .samplers import sample as run_sampler
from .weights import load_model


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
    from tqdm.auto import tqdm

    for b in tqdm(batches, disable=not progress, unit="batch", desc="sampling"):
        y = labels[b * batch_size:(b + 1) * batch_size].to(device)
        g = batch_generator(seed, b, device)
        noise = torch.randn((len(y), *shape), generator=g, device=device)
        out[b] = run_sampler(model, shape=(len(y), *shape), y=y, sampler=sampler, steps=steps, eta=eta,
                             cfg_scale=cfg_scale, null_class=cfg.null_class, guide_channels=guide_channels,
                             generator=g, noise=noise, num_train_steps=cfg.num_train_steps,
                             learn_sigma=cfg.learn_sigma, clip_denoised=clip_denoised).cpu()
    return out


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
    from PIL import Image

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


# ------------------------------------------------------------------------------------------------
# `mapdit sample` and the seed's `python sample.py`
# ------------------------------------------------------------------------------------------------
def cmd_sample(args: argparse.Namespace) -> Path:
    check_sampler(args.sampler)  # an unknown name or a missing diffusers: one line before anything is loaded
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--num-samples", args.num_samples)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} must be at least 1")
    if args.weights == "raw" and args.ema_std is not None:
        raise UserError("--ema-std chooses an EMA width, which contradicts --weights raw: drop one of them")
    run_dir = Path(args.result_dir)
    load_run_config(run_dir)  # a missing or broken run: one line before anything else
    if args.out:  # where the result goes must take files: fail before the sampling, not after it
        check_writable(Path(args.out).parent, "the folder of --out", "choose another --out")
    else:
        check_writable(run_dir / "samples", "the run's samples folder", "pass --out FILE to write elsewhere")
    d = dist_utils.init(args.device)
    torch.set_flush_denormal(True)  # CPU: denormal floats make every op ~10x slower
    model, config, desc = load_model(run_dir, weights=args.weights, ema_std=args.ema_std, ckpt=args.ckpt,
                                     device=d.device)
    cfg = model.config
    names = config["data"].get("class_names") or [str(i) for i in range(cfg.num_classes)]
    if args.class_label is not None and not 0 <= args.class_label < cfg.num_classes:
        raise UserError(f"--class-label {args.class_label} is out of range: this model has classes "
                        f"0..{cfg.num_classes - 1}")
    npz = args.out is not None and args.out.endswith(".npz")
    clip = clip_denoised_for(config["data"]) if args.clip_denoised == "auto" else args.clip_denoised == "yes"
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else (1.0 if npz else 4.0)
    if npz:
        n = args.num_samples or 1000
        if args.class_label is not None:
            labels = torch.full((n,), args.class_label, dtype=torch.long)
        else:
            labels = torch.randint(0, cfg.num_classes, (n,), generator=torch.Generator().manual_seed(args.seed))
    elif args.class_label is not None:
        n = args.num_samples or 8
        labels = torch.full((n,), args.class_label, dtype=torch.long)
    else:  # one row per class
        per = args.num_samples or 8
        labels = torch.arange(cfg.num_classes).repeat_interleave(per)
    if d.is_main:
        print(f"sampling {len(labels)} images from {run_dir} ({desc}); {args.sampler} {args.steps} steps, "
              f"cfg {cfg_scale}", file=sys.stderr)
    parts = generate(model, labels, sampler=args.sampler, steps=args.steps, cfg_scale=cfg_scale, seed=args.seed,
                     batch_size=args.batch_size, guide_channels=args.guide_channels, progress=d.is_main,
                     rank=d.rank, world_size=d.world_size,
                     clip_denoised=clip)
    if d.enabled:  # gather every rank's batches on rank 0, once
        gathered = [None] * d.world_size
        torch.distributed.all_gather_object(gathered, parts)
        parts = {k: v for part in gathered for k, v in part.items()}
    if not d.is_main:
        dist_utils.shutdown(d)
        return run_dir
    x = torch.cat([parts[b] for b in sorted(parts)])
    images = decoder_for(config["data"], d.device)(x).numpy()  # (N, H, W, C) uint8
    if npz:
        path = save_npz(Path(args.out), images, labels.numpy(), new=True)
    else:
        if args.out:
            path = Path(args.out)
        else:
            tag = f"class{args.class_label}" if args.class_label is not None else "per-class"
            path = run_dir / "samples" / f"{tag}-{args.sampler}{args.steps}-cfg{cfg_scale:g}.png"
        nrow = len(labels) if args.class_label is not None else (args.num_samples or 8)
        upscale = max(1, 64 // images.shape[1])
        path = save_png(path, image_grid(images, nrow=min(nrow, 16)), upscale=upscale, new=True)
        if args.class_label is None:
            print("rows: " + ", ".join(f"{i}={n}" for i, n in enumerate(names)), file=sys.stderr)
    print(path)
    dist_utils.shutdown(d)
    return path


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--result-dir", required=True, help="a run folder made by training")
    p.add_argument("--class-label", type=int, default=None, help="one class (default: one row per class)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="images per class row / of the class / in the npz (defaults 8, 8, 1000)")
    p.add_argument("--out", default=None, help="output .png, or .npz for arr_0 (N,H,W,C uint8) + arr_1 labels")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default="ddpm",
                   help="ddpm (= ancestral) and ddim are ours; dpm++2m, unipc and heun are diffusers' ODE solvers "
                        "(few-step: e.g. --sampler dpm++2m --steps 20; heun makes 2*steps-1 model calls)")
    p.add_argument("--steps", "--num-sampling-steps", dest="steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default 4 for grids, 1 for npz)")
    p.add_argument("--guide-channels", type=int, default=None,
                   help="guide only the first K channels (3 reproduces the original DiT); default all")
    p.add_argument("--clip-denoised", choices=("auto", "yes", "no"), default="auto",
                   help="clip x0 estimates to [-1, 1]: auto = yes for pixel data (as ADM), no for latents (as DiT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--ema-std", type=float, default=None,
                   help="EMA width: a tracked one, or any other (reconstructed post hoc and cached)")
    p.add_argument("--ckpt", default=None, help="a checkpoint file (default: the newest complete one)")
    p.add_argument("--device", default=None)


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample a grid (PNG) or an ADM-layout npz from a trained run")
    add_sample_args(p)
    p.set_defaults(func=cmd_sample)


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(["sample", *(sys.argv[1:] if argv is None else argv)])
