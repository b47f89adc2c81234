"""The training loop: one readable function, `train`, driven by plain-data configs.

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

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from . import __version__
from . import distributed as dist_utils
from . import signals
from .config import CHOICE_KEYS, MP_OPTIONS, ModelConfig, make_config
from .data import IndexStream, load_dataset
from .diffusion import make_diffusion
from .ema import DEFAULT_SNAPSHOT_DTYPE as _SNAP_DTYPE, PowerEMA, save_snapshot
from .errors import Stopped, UserError
from .model import DiT
from .runio import (DiskFullError, NotWritableError, create_run_dir, environment_error, find_resumable_checkpoint, latest_run_dir,
                    load_run_config, load_tensors, rewind_run, run_lock, save_checkpoint, split_prefix,
                    trim_metrics, write_json)

DEFAULT_SNAPSHOT_DTYPE = str(_SNAP_DTYPE).removeprefix("torch.")
METRIC_FIELDS = ["step", "loss", "mse", "vb", "lr", "grad_norm", "steps_per_s", "images_per_s", "skipped",
                 "elapsed_s", "max_block_magnitude", "fid"]
SNAPSHOT_DTYPES = ("float32", "bfloat16", "float16")
# what `--resume` may change; every other training option is the run's own
RESUME_MAY_CHANGE = ("num_steps", "lr", "grad_clip", "skip_nonfinite", "log_every", "ckpt_every", "data_path",
                     "device", "compile", "results_dir")
_NO_BAD = 2 ** 62  # "no non-finite step seen" in the first-bad-step tracker


@dataclass
class TrainConfig:
    data_path: str | None = None  # None: "fashion-mnist" (or, on resume, the run's own data)
    results_dir: str = "results"
    num_steps: int = 400_000
    batch_size: int = 256  # global: split evenly over ranks
    lr: float | None = None  # None: 1e-4 without weight normalisation (DiT's), 1e-2 with it (EDM2's order)
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
    sample_every: int = 0  # write a grid from the EMA weights every N steps (0: never)
    fid_every: int = 0  # FID (FD_fmnist on Fashion-MNIST) of the EMA weights every N steps, in metrics.csv
    fid_samples: int = 1000
    magnitude_every: int = 0  # residual-stream magnitude per block every N steps (a multiple of log_every)

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

    def check(self, world_size: int = 1) -> None:
        """Reject impossible or contradictory settings with one line each (UserError)."""
        def positive(value) -> bool:
            return value is not None and math.isfinite(value) and value > 0

        if self.num_steps < 1:
            raise UserError("--num-steps must be at least 1")
        if self.batch_size < 1 or self.batch_size % world_size:
            raise UserError(f"--global-batch-size {self.batch_size} must be a positive multiple of the number "
                            f"of processes ({world_size})")
        if self.precision not in ("fp32", "bf16"):
            raise UserError(f"--precision {self.precision!r}: use fp32 or bf16")
        if not self.ema_stds or any(not 0 < s < 0.2887 for s in self.ema_stds):
            raise UserError(f"--ema-stds {list(self.ema_stds)}: each width must be in (0, 0.288)")
        if len({f"{s:.3f}" for s in self.ema_stds}) != len(self.ema_stds):
            raise UserError(f"--ema-stds {list(self.ema_stds)}: the widths must differ in the first 3 decimals")
        if self.lr is not None and not positive(self.lr):
            raise UserError(f"--lr {self.lr} must be a positive number")
        if self.grad_clip is not None and not positive(self.grad_clip):
            raise UserError(f"--grad-clip {self.grad_clip} must be a positive number (leave it out for no clipping)")
        if self.ema_snapshots < 0:
            raise UserError(f"--ema-snapshots {self.ema_snapshots} must be 0 (no snapshots) or more")
        if self.snapshot_dtype not in SNAPSHOT_DTYPES:
            raise UserError(f"--snapshot-dtype {self.snapshot_dtype!r}: use one of {', '.join(SNAPSHOT_DTYPES)}")
        if self.log_every < 1:
            raise UserError(f"--log-every {self.log_every} must be at least 1")
        if self.ckpt_every is not None and self.ckpt_every < 1:
            raise UserError(f"--ckpt-every {self.ckpt_every} must be at least 1")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserError(f"--warmup-steps {self.warmup_steps} must be 0 or more")
        if self.decay_start is not None and self.decay_start < 1:
            raise UserError(f"--decay-start {self.decay_start} must be at least 1")
        if not 0 <= self.label_dropout < 1:
            raise UserError(f"label dropout {self.label_dropout} must be in [0, 1)")
        for name in ("sample_every", "fid_every", "magnitude_every"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be 0 (off) or more")
        for name in ("fid_every", "magnitude_every"):  # logged on metrics rows
            if getattr(self, name) % self.log_every:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)} must be a multiple of "
                                f"--log-every {self.log_every} (its value goes into that row of metrics.csv)")
        if self.fid_every and self.fid_samples < 2:
            raise UserError(f"--fid-samples {self.fid_samples} must be at least 2")


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
    """Human log (stdout via tqdm-safe writes + log.txt on rank 0); `warn` goes to stderr (+ log.txt)."""

    def __init__(self, run_dir: Path | None, is_main: bool, bar=None):
        self.path = run_dir / "log.txt" if run_dir else None
        self.is_main, self.bar = is_main, bar

    def warn(self, msg: str) -> None:
        """Something skipped or set aside (a broken checkpoint, unreadable files): stderr, as in sampling."""
        self(msg, stream=sys.stderr)

    def __call__(self, msg: str, stream=None) -> None:
        if not self.is_main:
            return
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        if self.bar is not None:
            self.bar.write(line, file=stream)
        else:
            print(line, file=stream or sys.stdout, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


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


# ------------------------------------------------------------------------------------------------
# Resuming: which run, which settings
# ------------------------------------------------------------------------------------------------
def resolve_run_dir(results_dir: str | Path, resume: str) -> Path:
    """`--resume` names a run folder, or "latest": the newest run in results_dir."""
    return latest_run_dir(results_dir) if resume == "latest" else Path(resume)


def stored_train_config(saved: dict, run_dir: Path) -> TrainConfig:
    """The TrainConfig a run folder's config.json records."""
    doc = dict(saved["train"])
    unknown = set(doc) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise UserError(f"{run_dir / 'config.json'} has unknown training keys {sorted(unknown)}: was it written "
                        "by a newer mapdit?")
    for key in ("adam_betas", "ema_stds"):
        if key in doc:
            doc[key] = tuple(doc[key])
    return TrainConfig(**doc)


