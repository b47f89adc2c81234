"""The training loop, `train`, driven by plain-data configs (mapdit.config.TrainConfig, ModelConfig).

Read it top-down as one loop: schedule (the learning rate of the step) -> step (`train_step`: weight
projection, the diffusion loss, backward, gradient norm, Adam, power EMA) -> report (metrics.csv, and the
magnitudes and FD asked for) -> snapshot/checkpoint (`RunWriter`) -> stop (the last step, or a signal).
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
  - a full disk: one-line error (exit code 2), the previous checkpoint intact.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from . import distributed as dist_utils
from .config import ModelConfig, TrainConfig
from .data import IndexStream
from .diffusion import make_diffusion
from .ema import PowerEMA
from .evaluate.magnitudes import residual_magnitudes
from .evaluate.scoring import quick_fid
from .log import Logger
from .model import DiT, parameter_breakdown
from .run_writer import METRIC_FIELDS, RunWriter
from .runio import create_run_dir, run_lock
from .sample import sample_grid_from_model
from .setup import NewRun, forward_of, init_device, load_data, model_optimizer_ema, settings
from .step import Batch, BatchSource, ReportWindow, train_step
from .stopping import StopRequest
from .weights import model_with_weights

# what other modules and benchmarks/bench.py import from here
__all__ = ["METRIC_FIELDS", "Batch", "TrainConfig", "lr_multiplier", "train", "train_step"]


def lr_multiplier(step: int, warmup: int, decay_start: int) -> float:
    """Linear warm-up, flat, then inverse-square-root decay from `decay_start` (EDM2's rule:
    alpha_ref / sqrt(max(t / t_ref, 1)))."""
    if step + 1 < warmup:
        return (step + 1) / warmup
    if step >= decay_start:
        return 1.0 / math.sqrt(step / decay_start)
    return 1.0


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


def train(tc: TrainConfig, model_cfg: ModelConfig | None, resume: str | None = None, progress: bool = True) -> Path:
    """Train; returns the run folder. `resume`: a run folder to continue ("latest": newest in results_dir).

    On resume the run's own model and training settings are used, except those `resume_config` takes
    from `tc`. `progress`: the step bar on stderr (off where several runs share a terminal; log.txt is
    written either way). SIGTERM/SIGINT during set-up: nothing is kept (a new run folder is removed) and
    `Stopped` is raised.
    """
    new_run = NewRun()
    with StopRequest() as stop:
        try:
            return _train(tc, model_cfg, resume, stop, new_run, progress)
        except BaseException:
            if new_run.path is not None and not new_run.started:
                shutil.rmtree(new_run.path, ignore_errors=True)
            raise


def _train(tc: TrainConfig, model_cfg: ModelConfig | None, resume: str | None, stop: StopRequest,
           new_run: NewRun, progress: bool) -> Path:
    # ---- settings, process group, data, run folder --------------------------------------------------
    s = settings(tc, model_cfg, resume)
    tc, run_dir = s.tc, s.run_dir
    d = init_device(tc)
    device = d.device
    stop.stop_if_asked(run_dir, resume, d.enabled)  # a signal while mapdit started: before loading the data
    data, model_cfg = load_data(s)
    stream = IndexStream(len(data), tc.batch_size // d.world_size, tc.seed, d.rank, d.world_size)  # too small: stop
    stop.stop_if_asked(run_dir, resume, d.enabled)
    if run_dir is None and d.is_main:
        run_dir = new_run.path = create_run_dir(tc.results_dir, model_cfg.model)
    run_dir = Path(dist_utils.broadcast_object(d, str(run_dir) if run_dir else None))

    writer = RunWriter(run_dir, d, Logger(run_dir / "log.txt", is_main=d.is_main), tc.snapshot_dtype)
    with contextlib.ExitStack() as stack:
        stack.enter_context(writer.guard())
        if d.is_main:
            stack.enter_context(run_lock(run_dir))  # a second process resuming this run fails at once

        # ---- model, optimizer, EMA (a resumed run: from its newest intact checkpoint) ---------------
        model, params, opt, ema = model_optimizer_ema(model_cfg, tc, device)
        start_step, skipped = writer.restore(model, ema, opt, tc.num_steps) if resume is not None else (0, 0)
        writer.start(start_step, {
            "model": model_cfg.to_dict(), "train": dataclasses.asdict(tc), "data": data.meta(),
            "mapdit_version": __version__, "torch_version": torch.__version__, "world_size": d.world_size})

        fwd = forward_of(model, d, tc.compile)
        diffusion = make_diffusion(model_cfg.num_train_steps, learn_sigma=model_cfg.learn_sigma)
        batches = BatchSource(data, stream, tc, d, diffusion.num_timesteps, model_cfg.null_class)
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
        stop.stop_if_asked(run_dir, resume, d.enabled)  # a signal during set-up: the folder is removed
        new_run.started = True
        for step in range(start_step, tc.num_steps):
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
            ckpt_now = done % tc.ckpt_every == 0 or done == tc.num_steps or stop_now or done in (tc.ckpt_steps or ())
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
