"""The training loop, `train`, driven by plain-data configs (mapdit.config.TrainConfig, ModelConfig).

Read it top-down as one loop: schedule (the learning rate of the step) -> step (`train_step`: weight
projection, the diffusion loss, backward, gradient norm, Adam, power EMA) -> report (metrics.csv, and the
magnitudes and FID asked for) -> snapshot/checkpoint (`RunWriter`) -> stop (the last step, or a signal).
Everything else lives beside it: `BatchSource` draws a step's batch, `RunWriter` writes the run folder and
reads it back (checkpoints, EMA snapshots, metrics, the fall-back to an older checkpoint, non-finite values,
a full disk), and the resume policy (mapdit.resume: `RESUME_MAY_CHANGE`, `RESUME_MUST_MATCH`, `resume_settings`,
`resume_config`) says what a resumed run may change.

Every random draw of step s (timesteps, noise, label dropout, flips) comes from a generator seeded by
(seed, s) over the *global* batch, and the data order is a pure function of (seed, s): so a resumed run
continues exactly, and N ranks under torchrun see exactly the samples one process would.

Reliability (what a run survives):
  - kill -9 at any moment: every checkpoint, snapshot and config is written atomically; `--resume` continues
    from the newest complete checkpoint and cuts metrics.csv and the EMA snapshots back to its step;
  - SIGTERM/SIGINT: the current step finishes, a checkpoint is written, the process exits with code 0
    (under torchrun the ranks agree at the next report step, every --log-every steps); a second signal
    stops at once (exit code 130);
  - a truncated or corrupt newest checkpoint: reported in one line, resume falls back to the previous one;
  - NaN/Inf loss or gradient: training stops with a one-line error naming the step and the last good
    checkpoint (exit code 2), or with --skip-nonfinite the step is skipped and counted in metrics.csv;
    no checkpoint or EMA snapshot is ever written with non-finite values;
  - a full disk: one-line error (exit code 2), the previous checkpoint intact.
Test hook (not a user option): MAPDIT_TEST_FAIL_RANK=r [MAPDIT_TEST_FAIL_STEP=s, default 1] makes rank r
raise a UserError at the start of step s, to test that a failing rank ends a torchrun job.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from . import __version__, signals
from . import distributed as dist_utils
from .config import ModelConfig, TrainConfig
from .data import IndexStream, load_dataset
from .diffusion import make_diffusion
from .distributed import Dist
from .ema import PowerEMA, save_snapshot
from .errors import Diverged, Stopped, UserError
from .evaluate.magnitudes import residual_magnitudes
from .evaluate.scoring import quick_fid
from .log import Logger
from .model import DiT, parameter_breakdown
from .resume import resolve_run_dir, resume_config, stored_train_config
from .runio import (
    DiskFullError,
    NotWritableError,
    create_run_dir,
    environment_error,
    find_resumable_checkpoint,
    load_run_config,
    load_tensors,
    rewind_run,
    run_lock,
    save_checkpoint,
    split_prefix,
    trim_metrics,
    write_json,
)
from .sample import sample_grid_from_model
from .weights import checkpoint_mismatch, load_prefixed, model_with_weights

METRIC_FIELDS = ["step", "loss", "mse", "vb", "lr", "grad_norm", "steps_per_s", "images_per_s", "skipped",
                 "elapsed_s", "max_block_magnitude", "fid"]
_NO_BAD = 2 ** 62  # "no non-finite step seen" in the first-bad-step tracker


# ------------------------------------------------------------------------------------------------
# The schedule and the step
# ------------------------------------------------------------------------------------------------
def lr_multiplier(step: int, warmup: int, decay_start: int) -> float:
    """Linear warm-up, flat, then inverse-square-root decay from `decay_start` (EDM2's rule:
    alpha_ref / sqrt(max(t / t_ref, 1)))."""
    if step + 1 < warmup:
        return (step + 1) / warmup
    if step >= decay_start:
        return 1.0 / math.sqrt(step / decay_start)
    return 1.0


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


@dataclass
class Batch:
    """One step's training batch on this rank: images x, labels y (dropped ones set to the null class),
    timesteps t and the noise."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor


