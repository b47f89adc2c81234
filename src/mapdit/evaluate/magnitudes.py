"""Magnitudes through a DiT: the paper's Figure 5 (`mapdit magnitudes`) and a cheap per-block probe for
training logs (`residual_magnitudes`). Measured with forward hooks; the model code is not touched.

Quantities, one value per block i (activations with `mapdit.nn.magnitude`: the RMS over channels of every
token, averaged over tokens and the batch):

    residual     the residual stream after block i (the block's output)
    attn_in      the attention's input (after norm and modulation), attn_out its output (after proj,
                 before the gate and the residual sum)
    mlp_in       the same for the MLP: mlp_in, mlp_out
    weight_qkv   the stored weight matrix W (out x in) of attn.qkv, attn.proj, mlp.fc1, mlp.fc2:
    weight_proj  magnitude(W) = mean over output rows of the row RMS = (mean row L2 norm) / sqrt(fan_in).
    weight_fc1   For MP linears this is the learned W before normalisation on use (forced weight
    weight_fc2   normalisation keeps it at 1; without it, it grows), for nn.Linear the weight itself.

The fixed batch: `batch_size` images drawn with `seed` from the run's training data and noised to the
diffusion step t=500 (of 1000) with q_sample (noise from the same seed); labels are the images' own
classes. When the data cannot be loaded, x_t ~ N(0, I) with uniform random labels instead: the log and
the JSON beside the CSV say which ("input": "data" or "gaussian").

Outputs of `mapdit magnitudes --run R` (never overwriting: the next free name magnitudes-1.csv, ...):
    R/eval/magnitudes.csv              columns step, quantity, block, value (a row per checkpoint x quantity x block)
    R/eval/magnitudes.json             settings: weights, t, seed, batch size, input, checkpoints
    R/eval/magnitudes-<quantity>.png   blocks on the x axis, one line per checkpoint, coloured by step
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable

import torch

from mapdit.config import ModelConfig
from mapdit.data import load_dataset
from mapdit.diffusion import make_diffusion
from mapdit.ema import weights_identity
from mapdit.errors import UserError
from mapdit.nn import magnitude, normalize
from mapdit.plots import pyplot, save_figure
from mapdit.runio import (
    cache_key,
    check_writable,
    checkpoint_identity,
    list_checkpoints,
    load_run_config,
    read_json,
    verify_checkpoint,
    write_json,
    write_text,
)
from mapdit.sample import unused_path
from mapdit.weights import check_weight_choice, load_model, resolve_checkpoint

DEFAULT_T = 500
ACTIVATIONS = ("residual", "attn_in", "attn_out", "mlp_in", "mlp_out")
WEIGHTS = {"weight_qkv": ("attn", "qkv"), "weight_proj": ("attn", "proj"),
           "weight_fc1": ("mlp", "fc1"), "weight_fc2": ("mlp", "fc2")}
QUANTITIES = ACTIVATIONS + tuple(WEIGHTS)


# ------------------------------------------------------------------------------------------------
# Measuring one model
# ------------------------------------------------------------------------------------------------
def _first_tensor(args) -> torch.Tensor:
    return args[0] if isinstance(args, tuple) else args


@torch.no_grad()
def _forward_with_hooks(model, x, t, y, hooks: list[tuple[torch.nn.Module, Callable]]) -> None:
    """One eval-mode forward with `hooks` (module, fn(module, inputs, output)) attached; the model's
    train/eval mode is restored afterwards."""
    was_training = model.training
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    model.eval()
    try:
        model(x, t, y)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def residual_magnitudes(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Magnitude of the residual stream after every block, for one (no-grad, eval-mode) forward of
    (x, t, y). `model` is the plain DiT (not a DDP or compiled wrapper). One host sync for all blocks."""
    found: list[torch.Tensor | None] = [None] * len(model.blocks)

    def hook(i):
        return lambda module, inputs, output: found.__setitem__(i, magnitude(output))

    _forward_with_hooks(model, x, t, y, [(block, hook(i)) for i, block in enumerate(model.blocks)])
    return torch.stack(found).tolist()


