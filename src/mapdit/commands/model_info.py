"""`mapdit model-info`: parameters, FLOPs and resolved options of a model (built on the meta device); the model
options are ModelConfig's, generated (mapdit.commands.add_model_args)."""
from __future__ import annotations

import argparse
import json

import torch

from ..model import DiT, forward_flops, parameter_breakdown
from . import add_model_args, config_from_args


def run(args: argparse.Namespace) -> None:
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


def register(sub) -> None:
    p = sub.add_parser("model-info", help="parameters, FLOPs and resolved options of a model")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print everything as JSON, with the resolved config "
                                                        "(default: a short table)")
    p.set_defaults(func=run)