def resume_config(stored: TrainConfig, given: TrainConfig, run_dir: Path) -> TrainConfig:
    """The run's own settings with what a resume may change (RESUME_MAY_CHANGE) taken from `given`:
    num_steps, log_every, device and compile as given; data_path, lr, grad_clip and ckpt_every when given
    (not None); skip_nonfinite when either asks for it. Everything else stays the run's."""
    return dataclasses.replace(
        stored, num_steps=given.num_steps, log_every=given.log_every, device=given.device,
        compile=given.compile, results_dir=str(run_dir.parent), data_path=given.data_path or stored.data_path,
        lr=stored.lr if given.lr is None else given.lr,
        grad_clip=stored.grad_clip if given.grad_clip is None else given.grad_clip,
        ckpt_every=stored.ckpt_every if given.ckpt_every is None else given.ckpt_every,
        skip_nonfinite=given.skip_nonfinite or stored.skip_nonfinite)


def load_checkpoint_into(path: Path, model: DiT, ema: PowerEMA, opt: torch.optim.Optimizer,
                         device: torch.device) -> dict:
    """Load a verified checkpoint (tensors from safetensors, the rest from its JSON sidecar)."""
    tensors = load_tensors(path, device=str(device))
    meta = json.loads(path.with_suffix(".json").read_text())
    try:
        model.load_state_dict(split_prefix(tensors, "model."))
        ema.load_state_dict(split_prefix(tensors, "ema."))
        load_optimizer(opt, tensors, meta)
    except (RuntimeError, ValueError, KeyError, IndexError) as err:
        detail = " ".join(str(err).split())
        raise UserError(f"checkpoint {path} does not match the run's model ({detail[:300]}): was it copied "
                        "from another run?") from None
    return meta


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


