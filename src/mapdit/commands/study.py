"""`mapdit study`: the paper's claims judged on samples, on Fashion-MNIST, in one resumable command (parts
rates, components, modulation, seeds, magnitudes, grid); writes RESULTS.md inside --out (or at --results-md)."""
from __future__ import annotations

import argparse
import json

import torch

from .. import signals
from ..experiments.ablate import parse_list
from ..experiments.budgets import CONFIGS, FULL, MODULATIONS, PARTS, QUICK, StudyBudget, component_arms, format_rates
from ..experiments.results import check_study_folder, write_results_md
from ..experiments.study import RunOptions, run_study
from .options import add_options, from_args, given


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
    summary = run_study(
        out=args.out, quick=args.quick, studies=parse_list(args.studies, "--studies"),
        **given(args, StudyBudget),  # the budget options typed; the others are FULL's (QUICK's with --quick)
        configs=[c.upper() for c in parse_list(args.configs, "--configs")], components=components,
        modulations=modulations, opts=from_args(RunOptions, args), workers=args.workers,
        results_md=True if args.results_md is None else args.results_md, docs_dir=args.docs_dir)
    print(json.dumps({k: {kk: len(vv) for kk, vv in v.items()} for k, v in summary["studies"].items()}))
    if summary["results_md"] is not None:
        print(summary["results_md"])
    return summary


def _shown(value) -> str:
    """A budget value as the option takes it."""
    if isinstance(value, dict):
        return format_rates(value)
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _quick_defaults(group) -> None:
    """Each budget option whose --quick value differs from the full study's says so in its help."""
    for action in group._group_actions:
        quick, full = getattr(QUICK, action.dest, None), getattr(FULL, action.dest, None)
        if quick != full:
            action.help += f" (--quick: {_shown(quick).replace('%', '%%')})"


def register(sub) -> None:
    p = sub.add_parser("study", help="the paper's claims on Fashion-MNIST: rates, components, modulation, seeds, "
                                     "magnitudes, grid, in one resumable command; writes RESULTS.md")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke test on 2 cores: {QUICK.num_steps} steps of batch {QUICK.batch_size}, one seed "
                        f"(not evidence); default: {FULL.model}, {FULL.num_steps} steps of batch {FULL.batch_size}, "
                        f"seeds {','.join(map(str, FULL.seeds))}")
    p.add_argument("--out", default="results/study",
                   help="the study's folder: its runs, study.json, the report and its figures")
    p.add_argument("--studies", default=",".join(PARTS), help="the parts to run, comma-separated")
    p.add_argument("--configs", default=",".join(CONFIGS), help="configs of the rates part")
    p.add_argument("--components", default=None, help="variants of the components part (default all: "
                                                      + ",".join(component_arms()) + ")")
    p.add_argument("--modulations", default=",".join(MODULATIONS),
                   help="modulations of the modulation part (per-modulator gains; adaln is the reference)")
    budget = p.add_argument_group("budget (every run; study.json stores it, a rerun must match)")
    add_options(budget, StudyBudget)
    _quick_defaults(budget)
    add_options(p, RunOptions, group="how the runs are executed (no result changes)")
    p.add_argument("--workers", type=int, default=1,
                   help="runs trained at once, each on its share of the cores (2 on 2 cores: ~1.25x the runs per "
                        "hour for the demo model; progress bars off, one line per run)")
    p.add_argument("--results-md", default=None,
                   help="where the report goes (default: RESULTS.md inside --out); an existing file is replaced "
                        "only if this study wrote it (e.g. --results-md RESULTS.md to update the repository's)")
    p.add_argument("--docs-dir", default=None,
                   help="where the report's PNGs are copied (default: none, they are linked inside --out)")
    p.add_argument("--report-only", action="store_true", help="only regenerate the report from --out")
    p.set_defaults(func=run, graceful_stop=True)  # SIGTERM/Ctrl-C: the run under way checkpoints, then the study stops
