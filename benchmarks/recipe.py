#!/usr/bin/env python
"""The recipe of a CPU run (issue 15 §3): which levers buy the most sample quality per CPU-minute, each
measured on the plain DiT (Config A) and on the MP model alike, and sample quality against training minutes.

    python benchmarks/recipe.py --out results/recipe minutes            # FD / accuracy vs minutes, both arms
    python benchmarks/recipe.py --out results/recipe levers             # every lever, both arms
    python benchmarks/recipe.py --out results/recipe levers --levers base,minsnr5 --arms MP
    python benchmarks/recipe.py --out results/recipe seeds --cells steps14000 --seeds 1,2   # the scoring's spread
    python benchmarks/recipe.py --out results/recipe seeds --cells steps14000 --seeds 0,1,2 --guidance 2
    python benchmarks/recipe.py --out results/recipe minutes --curve-steps 14000 --train-seed 1   # training's
    python benchmarks/recipe.py --out results/recipe levers --base-steps 14000 --levers cfg2 --train-seed 1
    python benchmarks/recipe.py --out results/recipe extend --from-steps 14000 --curve-steps 28000  # train on
    python benchmarks/recipe.py --out results/recipe speed              # steps/s: threads, torch.compile
    python benchmarks/recipe.py --out results/recipe report             # recipe.md + minutes.png from the cache
    python benchmarks/recipe.py --list

Arms, each at its own best measured rate (docs/diagnosis.md): A = Config A at lr 1e-2; MP = Config E with
its defaults at lr 3e-2 (the demo's model). The base recipe is the first demo's: DiT-XXS/4 on Fashion-MNIST, 2000
steps of batch 64, seed 0. Every cell is scored the way the demo's grid is drawn: EMA sigma_rel 0.10,
DPM-Solver++(2M) 20 steps, guidance 4, 1,000 samples (same labels and noise for every cell), FD_fmnist and
conditioning accuracy against the 10k test images, plus the held-out eps-MSE (2,000 test images, fixed
noise and timesteps). A lever changes one thing of that recipe (`LEVERS`; scoring levers reuse the base
run). Training minutes are the run's own wall time (metrics.csv elapsed_s) on the cores it had: run this
with nothing else on the machine.

`minutes`: a fresh run per arm at each of --curve-steps (350, 850, 1000, 2000, 4000, 7000: about 2, 5, 6,
12, 15 and 30-35 minutes here, on 2 cores), each with its own learning-rate schedule, as a user who trains that long
would; plotted against the training minutes each run took. The 1000-, 2000- and 4000-step runs are the
levers steps1000, base and steps4000.

Resumable: each finished cell is OUT/cells/<arm>-<lever>.json; runs live in OUT/runs/<arm>-<run>/ and an
interrupted run is resumed. Every invocation rewrites OUT/recipe.md, OUT/minutes.png and OUT/guidance.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mapdit.config import TrainConfig, make_config
from mapdit.errors import Diverged
from mapdit.evaluate.heldout import heldout_for_run
from mapdit.experiments.fid_run import fid_for_run
from mapdit.runio import latest_run_dir, run_to_resume, write_json
from mapdit.train import train

ARMS = {"A": ("A", 1e-2), "MP": ("E", 3e-2)}  # arm -> (preset, its best measured rate)
MODEL, STEPS, BATCH, SEED = "DiT-XXS/4", 2000, 64, 0
SCORE = {"samples": 1000, "sampler": "dpm++2m", "steps": 20, "cfg": 4.0, "ema": 0.10}
CURVE_STEPS = (350, 850, 1000, 2000, 4000, 7000, 14000)  # ~2, 5, 6, 12, 15, 30-35, 60-80 min (docs/recipe.md)


@dataclass(frozen=True)
class Lever:
    name: str
    what: str
    # Set on the base recipe. "num_steps" is absolute; the others scale with the base length so a lever
    # means the same at any --base-steps: "lr_scale" (x the arm's rate), "steps_scale" (x the base steps),
    # "warmup_frac" / "decay_frac" (warm-up steps / decay start as a fraction of the run's steps).
    train: dict = field(default_factory=dict)
    model: str = MODEL
    score: dict = field(default_factory=dict)  # SCORE keys set for scoring
    folder: str = ""  # the run folder's name where `run`'s rule does not give it (a run trained on)

    def at(self, base_steps: int, seed: int = SEED) -> "Lever":
        """This lever on a base recipe of `base_steps` steps, with every relative setting made concrete.
        Its cell is named "<lever>@<base_steps>" unless the base is the default length (the lever's own
        name) or the lever is the base itself ("steps<N>", the minutes curve's cell). Another training
        `seed` adds "-seed<S>" to the lever's part of the name."""
        rel = dict(self.train)
        steps, scale = rel.pop("num_steps", None), rel.pop("steps_scale", 1.0)
        if steps is None:
            steps = round(base_steps * scale)
        train = {"num_steps": steps} if steps != STEPS else {}
        if "warmup_frac" in rel:
            train["warmup_steps"] = round(steps * rel.pop("warmup_frac"))
        if "decay_frac" in rel:
            train["decay_start"] = round(steps * rel.pop("decay_frac"))
        train.update(rel)  # lr_scale and absolute TrainConfig fields
        name, at = self.name, ""
        if base_steps != STEPS and "num_steps" not in self.train:
            name, at = (f"steps{base_steps}", "") if self.name == "base" else (self.name, f"@{base_steps}")
        what = self.what
        if seed != SEED:
            train["seed"] = seed
            name, what = f"{name}-seed{seed}", f"{what}, training seed {seed}"
        return Lever(name + at, what, train, self.model, self.score)

    @property
    def run(self) -> str:
        """The run folder this (concrete) lever trains: a lever that only sets the step count (or only
        scores differently) shares "base" / "steps<N>" with the minutes curve."""
        if self.folder:
            return self.folder
        if self.model == MODEL and set(self.train) <= {"num_steps", "seed"}:
            steps, seed = self.train.get("num_steps", STEPS), self.train.get("seed", SEED)
            return ("base" if steps == STEPS else f"steps{steps}") + (f"-seed{seed}" if seed != SEED else "")
        return self.name


# batch32+minsnr5: the two single winners of the 1000-step base together, on twice the base's steps (4000 x 32
# at the default base). It was the demo's recipe until 2026-12-05; the demo now runs the same at 6000 steps.
WINNER = {"batch_size": 32, "steps_scale": 2.0, "min_snr_gamma": 5.0}

LEVERS = {lv.name: lv for lv in (
    Lever("base", "the first demo's recipe (2000 x 64)"),
    # length and batch
    Lever("steps1000", "1000 steps (half the images)", {"num_steps": 1000}),
    Lever("steps4000", "4000 steps (twice the images)", {"num_steps": 4000}),
    Lever("batch16", "batch 16 for four times the steps (same images)", {"batch_size": 16, "steps_scale": 4.0}),
    Lever("batch32", "batch 32 for twice the steps (same images)", {"batch_size": 32, "steps_scale": 2.0}),
    Lever("batch128", "batch 128 for half the steps (same images)", {"batch_size": 128, "steps_scale": 0.5}),
    # rate schedule and loss
    Lever("lr-x0.5", "half the arm's rate", {"lr_scale": 0.5}),
    Lever("lr-x2", "twice the arm's rate", {"lr_scale": 2.0}),
    Lever("lr-x4", "four times the arm's rate", {"lr_scale": 4.0}),
    Lever("warmup10", "warm-up over the first 10 % of steps (default 1/150)", {"warmup_frac": 0.1}),
    Lever("nodecay", "no inverse-sqrt decay (constant rate after warm-up; default: decay from 1/10)",
          {"decay_frac": 1.0}),
    Lever("minsnr5", "Min-SNR-5 loss weighting", {"min_snr_gamma": 5.0}),
    Lever("batch32+minsnr5", "batch 32 for twice the steps, Min-SNR-5 (the two single winners together)",
          WINNER),
    Lever("batch32+minsnr5+lr-x3.3", "the winner at 10/3 of the arm's rate (MP: 0.1, E's best rate in the study)",
          {**WINNER, "lr_scale": 10 / 3}),
    Lever("batch32+minsnr5+nodecay", "the winner with no decay (constant rate after warm-up)",
          {**WINNER, "decay_frac": 1.0}),
    Lever("batch32+minsnr5+cfg3", "the winner scored at guidance 3 (its own run of the same recipe)",
          WINNER, score={"cfg": 3.0}),
    # architecture at this resolution
    Lever("patch8", "patch 8 (16 tokens instead of 49; images padded to 32x32)", model="DiT-XXS/8"),
    Lever("patch2", "patch 2 (196 tokens)", model="DiT-XXS/2"),
    Lever("width-XS", "DiT-XS/4 (6 blocks, width 256)", model="DiT-XS/4"),
    # scoring only (the base run)
    Lever("ema0.05", "EMA sigma_rel 0.05", score={"ema": 0.05}),
    Lever("cfg2", "guidance 2", score={"cfg": 2.0}),
    Lever("cfg3", "guidance 3", score={"cfg": 3.0}),
    Lever("cfg6", "guidance 6", score={"cfg": 6.0}),
    Lever("ddim50", "our DDIM at 50 steps", score={"sampler": "ddim", "steps": 50}),
)}
DEFAULT_LEVERS = [n for n in LEVERS if n not in ("patch2", "width-XS")]  # those two cost 3-4x a base run


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ runs
def metrics_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def train_seconds(run_dir: Path) -> float:
    """Training wall time from metrics.csv's elapsed_s; a resumed run restarts the clock, so segments add."""
    total, last = 0.0, 0.0
    for row in metrics_rows(run_dir):
        e = float(row["elapsed_s"])
        if e < last:  # a new segment (resume)
            total += last
        last = e
    return total + last


def steps_per_second(run_dir: Path) -> float:
    """Median steps/s of a run's reports after the first (which includes start-up)."""
    rates = [float(r["steps_per_s"]) for r in metrics_rows(run_dir) if r.get("steps_per_s")]
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def train_run(out: Path, arm: str, name: str, lever_train: dict, model: str) -> Path:
    """Train (or resume, or find finished) the run `arm`-`name`."""
    preset, lr = ARMS[arm]
    over = dict(lever_train)
    lr *= over.pop("lr_scale", 1.0)
    folder = out / "runs" / f"{arm}-{name}"
    tc = TrainConfig(data_path="fashion-mnist", results_dir=str(folder), num_steps=STEPS, batch_size=BATCH,
                     lr=lr, seed=SEED, log_every=50, ema_snapshots=0, ema_stds=(0.05, 0.10))
    for key, value in over.items():
        setattr(tc, key, value)
    tc.ckpt_every = min(tc.num_steps, 1000)  # a long curve run resumes from its last thousand steps
    existing = run_to_resume(folder)
    if existing is not None:
        return Path(train(tc, None, resume=str(existing)))
    patch = make_config(model).patch_size
    size = -(-28 // patch) * patch  # Fashion-MNIST is padded up to a multiple of the patch (28 -> 32 for 8)
    cfg = make_config(model, preset=preset, input_size=size, in_channels=1, num_classes=10)
    return Path(train(tc, cfg))


def score_run(run_dir: Path, score: dict, seed: int = 0) -> dict:
    """FD, accuracy and held-out error; `seed` draws other labels and noise for the samples (the scoring's spread)."""
    fid = fid_for_run(run_dir, score["samples"], ema_std=score["ema"], cfg_scale=score["cfg"],
                      sampler=score["sampler"], steps=score["steps"], seed=seed, batch_size=250, progress=False,
                      write=seed == 0, log=lambda m: None)
    held = heldout_for_run(run_dir, weights="ema", ema_std=score["ema"])
    return {"fd": fid["value"], "acc": fid.get("conditioning_accuracy"), "heldout": held["mse"]}


def run_cell(out: Path, arm: str, lever: Lever, extends: str | None = None) -> dict:
    cell = lever.name
    path = out / "cells" / f"{arm}-{cell}.json"
    if path.is_file():
        return json.loads(path.read_text())
    train_over = dict(lever.train)
    record = {"arm": arm, "cell": cell, "lever": lever.name, "what": lever.what, "model": lever.model,
              "train": train_over, **({"extends": extends} if extends else {})}
    log(f"{arm}-{cell}: training ({lever.run}) ...")
    try:
        run_dir = train_run(out, arm, lever.run, train_over, lever.model)
    except Diverged as err:  # a diverged run is a result (recorded, not retried); anything else stops the sweep
        record.update(diverged_at_step=err.step, machine=machine(), date=now())
        write_json(path, record)
        log(f"{arm}-{cell}: diverged at step {err.step}")
        return record
    score = {**SCORE, **lever.score}
    log(f"{arm}-{cell}: scoring {score} ...")
    record.update(score=score, run_dir=str(run_dir), num_steps=int(metrics_rows(run_dir)[-1]["step"]),
                  train_min=train_seconds(run_dir) / 60, steps_per_s=steps_per_second(run_dir),
                  **score_run(run_dir, score), machine=machine(), date=now())
    write_json(path, record)
    log(f"{arm}-{cell}: FD {record['fd']:.2f}, acc {record['acc']:.3f}, held-out {record['heldout']:.4f}, "
        f"{record['train_min']:.1f} min")
    return record


def curve_cells(out: Path, arms: list[str], steps: list[int], seed: int = SEED) -> None:
    """The minutes curve: a run of each step count per arm (shortest first), its own schedule each. Another
    training `seed` gives cells "steps<N>-seed<S>" beside the curve (its spread at that length)."""
    for n in sorted(steps):
        for arm in arms:
            if n == STEPS:
                lever = LEVERS["base"].at(n, seed)
            else:
                lever = Lever(f"steps{n}", f"{n} steps", {"num_steps": n}).at(STEPS, seed)
            run_cell(out, arm, LEVERS.get(lever.name, lever))


def extend_cells(out: Path, arms: list[str], from_steps: int, steps: list[int], seed: int = SEED) -> None:
    """Train the curve's finished `from_steps` run on to each of `steps`, keeping its schedule (warm-up and
    decay start are the shorter run's; EDM2's 1/sqrt decay has no end, so this is what training longer means
    for a run already under way, and costs only the extra steps). Cell "steps<N>-from<M>": a copy of the
    run with its step-M checkpoint (hard links), resumed to N steps; training minutes include the M steps'."""
    suffix = f"-seed{seed}" if seed != SEED else ""
    ckpt = f"step-{from_steps:07d}"
    sources = {arm: run_to_resume(out / "runs" / f"{arm}-steps{from_steps}{suffix}") for arm in arms}
    missing = [arm for arm, run in sources.items()
               if run is None or not (run / "checkpoints" / f"{ckpt}.safetensors").is_file()]
    if missing:  # checked for every arm before any training
        print(f"recipe: extend needs the {from_steps}-step run{suffix and ' of training seed ' + str(seed)} of "
              f"arm {', '.join(missing)} with its {ckpt} checkpoint in {out / 'runs'}: run `minutes --curve-steps "
              f"{from_steps}` first", file=sys.stderr)
        raise SystemExit(2)
    for n in sorted(steps):
        for arm in arms:
            name = f"steps{n}-from{from_steps}{suffix}"
            if (out / "cells" / f"{arm}-{name}.json").is_file():
                continue
            folder = out / "runs" / f"{arm}-{name}"
            if run_to_resume(folder) is None:
                copy_run(sources[arm], folder / sources[arm].name, ckpt)
            lever = Lever(name, f"the {from_steps}-step run trained on to {n} steps (its schedule)",
                          {"num_steps": n, **({"seed": seed} if seed != SEED else {})}, folder=name)
            record = run_cell(out, arm, lever, extends=f"steps{from_steps}{suffix}")
            source_cell = out / "cells" / f"{arm}-steps{from_steps}{suffix}.json"
            estimate = json.loads(source_cell.read_text()).get("train_min_estimate") if source_cell.is_file() else None
            if estimate and "fd" in record and "train_min_estimate" not in record:
                # the source's minutes were estimated (a run not timed alone): the same rate per step
                record["train_min_estimate"] = estimate * n / from_steps
                write_json(out / "cells" / f"{arm}-{name}.json", record)


def copy_run(source: Path, dest: Path, ckpt: str) -> None:
    """`source`'s settings, log and metrics (copied) and its checkpoint `ckpt` (hard-linked): a run that
    resumes from that step. Written to a temporary folder first, so an interruption leaves no half copy."""
    tmp = dest.parent / (dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "metrics.csv", "log.txt"):
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    for part in (source / "checkpoints").glob(f"{ckpt}.*"):
        os.link(part, tmp / "checkpoints" / part.name)
    tmp.rename(dest)


def rescore(out: Path, arms: list[str], cells: list[str], seeds: list[int], cfg: float | None = None) -> None:
    """Score finished cells again with other sampling seeds: OUT/seeds/<arm>-<cell>-seed<N>.json; with `cfg`,
    at that guidance instead of the cell's (<arm>-<cell>-cfg<G>-seed<N>.json, sampling seed 0 included)."""
    tag = f"-cfg{cfg:g}" if cfg is not None else ""
    for arm in arms:
        for cell in cells:
            record = json.loads((out / "cells" / f"{arm}-{cell}.json").read_text())
            score = {**record["score"], **({"cfg": cfg} if cfg is not None else {})}
            for seed in seeds:
                path = out / "seeds" / f"{arm}-{cell}{tag}-seed{seed}.json"
                if not path.is_file():
                    log(f"{arm}-{cell}{tag}: scoring with sampling seed {seed} ...")
                    write_json(path, {"arm": arm, "cell": cell + tag, "seed": seed, "score": score,
                                      **score_run(Path(record["run_dir"]), score, seed), "date": now()})


# ------------------------------------------------------------------------------------------------ speed
def speed(out: Path, arms: list[str], steps: int = 200) -> None:
    """Steps/s of a fresh `mapdit train` per arm: 2 threads eager (the default), 2 threads with
    --compile, 1 thread eager, and batches 16, 32 and 128 (images/s is what the batch levers trade).
    Median over the second half of the reports (compilation and warm-up excluded)."""
    variants = {"2 threads": ([], "2", BATCH), "2 threads, --compile": (["--compile"], "2", BATCH),
                "1 thread": ([], "1", BATCH), "batch 16": ([], "2", 16), "batch 32": ([], "2", 32),
                "batch 128": ([], "2", 128)}
    for arm in arms:
        preset, lr = ARMS[arm]
        for label, (flags, threads, batch) in variants.items():
            path = out / "speed" / f"{arm}-{label.replace(' ', '').replace(',', '-')}.json"
            if path.is_file():
                continue
            folder = out / "speed-runs" / path.stem
            cmd = [sys.executable, "-m", "mapdit.cli", "train", "--model", MODEL, "--config", preset, "--lr", str(lr),
                   "--num-steps", str(steps), "--batch-size", str(batch), "--log-every", "10", "--ema-snapshots",
                   "0", "--results-dir", str(folder), *flags]
            log(f"speed {arm} {label} ...")
            subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": threads},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows = metrics_rows(latest_run_dir(folder))
            rates = [float(r["steps_per_s"]) for r in rows[len(rows) // 2:]]
            write_json(path, {"arm": arm, "variant": label, "batch": batch, "steps_per_s": statistics.median(rates),
                              "min": min(rates), "max": max(rates), "machine": machine(), "date": now()})


# ------------------------------------------------------------------------------------------------ report
def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def load(out: Path, sub: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / sub).glob("*.json"))]


def cell_order(cell: str) -> tuple[int, int, int]:
    """Rows grouped by base length: a base ("steps<N>", or "base") first, then the levers in LEVERS order;
    a run trained on ("-from<M>") after its length's own, another training seed after seed 0."""
    lever, _, base = cell.partition("@")
    lever, _, seed = lever.partition("-seed")
    lever, _, source = lever.partition("-from")
    rank = int(seed) if seed.isdigit() else 0
    if lever.startswith("steps") and lever[5:].isdigit():
        return int(lever[5:]), 1 if source else 0, rank
    return int(base or STEPS), 2 + (list(LEVERS).index(lever) if lever in LEVERS else len(LEVERS)), rank


def report(out: Path) -> Path:
    cells = {(c["arm"], c["cell"]): c for c in load(out, "cells")}
    lines = ["# The recipe: levers on Config A and on the MP model", "",
             f"Made by `python benchmarks/recipe.py` (its docstring has the method). Base: {MODEL}, {STEPS} steps "
             f"of batch {BATCH}, seed {SEED}; A at lr {ARMS['A'][1]:g}, MP (Config E) at lr {ARMS['MP'][1]:g}. "
             f"Scored: {SCORE['samples']} samples, {SCORE['sampler']} {SCORE['steps']} steps, guidance "
             f"{SCORE['cfg']:g}, EMA {SCORE['ema']:.2f}, unless the lever changes it. Minutes: training wall "
             "time on the machine named in each cell's JSON.", "",
             "| lever | what | arm | steps | train min | FD_fmnist | cond. acc. | held-out ε-MSE |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for name in sorted({c for _, c in cells}, key=cell_order):
        for arm in ARMS:
            c = cells.get((arm, name))
            if c and "diverged_at_step" in c:
                lines.append(f"| {name} | {c['what']} | {arm} | diverged at step {c['diverged_at_step']} "
                             "| | | | |")
            elif c:
                lines.append(f"| {name} | {c['what']} | {arm} | {c['num_steps']} | {c['train_min']:.1f} | "
                             f"{c['fd']:.1f} | {c['acc']:.3f} | {c['heldout']:.4f} |")
    spd = load(out, "speed")
    if spd:
        lines += ["", "Speed (fresh `mapdit train`, steps/s over the second half of 200 steps):", "",
                  "| arm | variant | steps/s (min–max) | images/s |", "|---|---|---:|---:|"]
        lines += [f"| {s['arm']} | {s['variant']} | {s['steps_per_s']:.2f} ({s['min']:.2f}–{s['max']:.2f}) | "
                  f"{s['steps_per_s'] * s.get('batch', BATCH):.0f} |" for s in spd]
    reps = load(out, "seeds")
    if reps:
        lines += ["", ("Scoring spread (the same runs, samples drawn with other seeds; seed 0 is the cell's own; "
                  "'-cfg<G>': scored at guidance G):"), "",
                  "| arm | cell | sampling seed | FD_fmnist | cond. acc. |", "|---|---|---:|---:|---:|"]
        for r in sorted(reps, key=lambda r: (r["cell"], r["arm"], r["seed"])):
            c = cells.get((r["arm"], r["cell"]), {})
            if r["seed"] == min(x["seed"] for x in reps if (x["arm"], x["cell"]) == (r["arm"], r["cell"])) and c:
                lines.append(f"| {r['arm']} | {r['cell']} | 0 | {c['fd']:.1f} | {c['acc']:.3f} |")
            lines.append(f"| {r['arm']} | {r['cell']} | {r['seed']} | {r['fd']:.1f} | {r['acc']:.3f} |")
    path = out / "recipe.md"
    path.write_text("\n".join(lines) + "\n")
    plot_minutes(cells, out / "minutes.png")
    plot_guidance(cells, reps, out / "guidance.png")
    return path


def run_length(run: str) -> int:
    """The training steps of a run named like 'steps28000-from14000-seed1'."""
    return int(re.match(r"steps(\d+)", run).group(1))


def plot_guidance(cells: dict, reps: list[dict], path: Path, min_steps: int = 7000) -> Path | None:
    """FD and accuracy against guidance, one line per run of at least `min_steps` steps scored at two
    guidances or more (mean over the sampling seeds scored; the base model, EMA and sampler)."""
    scores: dict[tuple[str, str], dict[float, dict]] = {}  # (arm, run) -> guidance -> sampling seed -> (fd, acc)

    def add(arm: str, cell: dict, score: dict, seed: int, fd: float, acc: float) -> None:
        if cell.get("model") != MODEL or {**score, "cfg": SCORE["cfg"]} != SCORE or cell["num_steps"] < min_steps:
            return
        run = Path(cell["run_dir"]).parent.name.partition("-")[2]  # runs/<arm>-<run>/NNN-model
        scores.setdefault((arm, run), {}).setdefault(score["cfg"], {})[seed] = (fd, acc)

    for (arm, _), c in cells.items():
        if "fd" in c:
            add(arm, c, c["score"], 0, c["fd"], c["acc"])
    for r in reps:
        base = cells.get((r["arm"], r["cell"].split("-cfg")[0]))
        if base and "fd" in base:
            add(r["arm"], base, r["score"], r["seed"], r["fd"], r["acc"])
    runs = {k: v for k, v in scores.items() if len(v) > 1}
    if not runs:
        return None
    from mapdit.plots import pyplot, save_figure
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    longest_first = sorted({run_length(run) for _, run in runs}, reverse=True)
    styles = ["-", "--", ":", "-."]  # by training length: the longest solid
    for (arm, run), by_cfg in sorted(runs.items(), key=lambda kv: (kv[0][0], run_length(kv[0][1]), kv[0][1])):
        g, steps = sorted(by_cfg), run_length(run)
        n = max(len(by_cfg[x]) for x in g)
        seed = int(run.rpartition("-seed")[2]) if "-seed" in run else SEED
        for ax, col in ((axes[0], 0), (axes[1], 1)):
            ax.plot(g, [statistics.mean(v[col] for v in by_cfg[x].values()) for x in g],
                    styles[longest_first.index(steps) % 4], marker="o" if seed == SEED else "x",
                    color="C0" if arm == "A" else "C1",
                    label=f"{'Config A' if arm == 'A' else 'MP (E)'}, {steps} steps, training seed {seed} "
                          f"({n} sampling seeds)")
    for ax, ylabel in ((axes[0], "FD_fmnist (lower is better)"), (axes[1], "conditioning accuracy")):
        ax.set_xlabel("guidance scale")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{MODEL} on Fashion-MNIST, batch {BATCH}: guidance against training length; {SCORE['samples']} "
                 f"samples, {SCORE['sampler']} {SCORE['steps']}, EMA {SCORE['ema']:.2f}")
    return save_figure(fig, path)


def plot_minutes(cells: dict, path: Path) -> Path | None:
    """FD and accuracy against training minutes (top) and against steps (bottom): the batch-64 curve per arm
    (lines) and the batch-32 recipes of the same images as the base (star: batch 32; plus: batch 32 with
    Min-SNR-5), where measured. A cell with `train_min_estimate` (a run not timed alone on 2 cores) is placed
    at that estimate and drawn hollow."""
    def on_curve(c: dict) -> bool:  # the recipe with only the step count changed, scored the base way
        return (c["model"] == MODEL and set(c["train"]) <= {"num_steps"} and c.get("score") == SCORE
                and "extends" not in c)

    def other_seed(c: dict) -> bool:  # the same, another training seed
        return (c["model"] == MODEL and "seed" in c["train"] and set(c["train"]) <= {"num_steps", "seed"}
                and c.get("score") == SCORE and "extends" not in c)

    def point(c: dict) -> tuple[float, float, float, int, bool]:
        estimated = "train_min_estimate" in c
        minutes = c["train_min_estimate"] if estimated else c["train_min"]
        return minutes, c["fd"], c["acc"], c["num_steps"], estimated

    pts = {arm: sorted(point(c) for (a, _), c in cells.items() if a == arm and on_curve(c) and "fd" in c)
           for arm in ARMS}
    if not any(pts.values()):
        return None
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from mapdit.plots import pyplot, save_figure
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    stars = {"batch32": ("*", f"{2 * STEPS} × 32"), "batch32+minsnr5": ("P", f"{2 * STEPS} × 32, Min-SNR-5")}
    for i, (arm, p) in enumerate(pts.items()):
        label = f"Config A (lr {ARMS['A'][1]:g})" if arm == "A" else f"MP, Config E (lr {ARMS['MP'][1]:g})"
        for row, xcol in ((0, 0), (1, 3)):  # x: minutes, then steps
            for ax, col in ((axes[row][0], 1), (axes[row][1], 2)):  # y: FD, accuracy
                if p:
                    ax.plot([x[xcol] for x in p], [x[col] for x in p], "-", color=f"C{i}",
                            label=f"{label}, N × {BATCH}")
                    for x in p:
                        ax.plot([x[xcol]], [x[col]], "o", color=f"C{i}", mfc="none" if x[4] else f"C{i}")
                seeds = [point(c) for (a, _), c in cells.items() if a == arm and other_seed(c) and "fd" in c]
                for j, x in enumerate(seeds):
                    ax.plot([x[xcol]], [x[col]], "x", ms=8, color=f"C{i}",
                            label=f"{label}, other training seeds" if j == 0 else None)
                for c in (c for (a, _), c in cells.items() if a == arm and "extends" in c and "fd" in c
                          and c.get("score") == SCORE):
                    source, other = cells.get((arm, c["extends"])), "seed" in c["train"]  # other: crosses, dotted
                    if source and "fd" in source:
                        ends = [point(source), point(c)]
                        ax.plot([x[xcol] for x in ends], [x[col] for x in ends], ":" if other else "--",
                                color=f"C{i}")
                        ax.plot([ends[1][xcol]], [ends[1][col]], "x" if other else "s", ms=8 if other else 6,
                                color=f"C{i}", mfc="none" if ends[1][4] else f"C{i}",
                                label=None if other else f"{label}, trained on from {source['num_steps']} "
                                                         "(dotted: other seeds)")
                if row == 0:
                    for cell, (marker, recipe) in stars.items():
                        c = cells.get((arm, cell))
                        if c and "fd" in c:
                            ax.plot([point(c)[0]], [point(c)[col]], marker, ms=11, color=f"C{i}",
                                    label=f"{label}, {recipe}")
    xaxes = (("training minutes (2 CPU cores; hollow: estimated)", [2, 5, 10, 20, 40, 80, 160]),
             (f"training steps (batch {BATCH})", [350, 1000, 2000, 4000, 7000, 14000, 28000]))
    for row, (xlabel, ticks) in enumerate(xaxes):
        for ax, ylabel in ((axes[row][0], "FD_fmnist (lower is better)"), (axes[row][1], "conditioning accuracy")):
            ax.set_xscale("log")
            ax.set_xticks(ticks)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[row][0].set_yscale("log")  # the gap between the arms at FD ~20 stays visible beside FD ~190
    axes[0][1].legend(fontsize=7)
    fig.suptitle(f"{MODEL} on Fashion-MNIST; {SCORE['samples']} samples, {SCORE['sampler']} {SCORE['steps']}, "
                 f"guidance {SCORE['cfg']:g}, EMA {SCORE['ema']:.2f}")
    return save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=("levers", "minutes", "extend", "seeds", "speed", "report"),
                   default="report")
    p.add_argument("--out", default="results/recipe")
    p.add_argument("--arms", default="A,MP")
    p.add_argument("--levers", default=",".join(DEFAULT_LEVERS))
    p.add_argument("--curve-steps", default=",".join(map(str, CURVE_STEPS)))
    p.add_argument("--train-seed", type=int, default=SEED,
                   help="minutes, extend, levers: another training seed (cells '...-seed<S>')")
    p.add_argument("--from-steps", type=int, default=CURVE_STEPS[-1],
                   help=f"extend: the curve's finished run to train on (default {CURVE_STEPS[-1]})")
    p.add_argument("--base-steps", type=int, default=STEPS,
                   help=f"levers on a base recipe of this many steps (default {STEPS}); cells '<lever>@<N>'")
    p.add_argument("--cells", default="", help="seeds: the finished cells to score again, e.g. steps14000,cfg2@14000")
    p.add_argument("--seeds", default="1,2", help="seeds: the sampling seeds (0 is the cell's own score)")
    p.add_argument("--guidance", type=float, default=None,
                   help="seeds: score at this guidance instead of the cell's (then seed 0 is scored too)")
    p.add_argument("--list", action="store_true", help="print the levers and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(f"{lv.name}: {lv.what}" for lv in LEVERS.values()))
        return 0
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS] + [lv for lv in args.levers.split(",") if lv not in LEVERS]
    if args.base_steps < 1:
        print(f"recipe: --base-steps must be at least 1 (got {args.base_steps})", file=sys.stderr)
        return 2
    if unknown:
        print(f"recipe: unknown arm or lever {', '.join(unknown)}: arms {', '.join(ARMS)}; see --list",
              file=sys.stderr)
        return 2
    torch.set_flush_denormal(True)
    out = Path(args.out)
    if args.what == "levers":
        for name in args.levers.split(","):
            for arm in arms:
                run_cell(out, arm, LEVERS[name].at(args.base_steps, args.train_seed))
    elif args.what == "minutes":
        curve_cells(out, arms, [int(n) for n in args.curve_steps.split(",")], args.train_seed)
    elif args.what == "extend":
        to = [int(n) for n in args.curve_steps.split(",") if int(n) > args.from_steps]
        if not to:
            print(f"recipe: extend needs --curve-steps beyond --from-steps {args.from_steps}", file=sys.stderr)
            return 2
        extend_cells(out, arms, args.from_steps, to, args.train_seed)
    elif args.what == "seeds":
        rescore(out, arms, [c for c in args.cells.split(",") if c], [int(n) for n in args.seeds.split(",")],
                args.guidance)
    elif args.what == "speed":
        speed(out, arms)
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
