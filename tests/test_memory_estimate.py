"""The memory estimate's arithmetic: hand-computed cases, and the saved tensors autograd really keeps."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lit_xf import cli
from lit_xf.attention import DocLayout
from lit_xf.config import GPTConfig
from lit_xf.memory_estimate import (
    GPUS,
    HEADROOM,
    ModelDims,
    RunShape,
    attention_memory_kind,
    checkpointed_layers,
    estimate,
    gpu_capacity,
    largest_batch_size,
)
from lit_xf.memory_facts import config_dims, model_dims, storage_bytes
from lit_xf.model import TinyGPT

# d=8, 1 layer, 2 heads of 4, GELU hidden 32, vocabulary 10, untied
SMALL = ModelDims(
    vocab_size=10,
    d_model=8,
    n_layers=1,
    n_heads=2,
    n_kv_heads=2,
    head_dim=4,
    ffn="gelu",
    ffn_hidden=32,
    params=1000,
    block_linear=3 * 64 + 64 + 256 + 32 + 256 + 8,
    block_largest_matrix=256,
)


def test_block_parts_by_hand_bf16_mixed():
    run = RunShape(batch_size=2, seq_len=4, precision="bf16-mixed", attention="sdpa", batch_mode="padded")
    est = estimate(SMALL, run)
    N = 8
    assert est.block_parts == {
        "residual": N * (2 * 4 * 8 + 2 * 8),  # fp32 residual in and mid, LayerNorm mean+rstd per norm
        "norm outputs": N * 2 * 2 * 8,  # the bf16 copies of both norms' outputs
        "qkv": N * 2 * 6 * 4,  # (H + 2G) K in bf16
        "attention out": N * (2 * 2 * 4 + 4 * 2),  # output + fp32 log-sum-exp per head
        "ffn": N * 2 * 2 * 32,  # GELU's input and output
        "weight copies": 2 * SMALL.block_linear,
    }
    assert est.kernel_kind == "linear"


def test_naive_scores_and_sdpa_masks_grow_with_t_squared():
    run = RunShape(batch_size=2, seq_len=20, precision="32-true", attention="naive", batch_mode="packed")
    parts = estimate(SMALL, run).block_parts
    assert parts["attention scores"] == 2 * 2 * 20 * 20 * 4  # B·H·T²·s
    sdpa = estimate(SMALL, dataclasses.replace(run, attention="sdpa")).block_parts
    assert sdpa["attention mask"] == 2 * 20 * 32 * 4  # B·T·ceil16(T)·s, built per layer from the bool mask
    for kernel in ("auto", "xformers", "flex", "fa4", "fa4:grouped"):
        assert attention_memory_kind(kernel, "packed", "rope", None) == "linear"
    assert attention_memory_kind("sdpa", "padded", "learned", None) == "linear"
    assert attention_memory_kind("sdpa", "padded", "learned", 64) == "dense_mask"
    assert attention_memory_kind("sdpa", "padded", "alibi", None) == "dense_bias"


def test_peak_is_the_largest_moment_and_named_terms_add_up():
    run = RunShape(batch_size=2, seq_len=4, precision="bf16-mixed", attention="sdpa")
    est = estimate(SMALL, run)
    assert est.peak == max(est.phases.values()) == sum(est.terms.values())
    assert est.phases[est.phase] == est.peak
    # weights 4P, AdamW two fp32 states 8P, at every moment
    assert est.terms["weights"] == 4000 and est.terms["optimizer state"] == 8000
    assert est.dominant == max(est.terms, key=est.terms.get)
    # the forward holds the previous step's gradients (4P: Lightning zeroes them after training_step);
    # the loss's backward has freed them and adds dh (4·N·D) + dW (4·V·D)
    loss = est.phases["loss backward"] - est.phases["forward end"]
    assert loss == 4 * 8 * 8 + 4 * 10 * 8 - 8 * 4 * 8 - 4 * SMALL.params
    assert est.phases["forward end"] >= 4 * SMALL.params + est.terms["weights"] + est.terms["optimizer state"]


def test_checkpointing_keeps_only_block_inputs():
    dims = dataclasses.replace(SMALL, n_layers=4)
    run = RunShape(batch_size=64, seq_len=64, precision="bf16-mixed", attention="sdpa", batch_mode="padded")
    peaks = {
        m: estimate(dims, dataclasses.replace(run, activation_checkpointing=m)) for m in ("none", "selective", "full")
    }
    full_block = sum(peaks["none"].block_parts.values())
    N = 64 * 64
    assert peaks["full"].phases["forward end"] - peaks["none"].phases["forward end"] == 4 * (N * 4 * 8 - full_block)
    assert peaks["none"].peak > peaks["selective"].peak > peaks["full"].peak
    assert checkpointed_layers("selective", 5) == [0, 2, 4] and checkpointed_layers("full", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="activation_checkpointing='half'"):
        checkpointed_layers("half", 3)


def test_largest_batch_size_is_the_boundary():
    dims = config_dims(GPTConfig(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, ffn="gelu", max_seq_len=2048))
    run = RunShape(batch_size=1, seq_len=2048)
    cap = GPUS["h100"]
    b = largest_batch_size(dims, run, cap)
    assert b > 1
    assert estimate(dims, dataclasses.replace(run, batch_size=b)).peak <= HEADROOM * cap
    assert estimate(dims, dataclasses.replace(run, batch_size=b + 1)).peak > HEADROOM * cap
    assert largest_batch_size(dims, run, 2**20) == 0  # 1 MiB: not even the weights
    assert gpu_capacity("80GiB") == 80 * 2**30
    with pytest.raises(ValueError, match="unknown GPU 'b200'"):
        gpu_capacity("b200")


def test_dims_of_a_model_count_tied_weights_once():
    model = TinyGPT(vocab_size=50, d_model=16, n_layers=2, n_heads=2, ffn="gelu", tie_embeddings=True)
    dims = model_dims(model)
    assert dims.params == sum(p.numel() for p in model.parameters())
    assert storage_bytes(model.parameters()) == 4 * dims.params
    assert storage_bytes([model.lm_head.weight, model.tok_emb.weight]) == 4 * 50 * 16
    assert dims.ffn_hidden == 64 and dims.block_linear == 16 * 48 + 16 * 16 + (16 * 64 + 64) + (64 * 16 + 16)
    assert config_dims(model.config) == dims


def _saved_bytes(fn, exclude) -> int:
    """Bytes autograd saves for backward during ``fn()``, each storage once, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