class BatchSource:
    """`source(step)`: the batch of `step` for this rank. t, noise and label dropout are drawn for the global
    batch from step_generator(seed, step) and this rank takes its slice; the images come in the order of
    `IndexStream` (a pure function of seed and step), so ranks and resumed runs see what one process would.
    `batch_hook(step, x) -> x` lets tests poison a batch; it is not a user option."""

    def __init__(self, data, stream: IndexStream, tc: TrainConfig, d: Dist, num_timesteps: int,
                 null_class: int | None, batch_hook=None):
        self.data, self.stream, self.tc, self.device = data, stream, tc, d.device
        self.num_timesteps, self.null_class, self.batch_hook = num_timesteps, null_class, batch_hook
        per_rank = tc.batch_size // d.world_size
        self.lo, self.hi = d.rank * per_rank, (d.rank + 1) * per_rank
        self.shape = (data.channels, data.resolution, data.resolution)

    def __call__(self, step: int) -> Batch:
        tc, device, lo, hi = self.tc, self.device, self.lo, self.hi
        g = step_generator(tc.seed, step, device)
        t = torch.randint(0, self.num_timesteps, (tc.batch_size,), generator=g, device=device)[lo:hi]
        noise = torch.randn((tc.batch_size, *self.shape), generator=g, device=device)[lo:hi]
        drop = (torch.rand(tc.batch_size, generator=g, device=device) < tc.label_dropout)[lo:hi]
        x, y = self.data.batch(self.stream.indices(step), torch.Generator().manual_seed(tc.seed * 7919 + step))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if self.null_class is not None:
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        if self.batch_hook is not None:
            x = self.batch_hook(step, x)
        return Batch(x, y, t, noise)


def grad_norm_(params: list[torch.Tensor], clip: float | None) -> torch.Tensor:
    """The gradients' total 2-norm (logged), clipping them to `clip` when given. Without clipping only the
    norm is computed: clip_grad_norm_(inf) would also multiply every gradient by 1.0."""
    if clip or not hasattr(torch.nn.utils, "get_total_norm"):  # get_total_norm: torch >= 2.6
        return torch.nn.utils.clip_grad_norm_(params, clip or float("inf"), foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)


@dataclass
class StepResult:
    """What a step reports: `stats` = (loss, mse, vb, grad_norm) on the device (nothing synchronised);
    `finite` whether loss and gradient norm are finite (a tensor, or a bool once the ranks agreed on it
    with skip_nonfinite); `applied` whether the update was applied (False only for a skipped step)."""

    stats: torch.Tensor
    finite: torch.Tensor | bool
    applied: bool


def _no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


