#!/usr/bin/env python
"""Images per second of the whole training loop and of sampling, as users run them (issue 31, point 2).

    python benchmarks/loop_speed.py --baseline 286b7db --out benchmarks/results/loop-speed.md

Training: a fresh `mapdit train --recipe fmnist-cpu` (the demo's recipe; arm A at lr 1e-2 with --config A,
arm E as the recipe has it) of --steps steps, images/s from its metrics.csv (median of the reports after the
first half: start-up and compilation excluded). Sampling: `mapdit.load_run(...)` on a finished run of each
arm, dpm++2m 20 steps with guidance 4 (the default SamplerSpec), --sample-images images in one batch, timed
after one warm-up call. Every figure comes from a fresh process.

Variants (--variants; join them with "+", e.g. ranks2+compile), each run once per round, the order rotated
between rounds, so that the machine's drift falls on all alike; ratios are paired per round against `base`:
  base     the --baseline git revision (a worktree under --work), 2 threads, eager, OpenMP as it sets it
  eager    this tree, 2 threads, eager, OpenMP as it sets it
  compile  this tree, 2 threads, `--compile` (training only)
  ranks2   this tree under torchrun, 2 processes of 1 thread each (the same global batch, split)
  threads1 this tree, 1 thread (what one of the two ranks has; for reading ranks2)
  active   this tree, 2 threads, OMP_WAIT_POLICY=ACTIVE exported (idle OpenMP threads spin)
  passive  this tree, 2 threads, OMP_WAIT_POLICY=PASSIVE exported (idle OpenMP threads sleep at once)
  spinN    this tree, 2 threads, GOMP_SPINCOUNT=N exported (libgomp's idle threads spin N turns, then sleep)
Run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
ARMS = {"A": ["--config", "A", "--lr", "1e-2"], "E": []}  # each at its own best rate (docs/recipe.md)
VARIANTS = ("base", "eager", "compile", "ranks2", "threads1", "active", "passive")
DEFAULT_VARIANTS = ("base", "eager", "compile", "ranks2", "ranks2+compile", "active")
SAMPLE_CODE = """
import sys, time, torch, mapdit
torch.set_flush_denormal(True)
pipe = mapdit.load_run(sys.argv[1])
labels = torch.arange(int(sys.argv[2])) % 10
pipe(labels[:4], batch_size=len(labels))
start = time.perf_counter()
pipe(labels, batch_size=len(labels))
print(len(labels) / (time.perf_counter() - start))
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tree_of(variant: str, args) -> Path:
    """The source tree a variant runs: the baseline's worktree, or this checkout."""
    if variant != "base":
        return HERE
    tree = Path(args.work) / f"base-{args.baseline}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(tree), args.baseline],
                       check=True, stdout=subprocess.DEVNULL)
    return tree


def parts(variant: str) -> set[str]:
    return set(variant.split("+"))


def known(part: str) -> bool:
    return part in VARIANTS or (part.startswith("spin") and part[4:].isdigit())


def env_of(variant: str, args) -> dict:
    threads = "1" if parts(variant) & {"ranks2", "threads1"} else "2"
    env = {**os.environ, "PYTHONPATH": str(tree_of(variant, args) / "src"), "OMP_NUM_THREADS": threads}
    env.pop("OMP_WAIT_POLICY", None)
    env.pop("GOMP_SPINCOUNT", None)
    for policy in ("active", "passive"):
        if policy in parts(variant):
            env["OMP_WAIT_POLICY"] = policy.upper()
    for part in parts(variant):
        if part.startswith("spin"):
            env["GOMP_SPINCOUNT"] = part[4:]
    return env


