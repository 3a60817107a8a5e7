"""``lit_xf.attention.layout``: which (query, key) pairs attend and how many, checked against masks
written here (``attention_cases.block_causal_allowed``): ``DocLayout``'s dense mask, positions and
pair count, and the xformers bias objects it builds (they materialize on the CPU)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from attention_cases import (
    BIDIR_LAYOUTS,
    LAYOUTS,
    T,
    block_causal_allowed,
    layout_spec,
    one_cpu_thread,  # noqa: F401 -- autouse
    positions_in_doc,
    real_mask,
    windowed_allowed,
)

from lit_xf.attention import DocLayout, attended_pairs
from lit_xf.model import TinyGPT

WINDOW_LAYOUTS = ["causal", "padded", "packed", "mixed"]
WINDOWS = [1, 5, 16]  # 1: each token sees only itself; 16: shorter than some documents, longer than others


def test_layout_position_ids():
    for doc_lens in LAYOUTS.values():
        assert torch.equal(DocLayout(doc_lens, T).position_ids(), positions_in_doc(doc_lens, T))


@pytest.mark.parametrize("doc_lens", [[[49]], [[10, 0, 5]], [[]], [[20], [30, 19]]])
def test_doc_layout_rejects_bad_rows(doc_lens):
    with pytest.raises(ValueError, match="doc_lens row"):
        DocLayout(doc_lens, 48)


# --------------------------------------------------------------------------------------------
# Masks: DocLayout.dense_mask and the xformers bias objects (they work on CPU)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout_name", [*LAYOUTS, *BIDIR_LAYOUTS])
def test_dense_mask_on_real_tokens(layout_name):
    doc_lens, causal = layout_spec(layout_name)
    dense = DocLayout(doc_lens, T, causal).dense_mask()
    allowed = block_causal_allowed(doc_lens, T, causal)
    real = real_mask(doc_lens, T)
    for b in range(len(doc_lens)):
        rows = slice(b * T, (b + 1) * T)
        # Every real query sees exactly its document (its past, if causal); padding queries see at
        # least themselves, so no softmax row is empty.
        assert torch.equal(dense[b][real[b]], allowed[rows, rows][real[b]])
        assert dense[b].diagonal().all()


@pytest.mark.parametrize("layout_name", ["causal", "padded", "single", "bidir-full"])
def test_xformers_bias_for_rows_without_blocks(layout_name):
    """Causal rows of one document: ``LowerTriangularMask``; non-causal full rows: no bias at all."""
    fmha = pytest.importorskip("xformers.ops.fmha")
    doc_lens, causal = layout_spec(layout_name)
    bias = DocLayout(doc_lens, T, causal).xformers_bias()
    if not causal:
        assert bias is None
        return
    assert type(bias) is fmha.attn_bias.LowerTriangularMask
    m = bias.materialize((T, T))
    lower = torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.equal(torch.isfinite(m), lower)
    assert (m[lower] == 0).all()


@pytest.mark.parametrize("layout_name", ["packed", "mixed", "bidir-padded", "bidir-packed"])
def test_xformers_bias_for_packed_rows_is_block_diagonal(layout_name):
    """Rows flattened to ``[1, B·T]``: ``BlockDiagonalCausalMask`` (``BlockDiagonalMask`` when not
    causal) whose materialized mask is the block-diagonal mask built here, and per row the dense mask."""
    fmha = pytest.importorskip("xformers.ops.fmha")
    doc_lens, causal = layout_spec(layout_name)
    B = len(doc_lens)
    layout = DocLayout(doc_lens, T, causal)
    bias = layout.xformers_bias()
    want_type = fmha.attn_bias.BlockDiagonalCausalMask if causal else fmha.attn_bias.BlockDiagonalMask
    assert type(bias) is want_type
    m = bias.materialize((B * T, B * T))
    allowed = block_causal_allowed(doc_lens, T, causal)
    assert torch.equal(torch.isfinite(m), allowed)
    assert (m[allowed] == 0).all()
    dense = layout.dense_mask()
    for b in range(B):
        rows = slice(b * T, (b + 1) * T)
        assert torch.equal(allowed[rows, rows], dense[b])


# --------------------------------------------------------------------------------------------
# Sliding windows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [*WINDOWS, None])
@pytest.mark.parametrize("layout_name", WINDOW_LAYOUTS)
def test_window_dense_mask_on_real_tokens(layout_name, window):
    doc_lens, _ = layout_spec(layout_name)
    layout = DocLayout(doc_lens, T, window=window)
    dense, real = layout.dense_mask(), real_mask(doc_lens, T)
    allowed = windowed_allowed(doc_lens, T, window or T + 1)
    for b in range(len(doc_lens)):
        rows = slice(b * T, (b + 1) * T)
        assert torch.equal(dense[b][real[b]], allowed[rows, rows][real[b]])
        assert dense[b].diagonal().all()
    longest_doc = max(n for row in doc_lens for n in row)
    assert layout.windowed == (window is not None and window < longest_doc)


@pytest.mark.parametrize("window", [0, -3, 2.5, True, "8"])
def test_window_must_be_a_positive_int(window):
    with pytest.raises(ValueError, match="attention_window must be a positive number"):
        DocLayout([[T]], T, window=window)
    with pytest.raises(ValueError, match="attention_window must be a positive number"):
        TinyGPT(attention_window=window)


def test_window_needs_causal_attention():
    with pytest.raises(ValueError, match="needs causal attention"):
        DocLayout([[T]], T, causal=False, window=4)


@pytest.mark.parametrize("window", [None, *WINDOWS])
@pytest.mark.parametrize("layout_name", WINDOW_LAYOUTS)
def test_window_xformers_bias_is_local_and_matches_the_dense_mask(layout_name, window):
    """The local forms of xformers' masks (materialized here, no kernel run) allow exactly the
    windowed block-diagonal causal pairs over the flattened rows, or per row for rows without blocks."""
    pytest.importorskip("xformers.ops.fmha")
    doc_lens, _ = layout_spec(layout_name)
    layout = DocLayout(doc_lens, T, window=window)
    bias, B = layout.xformers_bias(), len(doc_lens)
    if layout.block_diagonal:
        allowed = torch.isfinite(bias.materialize((B * T, B * T)))
        assert torch.equal(allowed, windowed_allowed(doc_lens, T, window or T + 1))
    else:
        allowed = torch.isfinite(bias.materialize((T, T)))
        for b in range(B):
            assert torch.equal(allowed, layout.dense_mask()[b])


# --------------------------------------------------------------------------------------------
# How many pairs attend
# --------------------------------------------------------------------------------------------


PAIR_CASES = [(lay, w) for lay in WINDOW_LAYOUTS for w in (None, *WINDOWS)] + [(lay, None) for lay in BIDIR_LAYOUTS]


@pytest.mark.parametrize("layout_name,window", PAIR_CASES)
def test_attended_pairs_count_the_dense_masks_real_pairs(layout_name, window):
    """``DocLayout.attended_pairs()`` (the FLOP count's and the collate's number) equals the pairs of
    real queries and keys the dense mask allows: n(n+1)/2 per causal document, Σ min(i + 1, W) with a
    window, n² without causality."""
    doc_lens, causal = layout_spec(layout_name)
    layout = DocLayout(doc_lens, T, causal, window)
    real = real_mask(doc_lens, T)
    want = int((layout.dense_mask() & real[:, :, None] & real[:, None, :]).sum())
    assert layout.attended_pairs() == want
    for n in (n for row in doc_lens for n in row):
        brute = sum(min(i + 1, window or n) for i in range(n)) if causal else n * n
        assert attended_pairs(n, window, causal) == brute and isinstance(attended_pairs(n, window, causal), int)


def test_attended_pairs_of_an_array_of_lengths():
    """The collate counts its documents' pairs in one numpy call, elementwise as for ints."""
    lens = np.array([1, 4, 9, 16, 100])
    for window in (None, 1, 8, 200):
        got = attended_pairs(lens, window)
        assert got.tolist() == [attended_pairs(int(n), window) for n in lens]


def test_importing_the_layout_leaves_xformers_and_flash_attn_unloaded():
    """The data side imports ``lit_xf.attention.layout`` (in loader workers too): it must not load
    xformers or FlashAttention-4."""
    code = (
        "import sys\n"
        "import lit_xf.attention.layout\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('xformers', 'flash_attn', 'cutlass'))\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]