def train_step(model: DiT, fwd, diffusion, opt: torch.optim.Optimizer, ema: PowerEMA,
               params: list[torch.Tensor], batch: Batch, step: int, *, grad_clip: float | None = None,
               autocast: ContextManager | None = None, skip_nonfinite: bool = False, d: Dist | None = None,
               min_snr_gamma: float | None = None,
               phase: Callable[[str], ContextManager] = _no_phase) -> StepResult:
    """One optimisation step, the one the training loop runs (and benchmarks/bench.py times):

        project the weights (forced weight normalisation) -> diffusion loss of `fwd` (the model, or its
        DDP / compiled wrapper) on the batch, min-SNR-weighted if `min_snr_gamma` -> backward -> gradient
        norm (clipped to `grad_clip`) -> Adam -> the power EMA at `step` (the number of steps done, this one included).

    skip_nonfinite: the ranks agree (one synchronisation) whether loss and gradient are finite, and a
    non-finite step is skipped (no update, gradients cleared). `phase(name)` wraps the three phases
    ("weight_projection", "forward_backward", "optimizer_ema"), e.g. to time them."""
    with phase("weight_projection"):
        model.project_weights_()  # forced weight normalisation: one batched pass per step
    with phase("forward_backward"):
        with autocast or contextlib.nullcontext():
            losses = diffusion.training_losses(fwd, batch.x, batch.t, batch.y, noise=batch.noise,
                                               min_snr_gamma=min_snr_gamma)
        loss = losses["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
    with phase("optimizer_ema"):
        grad_norm = grad_norm_(params, grad_clip)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        applied = True
        if skip_nonfinite:  # one synchronisation per step; only with --skip-nonfinite
            finite = bool(dist_utils.all_reduce_min_(d or Dist(), finite.to(torch.int32)).item())  # skip together
            applied = finite
        if applied:
            opt.step()
            ema.update(params, step)
        else:
            opt.zero_grad(set_to_none=True)
        stats = torch.stack((loss.detach(), losses["mse"].mean().detach(), losses["vb"].mean().detach(),
                             grad_norm.detach()))
    return StepResult(stats, finite, applied)


class ReportWindow:
    """The steps since the last report: (loss, mse, vb, grad_norm) summed on the device (no per-step
    synchronisation), steps run and skipped, and the wall time."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(4, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.steps, self.skipped, self.start = 0, 0, time.perf_counter()

    def add(self, result: StepResult) -> None:
        self.steps += 1
        if result.applied:
            self.sums += result.stats
        else:
            self.skipped += 1

    def means(self, d: Dist) -> list[float]:
        """The window's mean loss, mse, vb and gradient norm over its applied steps and over the ranks."""
        dist_utils.all_reduce_mean_(d, self.sums)
        return (self.sums / max(1, self.steps - self.skipped)).tolist()


# ------------------------------------------------------------------------------------------------
# The run folder: checkpoints, snapshots, metrics; fall-back; non-finite values; a full disk
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


def load_checkpoint_into(path: Path, model: DiT, ema: PowerEMA, opt: torch.optim.Optimizer,
                         device: torch.device) -> dict:
    """Load a verified checkpoint (tensors from safetensors, the rest from its JSON sidecar)."""
    tensors = load_tensors(path, device=str(device))
    meta = json.loads(path.with_suffix(".json").read_text())
    with checkpoint_mismatch(path, "the run's model", ": was it copied from another run?"):
        load_prefixed(model, tensors, "model.")
        load_prefixed(ema, tensors, "ema.")
        load_optimizer(opt, tensors, meta)
    return meta


def _all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


class RunWriter:
    """What training writes into its run folder, and reads back from it, with every failure around that:

      - `restore`: the newest intact checkpoint (a damaged newer one is reported and set aside: the
        fall-back), and the metrics rows and EMA snapshots after it removed;
      - `checkpoint`, `snapshot`: never with a non-finite value; `note_finite` tracks the first non-finite
        step on the device, `check_finite` (one synchronisation) stops training there with one line;
      - `metrics_row`, `magnitudes_row`: metrics.csv and residual_magnitudes.csv;
      - `guard()`: a full disk or an unwritable place anywhere in the run ends training with one line naming
        the file and the last good checkpoint.
    Files are written on rank 0 only; `last_ckpt` (the newest checkpoint written or resumed from) is kept on
    every rank."""

    def __init__(self, run_dir: Path, d: Dist, log: Logger, snapshot_dtype: str):
        self.run_dir, self.d, self.log = run_dir, d, log
        self.snapshot_dtype = getattr(torch, snapshot_dtype)
        self.metrics_path = run_dir / "metrics.csv"
        self.last_ckpt: int | None = None
        self.first_bad = torch.full((), _NO_BAD, dtype=torch.long, device=d.device)  # first step with NaN/Inf

    def where_good(self) -> str:
        if self.last_ckpt is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is step {self.last_ckpt} in {self.run_dir / 'checkpoints'}"

    @contextlib.contextmanager
    def guard(self):
        """A full disk or an unwritable place anywhere in the run (checkpoint, snapshot, metrics or log line,
        sample grid) ends training with one line naming the file and the last good checkpoint."""
        try:
            yield
        except (DiskFullError, NotWritableError, OSError, SafetensorError) as err:
            user = err if isinstance(err, (DiskFullError, NotWritableError)) else environment_error(err)
            if user is None:
                raise
            if isinstance(user, DiskFullError):
                raise UserError(f"disk full while writing {user.path}; {self.where_good()}: free space and "
                                "resume") from None
            raise UserError(f"cannot write {user.path} ({user.reason}); {self.where_good()}") from None

    # ---- reading back ---------------------------------------------------------------------------
    def restore(self, model: DiT, ema: PowerEMA, opt: torch.optim.Optimizer, num_steps: int) -> tuple[int, int]:
        """Load the newest intact checkpoint (rank 0 finds it, every rank loads it); cut metrics.csv and the
        EMA snapshots back to its step. Returns (its step, the steps skipped so far); (0, 0) without one."""
        d, run_dir = self.d, self.run_dir
        start_step, skipped = 0, 0
        found = find_resumable_checkpoint(run_dir, log=self.log.warn) if d.is_main else None
        found = dist_utils.broadcast_object(d, None if found is None else (found[0], str(found[1])))
        if found is None:
            self.log(f"no complete checkpoint in {run_dir / 'checkpoints'}: starting again from step 0")
        else:
            start_step, path = found[0], Path(found[1])
            meta = load_checkpoint_into(path, model, ema, opt, d.device)
            self.last_ckpt, skipped = start_step, int(meta.get("skipped", 0))
        if num_steps < start_step:
            raise UserError(f"--num-steps {num_steps} is below step {start_step}, which the run has "
                            "reached: pass a larger --num-steps (or leave it out to keep the run's own)")
        if d.is_main:
            for note in rewind_run(run_dir, start_step):
                self.log.warn(note)
        return start_step, skipped

    def start(self, start_step: int, config: dict) -> None:
        """metrics.csv keeps the rows up to `start_step` (a fresh run: just the header; rows after the
        checkpoint are logged again); config.json records the run's settings."""
        if self.d.is_main:
            trim_metrics(self.metrics_path, METRIC_FIELDS, start_step)
            write_json(self.run_dir / "config.json", config)

    # ---- non-finite values ----------------------------------------------------------------------
    def note_finite(self, finite: torch.Tensor, step: int) -> None:
        """Remember the first step whose loss or gradient was not finite (on the device: no synchronisation)."""
        self.first_bad = torch.where(finite | (self.first_bad != _NO_BAD), self.first_bad,
                                     torch.full_like(self.first_bad, step))

    def check_finite(self) -> None:
        """Every rank, before anything is written: stop at the first non-finite loss or gradient."""
        bad = int(dist_utils.all_reduce_min_(self.d, self.first_bad.clone()).item())
        if bad != _NO_BAD:
            raise Diverged(f"non-finite loss or gradient at step {bad}: training stopped; {self.where_good()} "
                           f"(continue from it with --resume {self.run_dir} and a lower --lr, a --grad-clip or "
                           "--skip-nonfinite)", step=bad)

    # ---- writing --------------------------------------------------------------------------------
    def checkpoint(self, step: int, model: DiT, ema: PowerEMA, opt: torch.optim.Optimizer, skipped: int) -> None:
        """Model, EMA and optimizer (tensors) plus a JSON sidecar; refused if any value is not finite."""
        if self.d.is_main:
            opt_t, opt_meta = optimizer_tensors(opt)
            tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                       **{f"ema.{k}": v for k, v in ema.state_dict().items()}, **opt_t}
            if not _all_finite(tensors.values()):
                raise Diverged(f"non-finite weights at step {step}: refusing to write a checkpoint; "
                               f"{self.where_good()}", step=step)
            path = save_checkpoint(self.run_dir, step, tensors, {**opt_meta, "train_step": step, "skipped": skipped})
            self.log(f"checkpoint {path}")
        self.last_ckpt = step

    def snapshot(self, step: int, ema: PowerEMA, sigma_rels) -> None:
        """One EMA snapshot per tracked width (for post-hoc EMA); refused if any value is not finite."""
        if not self.d.is_main:
            return
        for sigma in sigma_rels:
            averaged = ema.averaged(sigma)
            if not _all_finite(averaged.values()):
                raise UserError(f"non-finite EMA weights (sigma_rel {sigma:.3f}) at step {step}: refusing to "
                                f"write the snapshot; {self.where_good()}")
            try:
                save_snapshot(self.run_dir / "ema", sigma, step, averaged, dtype=self.snapshot_dtype)
            except ValueError as err:  # float16 overflow
                raise UserError(f"EMA snapshot at step {step}: {err} (--snapshot-dtype float32)") from None

    def metrics_row(self, row: list) -> None:
        if self.d.is_main:
            with open(self.metrics_path, "a", newline="") as f:
                csv.writer(f).writerow(row)

    def magnitudes_row(self, step: int, mags: list[float]) -> None:
        if self.d.is_main:
            with open(self.run_dir / "residual_magnitudes.csv", "a", newline="") as f:
                csv.writer(f).writerow([step, *(f"{m:.5g}" for m in mags)])