def train_cmd(variant: str, arm: str, folder: Path, steps: int) -> list[str]:
    launch = [sys.executable, "-m", "mapdit.cli"]
    if "ranks2" in parts(variant):
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                  "-m", "mapdit.cli"]
    flags = ["--compile"] if "compile" in parts(variant) else []
    return [*launch, "train", "--recipe", "fmnist-cpu", *ARMS[arm], "--num-steps", str(steps), "--log-every",
            str(max(1, steps // 10)), "--ema-snapshots", "0", "--results-dir", str(folder), *flags]


def images_per_s(run_parent: Path) -> float:
    run = max(p for p in run_parent.iterdir() if p.is_dir())
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rates = [float(r["images_per_s"]) for r in rows[len(rows) // 2:] if r.get("images_per_s")]
    return statistics.median(rates)


def train_once(variant: str, arm: str, args, tag: str) -> float:
    folder = Path(args.work) / "runs" / f"{tag}-{arm}-{variant}"
    subprocess.run(train_cmd(variant, arm, folder, args.steps), check=True, env=env_of(variant, args),
                   cwd=tree_of(variant, args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return images_per_s(folder)


def sample_once(variant: str, arm: str, args, run: Path) -> float:
    out = subprocess.run([sys.executable, "-c", SAMPLE_CODE, str(run), str(args.sample_images)], check=True,
                         env=env_of(variant, args), capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="git revision measured as `base` (today's main)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--arms", default="A,E")
    p.add_argument("--steps", type=int, default=300, help="steps per training run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sample-images", type=int, default=64)
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--work", default="/tmp/mapdit-loop-speed", help="scratch folder (runs, the worktree)")
    p.add_argument("--out", default=None, help="also write the markdown report here (and .json beside it)")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    arms = args.arms.split(",")
    unknown = [v for v in variants if not all(map(known, parts(v)))] + [a for a in arms if a not in ARMS]
    if unknown or "base" not in variants:
        print(f"loop_speed: unknown {unknown} or no 'base' in --variants; variants: {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    train = {(a, v): [] for a in arms for v in variants}
    sample = {(a, v): [] for a in arms for v in variants if not parts(v) & {"compile", "ranks2"}}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for arm in arms:
            for v in order:
                train[arm, v].append(train_once(v, arm, args, f"r{r}"))
                log(f"round {r} {arm} {v}: train {train[arm, v][-1]:.0f} images/s")
            if args.no_sampling:
                continue
            run = max((Path(args.work) / "runs" / f"r{r}-{arm}-eager").iterdir())
            for v in order:
                if (arm, v) in sample:
                    sample[arm, v].append(sample_once(v, arm, args, run))
                    log(f"round {r} {arm} {v}: sample {sample[arm, v][-1]:.1f} images/s")
    end = time.strftime("%H:%M UTC", time.gmtime())

    def table(kind: str, times: dict) -> list[str]:
        rows = [f"| arm | variant | {kind} images/s, median (min–max) | ÷ base, paired median (min–max) |",
                "|---|---|---:|---:|"]
        for (arm, v), xs in times.items():
            ratio = [x / b for x, b in zip(xs, times[arm, "base"])]
            rows.append(f"| {arm} | {v} | {statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f}) | "
                        f"{statistics.median(ratio):.3f} ({min(ratio):.3f}–{max(ratio):.3f}) |")
        ea = [a / e for a, e in zip(times.get(("A", "eager"), []), times.get(("E", "eager"), []))]
        if ea:  # time per image of E over A = images/s of A over images/s of E
            rows.append(f"\nE ÷ A ({kind} time per image, eager, paired): {statistics.median(ea):.3f} "
                        f"({min(ea):.3f}–{max(ea):.3f})")
        return rows

    lines = [f"`python benchmarks/loop_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
             f"{start}–{end}; {platform.machine()}, {os.cpu_count()} CPUs; baseline {args.baseline}; "
             f"{args.rounds} rounds of {args.steps}-step runs", "", *table("training", train)]
    if sample and not args.no_sampling:
        lines += ["", f"Sampling ({args.sample_images} images, dpm++2m 20, guidance 4):", "",
                  *table("sampling", sample)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"train": {f"{a}/{v}": xs for (a, v), xs in train.items()},
             "sample": {f"{a}/{v}": xs for (a, v), xs in sample.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
