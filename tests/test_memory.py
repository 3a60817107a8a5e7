"""Activation checkpointing, the memory breakdown, snapshots and the out-of-memory report (CPU)."""

from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_run import TINY

from lit_xf import cli
from lit_xf.callbacks import BREAKDOWN_TAGS, MemoryBreakdown, MemorySnapshot
from lit_xf.callbacks.memory_breakdown import _Breakdown, breakdown_metrics
from lit_xf.config import GPTConfig
from lit_xf.memory_estimate import RunShape, estimate
from lit_xf.memory_facts import config_dims
from lit_xf.memory_report import fit_suggestions, oom_message, requested_bytes
from lit_xf.memory_timeline import timeline, timeline_html
from lit_xf.model import TinyGPT
from lit_xf.module import LitTinyGPT

LAYOUTS = {"padded": None, "packed": [[5, 7, 4], [9, 6, 1]]}


def _grads(mode: str, attention: str, doc_lens, dropout: float = 0.0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyGPT(
        vocab_size=40,
        d_model=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=16,
        attention=attention,
        positions="rope",
        dropout=dropout,
        activation_checkpointing=mode,
    ).double()
    ids = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # dropout's draws
    model(ids, doc_lens=doc_lens).pow(2).mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_leaves_gradients_unchanged(attention, layout, mode):
    """float64: the recompute runs the same operations on the same inputs, so the gradients agree
    to rounding (they are in fact bit-identical on CPU; 1e-12 leaves room for reordering)."""
    plain, recomputed = _grads("none", attention, LAYOUTS[layout]), _grads(mode, attention, LAYOUTS[layout])
    for name, g in plain.items():
        torch.testing.assert_close(recomputed[name], g, rtol=1e-12, atol=1e-12, msg=name)


def test_recompute_replays_dropout_and_reuses_the_attention_plan(monkeypatch):
    plain = _grads("none", "sdpa", LAYOUTS["packed"], dropout=0.2)
    prepared = []
    original = TinyGPT.forward

    def counting(self, *args, **kwargs):
        real = self.kernel.prepare
        self.kernel.prepare = lambda *a, **k: prepared.append(1) or real(*a, **k)
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.kernel.prepare

    monkeypatch.setattr(TinyGPT, "forward", counting)
    full = _grads("full", "sdpa", LAYOUTS["packed"], dropout=0.2)
    assert prepared == [1]  # one plan per forward, the backward's recompute included
    for name, g in plain.items():
        torch.testing.assert_close(full[name], g, rtol=1e-12, atol=1e-12, msg=name)
    assert not torch.equal(
        plain["blocks.0.attn.qkv.weight"], _grads("none", "sdpa", LAYOUTS["packed"])["blocks.0.attn.qkv.weight"]
    )


def test_bad_checkpointing_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown activation_checkpointing 'half'.*none, selective, full"):
        GPTConfig(activation_checkpointing="half")


def test_fsdp_takes_over_the_checkpointing():
    module = LitTinyGPT(arch=GPTConfig(n_layers=4, activation_checkpointing="selective"))
    strategy = FSDPStrategy()
    trainer = SimpleNamespace(strategy=strategy)
    module._trainer = trainer
    module.configure_model()
    check = strategy._activation_checkpointing_kwargs["check_fn"]
    assert [check(b) for b in module.model.blocks] == [True, False, True, False]
    assert not check(module.model.norm_f)
    assert module.model.checkpoint_layers == frozenset()  # not checkpointed twice


def test_breakdown_metrics_subtract_the_persistent_parts():
    mib = 2**20
    record = _Breakdown(
        step=3,
        params=10 * mib,
        grads=10 * mib,
        optimizer=20 * mib,
        forward_end=100 * mib,
        grads_at_forward_end=0,
        plan=mib,
    )
    assert breakdown_metrics(record) == {
        "memory/params_mib": 10,
        "memory/grads_mib": 10,
        "memory/optimizer_mib": 20,
        "memory/attention_plan_mib": 1,
        "memory/forward_end_mib": 100,
        "memory/activations_mib": 70,
    }
    record.forward_end = None  # no CUDA: no activation tags
    assert "memory/activations_mib" not in breakdown_metrics(record)


def test_breakdown_is_logged_each_step_on_cpu(tmp_path):
    module = LitTinyGPT(
        arch=GPTConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, attention="naive"),
        warmup_steps=1,
    )
    batches = [
        {
            "input_ids": torch.randint(0, 40, (2, 16)),
            "labels": torch.randint(0, 40, (2, 16)),
            "doc_lens": [[10, 6], [16]],
        }
        for _ in range(3)
    ]
    logger = L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=logger,
        callbacks=[MemoryBreakdown()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="MemoryBreakdown: the device is 'cpu'"):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"memory/params_mib", "memory/grads_mib", "memory/optimizer_mib", "memory/attention_plan_mib"} <= tags
    assert set(BREAKDOWN_TAGS) - tags == {"memory/activations_mib", "memory/forward_end_mib"}  # CUDA only
    params = sum(p.numel() for p in module.parameters()) * 4 / 2**20
    assert [s.value for s in events.Scalars("memory/params_mib")] == pytest.approx([params] * 3)
    # exp_avg and exp_avg_sq, plus one scalar step counter per parameter tensor
    assert [s.value for s in events.Scalars("memory/optimizer_mib")][1:] == pytest.approx([2 * params] * 2, rel=3e-3)
    plan = 2 * 1 * 16 * 16 * 4 / 2**20  # naive's [B, 1, T, T] fp32 bias
    assert [s.value for s in events.Scalars("memory/attention_plan_mib")] == pytest.approx([plan] * 3)


