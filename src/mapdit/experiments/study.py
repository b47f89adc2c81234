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

RESULTS.md is regenerated from the stored results at the end of every run (also `--report-only`) by
mapdit.experiments.results; its PNGs are copied to --docs-dir (default docs/results) and linked relative
to the document. Every variant is trained with one `TrainBudget` and scored with one `ScoreBudget`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from mapdit.config import make_config
from mapdit.ema import parse_sweep
from mapdit.errors import UserError
from mapdit.experiments import ablate
from mapdit.experiments.ablate import read_results
from mapdit.experiments.budgets import (CONFIGS, FULL, LR_CONFIGS, LRS, MODULATIONS, QUICK, STUDIES, ScoreBudget,
                                        TrainBudget)
from mapdit.evaluate.scoring import DEFAULT_CACHE
from mapdit.experiments.fid_run import fid_for_run
from mapdit.experiments.results import lr_tag, side_by_side, write_results_md
from mapdit.log import Logger
from mapdit.runio import load_run_config, read_json, write_json
from mapdit.sample import sample_grid_from_model
from mapdit.samplers import check_sampler
from mapdit.weights import load_model

_NONFINITE = re.compile(r"non-finite.*? at step (\d+)")


def _default_lr(model: str, config: str) -> float:
    """The rate `train` picks when none is given: 1e-2 with weight normalisation, else 1e-4."""
    cfg = make_config(model, preset=config)
    return 1e-2 if (cfg.weight_normalization or cfg.forced_weight_normalization) else 1e-4


def _copy_result(src: Path, dst: Path, **settings) -> bool:
    """Reuse a finished variant of another study: copy its result JSON (settings patched) unless `dst` exists."""
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
def _lr_study(out: Path, budgets: tuple[TrainBudget, ScoreBudget], seeds: list[int], lrs: list[float], say,
              **run) -> dict:
    budget, score = budgets
    trained, skipped, diverged = [], [], []
    for lr in lrs:
        folder = out / "lr" / lr_tag(lr)
        for config in LR_CONFIGS:
            if math.isclose(lr, _default_lr(budget.model, config)):
                for s in seeds:
                    name = f"{config}-adaln-seed{s}.json"
                    if _copy_result(out / "configs" / "results" / name, folder / "results" / name, lr=lr):
                        say(f"lr {lr:g}: {name[:-5]} reused from the configs study (its default rate)")
            for s in seeds:
                name = f"{config}-adaln-seed{s}"
                record = folder / "diverged" / f"{name}.json"
                if record.is_file():
                    say(f"lr {lr:g}: {name} skipped, diverged before ({record})")
                    diverged.append(f"{lr_tag(lr)}/{name}")
                    continue
                try:
                    summary = ablate.run_ablation(dataclasses.replace(budget, lr=lr), score, configs=[config],
                                                  modulations=["adaln"], seeds=[s], out=folder, **run)
                except UserError as err:
                    m = _NONFINITE.search(str(err))
                    if m is None:
                        raise
                    write_json(record, {"name": name, "config": config, "modulation": "adaln", "seed": s, "lr": lr,
                                        "diverged_at_step": int(m.group(1)), "message": str(err)})
                    say(f"lr {lr:g}: {name} diverged at step {m.group(1)} (recorded in {record})")
                    diverged.append(f"{lr_tag(lr)}/{name}")
                    continue
                trained += [f"{lr_tag(lr)}/{n}" for n in summary["trained"]]
                skipped += [f"{lr_tag(lr)}/{n}" for n in summary["skipped"]]
    return {"trained": trained, "skipped": skipped, "diverged": diverged}


def best_run(results: list[dict], variant: str = "E-adaln") -> dict | None:
    """The result with the lowest distance among `variant`'s seeds."""
    group = [r for r in results if r["variant"] == variant and r.get("value") is not None]
    return min(group, key=lambda r: r["value"]) if group else None


def _ema_study(out: Path, score: ScoreBudget, sweep: list[float], say, *, device, cache_dir, progress) -> dict:
    best = best_run(read_results(out / "configs"))
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
        fid = fid_for_run(best["run_dir"], score.fid_samples, features="fmnist", weights="ema", ema_std=sigma,
                          sampler=score.sampler, steps=score.sampling_steps, seed=best["seed"],
                          batch_size=score.sample_batch_size, cache_dir=cache_dir, num_ref=score.num_ref,
                          device=device, progress=progress, log=say)
        stored["points"][key] = {"sigma_rel": sigma, "value": fid["value"], "metric": fid["metric"],
                                 "conditioning_accuracy": fid.get("conditioning_accuracy"),
                                 "weights": "tracked EMA" if key in tracked else "post-hoc EMA",
                                 "fid_json": fid["result_json"]}
        write_json(path, stored)  # after every width: an interrupted sweep resumes here
        trained.append(key)
    write_json(path, stored)
    return {"trained": trained, "skipped": skipped}


