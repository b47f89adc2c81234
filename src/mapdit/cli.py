"""`mapdit <command>`: argparse sub-commands that only parse and call into the library.

A `UserError` anywhere below ends the command with its one-line message and exit code 2; so do a bad
option (argparse), a full disk and a place that cannot be written (read-only, no permission).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys

from . import signals
from .config import (CHOICE_KEYS, CONDITIONINGS, MLP_ACTIVATIONS, MODEL_NAMES, MODULATION_GAINS, MP_OPTIONS, PRESETS, TIME_EMBEDDINGS,
                     ModelConfig, make_config)
from .errors import Stopped, UserError


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


def _finite_floats_everywhere(parser: argparse.ArgumentParser) -> None:
    """Every `type=float` option of the parser and its sub-commands (also ones added later) gets
    `finite_float`: NaN and inf are refused in one line wherever a float is asked for."""
    for action in parser._actions:
        if action.type is float:
            action.type = finite_float
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _finite_floats_everywhere(sub)


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


# ------------------------------------------------------------------------------------------------
# model-info
# ------------------------------------------------------------------------------------------------
def cmd_model_info(args: argparse.Namespace) -> None:
    import torch

    from .model import DiT, forward_flops, parameter_breakdown

    cfg = config_from_args(args)
    with torch.device("meta"):  # no memory, no init time: counts and FLOPs only need shapes
        model = DiT(cfg)
    params = parameter_breakdown(model)
    flops = forward_flops(model)
    info = {
        "model": cfg.model,
        "parameters": params["total"],
        "trainable_parameters": params["trainable"],
        "parameters_by_part": {k: v for k, v in params.items() if k not in ("total", "trainable")},
        "forward_gflops": round(flops / 1e9, 3),
        "forward_gmacs": round(flops / 2e9, 3),
        "input": [cfg.in_channels, cfg.input_size, cfg.input_size],
        "tokens": (cfg.input_size // cfg.patch_size) ** 2,
        "mp_options": cfg.enabled_mp_options(),
        "config": cfg.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{cfg.model}  preset={cfg.preset or '-'}  modulation={cfg.modulation}  "
          f"input={cfg.in_channels}x{cfg.input_size}x{cfg.input_size}  classes={cfg.num_classes}")
    print(f"  parameters      {params['total']:>14,}  (trainable {params['trainable']:,}; "
          "the total counts the frozen positional table, as DiT does)")
    for part, n in info["parameters_by_part"].items():
        print(f"    {part:<13} {n:>14,}")
    print(f"  forward         {info['forward_gflops']:>14,.3f} GFLOPs per image ({info['forward_gmacs']:.3f} GMACs)")
    print(f"  MP options      {', '.join(info['mp_options']) or 'none'}")


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mapdit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("model-info", help="parameters, FLOPs and resolved options of a model")
    add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model_info)

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    _finite_floats_everywhere(parser)
    return parser


# Modules that add sub-commands: each has `register(subparsers)`; imports inside commands stay lazy.
COMMAND_MODULES: list[str] = ["mapdit.train", "mapdit.sample", "mapdit.weights",
                                 "mapdit.evaluate.fmnist_classifier", "mapdit.data.prepare", "mapdit.demo",
                                 "mapdit.evaluate.fid_cli", "mapdit.evaluate.magnitudes", "mapdit.evaluate.ablate",
                                 "mapdit.evaluate.study"]


def main(argv: list[str] | None = None) -> int:
    # SIGTERM/Ctrl-C are held from here on (see mapdit.signals): a command that stops gracefully (train)
    # takes a signal that came during start-up over; every other command gets the usual handling back.
    with signals.held():
        parser = build_parser()
        args = parser.parse_args(argv)
        try:
            if not getattr(args, "graceful_stop", False):
                signals.release()
            args.func(args)
        except UserError as err:
            return _fail(args.command, str(err))
        except Stopped as stop:
            print(f"mapdit {args.command}: {stop}", file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(f"mapdit {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 - only errors of the environment; anything else is re-raised
            from .runio import environment_error

            user = environment_error(err, writing=False)
            if user is None:
                raise
            return _fail(args.command, str(user))
    return 0


def _fail(command: str, message: str) -> int:
    print(f"mapdit {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