def _all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _env_int(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


@contextlib.contextmanager
def _disk_full_is_user_error(where_good):
    """A full disk or an unwritable place anywhere in the run (checkpoint, snapshot, metrics or log line,
    sample grid) ends training with one line naming the file and the last good checkpoint."""
    try:
        yield
    except (DiskFullError, NotWritableError, OSError, SafetensorError) as err:
        user = err if isinstance(err, (DiskFullError, NotWritableError)) else environment_error(err)
        if user is None:
            raise
        if isinstance(user, DiskFullError):
            raise UserError(f"disk full while writing {user.path}; {where_good()}: free space and resume") from None
        raise UserError(f"cannot write {user.path} ({user.reason}); {where_good()}") from None


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def grad_norm_(params: list[torch.Tensor], clip: float | None) -> torch.Tensor:
    """The gradients' total 2-norm (logged), clipping them to `clip` when given. Without clipping only the
    norm is computed: clip_grad_norm_(inf) would also multiply every gradient by 1.0."""
    if clip or not hasattr(torch.nn.utils, "get_total_norm"):  # get_total_norm: torch >= 2.6
        return torch.nn.utils.clip_grad_norm_(params, clip or float("inf"), foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)


class _SetUp:
    """What `train` made before its first step: a new run folder is removed again if set-up fails or is
    stopped, so a run that never reached step 1 leaves nothing behind (and the next run takes its number)."""

    def __init__(self):
        self.new_run_dir: Path | None = None
        self.done = False


def train(tc: TrainConfig, model_cfg: ModelConfig | None, resume: str | None = None,
          batch_hook=None) -> Path:
    """Train; returns the run folder. `resume`: a run folder to continue ("latest": newest in results_dir).

    On resume the run's own model and training settings are used, except those `resume_config` takes
    from `tc`. `batch_hook(step, x) -> x` lets tests poison a batch; it is not a user option.
    SIGTERM/SIGINT during set-up: nothing is kept (a new run folder is removed) and `Stopped` is raised.
    """
    setup = _SetUp()
    with StopRequest() as stop:
        try:
            return _train(tc, model_cfg, resume, batch_hook, stop, setup)
        except BaseException:
            if setup.new_run_dir is not None and not setup.done:
                shutil.rmtree(setup.new_run_dir, ignore_errors=True)
            raise


def _stop_if_asked(stop: StopRequest, run_dir: Path | None, resume: str | None, distributed: bool) -> None:
    """Before step 1 a signal stops at once (exit code 0, nothing kept). Under torchrun the ranks agree on
    stopping at report steps instead, so that no rank waits for one that left."""
    if stop.signal is None or distributed:
        return
    what = f"resume {run_dir} again to continue" if resume is not None else "no run folder is kept"
    raise Stopped(f"stopped by signal {signal.Signals(stop.signal).name} during set-up, before step 1: {what}")


def _train(tc: TrainConfig, model_cfg: ModelConfig | None, resume: str | None, batch_hook, stop: StopRequest,
           setup: _SetUp) -> Path:
    # ---- settings: only files are read, nothing is written and no process group is joined until they check out
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
    fail_rank, fail_step = _env_int("MAPDIT_TEST_FAIL_RANK"), _env_int("MAPDIT_TEST_FAIL_STEP", 1)

    d = dist_utils.init(tc.device)
    _stop_if_asked(stop, run_dir, resume, d.enabled)  # a signal while mapdit started: before loading the data
    device = d.device
    torch.set_flush_denormal(True)  # CPU: denormal floats (tiny Adam moments, zero-init layers) cost ~10x per op
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # ---- data, model config, run folder -----------------------------------------------------------
    data = load_dataset(tc.data_path, patch_size=model_cfg.patch_size, image_size=tc.image_size,
                        hflip=tc.hflip)
    _check_labels(data, tc.data_path)
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
    per_rank = tc.batch_size // d.world_size
    stream = IndexStream(len(data), per_rank, tc.seed, d.rank, d.world_size)  # too small a dataset: stop here
    _stop_if_asked(stop, run_dir, resume, d.enabled)
    if run_dir is None and d.is_main:
        run_dir = setup.new_run_dir = create_run_dir(tc.results_dir, model_cfg.model)
    run_dir = Path(dist_utils.broadcast_object(d, str(run_dir) if run_dir else None))

    last_ckpt: int | None = None  # the newest checkpoint written or resumed from

    def where_good() -> str:
        if last_ckpt is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is step {last_ckpt} in {run_dir / 'checkpoints'}"

    with contextlib.ExitStack() as stack:
        stack.enter_context(_disk_full_is_user_error(where_good))
        if d.is_main:
            stack.enter_context(run_lock(run_dir))  # a second process resuming this run fails at once
        log = Logger(run_dir, d.is_main)

        # ---- model, optimizer, EMA --------------------------------------------------------------
        torch.manual_seed(tc.seed)
        model = DiT(model_cfg).to(device)
        named = model.trainable_parameters()
        params = [p for _, p in named]
        # fused Adam: one kernel over all parameters; on the CPU 3.5x faster than foreach (BENCHMARKS.md)
        fused = device.type in ("cuda", "cpu")
        opt = torch.optim.Adam(params, lr=tc.lr, betas=tc.adam_betas, eps=tc.adam_eps,
                               foreach=not fused, fused=fused or None)
        ema = PowerEMA(dict(named), sigma_rels=tc.ema_stds)
        start_step, skipped_total = 0, 0
        if resume is not None:
            found = find_resumable_checkpoint(run_dir, log=log.warn) if d.is_main else None
            found = dist_utils.broadcast_object(d, None if found is None else (found[0], str(found[1])))
            if found is None:
                log(f"no complete checkpoint in {run_dir / 'checkpoints'}: starting again from step 0")
            else:
                start_step, path = found[0], Path(found[1])
                meta = load_checkpoint_into(path, model, ema, opt, device)
                last_ckpt, skipped_total = start_step, int(meta.get("skipped", 0))
            if tc.num_steps < start_step:
                raise UserError(f"--num-steps {tc.num_steps} is below step {start_step}, which the run has "
                                "reached: pass a larger --num-steps (or leave it out to keep the run's own)")
            if d.is_main:
                for note in rewind_run(run_dir, start_step):
                    log.warn(note)
        metrics_path = run_dir / "metrics.csv"
        if d.is_main:
            # rows after the checkpoint are logged again by this run; a fresh run gets just the header
            trim_metrics(metrics_path, METRIC_FIELDS, start_step)
            write_json(run_dir / "config.json", {
                "model": model_cfg.to_dict(), "train": dataclasses.asdict(tc), "data": data.meta(),
                "mapdit_version": __version__, "torch_version": torch.__version__, "world_size": d.world_size})

        fwd = model
        if d.enabled:
            fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if tc.compile:
            fwd = torch.compile(fwd)

        def evaluate_now(step: int, x, t, y) -> tuple[str, str]:
            """Residual magnitudes (cheap, this batch) and FID of the EMA weights, only on the steps asked for."""
            max_mag = fid = ""
            if tc.magnitude_every and step % tc.magnitude_every == 0:
                from .evaluate.magnitudes import residual_magnitudes

                mags = residual_magnitudes(model, x[:16], t[:16], y[:16])
                max_mag = f"{max(mags):.4g}"
                if d.is_main:
                    with open(run_dir / "residual_magnitudes.csv", "a", newline="") as f:
                        csv.writer(f).writerow([step, *(f"{m:.5g}" for m in mags)])
            if tc.fid_every and step % tc.fid_every == 0:  # all ranks: sampling is sharded
                from .evaluate.fid_cli import model_with_weights, quick_fid

                value = quick_fid(model_with_weights(model, ema.averaged(min(tc.ema_stds))), data.meta(),
                                  tc.fid_samples)
                fid = f"{value:.5g}"
                log(f"step {step}: FID of the EMA (sigma_rel {min(tc.ema_stds)}) on {tc.fid_samples} samples: {fid}")
            return max_mag, fid

        diffusion = make_diffusion(model_cfg.num_train_steps, learn_sigma=model_cfg.learn_sigma)
        snap_every = max(1, tc.num_steps // tc.ema_snapshots) if tc.ema_snapshots else 0
        snap_dtype = getattr(torch, tc.snapshot_dtype)
        null_class = model_cfg.null_class
        sample_shape = (data.channels, data.resolution, data.resolution)
        lo, hi = d.rank * per_rank, (d.rank + 1) * per_rank
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")

        from tqdm.auto import tqdm

        bar = tqdm(total=tc.num_steps, initial=start_step, disable=not d.is_main, dynamic_ncols=True,
                   mininterval=1.0, unit="step")
        stack.callback(bar.close)  # also on an error, so that its one line starts on a line of its own
        log = Logger(run_dir, d.is_main, bar)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{'resuming' if start_step else 'starting'} {run_dir} at step {start_step}/{tc.num_steps}: "
            f"{model_cfg.model} preset={model_cfg.preset or '-'} modulation={model_cfg.modulation} "
            f"params={n_params:,} data={data.kind} {len(data)} images {sample_shape} lr={tc.lr:g} "
            f"batch={tc.batch_size} ranks={d.world_size} device={device}")
        skipped_files = getattr(data, "skipped", None)
        if skipped_files:
            path0, why0 = skipped_files[0]
            log.warn(f"skipped {len(skipped_files)} unreadable image file(s) in {tc.data_path} (first: {path0}: {why0})")

        # window accumulators stay on the device: no per-step synchronisation
        sums = torch.zeros(4, device=device)  # loss, mse, vb, grad_norm
        first_bad = torch.full((), _NO_BAD, dtype=torch.long, device=device)  # first step with NaN/Inf
        window_steps, window_skipped, window_start = 0, 0, time.perf_counter()
        run_start = time.perf_counter()

        def check_finite() -> None:
            """Every rank, before anything is written: stop at the first non-finite loss or gradient."""
            bad = dist_utils.all_reduce_min_(d, first_bad.clone())
            bad = int(bad.item())
            if bad != _NO_BAD:
                raise UserError(f"non-finite loss or gradient at step {bad}: training stopped; {where_good()} "
                                f"(continue from it with --resume {run_dir} and a lower --lr, a --grad-clip or "
                                "--skip-nonfinite)")

        def checkpoint(step: int) -> None:
            nonlocal last_ckpt
            if d.is_main:
                opt_t, opt_meta = optimizer_tensors(opt)
                tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
                           **{f"ema.{k}": v for k, v in ema.state_dict().items()}, **opt_t}
                if not _all_finite(tensors.values()):
                    raise UserError(f"non-finite weights at step {step}: refusing to write a checkpoint; "
                                    f"{where_good()}")
                path = save_checkpoint(run_dir, step, tensors,
                                       {**opt_meta, "train_step": step, "skipped": skipped_total})
                log(f"checkpoint {path}")
            last_ckpt = step

        def snapshot(step: int) -> None:
            for sigma in tc.ema_stds:
                averaged = ema.averaged(sigma)
                if not _all_finite(averaged.values()):
                    raise UserError(f"non-finite EMA weights (sigma_rel {sigma:.3f}) at step {step}: refusing to "
                                    f"write the snapshot; {where_good()}")
                try:
                    save_snapshot(run_dir / "ema", sigma, step, averaged, dtype=snap_dtype)
                except ValueError as err:  # float16 overflow
                    raise UserError(f"EMA snapshot at step {step}: {err} (--snapshot-dtype float32)") from None

        model.train()
        stopped = False
        _stop_if_asked(stop, run_dir, resume, d.enabled)  # a signal during set-up: the folder is removed
        setup.done = True
        for step in range(start_step, tc.num_steps):
            if fail_rank == d.rank and step == fail_step:
                raise UserError(f"rank {d.rank} failed at step {step} on purpose (test hook "
                                "MAPDIT_TEST_FAIL_RANK)")
            done = step + 1
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
            grad_norm = grad_norm_(params, tc.grad_clip)
            finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
            if tc.skip_nonfinite:  # one synchronisation per step; only with --skip-nonfinite
                ok = dist_utils.all_reduce_min_(d, finite.to(torch.int32))  # the ranks skip together
                finite = bool(ok.item())
                if not finite:
                    skipped_total += 1
                    window_skipped += 1
                    log(f"step {done}: non-finite loss or gradient, step skipped ({skipped_total} so far)")
                    opt.zero_grad(set_to_none=True)
            if not tc.skip_nonfinite or finite:
                opt.step()
                ema.update(params, done)
                if not tc.skip_nonfinite:  # noted now, acted on (one sync) before anything is written
                    first_bad = torch.where(finite | (first_bad != _NO_BAD), first_bad,
                                            torch.full_like(first_bad, done))
                sums += torch.stack((loss.detach(), losses["mse"].mean().detach(),
                                     losses["vb"].mean().detach(), grad_norm.detach()))
            window_steps += 1

            stop_now = stop.signal is not None and not d.enabled
            report = done % tc.log_every == 0 or done == tc.num_steps or stop_now
            if report and d.enabled:  # the ranks agree to stop at report steps only
                flag = torch.tensor(float(stop.signal is not None), device=device)
                stop_now = dist_utils.all_reduce_max_(d, flag).item() > 0
            snap_now = bool(snap_every) and (done % snap_every == 0 or done == tc.num_steps)
            ckpt_now = done % tc.ckpt_every == 0 or done == tc.num_steps or stop_now
            if report or snap_now or ckpt_now:
                check_finite()  # never a non-finite metric row, snapshot or checkpoint
            if snap_now and d.is_main:
                snapshot(done)
            if report:
                dist_utils.all_reduce_mean_(d, sums)
                now = time.perf_counter()
                elapsed = now - window_start
                loss_v, mse_v, vb_v, gn_v = (sums / max(1, window_steps - window_skipped)).tolist()
                max_mag, fid = evaluate_now(done, x, t, y)  # "" unless due at this step
                row = [done, f"{loss_v:.6g}", f"{mse_v:.6g}", f"{vb_v:.6g}", f"{lr:.6g}", f"{gn_v:.6g}",
                       f"{window_steps / elapsed:.4g}", f"{window_steps * tc.batch_size / elapsed:.4g}",
                       skipped_total, f"{now - run_start:.1f}", max_mag, fid]
                if d.is_main:
                    with open(metrics_path, "a", newline="") as f:
                        csv.writer(f).writerow(row)
                bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2g}", refresh=False)
                sums.zero_()
                window_steps, window_skipped, window_start = 0, 0, time.perf_counter()

            if tc.sample_every and done % tc.sample_every == 0 and d.is_main:
                from .evaluate.fid_cli import model_with_weights, sample_grid_from_model

                grid = sample_grid_from_model(model_with_weights(model, ema.averaged(min(tc.ema_stds))),
                                              data.meta(), run_dir / "samples" / f"train-{done:07d}.png")
                log(f"step {done}: sample grid {grid}")
            bar.update(1)
            if ckpt_now:
                checkpoint(done)
            if stop_now:
                log(f"stopped by signal at step {done}; checkpoint written; continue with --resume {run_dir}")
                stopped = True
                break
        bar.close()
        if not stopped:
            log(f"finished at step {max(tc.num_steps, start_step)}; run folder {run_dir}")
    dist_utils.barrier(d)
    return run_dir


