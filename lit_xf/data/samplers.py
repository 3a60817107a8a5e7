"""The row dataset and its samplers: a seeded, resumable, rank-sharded shuffle for training and an
in-order shard for validation."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lit_xf.data.rows import Row


class RowDataset(Dataset):
    """Map-style dataset whose item ``i`` is row ``i`` (a list of document token lists)."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        return self.rows[index]


def _world(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """(world size, rank): those given, else the initialized process group's, else (1, 0)."""
    world, this_rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, this_rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return (world if num_replicas is None else num_replicas), (this_rank if rank is None else rank)


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle (``seed + epoch``), sharded over ranks, able to resume mid-epoch.

    ``resume(epoch, batches)`` makes the next pass over ``epoch`` skip the ``batches`` batches
    (of ``batch_size`` rows, per rank) consumed before the checkpoint. Ranks default to the
    initialized process group; being a ``DistributedSampler``, Lightning leaves it in place under
    DDP instead of wrapping it.
    ``batches_yielded`` counts batches handed out this epoch (exact with ``num_workers=0``).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last_batch: bool = False,
    ) -> None:
        num_replicas, rank = _world(num_replicas, rank)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.drop_last_batch = drop_last_batch  # the loader drops a short last batch (epoch length)
        self._resume: tuple[int, int] | None = None
        self._indices_yielded = 0

    @property
    def batches_per_epoch(self) -> int:
        whole, rest = divmod(self.num_samples, self.batch_size)
        return whole + (1 if rest and not self.drop_last_batch else 0)

    def resume(self, epoch: int, batches: int) -> None:
        """Continue ``epoch`` after its first ``batches`` batches (a finished epoch: start the next)."""
        if batches >= self.batches_per_epoch:
            epoch, batches = epoch + 1, 0
        self.set_epoch(epoch)  # also right for an iterator created before Lightning calls set_epoch
        self._resume = (epoch, batches)

    @property
    def batches_yielded(self) -> int:
        return math.ceil(self._indices_yielded / self.batch_size)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())  # this rank's rows for self.epoch
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = min(self._resume[1] * self.batch_size, len(indices))
        self._resume = None
        self._indices_yielded = skip
        for index in indices[skip:]:
            self._indices_yielded += 1
            yield index


class ShardSampler(DistributedSampler):
    """Rank r of W takes rows r, r + W, r + 2W, … in order, without padding, so every row is
    evaluated exactly once over the ranks and the summed Σ nll / Σ tokens equals one process's.
    (``DistributedSampler``, which Lightning would put in, repeats the first rows until every rank
    has as many.) Ranks may hold one row fewer; ranks default to the initialized process group."""

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        num_replicas, rank = _world(num_replicas, rank)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that tells Lightning it resumes mid-epoch (Lightning checks for these two
    methods). The progress itself lives in ``TextDataModule.state_dict`` and its ``ResumableSampler``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass
