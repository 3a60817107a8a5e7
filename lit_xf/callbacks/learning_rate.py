"""``LearningRateLogger``: the learning rate as ``train/lr``, one curve per distinct rate."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = ["LR_TAG", "LearningRateLogger", "learning_rates"]

LR_TAG = "train/lr"


def learning_rates(optimizers: list[Any]) -> dict[str, float]:
    """``{tag: lr}`` of the optimizers' parameter groups: ``train/lr`` when every group of an
    optimizer has one rate (LitTinyGPT's decay / no-decay groups do), else ``train/lr/<group>``
    (the group's ``name``, or its index); optimizers after the first add ``_<index>`` to the tag."""
    rates = {}
    for i, optimizer in enumerate(optimizers):
        tag = LR_TAG if i == 0 else f"{LR_TAG}_{i}"
        groups = {group.get("name", str(j)): float(group["lr"]) for j, group in enumerate(optimizer.param_groups)}
        if len(set(groups.values())) == 1:
            rates[tag] = next(iter(groups.values()))
        else:
            rates.update({f"{tag}/{name}": lr for name, lr in groups.items()})
    return rates


class LearningRateLogger(Callback):
    """The learning rate of each optimizer step that logs ``train/loss`` (every
    ``trainer.log_every_n_steps`` steps), read before the step: the rate that step uses.

    Unlike Lightning's ``LearningRateMonitor`` (``lr-AdamW/pg1``, ``lr-AdamW/pg2``: one curve per
    parameter group), parameter groups that share a rate give one curve (:func:`learning_rates`).
    Logged with ``logger.log_metrics`` on global rank zero, at the step index of the other tags; a
    trainer without loggers logs nothing.
    """

    def __init__(self) -> None:
        self._last_step: int | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step or (step + 1) % max(1, trainer.log_every_n_steps):
            return
        self._last_step = step  # once per optimizer step, also under gradient accumulation
        if trainer.is_global_zero and trainer.loggers:
            rates = learning_rates(trainer.optimizers)
            for logger in trainer.loggers:
                logger.log_metrics(rates, step=step)
