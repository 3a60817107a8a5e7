"""``MemoryBreakdown``: what holds the memory of each step (``memory/*`` beside the peak monitor's).

parameters, gradients and optimizer state are counted from the tensors themselves (each storage
once: tied weights, views); activations are what the CUDA allocator holds at the forward's end
(``on_before_backward``: everything the backward will read: saved tensors, the loss's logits, the
batch) minus those persistent parts; the attention plan is what the kernel's plan for the batch
holds (its masks, biases, block lists: ``AttentionPlan.nbytes``), built once per forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lit_xf.callbacks.deferred import StepMonitor

__all__ = ["BREAKDOWN_TAGS", "MemoryBreakdown", "breakdown_metrics"]

#: Scalar tags of ``MemoryBreakdown``, MiB, one value per optimizer step.
BREAKDOWN_TAGS = (
    "memory/params_mib",  # parameters (tensors, each storage once)
    "memory/grads_mib",  # gradients, at the optimizer step
    "memory/optimizer_mib",  # optimizer state (AdamW: exp_avg, exp_avg_sq)
    "memory/forward_end_mib",  # allocated at the forward's end (CUDA only)
    "memory/activations_mib",  # forward_end − params − optimizer − gradients held then (CUDA only)
    "memory/attention_plan_mib",  # the attention kernel's plan of the step's first micro-batch
)

_MIB = 2**20


@dataclass
class _Breakdown:
    step: int
    params: int
    grads: int
    optimizer: int
    forward_end: int | None  # allocated bytes, None without CUDA
    grads_at_forward_end: int
    plan: int


def breakdown_metrics(b: _Breakdown) -> dict[str, float]:
    """The tags' values (MiB) of one step's record."""
    metrics = {
        "memory/params_mib": b.params / _MIB,
        "memory/grads_mib": b.grads / _MIB,
        "memory/optimizer_mib": b.optimizer / _MIB,
        "memory/attention_plan_mib": b.plan / _MIB,
    }
    if b.forward_end is not None:
        activations = b.forward_end - b.params - b.optimizer - b.grads_at_forward_end
        metrics["memory/forward_end_mib"] = b.forward_end / _MIB
        metrics["memory/activations_mib"] = max(activations, 0) / _MIB
    return metrics


class MemoryBreakdown(StepMonitor):
    """Per step: parameters, gradients, optimizer state, activations at the forward's end and the
    attention plan (``BREAKDOWN_TAGS``), MiB, rank zero's device.

    The tensor walks (parameters, their gradients, the optimizer state) are repeated on the first
    ``measure_steps`` steps and then reused (their sizes do not change after the optimizer's first
    step); the forward's end is one ``torch.cuda.memory_allocated`` read per step (host
    bookkeeping, no sync). Without CUDA the activation tags are not logged.
    """

    def __init__(self, measure_steps: int = 2) -> None:
        super().__init__()
        if measure_steps < 2:
            raise ValueError(f"measure_steps={measure_steps}: at least 2 (the optimizer state appears after step 0)")
        self.measure_steps = measure_steps
        self._record: _Breakdown | None = None
        self._cached: tuple[int, int, int] | None = None
        self._measured = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        self._cuda = device.type == "cuda"
        if self._cuda:
            self._index = device.index if device.index is not None else torch.cuda.current_device()
        else:
            rank_zero_warn(
                f"MemoryBreakdown: the device is {device.type!r}, not CUDA; memory/activations_mib and "
                "memory/forward_end_mib are not logged (they read the CUDA allocator)"
            )
        model = getattr(pl_module, "model", None)
        if hasattr(model, "record_plan_bytes"):
            model.record_plan_bytes = True

    def run_facts(self) -> dict[str, str]:
        return {} if getattr(self, "_cuda", True) else {"memory/activations_mib": "not logged: no CUDA device"}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._open(trainer):
            self._record = None

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self._record is not None or not trainer.is_global_zero:
            return  # the step's first micro-batch only
        from lit_xf.memory_facts import storage_bytes

        allocated = torch.cuda.memory_allocated(self._index) if self._cuda else None
        grads = storage_bytes(p.grad for p in pl_module.parameters()) if trainer.accumulate_grad_batches > 1 else 0
        plan = getattr(getattr(pl_module, "model", None), "last_plan_bytes", 0)
        self._record = _Breakdown(self._step or 0, 0, 0, 0, allocated, grads, int(plan))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self._record is None or not trainer.is_global_zero:
            return
        if self._cached is None or self._measured < self.measure_steps:
            from lit_xf.memory_facts import optimizer_state_bytes, storage_bytes

            params = list(pl_module.parameters())
            self._cached = (
                storage_bytes(params),
                storage_bytes(p.grad for p in params),
                optimizer_state_bytes(trainer.optimizers),
            )
            self._measured += 1
        self._record.params, self._record.grads, self._record.optimizer = self._cached

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._close(trainer)
        if step is not None and self._record is not None and trainer.is_global_zero:
            self._record.step = step
            self._queue(trainer, self._record)
            self._record = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self._end(trainer, pl_module)

    def _ready(self, record: _Breakdown) -> bool:
        return True  # host numbers, known when the step ended

    def _wait(self, record: _Breakdown) -> None:
        pass

    def _measure(self, record: _Breakdown) -> dict[str, float]:
        return breakdown_metrics(record)

    def latest(self) -> dict[str, int]:
        """The last measured persistent parts, bytes (for the OOM report)."""
        if self._cached is None:
            return {}
        return dict(zip(("parameters", "gradients", "optimizer state"), self._cached, strict=True))
