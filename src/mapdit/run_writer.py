"""What training writes into its run folder and reads back from it (`RunWriter`): checkpoints (model, EMA and
optimizer tensors plus a JSON sidecar; with --keep-last only the newest N and the steps a study chose), EMA
snapshots, metrics.csv and residual_magnitudes.csv, with every failure around them: the fall-back to an older
checkpoint, non-finite values, a full disk or an unwritable place (one line naming the file and the last good
checkpoint).

`SideOutputs`: what training writes for people to look at (metrics.png, TensorBoard scalars, sample
grids). These never stop training: a failure is said once per kind and training goes on without it.
"""
from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from . import distributed as dist_utils
from .config import TrainConfig
from .distributed import Dist
from .ema import PowerEMA, save_snapshot
from .errors import Diverged, UserError
from .log import Logger, TensorBoard
from .model import DiT
from .plots import plot_metrics
from .runio import (
    DiskFullError,
    NotWritableError,
    environment_error,
    find_resumable_checkpoint,
    list_checkpoints,
    load_tensors,
    rewind_run,
    save_checkpoint,
    split_prefix,
    trim_metrics,
    write_json,
)
from .sample import grid_name, sample_grid_from_model
from .samplers import SamplerSpec
from .weights import checkpoint_mismatch, load_prefixed, model_with_weights

METRIC_FIELDS = ["step", "loss", "mse", "vb", "lr", "grad_norm", "steps_per_s", "images_per_s", "skipped",
                 "elapsed_s", "max_block_magnitude", "fd"]  # fd: FD_fmnist on Fashion-MNIST (config.json's fd_metric)
_NO_BAD = 2 ** 62  # "no non-finite step seen" in the first-bad-step tracker


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

    def __init__(self, run_dir: Path, d: Dist, log: Logger, snapshot_dtype: str, keep_last: int = 0,
                 keep_steps=()):
        self.run_dir, self.d, self.log, self.keep_last = run_dir, d, log, keep_last
        self.keep_steps = frozenset(keep_steps or ())  # TrainConfig.ckpt_steps: never removed by --keep-last
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
        # checkpoints that are all damaged stop the resume here, before anything in the run is changed:
        # starting again from step 0 would cut metrics.csv and remove the EMA snapshots
        found = dist_utils.on_main(lambda: find_resumable_checkpoint(
            run_dir, "nothing was changed; restore an intact copy, or move the checkpoints away to start the run "
            "again from step 0", log=self.log.warn))
        if found is None:
            self.log(f"no checkpoint in {run_dir / 'checkpoints'}: starting from step 0")
        else:
            start_step, path = found
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
            self.prune()
        self.last_ckpt = step

    def prune(self) -> None:
        """--keep-last N: remove all but the newest N checkpoints and those at `keep_steps` (a study's chosen
        steps), after the newest (the one a resume takes) was written whole. The sidecar goes first: a
        checkpoint without one is never resumed from."""
        if not self.keep_last:
            return
        for step, old in list_checkpoints(self.run_dir)[:-self.keep_last]:
            if step in self.keep_steps:
                continue
            old.with_suffix(".json").unlink(missing_ok=True)
            old.unlink(missing_ok=True)

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

    def metrics_row(self, values: dict) -> None:
        """One row of metrics.csv: `values` by METRIC_FIELDS' names, each one given."""
        if self.d.is_main:
            with open(self.metrics_path, "a", newline="") as f:
                csv.writer(f).writerow([values[name] for name in METRIC_FIELDS])

    def magnitudes_row(self, step: int, mags: list[float]) -> None:
        if self.d.is_main:
            with open(self.run_dir / "residual_magnitudes.csv", "a", newline="") as f:
                csv.writer(f).writerow([step, *(f"{m:.5g}" for m in mags)])


