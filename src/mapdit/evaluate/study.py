"""`mapdit study`: the paper's CPU-sized study on Fashion-MNIST in one resumable command, and RESULTS.md.

Studies (`--studies`, all by default), each scored with FD_fmnist against the 10k test images and the
class-conditioning accuracy of the `fmnist` classifier, every variant with the same budget:

    configs     Configs A-E (adaln): FD, accuracy, parameters, step time, residual magnitude per block
    modulation  Config E with adaln, scale, shift, rotate, scale+rotate: FD, accuracy, parameters vs adaln
    lr          Configs A and E at 1e-4, 1e-3, 1e-2; a non-finite loss is recorded as "diverged at step N"
    ema         FD against the post-hoc EMA width for the best Config E run of `configs` (a curve)
    grid        samples of Config A next to Config E (seed = the first seed), same budget

Out folder (--out, default results/study):
    study.json                     the budget and the command; a rerun with another budget is refused
    configs/, modulation/          `mapdit ablate` folders (runs/, results/, ablation.md, log.txt)
    lr/lr1e-04/, lr/lr1e-03/, ...  one ablate folder per learning rate; diverged/<variant>.json
    ema/ema.json, ema/fd_vs_ema_width.png
    grid/A_vs_E.png, configs/residual_A_vs_E.png
Resumable: finished variants (result JSON present) are skipped by `run_ablation`; interrupted ones
continue their run; diverged ones stay recorded; EMA widths already scored are not resampled.
Variants shared between studies (E-adaln of configs in modulation; A at 1e-4 and E at 1e-2 in lr, which
are the default rates of those configs) are trained once: their result is copied.

RESULTS.md is regenerated from the stored results at the end of every run (also `--report-only`); its
PNGs are copied to --docs-dir (default docs/results) and linked relative to the document.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from mapdit.errors import UserError

STUDIES = ("configs", "modulation", "lr", "ema", "grid")
CONFIGS = ("A", "B", "C", "D", "E")
MODULATIONS = ("adaln", "scale", "shift", "rotate", "scale+rotate")
LRS = (1e-4, 1e-3, 1e-2)
LR_CONFIGS = ("A", "E")

# Budgets. Full: the demo's model and batch for 600 steps (~2 min of training per run on 2 idle cores),
# 3 seeds, so that all 39 runs fit in about 1.5-2 hours. Quick: about 10 minutes for every study with one
# seed (9 min measured on 2 cores); its numbers are a smoke test, not evidence.
FULL = {"model": "DiT-XXS/4", "num_steps": 600, "batch_size": 64, "seeds": [0, 1, 2], "fid_samples": 1000,
        "sampler": "ddim", "sampling_steps": 25, "ema_sweep": "0.03:0.15:0.02"}
QUICK = {"model": "DiT-XXS/4", "num_steps": 300, "batch_size": 32, "seeds": [0], "fid_samples": 500,
         "sampler": "ddim", "sampling_steps": 20, "ema_sweep": "0.03:0.15:0.04"}

# paper numbers (arXiv 2505.19122) the study is compared with
PAPER_FID_DROP = 12.8  # % lower FID of full MP (Config E) against the baseline (Config A)
PAPER_SCALE_ROTATE_PARAMS = 5.4  # % fewer parameters of scale+rotate than adaln

_NONFINITE = re.compile(r"non-finite.*? at step (\d+)")


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> dict | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def _pm(s: dict | None, digits: int = 3, scale: float = 1.0, suffix: str = "") -> str:
    """'mean ± sample std' (just the mean for one seed), '-' when nothing is there."""
    if s is None:
        return "-"
    text = f"{s['mean'] * scale:.{digits}f}{suffix}"
    return text if s["std"] is None else f"{text} ± {s['std'] * scale:.{digits}f}{suffix}"


def _lr_tag(lr: float) -> str:
    return f"lr{lr:.0e}"


def _default_lr(model: str, config: str) -> float:
    """The rate `train` picks when none is given: 1e-2 with weight normalisation, else 1e-4."""
    from mapdit.config import make_config

    cfg = make_config(model, preset=config)
    return 1e-2 if (cfg.weight_normalization or cfg.forced_weight_normalization) else 1e-4


def _wall_time(run_dir: str | Path) -> float | None:
    """Training wall time of a run: elapsed_s of the last metrics.csv row."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        times = [float(r["elapsed_s"]) for r in csv.DictReader(f) if r.get("elapsed_s")]
    return times[-1] if times else None


SCORE_EMA = 0.05  # the EMA width every variant is scored with (the smallest tracked one)


def _heldout(run_dir: str | Path, ema_std: float = SCORE_EMA) -> float | None:
    """Held-out ε-MSE of a run (test split, fixed noise and t; cached beside the run), None if it cannot
    be computed (e.g. the run folder is gone)."""
    from mapdit.evaluate.heldout import heldout_for_run

    if not (Path(run_dir) / "config.json").is_file():
        return None
    return heldout_for_run(run_dir, weights="ema", ema_std=ema_std)["mse"]


def _pm_heldout(g: list[dict]) -> tuple[str, dict | None]:
    st = _stats([_heldout(r["run_dir"]) for r in g])
    return _pm(st, 4), st


def _results(folder: Path) -> list[dict]:
    from mapdit.runio import read_json

    return [read_json(p) for p in sorted((folder / "results").glob("*.json"))] if folder.is_dir() else []


