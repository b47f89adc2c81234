"""Two runs on one CPU: does each keep its fair share? (BENCHMARKS.md, "Sharing the CPU")

Trains the demo model (DiT-XXS/4, batch 64) for --steps steps: once alone, then two copies at once, for
each OpenMP wait policy of --policies: ACTIVE (idle threads spin), PASSIVE (they sleep at once; mapdit's
default) and "spin:N" (GOMP_SPINCOUNT=N: libgomp's threads spin N turns, then sleep; 300000 is its own
default when neither variable is set). Prints the steps/s of every run (the rate over the second
half of the run, set-up excluded) and, per policy, the slow-down of a run beside another against the fair 2x.

    python benchmarks/cpu_sharing.py --steps 200
    python benchmarks/cpu_sharing.py --steps 120 --policies PASSIVE,spin:300000,spin:10000 --config E
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


def policy_env(policy: str) -> dict:
    """The environment of a run under `policy` (see the module docstring)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy.startswith("spin:"):
        env["GOMP_SPINCOUNT"] = policy[5:]  # mapdit then leaves OMP_WAIT_POLICY unset
    else:
        env["OMP_WAIT_POLICY"] = policy
    return env


def start(out: Path, steps: int, policy: str, config: str) -> subprocess.Popen:
    env = policy_env(policy)
    cmd = [sys.executable, "-m", "mapdit.cli", "train", "--model", "DiT-XXS/4", "--config", config,
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
    p.add_argument("--policies", default="ACTIVE,PASSIVE", help="comma-separated: ACTIVE, PASSIVE, spin:N")
    p.add_argument("--config", default="E", help="the preset trained (default E, the demo's)")
    args = p.parse_args(argv)
    policies = args.policies.split(",")
    bad = [x for x in policies if x not in ("ACTIVE", "PASSIVE") and not (x.startswith("spin:") and x[5:].isdigit())]
    if bad:
        print(f"cpu_sharing: unknown policy {', '.join(bad)}: use ACTIVE, PASSIVE or spin:N", file=sys.stderr)
        return 2
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} CPUs, demo model (Config {args.config}), "
          f"{args.steps} steps")
    print("| OMP_WAIT_POLICY | alone (steps/s) | two at once (steps/s each) | slow-down (fair: 2.0x) |")
    print("|---|---:|---:|---:|")
    for policy in policies:
        with tempfile.TemporaryDirectory() as tmp:
            alone = Path(tmp, "alone")
            start(alone, args.steps, policy, args.config).wait()
            pair = [Path(tmp, "one"), Path(tmp, "two")]
            for proc in [start(d, args.steps, policy, args.config) for d in pair]:
                proc.wait()
            solo, both = rate(alone), [rate(d) for d in pair]
            mean = sum(both) / 2
            print(f"| {policy} | {solo:.2f} | {both[0]:.2f}, {both[1]:.2f} | {solo / mean:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
