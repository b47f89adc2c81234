"""`mapdit ema`: reconstruct (and cache) the EMA of any width from a run's snapshots after training."""
from __future__ import annotations

import argparse

from ..ema import parse_sweep
from ..errors import UserError
from ..weights import posthoc_ema


def run(args: argparse.Namespace) -> None:
    if args.std is None and args.sweep is None:
        raise UserError("give --std S or --sweep START:STOP:STEP")
    if args.sweep is not None and args.out:
        raise UserError("--out names one file: use it with --std, not with --sweep")
    widths = parse_sweep(args.sweep) if args.sweep else [args.std]
    for sigma in widths:
        path, _ = posthoc_ema(args.result_dir, sigma, args.step, args.out)
        print(path)


def register(sub) -> None:
    p = sub.add_parser("ema", help="reconstruct the EMA of any width from a run's snapshots (post-hoc EMA)")
    p.add_argument("--result-dir", required=True)
    p.add_argument("--std", type=float, default=None, help="sigma_rel of the EMA to reconstruct, e.g. 0.08")
    p.add_argument("--sweep", default=None, help="START:STOP:STEP, e.g. 0.03:0.15:0.01")
    p.add_argument("--step", type=int, default=None, help="training step (default: the last snapshot)")
    p.add_argument("--out", default=None, help="output file (default: cached in the run's ema/posthoc/)")
    p.set_defaults(func=run)
