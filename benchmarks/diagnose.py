"""Why full MP trails the plain DiT at the demo's budget: one run per variant, scored on samples.

Every variant trains DiT-XXS/4 on Fashion-MNIST with the same budget (default: the demo's, 2000 steps of
batch 64), then is scored from its EMA (sigma_rel 0.10) with 1,000 samples (DDIM 50 steps, guidance 2):
FD_fmnist, conditioning accuracy, held-out eps-MSE, and a few internal quantities (learned gains, how far
the label moves the modulation). Finished variants are skipped, so the script is resumable; results go
to OUT/results/NAME.json and the table to OUT/diagnosis.md.

    python benchmarks/diagnose.py --out results/diagnose --variants A@1e-2,D@3e-3,...
    python benchmarks/diagnose.py --list          # the named variants
    python benchmarks/diagnose.py --internals RUN,RUN   # only the internal quantities of finished runs

A variant is `NAME[@LR]`; NAME is a key of VARIANTS (preset plus option overrides).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mapdit.config import MP_OPTIONS, TrainConfig, make_config
from mapdit.evaluate.heldout import heldout_for_run
from mapdit.evaluate.magnitudes import attention_entropy, fixed_batch
from mapdit.experiments.fid_run import fid_for_run
from mapdit.runio import load_run_config, run_to_resume, write_json
from mapdit.train import train
from mapdit.weights import load_model

# name -> (preset, model-option overrides). Leave-one-out variants are added below.
VARIANTS: dict[str, tuple[str, dict]] = {
    "A": ("A", {}),
    "B": ("B", {}),
    "C": ("C", {}),
    "D": ("D", {}),
    "E": ("E", {}),
    "A+fwn": ("A", {"forced_weight_normalization": True}),  # forced WN alone
    "A+wn": ("A", {"weight_normalization": True}),  # on-use WN alone
}
for _opt in MP_OPTIONS:
    VARIANTS[f"E-{_opt}"] = ("E", {"drop": _opt})


def split_name(name: str) -> tuple[str, list[str], list[str]]:
    """"E+xkey=value+tkey=value" -> ("E", model overrides, training overrides)."""
    base = name.split("+x")[0].split("+t")[0]
    rest = name[len(base):].split("+")[1:]
    return base, [e[1:] for e in rest if e.startswith("x")], [e[1:] for e in rest if e.startswith("t")]


def build_config(name: str, model: str):
    base, model_extras, _ = split_name(name)
    preset, over = VARIANTS[base] if base in VARIANTS else (None, None)
    if preset is None:
        raise SystemExit(f"unknown variant {name!r}: see --list")
    over = dict(over)
    drop = over.pop("drop", None)
    cfg = make_config(model, preset=preset, input_size=28, in_channels=1, num_classes=10, **over)
    if drop:
        setattr(cfg, drop, False)
    for extra in model_extras:  # "+xKEY=VALUE": any ModelConfig field
        key, value = extra.split("=", 1)
        current = getattr(cfg, key)
        setattr(cfg, key, value if current is None or isinstance(current, str) else type(current)(json.loads(value)))
    return cfg.validate()


@torch.no_grad()
def internals(run_dir: Path) -> dict:
    """Learned gains and how strongly the label (vs the timestep) moves the block modulation."""
    model, _, _ = load_model(run_dir, weights="ema", ema_std=0.10, log=lambda m: None)
    out: dict = {}
    gains = {n: float(p) for n, p in model.named_parameters() if n.endswith("gain") and p.numel() == 1}
    mod = [v for n, v in gains.items() if "adaLN" in n and n.startswith("blocks")]
    if mod:
        out["modulation_gain_mean"] = sum(abs(v) for v in mod) / len(mod)
    for n, v in gains.items():
        if n.startswith("final_layer.linear"):
            out["final_gain"] = v
    t = torch.arange(0, 1000, 50)
    y = torch.arange(10)
    tt, yy = t.repeat_interleave(len(y)), y.repeat(len(t))
    temb, yemb = model.t_embedder(tt), model.y_embedder(yy)
    out["t_emb_rms"] = float(temb.pow(2).mean().sqrt())
    out["y_emb_rms"] = float(yemb.pow(2).mean().sqrt())
    c = model.condition(temb, yemb)
    m = model.blocks[0].adaLN_modulation(c).reshape(len(t), len(y), -1)  # (t, y, K)
    label_var = m.var(dim=1).mean()  # spread across labels at fixed t
    time_var = m.var(dim=0).mean()  # spread across t at fixed label
    out["label_share_block0"] = float(label_var / (label_var + time_var))
    # attention entropy per block (1: uniform over the tokens) on real images noised to t = 100, 500, 900
    config = load_run_config(run_dir)
    for step in (100, 500, 900):
        x, tt, yy, _ = fixed_batch(config, batch_size=64, seed=0, t=step)
        out[f"attn_entropy_t{step}"] = [round(e, 4) for e in attention_entropy(model, x, tt, yy)]
    return out


def run_variant(spec: str, args, out: Path) -> dict:
    name, _, lr = spec.partition("@")
    lr_value = float(lr) if lr else None
    result_path = out / "results" / f"{spec.replace('/', '_')}.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    runs = out / "runs" / spec.replace("/", "_")
    cfg = build_config(name, args.model)
    tc = TrainConfig(data_path=args.data_path, results_dir=str(runs), num_steps=args.num_steps,
                     batch_size=args.batch_size, lr=lr_value, seed=args.seed, log_every=100, ema_snapshots=0,
                     ema_stds=(0.05, 0.10), ckpt_every=max(1, args.num_steps // 2))
    for extra in split_name(name)[2]:  # "+tKEY=VALUE": any TrainConfig field (numbers)
        key, value = extra.split("=", 1)
        setattr(tc, key, json.loads(value))
    start = time.time()
    existing = run_to_resume(runs)
    run_dir = train(tc, None, resume=str(existing)) if existing else train(tc, cfg)
    train_s = time.time() - start
    fid = fid_for_run(run_dir, args.fid_samples, ema_std=0.10, cfg_scale=args.cfg_scale, sampler="ddim",
                      steps=args.sampling_steps, seed=0, batch_size=250, progress=False, log=lambda m: None)
    held_all = heldout_for_run(run_dir, weights="ema", ema_std=0.10)
    held = held_all["mse"]
    result = {"variant": spec, "lr": tc.resolved(cfg).lr, "run_dir": str(run_dir), "train_s": train_s,
              "fd": fid["value"], "acc": fid.get("conditioning_accuracy"), "heldout": held,
              "heldout_low_t": held_all["mse_low_t"], "heldout_high_t": held_all["mse_high_t"],
              "budget": {"model": args.model, "steps": args.num_steps, "batch": args.batch_size,
                         "fid_samples": args.fid_samples, "sampler": f"ddim{args.sampling_steps}",
                         "cfg": args.cfg_scale},
              **internals(Path(run_dir))}
    write_json(result_path, result)
    return result


def table(results: list[dict]) -> str:
    cols = ["variant", "lr", "fd", "acc", "heldout", "heldout_low_t", "heldout_high_t", "modulation_gain_mean",
            "final_gain", "t_emb_rms", "y_emb_rms", "label_share_block0", "attn_entropy_t500", "train_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, list):
                v = "/".join(f"{e:.2f}" for e in v)
            cells.append("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/diagnose")
    p.add_argument("--variants", default="A@1e-2,D@1e-2")
    p.add_argument("--model", default="DiT-XXS/4")
    p.add_argument("--num-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid-samples", type=int, default=1000)
    p.add_argument("--sampling-steps", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--data-path", default="fashion-mnist")
    p.add_argument("--list", action="store_true")
    p.add_argument("--internals", default=None, metavar="RUN[,RUN...]",
                   help="only print the internal quantities (gains, label share, attention entropy) of runs")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(VARIANTS))
        return 0
    torch.set_flush_denormal(True)
    if args.internals:
        for run in args.internals.split(","):
            print(json.dumps({"run": run, **internals(Path(run))}))
        return 0
    out = Path(args.out)
    results = []
    for spec in args.variants.split(","):
        r = run_variant(spec.strip(), args, out)
        print(f"{r['variant']}: FD {r['fd']:.1f} acc {r['acc']:.3f} heldout {r['heldout']:.4f}", file=sys.stderr)
        results.append(r)
    done = sorted((json.loads(f.read_text()) for f in (out / "results").glob("*.json")), key=lambda r: r["variant"])
    (out / "diagnosis.md").write_text(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