def _snapshot(events):
    return {"segments": [{"blocks": [{"size": 300, "state": "active_allocated"}]}], "device_traces": [events]}


def test_timeline_finds_the_peak_and_the_live_set():
    frames = [
        {"filename": "/x/torch/nn/functional.py", "line": 1, "name": "linear"},
        {"filename": "model.py", "line": 7, "name": "forward"},
    ]
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames},
        {"action": "alloc", "addr": 2, "size": 500, "frames": []},
        {"action": "free_completed", "addr": 2, "size": 500},
        {"action": "alloc", "addr": 3, "size": 200, "frames": []},
        {"action": "oom", "size": 10**9},
    ]
    t = timeline(_snapshot(events))
    assert t["bytes"] == [100, 600, 100, 300, 300]  # nothing live before recording: 300 at the end
    assert t["peak_index"] == 1 and t["peak_bytes"] == 600
    assert [size for size, _ in t["live_at_peak"]] == [500, 100]
    page = timeline_html(_snapshot(events), title="t")
    assert "OOM" in page and "model.py:7 forward" in page and "functional.py" not in page
    assert "<script" not in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")


def test_snapshot_on_oom_writes_the_files_before_the_error_propagates(tmp_path, monkeypatch):
    recorded = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kw: recorded.append(kw))
    monkeypatch.setattr(
        torch.cuda.memory, "_snapshot", lambda: _snapshot([{"action": "alloc", "addr": 1, "size": 300}])
    )
    callback = MemorySnapshot(stacks="none")
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), global_step=7, loggers=[])
    callback._enabled = True  # as setup() sets it on a CUDA device
    callback.on_fit_start(trainer, None)
    assert recorded == [{"enabled": "all", "context": None, "stacks": "python", "max_entries": 200_000}]
    err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    callback.on_exception(trainer, None, err)
    files = err.memory_snapshot_files
    assert sorted(os.path.basename(p) for p in files.values()) == [
        "memory_snapshot_oom_step7.pickle",
        "memory_timeline_oom_step7.html",
        "memory_viz_oom_step7.html",
    ]
    with open(files["pickle"], "rb") as f:
        assert pickle.load(f)["device_traces"][0][0]["size"] == 300
    assert recorded[-1] == {"enabled": None}  # recording stopped
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")]


def test_snapshot_settings_are_checked():
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), is_global_zero=True)
    with pytest.raises(ValueError, match="stacks='cpp'"):
        MemorySnapshot(stacks="cpp").setup(trainer, None, "fit")
    with pytest.raises(ValueError, match=r"0 <= start < stop, got \(3, 3\)"):
        MemorySnapshot(steps=(3, 3)).setup(trainer, None, "fit")
    with pytest.warns(UserWarning, match="nothing is recorded"):
        MemorySnapshot().setup(trainer, None, "fit")


def test_oom_message_names_step_peak_consumers_and_what_fits():
    dims = config_dims(GPTConfig(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, ffn="gelu", max_seq_len=2048))
    run = RunShape(batch_size=64, seq_len=2048, attention="sdpa", batch_mode="packed")
    capacity = 64 * 2**30
    est = estimate(dims, run)
    suggestions = fit_suggestions(dims, run, capacity)
    assert suggestions[0].startswith("--data.batch_size ")
    smaller = int(suggestions[0].split()[1])
    assert 0 < smaller < 64
    assert any("activation_checkpointing" in s for s in suggestions)
    assert any("--model.arch.attention auto" in s for s in suggestions)  # sdpa's packed mask is O(T²)
    text = oom_message(
        3,
        63 * 2**30,
        capacity,
        est,
        suggestions,
        requested_bytes("Tried to allocate 2.00 GiB"),
        {"timeline": "runs/x/memory_timeline_oom_step3.html"},
    )
    assert "\n" not in text
    assert text.startswith("CUDA out of memory at step 3 (asked for 2.00 GiB; peak 63.00 GiB of 64.00 GiB)")
    assert f"largest: {est.dominant}" in text and "memory_timeline_oom_step3.html" in text


def test_cli_reports_an_oom_as_one_line(monkeypatch, tmp_path, capsys):
    def oom(self, batch, batch_idx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has ...")

    monkeypatch.setattr(LitTinyGPT, "training_step", oom)
    monkeypatch.setattr("lit_xf.memory_facts.device_capacity", lambda device: 2**20)  # a 1 MiB card
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fit", *TINY]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        "lit-xf: error: CUDA out of memory at step 0 (asked for 20.00 MiB; peak unknown of 1.00 MiB)"
    )
    # the tiny run's estimate (~0.25 MiB) fits the 1 MiB card: the line says what else holds memory
    assert "estimated peak" in err[0] and "that fits the card" in err[0] and "would fit" not in err[0]
