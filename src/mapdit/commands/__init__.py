"""The command layer: each module here adds one `mapdit` sub-command (`register(subparsers)`), parses its
options and calls the library; nothing below `mapdit.commands` imports argparse or this package.

This module holds what the commands share: the one-line parser, finite floats, the model options.
"""
from __future__ import annotations

import argparse
import math

from ..config import (
    CHOICE_KEYS,
    CONDITIONINGS,
    MLP_ACTIVATIONS,
    MODEL_NAMES,
    MODULATION_GAINS,
    MP_OPTIONS,
    TIME_EMBEDDINGS,
    ModelConfig,
    make_config,
)


# ------------------------------------------------------------------------------------------------
# Parsing: one line per mistake, finite numbers only
# ------------------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """An option mistake is one line on stderr ('mapdit train: error: ...') and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    """argparse type for every float option: a number, and not NaN or ±inf."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def finite_floats_everywhere(parser: argparse.ArgumentParser) -> None:
    """Every `type=float` option of the parser and its sub-commands (also ones added later) gets
    `finite_float`: NaN and inf are refused in one line wherever a float is asked for."""
    for action in parser._actions:
        if action.type is float:
            action.type = finite_float
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                finite_floats_everywhere(sub)


# ------------------------------------------------------------------------------------------------
# Shared model options (the paper's flag names; the same for model-info, train and ablate)
# ------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser, data_defaults: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="DiT-S/2", help=f"one of {', '.join(MODEL_NAMES)}")
    g.add_argument("--config", dest="preset", default=None, metavar="{A,B,C,D,E}",
                   help="ablation preset (A = original DiT, E = all MP); flags below add to it")
    for name in MP_OPTIONS:
        g.add_argument(f"--use-{name.replace('_', '-')}", dest=name, action="store_true", default=None)
    g.add_argument("--use-all-mp", action="store_true", help="all eight MP options")
    g.add_argument("--modulation", default=None,
                   help="adaln (default) | '+'-joined subset of scale, shift, rotate, gate; e.g. scale+rotate")
    g.add_argument("--gate-init", choices=("zero", "identity"), default=None)
    g.add_argument("--rotation-pairing", choices=("half", "interleaved"), default=None)
    g.add_argument("--no-learn-sigma", dest="learn_sigma", action="store_false", default=None)
    g.add_argument("--mlp-activation", choices=MLP_ACTIVATIONS, default=None,
                   help="the MLP's activation (default gelu, DiT's); --use-mp-silu divides it by its RMS")
    g.add_argument("--time-embedding", choices=TIME_EMBEDDINGS, default=None,
                   help="timestep features (default: fourier with --use-mp-embedding, else DiT's sinusoid; "
                        "'table' is upstream MaP-DiT's learned row per step)")
    g.add_argument("--conditioning", choices=CONDITIONINGS, default=None,
                   help="t and label embeddings: balanced (each RMS 1, MP sum; default with MP linears) or sum")
    g.add_argument("--modulation-gains", choices=MODULATION_GAINS, default=None,
                   help="MP models: one learned gain per block (shared) or one per modulator")
    if data_defaults:
        g.add_argument("--input-size", type=int, default=32)
        g.add_argument("--in-channels", type=int, default=4)
        g.add_argument("--num-classes", type=int, default=1000)


def config_from_args(args: argparse.Namespace, **data) -> ModelConfig:
    """Resolve the model options of `args` (plus data-derived sizes) into one validated ModelConfig."""
    overrides = {name: getattr(args, name) for name in MP_OPTIONS}
    for key in CHOICE_KEYS:
        overrides[key] = getattr(args, key, None)
    for key in ("input_size", "in_channels", "num_classes"):
        overrides[key] = data.get(key, getattr(args, key, None))
    return make_config(args.model, preset=args.preset, use_all_mp=args.use_all_mp, **overrides)