# ------------------------------------------------------------------------------------------------
# Command line (`mapdit train` and the seed's `python train.py`)
# ------------------------------------------------------------------------------------------------
DEFAULT_MODEL = "DiT-S/2"
MODEL_FLAGS = ("model", "preset", "use_all_mp", *MP_OPTIONS, *CHOICE_KEYS)
_FLAG_NAMES = {"batch_size": "--global-batch-size", "seed": "--global-seed", "preset": "--config"}


def _flag(dest: str) -> str:
    if dest in MP_OPTIONS:
        return "--use-" + dest.replace("_", "-")
    return _FLAG_NAMES.get(dest, "--" + dest.replace("_", "-"))


def add_train_args(p: argparse.ArgumentParser) -> None:
    from .cli import add_model_args

    add_model_args(p, data_defaults=False)
    p.set_defaults(model=None)  # None: not given (DEFAULT_MODEL for a new run; the run's own on --resume)
    g = p.add_argument_group("training")
    g.add_argument("--data-path", default=None,
                   help="(default fashion-mnist) 'fashion-mnist', a folder of IDX files, a folder of class subfolders, or prepared latents")
    g.add_argument("--results-dir", default="results")
    g.add_argument("--num-steps", type=int, default=400_000, help="default 400000 (on --resume: the run's own)")
    g.add_argument("--global-batch-size", "--batch-size", dest="batch_size", type=int, default=256)
    g.add_argument("--lr", type=float, default=None, help="default 1e-4 (Config A) or 1e-2 with weight normalisation")
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--decay-start", type=int, default=None)
    g.add_argument("--grad-clip", type=float, default=None)
    g.add_argument("--global-seed", "--seed", dest="seed", type=int, default=0)
    g.add_argument("--ema-stds", type=float, nargs="+", default=[0.05, 0.10])
    g.add_argument("--ema-snapshots", type=int, default=100, help="snapshots per EMA width over the run (0: none)")
    g.add_argument("--snapshot-dtype", choices=SNAPSHOT_DTYPES, default=DEFAULT_SNAPSHOT_DTYPE)
    g.add_argument("--ckpt-every", type=int, default=None)
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    g.add_argument("--compile", action="store_true")
    g.add_argument("--device", default=None)
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip (and count) steps with a NaN/Inf loss or gradient instead of stopping")
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--hflip", action="store_true")
    g.add_argument("--sample-every", type=int, default=0, help="a sample grid from the EMA every N steps")
    g.add_argument("--fid-every", type=int, default=0, help="FID of the EMA every N steps into metrics.csv")
    g.add_argument("--fid-samples", type=int, default=1000)
    g.add_argument("--magnitude-every", type=int, default=0,
                   help="residual-stream magnitude per block every N steps (residual_magnitudes.csv)")
    g.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a run: its folder, or nothing for the newest run in --results-dir. Only "
                        "--num-steps, --lr, --grad-clip, --skip-nonfinite, --log-every, --ckpt-every, --data-path, "
                        "--device and --compile may differ from the run's own")


