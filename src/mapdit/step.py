"""One training step and what feeds it: `BatchSource` (the batch of step s on this rank), `train_step` (weight
projection, the diffusion loss, backward, gradient norm, Adam, the power EMA) and `ReportWindow` (the steps
between two metrics rows). The loop in mapdit.train runs them; benchmarks/bench.py times `train_step`.

Every random draw of step s (timesteps, noise, label dropout, flips) comes from a generator seeded by
(seed, s) over the *global* batch, and the data order is a pure function of (seed, s): so a resumed run
continues exactly, and N ranks under torchrun see exactly the samples one process would.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from . import distributed as dist_utils
from .config import TrainConfig
from .data import IndexStream
from .distributed import Dist
from .ema import PowerEMA
from .model import DiT


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
    `IndexStream` (a pure function of seed and step), so ranks and resumed runs see what one process would."""

    def __init__(self, data, stream: IndexStream, tc: TrainConfig, d: Dist, num_timesteps: int,
                 null_class: int | None, label_dropout: float):
        self.data, self.stream, self.tc, self.device = data, stream, tc, d.device
        self.num_timesteps, self.null_class, self.label_dropout = num_timesteps, null_class, label_dropout
        per_rank = tc.batch_size // d.world_size
        self.lo, self.hi = d.rank * per_rank, (d.rank + 1) * per_rank
        self.shape = (data.channels, data.resolution, data.resolution)

    def __call__(self, step: int) -> Batch:
        tc, device, lo, hi = self.tc, self.device, self.lo, self.hi
        g = step_generator(tc.seed, step, device)
        t = torch.randint(0, self.num_timesteps, (tc.batch_size,), generator=g, device=device)[lo:hi]
        noise = torch.randn((tc.batch_size, *self.shape), generator=g, device=device)[lo:hi]
        drop = (torch.rand(tc.batch_size, generator=g, device=device) < self.label_dropout)[lo:hi]
        x, y = self.data.batch(self.stream.indices(step), torch.Generator().manual_seed(tc.seed * 7919 + step))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if self.null_class is not None:
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
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
    synchronisation), steps run and skipped, and the training time: the wall time less what was spent
    `aside` (sample grids, FD, magnitudes, plots), so that steps/s measures training only."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(4, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.steps, self.skipped, self.start, self.aside_s = 0, 0, time.perf_counter(), 0.0

    def seconds(self) -> float:
        """Training seconds of the window (its wall time less the time spent aside)."""
        return time.perf_counter() - self.start - self.aside_s

    @contextlib.contextmanager
    def aside(self, bar=None):
        """Time spent inside is not training: it counts neither in steps/s nor in the bar's rate and ETA."""
        start = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - start
            self.aside_s += spent
            if bar is not None and not bar.disable:  # tqdm's clocks: its elapsed time and its rate's interval
                bar.start_t += spent
                bar.last_print_t += spent

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

