"""Deterministic, exactly resumable, rank-sharded batches of indices for in-memory datasets.

Used by the training loop instead of a DataLoader. The batch for a step is a pure function
of (seed, step, rank, world_size), so resuming at step k is just asking for step k:

    global batch G = batch_size * world_size, steps per epoch S = num_items // G
    epoch e = step // S: one permutation of range(num_items) drawn from a torch.Generator
        seeded from (seed, e) -- independent of rank, so all ranks agree on it
    step s takes perm[j*G : (j+1)*G] with j = s % S; rank r takes its contiguous slice
        [r*batch_size : (r+1)*batch_size] of that global batch
    the last num_items % G items of each epoch are dropped, so every step has the same size

Hence concatenating ranks 0..W-1 gives exactly the single-process batch (world 1, batch G).
"""

from __future__ import annotations

import torch

from mapdit.errors import UserError

_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads seeds apart before adding the epoch


def epoch_seed(seed: int, epoch: int) -> int:
    """Generator seed for (seed, epoch): distinct for nearby pairs, fits manual_seed."""
    return (seed * _GOLDEN + epoch) % (1 << 63)


class IndexStream:
    """Per-rank index batches; see the module docstring for the exact rule."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range for world_size {world_size}")
        if batch_size < 1:
            raise UserError(f"batch size must be positive, got {batch_size}")
        global_batch = batch_size * world_size
        if num_items < global_batch:
            raise UserError(
                f"the dataset has {num_items} items, fewer than one global batch "
                f"({batch_size} per rank x {world_size} ranks = {global_batch}): lower the batch size"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = global_batch
        self.steps_per_epoch = num_items // global_batch
        # cache of the current epoch's permutation: one randperm per epoch, not per step
        self._epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of range(num_items), (num_items,) int64."""
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._perm = torch.randperm(self.num_items, generator=gen)
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> torch.LongTensor:
        """This rank's (batch_size,) int64 indices for 0-based `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch + self.rank * self.batch_size
        # clone: callers may keep or modify the batch without touching the cached permutation
        return self.permutation(epoch)[start: start + self.batch_size].clone()
