"""Two runs on one CPU: does each keep its fair share? (BENCHMARKS.md, "Sharing the CPU")

Trains the demo model (DiT-XXS/4, batch 64) for --steps steps: once alone, then two copies at once, for
each OpenMP wait policy (ACTIVE: idle threads spin; PASSIVE: they sleep, mapdit's default). Prints the
steps/s of every run (the rate over the second half of the run, set-up excluded) and, per policy, the
slow-down of a run beside another against the fair 2x.

    python benchmarks/cpu_sharing.py --steps 200
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def start(out: Path, steps: int, policy: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_WAIT_POLICY=policy)
    cmd = [sys.executable, "-m", "mapdit.cli", "train", "--model", "DiT-XXS/4", "--config", "E",
           "--num-steps", str(steps), "--global-batch-size", "64", "--results-dir", str(out),
           "--log-every", str(max(1, steps // 4)), "--ema-snapshots", "0", "--ckpt-every", str(steps)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def rate(out: Path) -> float:
    """steps/s between the metrics rows at half and at the end of the run."""
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    mid, last = rows[len(rows) // 2 - 1], rows[-1]
    return (int(last["step"]) - int(mid["step"])) / (float(last["elapsed_s"]) - float(mid["elapsed_s"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} CPUs, demo model, {args.steps} steps")
    print("| OMP_WAIT_POLICY | alone (steps/s) | two at once (steps/s each) | slow-down (fair: 2.0x) |")
    print("|---|---:|---:|---:|")
    for policy in ("ACTIVE", "PASSIVE"):
        with tempfile.TemporaryDirectory() as tmp:
            alone = Path(tmp, "alone")
            start(alone, args.steps, policy).wait()
            pair = [Path(tmp, "one"), Path(tmp, "two")]
            for proc in [start(d, args.steps, policy) for d in pair]:
                proc.wait()
            solo, both = rate(alone), [rate(d) for d in pair]
            mean = sum(both) / 2
            print(f"| {policy} | {solo:.2f} | {both[0]:.2f}, {both[1]:.2f} | {solo / mean:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
