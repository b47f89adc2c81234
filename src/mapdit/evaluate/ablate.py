"""`mapdit ablate`: train every variant (config x modulation x seed) with the same budget, score each with
`fid_for_run` and the magnitude study, and write the results table (the layout of the paper's Tables 1-2).

Out folder (--out):
    runs/<variant>-seed<s>/NNN-<model>/    each variant's training run (a normal run folder)
    results/<variant>-seed<s>.json         its result; present = finished: a rerun skips it
    ablation.md, ablation.csv              the table, one row per variant (config, modulation), seeds pooled
    log.txt                                what was trained, resumed, skipped
<variant> is <config>-<modulation>, e.g. E-scale+rotate.

Resumable: a variant whose result JSON exists is skipped (if it was made with the same settings; other
settings are refused, use another --out); a variant with a run folder but no result continues that run
(`train(..., resume=run_dir)`) and is then evaluated. Under torchrun all ranks train and sample together;
rank 0 evaluates and writes.

Table columns: variant, config, modulation, seeds, parameters (all, as model-info counts them), step time
in ms (batch size / median images/s of metrics.csv, the first report left out when there are several),
images/s, the distance (mean ± sample std over seeds when several), the conditioning accuracy (FD_fmnist
only) and the largest residual-stream magnitude over blocks at the last checkpoint (raw weights).
"""
from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from mapdit.errors import UserError

# settings that must match for a stored result to count as this ablation's
_BUDGET_KEYS = ("model", "num_steps", "batch_size", "lr", "data_path", "fid_samples", "features", "ref",
                "num_ref", "sampler", "sampling_steps", "cfg_scale", "weights", "ema_std")


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UserError(f"{what}: give a comma-separated list")
    if len(set(items)) != len(items):
        raise UserError(f"{what} {text!r} lists an entry twice")
    return items


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
    from mapdit.config import ModelConfig
    from mapdit.model import DiT

    with torch.device("meta"):
        model = DiT(ModelConfig.from_dict(model_config))
    return sum(p.numel() for p in model.parameters())


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


