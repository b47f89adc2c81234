"""`mapdit ablate`: train every variant (config x modulation x seed) with the same budget, score each with
`fid_for_run` and the magnitude study, and write the results table (the layout of the paper's Tables 1-2).

Out folder (--out):
    runs/<variant>-seed<s>/NNN-<model>/    each variant's training run (a normal run folder)
    results/<variant>-seed<s>.json         its result, written once the run reached its budget and was scored:
                                           a rerun skips it (one emptied or cut short counts as not finished)
    ablation.md, ablation.csv              the table, one row per variant (config, modulation), seeds pooled
    log.txt                                what was trained, resumed, skipped
<variant> is <config>-<modulation>, e.g. E-scale+rotate.

Resumable: a variant whose result JSON is whole (`finished_result`) is skipped (if it was made with the same
settings; other settings are refused, use another --out); a variant with a run folder but no result continues
that run (`train(..., resume=run_dir)`) and is then evaluated. SIGTERM/Ctrl-C: the run under way checkpoints
and stops (`RunStopped`, exit 0 under the CLI); it is neither scored nor recorded, and the rerun continues it.
Every variant gets the same budgets (`TrainBudget`, `ScoreBudget`); `overrides` (ModelConfig fields set on
top of each preset, e.g. an MP option turned off) are recorded in each result, with the samples file it scored
(RUN/eval/samples-*.npz, kept). Under torchrun all ranks train and sample together; rank 0 evaluates and
writes.

Table columns: variant, config, modulation, seeds, parameters (all, as model-info counts them), step time
in ms (batch size / median images/s of metrics.csv, the first report left out when there are several),
images/s, the distance (mean ± sample std over seeds when several), the conditioning accuracy (FD_fmnist
only) and the largest residual-stream magnitude over blocks at the last checkpoint (raw weights).
"""
from __future__ import annotations

import csv
import io
import json
import signal
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from mapdit import distributed as dist_utils
from mapdit import signals
from mapdit.config import PRESETS, ModelConfig, TrainConfig, make_config
from mapdit.distributed import on_main
from mapdit.errors import Stopped, UserError
from mapdit.evaluate.magnitudes import measure_run
from mapdit.evaluate.scoring import DEFAULT_CACHE
from mapdit.experiments.budgets import SETTINGS_KEYS, ScoreBudget, TrainBudget, settings, with_overrides
from mapdit.experiments.fid_run import fid_for_run
from mapdit.log import Logger
from mapdit.model import DiT, parameter_breakdown
from mapdit.runio import list_checkpoints, load_run_config, run_to_resume, write_json, write_text
from mapdit.samplers import check_sampler
from mapdit.train import train


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UserError(f"{what}: give a comma-separated list")
    if len(set(items)) != len(items):
        raise UserError(f"{what} {text!r} lists an entry twice")
    return items


def int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in parse_list(text, what)]
    except ValueError:
        raise UserError(f"{what} {text!r}: give comma-separated integers, e.g. 0,1,2") from None


class RunStopped(Stopped):
    """A SIGTERM/Ctrl-C stopped an ablation (or a study) before a run reached its budget: the run's checkpoint
    is written, nothing of it is scored or recorded, and the same command continues it. `what` says which run
    and where it stopped; `hint` how to continue."""

    def __init__(self, what: str, hint: str = ""):
        super().__init__(f"{what}; {hint}" if hint else what)
        self.what, self.hint = what, hint

    def __reduce__(self):  # picklable (a worker process raising it to the study)
        return type(self), (self.what, self.hint)


# what a result JSON holds once it is whole (written last, after scoring)
RESULT_KEYS = ("name", "run_dir", "settings", "metric", "value", "final_step")


def finished_result(path: str | Path) -> dict | None:
    """The result stored at `path` if it records a finished, scored run: every key of RESULT_KEYS, a numeric
    value, and its last checkpoint at the budget's step count. None otherwise (missing, unreadable, emptied
    to {}, cut short): such a variant is not finished, and a rerun continues its run and scores it again."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or any(k not in result for k in RESULT_KEYS):
        return None
    value, stored = result["value"], result["settings"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not isinstance(stored, dict):
        return None
    if stored.get("num_steps") != result["final_step"]:
        return None
    run_dir = result["run_dir"]  # a final_step edited by hand: the run's newest checkpoint says how far it trained
    trained = trained_steps(run_dir) if isinstance(run_dir, str) and Path(run_dir).is_dir() else 0
    return result if trained in (0, result["final_step"]) else None  # 0: moved or pruned, nothing to compare


def trained_steps(run_dir: str | Path) -> int:
    """The step of a run's newest checkpoint (0 without one): how far it was trained."""
    found = list_checkpoints(run_dir)
    return found[-1][0] if found else 0


