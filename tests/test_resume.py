"""Resuming: model keys that would change the weights are refused by name, the others applied
(the restored optimizer and schedule follow them), a new max_steps warns about the schedule, and
every run ends with last.ckpt unless checkpointing is off."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny_run import TINY

from lit_xf import cli
from lit_xf.checkpoints import load_checkpoint
from lit_xf.resume import merge_resume_hparams, schedule_change

BASE = [a for a in TINY if not a.startswith(("--trainer.max_steps", "--trainer.enable_checkpointing"))]


def _train(root, *extra) -> int:
    return cli.main(["fit", *BASE, f"--trainer.default_root_dir={root}", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run's last.ckpt (its epoch has 16 batches: ModelCheckpoint alone would save nothing
    with validation every 100 steps)."""
    root = tmp_path_factory.mktemp("trained")
    assert (
        _train(
            root,
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=100",
            "--trainer.check_val_every_n_epoch=null",
            "--model.warmup_steps=1",
        )
        == 0
    )
    (last,) = root.rglob("last.ckpt")
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]
    return last


def test_a_run_shorter_than_its_validation_interval_ends_with_last_ckpt(trained):
    checkpoint = load_checkpoint(trained)
    assert checkpoint["global_step"] == 4
    assert checkpoint["lit_xf"] == {"schedule_steps": 4, "tokenizer": {"kind": "counting", "vocab": 16}}


def test_last_ckpt_links_the_final_save_and_nothing_is_written_without_checkpointing(tmp_path):
    assert _train(tmp_path / "a", "--trainer.max_steps=2") == 0  # validation at the epoch's end: saves step 2
    folder = next((tmp_path / "a").rglob("checkpoints"))
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert (folder / "last.ckpt").samefile(folder / "epoch=0-step=2.ckpt")
    assert _train(tmp_path / "b", "--trainer.max_steps=2", "--trainer.enable_checkpointing=false") == 0
    assert not list((tmp_path / "b").rglob("*.ckpt"))


def test_architecture_keys_that_differ_are_refused_by_name(trained, tmp_path, capsys):
    code = _train(tmp_path, f"--ckpt_path={trained}", "--model.arch.d_model=32", "--model.arch.n_layers=3")
    err = capsys.readouterr().err
    assert code == 1
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert line == (
        f"lit-xf: error: checkpoint {trained} holds a model with model.arch.d_model=16, model.arch.n_layers=1, but "
        "the command line or config asks for model.arch.d_model=32, model.arch.n_layers=3: a checkpoint's "
        "architecture can't change (drop those keys to resume it, or leave out --ckpt_path to train a new model)"
    )
    assert not any(tmp_path.iterdir())  # refused before anything was built


def test_other_keys_are_applied_and_the_schedule_change_is_named(trained, tmp_path, caplog):
    logging.getLogger("lit_xf").addHandler(caplog.handler)
    try:
        with pytest.warns(UserWarning, match=r"trainer.max_steps=6, but the checkpoint's schedule ends at step 4"):
            args = (f"--ckpt_path={trained}", "--model.lr=0.5", "--model.arch.attention=naive", "--trainer.max_steps=6")
            assert _train(tmp_path, *args) == 0
    finally:
        logging.getLogger("lit_xf").removeHandler(caplog.handler)
    assert (
        f"fit from {trained} with model.arch.attention='naive' (checkpoint: 'sdpa'), model.lr=0.5 (checkpoint: 0.001)"
        in caplog.text
    )
    resumed = load_checkpoint(next(tmp_path.rglob("last.ckpt")))
    assert resumed["global_step"] == 6
    assert resumed["hyper_parameters"]["lr"] == 0.5 and resumed["hyper_parameters"]["arch"]["attention"] == "naive"
    assert resumed["lr_schedulers"][0]["base_lrs"] == [0.5, 0.5]  # not the checkpoint's 1e-3
    assert resumed["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 0.5


def test_resuming_as_saved_changes_nothing_and_says_nothing(trained, tmp_path, recwarn):
    assert _train(tmp_path, f"--ckpt_path={trained}", "--trainer.max_steps=4") == 0
    assert not [w for w in recwarn if "resumed at step" in str(w.message)]


def test_a_missing_checkpoint_is_named_before_anything_is_built(tmp_path, capsys):
    assert _train(tmp_path / "out", f"--ckpt_path={tmp_path / 'nope.ckpt'}") == 1
    assert f"lit-xf: error: checkpoint {tmp_path / 'nope.ckpt'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merge_rules():
    saved = {"lr": 1e-3, "betas": (0.9, 0.95), "arch": {"d_model": 64, "n_heads": 4, "n_kv_heads": None,
             "positions": "learned", "max_seq_len": 256}, "_instantiator": "x"}  # fmt: skip
    merged, applied = merge_resume_hparams("c.ckpt", saved, {"betas": [0.9, 0.95], "arch": {"n_kv_heads": 4}})
    assert applied == [] and merged == {k: v for k, v in saved.items() if k != "_instantiator"} | {"betas": [0.9, 0.95]}
    with pytest.raises(ValueError, match=r"model.arch.max_seq_len=256, but .* model.arch.max_seq_len=512"):
        merge_resume_hparams("c.ckpt", saved, {"arch": {"max_seq_len": 512}})  # learned positions: one row each
    rope = {**saved, "arch": {**saved["arch"], "positions": "rope"}}
    merged, applied = merge_resume_hparams("c.ckpt", rope, {"arch": {"max_seq_len": 512}, "warmup_steps": 5})
    assert merged["arch"]["max_seq_len"] == 512 and merged["warmup_steps"] == 5
    assert applied == ["model.arch.max_seq_len=512 (checkpoint: 256)", "model.warmup_steps=5 (not in the checkpoint)"]
    flat = {"lr": 1e-3, "d_model": 64, "n_layers": 2}  # saved before GPTConfig
    with pytest.raises(ValueError, match=r"model.arch.n_layers=2, but .* model.arch.n_layers=3"):
        merge_resume_hparams("c.ckpt", flat, {"arch": {"n_layers": 3}})
    assert schedule_change(10, 1e-3, 1e-3, 100, 100) is None
    assert "learning rate goes from 1.00e-03 to 2.00e-03" in schedule_change(10, 1e-3, 2e-3, None, 100)


def test_hparams_keep_plain_data_in_the_checkpoint(trained):
    hparams = torch.load(trained, weights_only=True)["hyper_parameters"]
    assert hparams["arch"]["d_model"] == 16 and hparams["on_nonfinite"] == "stop"
