#!/usr/bin/env python
"""Few-step samplers against 250-step ancestral sampling, per trained Fashion-MNIST run: FD_fmnist,
conditioning accuracy, wall time, model evaluations (NFE) per image, and where sampling time goes.

    python benchmarks/samplers.py results/000-DiT-XXS-4 results/study/configs/runs/004-DiT-XXS-4
    python benchmarks/samplers.py RUN --num-samples 64 --samplers dpm++2m --steps 10 --baseline-seeds 0 --no-ddim
    python benchmarks/samplers.py RUN [RUN ...] --report-only      # table + plot from the cached cells

The full measurement of issue 18: the demo model (`mapdit demo` -> results/NNN-DiT-XXS-4) and one other
trained Fashion-MNIST run, e.g. the best Config E run of `mapdit study`, with every default:

    python benchmarks/samplers.py results/NNN-DiT-XXS-4 results/study/configs/runs/MMM-DiT-XXS-4

Cost: about 1,275 model evaluations per image per run (3 x 250 ancestral, 50 DDIM, 120 each for dpm++2m
and unipc, 235 for heun), i.e. roughly 5x one 250-step FID sampling pass: with the demo model's ~7-10 min
per 1,000 images at 250 steps on 2 idle cores, 35-50 min per run plus scoring.

Cells, per run (defaults): each of --samplers (dpm++2m, unipc, heun; from diffusers via mapdit.schedulers) at
--steps 10, 15, 20, 25, 50; our DDIM at 50 steps; our 250-step ancestral sampler at every --baseline-seeds
(0, 1, 2), which gives the seed spread an FD must fall within. All cells use the grid's guidance
(--cfg-scale 2.0, all channels), the run's x0 clipping rule (pixels: clipped), the smallest tracked EMA,
--num-samples images (1000) with the same labels (uniform, label seed 0) and, at noise seed 0, the same
initial noise (sample i gets the noise of batch i // --batch-size, as `mapdit sample` and `mapdit fid` draw
it). Ancestral seeds 1 and 2 redraw the noise only: the labels stay.

Scoring reuses `mapdit fid`'s pieces: `sample_images` (the sampler loop of `mapdit sample`, then the pixel
decoder) and `evaluate_samples` with the `fmnist` features (FD against the 10k test images, reference
statistics cached) and its conditioning accuracy.

NFE counts calls of the model's forward per image: one guided evaluation is ONE call on a doubled batch
(cond and uncond halves together), so 250-step ancestral is 250, DDIM-50 is 50, dpm++2m/unipc at S steps
are S, heun at S steps is 2S-1. Wall time covers sampling and decoding (not model loading, not scoring);
forward time is the time inside the model's forward calls (hooks; on CUDA each call is synchronised for
the measurement), so forward share = forward / wall is the part of `mapdit sample`'s loop the model takes.
Throughput: images/s of each cell against the limit set by a bare forward at the same doubled batch,
measured in the same process: limit = batch / (NFE x forward time).

Resumable: each cell is cached as JSON under --out/cells/<run key>/ with its settings; a rerun skips cells
whose settings match (a newer checkpoint or other options make new cells). Every invocation rewrites
--out/samplers.md (tables) and --out/fd_vs_nfe.png (FD against NFE, one panel per run) from the cache.
Pass --threads to fix torch's thread count (default: torch's); keep the machine otherwise idle for times.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch

from mapdit.errors import UserError
from mapdit.schedulers import DIFFUSERS_SAMPLERS, model_evaluations

STEPS = (10, 15, 20, 25, 50)
BASELINE = ("ddpm", 250)
DDIM = ("ddim", 50)
LABEL_SEED = 0
NOISE_SEED = 0


# ------------------------------------------------------------------------------------------------
# Measuring the model's share
# ------------------------------------------------------------------------------------------------
class ForwardMeter:
    """Counts and times the forward calls of a module with hooks (no wrapper, so the sampler code is the real one)."""

    def __init__(self, model: torch.nn.Module):
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.calls, self.seconds, self._start = 0, 0.0, None
        self._handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _pre(self, module, args):
        self._sync()
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self._sync()
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def reset(self):
        self.calls, self.seconds = 0, 0.0

    def close(self):
        while self._handles:
            self._handles.pop().remove()


@torch.no_grad()
def bare_forward_seconds(model, batch: int, repeats: int = 20) -> float:
    """Median time of one forward at `batch` inputs (random inputs, mixed labels and steps)."""
    cfg = model.config
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((batch, cfg.in_channels, cfg.input_size, cfg.input_size), generator=g, device=device)
    t = torch.randint(0, cfg.num_train_steps, (batch,), generator=g, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g, device=device)
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x, t, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# Cells
# ------------------------------------------------------------------------------------------------
def cell_list(samplers, steps, baseline_seeds, ddim: bool):
    """(sampler, steps, noise seed) in the order they are run: the reference first, the extra seeds last."""
    cells = [(*BASELINE, baseline_seeds[0])] if baseline_seeds else []
    cells += [(s, n, NOISE_SEED) for s in samplers for n in steps]
    if ddim:
        cells.append((*DDIM, NOISE_SEED))
    cells += [(*BASELINE, seed) for seed in baseline_seeds[1:]]
    return cells


def run_key(run_dir: Path, step: int, settings: dict) -> str:
    digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:6]
    return (f"{run_dir.name}-{digest}-step{step:07d}-ema{settings['ema_std']:.3f}-n{settings['num_samples']}"
            f"-cfg{settings['cfg_scale']:g}-bs{settings['batch_size']}")


def cell_name(sampler: str, steps: int, seed: int) -> str:
    return f"{sampler}{steps}-seed{seed}"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def run_settings(run_dir: Path, args) -> tuple[str, dict, dict]:
    """(cache key, the settings every cell of this run shares, the run's config)."""
    from mapdit.runio import load_run_config
    from mapdit.weights import resolve_checkpoint

    config = load_run_config(run_dir)
    data_meta = config["data"]
    if data_meta.get("kind") != "fashion-mnist":
        raise UserError(f"{run_dir}: FD_fmnist needs a Fashion-MNIST run (this one trained on {data_meta.get('kind')})")
    step, ckpt = resolve_checkpoint(run_dir, None)
    ema_std = args.ema_std if args.ema_std is not None else min(config["train"]["ema_stds"])
    common = {"run_dir": str(run_dir.resolve()), "checkpoint": str(ckpt), "checkpoint_step": int(step),
              "ema_std": float(ema_std), "num_samples": args.num_samples, "cfg_scale": args.cfg_scale,
              "batch_size": args.batch_size, "label_seed": LABEL_SEED, "features": "fmnist",
              "reference": "fashion-mnist test split"}
    return run_key(run_dir, step, common), common, config


def benchmark_run(run_dir: Path, args, log) -> str:
    """Measure the missing cells of one run; returns its cache key."""
    from mapdit.evaluate.fid import default_cache_dir, evaluate_samples, get_extractor
    from mapdit.evaluate.scoring import reference_options
    from mapdit.runio import read_json, write_json
    from mapdit.sample import sample_images, sample_labels
    from mapdit.weights import load_model

    key, common, config = run_settings(run_dir, args)
    data_meta = config["data"]
    ema_std, ckpt = common["ema_std"], common["checkpoint"]
    folder = Path(args.out) / "cells" / key
    todo = []
    for sampler, steps, seed in cell_list(args.samplers, args.steps, args.baseline_seeds, args.ddim):
        path = folder / f"{cell_name(sampler, steps, seed)}.json"
        settings = dict(common, sampler=sampler, steps=steps, noise_seed=seed)
        if path.is_file() and read_json(path).get("settings") == settings:
            log(f"{run_dir.name}: {cell_name(sampler, steps, seed)} cached")
            continue
        todo.append((sampler, steps, seed, settings, path))
    through_path = folder / "throughput.json"
    if not todo and through_path.is_file():
        return key
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _, desc = load_model(run_dir, weights="ema", ema_std=ema_std, ckpt=str(ckpt), device=device, log=log)
    cfg = model.config
    labels = sample_labels(args.num_samples, cfg.num_classes, LABEL_SEED)
    ext = get_extractor("fmnist", None, device)
    cache = default_cache_dir()
    # Warm-up outside the timed cells: the bare forward (measured here, which also warms the model up) and
    # one scheduler per diffusers sampler (diffusers imports some modules lazily on first construction).
    from mapdit.schedulers import make_scheduler

    for sampler in {c[0] for c in todo if c[0] in DIFFUSERS_SAMPLERS}:
        make_scheduler(sampler)
    doubled = min(args.batch_size, args.num_samples) * (2 if args.cfg_scale != 1 else 1)
    fwd = bare_forward_seconds(model, doubled)
    write_json(through_path, {"settings": common, "forward_batch": doubled, "bare_forward_s": fwd,
                              "machine": machine(), "device": str(device),
                              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    meter = ForwardMeter(model)
    batches = math.ceil(args.num_samples / args.batch_size)
    try:
        for sampler, steps, seed, settings, path in todo:
            log(f"{run_dir.name}: {cell_name(sampler, steps, seed)}: sampling {args.num_samples} images ...")
            meter.reset()
            start = time.perf_counter()
            images = sample_images(model, data_meta, labels, sampler=sampler, steps=steps, cfg_scale=args.cfg_scale,
                                   seed=seed, batch_size=args.batch_size, progress=args.progress)
            wall = time.perf_counter() - start
            calls, forward = meter.calls, meter.seconds
            result = evaluate_samples(images, labels, "fashion-mnist", ext, cache,
                                      data_options=reference_options(data_meta), batch_size=256, log=log)
            nfe = calls / batches
            record = {"settings": settings, "model_weights": desc, "metric": result["metric"],
                      "fd": result[result["metric"]], "conditioning_accuracy": result.get("conditioning_accuracy"),
                      "nfe": nfe, "nfe_expected": _expected_nfe(sampler, steps), "model_calls": calls,
                      "wall_s": wall, "forward_s": forward, "forward_share": forward / wall,
                      "images_per_s": args.num_samples / wall, "machine": machine(), "device": str(device),
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "warnings": result.get("warnings", [])}
            write_json(path, record)
            log(f"{run_dir.name}: {cell_name(sampler, steps, seed)}: {record['metric']} {record['fd']:.3f}, "
                f"accuracy {record['conditioning_accuracy']:.3f}, NFE {nfe:g}, {wall:.1f} s "
                f"({100 * record['forward_share']:.0f} % in the model)")
    finally:
        meter.close()
    return key


def _expected_nfe(sampler: str, steps: int) -> int:
    return model_evaluations(sampler, steps) if sampler in DIFFUSERS_SAMPLERS else steps


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def load_cells(out: Path) -> dict[str, dict]:
    """{run key: {"cells": {cell name: record}, "throughput": record or None}} from the cache."""
    from mapdit.runio import read_json

    runs = {}
    for folder in sorted((out / "cells").glob("*")):
        cells = {p.stem: read_json(p) for p in sorted(folder.glob("*.json")) if p.name != "throughput.json"}
        through = folder / "throughput.json"
        if cells:
            runs[folder.name] = {"cells": cells, "throughput": read_json(through) if through.is_file() else None}
    return runs


def spread(cells: dict) -> dict | None:
    values = [c["fd"] for c in cells.values() if (c["settings"]["sampler"], c["settings"]["steps"]) == BASELINE]
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def within(fd: float, s: dict | None) -> bool | None:
    """Within the seed spread of 250-step ancestral sampling: not above the worst of its seeds (needs 2+ seeds)."""
    if s is None or s["n"] < 2:
        return None
    return fd <= s["max"]


def _order(c: dict):
    s = c["settings"]
    rank = {"ddpm": 2, "ddim": 1}.get(s["sampler"], 0)
    return rank, s["sampler"], s["steps"], s["noise_seed"]


def describe_run(run_dir: str) -> str:
    """'Config A, lr 0.01, 2000 steps (000-DiT-XXS-4)' from the run's config.json (the folder name if unreadable)."""
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
        preset, tc = config["model"].get("preset"), config["train"]
        what = f"Config {preset}" if preset else config["model"]["model"]
        return f"{what}, lr {tc['lr']:g}, {tc['num_steps']} steps ({Path(run_dir).name})"
    except (OSError, KeyError, ValueError):
        return Path(run_dir).name


def report(out: Path, run_keys: list[str] | None = None) -> Path:
    from mapdit.runio import write_text

    runs = load_cells(out)
    if run_keys is not None:
        runs = {k: v for k, v in runs.items() if k in run_keys}
    lines = ["# Few-step samplers against 250-step ancestral sampling", "",
             "Made by `python benchmarks/samplers.py` (see its docstring for the method). NFE: model calls per image; "
             "one guided evaluation (cond + uncond halves in one batch) counts once. Within spread: FD not above the "
             "worst 250-step ancestral seed. Wall: sampling + decoding; model share: time inside the model's "
             "forward calls; limit: images/s if sampling cost nothing but bare forwards at the same batch.", ""]
    best_by_run = {}
    for key, run in runs.items():
        cells = sorted(run["cells"].values(), key=_order)
        s0 = cells[0]["settings"]
        sp = spread(run["cells"])
        through = run["throughput"]
        lines += [f"## {describe_run(s0['run_dir'])}", "",
                  f"`{s0['run_dir']}`, checkpoint step {s0['checkpoint_step']}, EMA sigma_rel {s0['ema_std']:.3f}; "
                  f"{s0['num_samples']} samples, guidance {s0['cfg_scale']:g}, batch {s0['batch_size']}; "
                  f"{cells[0]['machine']} ({cells[0]['device']}).", ""]
        if sp is not None:
            std = f" ± {sp['std']:.3f} (sample std)" if sp["std"] is not None else ""
            lines += [f"250-step ancestral over {sp['n']} noise seed(s): FD_fmnist {sp['mean']:.3f}{std}, "
                      f"range {sp['min']:.3f}–{sp['max']:.3f}.", ""]
        lines += ["| sampler | steps | seed | NFE | FD_fmnist | within spread | cond. acc. | wall s | img/s | "
                  "model share | limit img/s |", "|---|---:|---:|---:|---:|:-:|---:|---:|---:|---:|---:|"]
        best = None
        for c in cells:
            s = c["settings"]
            ok = within(c["fd"], sp)
            limit = (s["batch_size"] if s["num_samples"] >= s["batch_size"] else s["num_samples"]) / (
                c["nfe"] * through["bare_forward_s"]) if through else None
            acc = c["conditioning_accuracy"]
            lines.append(f"| {s['sampler']} | {s['steps']} | {s['noise_seed']} | {c['nfe']:g} | {c['fd']:.3f} | "
                         f"{'-' if ok is None else ('yes' if ok else 'no')} | "
                         f"{'-' if acc is None else f'{acc:.3f}'} | {c['wall_s']:.1f} | {c['images_per_s']:.1f} | "
                         f"{100 * c['forward_share']:.0f} % | {'-' if limit is None else f'{limit:.1f}'} |")
            if ok and s["sampler"] in DIFFUSERS_SAMPLERS and (best is None or c["nfe"] < best["nfe"]):
                best = c
        if through:
            ms = 1000 * through["bare_forward_s"]
            lines += ["", f"Bare forward at batch {through['forward_batch']}: {ms:.2f} ms."]
        if best is not None:
            b = best["settings"]
            lines += ["", f"Fewest model evaluations within the spread: {b['sampler']} at {b['steps']} steps "
                          f"(NFE {best['nfe']:g}, FD {best['fd']:.3f})."]
            best_by_run[key] = (b["sampler"], b["steps"])
        lines.append("")
    if runs:
        png = plot(runs, out / "fd_vs_nfe.png")
        lines += ["![FD_fmnist against model evaluations per image](fd_vs_nfe.png)", ""] if png else []
    return write_text(out / "samplers.md", "\n".join(lines))


def plot(runs: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mapdit.plots import save_figure

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.2), dpi=100, squeeze=False)
    for ax, (key, run) in zip(axes[0], runs.items()):
        cells = list(run["cells"].values())
        sp = spread(run["cells"])
        if sp is not None:
            ax.axhspan(sp["min"], sp["max"], color="grey", alpha=0.25, label=f"ancestral 250, {sp['n']} seed(s)")
        for sampler in sorted({c["settings"]["sampler"] for c in cells}):
            pts = sorted((c["nfe"], c["fd"]) for c in cells if c["settings"]["sampler"] == sampler)
            if sampler == BASELINE[0]:
                ax.plot(*zip(*pts), "ks", label="ancestral (ddpm) 250")
            elif sampler == DDIM[0]:
                ax.plot(*zip(*pts), "D", color="tab:purple", label="ddim (ours)")
            else:
                ax.plot(*zip(*pts), "o-", label=sampler)
        ax.set_xscale("log")
        ticks = sorted({round(c["nfe"]) for c in cells})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("model evaluations per image (NFE; a CFG pair = 1)")
        ax.set_ylabel("FD_fmnist (lower is better)")
        ax.set_title(describe_run(cells[0]["settings"]["run_dir"]), fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)  # atomic, closes the figure


# ------------------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()] if text else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Full measurement: python benchmarks/samplers.py RUN [RUN ...] "
                                       "(1000 samples per cell; see the module docstring)",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders made by `mapdit train` / `mapdit demo` (Fashion-MNIST)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "samplers"),
                   help="cache and report folder (default benchmarks/results/samplers)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--samplers", default=",".join(DIFFUSERS_SAMPLERS),
                   help=f"comma-separated diffusers samplers (default {','.join(DIFFUSERS_SAMPLERS)})")
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="their step counts (default 10,15,20,25,50)")
    p.add_argument("--baseline-seeds", default="0,1,2",
                   help="noise seeds of 250-step ancestral sampling, for the seed spread ('' skips it)")
    p.add_argument("--no-ddim", dest="ddim", action="store_false", help="skip 50-step DDIM")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="guidance (default 2.0, the grid's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ema-std", type=float, default=None, help="default: the run's smallest tracked EMA width")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--report-only", action="store_true", help="only rewrite samplers.md and the plot from the cache")
    args = p.parse_args(argv)
    try:
        args.samplers = [s for s in args.samplers.split(",") if s]
        unknown = [s for s in args.samplers if s not in DIFFUSERS_SAMPLERS]
        if unknown:
            raise UserError(f"--samplers: unknown {', '.join(unknown)} (use {', '.join(DIFFUSERS_SAMPLERS)})")
        args.steps = int_list(args.steps)
        args.baseline_seeds = int_list(args.baseline_seeds)
        if args.num_samples < 2 or args.batch_size < 1 or any(s < 1 for s in args.steps):
            raise UserError("--num-samples must be >= 2, --batch-size and --steps >= 1")
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)  # as `mapdit sample` does
        out = Path(args.out)

        def log(msg: str) -> None:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

        if args.report_only:
            keys = [run_settings(Path(run), args)[0] for run in args.runs]
        else:
            from mapdit.samplers import check_sampler

            for s in args.samplers:
                check_sampler(s)
            keys = [benchmark_run(Path(run), args, log) for run in args.runs]
        print(report(out, keys))
    except UserError as err:
        print(f"benchmarks/samplers.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
