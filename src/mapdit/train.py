"""The training loop, `train`, driven by plain-data configs (mapdit.config.TrainConfig, ModelConfig).

Read it top-down as one loop: schedule (the learning rate of the step) -> step (`train_step`: weight
projection, the diffusion loss, backward, gradient norm, Adam, power EMA) -> report (metrics.csv, and the
magnitudes and FD asked for; steps/s counts training only) -> snapshot/checkpoint (`RunWriter`; sample grids,
metrics.png and TensorBoard beside it, `SideOutputs`) -> stop (the last step, or a signal). At start-up it says
what a checkpoint costs on disk, and after the first timed steps, on a CPU, whether the run would outlast
LONG_CPU_RUN_S.
Everything else lives beside it: mapdit.setup (settings, device, data, model, optimizer, EMA), mapdit.step
(the batch of a step, the step, the report window), mapdit.run_writer (the run folder: checkpoints, EMA
snapshots, metrics, the fall-back to an older checkpoint, non-finite values, a full disk), mapdit.resume
(what a resumed run may change) and mapdit.stopping (signals).

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
  - a full disk: one-line error (exit code 2), the previous checkpoint intact;
  - its surroundings: a log line, metrics.png, TensorBoard or a sample grid that cannot be written, or a
    statistics cache, is said once and training goes on.
"""
from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed as dist_utils
from .config import ModelConfig, TrainConfig
from .data import IndexStream
from .diffusion import make_diffusion
from .evaluate.fid import metric_name
from .evaluate.magnitudes import residual_magnitudes
from .evaluate.scoring import default_features, quick_fid
from .log import Logger
from .model import parameter_breakdown
from .run_writer import RunWriter, SideOutputs, checkpoint_steps, disk_line
from .runio import create_run_dir, run_lock
from .setup import NewRun, forward_of, init_device, load_data, losses_of, model_optimizer_ema, run_record, settings
from .step import Batch, BatchSource, ReportWindow, train_step
from .stopping import StopRequest
from .weights import model_with_weights

LONG_CPU_RUN_S = 3 * 3600  # a CPU run estimated longer than this is told the CPU recipe
TIMED_STEPS = 2  # steps timed (after the first, which warms up) for that estimate


def lr_multiplier(step: int, warmup: int, decay_start: int) -> float:
    """Linear warm-up, flat, then inverse-square-root decay from `decay_start` (EDM2's rule:
    alpha_ref / sqrt(max(t / t_ref, 1)))."""
    if step + 1 < warmup:
        return (step + 1) / warmup
    if step >= decay_start:
        return 1.0 / math.sqrt(step / decay_start)
    return 1.0


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:,.0f} hours" if seconds >= 2 * 3600 else f"{seconds / 60:.0f} minutes"


def long_run_line(seconds_per_step: float, steps_left: int, device) -> str | None:
    """One line for a CPU run that would outlast LONG_CPU_RUN_S, naming the recipe made for a CPU."""
    left = seconds_per_step * steps_left
    if device.type != "cpu" or left <= LONG_CPU_RUN_S:
        return None
    return (f"this run would take about {_duration(left)} more on this CPU ({steps_left:,} steps at "
            f"{seconds_per_step:.3g} s each): on a CPU train with the recipe made for it, `mapdit train --recipe "
            "fmnist-cpu` (Fashion-MNIST in about 15 minutes)")


class Scores:
    """The residual magnitudes (cheap, this batch) and the FD of the EMA weights, on the steps asked for: the
    values of metrics.csv's last two columns ("" otherwise). A statistics cache that cannot be written is
    said once and scoring goes on without it (mapdit.evaluate.fid.reference_stats)."""

    def __init__(self, tc: TrainConfig, data_meta: dict, writer: RunWriter):
        self.tc, self.data_meta, self.writer = tc, data_meta, writer
        self.fd_name = metric_name(default_features(data_meta))  # "fd_fmnist" on Fashion-MNIST, else "fid"
        self.fd_label = "FID" if self.fd_name == "fid" else "FD_" + self.fd_name.removeprefix("fd_")

    def __call__(self, step: int, model, ema, batch: Batch) -> tuple[str, str]:
        tc, max_mag, fd = self.tc, "", ""
        if tc.magnitude_every and step % tc.magnitude_every == 0:
            mags = residual_magnitudes(model, batch.x[:16], batch.t[:16], batch.y[:16])
            max_mag = f"{max(mags):.4g}"
            self.writer.magnitudes_row(step, mags)
        if tc.fid_every and step % tc.fid_every == 0:  # all ranks: sampling is sharded
            weights = model_with_weights(model, ema.averaged(min(tc.ema_stds)))
            # its warnings (an unwritable statistics cache) into log.txt too, the run's record
            fd = f"{quick_fid(weights, self.data_meta, tc.fid_samples, log=self.writer.log.warn):.5g}"
            self.writer.log(f"step {step}: {self.fd_label} of the EMA (sigma_rel {min(tc.ema_stds)}) on "
                            f"{tc.fid_samples} samples: {fd}")
        return max_mag, fd