def _group(results: list[dict], key: Callable[[dict], object]) -> dict:
    groups: dict = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        groups.setdefault(key(r), []).append(r)
    return groups


def _lr_folders(out: Path) -> list[tuple[float, Path]]:
    found = []
    for p in sorted((out / "lr").glob("lr*")):
        try:
            found.append((float(p.name[2:]), p))
        except ValueError:
            continue
    return sorted(found)


def _copy_result(src: Path, dst: Path, **settings) -> bool:
    """Reuse a finished variant of another study: copy its result JSON (settings patched) unless `dst` exists."""
    from mapdit.runio import read_json, write_json

    if dst.exists() or not src.is_file():
        return False
    result = read_json(src)
    result["settings"] = dict(result["settings"], **settings)
    result["reused_from"] = str(src)
    write_json(dst, result)
    return True


# ------------------------------------------------------------------------------------------------
# The studies
# ------------------------------------------------------------------------------------------------
def _lr_study(out: Path, common: dict, seeds: list[int], lrs: list[float], say) -> dict:
    from mapdit.evaluate.ablate import run_ablation
    from mapdit.runio import write_json

    trained, skipped, diverged = [], [], []
    for lr in lrs:
        folder = out / "lr" / _lr_tag(lr)
        for config in LR_CONFIGS:
            if math.isclose(lr, _default_lr(common["model"], config)):
                for s in seeds:
                    name = f"{config}-adaln-seed{s}.json"
                    if _copy_result(out / "configs" / "results" / name, folder / "results" / name, lr=lr):
                        say(f"lr {lr:g}: {name[:-5]} reused from the configs study (its default rate)")
            for s in seeds:
                name = f"{config}-adaln-seed{s}"
                record = folder / "diverged" / f"{name}.json"
                if record.is_file():
                    say(f"lr {lr:g}: {name} skipped, diverged before ({record})")
                    diverged.append(f"{_lr_tag(lr)}/{name}")
                    continue
                try:
                    summary = run_ablation(configs=[config], modulations=["adaln"], seeds=[s], out=folder, lr=lr,
                                           **common)
                except UserError as err:
                    m = _NONFINITE.search(str(err))
                    if m is None:
                        raise
                    write_json(record, {"name": name, "config": config, "modulation": "adaln", "seed": s, "lr": lr,
                                        "diverged_at_step": int(m.group(1)), "message": str(err)})
                    say(f"lr {lr:g}: {name} diverged at step {m.group(1)} (recorded in {record})")
                    diverged.append(f"{_lr_tag(lr)}/{name}")
                    continue
                trained += [f"{_lr_tag(lr)}/{n}" for n in summary["trained"]]
                skipped += [f"{_lr_tag(lr)}/{n}" for n in summary["skipped"]]
    return {"trained": trained, "skipped": skipped, "diverged": diverged}


def best_run(results: list[dict], variant: str = "E-adaln") -> dict | None:
    """The result with the lowest distance among `variant`'s seeds."""
    group = [r for r in results if r["variant"] == variant and r.get("value") is not None]
    return min(group, key=lambda r: r["value"]) if group else None


def _ema_study(out: Path, opts: dict, sweep: list[float], say) -> dict:
    from mapdit.evaluate.fid_cli import fid_for_run
    from mapdit.runio import load_run_config, read_json, write_json

    best = best_run(_results(out / "configs"))
    if best is None:
        raise UserError("the ema study needs a finished Config E run of the configs study: add configs to --studies")
    path = out / "ema" / "ema.json"
    stored = read_json(path) if path.is_file() else {}
    if stored.get("run_dir") != best["run_dir"]:
        stored = {"run_dir": best["run_dir"], "variant": best["variant"], "seed": best["seed"], "points": {}}
    tracked = {f"{v:.3f}" for v in load_run_config(best["run_dir"])["train"]["ema_stds"]}
    trained, skipped = [], []
    for sigma in sweep:
        key = f"{sigma:.3f}"
        if key in stored["points"]:
            skipped.append(key)
            continue
        fid = fid_for_run(best["run_dir"], opts["fid_samples"], features="fmnist", weights="ema", ema_std=sigma,
                          sampler=opts["sampler"], steps=opts["sampling_steps"], seed=best["seed"],
                          batch_size=opts["sample_batch_size"], cache_dir=opts["cache_dir"],
                          num_ref=opts["num_ref"], device=opts["device"], progress=opts["progress"], log=say)
        stored["points"][key] = {"sigma_rel": sigma, "value": fid["value"], "metric": fid["metric"],
                                 "conditioning_accuracy": fid.get("conditioning_accuracy"),
                                 "weights": "tracked EMA" if key in tracked else "post-hoc EMA",
                                 "fid_json": fid["result_json"]}
        write_json(path, stored)  # after every width: an interrupted sweep resumes here
        trained.append(key)
    write_json(path, stored)
    return {"trained": trained, "skipped": skipped}


