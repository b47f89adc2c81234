"""`mapdit magnitudes`: activation and weight magnitudes per block for every checkpoint of a run."""
from __future__ import annotations

import argparse
import sys

import torch

from ..evaluate.magnitudes import DEFAULT_T, measure_run


def run(args: argparse.Namespace) -> dict:
    torch.set_flush_denormal(True)
    out = measure_run(args.run, batch_size=args.batch_size, seed=args.seed, weights=args.weights,
                      ema_std=args.ema_std, t=args.t, device=args.device,
                      log=lambda m: print(m, file=sys.stderr))
    print(out["csv"])
    return out


def register(sub) -> None:
    p = sub.add_parser("magnitudes", help="activation and weight magnitudes per block for every checkpoint "
                                          "of a run (the paper's Figure 5)")
    p.add_argument("--run", "--result-dir", dest="run", required=True, metavar="RUN",
                   help="a run folder made by training, e.g. results/000-DiT-S-2 (also: --result-dir)")
    p.add_argument("--batch-size", type=int, default=64, help="images in the fixed batch")
    p.add_argument("--seed", type=int, default=0, help="picks the images and the noise of the fixed batch")
    p.add_argument("--weights", choices=("raw", "ema"), default="raw", help="raw trained weights or an EMA")
    p.add_argument("--ema-std", type=float, default=None, help="with --weights ema: a tracked width "
                                                                 "(default the smallest)")
    p.add_argument("--t", type=int, default=DEFAULT_T, help="diffusion step the batch is noised to")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.set_defaults(func=run)
