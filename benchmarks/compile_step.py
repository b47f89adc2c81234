#!/usr/bin/env python
"""The demo model's training step (`mapdit.step.train_step`, batch 32, Fashion-MNIST shapes), eager against
`torch.compile` of the model alone and of the model with its IDDPM loss (`mapdit.setup.CompiledLosses`, what
`mapdit train --compile` runs in one process), Config A and E; interleaved rounds, ratios paired per round.

    python benchmarks/compile_step.py --rounds 20
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from bench import DEMO, TrainStep, fmt_range, median, paired, rounds
from mapdit.setup import CompiledLosses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10, help="steps per configuration first (compilation included)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    data = {k: DEMO[k] for k in ("input_size", "in_channels", "num_classes")}
    steps = {}
    for preset in ("A", "E"):
        for kind in ("eager", "model compiled", "model+loss compiled"):
            s = TrainStep(DEMO["model"], preset, data=data, batch=DEMO["batch"])
            if kind == "model compiled":
                s.fwd = torch.compile(s.model)
            elif kind == "model+loss compiled":
                s.diffusion = CompiledLosses(s.diffusion, s.model)
            steps[f"{preset} {kind}"] = s
    start = time.time()
    times = rounds(steps, args.rounds, args.warmup)
    print(f"{DEMO['model']}, batch {DEMO['batch']}, {args.threads} threads, {args.rounds} rounds "
          f"({time.time() - start:.0f} s with compilation)\n")
    print("| step | ms (median) | ÷ eager, paired |\n|---|---:|---:|")
    for k in steps:
        ref = k.split()[0] + " eager"
        print(f"| {k} | {1e3 * median(times[k]):.1f} | {fmt_range(paired(times, k, ref), '{:.3f}')} |")
    for kind in ("eager", "model compiled", "model+loss compiled"):
        print(f"\nE ÷ A, {kind}: {fmt_range(paired(times, f'E {kind}', f'A {kind}'), '{:.3f}')}", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
