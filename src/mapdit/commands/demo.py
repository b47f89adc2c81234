"""`mapdit demo`: the README's main job, the recipe fmnist-cpu plus a grid (mapdit.demo; options generated
from DemoSettings)."""
from __future__ import annotations

import argparse
import dataclasses

from ..demo import DemoSettings, run_demo
from .options import add_options, from_args


def run(args: argparse.Namespace) -> None:
    run_demo(**dataclasses.asdict(from_args(DemoSettings, args)))


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a small Config-E MaP-DiT on Fashion-MNIST with the recipe fmnist-cpu "
                                    "(mapdit train --recipe fmnist-cpu) and write a sample grid")
    add_options(p, DemoSettings)
    p.set_defaults(func=run)