def checkpoint_bytes(model: DiT, ema: PowerEMA, params: list[torch.Tensor]) -> int:
    """The size of one checkpoint: the model's state, the EMA's, and Adam's two moments per parameter."""
    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)
    return size(model.state_dict().values()) + size(ema.state_dict().values()) + 2 * size(params)


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def checkpoint_steps(tc: TrainConfig) -> list[int]:
    """The steps a run checkpoints at (a stop by signal aside): every ckpt_every, the last, and ckpt_steps."""
    every = set(range(tc.ckpt_every, tc.num_steps + 1, tc.ckpt_every)) | {tc.num_steps}
    return sorted(every | {s for s in tc.ckpt_steps or () if s <= tc.num_steps})


def disk_line(tc: TrainConfig, model, ema, params, snap_every: int) -> str:
    """Start-up line: the size of a checkpoint and of an EMA snapshot, and what the run will write."""
    ckpt = checkpoint_bytes(model, ema, params)
    steps = checkpoint_steps(tc)
    count = len(steps)
    chosen = {s for s in tc.ckpt_steps or () if s <= tc.num_steps}  # never removed by --keep-last
    kept = len(set(steps[-tc.keep_last:]) | chosen) if tc.keep_last else count
    snap = sum(p.numel() for p in params) * getattr(torch, tc.snapshot_dtype).itemsize
    snaps = (-(-tc.num_steps // snap_every) if snap_every else 0) * len(tc.ema_stds)
    also = f" and the {len(chosen)} chosen steps" if chosen else ""
    keep = f"--keep-last {tc.keep_last}{also} keep{'' if also else 's'} {kept}: " if tc.keep_last else ""
    hint = "" if tc.keep_last else "; --keep-last N keeps the newest N"
    return (f"disk: {human_bytes(ckpt)} per checkpoint, {count} over the run ({keep}{human_bytes(kept * ckpt)}{hint}); "
            f"{snaps} EMA snapshots of {human_bytes(snap)} ({human_bytes(snaps * snap)})")


class SideOutputs:
    """What training writes for people to look at, beside the run's record: metrics.png (the loss, learning
    rate and FD; at each checkpoint and at the end), TensorBoard scalars (--tensorboard), sample grids. None
    of them stops training: a full disk, an unwritable place or a missing package is said once per output
    (one line on stderr) and that output is left off from then on. Rank 0 only."""

    def __init__(self, run_dir: Path, d: Dist, log: Logger, tensorboard: bool, fd_label: str):
        self.run_dir, self.d, self.log, self.fd_label = run_dir, d, log, fd_label
        self.failed: set[str] = set()
        self.tb = None
        if tensorboard:
            self.tb = self.attempt("TensorBoard scalars", lambda: TensorBoard.open(run_dir / "tensorboard", log.warn))

    def attempt(self, what: str, write):
        """write(), unless `what` failed before; a failure of the surroundings is said once, then skipped."""
        if not self.d.is_main or what in self.failed:
            return None
        try:
            return write()
        except (OSError, UserError, ImportError) as err:  # full disk, unwritable place, missing library
            self.failed.add(what)
            self.log.warn(f"warning: cannot write {what} ({err}); training goes on without it")
            return None

    def plot(self) -> None:
        self.attempt("metrics.png", lambda: plot_metrics(self.run_dir / "metrics.csv", self.run_dir / "metrics.png",
                                                        self.fd_label))

    def grid(self, step: int, model: DiT, ema: PowerEMA, sigma_rel: float, data_meta: dict) -> None:
        """samples/train-step0000400-ema0.050-dpm++2m20-cfg4.png: a grid of the EMA weights of width `sigma_rel`
        drawn with the default SamplerSpec, named like `mapdit sample`'s grids (step, weights, sampler, guidance)."""
        spec = SamplerSpec()
        name = grid_name(spec, spec.guidance(model.config.null_class), step=step, ema_std=sigma_rel, prefix="train")
        path = self.attempt("sample grids", lambda: sample_grid_from_model(
            model_with_weights(model, ema.averaged(sigma_rel)), data_meta, self.run_dir / "samples" / name, spec=spec))
        if path is not None:
            self.log(f"step {step}: sample grid {path}")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            self.attempt("TensorBoard scalars", lambda: self.tb.scalars(step, values))

    def close(self) -> None:
        if self.tb is not None:
            self.attempt("TensorBoard scalars", self.tb.close)
