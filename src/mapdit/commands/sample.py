"""`mapdit sample` (also the seed paper's `python sample.py`): a grid (PNG) or an ADM-layout npz from a
run."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..sample import sample_run
from ..samplers import SamplerSpec
from .options import add_options, from_args


def run(args: argparse.Namespace) -> Path:
    return sample_run(args.run, class_label=args.class_label, num_samples=args.num_samples, out=args.out,
                      spec=from_args(SamplerSpec, args), seed=args.seed,
                      batch_size=args.batch_size, weights=args.weights, ema_std=args.ema_std, ckpt=args.ckpt,
                      device=args.device)


def add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", "--result-dir", dest="run", required=True, metavar="RUN",
                   help="a run folder made by training, e.g. results/000-DiT-S-2 (also: --result-dir)")
    p.add_argument("--class-label", type=int, default=None, help="one class (default: one row per class)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="images per class row / of the class / in the npz (defaults 8, 8, 1000)")
    p.add_argument("--out", default=None, help="output .png, or .npz for arr_0 (N,H,W,C uint8) + arr_1 labels")
    add_options(p, SamplerSpec, group="sampling (one default with mapdit fid and the Python API)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (sample i gets batch i // --batch-size's)")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampling batch")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema", help="EMA weights or the raw trained ones")
    p.add_argument("--ema-std", type=float, default=None,
                   help="EMA width: a tracked one, or any other (reconstructed post hoc and cached)")
    p.add_argument("--ckpt", default=None, help="a checkpoint: a path, a name in the run's checkpoints/ or a step "
                                                   "(default: the newest complete one)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample a grid (PNG) or an ADM-layout npz from a trained run")
    add_sample_args(p)
    p.set_defaults(func=run)