def _step_rate(run_dir: Path) -> float | None:
    """Median images/s of metrics.csv (the first report, which includes start-up, left out if there are more)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f) if r.get("images_per_s")]
    if len(rates) > 1:
        rates = rates[1:]
    return statistics.median(rates) if rates else None


def _parameters(model_config: dict) -> int:
    config = ModelConfig.from_dict(model_config)
    with torch.device("meta"):  # no memory for the weights
        model = DiT(config)
    return parameter_breakdown(model)["total"]


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


# ------------------------------------------------------------------------------------------------
# One variant
# ------------------------------------------------------------------------------------------------
def train_config(budget: TrainBudget, runs: Path, seed: int, device: str | None) -> TrainConfig:
    """The TrainConfig a variant trains with (its runs go to `runs`)."""
    return TrainConfig(data_path=budget.data_path, results_dir=str(runs), num_steps=budget.num_steps,
                       batch_size=budget.batch_size, lr=budget.lr, seed=seed, ema_snapshots=budget.ema_snapshots,
                       ckpt_every=budget.ckpt_every, ckpt_steps=budget.ckpt_steps, log_every=budget.log_every,
                       precision=budget.precision,
                       device=device, min_snr_gamma=budget.min_snr_gamma)


def _run_variant(spec: dict, budget: TrainBudget, score: ScoreBudget, out: Path, *, overrides: dict, device: str | None,
                 cache_dir, progress: bool, log: Callable[[str], None]) -> dict | None:
    """Train (or resume), evaluate and record one variant; the result dict on rank 0, None elsewhere."""
    name = spec["name"]
    runs = out / "runs" / name

    existing = on_main(lambda: run_to_resume(runs))  # rank 0 looks; a Path, or None when nothing started
    # train() stopped by a signal does not say "--resume RUN": the ablation's (or study's) own rerun continues it
    tc = train_config(budget, runs, spec["seed"], device)
    try:
        if existing:
            log(f"{name}: resuming {existing}")
            run_dir = train(tc, None, resume=str(existing), progress=progress, resume_hint=False)
        else:
            log(f"{name}: training {budget.model} config {spec['config']} modulation {spec['modulation']} "
                f"seed {spec['seed']} for {budget.num_steps} steps")
            # sizes follow the data (train() replaces them); placeholders until then
            model_cfg = make_config(budget.model, preset=spec["config"], modulation=spec["modulation"],
                                    input_size=make_config(budget.model).patch_size, in_channels=1, num_classes=1)
            model_cfg = with_overrides(model_cfg, overrides)  # fields set as given (an option can be turned off too)
            run_dir = train(tc, model_cfg, progress=progress, resume_hint=False)
    except RunStopped:
        raise
    except Stopped as err:  # a signal during train()'s set-up
        raise RunStopped(f"{name}: {err}") from None
    # train() returns early (checkpoint written) when a SIGTERM/Ctrl-C stopped it: such a run is not scored
    reached = on_main(lambda: trained_steps(run_dir))
    if reached < budget.num_steps:
        raise RunStopped(f"stopped by signal: {name} at step {reached} of {budget.num_steps} (checkpoint written, "
                         "nothing scored)")
    fid = fid_for_run(run_dir, score.fid_samples, ref=score.ref, features=score.features, weights=score.weights,
                      ema_std=score.ema_std, cfg_scale=score.cfg_scale, sampler=score.sampler,
                      steps=score.sampling_steps, seed=spec["seed"], batch_size=score.sample_batch_size,
                      cache_dir=cache_dir, num_ref=score.num_ref, device=device, progress=progress, log=log)

    def record() -> dict:
        mags = measure_run(run_dir, batch_size=score.magnitude_batch_size, seed=0, weights="raw", device=device,
                           log=log)
        last = max(mags["steps"])
        final = [v for s, q, _, v in mags["rows"] if s == last and q == "residual"]
        config = load_run_config(run_dir)
        rate = _step_rate(Path(run_dir))
        result = {
            "name": name, "variant": spec["variant"], "config": spec["config"], "modulation": spec["modulation"],
            "seed": spec["seed"], "run_dir": str(run_dir), "settings": settings(budget, score),
            "parameters": _parameters(config["model"]),
            "images_per_s": rate,
            "step_time_ms": None if not rate else 1000.0 * budget.batch_size / rate,
            "metric": fid["metric"], "value": fid["value"],
            "conditioning_accuracy": fid.get("conditioning_accuracy"),
            "max_block_magnitude": max(final), "final_residual_magnitudes": final, "final_step": last,
            "fid_json": fid["result_json"], "magnitudes_csv": str(mags["csv"]),
            "samples_npz": None if fid.get("samples_npz") is None else str(fid["samples_npz"]),
            "overrides": dict(overrides),
        }
        write_json(out / "results" / f"{name}.json", result)
        log(f"{name}: {fid['metric']} {fid['value']:.4f}, max block magnitude {max(final):.4g}, "
            f"{_fmt(result['step_time_ms'])} ms/step")
        return result

    result = on_main(record)
    return result if dist_utils.rank_and_world()[0] == 0 else None


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------
def summarise(results: list[dict], order: list[str]) -> list[dict]:
    """One row per variant (config-modulation), seeds pooled, in `order`."""
    rows = []
    for variant in order:
        group = sorted((r for r in results if r["variant"] == variant), key=lambda r: r["seed"])
        if not group:
            continue
        values = [r["value"] for r in group]
        accs = [r["conditioning_accuracy"] for r in group if r.get("conditioning_accuracy") is not None]
        times = [r["step_time_ms"] for r in group if r.get("step_time_ms")]
        rates = [r["images_per_s"] for r in group if r.get("images_per_s")]
        rows.append({
            "variant": variant, "config": group[0]["config"], "modulation": group[0]["modulation"],
            "seeds": " ".join(str(r["seed"]) for r in group), "num_seeds": len(group),
            "parameters": group[0]["parameters"],
            "step_time_ms": statistics.mean(times) if times else None,
            "images_per_s": statistics.mean(rates) if rates else None,
            "metric": group[0]["metric"],
            "value_mean": statistics.mean(values),
            "value_std": statistics.stdev(values) if len(values) > 1 else None,
            "conditioning_accuracy": statistics.mean(accs) if accs else None,
            "max_block_magnitude": statistics.mean(r["max_block_magnitude"] for r in group),
        })
    return rows


def metric_label(metric: str) -> str:
    return "FID" if metric == "fid" else "FD_" + metric.removeprefix("fd_")


def write_table(rows: list[dict], out: Path, title: str) -> tuple[Path, Path]:
    metric = rows[0]["metric"] if rows else "fid"
    label = metric_label(metric)
    fields = ["variant", "config", "modulation", "seeds", "num_seeds", "parameters", "step_time_ms",
              "images_per_s", f"{metric}_mean", f"{metric}_std", "conditioning_accuracy", "max_block_magnitude"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(fields)
    for r in rows:
        w.writerow([r["variant"], r["config"], r["modulation"], r["seeds"], r["num_seeds"], r["parameters"],
                    _fmt(r["step_time_ms"], 6), _fmt(r["images_per_s"], 6), f"{r['value_mean']:.6g}",
                    "" if r["value_std"] is None else f"{r['value_std']:.6g}",
                    "" if r["conditioning_accuracy"] is None else f"{r['conditioning_accuracy']:.6g}",
                    f"{r['max_block_magnitude']:.6g}"])
    csv_path = write_text(out / "ablation.csv", buf.getvalue())

    lines = [f"# {title}", "",
             f"| variant | seeds | parameters | step time (ms) | {label} | cond. acc. | max block magnitude |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        value = f"{r['value_mean']:.3f}" + ("" if r["value_std"] is None else f" ± {r['value_std']:.3f}")
        acc = "-" if r["conditioning_accuracy"] is None else f"{100 * r['conditioning_accuracy']:.1f}%"
        step = "-" if r["step_time_ms"] is None else f"{r['step_time_ms']:.1f}"
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['parameters']:,} | {step} | {value} | {acc} | "
                     f"{r['max_block_magnitude']:.3g} |")
    lines += ["", f"{label}: mean ± sample std over seeds; step time: batch size / median images/s of the "
                  "run's metrics.csv; max block magnitude: largest residual-stream magnitude over blocks at "
                  "the last checkpoint (raw weights, fixed batch at t=500)."]
    md_path = write_text(out / "ablation.md", "\n".join(lines) + "\n")
    return md_path, csv_path


# ------------------------------------------------------------------------------------------------
# The whole ablation
# ------------------------------------------------------------------------------------------------
def run_ablation(budget: TrainBudget, score: ScoreBudget, *, configs: list[str], modulations: list[str],
                 seeds: list[int] = (0,), out: str | Path = "results/ablation", device: str | None = None,
                 cache_dir=None, progress: bool = True, log: Callable[[str], None] | None = None,
                 overrides: dict | None = None) -> dict:
    """Train every variant (config x modulation x seed) with `budget` and score it with `score`; returns
    {"rows", "results", "table_md", "table_csv", "trained", "skipped"} on rank 0 (the lists only
    elsewhere). See the module doc. `overrides`: ModelConfig fields set on every variant after its preset
    and modulation (e.g. {"cosine_attention": False}); recorded in each result, and a stored result with
    other overrides is refused like one with another budget.

    SIGTERM/Ctrl-C: a run stops at its next step with a checkpoint (as `mapdit train`), one that comes between
    runs stops before the next one; either way `RunStopped` is raised, nothing unfinished is scored or
    recorded, and the same call continues. A second signal stops at once (KeyboardInterrupt)."""
    with signals.held():  # a no-op under `mapdit`, which holds them from its start
        return _ablation(budget, score, configs=configs, modulations=modulations, seeds=seeds, out=out,
                         device=device, cache_dir=cache_dir, progress=progress, log=log, overrides=overrides)


def _ablation(budget: TrainBudget, score: ScoreBudget, *, configs: list[str], modulations: list[str], seeds,
              out, device, cache_dir, progress: bool, log, overrides) -> dict:
    d = dist_utils.init(device)
    out = Path(out)
    say = Logger(out / "log.txt", is_main=d.is_main, sink=log or (lambda line: print(line, file=sys.stderr)))

    configs = [c.upper() for c in configs]
    for c in configs:
        if c not in PRESETS:
            raise UserError(f"unknown config {c!r} in --configs: use some of {', '.join(PRESETS)}")
    canonical = [make_config(budget.model, modulation=m).modulation for m in modulations]  # validates the names
    if len(set(canonical)) != len(canonical):
        raise UserError(f"--modulations {','.join(modulations)} names one modulation twice")
    if budget.num_steps < 1:
        raise UserError("--num-steps must be at least 1")
    check_sampler(score.sampler)  # before any training: an unknown name or a missing diffusers fails now
    wanted = settings(budget, score)
    overrides = dict(overrides or {})
    if overrides:
        for c in configs:  # unknown fields, or ones a preset cannot take, fail now
            with_overrides(make_config(budget.model, preset=c), overrides)
    cache_dir = DEFAULT_CACHE if cache_dir is None else cache_dir
    specs = [{"config": c, "modulation": m, "seed": int(s), "variant": f"{c}-{m}", "name": f"{c}-{m}-seed{s}"}
             for c in configs for m in canonical for s in seeds]
    order = [f"{c}-{m}" for c in configs for m in canonical]
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)

    def stored(spec: dict) -> dict | None:
        path = out / "results" / f"{spec['name']}.json"
        if not path.is_file():
            return None
        result = finished_result(path)
        if result is None:
            say(f"{spec['name']}: {path} does not record a finished, scored run: the run is continued and scored "
                "again")
            return None
        mismatch = [k for k in SETTINGS_KEYS if result.get("settings", {}).get(k) != wanted[k]]
        if result.get("overrides", {}) != overrides:
            mismatch.append("overrides")
        if mismatch:
            raise UserError(f"{path} was made with other settings ({', '.join(mismatch)} differ): use another "
                            "--out, or delete it to redo that variant")
        return result

    say(f"ablation in {out}: {len(specs)} variants ({', '.join(configs)} x {', '.join(canonical)} x seeds "
        f"{', '.join(map(str, seeds))}), {budget.model}, {budget.num_steps} steps, batch {budget.batch_size}")
    results, trained, skipped = [], [], []
    try:
        for spec in specs:
            done = on_main(lambda: stored(spec))
            if done is not None:
                say(f"{spec['name']}: skipped, already finished ({out / 'results' / (spec['name'] + '.json')})")
                skipped.append(spec["name"])
                results.append(done)
                continue
            asked = dist_utils.broadcast(signals.pending())  # a signal since the last run: rank 0's view
            if asked is not None:
                raise RunStopped(f"stopped by signal {signal.Signals(asked).name} before {spec['name']} started")
            result = _run_variant(spec, budget, score, out, overrides=overrides, device=device,
                                  cache_dir=cache_dir, progress=progress, log=say)
            trained.append(spec["name"])
            if result is not None:
                results.append(result)
    except RunStopped as err:
        raise RunStopped(err.what, f"rerun the same command (--out {out}) to continue") from None

    summary = {"trained": trained, "skipped": skipped, "results": results}
    if d.is_main:
        rows = summarise(results, order)
        md, csv_path = write_table(rows, out, f"Ablation: {budget.model}, {budget.num_steps} steps, batch "
                                              f"{budget.batch_size}, {score.fid_samples} samples ({score.sampler} "
                                              f"{score.sampling_steps} steps)")
        say(f"table -> {md} and {csv_path}")
        summary.update(rows=rows, table_md=md, table_csv=csv_path)
    dist_utils.barrier(d)
    return summary
