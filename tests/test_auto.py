"""``auto``: which kernel it picks per device and batch (its orders, their coverage, the log of
each new choice) and that the model hands it the batch's shape. Kernels are stood in for where a
GPU would be needed."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch
from attention_cases import T

from lit_xf import attention as attn
from lit_xf.attention import AUTO_PREFERENCE, KERNEL_NAMES, DocLayout, make_kernel
from lit_xf.model import TinyGPT

CONCRETE_KERNELS = {"naive", "sdpa", "xformers", "flex", "fa4"}


def test_auto_on_cpu_picks_sdpa_and_logs_once(caplog):
    caplog.set_level(logging.INFO, logger="lit_xf.attention")
    auto = make_kernel("auto")
    layout = DocLayout([[10]], 10)
    for _ in range(3):
        ctx = auto.prepare(
            layout, layout.position_ids(), None, n_heads=4, n_kv_heads=4, dtype=torch.float32, device="cpu"
        )
        assert ctx.kernel.name == "sdpa" and auto.last_choice == "sdpa"
    msgs = [r.getMessage() for r in caplog.records if "attention=auto" in r.getMessage()]
    assert len(msgs) == 1
    assert "'sdpa'" in msgs[0] and "cpu" in msgs[0]
    packed = DocLayout([[4, 6]], 10)
    for _ in range(2):
        auto.prepare(packed, packed.position_ids(), None, n_heads=4, n_kv_heads=4, dtype=torch.float32, device="cpu")
    msgs = [r.getMessage() for r in caplog.records if "attention=auto" in r.getMessage()]
    assert len(msgs) == 2 and "packed" in msgs[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU auto picks per AUTO_PREFERENCE")
def test_auto_model_on_cpu_reports_sdpa():
    model = TinyGPT(vocab_size=16, d_model=16, n_layers=1, n_heads=2, max_seq_len=8, attention="auto")
    model(torch.randint(0, 16, (1, 8)))
    assert model.attention_kernel_name == "sdpa"


def test_auto_preference_covers_every_case_with_concrete_kernels():
    assert set(AUTO_PREFERENCE) == set(itertools.product([False, True], repeat=3))
    auto = make_kernel("auto")
    for case, order in AUTO_PREFERENCE.items():
        assert order, case
        assert len(set(order)) == len(order), case
        assert set(order) <= CONCRETE_KERNELS and set(order) <= set(KERNEL_NAMES), case
        assert set(order) <= set(auto._kernels), f"{case}: auto can't build {set(order) - set(auto._kernels)}"


def test_auto_on_cuda_follows_preference_order(monkeypatch):
    """With every kernel pretending to support everything, CUDA picks each case's first choice; with
    the first refusing, the second."""
    auto = make_kernel("auto")
    refuse: set[str] = set()
    for name, kernel in auto._kernels.items():
        monkeypatch.setattr(kernel, "support", lambda n=name, **config: "nope" if n in refuse else None)
    for (packed, alibi, gqa), order in AUTO_PREFERENCE.items():
        config = dict(device="cuda", n_heads=8, n_kv_heads=2 if gqa else 8, alibi=alibi, training=True, packed=packed)
        refuse.clear()
        assert auto.choose(**config) == order[0]
        refuse.add(order[0])
        assert auto.choose(**config) == order[1]


def test_auto_prefers_fa4_for_long_rows_and_large_batches_of_small_heads(monkeypatch):
    """MHA rows of one document: fa4 first from 8192 tokens per row, or with heads of <= 64 dims from
    2048-token rows in batches of >= 32768 tokens (the cases measured faster on fa4); everything else,
    and GQA, ALiBi and packed rows, keep AUTO_PREFERENCE; CPU is always sdpa."""
    fa4_first = [(1, 8192, 128), (2, 8192, None), (16, 2048, 64), (32, 1024 * 2, 32), (8, 4096, 64)]
    sdpa_first = [(1, 8191, 128), (16, 2048, 128), (256, 2048, 128), (8, 2048, 64), (32, 1024, 64), (16, 2048, None)]
    for B, T_, K in fa4_first:
        assert attn.fa4_leads_rows(T_, B, K), (B, T_, K)
        order = attn.auto_order("cuda", packed=False, alibi=False, gqa=False, seq_len=T_, batch_size=B, head_dim=K)
        assert order[0] == "fa4"
    for B, T_, K in sdpa_first:
        assert not attn.fa4_leads_rows(T_, B, K), (B, T_, K)
        order = attn.auto_order("cuda", packed=False, alibi=False, gqa=False, seq_len=T_, batch_size=B, head_dim=K)
        assert order == AUTO_PREFERENCE[(False, False, False)]
    for packed, alibi, gqa in itertools.product([False, True], repeat=3):
        order = attn.auto_order("cuda", packed=packed, alibi=alibi, gqa=gqa, seq_len=8192, batch_size=16, head_dim=64)
        assert sorted(order) == sorted(AUTO_PREFERENCE[(packed, alibi, gqa)])
        if packed or alibi or gqa:
            assert order == AUTO_PREFERENCE[(packed, alibi, gqa)]
    assert attn.auto_order("cpu", packed=False, alibi=False, gqa=False, seq_len=8192, batch_size=16) == ("sdpa",)
    auto = make_kernel("auto")
    for kernel in auto._kernels.values():
        monkeypatch.setattr(kernel, "support", lambda **config: None)
    config = dict(device="cuda", n_heads=8, n_kv_heads=8, alibi=False, training=True, packed=False, seq_len=2048)
    assert auto.choose(**config, batch_size=16, head_dim=64) == "fa4"
    assert auto.choose(**config, batch_size=8, head_dim=64) == "sdpa"
    assert auto.choose(**config, batch_size=16, head_dim=128) == "sdpa"
    # the model hands prepare its batch size and head size
    seen = []
    monkeypatch.setattr(auto, "choose", lambda **kw: seen.append((kw["batch_size"], kw["head_dim"])) or "sdpa")
    model = TinyGPT(vocab_size=32, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, attention="auto")
    model.kernel = auto
    model(torch.zeros(3, 16, dtype=torch.long))
    assert seen == [(3, 16)]


def test_auto_puts_native_windows_first_on_cuda():
    for packed, gqa in itertools.product([False, True], repeat=2):
        order = attn.auto_order("cuda", packed=packed, alibi=False, gqa=gqa, seq_len=T, windowed=True)
        assert order == ("fa4", "xformers", "flex", "sdpa")
        alibi = attn.auto_order("cuda", packed=packed, alibi=True, gqa=gqa, seq_len=T, windowed=True)
        assert alibi[0] == "flex" and alibi[-1] == "sdpa"
    assert attn.auto_order("cpu", packed=True, alibi=False, gqa=False, seq_len=T, windowed=True) == ("sdpa",)
