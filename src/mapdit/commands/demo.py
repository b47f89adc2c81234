"""`mapdit demo`: the README's main job (mapdit.demo holds the recipe)."""
from __future__ import annotations

import argparse

from ..demo import DEMO_BATCH, DEMO_CFG, DEMO_LR, DEMO_MODEL, DEMO_SAMPLING_STEPS, DEMO_STEPS, run_demo


def run(args: argparse.Namespace) -> None:
    run_demo(data_path=args.data_path, results_dir=args.results_dir, model=args.model, num_steps=args.num_steps,
             batch_size=args.batch_size, lr=args.lr, sampling_steps=args.sampling_steps, cfg_scale=args.cfg_scale,
             seed=args.seed)


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a small Config-E MaP-DiT on Fashion-MNIST and write a sample grid")
    p.add_argument("--data-path", default="fashion-mnist")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--num-steps", type=int, default=DEMO_STEPS)
    p.add_argument("--batch-size", type=int, default=DEMO_BATCH)
    p.add_argument("--lr", type=float, default=DEMO_LR)
    p.add_argument("--sampling-steps", type=int, default=DEMO_SAMPLING_STEPS)
    p.add_argument("--cfg-scale", type=float, default=DEMO_CFG)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
