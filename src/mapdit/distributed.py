"""torchrun awareness: one process per rank, NCCL on GPUs, gloo on CPUs; plain runs are rank 0 of 1.

Failure model: every collective has a timeout (default 600 s, MAPDIT_DIST_TIMEOUT_S overrides it), and a
rank that fails exits non-zero (the CLI turns a UserError into exit code 2), which makes torchrun stop the
other ranks. So when one rank fails the job ends with that rank's error; no rank waits forever.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "MAPDIT_DIST_TIMEOUT_S"


def world_size_from_env() -> int:
    """The number of ranks torchrun started (1 outside torchrun), known before joining the group."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def rank_from_env() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), known before joining the group."""
    return int(os.environ.get("RANK", "0"))


def collective_timeout_s() -> float:
    try:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        value = DEFAULT_TIMEOUT_S
    return value if value > 0 else DEFAULT_TIMEOUT_S


def init(device: str | None = None, timeout_s: float | None = None) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process.

    `timeout_s` (default: $MAPDIT_DIST_TIMEOUT_S or 600) bounds every collective: when one rank dies, the
    others fail instead of hanging.
    """
    world = world_size_from_env()
    rank = rank_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = collective_timeout_s() if timeout_s is None else timeout_s
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return Dist(rank, world, local_rank, dev)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast_object(d: Dist, obj):
    """Rank 0's `obj` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean_(d: Dist, tensor: torch.Tensor) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(tensor)
        tensor /= d.world_size
    return tensor


def all_reduce_min_(d: Dist, tensor: torch.Tensor) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_reduce_max_(d: Dist, tensor: torch.Tensor) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# Helpers for code that runs on every rank of a joined group, or in a single process (no Dist needed)
# ------------------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """(rank, number of ranks) of the joined process group; (0, 1) when none is joined."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast(obj):
    """Rank 0's (picklable) `obj` on every rank of the joined group; `obj` itself in a single process."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable, share: bool = True):
    """Run `fn` on rank 0 only. Its failure fails every rank (instead of leaving them waiting in the next
    collective); with `share` every rank gets rank 0's (picklable) result, else the others get None."""
    rank, world = rank_and_world()
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except UserError as err:
            error = ("user", str(err))
        except BaseException as err:
            if world > 1:
                broadcast((("other", f"rank 0 failed: {type(err).__name__}: {err}"), None))
            raise
    if world == 1:
        if error:
            raise UserError(error[1])
        return result
    error, shared = broadcast((error, result if share else None))
    if error:
        raise UserError(error[1]) if error[0] == "user" else RuntimeError(error[1])
    return result if rank == 0 else shared


def gather_on_main(parts: dict):
    """{key: value} of every rank, merged on rank 0 (one collective); None on the other ranks."""
    rank, world = rank_and_world()
    if world == 1:
        return parts
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(parts, gathered, dst=0)
    if rank != 0:
        return None
    return {k: v for part in gathered for k, v in part.items()}