# ------------------------------------------------------------------------------------------------
# One variant
# ------------------------------------------------------------------------------------------------
def _run_variant(spec: dict, opts: dict, out: Path, log: Callable[[str], None]) -> dict | None:
    """Train (or resume), evaluate and record one variant; the result dict on rank 0, None elsewhere."""
    from mapdit.config import make_config
    from mapdit.evaluate.fid_cli import _on_main, _world, fid_for_run
    from mapdit.evaluate.magnitudes import measure_run
    from mapdit.runio import latest_run_dir, load_run_config, write_json
    from mapdit.train import TrainConfig, train

    name = spec["name"]
    runs = out / "runs" / name

    def find_run() -> str | None:
        try:
            return str(latest_run_dir(runs)) if runs.is_dir() else None
        except UserError:  # a folder without config.json: training never really started
            return None

    existing = _on_main(find_run)
    tc = TrainConfig(data_path=opts["data_path"], results_dir=str(runs), num_steps=opts["num_steps"],
                     batch_size=opts["batch_size"], lr=opts["lr"], seed=spec["seed"],
                     ema_snapshots=opts["ema_snapshots"], ckpt_every=opts["ckpt_every"],
                     log_every=opts["log_every"], precision=opts["precision"], device=opts["device"])
    if existing:
        log(f"{name}: resuming {existing}")
        run_dir = train(tc, None, resume=existing)
    else:
        log(f"{name}: training {opts['model']} config {spec['config']} modulation {spec['modulation']} "
            f"seed {spec['seed']} for {opts['num_steps']} steps")
        # sizes follow the data (train() replaces them); placeholders until then
        model_cfg = make_config(opts["model"], preset=spec["config"], modulation=spec["modulation"],
                                input_size=make_config(opts["model"]).patch_size, in_channels=1, num_classes=1)
        run_dir = train(tc, model_cfg)
    fid = fid_for_run(run_dir, opts["fid_samples"], ref=opts["ref"], features=opts["features"],
                      weights=opts["weights"], ema_std=opts["ema_std"], cfg_scale=opts["cfg_scale"],
                      sampler=opts["sampler"], steps=opts["sampling_steps"], seed=spec["seed"],
                      batch_size=opts["sample_batch_size"], cache_dir=opts["cache_dir"], num_ref=opts["num_ref"],
                      device=opts["device"], progress=opts["progress"], log=log)

    def record() -> dict:
        mags = measure_run(run_dir, batch_size=opts["magnitude_batch_size"], seed=0, weights="raw",
                           device=opts["device"], log=log)
        last = max(mags["steps"])
        final = [v for s, q, _, v in mags["rows"] if s == last and q == "residual"]
        config = load_run_config(run_dir)
        rate = _step_rate(Path(run_dir))
        result = {
            "name": name, "variant": spec["variant"], "config": spec["config"], "modulation": spec["modulation"],
            "seed": spec["seed"], "run_dir": str(run_dir), "settings": opts["budget"],
            "parameters": _parameters(config["model"]),
            "images_per_s": rate,
            "step_time_ms": None if not rate else 1000.0 * opts["batch_size"] / rate,
            "metric": fid["metric"], "value": fid["value"],
            "conditioning_accuracy": fid.get("conditioning_accuracy"),
            "max_block_magnitude": max(final), "final_residual_magnitudes": final, "final_step": last,
            "fid_json": fid["result_json"], "magnitudes_csv": str(mags["csv"]),
        }
        write_json(out / "results" / f"{name}.json", result)
        log(f"{name}: {fid['metric']} {fid['value']:.4f}, max block magnitude {max(final):.4g}, "
            f"{_fmt(result['step_time_ms'])} ms/step")
        return result

    result = _on_main(record)
    return result if _world()[0] == 0 else None


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
    from mapdit.runio import write_text

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
def run_ablation(*, configs: list[str], modulations: list[str], model: str, num_steps: int,
                 data_path: str = "fashion-mnist", batch_size: int = 256, seeds: list[int] = (0,),
                 fid_samples: int = 10_000, features: str | None = None, ref: str | None = None,
                 num_ref: int | None = None, out: str | Path = "results/ablation", lr: float | None = None,
                 sampler: str = "ddpm", sampling_steps: int = 250, cfg_scale: float = 1.0, weights: str = "ema",
                 ema_std: float | None = None, sample_batch_size: int = 64, magnitude_batch_size: int = 64,
                 ema_snapshots: int = 100, ckpt_every: int | None = None, log_every: int = 10,
                 precision: str = "fp32", device: str | None = None, cache_dir=None, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> dict:
    """Train and score every variant; returns {"rows", "results", "table_md", "table_csv", "trained",
    "skipped"} on rank 0 (the lists only elsewhere). See the module doc."""
    from mapdit import distributed as dist_utils
    from mapdit.config import PRESETS, make_config
    from mapdit.evaluate.fid_cli import _DEFAULT_CACHE, _on_main
    from mapdit.runio import read_json

    d = dist_utils.init(device)
    out = Path(out)

    def say(msg: str) -> None:
        if not d.is_main:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        (log or (lambda m: print(m, file=sys.stderr)))(line)
        with open(out / "log.txt", "a") as f:
            f.write(line + "\n")

    configs = [c.upper() for c in configs]
    for c in configs:
        if c not in PRESETS:
            raise UserError(f"unknown config {c!r} in --configs: use some of {', '.join(PRESETS)}")
    canonical = [make_config(model, modulation=m).modulation for m in modulations]  # validates the names too
    if len(set(canonical)) != len(canonical):
        raise UserError(f"--modulations {','.join(modulations)} names one modulation twice")
    if num_steps < 1:
        raise UserError("--num-steps must be at least 1")
    from mapdit.samplers import check_sampler

    check_sampler(sampler)  # before any training: an unknown name or a missing diffusers fails now
    budget = {"model": model, "num_steps": num_steps, "batch_size": batch_size, "lr": lr,
              "data_path": data_path, "fid_samples": fid_samples, "features": features, "ref": ref,
              "num_ref": num_ref, "sampler": sampler, "sampling_steps": sampling_steps, "cfg_scale": cfg_scale,
              "weights": weights, "ema_std": ema_std}
    opts = dict(budget, seeds=list(seeds), ema_snapshots=ema_snapshots, ckpt_every=ckpt_every,
                log_every=log_every, precision=precision, device=device, budget=budget,
                cache_dir=_DEFAULT_CACHE if cache_dir is None else cache_dir, progress=progress,
                sample_batch_size=sample_batch_size, magnitude_batch_size=magnitude_batch_size)
    specs = [{"config": c, "modulation": m, "seed": int(s), "variant": f"{c}-{m}", "name": f"{c}-{m}-seed{s}"}
             for c in configs for m in canonical for s in seeds]
    order = [f"{c}-{m}" for c in configs for m in canonical]
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)

    def stored(spec: dict) -> dict | None:
        path = out / "results" / f"{spec['name']}.json"
        if not path.is_file():
            return None
        result = read_json(path)
        mismatch = [k for k in _BUDGET_KEYS if result.get("settings", {}).get(k) != budget[k]]
        if mismatch:
            raise UserError(f"{path} was made with other settings ({', '.join(mismatch)} differ): use another "
                            "--out, or delete it to redo that variant")
        return result

    say(f"ablation in {out}: {len(specs)} variants ({', '.join(configs)} x {', '.join(canonical)} x seeds "
        f"{', '.join(map(str, seeds))}), {model}, {num_steps} steps, batch {batch_size}")
    results, trained, skipped = [], [], []
    for spec in specs:
        done = _on_main(lambda: stored(spec))
        if done is not None:
            say(f"{spec['name']}: skipped, already finished ({out / 'results' / (spec['name'] + '.json')})")
            skipped.append(spec["name"])
            results.append(done)
            continue
        result = _run_variant(spec, opts, out, say)
        trained.append(spec["name"])
        if result is not None:
            results.append(result)

    summary = {"trained": trained, "skipped": skipped, "results": results}
    if d.is_main:
        rows = summarise(results, order)
        md, csv_path = write_table(rows, out, f"Ablation: {model}, {num_steps} steps, batch {batch_size}, "
                                              f"{fid_samples} samples ({sampler} {sampling_steps} steps)")
        say(f"table -> {md} and {csv_path}")
        summary.update(rows=rows, table_md=md, table_csv=csv_path)
    dist_utils.barrier(d)
    return summary