def _grid_study(out: Path, opts: dict, seed: int, say) -> dict:
    from mapdit.evaluate.fid_cli import sample_grid_from_model
    from mapdit.runio import load_run_config
    from mapdit.weights import load_model

    target = out / "grid" / "A_vs_E.png"
    if target.is_file():
        say(f"grid: skipped, {target} exists")
        return {"trained": [], "skipped": ["grid"]}
    results = {r["variant"]: r for r in _results(out / "configs") if r["seed"] == seed}
    missing = [v for v in ("A-adaln", "E-adaln") if v not in results]
    if missing:
        raise UserError(f"the grid study needs {', '.join(missing)} (seed {seed}) of the configs study")
    panels = []
    for config in ("A", "E"):
        run_dir = results[f"{config}-adaln"]["run_dir"]
        model, _, desc = load_model(run_dir, weights="ema", device=opts["device"] or "cpu", log=say)
        png = out / "grid" / f"{config}.png"
        if png.exists():
            png.unlink()
        sample_grid_from_model(model, load_run_config(run_dir)["data"], png, per_class=8,
                               sampler=opts["sampler"], steps=opts["sampling_steps"], cfg_scale=1.0, seed=0,
                               batch_size=opts["sample_batch_size"])
        panels.append((config, png, desc))
    _side_by_side(panels, target)
    say(f"grid -> {target}")
    return {"trained": ["grid"], "skipped": []}


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from mapdit.runio import atomic_write

    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path


