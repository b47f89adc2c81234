"""`mapdit ema`: reconstruct (and cache) the EMA of any width from a run's snapshots after training."""
from __future__ import annotations

import argparse

from ..ema import parse_sweep
from ..errors import UserError
from ..weights import posthoc_ema


def run(args: argparse.Namespace) -> None:
    if args.ema_std is None and args.sweep is None:
        raise UserError("give --ema-std S (e.g. 0.08) or --sweep START:STOP:STEP")
    if args.sweep is not None and args.out:
        raise UserError("--out names one file: use it with --ema-std, not with --sweep")
    widths = parse_sweep(args.sweep) if args.sweep else [args.ema_std]
    for sigma in widths:
        path, _ = posthoc_ema(args.run, sigma, args.step, args.out)
        print(path)


def register(sub) -> None:
    p = sub.add_parser("ema", help="reconstruct the EMA of any width from a run's snapshots (post-hoc EMA)")
    p.add_argument("--run", "--result-dir", dest="run", required=True, metavar="RUN",
                   help="a run folder made by training, e.g. results/000-DiT-S-2 (also: --result-dir)")
    p.add_argument("--ema-std", "--std", dest="ema_std", type=float, default=None,
                   help="EMA width sigma_rel to reconstruct, e.g. 0.08 (also: --std)")
    p.add_argument("--sweep", default=None, help="START:STOP:STEP, e.g. 0.03:0.15:0.01")
    p.add_argument("--step", type=int, default=None, help="training step (default: the last snapshot)")
    p.add_argument("--out", default=None, help="output file (default: cached in the run's ema/posthoc/)")
    p.set_defaults(func=run)
