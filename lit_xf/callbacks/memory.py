"""``PeakMemoryMonitor``: per-step peak CUDA memory, allocator retries and OOMs (``memory/*``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_xf.callbacks.deferred import StepMonitor

__all__ = ["MEMORY_TAGS", "PeakMemoryMonitor"]

#: Scalar tags of ``PeakMemoryMonitor``, one value per optimizer step (CUDA only).
MEMORY_TAGS = (
    "memory/peak_allocated_mib",  # peak bytes held by tensors during the step, MiB
    "memory/peak_reserved_mib",  # peak bytes reserved by the caching allocator, MiB
    "memory/alloc_retries",  # cudaMalloc retries (cache flush + retry) in the step
    "memory/ooms",  # out-of-memory errors raised in the step
)

_MIB = 2**20


@dataclass
class _MemoryStep:
    step: int
    allocated: int  # peak bytes
    reserved: int  # peak bytes
    retries: int  # so far
    ooms: int  # so far


def _alloc_events(stats: dict) -> tuple[int, int]:
    """(allocation retries, OOMs) so far, from ``torch.cuda.memory_stats_as_nested_dict``."""
    return stats.get("num_alloc_retries", 0), stats.get("num_ooms", 0)


class PeakMemoryMonitor(StepMonitor):
    """Per-step peak CUDA memory, allocator retries and OOMs of rank zero's device (``memory/*``).

    Peak statistics are reset at the start of each optimizer step (first micro-batch), so each value
    is that step's peak. ``memory/alloc_retries`` and ``memory/ooms`` count the events during the
    step. The statistics are allocator bookkeeping on the host: read at the step's end without a
    sync, logged with the other monitors' deferred reads. Without CUDA nothing is logged and one
    warning says why.

    Args:
        snapshot_steps: ``(start, stop)``: record the allocator history from step ``start`` up to,
            not including, step ``stop`` and dump it as a pickle for https://pytorch.org/memory_viz.
        snapshot_dir: where the snapshot goes; default ``trainer.log_dir`` (the logger's version dir).
        snapshot_max_entries: allocation events kept by ``_record_memory_history``.
    """

    def __init__(
        self,
        snapshot_steps: tuple[int, int] | None = None,
        snapshot_dir: str | None = None,
        snapshot_max_entries: int = 100_000,
    ) -> None:
        super().__init__()
        self.snapshot_steps = snapshot_steps
        self.snapshot_dir = snapshot_dir
        self.snapshot_max_entries = snapshot_max_entries
        self._enabled = False
        self._warned = False
        self._base: tuple[int, int] = (0, 0)
        self._recording = False
        self._snapshot_done = False
        self.snapshot_path: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.snapshot_steps is not None:
            start, stop = self.snapshot_steps
            if not (0 <= int(start) < int(stop)):
                raise ValueError(
                    f"snapshot_steps must be (start, stop) with 0 <= start < stop, got {self.snapshot_steps}"
                )
        if self.snapshot_max_entries <= 0:
            raise ValueError(f"snapshot_max_entries must be positive, got {self.snapshot_max_entries}")
        self._device = trainer.strategy.root_device
        self._enabled = self._device.type == "cuda"
        if self._enabled:  # an int index: torch.cuda's memory functions parse a torch.device each call
            self._index = self._device.index if self._device.index is not None else torch.cuda.current_device()
            self._base = _alloc_events(torch.cuda.memory_stats_as_nested_dict(self._index))
        if not self._enabled and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"PeakMemoryMonitor: the root device is {self._device.type!r}, not CUDA; memory/* tags are not "
                "logged (they come from torch.cuda's caching-allocator statistics)."
            )

    def run_facts(self) -> dict[str, str]:
        if self._enabled:
            return {}
        device = getattr(self, "_device", None)
        where = f"the device is {device.type}" if device is not None else "no CUDA device"
        return {"memory/*": f"not logged: {where}, and they are CUDA caching-allocator statistics"}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._open(trainer):
            self._update(trainer, step=None)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._close(trainer)
        if step is not None:
            self._update(trainer, step=step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._recording:
            self._dump_snapshot(trainer)
        if trainer.is_global_zero:
            self._end(trainer, pl_module)

    def _update(self, trainer: Trainer, step: int | None) -> None:
        """At a step's start (``step is None``) reset peaks; at its end keep the step's statistics."""
        if not (self._enabled and trainer.is_global_zero):
            return
        if step is None:
            torch.cuda.reset_peak_memory_stats(self._index)
            self._maybe_start_snapshot(trainer.global_step)
            return
        # One read per step, unflattened (``memory_stats`` flattens ~150 keys in Python).
        stats = torch.cuda.memory_stats_as_nested_dict(self._index)
        retries, ooms = _alloc_events(stats)
        self._queue(
            trainer,
            _MemoryStep(
                step, stats["allocated_bytes"]["all"]["peak"], stats["reserved_bytes"]["all"]["peak"], retries, ooms
            ),
        )
        if self._recording and step >= self.snapshot_steps[1] - 1:
            self._dump_snapshot(trainer)

    def _ready(self, record: _MemoryStep) -> bool:
        return True  # host bookkeeping, read when the step ended

    def _wait(self, record: _MemoryStep) -> None:
        pass

    def _measure(self, record: _MemoryStep) -> dict[str, float]:
        metrics = {
            "memory/peak_allocated_mib": record.allocated / _MIB,
            "memory/peak_reserved_mib": record.reserved / _MIB,
            "memory/alloc_retries": float(record.retries - self._base[0]),
            "memory/ooms": float(record.ooms - self._base[1]),
        }
        self._base = (record.retries, record.ooms)
        return metrics

    def _maybe_start_snapshot(self, step: int) -> None:
        if self.snapshot_steps is None or self._recording or self._snapshot_done:
            return
        start, stop = self.snapshot_steps
        if start <= step < stop:
            torch.cuda.memory._record_memory_history(max_entries=self.snapshot_max_entries)
            self._recording = True
            self._snapshot_from = step

    def _dump_snapshot(self, trainer: Trainer) -> None:
        directory = self.snapshot_dir or trainer.log_dir or trainer.default_root_dir
        os.makedirs(directory, exist_ok=True)
        last = trainer.global_step - 1
        path = os.path.join(directory, f"memory_snapshot_steps{self._snapshot_from}-{last}.pickle")
        torch.cuda.memory._dump_snapshot(path)
        torch.cuda.memory._record_memory_history(enabled=None)
        self._recording = False
        self._snapshot_done = True
        self.snapshot_path = path
        rank_zero_info(f"PeakMemoryMonitor: memory snapshot of steps {self._snapshot_from}-{last} -> {path}")