def measure(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> dict[str, list[float]]:
    """Every quantity of the module doc for one forward of (x, t, y): {quantity: [value per block]}."""
    depth = len(model.blocks)
    found: dict[str, list] = {q: [None] * depth for q in ACTIVATIONS}

    def hook(i, prefix):
        def record(module, inputs, output):
            if prefix == "residual":
                found["residual"][i] = magnitude(output)
            else:
                found[f"{prefix}_in"][i] = magnitude(_first_tensor(inputs))
                found[f"{prefix}_out"][i] = magnitude(output)
        return record

    hooks = []
    for i, block in enumerate(model.blocks):
        hooks += [(block, hook(i, "residual")), (block.attn, hook(i, "attn")), (block.mlp, hook(i, "mlp"))]
    _forward_with_hooks(model, x, t, y, hooks)
    out = {q: torch.stack(v).tolist() for q, v in found.items()}
    with torch.no_grad():
        for q, (part, layer) in WEIGHTS.items():
            out[q] = [float(magnitude(getattr(getattr(b, part), layer).weight)) for b in model.blocks]
    return out


def attention_entropy(model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> list[float]:
    """How spread each block's attention is, for one forward of (x, t, y): the entropy of every query's
    attention distribution softmax(q k^T / sqrt(d_h)), divided by log(T) (1: uniform over the T tokens,
    0: one token), averaged over queries, heads and the batch; one value per block. q and k are recomputed
    from the attention's input with its own qkv layer (and per-head normalisation under cosine attention,
    whose logits are then capped at sqrt(d_h))."""
    found: list[float | None] = [None] * len(model.blocks)

    def hook(i):
        def record(module, inputs, output):
            a = _first_tensor(inputs)  # (N, T, D)
            n, tokens, d = a.shape
            q, k, _ = module.qkv(a).reshape(n, tokens, 3, module.heads, d // module.heads).unbind(2)  # (N, T, h, dh)
            if module.cosine:
                q, k = normalize(q), normalize(k)
            logits = torch.einsum("nqhd,nkhd->nhqk", q, k) / (d // module.heads) ** 0.5  # (N, h, T, T)
            p = logits.softmax(dim=-1)
            entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (N, h, T)
            found[i] = float(entropy.mean() / torch.log(torch.tensor(float(tokens))))
        return record

    _forward_with_hooks(model, x, t, y, [(b.attn, hook(i)) for i, b in enumerate(model.blocks)])
    return found


def attention_entropy_for_run(run_dir: str | Path, weights: str = "ema", ema_std: float | None = None,
                              t: int = DEFAULT_T, batch_size: int = 64, seed: int = 0) -> list[float]:
    """`attention_entropy` per block of a run's last checkpoint (EMA `ema_std`) on the fixed batch noised to
    step t, cached in RUN/eval/attention-entropy-*.json."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    step, ckpt_path = resolve_checkpoint(run_dir, None)  # the checkpoint load_model takes
    tag = "raw" if weights == "raw" else f"ema{ema_std if ema_std is not None else 'min'}"
    # keyed by the checkpoint's content, not its step: a step rewritten by a resume is another model
    key = cache_key({"checkpoint_sha256": checkpoint_identity(ckpt_path), "data": config["data"],
                     **weights_identity(run_dir / "ema", config["train"]["ema_stds"], weights, ema_std, step)})
    cache = run_dir / "eval" / f"attention-entropy-{tag}-step{step:07d}-t{t}-n{batch_size}-seed{seed}-k{key}.json"
    if cache.is_file():
        try:
            cached = read_json(cache)
            if isinstance(cached, dict) and isinstance(cached.get("entropy"), list):
                return cached["entropy"]
        except UserError:
            pass  # damaged: computed again and replaced below (it is a cache)
    model, _, desc = load_model(run_dir, weights=weights, ema_std=ema_std, log=lambda m: None)
    x, tt, y, source = fixed_batch(config, batch_size=batch_size, seed=seed, t=t)
    entropy = attention_entropy(model, x, tt, y)
    write_json(cache, {"entropy": entropy, "weights": desc, "step": step, "t": t, "input": source})
    return entropy


# ------------------------------------------------------------------------------------------------
# The fixed batch
# ------------------------------------------------------------------------------------------------
def fixed_batch(config: dict, batch_size: int = 64, seed: int = 0, t: int = DEFAULT_T,
                device: str | torch.device = "cpu", log: Callable[[str], None] | None = None):
    """(x_t, t, y, source) for a run config: real training images noised to step t, or Gaussian inputs
    (source "gaussian") when the data cannot be loaded. Deterministic given (seed, t, batch_size)."""
    cfg = ModelConfig.from_dict(config["model"])
    if not 0 <= t < cfg.num_train_steps:
        raise UserError(f"--t {t} must be in 0..{cfg.num_train_steps - 1}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    train_cfg = config.get("train", {})
    path = config.get("data", {}).get("path") or train_cfg.get("data_path") or "fashion-mnist"
    try:
        data = load_dataset(path, patch_size=cfg.patch_size, image_size=train_cfg.get("image_size"))
        if (data.channels, data.resolution, data.resolution) != shape:
            raise UserError(f"the data at {path} is {data.channels}x{data.resolution}x{data.resolution}, "
                            f"the model takes {'x'.join(map(str, shape))}")
    except UserError as err:
        if log:
            log(f"training data unavailable ({err}); measuring on Gaussian inputs x_t ~ N(0, I) instead")
        x_t = torch.randn((batch_size, *shape), generator=g)
        y = torch.randint(0, cfg.num_classes, (batch_size,), generator=g)
        source = "gaussian"
    else:
        idx = torch.randperm(len(data), generator=g)[:batch_size]
        x0, y = data.batch(idx)
        noise = torch.randn(x0.shape, generator=g)
        steps = torch.full((len(x0),), t, dtype=torch.long)
        x_t = make_diffusion(cfg.num_train_steps, learn_sigma=cfg.learn_sigma).q_sample(x0, steps, noise)
        source = "data"
    steps = torch.full((len(x_t),), t, dtype=torch.long)
    return x_t.to(device), steps.to(device), y.to(device), source


# ------------------------------------------------------------------------------------------------
# A run: every checkpoint
# ------------------------------------------------------------------------------------------------
def measure_run(run_dir: str | Path, batch_size: int = 64, seed: int = 0, weights: str = "raw",
                ema_std: float | None = None, t: int = DEFAULT_T, device: str | torch.device | None = None,
                plots: bool = True, log: Callable[[str], None] = print) -> dict:
    """Measure every intact checkpoint of a run; write the CSV, the settings JSON and one PNG per quantity
    under run/eval (never overwriting). Returns {"csv", "json", "pngs", "rows", "input", "steps"}."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    check_weight_choice(weights, ema_std)
    tracked = list(config["train"]["ema_stds"])
    if weights == "ema" and ema_std is not None and f"{ema_std:.3f}" not in {f"{s:.3f}" for s in tracked}:
        raise UserError(f"--ema-std {ema_std}: per checkpoint only the tracked widths are stored "
                        f"({', '.join(f'{s:g}' for s in tracked)})")
    # the CSV, JSON and plots go into the run: a read-only run (or an `eval` that is a file) fails now, not
    # after every checkpoint has been measured
    check_writable(run_dir / "eval", "the run's eval folder", "copy the run to a writable place to measure it")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    checkpoints, listed = [], list_checkpoints(run_dir)
    for step, path in listed:
        problem = verify_checkpoint(path)
        if problem:
            log(f"skipping checkpoint {path.name}: {problem}")
        else:
            checkpoints.append((step, path))
    if not listed:
        raise UserError(f"no checkpoint in {run_dir / 'checkpoints'}: train first")
    if not checkpoints:
        raise UserError(f"none of the {len(listed)} checkpoints in {run_dir / 'checkpoints'} is intact (see the "
                        "lines above): restore an intact copy")

    x, tt, y, source = fixed_batch(config, batch_size, seed, t, device, log)
    log(f"magnitudes of {run_dir.name}: {len(checkpoints)} checkpoints, {weights} weights, batch {len(x)} "
        f"({'training images' if source == 'data' else 'Gaussian inputs'}) at t={t}, seed {seed}")
    rows: list[tuple[int, str, int, float]] = []
    for step, path in checkpoints:
        model, _, _ = load_model(run_dir, weights=weights, ema_std=ema_std, ckpt=str(path), device=device,
                                 log=log)
        for quantity, values in measure(model, x, tt, y).items():
            rows += [(step, quantity, block, value) for block, value in enumerate(values)]

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "quantity", "block", "value"])
    writer.writerows((s, q, b, f"{v:.8g}") for s, q, b, v in rows)
    csv_path = write_text(run_dir / "eval" / "magnitudes.csv", buf.getvalue(), new=True)  # race-free free name
    stem = csv_path.stem
    settings = {"run_dir": str(run_dir), "weights": weights,
                "ema_std": (min(tracked) if ema_std is None else ema_std) if weights == "ema" else None,
                "t": t, "seed": seed, "batch_size": len(x), "input": source,
                "steps": [s for s, _ in checkpoints], "quantities": list(QUANTITIES),
                "activation_magnitude": "per-token RMS over channels, averaged over tokens and batch",
                "weight_magnitude": "mean row RMS of the stored weight (= mean row L2 norm / sqrt(fan_in))",
                "csv": csv_path.name}
    json_path = write_json(unused_path(run_dir / "eval" / f"{stem}.json"), settings)
    pngs = []
    if plots:
        for quantity in QUANTITIES:
            title = f"{quantity}: {run_dir.name} ({weights} weights, t={t}, {source} inputs)"
            pngs.append(plot_quantity(rows, quantity, unused_path(run_dir / "eval" / f"{stem}-{quantity}.png"),
                                      title))
    log(f"wrote {csv_path} ({len(rows)} rows) and {len(pngs)} plots")
    return {"csv": csv_path, "json": json_path, "pngs": pngs, "rows": rows, "input": source,
            "steps": settings["steps"]}


def read_csv(path: str | Path) -> list[tuple[int, str, int, float]]:
    with open(path, newline="") as f:
        return [(int(r["step"]), r["quantity"], int(r["block"]), float(r["value"])) for r in csv.DictReader(f)]


def plot_quantity(rows, quantity: str, path: Path, title: str = "") -> Path:
    """One PNG: blocks on the x axis, one line per checkpoint, coloured by training step (written atomically)."""
    plt = pyplot()
    from matplotlib.cm import ScalarMappable  # matplotlib is heavy: loaded only to plot (mapdit.plots)
    from matplotlib.colors import Normalize

    series: dict[int, dict[int, float]] = {}
    for step, q, block, value in rows:
        if q == quantity:
            series.setdefault(step, {})[block] = value
    if not series:
        raise ValueError(f"no rows for {quantity!r}")
    steps = sorted(series)
    norm = Normalize(vmin=min(steps), vmax=max(steps) if max(steps) > min(steps) else min(steps) + 1)
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    values = []
    for step in steps:
        blocks = sorted(series[step])
        ys = [series[step][b] for b in blocks]
        values += ys
        ax.plot(blocks, ys, marker="o", markersize=3, color=cmap(norm(step)), linewidth=1.2)
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel(f"magnitude ({quantity})")
    ax.set_xticks(sorted({b for s in steps for b in series[s]}))
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="training step")
    fig.tight_layout()
    return save_figure(fig, path)
