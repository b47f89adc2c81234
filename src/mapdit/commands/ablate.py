"""`mapdit ablate`: train and score configs x modulations x seeds with one budget; writes the results table."""
from __future__ import annotations

import argparse

import torch

from .. import distributed as dist_utils
from ..experiments.ablate import int_list, parse_list, run_ablation
from ..experiments.budgets import ScoreBudget, TrainBudget
from ..samplers import SAMPLER_CHOICES


def run(args: argparse.Namespace) -> dict:
    torch.set_flush_denormal(True)
    budget = TrainBudget(model=args.model, num_steps=args.num_steps, batch_size=args.batch_size, lr=args.lr,
                         data_path=args.data_path, ema_snapshots=args.ema_snapshots, ckpt_every=args.ckpt_every,
                         log_every=args.log_every, precision=args.precision)
    score = ScoreBudget(fid_samples=args.fid_samples, features=args.features, ref=args.ref, num_ref=args.num_ref,
                        sampler=args.sampler, sampling_steps=args.sampling_steps, cfg_scale=args.cfg_scale,
                        weights=args.weights, ema_std=args.ema_std, sample_batch_size=args.sample_batch_size,
                        magnitude_batch_size=args.magnitude_batch_size)
    summary = run_ablation(budget, score, configs=parse_list(args.configs, "--configs"),
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
    p.add_argument("--model", default="DiT-XS/2")
    p.add_argument("--num-steps", type=int, required=True)
    p.add_argument("--data-path", default="fashion-mnist")
    p.add_argument("--batch-size", "--global-batch-size", dest="batch_size", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 (no weight normalisation) or 1e-2")
    p.add_argument("--seeds", default="0", help="comma-separated training (and sampling) seeds")
    p.add_argument("--fid-samples", type=int, default=10_000)
    p.add_argument("--features", choices=("fmnist", "inception"), default=None,
                   help="default: fmnist for Fashion-MNIST, inception otherwise")
    p.add_argument("--ref", default=None, help="FID reference (default: the training data)")
    p.add_argument("--num-ref", type=int, default=None, help="a fixed random subset of the reference")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default="ddpm",
                   help="ddpm/ancestral, ddim (ours) or dpm++2m, unipc, heun (diffusers' few-step solvers)")
    p.add_argument("--sampling-steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--ema-std", type=float, default=None)
    p.add_argument("--sample-batch-size", type=int, default=64)
    p.add_argument("--magnitude-batch-size", type=int, default=64)
    p.add_argument("--ema-snapshots", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=None, help="default num_steps // 5 (magnitudes per checkpoint)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=None, help="reference statistics cache")
    p.add_argument("--out", default="results/ablation")
    p.set_defaults(func=run, graceful_stop=True)  # SIGTERM/Ctrl-C: the run under way checkpoints, then it stops
