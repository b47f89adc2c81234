"""The command layer: each module here adds one `mapdit` sub-command (`register(subparsers)`), parses its
options and calls the library; nothing below `mapdit.commands` imports argparse or this package.

This module holds what the commands share: the model options (the parser and the input checks are in
`parsing`).
"""
from __future__ import annotations

import argparse
import dataclasses

from ..config import ModelConfig, make_config
from .options import UNSET, add_options, given
from .parsing import OneLineParser, finite_float, finite_floats_everywhere  # noqa: F401 (re-exported)

MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig))


# ------------------------------------------------------------------------------------------------
# Shared model options (the paper's flag names; the same for model-info, train and ablate), generated from
# ModelConfig's declarations
# ------------------------------------------------------------------------------------------------
DATA_SIZES = ("input_size", "in_channels", "num_classes")  # train takes these from the data


def add_model_args(p: argparse.ArgumentParser, data_defaults: bool = True) -> None:
    """ModelConfig's options plus --use-all-mp; `data_defaults=False` leaves out the sizes the data gives."""
    g = p.add_argument_group("model")
    add_options(g, ModelConfig, skip=() if data_defaults else DATA_SIZES)
    g.add_argument("--use-all-mp", action="store_true", default=UNSET, help="all eight MP options (= --config E)")


def model_flags(args: argparse.Namespace) -> dict:
    """The model options the user typed (ModelConfig fields and use_all_mp), with their values."""
    return {k: v for k, v in given(args).items() if k == "use_all_mp" or k in MODEL_FIELDS}


def config_from_args(args: argparse.Namespace, base: dict | None = None, **data) -> ModelConfig:
    """Resolve the model options of `args` (over `base`: a recipe's model values; plus data-derived sizes)
    into one validated ModelConfig (presets and --use-all-mp first, the --use-* flags add to them)."""
    values = {**(base or {}), **model_flags(args), **data}
    use_all_mp = bool(values.pop("use_all_mp", False))
    model = values.pop("model", ModelConfig.model)
    preset = values.pop("preset", None)
    return make_config(model, preset=preset, use_all_mp=use_all_mp, **values)