def _given(args: argparse.Namespace) -> set[str]:
    """The options given on the command line (those whose value is not the parser's default)."""
    p = argparse.ArgumentParser(add_help=False)
    add_train_args(p)
    defaults = vars(p.parse_args([]))
    return {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}


def check_resume_flags(args: argparse.Namespace, given: set[str], saved: dict, stored: TrainConfig,
                       run_dir: Path) -> None:
    """`--resume` continues a run as it was trained: model flags or fixed training options that ask for
    something else are a contradiction (one line naming them), never silently ignored."""
    model = ModelConfig.from_dict(saved["model"])
    problems = []
    if "model" in given and args.model != model.model:
        problems.append(f"--model {args.model} (the run is {model.model})")
    elif given & set(MODEL_FLAGS):
        wanted = make_config(model.model, preset=args.preset, use_all_mp=args.use_all_mp,
                             **{name: getattr(args, name) for name in MP_OPTIONS},
                             **{key: getattr(args, key) for key in CHOICE_KEYS}, input_size=model.input_size,
                             in_channels=model.in_channels, num_classes=model.num_classes)
        compare = given & set(MP_OPTIONS + CHOICE_KEYS)
        if given & {"preset", "use_all_mp"}:  # a preset names the whole set of MP options
            compare |= set(MP_OPTIONS)
        shown = " ".join(_flag(k) for k in MODEL_FLAGS if k in given)
        for key in sorted(compare):
            if getattr(wanted, key) != getattr(model, key):
                problems.append(f"{shown} gives {key}={getattr(wanted, key)} (the run has {getattr(model, key)})")
    fixed = ("batch_size", "seed", "warmup_steps", "decay_start", "ema_stds", "ema_snapshots", "snapshot_dtype",
             "precision", "image_size", "hflip")
    for key in fixed:
        if key not in given:
            continue
        mine, theirs = getattr(args, key), getattr(stored, key)
        if key == "ema_stds":
            mine, theirs = [float(v) for v in mine], [float(v) for v in theirs]
        if mine != theirs:
            problems.append(f"{_flag(key)} {mine} (the run has {theirs})")
    if problems:
        raise UserError(f"--resume {run_dir} continues the run as it was trained, but {'; '.join(problems[:3])}: "
                        "drop these options, or start a new run without --resume")


