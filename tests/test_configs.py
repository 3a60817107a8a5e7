"""Every ``configs/*.yaml`` parses and trains for two steps on the CPU, so configs can't rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_xf import LitTinyGPT
from lit_xf.cli import LitXfCLI, main

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))

# Everything runs on the CPU in fp32; the GPU-sized config also gets short rows and tiny batches.
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true"]
SHRINK = {
    "gpt2_small.yaml": ["--data.seq_len", "128", "--data.batch_size", "2", "--data.num_workers", "0"],
    "gpt2_124m.yaml": [
        *("--data.seq_len", "128", "--data.batch_size", "2", "--data.num_workers", "0"),
        *("--data.bpe_vocab_size", "512", "--model.arch.n_layers", "2"),
    ],
}


@pytest.fixture(autouse=True)
def _no_distributed_leftovers():
    """A config with ``strategy: ddp`` run in this process leaves a process group and MASTER_PORT /
    WORLD_SIZE / LOCAL_RANK behind, which would break later multi-process tests: undo both."""
    import os

    import torch.distributed as dist

    environ = dict(os.environ)
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


def test_there_are_configs():
    names = {path.name for path in CONFIGS}
    assert {
        "default.yaml",
        "counting.yaml",
        "fortunes_padded.yaml",
        "fortunes_packed.yaml",
        "gqa_alibi.yaml",
        "gpt2_small.yaml",
        "gpt2_124m.yaml",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_builds(config, tmp_path, monkeypatch):
    """Parse and instantiate without training: links resolve, the model fits the data."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit-xf"])  # args come from the test, not pytest's command line
    cli = LitXfCLI(run=False, args=["--config", str(config), *CPU, *SHRINK.get(config.name, [])])
    data, model = cli.datamodule, cli.model
    assert model.hparams.arch["max_seq_len"] == model.model.config.max_seq_len == data.seq_len
    assert model.hparams.arch["vocab_size"] == model.model.config.vocab_size == data.vocab_size
    assert model.model.tok_emb.num_embeddings == data.vocab_size


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_config_trains_two_steps(config, tmp_path, monkeypatch):
    """``lit-xf fit`` for two optimizer steps with the config's own callbacks and logger."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit-xf"])
    args = [
        "fit",
        "--config",
        str(config),
        *CPU,
        *SHRINK.get(config.name, []),
        "--trainer.max_steps",
        "2",
        "--trainer.num_sanity_val_steps",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]
    assert main(args) == 0
    logged = yaml.safe_load(config.read_text())["trainer"]["logger"]["init_args"]
    run_dir = tmp_path / logged["save_dir"] / logged["name"] / "version_0"
    assert (run_dir / "config.yaml").is_file()
    assert list(run_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    info = events.Tensors("run/info/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| attention kernel | sdpa |" in info and "| MLP kernel | torch |" in info  # the CPU's choices
    reason = next(line for line in info.splitlines() if line.startswith("| attention kernel reason |"))
    assert ("runs sdpa on cpu without measuring" in reason) or ("as configured" in reason), reason
    assert "| attention window | none |" in info


def test_a_cli_checkpoint_rebuilds_its_model(tmp_path, monkeypatch):
    """A run's checkpoint stores the architecture as model.arch, a plain dict, with the linked
    vocab_size and max_seq_len in it: ``load_from_checkpoint`` rebuilds the same model."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit-xf"])
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]
    args = ["fit", "--config", str(CONFIGS[0].parent / "default.yaml"), *CPU, *quiet, "--trainer.max_steps", "1"]
    cli = LitXfCLI(args=[*args, "--model.arch.n_layers", "1", "--data.seq_len", "64"])
    cli.trainer.save_checkpoint(tmp_path / "run.ckpt")
    hparams = torch.load(tmp_path / "run.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["arch"]["n_layers"] == 1 and hparams["arch"]["max_seq_len"] == 64
    assert hparams["arch"]["vocab_size"] == cli.datamodule.vocab_size
    loaded = LitTinyGPT.load_from_checkpoint(tmp_path / "run.ckpt")
    assert loaded.model.config == cli.model.model.config and loaded.hparams.lr == cli.model.hparams.lr


def test_padded_and_packed_differ_only_in_batching():
    """The memory-curve pair: same model, corpus and trainer; only the batch mode (and the batch size
    that keeps real tokens per step comparable) and the run name differ."""
    padded, packed = (
        yaml.safe_load((CONFIGS[0].parent / f"fortunes_{m}.yaml").read_text()) for m in ("padded", "packed")
    )
    assert padded["model"] == packed["model"]
    assert padded["data"].pop("batch_mode") == "padded" and packed["data"].pop("batch_mode") == "packed"
    padded["data"].pop("batch_size"), packed["data"].pop("batch_size")
    assert padded["data"] == packed["data"]
    for cfg in (padded, packed):
        cfg["trainer"]["logger"]["init_args"].pop("name")
    assert padded["trainer"] == packed["trainer"]