# ------------------------------------------------------------------------------------------------
# Stopping: a signal, or a failure before step 1
# ------------------------------------------------------------------------------------------------
class StopRequest:
    """SIGTERM/SIGINT ask the loop to finish the current step, checkpoint and exit. Entered at the start of
    `train`, it also takes over a signal `mapdit` held while starting (mapdit.signals): set-up then stops
    before anything is written."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        self.signal = signals.take_pending()
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


class _SetUp:
    """What `train` made before its first step: a new run folder is removed again if set-up fails or is
    stopped, so a run that never reached step 1 leaves nothing behind (and the next run takes its number)."""

    def __init__(self):
        self.new_run_dir: Path | None = None
        self.done = False


def _stop_if_asked(stop: StopRequest, run_dir: Path | None, resume: str | None, distributed: bool) -> None:
    """Before step 1 a signal stops at once (exit code 0, nothing kept). Under torchrun the ranks agree on
    stopping at report steps instead, so that no rank waits for one that left."""
    if stop.signal is None or distributed:
        return
    what = f"resume {run_dir} again to continue" if resume is not None else "no run folder is kept"
    raise Stopped(f"stopped by signal {signal.Signals(stop.signal).name} during set-up, before step 1: {what}")


# ------------------------------------------------------------------------------------------------
# Set-up: settings, data, the run folder (files are only read until the settings check out)
# ------------------------------------------------------------------------------------------------
def _check_labels(data, data_path: str) -> None:
    labels = getattr(data, "labels", None)
    if labels is None or not len(labels):
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= data.num_classes:
        first = int(torch.nonzero((labels < 0) | (labels >= data.num_classes))[0, 0])
        raise UserError(f"the data at {data_path} has class labels {lo}..{hi} but {data.num_classes} classes "
                        f"(first: label {int(labels[first])} at index {first}): every label must be in "
                        f"0..{data.num_classes - 1} (fix the labels or the class list)")


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def _settings(tc: TrainConfig, model_cfg: ModelConfig | None, resume: str | None):
    """(tc, model_cfg, the run folder or None, its saved config or None): on resume the run's own settings
    with what `resume_config` takes from `tc`; checked (one line per mistake) before anything is written."""
    run_dir: Path | None = None
    saved: dict | None = None
    if resume is not None:
        run_dir = resolve_run_dir(tc.results_dir, resume)
        saved = load_run_config(run_dir)
        model_cfg = ModelConfig.from_dict(saved["model"])
        tc = resume_config(stored_train_config(saved, run_dir), tc, run_dir)
    elif model_cfg is None:
        raise ValueError("train() needs a model config unless it resumes a run")
    tc = dataclasses.replace(tc, data_path=tc.data_path or "fashion-mnist")
    tc.check(dist_utils.world_size_from_env())
    return tc, model_cfg, run_dir, saved


def _load_data(tc: TrainConfig, model_cfg: ModelConfig, saved: dict | None):
    """(data, model_cfg with the data's sizes, tc resolved for the model)."""
    data = load_dataset(tc.data_path, patch_size=model_cfg.patch_size, image_size=tc.image_size, hflip=tc.hflip)
    _check_labels(data, tc.data_path)
    if data.num_classes > model_cfg.num_classes and saved is not None:
        raise UserError(f"the data has {data.num_classes} classes but the run was trained with "
                        f"{model_cfg.num_classes}: resume with the run's own data")
    model_cfg = dataclasses.replace(model_cfg, input_size=data.resolution, in_channels=data.channels,
                                    num_classes=data.num_classes).validate()
    if saved is not None and model_cfg.to_dict() != ModelConfig.from_dict(saved["model"]).to_dict():
        raise UserError(f"the data at {tc.data_path} ({data.channels}x{data.resolution}x{data.resolution}, "
                        f"{data.num_classes} classes) does not match the run's model "
                        f"({saved['model']['in_channels']}x{saved['model']['input_size']}, "
                        f"{saved['model']['num_classes']} classes)")
    return data, model_cfg, tc.resolved(model_cfg)


def _model_optimizer_ema(model_cfg: ModelConfig, tc: TrainConfig, device: torch.device):
    """(model, its trainable parameters, Adam over them, their power EMA); the model is seeded by tc.seed."""
    torch.manual_seed(tc.seed)
    model = DiT(model_cfg).to(device)
    named = model.trainable_parameters()
    params = [p for _, p in named]
    # fused Adam: one kernel over all parameters; on the CPU 3.5x faster than foreach (BENCHMARKS.md)
    fused = device.type in ("cuda", "cpu")
    opt = torch.optim.Adam(params, lr=tc.lr, betas=tc.adam_betas, eps=tc.adam_eps,
                           foreach=not fused, fused=fused or None)
    ema = PowerEMA(dict(named), sigma_rels=tc.ema_stds)
    return model, params, opt, ema


def _forward_of(model: DiT, d: Dist, compile: bool):
    """What the loss calls: the model, in DistributedDataParallel under torchrun, compiled with --compile."""
    fwd = model
    if d.enabled:
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda"
                                                        else None)
    if compile:
        fwd = torch.compile(fwd)
    return fwd


