"""`mapdit train` (also the seed paper's `python train.py`): the options generated from TrainConfig and
ModelConfig (mapdit.options), then `mapdit.train.train`.

A new run starts from the dataclass defaults (the paper's), or from a recipe's values with --recipe; the
options typed override them. On `--resume` the options typed go to `mapdit.resume.resume_settings`, which
applies or refuses each by its declared resume policy.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..config import ModelConfig, TrainConfig, parse_model_name
from ..recipes import RECIPES
from ..resume import resolve_run_dir, resume_settings
from ..train import train
from . import add_model_args, config_from_args, model_flags
from .options import UNSET, add_options, from_args, given


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, data_defaults=False)
    add_options(p.add_argument_group("training"), TrainConfig)
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a run: its folder, or nothing for the newest run in --results-dir. Options "
                        "that change the run's model or training (batch, seed, schedule, EMA, precision, data "
                        "shape) are refused; --num-steps, --lr, --grad-clip, --ckpt-every, --keep-last, "
                        "--log-every, --data-path, --skip-nonfinite and the --*-every reports apply")


def new_run_configs(args: argparse.Namespace) -> tuple[TrainConfig, ModelConfig]:
    """The configs of a new run: the recipe's values (if any) over the defaults, the typed options over them."""
    recipe = RECIPES[args.recipe] if args.recipe is not UNSET and args.recipe is not None else None
    tc = from_args(TrainConfig, args, base=TrainConfig(**recipe.train) if recipe else None)
    model = given(args).get("model") or (recipe.model.get("model") if recipe else None) or ModelConfig.model
    # sizes follow the data; placeholders until the data is loaded
    model_cfg = config_from_args(args, base=dict(recipe.model) if recipe else None, model=model,
                                 input_size=parse_model_name(model)[1], in_channels=1, num_classes=1)
    return tc, model_cfg


def resumed_run_configs(args: argparse.Namespace) -> tuple[Path, TrainConfig]:
    """(the run folder, its settings with the options typed applied); an option that contradicts the run is
    a one-line UserError (mapdit.resume)."""
    run_dir = resolve_run_dir(from_args(TrainConfig, args).results_dir, args.resume)
    typed = {**given(args, TrainConfig), **model_flags(args)}
    return run_dir, resume_settings(run_dir, typed, TrainConfig())


def run(args: argparse.Namespace) -> Path:
    if args.resume:
        run_dir, tc = resumed_run_configs(args)
        run_dir = train(tc, None, resume=str(run_dir))
    else:
        tc, model_cfg = new_run_configs(args)
        run_dir = train(tc, model_cfg)
    # leave the process group cleanly after a finished run (after a failure the process just exits)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return run_dir


def register(sub) -> None:
    p = sub.add_parser("train", help="train a MaP-DiT (also under torchrun)")
    add_train_args(p)
    p.set_defaults(func=run, graceful_stop=True)  # SIGTERM during start-up: handled by train()
