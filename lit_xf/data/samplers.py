"""Batches of a split, streamed from a token store: ``EpochBatches`` (item ``(epoch, k)`` is batch
k of this rank's share of the epoch's rows), the ``EpochSampler`` that hands those items out and
resumes mid-epoch, and ``ResumableLoader``.

One epoch of a split, on rank r of W:

1. order: training takes a seeded permutation of the split's documents (``default_rng([seed, epoch])``),
   evaluation the documents in corpus order;
2. rows: ``plan_rows`` over that order (document lengths only; 24 bytes per piece);
3. share: training gives row i to rank i mod W over the first W·⌊R/W⌋ rows (the remainder rule:
   the last R mod W < W rows of the epoch are left out, so every rank has as many batches; their
   documents come in other rows in other epochs; W = 1 leaves none out); evaluation gives rank r
   rows r, r + W, … of all R rows (every row once, ranks may hold one row fewer);
4. batches: consecutive runs of ``batch_size`` rows of the share (a short last one unless ``drop_last``).

DataLoader worker w of N is handed batches w, w + N, … by the loader, so workers read disjoint
documents, and the batch order does not depend on N. Every process computes the same plan
from the same seed; only the tokens of its own batches are read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lit_xf.data.plan import RowPlan, compact, plan_rows
from lit_xf.data.rows import Batch, make_batch, read_rows
from lit_xf.data.store import TokenDocs, open_store


def world_and_rank(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """(world size, rank): those given, else the initialized process group's, else (1, 0)."""
    world, this_rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, this_rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return (world if num_replicas is None else num_replicas), (this_rank if rank is None else rank)


class EpochBatches(Dataset):
    """Map-style dataset of one split: item ``(epoch, k)`` is batch k of this rank's share (module
    docstring). ``docs``: a ``TokenDocs`` in memory, or the path of a store, memory-mapped in each
    process on first use (never pickled). ``doc_ids``: the split's documents (sorted)."""

    def __init__(
        self,
        docs: TokenDocs | str | Path,
        doc_ids: np.ndarray,
        *,
        seq_len: int,
        batch_mode: str,
        batch_size: int,
        pad_id: int,
        shuffle: bool,
        seed: int = 0,
        buffer: int = 16384,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        window: int | None = None,
        xformers_bias: bool = False,
        pin: bool = False,
    ) -> None:
        self._docs = docs if isinstance(docs, TokenDocs) else None
        self.store_path = None if isinstance(docs, TokenDocs) else Path(docs)
        self.doc_ids = compact(np.asarray(doc_ids, dtype=np.int64))
        self.seq_len, self.batch_mode, self.batch_size, self.pad_id = seq_len, batch_mode, batch_size, pad_id
        self.shuffle, self.seed, self.buffer, self.drop_last = shuffle, seed, buffer, drop_last
        self.num_replicas, self.rank = world_and_rank(num_replicas, rank)
        self.window, self.xformers_bias, self.pin = window, xformers_bias, pin
        self._lengths: np.ndarray | None = None
        self._share: tuple[int, RowPlan] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self.store_path is not None:  # each worker maps the store itself
            state["_docs"] = None
        state["_share"] = None
        return state

    @property
    def docs(self) -> TokenDocs:
        if self._docs is None:
            self._docs = open_store(self.store_path)
        return self._docs

    def plan(self, epoch: int = 0) -> RowPlan:
        """Every row of the split in ``epoch`` (all ranks)."""
        if self._lengths is None:
            self._lengths = compact(self.docs.lengths()[self.doc_ids])  # [len(doc_ids)]
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(len(self.doc_ids))
            order, lengths = self.doc_ids[perm], self._lengths[perm]
            del perm  # the planner's temporaries come on top of what is held here
            return plan_rows(order, lengths, self.seq_len, self.batch_mode, self.buffer, rng)
        return plan_rows(self.doc_ids, self._lengths, self.seq_len, self.batch_mode, self.buffer)

    def share(self, epoch: int = 0) -> RowPlan:
        """This rank's rows of ``epoch`` (cached for the latest epoch asked for)."""
        if self._share is None or self._share[0] != epoch:
            plan = self.plan(epoch)
            W, r = self.num_replicas, self.rank
            stop = plan.n_rows // W * W if self.shuffle else plan.n_rows
            self._share = (epoch, plan.take(np.arange(r, stop, W)))
        return self._share[1]

    def n_batches(self, epoch: int = 0) -> int:
        whole, rest = divmod(self.share(epoch).n_rows, self.batch_size)
        return whole + (1 if rest and not self.drop_last else 0)

    def rows(self, epoch: int, k: int) -> list:
        """The token rows of batch k of ``epoch``."""
        B = self.batch_size
        return read_rows(self.share(epoch), self.docs, k * B, (k + 1) * B)

    def __len__(self) -> int:
        return self.n_batches(0)

    def __getitem__(self, item: tuple[int, int]) -> Batch:
        epoch, k = item
        return make_batch(
            self.rows(epoch, k),
            self.seq_len,
            self.pad_id,
            window=self.window,
            xformers_bias=self.xformers_bias,
            pin=self.pin,
        )


class EpochSampler(DistributedSampler):
    """Yields ``(epoch, k)`` for this rank's batches k of the current epoch (``set_epoch``).
    ``resume(epoch, batches)`` makes the next pass over ``epoch`` start at batch ``batches``.
    Being a ``DistributedSampler``, Lightning leaves it in place under DDP instead of replacing it.
    ``batches_yielded`` counts batches handed out this epoch (exact with ``num_workers=0``)."""

    def __init__(self, dataset: EpochBatches) -> None:  # no super().__init__: nothing of it applies
        self.dataset = dataset
        self.num_replicas, self.rank = dataset.num_replicas, dataset.rank
        self.shuffle, self.seed, self.drop_last = dataset.shuffle, dataset.seed, dataset.drop_last
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        self._yielded = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.n_batches(self.epoch)

    def resume(self, epoch: int, batches: int) -> None:
        """Continue ``epoch`` after its first ``batches`` batches (a finished epoch: start the next)."""
        if batches >= self.dataset.n_batches(epoch):
            epoch, batches = epoch + 1, 0
        self.set_epoch(epoch)
        self._resume = (epoch, batches)

    @property
    def batches_yielded(self) -> int:
        return self._yielded

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        skip = self._resume[1] if self._resume is not None and self._resume[0] == epoch else 0
        self._resume = None
        self._yielded = skip
        for k in range(skip, self.dataset.n_batches(epoch)):
            self._yielded += 1
            yield (epoch, k)


def first_item(batch: Batch) -> Batch:
    """The DataLoader's ``collate_fn`` for ``batch_size=None``: the dataset's items are whole batches."""
    return batch


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that tells Lightning it resumes mid-epoch (Lightning checks for these two
    methods). The progress itself lives in ``TextDataModule.state_dict`` and its ``EpochSampler``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


__all__ = ["EpochBatches", "EpochSampler", "ResumableLoader", "first_item"]