def _evaluate(step: int, tc: TrainConfig, model: DiT, ema: PowerEMA, batch: Batch, data_meta: dict,
              writer: RunWriter) -> tuple[str, str]:
    """Residual magnitudes (cheap, this batch) and FID of the EMA weights, only on the steps asked for; ""
    otherwise (the values of metrics.csv's last two columns)."""
    max_mag = fid = ""
    if tc.magnitude_every and step % tc.magnitude_every == 0:
        mags = residual_magnitudes(model, batch.x[:16], batch.t[:16], batch.y[:16])
        max_mag = f"{max(mags):.4g}"
        writer.magnitudes_row(step, mags)
    if tc.fid_every and step % tc.fid_every == 0:  # all ranks: sampling is sharded
        value = quick_fid(model_with_weights(model, ema.averaged(min(tc.ema_stds))), data_meta, tc.fid_samples)
        fid = f"{value:.5g}"
        writer.log(f"step {step}: FID of the EMA (sigma_rel {min(tc.ema_stds)}) on {tc.fid_samples} samples: {fid}")
    return max_mag, fid


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def train(tc: TrainConfig, model_cfg: ModelConfig | None, resume: str | None = None,
          batch_hook=None, progress: bool = True) -> Path:
    """Train; returns the run folder. `resume`: a run folder to continue ("latest": newest in results_dir).

    On resume the run's own model and training settings are used, except those `resume_config` takes
    from `tc`. `batch_hook(step, x) -> x` lets tests poison a batch; it is not a user option. `progress`:
    the step bar on stderr (off where several runs share a terminal; log.txt is written either way).
    SIGTERM/SIGINT during set-up: nothing is kept (a new run folder is removed) and `Stopped` is raised.
    """
    setup = _SetUp()
    with StopRequest() as stop:
        try:
            return _train(tc, model_cfg, resume, batch_hook, stop, setup, progress)
        except BaseException:
            if setup.new_run_dir is not None and not setup.done:
                shutil.rmtree(setup.new_run_dir, ignore_errors=True)
            raise


def _train(tc: TrainConfig, model_cfg: ModelConfig | None, resume: str | None, batch_hook, stop: StopRequest,
           setup: _SetUp, progress: bool = True) -> Path:
    # ---- settings, process group, data, run folder --------------------------------------------------
    tc, model_cfg, run_dir, saved = _settings(tc, model_cfg, resume)
    fail_rank, fail_step = _env_int("MAPDIT_TEST_FAIL_RANK"), _env_int("MAPDIT_TEST_FAIL_STEP", 1)
    d = dist_utils.init(tc.device)
    _stop_if_asked(stop, run_dir, resume, d.enabled)  # a signal while mapdit started: before loading the data
    device = d.device
    torch.set_flush_denormal(True)  # CPU: denormal floats (tiny Adam moments, zero-init layers) cost ~10x per op
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data, model_cfg, tc = _load_data(tc, model_cfg, saved)
    stream = IndexStream(len(data), tc.batch_size // d.world_size, tc.seed, d.rank, d.world_size)  # too small: stop
    _stop_if_asked(stop, run_dir, resume, d.enabled)
    if run_dir is None and d.is_main:
        run_dir = setup.new_run_dir = create_run_dir(tc.results_dir, model_cfg.model)
    run_dir = Path(dist_utils.broadcast_object(d, str(run_dir) if run_dir else None))

    writer = RunWriter(run_dir, d, Logger(run_dir / "log.txt", is_main=d.is_main), tc.snapshot_dtype)
    with contextlib.ExitStack() as stack:
        stack.enter_context(writer.guard())
        if d.is_main:
            stack.enter_context(run_lock(run_dir))  # a second process resuming this run fails at once

        # ---- model, optimizer, EMA (a resumed run: from its newest intact checkpoint) ---------------
        model, params, opt, ema = _model_optimizer_ema(model_cfg, tc, device)
        start_step, skipped = writer.restore(model, ema, opt, tc.num_steps) if resume is not None else (0, 0)
        writer.start(start_step, {
            "model": model_cfg.to_dict(), "train": dataclasses.asdict(tc), "data": data.meta(),
            "mapdit_version": __version__, "torch_version": torch.__version__, "world_size": d.world_size})

        fwd = _forward_of(model, d, tc.compile)
        diffusion = make_diffusion(model_cfg.num_train_steps, learn_sigma=model_cfg.learn_sigma)
        batches = BatchSource(data, stream, tc, d, diffusion.num_timesteps, model_cfg.null_class, batch_hook)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
        snap_every = max(1, tc.num_steps // tc.ema_snapshots) if tc.ema_snapshots else 0

        bar = tqdm(total=tc.num_steps, initial=start_step, disable=not (d.is_main and progress), dynamic_ncols=True,
                   mininterval=1.0, unit="step")
        stack.callback(bar.close)  # also on an error, so that its one line starts on a line of its own
        log = writer.log = Logger(run_dir / "log.txt", is_main=d.is_main, bar=bar)
        log(f"{'resuming' if start_step else 'starting'} {run_dir} at step {start_step}/{tc.num_steps}: "
            f"{model_cfg.model} preset={model_cfg.preset or '-'} modulation={model_cfg.modulation} "
            f"params={parameter_breakdown(model)['total']:,} data={data.kind} {len(data)} images "
            f"{batches.shape} lr={tc.lr:g} batch={tc.batch_size} ranks={d.world_size} device={device}")
        skipped_files = getattr(data, "skipped", None)
        if skipped_files:
            path0, why0 = skipped_files[0]
            log.warn(f"skipped {len(skipped_files)} unreadable image file(s) in {tc.data_path} "
                     f"(first: {path0}: {why0})")

        window = ReportWindow(device)
        run_start = time.perf_counter()
        model.train()
        _stop_if_asked(stop, run_dir, resume, d.enabled)  # a signal during set-up: the folder is removed
        setup.done = True
        for step in range(start_step, tc.num_steps):
            if fail_rank == d.rank and step == fail_step:
                raise UserError(f"rank {d.rank} failed at step {step} on purpose (test hook "
                                "MAPDIT_TEST_FAIL_RANK)")
            done = step + 1

            # ---- schedule
            lr = tc.lr * lr_multiplier(step, tc.warmup_steps, tc.decay_start)
            for group in opt.param_groups:
                group["lr"] = lr

            # ---- step
            batch = batches(step)
            result = train_step(model, fwd, diffusion, opt, ema, params, batch, done, grad_clip=tc.grad_clip,
                                autocast=autocast, skip_nonfinite=tc.skip_nonfinite, d=d,
                                min_snr_gamma=tc.min_snr_gamma)
            if not result.applied:
                skipped += 1
                log(f"step {done}: non-finite loss or gradient, step skipped ({skipped} so far)")
            elif not tc.skip_nonfinite:  # noted now, acted on (one sync) before anything is written
                writer.note_finite(result.finite, done)
            window.add(result)

            # ---- report (the ranks agree to stop at report steps only)
            stop_now = stop.signal is not None and not d.enabled
            report = done % tc.log_every == 0 or done == tc.num_steps or stop_now
            if report and d.enabled:
                flag = torch.tensor(float(stop.signal is not None), device=device)
                stop_now = dist_utils.all_reduce_max_(d, flag).item() > 0
            snap_now = bool(snap_every) and (done % snap_every == 0 or done == tc.num_steps)
            ckpt_now = done % tc.ckpt_every == 0 or done == tc.num_steps or stop_now
            if report or snap_now or ckpt_now:
                writer.check_finite()  # never a non-finite metric row, snapshot or checkpoint
            if snap_now:
                writer.snapshot(done, ema, tc.ema_stds)
            if report:
                loss_v, mse_v, vb_v, gn_v = window.means(d)
                now = time.perf_counter()
                elapsed = now - window.start
                max_mag, fid = _evaluate(done, tc, model, ema, batch, data.meta(), writer)
                writer.metrics_row([done, f"{loss_v:.6g}", f"{mse_v:.6g}", f"{vb_v:.6g}", f"{lr:.6g}", f"{gn_v:.6g}",
                                    f"{window.steps / elapsed:.4g}", f"{window.steps * tc.batch_size / elapsed:.4g}",
                                    skipped, f"{now - run_start:.1f}", max_mag, fid])
                bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2g}", refresh=False)
                window.reset()

            # ---- snapshot (a sample grid) / checkpoint
            if tc.sample_every and done % tc.sample_every == 0 and d.is_main:
                grid = sample_grid_from_model(model_with_weights(model, ema.averaged(min(tc.ema_stds))),
                                              data.meta(), run_dir / "samples" / f"train-{done:07d}.png")
                log(f"step {done}: sample grid {grid}")
            bar.update(1)
            if ckpt_now:
                writer.checkpoint(done, model, ema, opt, skipped)

            # ---- stop
            if stop_now:
                log(f"stopped by signal at step {done}; checkpoint written; continue with --resume {run_dir}")
                break
        else:
            bar.close()
            log(f"finished at step {max(tc.num_steps, start_step)}; run folder {run_dir}")
    dist_utils.barrier(d)
    return run_dir