def train(tc: TrainConfig, model_cfg: ModelConfig | None, resume: str | None = None, progress: bool = True,
          resume_hint: bool = True) -> Path:
    """Train; returns the run folder. `resume`: a run folder to continue ("latest": newest in results_dir).

    On resume the run's own model and training settings are used, except those `resume_config` takes
    from `tc`. `progress`: the step bar on stderr (off where several runs share a terminal; log.txt is
    written either way). SIGTERM/SIGINT during set-up: nothing is kept (a new run folder is removed) and
    `Stopped` is raised. `resume_hint`: a run stopped by a signal says "continue with --resume RUN" (off where
    the caller says how to continue: ablate and study rerun their own command).
    """
    new_run = NewRun()
    with StopRequest() as stop:
        try:
            return _train(tc, model_cfg, resume, stop, new_run, progress, resume_hint)
        except BaseException:
            if new_run.path is not None and not new_run.started:
                shutil.rmtree(new_run.path, ignore_errors=True)
            raise


def _train(tc: TrainConfig, model_cfg: ModelConfig | None, resume: str | None, stop: StopRequest,
           new_run: NewRun, progress: bool, resume_hint: bool = True) -> Path:
    # ---- settings, process group, data, run folder --------------------------------------------------
    s = settings(tc, model_cfg, resume)
    tc, run_dir = s.tc, s.run_dir
    d = init_device(tc)
    device = d.device
    stop.stop_if_asked(run_dir, resume, d.enabled)  # a signal while mapdit started: before loading the data
    data, model_cfg, fingerprint = load_data(s)
    stream = IndexStream(len(data), tc.batch_size // d.world_size, tc.seed, d.rank, d.world_size)  # too small: stop
    stop.stop_if_asked(run_dir, resume, d.enabled)
    if run_dir is None and d.is_main:
        run_dir = new_run.path = create_run_dir(tc.results_dir, model_cfg.model)
    run_dir = Path(dist_utils.broadcast_object(d, str(run_dir) if run_dir else None))

    log = Logger(run_dir / "log.txt", is_main=d.is_main)
    writer = RunWriter(run_dir, d, log, tc.snapshot_dtype, tc.keep_last, tc.ckpt_steps)
    with contextlib.ExitStack() as stack:
        stack.enter_context(writer.guard())
        if d.is_main:
            stack.enter_context(run_lock(run_dir))  # a second process resuming this run fails at once

        # ---- model, optimizer, EMA (a resumed run: from its newest intact checkpoint) ---------------
        model, params, opt, ema = model_optimizer_ema(model_cfg, tc, device)
        start_step, skipped = writer.restore(model, ema, opt, tc.num_steps) if resume is not None else (0, 0)
        scores = Scores(tc, data.meta(), writer)
        writer.start(start_step, run_record(s, model_cfg, data, fingerprint, start_step, d.world_size,
                                            scores.fd_name))

        fwd = forward_of(model, d, tc.compile)
        diffusion = make_diffusion(model_cfg.num_train_steps, learn_sigma=model_cfg.learn_sigma)
        losses = losses_of(diffusion, fwd, d, tc.compile)
        batches = BatchSource(data, stream, tc, d, diffusion.num_timesteps, model_cfg.null_class,
                              model_cfg.class_dropout_prob)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
        snap_every = max(1, tc.num_steps // tc.ema_snapshots) if tc.ema_snapshots else 0
        ckpt_steps = set(checkpoint_steps(tc))  # every ckpt_every, the last, and a study's chosen steps

        bar = log.bar = tqdm(total=tc.num_steps, initial=start_step, disable=not (d.is_main and progress),
                             dynamic_ncols=True, mininterval=1.0, unit="step")
        stack.callback(bar.close)  # also on an error, so that its one line starts on a line of its own
        side = SideOutputs(run_dir, d, log, tc.tensorboard, scores.fd_label)
        stack.callback(side.close)
        log(f"{'resuming' if start_step else 'starting'} {run_dir} at step {start_step}/{tc.num_steps}: "
            f"{model_cfg.model} preset={model_cfg.preset or '-'} modulation={model_cfg.modulation} "
            f"params={parameter_breakdown(model)['total']:,} data={data.kind} {len(data)} images "
            f"{batches.shape} lr={tc.lr:g} batch={tc.batch_size} ranks={d.world_size} device={device}")
        log(disk_line(tc, model, ema, params, snap_every))
        skipped_files = getattr(data, "skipped", None)
        if skipped_files:
            path0, why0 = skipped_files[0]
            log.warn(f"skipped {len(skipped_files)} unreadable image file(s) in {tc.data_path} "
                     f"(first: {path0}: {why0})")

        window = ReportWindow(device)
        run_start = time.perf_counter()
        timed: list[float] = []  # seconds of the first steps after the first, for the run's estimate
        model.train()
        stop.stop_if_asked(run_dir, resume, d.enabled)  # a signal during set-up: the folder is removed
        new_run.started = True
        for step in range(start_step, tc.num_steps):
            done = step + 1

            # ---- schedule
            lr = tc.lr * lr_multiplier(step, tc.warmup_steps, tc.decay_start)
            for group in opt.param_groups:
                group["lr"] = lr

            # ---- step
            began = time.perf_counter()
            batch = batches(step)
            result = train_step(model, fwd, losses, opt, ema, params, batch, done, grad_clip=tc.grad_clip,
                                autocast=autocast, skip_nonfinite=tc.skip_nonfinite, d=d,
                                min_snr_gamma=tc.min_snr_gamma)
            if not result.applied:
                skipped += 1
                log(f"step {done}: non-finite loss or gradient, step skipped ({skipped} so far)")
            elif not tc.skip_nonfinite:  # noted now, acted on (one sync) before anything is written
                writer.note_finite(result.finite, done)
            window.add(result)
            if 0 < step - start_step <= TIMED_STEPS:
                timed.append(time.perf_counter() - began)
                if len(timed) == TIMED_STEPS and (line := long_run_line(min(timed), tc.num_steps - done, device)):
                    log.warn(line)

            # ---- report (the ranks agree to stop at report steps only)
            stop_now = stop.signal is not None and not d.enabled
            report = done % tc.log_every == 0 or done == tc.num_steps or stop_now
            if report and d.enabled:
                flag = torch.tensor(float(stop.signal is not None), device=device)
                stop_now = dist_utils.all_reduce_max_(d, flag).item() > 0
            snap_now = bool(snap_every) and (done % snap_every == 0 or done == tc.num_steps)
            ckpt_now = done in ckpt_steps or stop_now
            if report or snap_now or ckpt_now:
                writer.check_finite()  # never a non-finite metric row, snapshot or checkpoint
            if snap_now:
                writer.snapshot(done, ema, tc.ema_stds)
            if report:
                loss_v, mse_v, vb_v, gn_v = window.means(d)
                seconds = window.seconds()  # training only: scoring, grids and plots are timed aside
                with window.aside(bar):
                    max_mag, fd = scores(done, model, ema, batch)
                steps_per_s = window.steps / seconds
                writer.metrics_row(dict(
                    step=done, loss=f"{loss_v:.6g}", mse=f"{mse_v:.6g}", vb=f"{vb_v:.6g}", lr=f"{lr:.6g}",
                    grad_norm=f"{gn_v:.6g}", steps_per_s=f"{steps_per_s:.4g}",
                    images_per_s=f"{steps_per_s * tc.batch_size:.4g}", skipped=skipped,
                    elapsed_s=f"{time.perf_counter() - run_start:.1f}", max_block_magnitude=max_mag, fd=fd))
                side.scalars(done, {"loss": loss_v, "mse": mse_v, "lr": lr, "grad_norm": gn_v,
                                    "steps_per_s": steps_per_s, **({scores.fd_label: float(fd)} if fd else {})})
                bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2g}", refresh=False)
                window.reset()

            # ---- snapshot (a sample grid) / checkpoint
            if tc.sample_every and done % tc.sample_every == 0:
                with window.aside(bar):
                    side.grid(done, model, ema, min(tc.ema_stds), data.meta())
            bar.update(1)
            if ckpt_now:
                writer.checkpoint(done, model, ema, opt, skipped)
                with window.aside(bar):
                    side.plot()

            # ---- stop
            if stop_now:
                log(f"stopped by signal at step {done}; checkpoint written"
                    + (f"; continue with --resume {run_dir}" if resume_hint else ""))
                break
        else:
            bar.close()
            log(f"finished at step {max(tc.num_steps, start_step)}; run folder {run_dir}")
    dist_utils.barrier(d)
    return run_dir
