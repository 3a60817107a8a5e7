"""Non-finite losses and gradients: found on the logged steps and before every checkpoint; by
default training stops with the steps and likely causes named and the last good checkpoint kept;
``on_nonfinite="skip"`` leaves the weights of such steps alone and goes on."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_run import TINY
from torch.utils.data import DataLoader

from lit_xf import GPTConfig, LitTinyGPT, cli
from lit_xf.checkpoints import load_checkpoint
from lit_xf.nonfinite import NonFiniteError, NonFiniteGuard, grads_finite

ARCH = GPTConfig(vocab_size=17, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, attention="sdpa")


class _NaNAt(LitTinyGPT):
    """Its loss is NaN at the given steps (1-based), as a bad batch would make it."""

    def __init__(self, *args, nan_steps=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_steps = set(nan_steps)

    def _loss_parts(self, batch):
        parts = super()._loss_parts(batch)
        if self.global_step + 1 in self.nan_steps:
            parts = parts._replace(nll_sum=parts.nll_sum * float("nan"))
        return parts


class _Weights(L.Callback):
    """The weights after each optimizer step, by step."""

    def __init__(self):
        self.after = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = torch.cat([p.detach().flatten() for p in pl_module.parameters()])


def _fit(model, tmp_path, steps=10, log_every=5, callbacks=()):
    ids = torch.randint(0, 17, (2, 16), generator=torch.Generator().manual_seed(0))
    loader = DataLoader([{"input_ids": ids, "labels": ids}] * steps, batch_size=None, collate_fn=lambda b: b)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        log_every_n_steps=log_every,
        callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, loader)
    return trainer


def test_stop_names_the_steps_and_keeps_the_last_good_checkpoint(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(NonFiniteError) as raised:
        _fit(_NaNAt(ARCH, nan_steps={3}), tmp_path, callbacks=[saver])
    good = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    assert str(raised.value) == (
        "non-finite loss or gradients in steps 3..4 (read on logged steps); likely causes: the learning rate is "
        "too high (model.lr=0.001), bad data (a batch with out-of-range ids or labels); training stopped and the "
        f"last good checkpoint stays ({good}); model.on_nonfinite=skip skips such steps instead"
    )
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [good.name]
    weights = load_checkpoint(good)["state_dict"].values()
    assert all(bool(w.isfinite().all()) for w in weights)


def test_stop_is_read_on_the_logged_step_without_checkpoints(tmp_path):
    weights = _Weights()
    with pytest.raises(NonFiniteError, match=r"in steps 6..10 \(read on logged steps\).*no checkpoint was written"):
        _fit(_NaNAt(ARCH, nan_steps={7}), tmp_path, steps=20, callbacks=[weights])
    assert max(weights.after) == 9  # the read at step 10 stops before its optimizer step


def test_a_nan_is_named_exactly_when_every_step_logs(tmp_path):
    with pytest.raises(NonFiniteError, match=r"non-finite loss or gradients at step 5;"):
        _fit(_NaNAt(ARCH, nan_steps={5}), tmp_path, log_every=1)


def test_skip_leaves_the_weights_of_bad_steps_and_goes_on(tmp_path):
    weights = _Weights()
    with pytest.warns(
        UserWarning, match=r"skipped step\(s\) with a non-finite loss or gradients between steps 1 and 5"
    ):
        trainer = _fit(_NaNAt(ARCH, nan_steps={3, 4}, on_nonfinite="skip"), tmp_path, callbacks=[weights])
    after = weights.after
    assert trainer.global_step == 10 and len(after) == 10
    assert torch.equal(after[2], after[3]) and torch.equal(after[3], after[4])  # steps 3 and 4 skipped
    assert not torch.equal(after[4], after[5]) and bool(after[10].isfinite().all())


def test_a_huge_learning_rate_stops_the_cli_with_one_message(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [a for a in TINY if not a.startswith(("--trainer.max_steps", "--trainer.enable_checkpointing"))]
    code = cli.main(["fit", *args, "--model.lr=1e4", "--trainer.max_steps=30", "--trainer.log_every_n_steps=5"])
    err = capsys.readouterr().err
    assert code == 1
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line.startswith("lit-xf: error: non-finite loss or gradients ")
    assert "model.lr=10000" in line and "training stopped" in line


def test_guard_counts_on_the_device_and_refuses_unknown_modes():
    guard = NonFiniteGuard()
    guard.add_loss(torch.tensor(1.0))
    guard.add_loss(torch.tensor(float("inf")))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    assert not bool(grads_finite([p]))
    assert guard.add_grads([p], scaled=False) is False  # stop mode never decides per step
    assert guard.add_grads([p], scaled=True) is False  # a GradScaler's gradients are its own business
    assert int(guard.pending()) == 2 and int(guard.pending()) == 0
    message = guard.message(5, 1e-3, "16-true", None, scaled=False)
    assert "fp16 overflow without a GradScaler (trainer.precision=16-true: use 16-mixed)" in message
    assert "fp16 overflow in the forward" in guard.message(5, 1e-3, "16-mixed", None, scaled=True)
    with pytest.raises(ValueError, match="on_nonfinite='ignore': choose one of stop, skip"):
        NonFiniteGuard("ignore")


class _PoisonWeights(L.Callback):
    """Makes a weight NaN after the given step, as an optimizer overflow would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def test_non_finite_weights_are_never_written_even_when_skipping(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    # the poison comes first: it runs before the checkpoint of the same step
    with pytest.raises(NonFiniteError, match="in steps 3..4"):
        _fit(LitTinyGPT(ARCH, on_nonfinite="skip"), tmp_path, callbacks=[_PoisonWeights(3), saver])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0-step=2.ckpt"]
