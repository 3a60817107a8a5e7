"""What TensorBoard shows first: one learning-rate curve, no ``epoch`` chart."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lit_xf.callbacks import LearningRateLogger, learning_rates
from lit_xf.loggers import AsyncTensorBoardLogger


class TwoGroups(L.LightningModule):
    """A linear model trained with AdamW over two parameter groups (decay / no decay), warm-up schedule."""

    def __init__(self, no_decay_lr: float | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.no_decay_lr = no_decay_lr

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        groups = [
            {"params": [self.layer.weight], "weight_decay": 0.1, "name": "decay"},
            {"params": [self.layer.bias], "weight_decay": 0.0, "name": "no_decay"},
        ]
        if self.no_decay_lr is not None:
            groups[1]["lr"] = self.no_decay_lr
        optimizer = torch.optim.AdamW(groups, lr=1e-2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / 10)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit(tmp_path, module: L.LightningModule, log_epoch: bool = False, **trainer_kwargs) -> EventAccumulator:
    logger = AsyncTensorBoardLogger(tmp_path, name="run", default_hp_metric=False, log_epoch=log_epoch)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        log_every_n_steps=2,
        logger=logger,
        callbacks=[LearningRateLogger()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(torch.randn(64, 4), batch_size=4))
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    return events


def test_parameter_groups_sharing_a_rate_give_one_curve(tmp_path):
    events = fit(tmp_path, TwoGroups())
    tags = set(events.Tags()["scalars"])
    assert tags == {"train/lr", "train/loss"}  # no epoch, no lr-AdamW/decay + lr-AdamW/no_decay
    lr = events.Scalars("train/lr")
    assert [s.step for s in lr] == [s.step for s in events.Scalars("train/loss")] == [1, 3, 5]
    assert [s.value for s in lr] == pytest.approx([1e-2 * (s + 1) / 10 for s in (1, 3, 5)])  # the step's own rate


def test_groups_with_different_rates_get_a_curve_each(tmp_path):
    events = fit(tmp_path, TwoGroups(no_decay_lr=1e-3), log_epoch=True)
    tags = set(events.Tags()["scalars"])
    assert {"train/lr/decay", "train/lr/no_decay", "epoch"} <= tags and "train/lr" not in tags


def test_learning_rates_of_several_optimizers():
    a = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)]}], lr=0.5)
    b = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.1}, {"params": [torch.zeros(1)], "lr": 0.2}], lr=1.0)
    assert learning_rates([a, b]) == {"train/lr": 0.5, "train/lr_1/0": 0.1, "train/lr_1/1": 0.2}


def test_under_gradient_accumulation_one_rate_per_optimizer_step(tmp_path):
    events = fit(tmp_path, TwoGroups(), accumulate_grad_batches=2)
    assert [s.step for s in events.Scalars("train/lr")] == [1, 3, 5]


def test_no_logger_no_error(tmp_path):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        callbacks=[LearningRateLogger()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(TwoGroups(), train_dataloaders=DataLoader(torch.randn(8, 4), batch_size=4))
    assert trainer.global_step == 2