def run_from_args(args: argparse.Namespace) -> Path:
    from .cli import config_from_args

    given = _given(args)
    tc = TrainConfig(data_path=args.data_path, results_dir=args.results_dir, num_steps=args.num_steps,
                     batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                     decay_start=args.decay_start, grad_clip=args.grad_clip, seed=args.seed,
                     ema_stds=tuple(args.ema_stds), ema_snapshots=args.ema_snapshots,
                     snapshot_dtype=args.snapshot_dtype, ckpt_every=args.ckpt_every, log_every=args.log_every,
                     precision=args.precision, compile=args.compile, device=args.device,
                     skip_nonfinite=args.skip_nonfinite, image_size=args.image_size, hflip=args.hflip,
                     sample_every=args.sample_every, fid_every=args.fid_every, fid_samples=args.fid_samples,
                     magnitude_every=args.magnitude_every)
    if args.resume:
        run_dir = resolve_run_dir(args.results_dir, args.resume)
        saved = load_run_config(run_dir)
        stored = stored_train_config(saved, run_dir)
        check_resume_flags(args, given, saved, stored, run_dir)
        # options left out keep the run's own values (not the parser defaults)
        tc = dataclasses.replace(tc, num_steps=args.num_steps if "num_steps" in given else stored.num_steps,
                                 log_every=args.log_every if "log_every" in given else stored.log_every)
        run_dir = train(tc, None, resume=str(run_dir))
    else:
        args.model = args.model or DEFAULT_MODEL
        # sizes follow the data; placeholders until the data is loaded
        model_cfg = config_from_args(args, input_size=_patch_multiple(args.model), in_channels=1, num_classes=1)
        run_dir = train(tc, model_cfg)
    # leave the process group cleanly after a finished run (after a failure the process just exits)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return run_dir


def _patch_multiple(model_name: str) -> int:
    from .config import parse_model_name

    return parse_model_name(model_name)[1]


def register(sub) -> None:
    p = sub.add_parser("train", help="train a MaP-DiT (also under torchrun)")
    add_train_args(p)
    p.set_defaults(func=run_from_args, graceful_stop=True)  # SIGTERM during start-up: handled by train()


def main(argv: list[str] | None = None) -> int:
    """The seed paper's `python train.py ...` entry point: the same options as `mapdit train`."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])