def _side_by_side(panels: list[tuple[str, Path, str]], path: Path) -> Path:
    import numpy as np
    from PIL import Image

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.6), dpi=100)
    for ax, (config, png, desc) in zip(np.atleast_1d(axes), panels):
        ax.imshow(np.asarray(Image.open(png).convert("L")), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"Config {config}\n{desc}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_residuals(results: list[dict], path: Path, variants=("A-adaln", "E-adaln")) -> Path | None:
    """Residual-stream magnitude per block at the end of training: mean over seeds, min-max band."""
    groups = _group([r for r in results if r["variant"] in variants], lambda r: r["variant"])
    if not groups:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for variant in variants:
        group = groups.get(variant)
        if not group:
            continue
        per_block = list(zip(*[r["final_residual_magnitudes"] for r in group]))
        blocks = list(range(len(per_block)))
        mean = [statistics.mean(v) for v in per_block]
        label = f"Config {variant.split('-')[0]} ({len(group)} seed{'s' if len(group) > 1 else ''})"
        line, = ax.plot(blocks, mean, marker="o", label=label)
        ax.set_xticks(blocks)
        ax.fill_between(blocks, [min(v) for v in per_block], [max(v) for v in per_block], alpha=0.25,
                        color=line.get_color())
    ax.set_xlabel("block")
    ax.set_ylabel("residual-stream magnitude (RMS)")
    ax.set_title("Residual stream at the end of training (mean over seeds, band: min-max)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_ema(stored: dict, path: Path) -> Path | None:
    points = sorted(stored.get("points", {}).values(), key=lambda p: p["sigma_rel"])
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([p["sigma_rel"] for p in points], [p["value"] for p in points], marker="o")
    best = min(points, key=lambda p: p["value"])
    ax.axvline(best["sigma_rel"], color="gray", linestyle=":", label=f"best sigma_rel {best['sigma_rel']:.3f}")
    ax.set_xlabel("EMA width sigma_rel (post hoc)")
    ax.set_ylabel("FD_fmnist")
    heldout = [_heldout(stored["run_dir"], p["sigma_rel"]) for p in points]
    if all(h is not None for h in heldout):
        ax2 = ax.twinx()
        ax2.plot([p["sigma_rel"] for p in points], heldout, marker="s", color="tab:orange", label="held-out ε-MSE")
        ax2.set_ylabel("held-out ε-MSE", color="tab:orange")
    ax.set_title(f"{stored.get('variant', '')} seed {stored.get('seed', '')}: FD against the EMA width", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------
# RESULTS.md
# ------------------------------------------------------------------------------------------------
TEMPLATE = """# MaP-DiT on Fashion-MNIST: the study

{quick_note}Generated by `mapdit study` from the stored results in `{out}` (regenerated on every run; do not edit).
Command:

    {command}

## Budget

Every variant gets the same CPU budget: {model} ({params_note}), {num_steps} training steps of batch
{batch_size} (learning rate: the config's default, 1e-4 without weight normalisation and 1e-2 with it, except
in the learning-rate study), seeds {seeds}. Measured training wall time per variant (metrics.csv, last
row): {wall}. {total}Scoring: FD_fmnist of {fid_samples} samples ({sampler} {sampling_steps} steps, cfg 1, EMA
sigma_rel 0.05) against the 10k Fashion-MNIST test images, in the feature space of the project's `fmnist`
classifier, and the conditioning accuracy (the classifier agreeing with the sampled label). {sampler_note}
Held-out ε-MSE: the training objective's ε error on the first 2000 test images, each noised at a
stratified t with noise fixed by seed 0 (identical for every variant, so the comparison is paired; same EMA
width as the FD), by `mapdit.evaluate.heldout`. At this budget the samples are far from the data and FDs
bunch together; the held-out error separates variants far more clearly.
Spread: mean ± sample standard deviation over seeds (no ± with one seed); the magnitude plot's band is
min-max over seeds. Residual magnitudes: raw weights at the last checkpoint, a fixed batch at t=500.

## 1. Configs A-E (modulation adaln)

{configs_table}

{residual_plot}

## 2. Modulation on top of full MP (Config E)

{modulation_table}

## 3. Learning rate (Configs A and E)

{lr_table}

## 4. Post-hoc EMA width (best Config E run)

{ema_table}

{ema_plot}

## 5. Samples after the same budget

{grid}

## Against the paper

{comparison}
"""


PRESETS_NOTE = (f"Budgets: the default (full) study trains every variant for {FULL['num_steps']} steps of batch "
                f"{FULL['batch_size']} ({FULL['model']}, the README demo's model and batch, ~2 min of training per "
                f"run on 2 idle cores) with seeds {','.join(map(str, FULL['seeds']))} and scores {FULL['fid_samples']} "
                f"samples "
                f"({FULL['sampler']} {FULL['sampling_steps']} steps): 39 training runs (13 distinct variants "
                f"x 3 seeds), about 1.5-2 hours on 2 cores. `--quick`: {QUICK['num_steps']} steps of batch "
                f"{QUICK['batch_size']}, seed {QUICK['seeds'][0]}, {QUICK['fid_samples']} samples ({QUICK['sampler']} "
                f"{QUICK['sampling_steps']} steps), about 10 minutes on 2 cores; quick numbers are not evidence.\n\n")


def _rel(path: Path, doc: Path) -> str:
    import os

    return Path(os.path.relpath(path.resolve(), doc.resolve().parent)).as_posix()


def _publish(png: Path | None, docs_dir: Path, doc: Path, alt: str) -> str:
    if png is None or not png.is_file():
        return f"_({alt}: not made yet)_"
    docs_dir.mkdir(parents=True, exist_ok=True)
    target = docs_dir / png.name
    shutil.copyfile(png, target)
    return f"![{alt}]({_rel(target, doc)})"


def _configs_section(results: list[dict]) -> tuple[str, dict]:
    groups = _group(results, lambda r: r["config"])
    lines = ["| config | lr | seeds | parameters | step time (ms) | wall time (s) | held-out ε-MSE | FD_fmnist | "
             "cond. acc. | max block magnitude | residual magnitude per block (mean over seeds) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    summary = {}
    for config in sorted(groups):
        g = groups[config]
        fd = _stats([r["value"] for r in g])
        per_block = [statistics.mean(v) for v in zip(*[r["final_residual_magnitudes"] for r in g])]
        heldout, ho = _pm_heldout(g)
        summary[config] = {"fd": fd, "params": g[0]["parameters"], "per_block": per_block, "heldout": ho,
                           "max": _stats([r["max_block_magnitude"] for r in g])}
        lr = g[0]["settings"].get("lr")
        lines.append(f"| {config} | {'default' if lr is None else f'{lr:g}'} | {' '.join(str(r['seed']) for r in g)} | "
                     f"{g[0]['parameters']:,} | {_pm(_stats([r.get('step_time_ms') for r in g]), 1)} | "
                     f"{_pm(_stats([_wall_time(r['run_dir']) for r in g]), 1)} | {heldout} | {_pm(fd, 2)} | "
                     f"{_pm(_stats([r.get('conditioning_accuracy') for r in g]), 1, 100, '%')} | "
                     f"{_pm(summary[config]['max'], 3)} | {', '.join(f'{v:.3g}' for v in per_block)} |")
    return ("\n".join(lines) if groups else "_(not run yet)_"), summary


def modulation_label(modulation: str) -> str:
    """The paper's name of a canonical modulation: 'scale+rotate+gate' -> 'scale+rotate' (every named
    variant carries a gate), 'adaln' stays, a gateless one gets '+nogate'."""
    if modulation == "adaln":
        return modulation
    return modulation.removesuffix("+gate") if modulation.endswith("+gate") else modulation + "+nogate"


def _modulation_section(results: list[dict]) -> tuple[str, dict]:
    groups = _group(results, lambda r: modulation_label(r["modulation"]))
    base = groups.get("adaln", [{}])[0].get("parameters")
    lines = ["| modulation | seeds | parameters | vs adaln | step time (ms) | held-out ε-MSE | FD_fmnist | cond. acc. |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for mod in [m for m in MODULATIONS if m in groups] + sorted(set(groups) - set(MODULATIONS)):
        g = groups[mod]
        params = g[0]["parameters"]
        delta = None if not base else 100.0 * (params - base) / base
        heldout, ho = _pm_heldout(g)
        summary[mod] = {"fd": _stats([r["value"] for r in g]), "params": params, "delta": delta, "heldout": ho}
        lines.append(f"| {mod} | {' '.join(str(r['seed']) for r in g)} | {params:,} | "
                     f"{'-' if delta is None else f'{delta:+.1f}%'} | "
                     f"{_pm(_stats([r.get('step_time_ms') for r in g]), 1)} | {heldout} | {_pm(summary[mod]['fd'], 2)} | "
                     f"{_pm(_stats([r.get('conditioning_accuracy') for r in g]), 1, 100, '%')} |")
    return ("\n".join(lines) if groups else "_(not run yet)_"), summary


def _lr_section(out: Path) -> tuple[str, dict]:
    from mapdit.runio import read_json

    lines = ["| config | lr | seeds finished | diverged | held-out ε-MSE | FD_fmnist | cond. acc. | max block magnitude |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    summary = {}
    for lr, folder in _lr_folders(out):
        groups = _group(_results(folder), lambda r: r["config"])
        div = [read_json(p) for p in sorted((folder / "diverged").glob("*.json"))]
        for config in sorted(set(groups) | {d["config"] for d in div}):
            g = groups.get(config, [])
            dv = [d for d in div if d["config"] == config]
            fd = _stats([r["value"] for r in g])
            heldout, ho = _pm_heldout(g)
            summary[(config, lr)] = {"fd": fd, "diverged": len(dv), "finished": len(g), "heldout": ho}
            diverged = ", ".join(f"seed {d['seed']}: diverged at step {d['diverged_at_step']}" for d in dv) or "no"
            acc = _pm(_stats([r.get("conditioning_accuracy") for r in g]), 1, 100, "%")
            lines.append(f"| {config} | {lr:g} | {' '.join(str(r['seed']) for r in g) or '-'} | {diverged} | "
                         f"{heldout} | {_pm(fd, 2)} | {acc} | {_pm(_stats([r['max_block_magnitude'] for r in g]), 3)} |")
    return ("\n".join(lines) if summary else "_(not run yet)_"), summary


def _ema_section(stored: dict) -> str:
    points = sorted(stored.get("points", {}).values(), key=lambda p: p["sigma_rel"])
    if not points:
        return "_(not run yet)_"
    lines = [f"Run: `{stored['run_dir']}` ({stored['variant']}, seed {stored['seed']}, the lowest FD of its seeds).",
             "", "| sigma_rel | weights | held-out ε-MSE | FD_fmnist | cond. acc. |", "|---:|---|---:|---:|---:|"]
    for p in points:
        acc = p.get("conditioning_accuracy")
        ho = _heldout(stored["run_dir"], p["sigma_rel"])
        lines.append(f"| {p['sigma_rel']:.3f} | {p.get('weights') or '-'} | {'-' if ho is None else f'{ho:.4f}'} | "
                     f"{p['value']:.2f} | "
                     f"{'-' if acc is None else f'{100 * acc:.1f}%'} |")
    return "\n".join(lines)


def _comparison(configs: dict, modulation: dict, lr: dict, ema: dict, quick: bool) -> str:
    out = []
    if "A" in configs and "E" in configs:
        a, e = configs["A"]["fd"]["mean"], configs["E"]["fd"]["mean"]
        drop = 100.0 * (a - e) / a
        verdict = "agrees in direction" if drop > 0 else "disagrees"
        out.append(f"- FD: Config E is {abs(drop):.1f}% {'lower' if drop >= 0 else 'higher'} than Config A "
                   f"({e:.2f} vs {a:.2f}); the paper reports ~{PAPER_FID_DROP}% lower FID with full MP: {verdict}.")
        ha, he = configs["A"].get("heldout"), configs["E"].get("heldout")
        if ha and he:
            drop = 100.0 * (ha["mean"] - he["mean"]) / ha["mean"]
            out.append(f"- Held-out ε-MSE: Config E is {abs(drop):.1f}% {'lower' if drop >= 0 else 'higher'} than "
                       f"Config A ({_pm(he, 4)} vs {_pm(ha, 4)}): "
                       f"{'agrees' if drop > 0 else 'disagrees'} in direction with the paper's lower FID.")
        pa, pe = configs["A"]["per_block"], configs["E"]["per_block"]
        grow_a, grow_e = pa[-1] / pa[0], pe[-1] / pe[0]
        grows, bounded = grow_a > 1.1, max(pe) < max(pa) and grow_e < grow_a
        verdict = "agrees" if grows and bounded else "partly agrees" if grows or bounded else "disagrees"
        out.append(f"- Activations: the residual magnitude changes {grow_a:.2f}x from the first to the last block "
                   f"without MP (max {max(pa):.3g}) and {grow_e:.2f}x with MP (max {max(pe):.3g}); the paper: bounded "
                   f"with MP, growing without (growing counted as > 1.1x here): {verdict}.")
    if "scale+rotate" in modulation and "adaln" in modulation:
        sr, ad = modulation["scale+rotate"], modulation["adaln"]
        gap = 100.0 * (sr["fd"]["mean"] - ad["fd"]["mean"]) / ad["fd"]["mean"]
        out.append(f"- Modulation: scale+rotate has {-sr['delta']:.1f}% fewer parameters than adaln at this size "
                   f"(paper: ~{PAPER_SCALE_ROTATE_PARAMS}% at its sizes; the share depends on width and depth) and "
                   f"an FD {gap:+.1f}% against adaln; the paper finds it competitive: "
                   f"{'agrees' if gap <= 10 else 'disagrees'} (within 10% counted as competitive).")
        if sr.get("heldout") and ad.get("heldout"):
            gap = 100.0 * (sr["heldout"]["mean"] - ad["heldout"]["mean"]) / ad["heldout"]["mean"]
            out.append(f"- Modulation, held-out ε-MSE: scale+rotate {_pm(sr['heldout'], 4)} vs adaln "
                       f"{_pm(ad['heldout'], 4)} ({gap:+.1f}%): {'competitive' if gap <= 5 else 'worse'} "
                       f"(within 5% counted as competitive).")
    if lr:
        def best_lr(config, metric="fd"):
            cands = [(v[metric]["mean"], r) for (c, r), v in lr.items() if c == config and v.get(metric) is not None]
            return min(cands)[1] if cands else None

        for config, paper in (("A", 1e-4), ("E", 1e-2)):
            best, best_ho = best_lr(config), best_lr(config, "heldout")
            div = [f"{r:g}" for (c, r), v in sorted(lr.items()) if c == config and v["diverged"]]
            if best is None and not div:
                continue
            out.append(f"- Learning rate, Config {config}: best FD at {'-' if best is None else f'{best:g}'}"
                       + (f"; diverged at {', '.join(div)}" if div else "; no divergence")
                       + f"; the paper uses {paper:g}: "
                       + ("agrees" if best is not None and math.isclose(best, paper) else "disagrees")
                       + ("" if best_ho is None else f"; lowest held-out ε-MSE at {best_ho:g}: "
                          + ("agrees" if math.isclose(best_ho, paper) else "disagrees")) + ".")
        tuned = {}
        for config in ("A", "E"):
            cands = [(v["heldout"]["mean"], r, v) for (c, r), v in lr.items() if c == config and v.get("heldout")]
            if cands:
                tuned[config] = min(cands, key=lambda x: x[0])
        if len(tuned) == 2:
            (ha, ra, va), (he, re_, ve) = tuned["A"], tuned["E"]
            fd = (f"; FD {_pm(va['fd'], 2)} vs {_pm(ve['fd'], 2)}" if va.get("fd") and ve.get("fd") else "")
            out.append(f"- Each config at its own best rate (held-out ε-MSE): A at {ra:g} {_pm(va['heldout'], 4)}, "
                       f"E at {re_:g} {_pm(ve['heldout'], 4)}{fd}: "
                       + ("full MP is ahead even against a tuned baseline." if he < ha else
                          "the baseline is ahead once it gets a tuned rate, so at this budget the MP advantage "
                          "at the default rates comes from the rate, not from magnitude preservation."))
    points = ema.get("points", {})
    if points:
        best = min(points.values(), key=lambda p: p["value"])
        text = f"- Post-hoc EMA: the lowest FD is at sigma_rel {best['sigma_rel']:.3f} ({best['value']:.2f})"
        run_dir = ema.get("run_dir")
        heldout = {p["sigma_rel"]: _heldout(run_dir, p["sigma_rel"]) for p in points.values()} if run_dir else {}
        if heldout and all(v is not None for v in heldout.values()):
            sigma = min(heldout, key=heldout.get)
            text += f"; the lowest held-out ε-MSE at sigma_rel {sigma:.3f} ({heldout[sigma]:.4f})"
        out.append(text + ".")
    if not out:
        return "_(nothing to compare yet)_"
    if quick:
        out.append("- These are `--quick` numbers (one seed, a few hundred steps): a smoke test, not evidence.")
    return "\n".join(out)


def write_results_md(out: str | Path, results_md: str | Path = "RESULTS.md",
                     docs_dir: str | Path = "docs/results") -> Path:
    """RESULTS.md from what is stored in `out` (each study's table, the plots copied to docs_dir)."""
    from mapdit.runio import read_json, write_text

    out, doc, docs_dir = Path(out), Path(results_md), Path(docs_dir)
    meta = read_json(out / "study.json") if (out / "study.json").is_file() else {}
    s = meta.get("settings", {})
    quick = bool(meta.get("quick"))
    if not meta:  # nothing run yet: the document states the default (full) budget and how to run it
        s = FULL
        meta = {"command": f"mapdit study --out {out}"}
    configs_results = _results(out / "configs")
    configs_table, configs = _configs_section(configs_results)
    modulation_table, modulation = _modulation_section(_results(out / "modulation"))
    lr_table, lr = _lr_section(out)
    ema = read_json(out / "ema" / "ema.json") if (out / "ema" / "ema.json").is_file() else {}
    residual_png = plot_residuals(configs_results, out / "configs" / "residual_A_vs_E.png")
    ema_png = plot_ema(ema, out / "ema" / "fd_vs_ema_width.png")
    grid_png = out / "grid" / "A_vs_E.png"
    walls = _stats([_wall_time(r["run_dir"]) for folder in [out / "configs", out / "modulation",
                                                            *[f for _, f in _lr_folders(out)]]
                    for r in _results(folder) if "reused_from" not in r])
    params = {c: v["params"] for c, v in configs.items()}
    text = TEMPLATE.format(
        quick_note=(("**`--quick` run: one seed and a few hundred steps per variant. These numbers only show that "
                     "the pipeline works; they are not evidence for or against the paper.**\n\n") if quick else "")
        + ("" if (out / "study.json").is_file()
           else f"**No results stored yet in `{out}`: run the command below.**\n\n")
        + PRESETS_NOTE,
        out=out, command=meta.get("command", "mapdit study"), model=s.get("model", "?"),
        params_note=(", ".join(f"{c}: {n:,}" for c, n in sorted(params.items())) + " parameters") if params
        else "parameters in the tables",
        num_steps=s.get("num_steps", "?"), batch_size=s.get("batch_size", "?"),
        seeds=", ".join(map(str, s.get("seeds", []))) or "?",
        total=(f"Whole study (training, scoring, plots; summed over its invocations): "
               f"{meta['elapsed_s'] / 60:.0f} min on {meta.get('machine', 'this machine')}. ")
        if meta.get("elapsed_s") else "",
        wall="-" if walls is None else f"{walls['mean']:.1f} s mean (min {walls['min']:.1f}, max {walls['max']:.1f}) "
                                        f"over {walls['n']} runs",
        fid_samples=s.get("fid_samples", "?"), sampler=s.get("sampler", "?"),
        sampling_steps=s.get("sampling_steps", "?"),
        sampler_note=("DDIM with few steps instead of the 250-step ancestral default keeps scoring affordable on CPU; "
                      "absolute FD values are not comparable with 250-step ones; all variants "
                      "are scored with identical settings.") if s.get("sampler") == "ddim" else
                     (f"{s.get('sampler')} (diffusers' ODE solver, see `benchmarks/samplers.py`) with few steps "
                      "instead of the 250-step ancestral default keeps scoring affordable on CPU; all variants are "
                      "scored with identical settings.") if s.get("sampler") not in (None, "ddpm", "ancestral") else "",
        configs_table=configs_table,
        residual_plot=_publish(residual_png, docs_dir, doc, "residual magnitude per block, Config A vs E"),
        modulation_table=modulation_table, lr_table=lr_table, ema_table=_ema_section(ema),
        ema_plot=_publish(ema_png, docs_dir, doc, "FD against post-hoc EMA width"),
        grid=_publish(grid_png if grid_png.is_file() else None, docs_dir, doc, "samples, Config A (left) vs E (right)"),
        comparison=_comparison(configs, modulation, lr, ema, quick))
    return write_text(doc, text)


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------
def run_study(*, out: str | Path = "results/study", quick: bool = False, studies: list[str] = STUDIES,
              model: str | None = None, num_steps: int | None = None, batch_size: int | None = None,
              seeds: list[int] | None = None, fid_samples: int | None = None, sampler: str | None = None,
              sampling_steps: int | None = None, ema_sweep: str | None = None, configs: list[str] = CONFIGS,
              modulations: list[str] = MODULATIONS, lrs: list[float] = LRS, num_ref: int | None = None,
              ema_snapshots: int = 100, sample_batch_size: int = 64, magnitude_batch_size: int = 64,
              log_every: int = 10, device: str | None = None, cache_dir=None, progress: bool = True,
              results_md: str | Path | None = "RESULTS.md", docs_dir: str | Path = "docs/results",
              command: str | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run the chosen studies (skipping what is finished) and regenerate RESULTS.md. Returns
    {"studies": {name: {"trained", "skipped", ...}}, "results_md": path or None}."""
    from mapdit.ema import parse_sweep
    from mapdit.evaluate.ablate import run_ablation
    from mapdit.evaluate.fid_cli import _DEFAULT_CACHE
    from mapdit.runio import read_json, write_json

    out = Path(out)
    base = QUICK if quick else FULL
    settings = {"model": model or base["model"], "num_steps": num_steps or base["num_steps"],
                "batch_size": batch_size or base["batch_size"],
                "seeds": [int(s) for s in (base["seeds"] if seeds is None else seeds)],
                "fid_samples": fid_samples or base["fid_samples"], "sampler": sampler or base["sampler"],
                "sampling_steps": sampling_steps or base["sampling_steps"], "num_ref": num_ref}
    sweep = parse_sweep(ema_sweep or base["ema_sweep"])
    from mapdit.samplers import check_sampler

    check_sampler(settings["sampler"])  # before any training: an unknown name or a missing diffusers fails now
    unknown = [s for s in studies if s not in STUDIES]
    if unknown or not studies:
        raise UserError(f"--studies: use some of {', '.join(STUDIES)} (got {', '.join(studies) or 'none'})")
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "study.json"
    if meta_path.is_file():
        old = read_json(meta_path)
        differ = [k for k in settings if old.get("settings", {}).get(k) != settings[k]]
        if differ:
            raise UserError(f"{out} holds a study with other settings ({', '.join(differ)} differ): use another --out")
    if command is None:  # every setting spelled out: the exact command that reproduces (and resumes) this
        command = " ".join(["mapdit study", *(["--quick"] if quick else []), f"--out {shlex.quote(str(out))}",
                            f"--studies {','.join(s for s in STUDIES if s in studies)}",
                            f"--model {settings['model']}", f"--num-steps {settings['num_steps']}",
                            f"--batch-size {settings['batch_size']}",
                            f"--seeds {','.join(map(str, settings['seeds']))}",
                            f"--fid-samples {settings['fid_samples']}", f"--sampler {settings['sampler']}",
                            f"--sampling-steps {settings['sampling_steps']}",
                            f"--ema-sweep {ema_sweep or base['ema_sweep']}",
                            *([f"--configs {','.join(configs)}"] if tuple(configs) != CONFIGS else []),
                            *([f"--modulations {','.join(modulations)}"] if tuple(modulations) != MODULATIONS else []),
                            *([f"--lrs {','.join(f'{lr:g}' for lr in lrs)}"] if tuple(lrs) != LRS else []),
                            *([f"--num-ref {num_ref}"] if num_ref is not None else [])])
    elapsed_before = read_json(meta_path).get("elapsed_s", 0.0) if meta_path.is_file() else 0.0
    started = time.perf_counter()
    meta = {"settings": settings, "quick": quick, "command": command, "elapsed_s": elapsed_before,
            "machine": f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"}
    write_json(meta_path, meta)

    def say(msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] study: {msg}"
        (log or (lambda m: print(m, file=sys.stderr)))(line)

    common = {"model": settings["model"], "num_steps": settings["num_steps"], "batch_size": settings["batch_size"],
              "data_path": "fashion-mnist", "fid_samples": settings["fid_samples"], "features": "fmnist",
              "num_ref": num_ref, "sampler": settings["sampler"], "sampling_steps": settings["sampling_steps"],
              "cfg_scale": 1.0, "weights": "ema", "ema_std": None, "sample_batch_size": sample_batch_size,
              "magnitude_batch_size": magnitude_batch_size, "ema_snapshots": ema_snapshots, "log_every": log_every,
              "device": device, "cache_dir": cache_dir, "progress": progress, "log": log}
    opts = dict(common, cache_dir=_DEFAULT_CACHE if cache_dir is None else cache_dir)
    seeds = settings["seeds"]
    done: dict[str, dict] = {}
    for study in [s for s in STUDIES if s in studies]:
        say(f"{study} ...")
        if study == "configs":
            summary = run_ablation(configs=list(configs), modulations=["adaln"], seeds=seeds, out=out / "configs",
                                   **common)
        elif study == "modulation":
            for s in seeds:
                name = f"E-adaln-seed{s}.json"
                if "adaln" in modulations and _copy_result(out / "configs" / "results" / name,
                                                           out / "modulation" / "results" / name):
                    say(f"modulation: {name[:-5]} reused from the configs study")
            summary = run_ablation(configs=["E"], modulations=list(modulations), seeds=seeds,
                                   out=out / "modulation", **common)
        elif study == "lr":
            summary = _lr_study(out, common, seeds, list(lrs), say)
        elif study == "ema":
            summary = _ema_study(out, opts, sweep, say)
        else:
            summary = _grid_study(out, opts, seeds[0], say)
        done[study] = {k: summary.get(k, []) for k in ("trained", "skipped", "diverged")}
        write_json(meta_path, dict(meta, elapsed_s=elapsed_before + time.perf_counter() - started))
    md = None
    if results_md is not None:
        md = write_results_md(out, results_md, docs_dir)
        say(f"results -> {md}")
    return {"studies": done, "results_md": md}


# ------------------------------------------------------------------------------------------------
# `mapdit study`
# ------------------------------------------------------------------------------------------------
def cmd_study(args: argparse.Namespace) -> dict:
    from mapdit.evaluate.ablate import _int_list, parse_list

    torch.set_flush_denormal(True)
    if args.report_only:
        md = write_results_md(args.out, args.results_md, args.docs_dir)
        print(md)
        return {"studies": {}, "results_md": md}
    try:
        lrs = [float(x) for x in parse_list(args.lrs, "--lrs")]
    except ValueError:
        raise UserError(f"--lrs {args.lrs!r}: give comma-separated numbers, e.g. 1e-4,1e-3,1e-2") from None
    summary = run_study(
        out=args.out, quick=args.quick, studies=parse_list(args.studies, "--studies"), model=args.model,
        num_steps=args.num_steps, batch_size=args.batch_size,
        seeds=None if args.seeds is None else _int_list(args.seeds, "--seeds"), fid_samples=args.fid_samples,
        sampler=args.sampler, sampling_steps=args.sampling_steps, ema_sweep=args.ema_sweep,
        configs=[c.upper() for c in parse_list(args.configs, "--configs")],
        modulations=parse_list(args.modulations, "--modulations"), lrs=lrs, num_ref=args.num_ref,
        ema_snapshots=args.ema_snapshots, sample_batch_size=args.sample_batch_size,
        magnitude_batch_size=args.magnitude_batch_size, log_every=args.log_every, device=args.device,
        cache_dir=args.cache_dir, results_md=args.results_md, docs_dir=args.docs_dir)
    print(json.dumps({k: {kk: len(vv) for kk, vv in v.items()} for k, v in summary["studies"].items()}))
    if summary["results_md"] is not None:
        print(summary["results_md"])
    return summary


def register(sub) -> None:
    from mapdit.samplers import SAMPLER_CHOICES

    p = sub.add_parser("study", help="the paper's study on Fashion-MNIST (configs, modulation, lr, post-hoc "
                                     "EMA, sample grid) in one resumable command; writes RESULTS.md")
    p.add_argument("--quick", action="store_true",
                   help=f"~10 min on 2 cores: {QUICK['model']}, {QUICK['num_steps']} steps, batch "
                        f"{QUICK['batch_size']}, 1 seed (not evidence); default: {FULL['num_steps']} steps, "
                        f"batch {FULL['batch_size']}, seeds 0,1,2")
    p.add_argument("--out", default="results/study")
    p.add_argument("--studies", default=",".join(STUDIES), help=f"comma-separated subset of {','.join(STUDIES)}")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --quick: 0)")
    p.add_argument("--model", default=None, help=f"default {FULL['model']}")
    p.add_argument("--num-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--fid-samples", type=int, default=None)
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default=None,
                   help="default ddim; dpm++2m, unipc, heun are diffusers' few-step solvers")
    p.add_argument("--sampling-steps", type=int, default=None)
    p.add_argument("--ema-sweep", default=None, help=f"post-hoc EMA widths (default {FULL['ema_sweep']})")
    p.add_argument("--configs", default=",".join(CONFIGS), help="configs of the configs study")
    p.add_argument("--modulations", default=",".join(MODULATIONS), help="modulations of the modulation study")
    p.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS), help="rates of the lr study")
    p.add_argument("--num-ref", type=int, default=None, help="a fixed random subset of the test images")
    p.add_argument("--ema-snapshots", type=int, default=100)
    p.add_argument("--sample-batch-size", type=int, default=64)
    p.add_argument("--magnitude-batch-size", type=int, default=64)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=None, help="reference statistics cache")
    p.add_argument("--results-md", default="RESULTS.md")
    p.add_argument("--docs-dir", default="docs/results", help="where RESULTS.md's PNGs are copied")
    p.add_argument("--report-only", action="store_true", help="only regenerate RESULTS.md from --out")
    p.set_defaults(func=cmd_study)
