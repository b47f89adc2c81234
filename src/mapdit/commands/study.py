"""`mapdit study`: the paper's claims judged on samples, on Fashion-MNIST, in one resumable command (parts
rates, components, modulation, seeds, magnitudes, grid); writes RESULTS.md."""
from __future__ import annotations

import argparse
import json

import torch

from .. import signals
from ..errors import UserError
from ..experiments.ablate import int_list, parse_list
from ..experiments.budgets import CONFIGS, FULL, HELDOUT_IMAGES, MODULATIONS, PARTS, QUICK, component_arms
from ..experiments.results import check_study_folder, write_results_md
from ..experiments.study import RunOptions, run_study
from ..samplers import SAMPLER_CHOICES


def parse_rates(text: str) -> dict[str, list[float]]:
    """'A=1e-4/1e-2,E=1e-2' -> {"A": [1e-4, 1e-2], "E": [1e-2]}."""
    rates = {}
    for item in [t.strip() for t in str(text).split(",") if t.strip()]:
        config, _, values = item.partition("=")
        config = config.strip().upper()
        try:
            parsed = [float(v) for v in values.split("/") if v.strip()]
        except ValueError:
            parsed = []
        if config not in CONFIGS or not parsed or config in rates or any(not (0 < v < 1) for v in parsed):
            raise UserError(f"--rates {text!r}: give CONFIG=rate/rate/..., comma-separated, e.g. A=1e-4/1e-2,E=3e-2")
        rates[config] = parsed
    return rates


def run(args: argparse.Namespace) -> dict:
    torch.set_flush_denormal(True)
    components = None if args.components is None else parse_list(args.components, "--components")
    modulations = parse_list(args.modulations, "--modulations")
    if args.report_only:
        signals.release()  # nothing to stop gracefully: the usual handling
        check_study_folder(args.out)
        md = write_results_md(args.out, args.results_md, args.docs_dir, components, modulations)
        print(md)
        return {"studies": {}, "results_md": md}
    opts = RunOptions(ema_snapshots=args.ema_snapshots, log_every=args.log_every,
                      sample_batch_size=args.sample_batch_size, magnitude_batch_size=args.magnitude_batch_size,
                      device=args.device, cache_dir=args.cache_dir)
    summary = run_study(
        out=args.out, quick=args.quick, studies=parse_list(args.studies, "--studies"), model=args.model,
        num_steps=args.num_steps, batch_size=args.batch_size,
        seeds=None if args.seeds is None else int_list(args.seeds, "--seeds"), fid_samples=args.fid_samples,
        sampler=args.sampler, sampling_steps=args.sampling_steps, cfg_scale=args.cfg_scale,
        checkpoints=None if args.checkpoints is None else int_list(args.checkpoints, "--checkpoints"),
        heldout_images=args.heldout_images, rates=None if args.rates is None else parse_rates(args.rates),
        configs=[c.upper() for c in parse_list(args.configs, "--configs")], components=components,
        modulations=modulations, num_ref=args.num_ref, min_snr_gamma=args.min_snr_gamma, opts=opts,
        workers=args.workers, results_md=True if args.results_md is None else args.results_md,
        docs_dir=args.docs_dir)
    print(json.dumps({k: {kk: len(vv) for kk, vv in v.items()} for k, v in summary["studies"].items()}))
    if summary["results_md"] is not None:
        print(summary["results_md"])
    return summary


def register(sub) -> None:
    p = sub.add_parser("study", help="the paper's claims on Fashion-MNIST: rates, components, modulation, seeds, "
                                     "magnitudes, grid, in one resumable command; writes RESULTS.md")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke test on 2 cores: {QUICK.num_steps} steps of batch {QUICK.batch_size}, one seed "
                        f"(not evidence); default: {FULL.model}, {FULL.num_steps} steps of batch {FULL.batch_size}, "
                        f"seeds {','.join(map(str, FULL.seeds))}")
    p.add_argument("--out", default="results/study")
    p.add_argument("--studies", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--seeds", default=None, help="seeds of the seeds part (the first one: every other part; "
                                                 "default 0,1,2; --quick: 0)")
    p.add_argument("--model", default=None, help=f"default {FULL.model}")
    p.add_argument("--num-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--fid-samples", type=int, default=None, help=f"default {FULL.fid_samples}")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None, help=f"default {FULL.sampler}")
    p.add_argument("--sampling-steps", type=int, default=None, help=f"default {FULL.sampling_steps}")
    p.add_argument("--cfg-scale", type=float, default=None, help=f"default {FULL.cfg_scale:g}, on every channel")
    p.add_argument("--checkpoints", default=None,
                   help="kept checkpoints (Figure 5), the last = --num-steps (default "
                        f"{','.join(map(str, FULL.checkpoints))})")
    p.add_argument("--heldout-images", type=int, default=None,
                   help=f"test images of the held-out ε-MSE (default {HELDOUT_IMAGES})")
    p.add_argument("--rates", default=None, help="rate brackets replacing the default ones, e.g. A=1e-4/1e-2,E=3e-2")
    p.add_argument("--configs", default=",".join(CONFIGS), help="configs of the rates part")
    p.add_argument("--components", default=None, help="variants of the components part (default all: "
                                                      + ",".join(component_arms()) + ")")
    p.add_argument("--modulations", default=",".join(MODULATIONS),
                   help="modulations of the modulation part (per-modulator gains; adaln is the reference)")
    p.add_argument("--num-ref", type=int, default=None, help="a fixed random subset of the test images")
    p.add_argument("--min-snr-gamma", type=float, default=None,
                   help=f"Min-SNR-gamma loss weighting of every run (default {FULL.min_snr_gamma}; 0: DiT's "
                        "unweighted eps-MSE)")
    p.add_argument("--ema-snapshots", type=int, default=RunOptions.ema_snapshots)
    p.add_argument("--sample-batch-size", type=int, default=RunOptions.sample_batch_size)
    p.add_argument("--magnitude-batch-size", type=int, default=RunOptions.magnitude_batch_size)
    p.add_argument("--log-every", type=int, default=RunOptions.log_every)
    p.add_argument("--workers", type=int, default=1,
                   help="runs trained at once, each on its share of the cores (2 on 2 cores: ~1.25x the runs per "
                        "hour for the demo model; progress bars off, one line per run)")
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=None, help="reference statistics cache")
    p.add_argument("--results-md", default=None,
                   help="where the report goes (default: RESULTS.md inside --out); an existing file is replaced "
                        "only if this study wrote it (e.g. --results-md RESULTS.md to update the repository's)")
    p.add_argument("--docs-dir", default=None,
                   help="where the report's PNGs are copied (default: none, they are linked inside --out)")
    p.add_argument("--report-only", action="store_true", help="only regenerate the report from --out")
    p.set_defaults(func=run, graceful_stop=True)  # SIGTERM/Ctrl-C: the run under way checkpoints, then the study stops
