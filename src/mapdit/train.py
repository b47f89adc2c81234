"""The training loop: one readable function, `train`, driven by plain-data configs.

Every random draw of step s (timesteps, noise, label dropout, flips) comes from a generator seeded by
(seed, s) over the *global* batch, and the data order is a pure function of (seed, s): so a resumed run
continues exactly, and N ranks under torchrun see exactly the samples one process would.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from . import distributed as dist_utils
from .config import ModelConfig
from .data import IndexStream, load_dataset
from .diffusion import make_diffusion
from .ema import DEFAULT_SNAPSHOT_DTYPE as _SNAP_DTYPE, PowerEMA, save_snapshot
from .errors import UserError
from .model import DiT
from .runio import (create_run_dir, find_resumable_checkpoint, latest_run_dir, load_run_config, load_tensors,
                    save_checkpoint, split_prefix, write_json)

DEFAULT_SNAPSHOT_DTYPE = str(_SNAP_DTYPE).removeprefix("torch.")
METRIC_FIELDS = ["step", "loss", "mse", "vb", "lr", "grad_norm", "steps_per_s", "images_per_s", "skipped",
                 "elapsed_s"]


@dataclass
class TrainConfig:
    data_path: str | None = None  # None: "fashion-mnist" (or, on resume, the run's own data)
    results_dir: str = "results"
    num_steps: int = 400_000
    batch_size: int = 256  # global: split evenly over ranks
    lr: float | None = None  # None: 1e-4 without weight normalisation, 1e-2 with it (spec §6.3)
    warmup_steps: int | None = None  # None: num_steps // 150
    decay_start: int | None = None  # None: num_steps // 10; then lr ~ 1/sqrt(step / decay_start)
    adam_betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    grad_clip: float | None = None
    seed: int = 0
    label_dropout: float = 0.1
    ema_stds: tuple[float, ...] = (0.05, 0.10)
    ema_snapshots: int = 100  # snapshots per tracked width over the run (0: none)
    snapshot_dtype: str = DEFAULT_SNAPSHOT_DTYPE
    ckpt_every: int | None = None  # None: num_steps // 5
    log_every: int = 10
    precision: str = "fp32"  # or "bf16" (autocast)
    compile: bool = False
    device: str | None = None
    skip_nonfinite: bool = False
    image_size: int | None = None
    hflip: bool = False

    def resolved(self, model: ModelConfig) -> "TrainConfig":
        """Fill the defaults that depend on the run length and the model."""
        tc = dataclasses.replace(self)
        if tc.lr is None:
            tc.lr = 1e-2 if (model.weight_normalization or model.forced_weight_normalization) else 1e-4
        if tc.warmup_steps is None:
            tc.warmup_steps = max(1, tc.num_steps // 150)
        if tc.decay_start is None:
            tc.decay_start = max(1, tc.num_steps // 10)
        if tc.ckpt_every is None:
            tc.ckpt_every = max(1, tc.num_steps // 5)
        return tc

    def check(self, world_size: int) -> None:
        if self.num_steps < 1:
            raise UserError("--num-steps must be at least 1")
        if self.batch_size < 1 or self.batch_size % world_size:
            raise UserError(f"--global-batch-size {self.batch_size} must be a positive multiple of the number "
                            f"of processes ({world_size})")
        if self.precision not in ("fp32", "bf16"):
            raise UserError(f"--precision {self.precision!r}: use fp32 or bf16")
        if not self.ema_stds or any(not 0 < s < 0.2887 for s in self.ema_stds):
            raise UserError(f"--ema-stds {self.ema_stds}: each width must be in (0, 0.288)")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"--lr {self.lr} must be positive")


def lr_multiplier(step: int, warmup: int, decay_start: int) -> float:
    """Linear warm-up, flat, then inverse-square-root decay from `decay_start` (EDM2's rule, spec §6.3)."""
    if step + 1 < warmup:
        return (step + 1) / warmup
    if step >= decay_start:
        return 1.0 / math.sqrt(step / decay_start)
    return 1.0


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


# ------------------------------------------------------------------------------------------------
# Checkpoint contents (tensors only; the JSON sidecar holds the rest)
# ------------------------------------------------------------------------------------------------
def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {f"opt.{idx}.{key}": value for idx, state in sd["state"].items() for key, value in state.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in split_prefix(tensors, "opt.").items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Logger:
    """Human log (stdout via tqdm-safe writes + log.txt on rank 0)."""

    def __init__(self, run_dir: Path | None, is_main: bool, bar=None):
        self.path = run_dir / "log.txt" if run_dir else None
        self.is_main, self.bar = is_main, bar

    def __call__(self, msg: str) -> None:
        if not self.is_main:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


class StopRequest:
    """SIGTERM/SIGINT ask the loop to finish the current step, checkpoint and exit."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def train(tc: TrainConfig, model_cfg: ModelConfig | None, resume: str | None = None,
          batch_hook=None) -> Path:
    """Train; returns the run folder. `resume`: a run folder to continue ("latest": newest in results_dir).

    `batch_hook(step, x) -> x` lets tests poison a batch; it is not a user option.
    """
    d = dist_utils.init(tc.device)
    device = d.device
    torch.set_flush_denormal(True)  # CPU: denormal floats (tiny Adam moments, zero-init layers) cost ~10x per op
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- run folder and configs -----------------------------------------------------------------
    run_dir: Path | None = None
    if resume is not None:
        run_dir = latest_run_dir(tc.results_dir) if resume == "latest" else Path(resume)
        saved = load_run_config(run_dir)
        model_cfg = ModelConfig.from_dict(saved["model"])
        stored = TrainConfig(**{**saved["train"], "adam_betas": tuple(saved["train"]["adam_betas"]),
                                "ema_stds": tuple(saved["train"]["ema_stds"])})
        # what may change on resume: the run length and where/how it runs
        tc = dataclasses.replace(stored, num_steps=max(tc.num_steps, stored.num_steps), device=tc.device,
                                 compile=tc.compile, results_dir=str(run_dir.parent),
                                 data_path=tc.data_path or stored.data_path)
    tc = dataclasses.replace(tc, data_path=tc.data_path or "fashion-mnist")
    tc.check(d.world_size)
    data = load_dataset(tc.data_path, patch_size=model_cfg.patch_size, image_size=tc.image_size,
                        hflip=tc.hflip)
    if data.num_classes > model_cfg.num_classes and resume is not None:
        raise UserError(f"the data has {data.num_classes} classes but the run was trained with "
                        f"{model_cfg.num_classes}: resume with the run's own data")
    model_cfg = dataclasses.replace(model_cfg, input_size=data.resolution, in_channels=data.channels,
                                    num_classes=data.num_classes).validate()
    if resume is not None and model_cfg.to_dict() != ModelConfig.from_dict(saved["model"]).to_dict():
        raise UserError(f"the data at {tc.data_path} ({data.channels}x{data.resolution}x{data.resolution}, "
                        f"{data.num_classes} classes) does not match the run's model "
                        f"({saved['model']['in_channels']}x{saved['model']['input_size']}, "
                        f"{saved['model']['num_classes']} classes)")
    tc = tc.resolved(model_cfg)
    if run_dir is None and d.is_main:
        run_dir = create_run_dir(tc.results_dir, model_cfg.model)
    run_dir = Path(dist_utils.broadcast_object(d, str(run_dir) if run_dir else None))
    config_doc = {"model": model_cfg.to_dict(), "train": dataclasses.asdict(tc), "data": data.meta(),
                  "mapdit_version": __version__, "torch_version": torch.__version__,
                  "world_size": d.world_size}
    if d.is_main:
        write_json(run_dir / "config.json", config_doc)

    # ---- model, optimizer, EMA ------------------------------------------------------------------
    torch.manual_seed(tc.seed)
    model = DiT(model_cfg).to(device)
    named = model.trainable_parameters()
    params = [p for _, p in named]
    fused = device.type == "cuda"
    opt = torch.optim.Adam(params, lr=tc.lr, betas=tc.adam_betas, eps=tc.adam_eps,
                           foreach=not fused, fused=fused or None)
    ema = PowerEMA(dict(named), sigma_rels=tc.ema_stds)
    start_step = 0
    if resume is not None:
        found = find_resumable_checkpoint(run_dir, log=Logger(run_dir, d.is_main))
        if found is not None:
            start_step, path = found
            tensors = load_tensors(path, device=str(device))
            meta = json.loads(path.with_suffix(".json").read_text())
            missing = set(model.state_dict()) - set(split_prefix(tensors, "model."))
            if missing:
                raise UserError(f"checkpoint {path} does not match the run's model (missing {sorted(missing)[:3]})")
            model.load_state_dict(split_prefix(tensors, "model."))
            ema.load_state_dict(split_prefix(tensors, "ema."))
            load_optimizer(opt, tensors, meta)
    fwd = model
    if d.enabled:
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if fused else None)
    if tc.compile:
        fwd = torch.compile(fwd)

    diffusion = make_diffusion(model_cfg.num_train_steps, learn_sigma=model_cfg.learn_sigma)
    per_rank = tc.batch_size // d.world_size
    stream = IndexStream(len(data), per_rank, tc.seed, d.rank, d.world_size)
    snap_every = max(1, tc.num_steps // tc.ema_snapshots) if tc.ema_snapshots else 0
    snap_dtype = getattr(torch, tc.snapshot_dtype)
    null_class = model_cfg.null_class
    sample_shape = (data.channels, data.resolution, data.resolution)
    lo, hi = d.rank * per_rank, (d.rank + 1) * per_rank
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")

    from tqdm.auto import tqdm

    bar = tqdm(total=tc.num_steps, initial=start_step, disable=not d.is_main, dynamic_ncols=True,
               mininterval=1.0, unit="step")
    log = Logger(run_dir, d.is_main, bar)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{'resuming' if start_step else 'starting'} {run_dir} at step {start_step}/{tc.num_steps}: "
        f"{model_cfg.model} preset={model_cfg.preset or '-'} modulation={model_cfg.modulation} "
        f"params={n_params:,} data={data.kind} {len(data)} images {sample_shape} lr={tc.lr:g} "
        f"batch={tc.batch_size} ranks={d.world_size} device={device}")

    metrics_path = run_dir / "metrics.csv"
    if d.is_main and not metrics_path.exists():
        with open(metrics_path, "w", newline="") as f:
            csv.writer(f).writerow(METRIC_FIELDS)

    # window accumulators stay on the device: no per-step synchronisation
    sums = torch.zeros(4, device=device)  # loss, mse, vb, grad_norm
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    window_steps, skipped_total, window_start = 0, 0, time.perf_counter()
    run_start = time.perf_counter()
    last_ckpt = start_step

    def checkpoint(step: int) -> None:
        nonlocal last_ckpt
        if not d.is_main:
            return
        finite = all(torch.isfinite(p).all() for p in params)
        if not finite:
            raise UserError(f"non-finite weights at step {step}: refusing to write a checkpoint; the last good "
                            f"one is step {last_ckpt} in {run_dir / 'checkpoints'}")
        opt_t, opt_meta = optimizer_tensors(opt)
        tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                   **{f"ema.{k}": v for k, v in ema.state_dict().items()}, **opt_t}
        save_checkpoint(run_dir, step, tensors, {**opt_meta, "train_step": step})
        last_ckpt = step

    model.train()
    step = start_step
    with StopRequest() as stop:
        for step in range(start_step, tc.num_steps):
            lr = tc.lr * lr_multiplier(step, tc.warmup_steps, tc.decay_start)
            for group in opt.param_groups:
                group["lr"] = lr
            model.project_weights_()  # forced weight normalisation: one batched pass per step

            g = step_generator(tc.seed, step, device)
            t = torch.randint(0, diffusion.num_timesteps, (tc.batch_size,), generator=g, device=device)[lo:hi]
            noise = torch.randn((tc.batch_size, *sample_shape), generator=g, device=device)[lo:hi]
            drop = (torch.rand(tc.batch_size, generator=g, device=device) < tc.label_dropout)[lo:hi]
            x, y = data.batch(stream.indices(step), torch.Generator().manual_seed(tc.seed * 7919 + step))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if null_class is not None:
                y = torch.where(drop, torch.full_like(y, null_class), y)
            if batch_hook is not None:
                x = batch_hook(step, x)

            with autocast:
                losses = diffusion.training_losses(fwd, x, t, y, noise=noise)
            loss = losses["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip or float("inf"), foreach=True)
            if tc.skip_nonfinite and not (torch.isfinite(loss) & torch.isfinite(grad_norm)).item():
                skipped_total += 1  # this step costs one synchronisation; only with --skip-nonfinite
                log(f"step {step + 1}: non-finite loss or gradient, step skipped ({skipped_total} so far)")
                opt.zero_grad(set_to_none=True)
            else:
                opt.step()
                ema.update(params, step + 1)
                finite = torch.isfinite(loss)
                first_bad = torch.where((first_bad < 0) & ~finite, torch.full_like(first_bad, step + 1), first_bad)
                sums += torch.stack((loss.detach(), losses["mse"].mean().detach(), losses["vb"].mean().detach(),
                                     grad_norm.detach()))
            window_steps += 1
            done = step + 1

            if snap_every and (done % snap_every == 0 or done == tc.num_steps) and d.is_main:
                for sigma in tc.ema_stds:
                    save_snapshot(run_dir / "ema", sigma, done, ema.averaged(sigma), dtype=snap_dtype)

            stop_now = stop.signal is not None
            if done % tc.log_every == 0 or done == tc.num_steps or stop_now:
                if d.enabled:  # every rank must agree to stop; check only at report steps
                    flag = torch.tensor(float(stop_now), device=device)
                    torch.distributed.all_reduce(flag)
                    stop_now = flag.item() > 0
                    dist_utils.all_reduce_mean_(d, sums)
                bad = int(first_bad.item())
                if bad >= 0:
                    raise UserError(f"non-finite loss at step {bad}: training stopped; the last good checkpoint "
                                    f"is step {last_ckpt} in {run_dir / 'checkpoints'} (lower --lr, set "
                                    "--grad-clip, or pass --skip-nonfinite)")
                now = time.perf_counter()
                elapsed = now - window_start
                counted = max(1, window_steps - 0)
                loss_v, mse_v, vb_v, gn_v = (sums / counted).tolist()
                row = [done, f"{loss_v:.6g}", f"{mse_v:.6g}", f"{vb_v:.6g}", f"{lr:.6g}", f"{gn_v:.6g}",
                       f"{window_steps / elapsed:.4g}", f"{window_steps * tc.batch_size / elapsed:.4g}",
                       skipped_total, f"{now - run_start:.1f}"]
                if d.is_main:
                    with open(metrics_path, "a", newline="") as f:
                        csv.writer(f).writerow(row)
                bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2g}", refresh=False)
                sums.zero_()
                window_steps, window_start = 0, time.perf_counter()

            bar.update(1)
            if done % tc.ckpt_every == 0 or done == tc.num_steps or stop_now:
                checkpoint(done)
            if stop_now:
                log(f"stopped by signal at step {done}; checkpoint written; continue with --resume {run_dir}")
                break
    bar.close()
    log(f"finished at step {step + 1 if tc.num_steps > start_step else start_step}; run folder {run_dir}")
    dist_utils.barrier(d)
    return run_dir


# ------------------------------------------------------------------------------------------------
# Command line (`mapdit train` and the seed's `python train.py`)
# ------------------------------------------------------------------------------------------------
def add_train_args(p: argparse.ArgumentParser) -> None:
    from .cli import add_model_args

    add_model_args(p, data_defaults=False)
    g = p.add_argument_group("training")
    g.add_argument("--data-path", default=None,
                   help="(default fashion-mnist) 'fashion-mnist', a folder of IDX files, a folder of class subfolders, or prepared latents")
    g.add_argument("--results-dir", default="results")
    g.add_argument("--num-steps", type=int, default=400_000)
    g.add_argument("--global-batch-size", "--batch-size", dest="batch_size", type=int, default=256)
    g.add_argument("--lr", type=float, default=None, help="default 1e-4 (Config A) or 1e-2 with weight normalisation")
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--decay-start", type=int, default=None)
    g.add_argument("--grad-clip", type=float, default=None)
    g.add_argument("--global-seed", "--seed", dest="seed", type=int, default=0)
    g.add_argument("--ema-stds", type=float, nargs="+", default=[0.05, 0.10])
    g.add_argument("--ema-snapshots", type=int, default=100, help="snapshots per EMA width over the run (0: none)")
    g.add_argument("--snapshot-dtype", choices=("float32", "bfloat16", "float16"), default=DEFAULT_SNAPSHOT_DTYPE)
    g.add_argument("--ckpt-every", type=int, default=None)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    g.add_argument("--compile", action="store_true")
    g.add_argument("--device", default=None)
    g.add_argument("--skip-nonfinite", action="store_true")
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--hflip", action="store_true")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a run: its folder, or nothing for the newest run in --results-dir")


def run_from_args(args: argparse.Namespace) -> Path:
    from .cli import config_from_args

    tc = TrainConfig(data_path=args.data_path, results_dir=args.results_dir, num_steps=args.num_steps,
                     batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                     decay_start=args.decay_start, grad_clip=args.grad_clip, seed=args.seed,
                     ema_stds=tuple(args.ema_stds), ema_snapshots=args.ema_snapshots,
                     snapshot_dtype=args.snapshot_dtype, ckpt_every=args.ckpt_every, log_every=args.log_every,
                     precision=args.precision, compile=args.compile, device=args.device,
                     skip_nonfinite=args.skip_nonfinite, image_size=args.image_size, hflip=args.hflip)
    # sizes follow the data; placeholders until the data is loaded
    model_cfg = None if args.resume else config_from_args(args, input_size=_patch_multiple(args.model),
                                                          in_channels=1, num_classes=1)
    return train(tc, model_cfg, resume=args.resume)


def _patch_multiple(model_name: str) -> int:
    from .config import parse_model_name

    return parse_model_name(model_name)[1]


def register(sub) -> None:
    p = sub.add_parser("train", help="train a MaP-DiT (also under torchrun)")
    add_train_args(p)
    p.set_defaults(func=run_from_args)


def main(argv: list[str] | None = None) -> int:
    """The seed paper's `python train.py ...` entry point: the same options as `mapdit train`."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])