@pytest.mark.parametrize("positions", ["none", "rope"])
def test_block_parts_match_what_autograd_saves(attention, ffn, positions):
    """float64 on CPU (s = r = 8): a block's saved tensors as the estimate lists them. CPU's SDPA
    runs its flash kernel here (no mask), which saves what the GPU's does."""
    B, T = 2, 32
    model = TinyGPT(
        vocab_size=50,
        d_model=32,
        n_layers=1,
        n_heads=4,
        max_seq_len=T,
        attention=attention,
        ffn=ffn,
        positions=positions,
    ).double()
    layout = DocLayout.full_rows(B, T)
    pos = layout.position_ids("cpu")
    ctx = model.kernel.prepare(
        layout,
        pos,
        None,
        n_heads=4,
        n_kv_heads=4,
        dtype=torch.float64,
        device=torch.device("cpu"),
        head_dim=8,
        layers=1,
        qkv_stacked=positions != "rope",
    )
    rope = model.rope_angles(pos) if positions == "rope" else None
    x = torch.randn(B, T, 32, dtype=torch.float64, requires_grad=True)
    measured = _saved_bytes(lambda: model.blocks[0](x, ctx, rope), list(model.parameters()) + list(rope or []))
    dims = model_dims(model)
    predicted = estimate(
        dims, RunShape(batch_size=B, seq_len=T, precision="64-true", attention=attention, batch_mode="padded")
    ).block_parts
    # float64 norm statistics and log-sum-exp (the estimate's are fp32): well under 2%
    assert measured == pytest.approx(sum(predicted.values()), rel=0.02)


def test_a_checkpointed_block_saves_only_its_input():
    model = TinyGPT(
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=16,
        attention="sdpa",
        positions="none",
        activation_checkpointing="full",
    ).double()
    ids = torch.randint(0, 50, (2, 16))
    plain = TinyGPT(
        vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, attention="sdpa", positions="none"
    ).double()
    kept = _saved_bytes(lambda: model(ids, hidden=True), list(model.parameters()))
    full = _saved_bytes(lambda: plain(ids, hidden=True), list(plain.parameters()))
    # each block keeps its input [B, T, D] (the first block's is the embedding output) instead of everything
    dims = model_dims(plain)
    per_block = sum(
        estimate(
            dims, RunShape(batch_size=2, seq_len=16, precision="64-true", attention="sdpa", batch_mode="padded")
        ).block_parts.values()
    )
    assert full - kept == pytest.approx(2 * (per_block - 2 * 16 * 32 * 8), rel=0.03)


def test_estimate_command_prints_a_table_and_json(capsys):
    assert cli.main(["estimate", "--config", "configs/gpt2_124m.yaml", "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "dominant: block activations" in out and "activation_checkpointing full" in out
    assert cli.main(["estimate", "--config", "configs/gpt2_124m.yaml", "--data.batch_size", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens_per_step"] == 8 * 2048 and result["peak_bytes"] == sum(result["terms_bytes"].values())
    assert cli.main(["estimate", "--config", "configs/gpt2_124m.yaml", "--model.arch.attention", "bogus"]) == 1
    assert "unknown attention kernel 'bogus'" in capsys.readouterr().err


GPU_RUNS = [
    "train_gpt2_124m_b32.json",
    "train_gpt2_124m_b16_machine_a.json",
    "train_gpt2_124m_eager_vs_compiled_200.json",
]


@pytest.mark.parametrize("name", GPU_RUNS)
def test_estimate_is_within_a_tenth_of_committed_h200_peaks(name):
    """The H200 benchmark runs of configs/gpt2_124m.yaml in docs/results/ (peak_mib: max_memory_allocated
    over the timed steps), eager and compiled: the estimate of the same shape is within 10%."""
    from pathlib import Path

    from lit_xf.estimate_cli import load_config, shapes_from_config

    root = Path(__file__).resolve().parents[1]
    rows = json.loads((root / "docs" / "results" / name).read_text())["rows"]
    for row in (r for r in rows if r["variant"] in ("lit_xf", "lit_xf+compile")):
        tokens = row["tokens_per_s"] * row["ms_per_step"] / 1e3
        batch = round(tokens / 2048)
        assert abs(tokens - batch * 2048) < 0.01 * tokens  # whole 2048-token rows
        overrides = [("data.batch_size", str(batch)), ("model.arch.attention", row["attention"])]
        dims, run = shapes_from_config(load_config([str(root / "configs" / "gpt2_124m.yaml")], overrides))
        ratio = estimate(dims, run).peak / (row["peak_mib"] * 2**20)
        assert 0.9 <= ratio <= 1.1, (name, row["variant"], batch, ratio)
