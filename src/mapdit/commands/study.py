"""`mapdit study`: the paper's study on Fashion-MNIST in one resumable command; writes RESULTS.md."""
from __future__ import annotations

import argparse
import json

import torch

from ..errors import UserError
from ..experiments.ablate import int_list, parse_list
from ..experiments.budgets import CONFIGS, FULL, LRS, MODULATIONS, QUICK, STUDIES
from ..experiments.results import write_results_md
from ..experiments.study import run_study
from ..samplers import SAMPLER_CHOICES


def run(args: argparse.Namespace) -> dict:
    torch.set_flush_denormal(True)
    if args.report_only:
        md = write_results_md(args.out, args.results_md, args.docs_dir)
        print(md)
        return {"studies": {}, "results_md": md}
    try:
        lrs = [float(x) for x in parse_list(args.lrs, "--lrs")]
    except ValueError:
        raise UserError(f"--lrs {args.lrs!r}: give comma-separated numbers, e.g. 1e-4,1e-3,1e-2") from None
    summary = run_study(
        out=args.out, quick=args.quick, studies=parse_list(args.studies, "--studies"), model=args.model,
        num_steps=args.num_steps, batch_size=args.batch_size,
        seeds=None if args.seeds is None else int_list(args.seeds, "--seeds"), fid_samples=args.fid_samples,
        sampler=args.sampler, sampling_steps=args.sampling_steps, ema_sweep=args.ema_sweep,
        configs=[c.upper() for c in parse_list(args.configs, "--configs")],
        modulations=parse_list(args.modulations, "--modulations"), lrs=lrs, num_ref=args.num_ref,
        ema_snapshots=args.ema_snapshots, sample_batch_size=args.sample_batch_size,
        magnitude_batch_size=args.magnitude_batch_size, log_every=args.log_every, device=args.device,
        cache_dir=args.cache_dir, results_md=args.results_md, docs_dir=args.docs_dir)
    print(json.dumps({k: {kk: len(vv) for kk, vv in v.items()} for k, v in summary["studies"].items()}))
    if summary["results_md"] is not None:
        print(summary["results_md"])
    return summary


def register(sub) -> None:
    p = sub.add_parser("study", help="the paper's study on Fashion-MNIST (configs, modulation, lr, post-hoc "
                                     "EMA, sample grid) in one resumable command; writes RESULTS.md")
    p.add_argument("--quick", action="store_true",
                   help=f"~10 min on 2 cores: {QUICK['model']}, {QUICK['num_steps']} steps, batch "
                        f"{QUICK['batch_size']}, 1 seed (not evidence); default: {FULL['num_steps']} steps, "
                        f"batch {FULL['batch_size']}, seeds 0,1,2")
    p.add_argument("--out", default="results/study")
    p.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated subset of {','.join(STUDIES)}")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --quick: 0)")
    p.add_argument("--model", default=None, help=f"default {FULL['model']}")
    p.add_argument("--num-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--fid-samples", type=int, default=None)
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None,
                   help="default ddim; dpm++2m, unipc, heun are diffusers' few-step solvers")
    p.add_argument("--sampling-steps", type=int, default=None)
    p.add_argument("--ema-sweep", default=None, help=f"post-hoc EMA widths (default {FULL['ema_sweep']})")
    p.add_argument("--configs", default=",".join(CONFIGS), help="configs of the configs study")
    p.add_argument("--modulations", default=",".join(MODULATIONS), help="modulations of the modulation study")
    p.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS), help="rates of the lr study")
    p.add_argument("--num-ref", type=int, default=None, help="a fixed random subset of the test images")
    p.add_argument("--ema-snapshots", type=int, default=100)
    p.add_argument("--sample-batch-size", type=int, default=64)
    p.add_argument("--magnitude-batch-size", type=int, default=64)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=None, help="reference statistics cache")
    p.add_argument("--results-md", default="RESULTS.md")
    p.add_argument("--docs-dir", default="docs/results", help="where RESULTS.md's PNGs are copied")
    p.add_argument("--report-only", action="store_true", help="only regenerate RESULTS.md from --out")
    p.set_defaults(func=run)
