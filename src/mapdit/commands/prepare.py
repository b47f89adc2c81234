"""`mapdit prepare`: encode an image folder into VAE latent shards for training."""
from __future__ import annotations

import argparse

from ..data.prepare import DEFAULT_SHARD_SIZE, SMALL_RULES, prepare_latents


def run(args: argparse.Namespace) -> None:
    prepare_latents(
        args.image_folder, args.out, args.resolution, args.vae, batch_size=args.batch_size,
        num_workers=args.num_workers, flip=args.flip, shard_size=args.shard_size, device=args.device,
        progress=not args.no_progress, small_images=args.small_images, wait_timeout=args.wait_timeout,
    )


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="encode an image folder into VAE latents for training",
        description="Encode a class-per-subfolder image folder with a diffusers AutoencoderKL into "
                    "resumable latent shards plus latents.json (pass the --out folder as the training data). "
                    "Under torchrun every rank encodes its share of the shards.")
    p.add_argument("--image-folder", required=True, metavar="PATH", help="root/<class name>/<images>")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (rerun with it to resume)")
    p.add_argument("--resolution", required=True, type=int, help="image side, a multiple of 8 (128, 256, ...)")
    p.add_argument("--vae", required=True, metavar="ID|DIR",
                   help="hub id (e.g. stabilityai/sd-vae-ft-ema) or a folder saved with save_pretrained")
    p.add_argument("--batch-size", type=int, default=32, help="VAE batch (entries per forward)")
    p.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes")
    p.add_argument("--flip", action="store_true", help="also store the horizontally flipped images")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="files per shard")
    p.add_argument("--small-images", choices=SMALL_RULES, default="skip",
                   help="images with short side < resolution: skip (default, reported) or upscale (ADM)")
    p.add_argument("--device", default=None, help="default: cuda (LOCAL_RANK) if available, else cpu")
    p.add_argument("--wait-timeout", type=float, default=3600.0,
                   help="rank 0: seconds without a new shard from other ranks before giving up")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
