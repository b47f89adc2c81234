"""`mapdit ablate`: train and score configs x modulations x seeds with one budget; writes the results table.
The training and scoring options are generated from TrainBudget and ScoreBudget (mapdit.options)."""
from __future__ import annotations

import argparse

import torch

from .. import distributed as dist_utils
from ..experiments.ablate import int_list, parse_list, run_ablation
from ..experiments.budgets import ScoreBudget, TrainBudget
from .options import add_options, from_args


def run(args: argparse.Namespace) -> dict:
    torch.set_flush_denormal(True)
    summary = run_ablation(from_args(TrainBudget, args), from_args(ScoreBudget, args),
                           configs=parse_list(args.configs, "--configs"),
                           modulations=parse_list(args.modulations, "--modulations"),
                           seeds=int_list(args.seeds, "--seeds"), out=args.out, device=args.device,
                           cache_dir=args.cache_dir)
    if "table_md" in summary:
        print(summary["table_md"])
    dist_utils.shutdown(dist_utils.init(args.device))
    return summary


def register(sub) -> None:
    p = sub.add_parser("ablate", help="train and score configs x modulations x seeds with one budget; "
                                      "writes the results table (resumable, also under torchrun)")
    p.add_argument("--configs", default="A,B,C,D,E", help="comma-separated presets, e.g. A,E")
    p.add_argument("--modulations", default="adaln", help="comma-separated, e.g. adaln,scale,scale+rotate")
    p.add_argument("--seeds", default="0", help="comma-separated training (and sampling) seeds")
    add_options(p, TrainBudget, group="training (every variant)")
    add_options(p, ScoreBudget, group="scoring (every variant)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--cache-dir", default=None,
                   help="reference statistics cache (default: $MAPDIT_CACHE/fid-stats, else ~/.cache/mapdit/fid-stats)")
    p.add_argument("--out", default="results/ablation", help="the ablation's folder: runs, results, table")
    p.set_defaults(func=run, graceful_stop=True)  # SIGTERM/Ctrl-C: the run under way checkpoints, then it stops