# ------------------------------------------------------------------------------------------------
# `mapdit ablate`
# ------------------------------------------------------------------------------------------------
def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in parse_list(text, what)]
    except ValueError:
        raise UserError(f"{what} {text!r}: give comma-separated integers, e.g. 0,1,2") from None


def cmd_ablate(args: argparse.Namespace) -> dict:
    from mapdit import distributed as dist_utils

    torch.set_flush_denormal(True)
    summary = run_ablation(
        configs=parse_list(args.configs, "--configs"), modulations=parse_list(args.modulations, "--modulations"),
        model=args.model, num_steps=args.num_steps, data_path=args.data_path, batch_size=args.batch_size,
        seeds=_int_list(args.seeds, "--seeds"), fid_samples=args.fid_samples, features=args.features,
        ref=args.ref, num_ref=args.num_ref, out=args.out, lr=args.lr, sampler=args.sampler,
        sampling_steps=args.sampling_steps, cfg_scale=args.cfg_scale, weights=args.weights, ema_std=args.ema_std,
        sample_batch_size=args.sample_batch_size, magnitude_batch_size=args.magnitude_batch_size,
        ema_snapshots=args.ema_snapshots, ckpt_every=args.ckpt_every, log_every=args.log_every,
        precision=args.precision, device=args.device, cache_dir=args.cache_dir)
    if "table_md" in summary:
        print(summary["table_md"])
    dist_utils.shutdown(dist_utils.init(args.device))
    return summary


def register(sub) -> None:
    from mapdit.samplers import SAMPLER_CHOICES

    p = sub.add_parser("ablate", help="train and score configs x modulations x seeds with one budget; "
                                      "writes the results table (resumable, also under torchrun)")
    p.add_argument("--configs", default="A,B,C,D,E", help="comma-separated presets, e.g. A,E")
    p.add_argument("--modulations", default="adaln", help="comma-separated, e.g. adaln,scale,scale+rotate")
    p.add_argument("--model", default="DiT-XS/2")
    p.add_argument("--num-steps", type=int, required=True)
    p.add_argument("--data-path", default="fashion-mnist")
    p.add_argument("--batch-size", "--global-batch-size", dest="batch_size", type=int, default=256)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 (no weight normalisation) or 1e-2")
    p.add_argument("--seeds", default="0", help="comma-separated training (and sampling) seeds")
    p.add_argument("--fid-samples", type=int, default=10_000)
    p.add_argument("--features", choices=("fmnist", "inception"), default=None,
                   help="default: fmnist for Fashion-MNIST, inception otherwise")
    p.add_argument("--ref", default=None, help="FID reference (default: the training data)")
    p.add_argument("--num-ref", type=int, default=None, help="a fixed random subset of the reference")
    p.add_argument("--sampler", choices=SAMPLER_CHOICES, default="ddpm",
                   help="ddpm/ancestral, ddim (ours) or dpm++2m, unipc, heun (diffusers' few-step solvers)")
    p.add_argument("--sampling-steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--ema-std", type=float, default=None)
    p.add_argument("--sample-batch-size", type=int, default=64)
    p.add_argument("--magnitude-batch-size", type=int, default=64)
    p.add_argument("--ema-snapshots", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=None, help="default num_steps // 5 (magnitudes per checkpoint)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--cache-dir", default=None, help="reference statistics cache")
    p.add_argument("--out", default="results/ablation")
    p.set_defaults(func=cmd_ablate)