def _grid_study(out: Path, score: ScoreBudget, seed: int, say, *, device) -> dict:
    target = out / "grid" / "A_vs_E.png"
    if target.is_file():
        say(f"grid: skipped, {target} exists")
        return {"trained": [], "skipped": ["grid"]}
    results = {r["variant"]: r for r in read_results(out / "configs") if r["seed"] == seed}
    missing = [v for v in ("A-adaln", "E-adaln") if v not in results]
    if missing:
        raise UserError(f"the grid study needs {', '.join(missing)} (seed {seed}) of the configs study")
    panels = []
    for config in ("A", "E"):
        run_dir = results[f"{config}-adaln"]["run_dir"]
        model, _, desc = load_model(run_dir, weights="ema", device=device or "cpu", log=say)
        png = out / "grid" / f"{config}.png"
        if png.exists():
            png.unlink()
        sample_grid_from_model(model, load_run_config(run_dir)["data"], png, per_class=8,
                               sampler=score.sampler, steps=score.sampling_steps, cfg_scale=1.0, seed=0,
                               batch_size=score.sample_batch_size)
        panels.append((config, png, desc))
    side_by_side(panels, target)
    say(f"grid -> {target}")
    return {"trained": ["grid"], "skipped": []}


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
    out = Path(out)
    base = QUICK if quick else FULL
    settings = {"model": model or base["model"], "num_steps": num_steps or base["num_steps"],
                "batch_size": batch_size or base["batch_size"],
                "seeds": [int(s) for s in (base["seeds"] if seeds is None else seeds)],
                "fid_samples": fid_samples or base["fid_samples"], "sampler": sampler or base["sampler"],
                "sampling_steps": sampling_steps or base["sampling_steps"], "num_ref": num_ref}
    sweep = parse_sweep(ema_sweep or base["ema_sweep"])
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

    say = Logger(sink=log or (lambda line: print(line, file=sys.stderr)), prefix="study: ")
    budget = TrainBudget(model=settings["model"], num_steps=settings["num_steps"], batch_size=settings["batch_size"],
                         data_path="fashion-mnist", ema_snapshots=ema_snapshots, log_every=log_every)
    score = ScoreBudget(fid_samples=settings["fid_samples"], features="fmnist", num_ref=num_ref,
                        sampler=settings["sampler"], sampling_steps=settings["sampling_steps"], cfg_scale=1.0,
                        weights="ema", ema_std=None, sample_batch_size=sample_batch_size,
                        magnitude_batch_size=magnitude_batch_size)
    run = {"device": device, "cache_dir": cache_dir, "progress": progress, "log": log}
    scoring = {"device": device, "cache_dir": DEFAULT_CACHE if cache_dir is None else cache_dir, "progress": progress}
    seeds = settings["seeds"]
    done: dict[str, dict] = {}
    for study in [s for s in STUDIES if s in studies]:
        say(f"{study} ...")
        if study == "configs":
            summary = ablate.run_ablation(budget, score, configs=list(configs), modulations=["adaln"], seeds=seeds,
                                          out=out / "configs", **run)
        elif study == "modulation":
            for s in seeds:
                name = f"E-adaln-seed{s}.json"
                if "adaln" in modulations and _copy_result(out / "configs" / "results" / name,
                                                           out / "modulation" / "results" / name):
                    say(f"modulation: {name[:-5]} reused from the configs study")
            summary = ablate.run_ablation(budget, score, configs=["E"], modulations=list(modulations), seeds=seeds,
                                          out=out / "modulation", **run)
        elif study == "lr":
            summary = _lr_study(out, (budget, score), seeds, list(lrs), say, **run)
        elif study == "ema":
            summary = _ema_study(out, score, sweep, say, **scoring)
        else:
            summary = _grid_study(out, score, seeds[0], say, device=device)
        done[study] = {k: summary.get(k, []) for k in ("trained", "skipped", "diverged")}
        write_json(meta_path, dict(meta, elapsed_s=elapsed_before + time.perf_counter() - started))
    md = None
    if results_md is not None:
        md = write_results_md(out, results_md, docs_dir)
        say(f"results -> {md}")
    return {"studies": done, "results_md": md}
