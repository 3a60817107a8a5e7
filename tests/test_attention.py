"""Attention kernels, masks and positions checked against references written here, independently of
``lit_xf``'s own mask helpers.

The reference (``reference_attention``) loops over rows and documents in float64: for query i and
key j of one document (offsets measured inside the document) and query head h,

    out_i = Σ_{j ≤ i} softmax_j( q_i·k_j / √K − m_h·(i − j) ) v_j,   kv head = h // (H / G),

with m_h = 0 without ALiBi; non-causal layouts (``DocLayout(..., causal=False)``) drop j ≤ i and keep
attention inside the document. Padding positions are left out (their outputs are zero in the reference
and never compared; losses only cover real tokens).
"""

from __future__ import annotations

import itertools
import logging
import math
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from lit_xf import attention as attn
from lit_xf.attention import (
    AUTO_PREFERENCE,
    KERNEL_NAMES,
    XFORMERS_DENSE_BIAS_BUDGET_BYTES,
    DocLayout,
    XformersAttention,
    alibi_slopes,
    dense_bias_bytes,
    make_kernel,
)
from lit_xf.model import TinyGPT, rope_rotate

CONCRETE_KERNELS = {"naive", "sdpa", "xformers", "flex", "fa4"}
T = 48
# Document lengths per row; tokens after a row's documents are padding.
LAYOUTS = {
    "causal": [[T], [T]],  # one document filling each row
    "padded": [[T - 7], [19]],  # one shorter document per row
    "packed": [[1, 12, 1, 20, 5], [7, 1, 30, 1]],  # length-1 documents, trailing padding
    "single": [[T]],  # batch of one, a single document filling the row
    "mixed": [[5, 1, 42], [T]],  # a packed row without padding beside a full single-document row
}
# Non-causal (bidirectional inside each document; padding must stay invisible to real tokens).
BIDIR_LAYOUTS = {"bidir-full": LAYOUTS["causal"], "bidir-padded": LAYOUTS["padded"], "bidir-packed": LAYOUTS["packed"]}


def layout_spec(name: str) -> tuple[list[list[int]], bool]:
    """``(doc_lens, causal)`` of a named layout."""
    return (LAYOUTS[name], True) if name in LAYOUTS else (BIDIR_LAYOUTS[name], False)


KV = {"mqa": lambda h: 1, "gqa": lambda h: 2, "mha": lambda h: h}
HEADS_POSITIONS = [(4, "none"), (4, "alibi"), (6, "alibi")]  # 6: a non-power-of-two head count
CPU_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """These tensors are tiny: intra-op threads only add synchronization (40x slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------
def paper_slopes(n: int) -> list[float]:
    """ALiBi slopes as built in Press et al.'s code: 2^(−8h/n) for n a power of two; otherwise the
    slopes of the closest smaller power of two p, then the odd-indexed slopes of 2p, 2^(−4(2i+1)/p)."""
    p = 1 << (n.bit_length() - 1)
    first = [2.0 ** (-8.0 * h / p) for h in range(1, p + 1)]
    extra = [2.0 ** (-4.0 * (2 * i + 1) / p) for i in range(n - p)]
    return first + extra


def reference_attention(
    q_BTHK, k_BTGK, v_BTGK, doc_lens, slopes=None, causal: bool = True, window: int | None = None
) -> torch.Tensor:
    """float64 attention, one document at a time (see the module docstring), keys i − j < ``window``
    only when given. Zero at padding."""
    q, k, v = (x.double() for x in (q_BTHK, k_BTGK, v_BTGK))
    B, T_, H, K = q.shape
    G = k.shape[2]
    kv_of_head = torch.arange(H, device=q.device) // (H // G)
    m_H = torch.tensor(slopes if slopes is not None else [0.0] * H, dtype=torch.float64, device=q.device)
    rows = []
    for b, row in enumerate(doc_lens):
        pieces, start = [], 0
        for L in row:
            idx = torch.arange(L, device=q.device)
            dist_LL = (idx[:, None] - idx[None, :]).double()  # i − j inside the document
            doc = slice(start, start + L)
            q_LHK, k_LHK, v_LHK = q[b, doc], k[b, doc][:, kv_of_head], v[b, doc][:, kv_of_head]
            scores_HLL = torch.einsum("ihk,jhk->hij", q_LHK, k_LHK) / math.sqrt(K) - m_H[:, None, None] * dist_LL
            if causal:
                scores_HLL = scores_HLL.masked_fill(idx[None, :] > idx[:, None], float("-inf"))
            if window is not None:
                scores_HLL = scores_HLL.masked_fill(dist_LL >= window, float("-inf"))
            pieces.append(torch.einsum("hij,jhk->ihk", scores_HLL.softmax(-1), v_LHK))
            start += L
        pieces.append(q.new_zeros(T_ - start, H, K))
        rows.append(torch.cat(pieces))
    return torch.stack(rows)


def real_mask(doc_lens, seq_len, device=None) -> torch.Tensor:
    """``[B, T]`` bool, True at tokens inside a document."""
    mask = torch.zeros(len(doc_lens), seq_len, dtype=torch.bool, device=device)
    for b, row in enumerate(doc_lens):
        mask[b, : sum(row)] = True
    return mask


def positions_in_doc(doc_lens, seq_len) -> torch.Tensor:
    """``[B, T]`` position inside each token's document; padding continues the last document."""
    out = torch.zeros(len(doc_lens), seq_len, dtype=torch.long)
    for b, row in enumerate(doc_lens):
        start = 0
        for n, L in enumerate(row):
            end = seq_len if n == len(row) - 1 else start + L
            out[b, start:end] = torch.arange(end - start)
            start += L
    return out


def block_causal_allowed(doc_lens, seq_len, causal: bool = True) -> torch.Tensor:
    """``[B·T, B·T]`` bool over the flattened rows: key j visible to query i iff both lie in the same
    block (a document, or a row's trailing padding as one block) and (if causal) j ≤ i."""
    block_of, n_blocks = [], 0
    for row in doc_lens:
        for L in list(row) + ([seq_len - sum(row)] if sum(row) < seq_len else []):
            block_of += [n_blocks] * L
            n_blocks += 1
    block = torch.tensor(block_of)
    pos = torch.arange(len(block_of))
    same = block[:, None] == block[None, :]
    return same & (pos[None, :] <= pos[:, None]) if causal else same


def case_generator(request) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def random_qkv(gen, B, T_, H, G, K, dtype, device="cpu"):
    shapes = ((B, T_, H, K), (B, T_, G, K), (B, T_, G, K))
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes]


def run_kernel(name, doc_lens, q, k, v, slopes, *, grad: bool, causal: bool = True, stacked: bool = False, window=None):
    """Kernel output and (if ``grad``) the gradients of Σ out·dout over real tokens; and the same for
    the float64 reference on the same (rounded) inputs. ``stacked``: q, k, v go in as one
    ``[B, T, H + 2G, K]`` stack (``attend_qkv``, the model's call), its gradient split for the check."""
    B, T_, H, _ = q.shape
    G = k.shape[2]
    layout = DocLayout(doc_lens, T_, causal, window)
    real = real_mask(doc_lens, T_, q.device)[:, :, None, None]
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * real.cpu()

    kernel = attn.make_kernel(name)  # a kernel name, or an fa4 plan ("fa4:grouped")
    leaves = [x.detach().requires_grad_(grad) for x in (q, k, v)]
    qkv = torch.cat((q, k, v), dim=2).detach().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        ctx = kernel.prepare(
            layout, layout.position_ids(q.device), slopes, n_heads=H, n_kv_heads=G, dtype=q.dtype, device=q.device
        )
        out = ctx.kernel.attend_qkv(qkv, G, ctx) if stacked else kernel(*leaves, ctx)
        if grad:
            (out * dout.to(q.device, q.dtype)).sum().backward()
    if stacked and grad:
        for leaf, g in zip(leaves, qkv.grad.split((H, G, G), dim=2), strict=True):
            leaf.grad = g

    ref_leaves = [x.detach().cpu().double().requires_grad_(grad) for x in (q, k, v)]
    ref_slopes = paper_slopes(H) if slopes is not None else None
    with torch.set_grad_enabled(grad):
        ref = reference_attention(*ref_leaves, doc_lens, ref_slopes, causal, window)
        if grad:
            (ref * dout).sum().backward()
    got = [out.detach()] + ([x.grad for x in leaves] if grad else [])
    want = [ref.detach()] + ([x.grad for x in ref_leaves] if grad else [])
    return got, want, real.cpu()


def assert_matches(got, want, real, tol):
    out, ref = got[0].cpu().double(), want[0]
    assert torch.isfinite(got[0]).all(), "non-finite output (padding included)"
    mask = real.expand_as(ref)
    torch.testing.assert_close(out[mask], ref[mask], atol=tol, rtol=tol, msg=lambda m: f"output: {m}")
    for name, g, r in zip("qkv"[: len(got) - 1], got[1:], want[1:], strict=True):
        assert g is not None, f"no gradient for {name}"
        torch.testing.assert_close(g.cpu().double(), r, atol=tol, rtol=tol, msg=lambda m, n=name: f"d{n}: {m}")


# --------------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------------
def test_reference_by_hand():
    """Length-1 documents return their value vector; a 2-token document matches scalar arithmetic."""
    gen = torch.Generator().manual_seed(0)
    H, G, K = 4, 2, 3
    q, k, v = random_qkv(gen, 1, 4, H, G, K, torch.float64)
    slopes = [0.5, 0.25, 0.125, 0.0625]
    out = reference_attention(q, k, v, [[1, 2, 1]], slopes)
    for h in range(H):
        g = h // 2
        torch.testing.assert_close(out[0, 0, h], v[0, 0, g])
        torch.testing.assert_close(out[0, 3, h], v[0, 3, g])
        torch.testing.assert_close(out[0, 1, h], v[0, 1, g])  # first token of the second document
        s0 = float(q[0, 2, h] @ k[0, 1, g]) / math.sqrt(K) - slopes[h] * 1
        s1 = float(q[0, 2, h] @ k[0, 2, g]) / math.sqrt(K)
        w0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
        torch.testing.assert_close(out[0, 2, h], w0 * v[0, 1, g] + (1 - w0) * v[0, 2, g])
    # Non-causal: the first token of a document sees the later one too.
    bidir = reference_attention(q, k, v, [[1, 2, 1]], causal=False)
    for h in range(H):
        g = h // 2
        s0 = float(q[0, 1, h] @ k[0, 1, g]) / math.sqrt(K)
        s1 = float(q[0, 1, h] @ k[0, 2, g]) / math.sqrt(K)
        w0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
        torch.testing.assert_close(bidir[0, 1, h], w0 * v[0, 1, g] + (1 - w0) * v[0, 2, g])
        torch.testing.assert_close(bidir[0, 3, h], v[0, 3, g])


# --------------------------------------------------------------------------------------------
# Kernels vs the reference (CPU)
# --------------------------------------------------------------------------------------------
# (layout, kv heads, (heads, positions)). Non-causal layouts run without ALiBi: the kernels' bias
# −m·(pos_i − pos_j) turns into a reward growing with distance for future keys, not a bidirectional
# ALiBi worth pinning down in a test.
CPU_CASES = [(layout, kv, hp) for layout in LAYOUTS for kv in KV for hp in HEADS_POSITIONS] + [
    (layout, kv, (4, "none")) for layout in BIDIR_LAYOUTS for kv in KV
]
CASE_IDS = [f"{lay}-{kv}-{p}{h}" for lay, kv, (h, p) in CPU_CASES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout_name,kv,heads_positions", CPU_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("kernel_name", ["naive", "sdpa"])
def test_kernel_matches_reference(request, kernel_name, layout_name, kv, heads_positions, dtype):
    doc_lens, causal = layout_spec(layout_name)
    H, positions = heads_positions
    q, k, v = random_qkv(case_generator(request), len(doc_lens), T, H, KV[kv](H), 8, dtype)
    slopes = alibi_slopes(H) if positions == "alibi" else None
    got, want, real = run_kernel(kernel_name, doc_lens, q, k, v, slopes, grad=True, causal=causal)
    assert_matches(got, want, real, CPU_TOL[dtype])


# Eager FlexAttention on CPU traces every new shape / score_mod / mask (~0.3 s each): float32 on a few.
FLEX_CASES = [(*case, torch.float64) for case in CPU_CASES] + [
    ("packed", kv, hp, torch.float32) for kv, hp in [("mqa", (4, "none")), ("gqa", (6, "alibi")), ("mha", (4, "alibi"))]
]


@pytest.mark.parametrize(
    "layout_name,kv,heads_positions,dtype",
    FLEX_CASES,
    ids=[f"{lay}-{kv}-{p}{h}-{str(dt)[6:]}" for lay, kv, (h, p), dt in FLEX_CASES],
)
def test_flex_forward_matches_reference(request, layout_name, kv, heads_positions, dtype):
    """FlexAttention has no backward on CPU: forward only, eager."""
    doc_lens, causal = layout_spec(layout_name)
    H, positions = heads_positions
    q, k, v = random_qkv(case_generator(request), len(doc_lens), T, H, KV[kv](H), 8, dtype)
    slopes = alibi_slopes(H) if positions == "alibi" else None
    got, want, real = run_kernel("flex", doc_lens, q, k, v, slopes, grad=False, causal=causal)
    assert_matches(got, want, real, CPU_TOL[dtype])


def test_custom_position_ids_drive_alibi():
    """ALiBi distances come from ``position_ids``: shifting every position by a constant changes
    nothing, while positions that don't restart per document are not what the reference computes
    (so the kernel really reads them)."""
    gen = torch.Generator().manual_seed(5)
    doc_lens = [[10, 14]]
    layout = DocLayout(doc_lens, 24)
    q, k, v = random_qkv(gen, 1, 24, 4, 4, 8, torch.float64)
    kernel = make_kernel("naive")

    def attend(pos):
        ctx = kernel.prepare(layout, pos, alibi_slopes(4), n_heads=4, n_kv_heads=4, dtype=q.dtype, device="cpu")
        return kernel(q, k, v, ctx)

    base = attend(layout.position_ids())
    torch.testing.assert_close(attend(layout.position_ids() + 7), base, atol=1e-12, rtol=0)
    ref = reference_attention(q, k, v, doc_lens, paper_slopes(4))
    torch.testing.assert_close(base, ref, atol=1e-10, rtol=1e-10)
    # A scaled position ramp changes ALiBi distances, hence the output.
    assert not torch.allclose(attend(2 * layout.position_ids()), base, atol=1e-6)


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------
def complex_rope(x_BTHK: torch.Tensor, pos_BT: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate the pairs (x_i, x_{i+K/2}) as complex numbers z_i = x_i + i·x_{i+K/2} by pos·θ_i,
    θ_i = base^(−2i/K)."""
    K = x_BTHK.shape[-1]
    theta = base ** (-torch.arange(K // 2, dtype=torch.float64) * 2 / K)
    z = torch.complex(x_BTHK[..., : K // 2].double(), x_BTHK[..., K // 2 :].double())
    z = z * torch.polar(torch.ones_like(theta), pos_BT[..., None, None].double() * theta)
    return torch.cat((z.real, z.imag), dim=-1)


def rope_tables(pos_BT: torch.Tensor, K: int, base: float = 10000.0):
    """cos/sin ``[B, T, 1, K]`` in ``rope_rotate``'s layout (the K/2 angles repeated twice)."""
    theta = base ** (-torch.arange(0, K, 2, dtype=torch.float64) / K)
    ang = pos_BT[..., None].double() * theta
    ang = torch.cat((ang, ang), dim=-1)[:, :, None, :]
    return ang.cos(), ang.sin()


def test_rope_rotate_matches_complex_multiplication():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 3, 16, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, 500, (2, 11), generator=gen)
    got = rope_rotate(x, *rope_tables(pos, 16))
    torch.testing.assert_close(got, complex_rope(x, pos), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths


def test_rope_scores_depend_only_on_position_difference():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, 32, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 32, generator=gen, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        qm = rope_rotate(q, *rope_tables(torch.tensor([[m]]), 32))
        kn = rope_rotate(k, *rope_tables(torch.tensor([[n]]), 32))
        return float((qm * kn).sum())

    for m, n in [(5, 2), (0, 0), (3, 9), (40, 1)]:
        for shift in (1, 17, 1000):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-9)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-6)


def test_packed_tinygpt_restarts_rope_positions_per_document(monkeypatch):
    """The cos/sin tables a packed forward hands to ``rope_rotate`` use positions inside each
    document (padding continues counting)."""
    doc_lens, T_, K = [[3, 1, 9, 4], [16]], 20, 8
    model = TinyGPT(
        vocab_size=32, d_model=32, n_layers=1, n_heads=4, max_seq_len=T_, attention="sdpa", positions="rope"
    ).double()
    seen = []

    def spy(x, cos, sin):
        seen.append((cos, sin))
        return rope_rotate(x, cos, sin)

    monkeypatch.setattr("lit_xf.model.rope_rotate", spy)
    model(torch.randint(0, 32, (2, T_)), doc_lens=doc_lens)
    assert len(seen) == 2  # q and k
    cos, sin = rope_tables(positions_in_doc(doc_lens, T_), K)
    for c, s in seen:
        torch.testing.assert_close(c.double(), cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(s.double(), sin, atol=1e-6, rtol=0)


def test_layout_position_ids():
    for doc_lens in LAYOUTS.values():
        assert torch.equal(DocLayout(doc_lens, T).position_ids(), positions_in_doc(doc_lens, T))


# --------------------------------------------------------------------------------------------
# ALiBi slopes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 32])
def test_alibi_slopes_powers_of_two(n):
    expected = torch.tensor([2.0 ** (-8.0 * h / n) for h in range(1, n + 1)], dtype=torch.float64)
    torch.testing.assert_close(alibi_slopes(n).double(), expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize(
    "n,exponents",
    [
        # 2^(−e) for e in: the slopes of the closest smaller power of two, then every other slope of
        # twice that power.
        (5, [2, 4, 6, 8, 1]),
        (6, [2, 4, 6, 8, 1, 3]),
        (12, [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]),
    ],
)
def test_alibi_slopes_non_powers_of_two(n, exponents):
    expected = torch.tensor([2.0**-e for e in exponents], dtype=torch.float64)
    torch.testing.assert_close(alibi_slopes(n).double(), expected, rtol=1e-7, atol=0)
    torch.testing.assert_close(torch.tensor(paper_slopes(n), dtype=torch.float64), expected)


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


def test_xformers_alibi_bias_is_aligned_and_correct():
    """The dense ALiBi bias xformers gets: ``[B, H, T, T]`` with stride(−2) a multiple of 8 (T = 13
    isn't), −m_h·(i − j) inside each document, −inf elsewhere."""
    doc_lens, T_, H = [[5, 1, 4], [13]], 13, 3
    layout = DocLayout(doc_lens, T_)
    ctx = XformersAttention().prepare(
        layout, layout.position_ids(), alibi_slopes(H), n_heads=H, n_kv_heads=H, dtype=torch.float32, device="cpu"
    )
    bias = ctx.bias
    assert bias.shape == (2, H, T_, T_)
    assert bias.stride(-2) % 8 == 0
    slopes = paper_slopes(H)
    real = real_mask(doc_lens, T_)
    allowed = block_causal_allowed(doc_lens, T_)
    for b in range(2):
        rows = slice(b * T_, (b + 1) * T_)
        pos = positions_in_doc(doc_lens, T_)[b].double()
        for h in range(H):
            want = (-slopes[h] * (pos[:, None] - pos[None, :])).masked_fill(~allowed[rows, rows], float("-inf"))
            torch.testing.assert_close(bias[b, h][real[b]].double(), want[real[b]])
            assert torch.isfinite(bias[b, h]).any(dim=-1).all()  # no query row is fully masked


# --------------------------------------------------------------------------------------------
# No leakage across documents: a packed forward equals each document alone
# --------------------------------------------------------------------------------------------
LEAK_LAYOUTS = {"packed": [[1, 9, 14, 1, 6], [20, 3]], "padded": [[31], [12]]}
LEAK_CASES = [
    (kernel, layout, positions)
    for kernel in ("naive", "sdpa", "auto")
    for layout in LEAK_LAYOUTS
    for positions in ("learned", "rope", "alibi", "none")
] + [("flex", "packed", "rope"), ("flex", "packed", "alibi")]  # eager flex traces each new length


@pytest.mark.parametrize("kernel_name,layout_name,positions", LEAK_CASES, ids=["-".join(c) for c in LEAK_CASES])
def test_packed_forward_equals_documents_alone(kernel_name, layout_name, positions):
    T_, layout = 32, LEAK_LAYOUTS[layout_name]
    torch.manual_seed(0)
    model = (
        TinyGPT(
            vocab_size=64,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            max_seq_len=T_,
            attention=kernel_name,
            positions=positions,
        )
        .double()
        .eval()
    )
    ids = torch.randint(0, 64, (len(layout), T_))
    with torch.no_grad():
        packed = model(ids, doc_lens=layout)
        assert torch.isfinite(packed).all()
        for b, row in enumerate(layout):
            start = 0
            for L in row:
                alone = model(ids[b : b + 1, start : start + L])
                torch.testing.assert_close(packed[b, start : start + L], alone[0], atol=1e-10, rtol=1e-10)
                start += L


@pytest.mark.parametrize("positions", ["learned", "rope", "alibi"])
def test_positions_that_do_not_restart(positions):
    """Feeding a later document absolute row positions changes it with learned embeddings; RoPE and
    ALiBi only see position differences inside a document, so for them the offset cancels."""
    torch.manual_seed(0)
    model = TinyGPT(
        vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=16, attention="sdpa", positions=positions
    ).double()
    ids = torch.randint(0, 64, (1, 16))
    doc_lens = [[6, 10]]
    with torch.no_grad():
        restart = model(ids, doc_lens=doc_lens)
        absolute = model(ids, position_ids=torch.arange(16)[None], doc_lens=doc_lens)
    torch.testing.assert_close(restart[:, :6], absolute[:, :6])
    if positions == "learned":
        assert not torch.allclose(restart[:, 6:], absolute[:, 6:], atol=1e-6)
    else:
        torch.testing.assert_close(restart[:, 6:], absolute[:, 6:], atol=1e-10, rtol=1e-10)


def test_packed_forward_float32_sdpa_with_grad():
    """The training path (grad on, float32, MQA, ALiBi) keeps documents apart too: a document's
    logits match it run alone, and its loss has no gradient on other documents' embeddings."""
    torch.manual_seed(0)
    model = TinyGPT(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        max_seq_len=24,
        attention="sdpa",
        positions="alibi",
    )
    ids = torch.randint(0, 64, (1, 24))
    emb = {}

    def keep(module, inputs, out):
        out.retain_grad()
        emb["x"] = out

    hook = model.tok_emb.register_forward_hook(keep)
    logits = model(ids, doc_lens=[[8, 10]])
    hook.remove()
    logits[:, 8:18].sum().backward()
    grad = emb["x"].grad
    assert (grad[:, :8] == 0).all() and (grad[:, 18:] == 0).all()
    assert grad[:, 8:18].abs().sum() > 0
    torch.testing.assert_close(logits[:, 8:18], model(ids[:, 8:18]), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Configuration-time errors
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_xformers_on_cpu_is_refused_at_construction():
    with pytest.raises(ValueError, match="xformers") as err:
        TinyGPT(attention="xformers")
    msg = str(err.value)
    assert "CUDA" in msg
    assert "Kernels that can: naive, sdpa, flex" in msg


def test_flex_training_on_cpu_is_refused():
    flex = make_kernel("flex")
    with pytest.raises(ValueError, match="flex") as err:
        flex.check(device="cpu", n_heads=8, n_kv_heads=8, alibi=False, training=True)
    assert "no backward on CPU" in str(err.value)
    assert "naive, sdpa" in str(err.value)
    flex.check(device="cpu", n_heads=8, n_kv_heads=8, alibi=False, training=False)  # inference is fine


def test_flex_backward_on_cpu_really_raises():
    """The refusal above mirrors torch: if this starts passing, the support table can be relaxed."""
    layout = DocLayout([[6]], 6)
    q = torch.randn(1, 6, 2, 8, requires_grad=True)
    flex = make_kernel("flex")
    ctx = flex.prepare(layout, layout.position_ids(), None, n_heads=2, n_kv_heads=2, dtype=q.dtype, device="cpu")
    with pytest.raises(NotImplementedError):
        flex(q, q, q, ctx).sum().backward()


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(d_model=30, n_heads=8), r"n_heads=8 must divide d_model=30 \(e.g. n_heads=6\)"),
        (dict(n_heads=8, n_kv_heads=3), r"n_kv_heads=3 must divide n_heads=8 \(divisors: \[1, 2, 4, 8\]\)"),
        (dict(attention="fast"), r"unknown attention kernel 'fast'; choose one of auto, naive, sdpa, xformers, flex"),
        (dict(positions="sinusoidal"), r"unknown positions 'sinusoidal'; choose one of learned, rope, alibi, none"),
        (dict(ffn="relu"), r"unknown ffn 'relu'; choose one of swiglu, gelu"),
        (dict(norm="batchnorm"), r"unknown norm 'batchnorm'; choose one of layernorm, rmsnorm"),
        (dict(d_model=24, n_heads=8, positions="rope"), r"RoPE needs an even head dim"),
        (dict(n_layers=0), r"n_layers must be a positive integer"),
    ],
)
def test_bad_model_config_raises(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        TinyGPT(**{"attention": "sdpa", **kwargs})


def test_unknown_kernel_name():
    with pytest.raises(ValueError, match="unknown attention kernel 'fast'; choose one of auto, naive"):
        make_kernel("fast")


@pytest.mark.parametrize("doc_lens", [[[49]], [[10, 0, 5]], [[]], [[20], [30, 19]]])
def test_doc_layout_rejects_bad_rows(doc_lens):
    with pytest.raises(ValueError, match="doc_lens row"):
        DocLayout(doc_lens, 48)


def test_dense_bias_bytes_counts_the_8_aligned_buffer():
    assert dense_bias_bytes(1, 8, 16) == 8 * 16 * 16 * 2
    assert dense_bias_bytes(1, 8, 10) == 8 * 10 * 16 * 2  # last dim padded 10 -> 16
    assert dense_bias_bytes(3, 2, 17, itemsize=4) == 3 * 2 * 17 * 24 * 4


def test_xformers_alibi_budget_refused_in_support(monkeypatch):
    """``support`` first needs CUDA and a working xformers; pretend both to reach the budget rule."""
    assert "CUDA" in XformersAttention().support(
        device="cpu", n_heads=8, n_kv_heads=8, alibi=True, training=True, seq_len=128
    )
    monkeypatch.setattr(attn, "xformers_problem", lambda: None)
    xf = XformersAttention()
    config = dict(device="cuda", n_heads=16, n_kv_heads=16, alibi=True, training=True)
    assert xf.support(**config, seq_len=4096) is None  # 16·4096·4096·2 B = 512 MiB
    reason = xf.support(**config, seq_len=16384)  # 8 GiB
    assert reason is not None and "ALiBi" in reason and "8.0 GiB" in reason
    assert xf.support(**{**config, "alibi": False}, seq_len=16384) is None
    # The largest seq_len within budget for one row and 16 heads (T multiple of 8: 16·T²·2 ≤ budget).
    t_max = int(math.isqrt(XFORMERS_DENSE_BIAS_BUDGET_BYTES // (16 * 2))) // 8 * 8
    assert xf.support(**config, seq_len=t_max) is None
    assert xf.support(**config, seq_len=t_max + 8) is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_xformers_alibi_budget_refused_per_batch(monkeypatch, dtype):
    """``prepare`` refuses a batch whose dense bias (in the batch's dtype) exceeds the budget, naming
    flex as the way out; it builds the bias when it fits."""
    B, H, T_ = 2, 4, 13
    layout = DocLayout([[13], [6, 7]], T_)
    need = dense_bias_bytes(B, H, T_, itemsize=torch.finfo(dtype).bits // 8)

    def prepare():
        return XformersAttention().prepare(
            layout, layout.position_ids(), alibi_slopes(H), n_heads=H, n_kv_heads=H, dtype=dtype, device="cpu"
        )

    monkeypatch.setattr(attn, "XFORMERS_DENSE_BIAS_BUDGET_BYTES", need - 1)
    with pytest.raises(ValueError, match="attention='flex'"):
        prepare()
    monkeypatch.setattr(attn, "XFORMERS_DENSE_BIAS_BUDGET_BYTES", need)
    bias = prepare().bias
    assert bias.dtype == dtype and bias.shape == (B, H, T_, T_)
    assert bias.untyped_storage().nbytes() == need


# --------------------------------------------------------------------------------------------
# auto
# --------------------------------------------------------------------------------------------
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
    for B, T, K in fa4_first:
        assert attn.fa4_leads_rows(T, B, K), (B, T, K)
        order = attn.auto_order("cuda", packed=False, alibi=False, gqa=False, seq_len=T, batch_size=B, head_dim=K)
        assert order[0] == "fa4"
    for B, T, K in sdpa_first:
        assert not attn.fa4_leads_rows(T, B, K), (B, T, K)
        order = attn.auto_order("cuda", packed=False, alibi=False, gqa=False, seq_len=T, batch_size=B, head_dim=K)
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


def test_fa4_bucketed_bounds_pad_with_empty_sequences():
    cu = attn.bucketed_bounds([0, 3, 7, 14])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 7, 14]
    assert attn.bucketed_bounds([0, 2, 4, 6, 8]).tolist() == [0, 2, 4, 6, 8, 8, 8, 8]  # 3 empty sequences
    assert attn.bucketed_bounds([0, 5]).tolist() == [0, 5, 5, 5]  # at least 4 entries
    sizes = {len(attn.bucketed_bounds(list(range(n + 1)))) for n in range(33, 64)}
    assert sizes == {64}  # 33..63 sequences share one length


def test_fa4_op_shapes_under_fake_tensors():
    """The custom op's fake implementation (what torch.compile traces) gives FA4's shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        qkv = torch.empty(64, 8 + 2 * 2, 32, dtype=torch.bfloat16)  # H = 8, G = 2
        cu, seg_pos = torch.zeros(8, dtype=torch.int32), torch.zeros(64, dtype=torch.int32)
        for grouped in (None, seg_pos):
            out, lse = attn.fa4_forward(qkv, 2, cu, grouped, 32, True, [], 0)
            assert out.shape == (64, 8, 32) and lse.shape == (8, 64) and lse.dtype == torch.float32
            dqkv = attn.fa4_backward(out, qkv, 2, out, lse, cu, grouped, 32, True, 0)
            assert dqkv.shape == qkv.shape and dqkv.is_contiguous()
        qkv1 = qkv.view(1, 64, 12, 32)  # block-sparse forward: one sequence
        blocks = [torch.zeros(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32)] * 2
        out, lse = attn.fa4_forward(qkv1, 2, cu, seg_pos, 32, True, blocks, 0)
        assert out.shape == (1, 64, 8, 32) and lse.shape == (1, 8, 64)
        qkv4 = qkv.view(2, 32, 12, 32)
        out, lse = attn.fa4_forward(qkv4, 2, None, None, 32, True, [], 0)
        assert out.shape == (2, 32, 8, 32) and lse.shape == (2, 8, 32)
        assert attn.fa4_backward(out, qkv4, 2, out, lse, None, None, 32, True, 0).shape == qkv4.shape


def test_xformers_imports_beside_a_flash_attn_4_package(tmp_path):
    """flash-attn-4 installs a ``flash_attn`` package without FA2's interface; xformers 0.0.35 would
    import FA2 from it and fail. lit_xf hides it during xformers' import and restores it after."""
    fake = tmp_path / "flash_attn" / "cute"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'fa4'\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import lit_xf.attention as a\n"
        "assert a._flash_attn_is_not_fa2()\n"
        "import flash_attn.cute\n"  # imported before xformers, as a user might
        "ops = a.import_xformers_ops()\n"
        "assert hasattr(ops, 'memory_efficient_attention')\n"
        "import flash_attn.cute as c; assert c.MARK == 'fa4' and sys.modules['flash_attn'] is not None\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_fa4_is_refused_clearly_where_it_cannot_run():
    kernel = attn.make_kernel("fa4")
    reason = kernel.support(device="cpu", n_heads=4, n_kv_heads=2, alibi=False, training=True)
    assert "CUDA-only" in reason
    with pytest.raises(ValueError, match="attention='fa4' can't run"):
        kernel.check(device="cpu", n_heads=4, n_kv_heads=2, alibi=False, training=True)
    layout = DocLayout([[3, 5], [8]], 8)
    with pytest.raises(ValueError, match="attention='fa4' runs fp16/bf16 only, not torch.float32: train with"):
        kernel.prepare(layout, None, None, n_heads=4, n_kv_heads=2, dtype=torch.float32, device="cpu")
    # auto never picks a kernel whose dtypes exclude the batch's
    config = dict(device=torch.device("cpu"), n_heads=4, n_kv_heads=4, alibi=False, training=True, seq_len=8)
    assert attn.make_kernel("auto")._why_not("fa4", config, torch.float32) == "runs fp16/bf16 only, not torch.float32"


def test_fa4_varlen_segments_cover_rows_and_padding():
    """The sequences fa4 gets for packed rows: documents, then each row's padding, as segments of the
    flattened [B·T] tokens; one sequence each, or grouped with each token's position in its segment."""

    def bias(doc_lens, grouping):
        kernel = attn.Fa4Attention(grouping)
        ctx = attn.AttentionContext(kernel, DocLayout(doc_lens, 8), None, None)
        return kernel._bias(ctx, n_heads=2, dtype=torch.bfloat16, device="cpu")

    alone = bias([[3, 5], [2], [8]], "per_document")  # 5 segments -> 6 boundaries, bucketed to 8 entries
    assert alone.seg_pos is None and alone.cu_seqlens.dtype == torch.int32
    assert alone.cu_seqlens.tolist() == [0, 3, 8, 10, 16, 24, 24, 24]
    grouped = bias([[3, 5], [2], [8]], "grouped")  # 24 tokens: one group (auto: the same, 24 not a multiple of 128)
    auto = bias([[3, 5], [2], [8]], "auto")
    assert torch.equal(auto.cu_seqlens, grouped.cu_seqlens) and torch.equal(auto.seg_pos, grouped.seg_pos)
    assert grouped.cu_seqlens.tolist() == [0, 24, 24, 24]
    assert grouped.seg_pos.dtype == torch.int32
    assert grouped.seg_pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 5, *range(8)]
    assert bias([[8], [5]], "auto") is None  # one document per row: dense causal
    with pytest.raises(ValueError, match="fa4 grouping=.tiles.; choose one of auto, grouped, per_document, block_"):
        attn.Fa4Attention("tiles")
    # a model or config names a plan as fa4:<plan>
    assert repr(attn.make_kernel("fa4:block_sparse")) == "Fa4Attention(grouping='block_sparse')"
    assert "fa4:block_sparse" in attn.ATTENTION_CHOICES and "fa4:block_sparse" not in attn.KERNEL_NAMES
    with pytest.raises(ValueError, match="unknown attention kernel 'fa4:tiles'; choose one of auto, .*fa4:grouped"):
        attn.make_kernel("fa4:tiles")


def test_fa4_call_arguments_per_plan(monkeypatch):
    """What reaches FA4 for each plan: grouped sequences swap FA4's causal mask for the CuTe mask
    with seg_pos as its aux tensor; one sequence per document keeps FA4's causal flag; dense rows get
    no varlen arguments. (The CuTe module needs flash-attn-4: a stand-in is enough here.)"""
    import types

    mask = object()
    monkeypatch.setitem(sys.modules, "lit_xf.fa4_mask", types.SimpleNamespace(segment_causal=mask))
    cu, seg_pos = torch.zeros(4, dtype=torch.int32), torch.zeros(8, dtype=torch.int32)
    grouped = attn._fa4_varlen_kwargs(cu, seg_pos, 8, True)
    assert grouped["causal"] is False and grouped["mask_mod"] is mask and grouped["aux_tensors"] == [seg_pos]
    assert grouped["cu_seqlens_q"] is cu and grouped["cu_seqlens_k"] is cu and grouped["max_seqlen_q"] == 8
    alone = attn._fa4_varlen_kwargs(cu, None, 8, True)
    assert alone["causal"] is True and "mask_mod" not in alone and alone["max_seqlen_k"] == 8
    assert attn._fa4_varlen_kwargs(None, None, 8, False) == {"causal": False}
    # block-sparse forward: one dense sequence under the block lists and the CuTe mask (cu_seqlens,
    # for the backward, not passed)
    fake_lists = types.SimpleNamespace(BlockSparseTensorsTorch=lambda *lists, block_size: (lists, block_size))
    monkeypatch.setitem(sys.modules, "flash_attn.cute.block_sparsity", fake_lists)
    blocks = [torch.full((1,), n, dtype=torch.int32) for n in range(4)]
    kw = attn._fa4_varlen_kwargs(cu, seg_pos, 8, True, blocks)
    assert kw["causal"] is False and kw["mask_mod"] is mask and "cu_seqlens_q" not in kw
    assert kw["block_sparse_tensors"] == (tuple(blocks), (128, 128))


def fa4_allowed(plan: attn.Fa4Varlen, causal: bool) -> torch.Tensor:
    """``[N, N]`` bool: what FA4 lets query i see under ``plan`` (the CuTe mask's rule, in Python):
    keys of i's sequence, j ≤ i if causal, and within i's segment (i − j ≤ seg_pos[i]) if grouped.
    Block-sparse: pairs in listed masked blocks under the mask, in listed unmasked blocks all (the
    forward), which must equal what its grouped sequences allow (the backward)."""
    if plan.blocks:
        forward = block_sparse_allowed(plan)
        assert torch.equal(forward, fa4_allowed(attn.Fa4Varlen(plan.cu_seqlens, plan.seg_pos), causal))
        return forward
    bounds = plan.cu_seqlens.tolist()
    seq = torch.cat([torch.full((b - a,), s) for s, (a, b) in enumerate(itertools.pairwise(bounds))])
    i = torch.arange(len(seq))
    allowed = seq[:, None] == seq[None, :]
    if causal:
        allowed &= i[None, :] <= i[:, None]
    if plan.seg_pos is not None:
        allowed &= (i[:, None] - i[None, :]) <= plan.seg_pos.long()[:, None]
    return allowed


def block_lists_dense(count: torch.Tensor, index: torch.Tensor, n_cols: int) -> torch.Tensor:
    """FA4 block lists (``[1, 1, R]`` counts, ``[1, 1, R, C]`` indices) -> bool ``[R, n_cols]``."""
    dense = torch.zeros(count.shape[-1], n_cols, dtype=torch.bool)
    for r, (c, idx) in enumerate(zip(count[0, 0].tolist(), index[0, 0], strict=True)):
        dense[r, idx[:c].long()] = True
        assert idx[:c].tolist() == sorted(idx[:c].tolist())  # ascending
    return dense


def block_sparse_allowed(plan: attn.Fa4Varlen, block: int = attn.FA4_BLOCK) -> torch.Tensor:
    n = len(plan.seg_pos)
    nb = n // block
    masked_fwd, full_fwd = (block_lists_dense(plan.blocks[2 * k], plan.blocks[2 * k + 1], nb) for k in range(2))
    assert not (masked_fwd & full_fwd).any()
    i = torch.arange(n)
    rule = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :]) <= plan.seg_pos.long()[:, None])
    per_block = rule.view(nb, block, nb, block).permute(0, 2, 1, 3)
    some, every = per_block.any(-1).any(-1), per_block.all(-1).all(-1)
    assert torch.equal(full_fwd, every) and torch.equal(masked_fwd, some & ~every)  # no block more or less
    expand = lambda b: b.repeat_interleave(block, 0).repeat_interleave(block, 1)  # noqa: E731
    return (expand(masked_fwd) & rule) | expand(full_fwd)


@pytest.mark.parametrize("grouping", ["grouped", "per_document", "auto", "block_sparse"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_fa4_sequences_mask_exactly_the_block_diagonal(grouping, causal):
    """Grouped, one sequence each or block-sparse, FA4's sequences, blocks and mask allow exactly the
    documents' block-diagonal (causal) pairs, padding as its own block: random rows of short and
    long documents."""
    gen = torch.Generator().manual_seed(3)
    seq_len = 384 if grouping in ("block_sparse", "auto") else 320  # B·T a multiple of 128 for block lists
    for trial in range(20):
        rows = []
        for _ in range(3):
            lens, filled = [], 0
            while filled < seq_len - 8:
                n = int(torch.randint(1, 40 if trial % 2 else 200, (1,), generator=gen))
                n = min(n, seq_len - filled - int(torch.randint(0, 8, (1,), generator=gen)))
                if n < 1:
                    break
                lens.append(n)
                filled += n
            rows.append(lens or [seq_len])
        layout = DocLayout(rows, seq_len, causal)
        plan = attn.fa4_varlen(layout, grouping)
        assert plan.seg_pos is None or (causal and grouping != "per_document")
        segments = [n for row in layout.segment_lens() for n in row]
        auto_sparse = grouping == "auto" and attn.fa4_grouping_pays(segments) and 3 * seq_len % 128 == 0
        assert bool(plan.blocks) == (causal and (grouping == "block_sparse" or auto_sparse))
        assert torch.equal(fa4_allowed(plan, causal), block_causal_allowed(rows, seq_len, causal)), (trial, rows)


def test_fa4_block_sparse_lists_per_block():
    """Segments [300, 84] in three 128-token blocks: block 1 lies inside segment 0 with key block 0
    (unmasked), block 2 holds a boundary (masked against every earlier block); diagonals are masked;
    nothing above the diagonal is listed. The backward runs the plan's grouped sequences."""
    plan = attn.fa4_varlen(DocLayout([[300, 84]], 384), "block_sparse")
    assert plan.cu_seqlens.tolist() == [0, 300, 384, 384] and plan.seg_pos.tolist() == [*range(300), *range(84)]
    masked_cnt, masked_idx, full_cnt, full_idx = plan.blocks
    assert all(t.dtype == torch.int32 for t in plan.blocks)
    assert masked_cnt.shape == (1, 1, 3) and masked_idx.shape == (1, 1, 3, 3)
    assert masked_cnt.tolist() == [[[1, 1, 3]]] and full_cnt.tolist() == [[[0, 1, 0]]]
    assert [row[:c] for row, c in zip(masked_idx[0, 0].tolist(), [1, 1, 3], strict=True)] == [[0], [1], [0, 1, 2]]
    assert full_idx[0, 0, 1, 0] == 0
    moved = plan.to("cpu")  # one copy of every tensor, shapes kept
    assert torch.equal(moved.cu_seqlens, plan.cu_seqlens) and [t.shape for t in moved.blocks] == [
        t.shape for t in plan.blocks
    ]
    assert all(torch.equal(a, b) for a, b in zip(moved.blocks, plan.blocks, strict=True))


def _dense_block_lists(segments: list[int], block: int = 128) -> list[torch.Tensor]:
    """The block lists from dense [n, n] maps of the blocks (the plan's definition, quadratic)."""
    seg = np.cumsum(attn.segment_positions(segments).numpy() == 0) - 1
    first, last = seg.reshape(-1, block)[:, 0], seg.reshape(-1, block)[:, -1]
    i, j = np.arange(len(first))[:, None], np.arange(len(first))[None, :]
    visible = (j <= i) & (first[:, None] <= last[None, :])
    full = (j < i) & (first[None, :] == last[:, None])
    out = []
    for selected in (visible & ~full, full):
        count = selected.sum(-1, dtype=np.int32)
        width = min(len(first), max(4, 1 << (int(count.max()) - 1).bit_length()))
        index = np.zeros((len(first), width), dtype=np.int32)
        for r, row in enumerate(selected):
            index[r, : count[r]] = row.nonzero()[0]
        out += [torch.from_numpy(count)[None, None], torch.from_numpy(index)[None, None]]
    return out


@pytest.mark.parametrize("seed", range(40))
def test_fa4_block_sparse_lists_match_the_dense_block_maps(seed):
    """The plan's lists, built from ranges, equal those of the dense block maps: random segment
    lengths (1 token to several blocks, some on block boundaries) over 1..40 blocks."""
    rng = np.random.default_rng(seed)
    n_tokens = 128 * int(rng.integers(1, 41))
    segments: list[int] = []
    while sum(segments) < n_tokens:
        kind = rng.integers(4)
        n = [int(rng.integers(1, 40)), int(rng.integers(40, 400)), 128, int(rng.integers(400, 3000))][kind]
        segments.append(min(n, n_tokens - sum(segments)))
    plan = attn.fa4_block_sparse(segments)
    for got, want in zip(plan.blocks, _dense_block_lists(segments), strict=True):
        assert got.dtype == want.dtype == torch.int32 and torch.equal(got, want), segments


def test_fa4_block_sparse_lists_are_compact():
    """Index rows are as wide as the longest list rounded up to a power of two (at least 4), not
    one slot per key block: 64 blocks of 30-token documents list at most 2 blocks per row."""
    plan = attn.fa4_block_sparse([30] * (64 * 128 // 30) + [64 * 128 % 30])
    masked_cnt, masked_idx, full_cnt, full_idx = plan.blocks[:4]
    assert int(masked_cnt.max()) == 2 and masked_idx.shape == (1, 1, 64, 4) and full_idx.shape == (1, 1, 64, 4)
    assert int(full_cnt.max()) == 0
    long_doc = attn.fa4_block_sparse([64 * 128])  # one document: row i lists i full blocks
    assert long_doc.blocks[3].shape == (1, 1, 64, 64) and long_doc.blocks[1].shape == (1, 1, 64, 4)
    assert long_doc.cu_seqlens.tolist() == [0, 64 * 128, 64 * 128, 64 * 128]  # the backward's sequence
    assert torch.equal(block_sparse_allowed(long_doc), torch.ones(64 * 128, 64 * 128, dtype=torch.bool).tril())


def _fa4_stand_in(q, k, v, cu_seqlens, seg_pos, causal, blocks, window=0, dout=None):
    """What FA4 computes for the ops' arguments, in float64 on the CPU, under ``fa4_allowed`` of the
    plan they describe (dense rows without one; keys i − j < ``window`` only, if > 0 — FA4's local
    window_size=(window − 1, 0)): (out, lse), or with ``dout`` (dq, dk, dv) by
    P = softmax(S), dV = Pᵀ dO, dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O)), dQ = dS K / √K, dK = dSᵀ Q / √K."""
    dense = cu_seqlens is None and not blocks
    q_BTHK, k_BTGK, v_BTGK = (t.double() if dense else t.double().reshape(1, -1, *t.shape[-2:]) for t in (q, k, v))
    B, T, H, K = q_BTHK.shape
    if dense:
        allowed = torch.ones(T, T, dtype=torch.bool).tril() if causal else torch.ones(T, T, dtype=torch.bool)
    else:
        allowed = fa4_allowed(attn.Fa4Varlen(cu_seqlens, seg_pos, tuple(blocks)), causal)
    if window:  # sequences are contiguous, so i − j inside one is the flat index difference
        i = torch.arange(T)
        allowed = allowed & (i[:, None] - i[None, :] < window)
    G = k_BTGK.shape[2]
    q_BHTK, k_BHTK, v_BHTK = (t.repeat_interleave(H // t.shape[2], 2).transpose(1, 2) for t in (q_BTHK, k_BTGK, v_BTGK))
    scores = (q_BHTK @ k_BHTK.transpose(-1, -2) / math.sqrt(K)).masked_fill(~allowed, -math.inf)
    p_BHTT = scores.softmax(-1).nan_to_num()
    out_BHTK = p_BHTT @ v_BHTK
    if dout is None:
        out, lse_BHT = out_BHTK.transpose(1, 2).reshape(q.shape).to(q.dtype), scores.logsumexp(-1).float()
        return out, (lse_BHT if cu_seqlens is None or blocks else lse_BHT[0])  # [B, H, T]; varlen [H, N]
    do_BHTK = dout.double().reshape(B, T, H, K).transpose(1, 2)
    ds = p_BHTT * (do_BHTK @ v_BHTK.transpose(-1, -2) - (do_BHTK * out_BHTK).sum(-1, keepdim=True))
    dq, dk, dv = (
        ds @ k_BHTK / math.sqrt(K),
        ds.transpose(-1, -2) @ q_BHTK / math.sqrt(K),
        p_BHTT.transpose(-1, -2) @ do_BHTK,
    )
    per_kv = lambda g: g.unflatten(1, (G, H // G)).sum(2)  # noqa: E731 -- GQA: sum over each group's heads
    return tuple(g.transpose(1, 2).reshape(t.shape).to(t.dtype) for g, t in ((dq, q), (per_kv(dk), k), (per_kv(dv), v)))


def split_qkv(qkv, G):
    return qkv.split((qkv.shape[-2] - 2 * G, G, G), dim=-2)


@pytest.fixture
def fa4_ops_on_cpu():
    """CPU kernels for lit_xf's two FA4 ops (the stand-in above), so the plans, reshapes and
    autograd wiring around FA4 run without a GPU."""
    lib = torch.library.Library("lit_xf", "IMPL")
    lib.impl(
        "fa4_forward",
        lambda qkv, G, cu, seg_pos, _, causal, blocks, window: _fa4_stand_in(
            *split_qkv(qkv, G), cu, seg_pos, causal, blocks, window
        ),
        "CPU",
    )
    lib.impl(
        "fa4_backward",
        lambda dout, qkv, G, out, lse, cu, seg_pos, _, causal, window: torch.cat(
            _fa4_stand_in(*split_qkv(qkv, G), cu, seg_pos, causal, (), window, dout), dim=-2
        ),
        "CPU",
    )
    yield
    lib._destroy()


@pytest.mark.parametrize("call", ["stacked", "apart"])
@pytest.mark.parametrize("kv", ["mha", "gqa"])
@pytest.mark.parametrize("plan", ["fa4:grouped", "fa4:per_document", "fa4:block_sparse", "fa4", "fa4 dense"])
def test_fa4_plans_forward_and_backward_through_the_ops(fa4_ops_on_cpu, plan, kv, call):
    """Each fa4 plan (and dense rows) through the custom ops and their autograd on the CPU, with
    stand-in kernels: the plan's arguments reach the forward and the backward, the list of block
    tensors included, and the output and q/k/v gradients equal block-diagonal causal attention,
    whether q, k, v come as the projection's stack (the model's call) or apart (after RoPE)."""
    doc_lens, T_ = [[3, 40, 1, 150, 20, 7], [100, 100, 30], [1, 1, 250]], 256
    if plan == "fa4 dense":
        plan, doc_lens = "fa4", [[T_]] * 3
    q, k, v = random_qkv(torch.Generator().manual_seed(5), 3, T_, 4, KV[kv](4), 16, torch.bfloat16)
    got, want, real = run_kernel(plan, doc_lens, q, k, v, None, grad=True, stacked=call == "stacked")
    assert_matches(got, want, real, 2e-2)  # bf16 outputs and gradients; a wrong mask is off by O(1)


def test_fa4_block_sparse_plan_needs_whole_blocks_and_causal_rows():
    """ "block_sparse" takes causal rows whose B·T fills 128-token blocks; otherwise grouped; "auto"
    takes it where grouping pays, and one sequence per document where it doesn't."""
    rows = [[30, 98], [128]]
    assert attn.fa4_varlen(DocLayout(rows, 128), "block_sparse").blocks  # 256 tokens
    fallback = attn.fa4_varlen(DocLayout([[30, 60], [90]], 90), "block_sparse")  # 180 tokens
    assert not fallback.blocks and fallback.cu_seqlens is not None
    assert not attn.fa4_varlen(DocLayout(rows, 128, causal=False), "block_sparse").blocks
    assert fallback.seg_pos is not None  # grouped
    short_docs = [[30] * 4 + [8], [32] * 4]  # 256 tokens: grouping pays
    assert attn.fa4_varlen(DocLayout(short_docs, 128), "auto").blocks
    assert not attn.fa4_varlen(DocLayout(short_docs, 128), "grouped").blocks
    long_docs = attn.fa4_varlen(DocLayout([[256], [256]], 256), "auto")
    assert not long_docs.blocks and long_docs.seg_pos is None  # one sequence per document


def test_fa4_groups_never_split_a_segment():
    segments = [30, 100, 1, 127, 128, 300, 5, 5, 120, 2]
    bounds = attn.group_bounds(segments, 128)
    assert bounds == [0, 30, 131, 258, 386, 686, 696, 818]  # 5 + 5 + 120 > 128
    ends = set(itertools.accumulate(segments))
    assert set(bounds[1:]) <= ends  # every boundary is a segment boundary
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    assert all(n <= 128 or n in segments for n in sizes)  # longer only for one long segment


def test_fa4_groups_short_documents_only():
    """Grouping counts 128×128 tiles: it pays for short documents, not for long ones (a grouped
    sequence gets no causal tile skipping)."""
    assert attn.fa4_grouping_pays([34] * 960 + [128])  # BPE fortunes-like rows: ~4 documents a tile
    assert attn.fa4_grouping_pays(attn_lognormal(256, 32))
    assert not attn.fa4_grouping_pays(attn_lognormal(256, 422))  # anchors.md's packed workload
    assert not attn.fa4_grouping_pays([2048] * 8)
    assert not attn.fa4_grouping_pays([100, 100, 100])  # no two fit a tile: nothing to gain


def attn_lognormal(n_docs: int, mean: float) -> list[int]:
    from lit_xf.bench import lognormal_doc_lens

    return lognormal_doc_lens(n_docs, mean, 2048)


@pytest.mark.parametrize(
    "H,G,T_,want",
    [
        (4, 1, 48, 2),
        (8, 2, 48, 4),
        (16, 2, 100, 8),
        (3, 1, 48, 3),
        (12, 4, 48, 12),
        (4, 2, 48, None),
        (8, 1, 256, None),
        (8, 8, 48, None),
    ],
)
def test_flex_trainable_kv_heads_rule(H, G, T_, want):
    assert attn.flex_trainable_kv_heads(H, G, T_) == want


@pytest.mark.parametrize("H,G", [(4, 1), (8, 2), (12, 4)])
def test_repeating_kv_to_trainable_heads_keeps_gqa_semantics(request, H, G):
    """What flex does for groups > 2 (repeat K/V to fewer query heads per kv head) gives the same
    output and q/k/v gradients as the original grouping (checked with sdpa in float64)."""
    q, k, v = random_qkv(case_generator(request), 2, T, H, G, 8, torch.float64)
    target = attn.flex_trainable_kv_heads(H, G, T)
    got = run_kernel("sdpa", LAYOUTS["padded"], q, k, v, None, grad=True)[0]
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    layout = DocLayout(LAYOUTS["padded"], T)
    kernel = make_kernel("sdpa")
    ctx = kernel.prepare(
        layout, layout.position_ids("cpu"), None, n_heads=H, n_kv_heads=target, dtype=torch.float64, device="cpu"
    )
    out = kernel(leaves[0], attn.repeat_kv(leaves[1], target), attn.repeat_kv(leaves[2], target), ctx)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    real = real_mask(LAYOUTS["padded"], T, "cpu")[:, :, None, None]
    (out * dout * real).sum().backward()
    assert torch.allclose(out * real, got[0] * real, atol=1e-12)
    for leaf, g in zip(leaves, got[1:], strict=True):
        assert torch.allclose(leaf.grad, g, atol=1e-12)


# --------------------------------------------------------------------------------------------
# GPU: every kernel in half precision against the float64 reference
# --------------------------------------------------------------------------------------------
GPU_REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
GPU_K = 64  # head dim of the GPU cases
# Flex compiles one kernel per shape / dtype / score_mod / mask kind: keep its cases few (B = 2, one T).
GPU_CASES = [(kernel, *case) for kernel in ("naive", "sdpa", "xformers") for case in CPU_CASES] + [
    ("flex", "padded", "mqa", (4, "alibi")),
    ("flex", "padded", "mha", (4, "none")),
    ("flex", "packed", "mha", (4, "none")),
    ("flex", "packed", "gqa", (4, "alibi")),
    ("flex", "padded", "gqa", (8, "alibi")),  # 4 query heads per kv head: K/V repeated to train (T % 128)
    ("fa4", "causal", "gqa", (4, "none")),
    ("fa4", "padded", "mqa", (4, "none")),
    ("fa4", "packed", "mha", (4, "none")),
    ("fa4", "packed", "gqa", (4, "none")),
    ("flex", "bidir-packed", "gqa", (4, "none")),
]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64; NaN/inf anywhere gives inf."""
    got = got.double().cpu()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestGpuKernelsAgainstReference:
    @pytest.fixture(autouse=True)
    def _room_for_flex_recompiles(self):
        import torch._dynamo.config as dynamo_config

        # Hitting the recompile limit would silently fall back to eager flex and test the wrong thing.
        with dynamo_config.patch(recompile_limit=64):
            yield

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    @pytest.mark.parametrize(
        "kernel_name,layout_name,kv,heads_positions",
        GPU_CASES,
        ids=[f"{k}-{lay}-{kv}-{p}{h}" for k, lay, kv, (h, p) in GPU_CASES],
    )
    def test_forward_and_backward(self, request, kernel_name, layout_name, kv, heads_positions, dtype):
        if kernel_name == "xformers" and (problem := attn.xformers_problem()):
            pytest.skip(problem)
        if kernel_name == "fa4" and (problem := attn.fa4_problem()):
            pytest.skip(problem)
        H, positions = heads_positions
        doc_lens, causal = layout_spec(layout_name)
        q, k, v = random_qkv(case_generator(request), len(doc_lens), T, H, KV[kv](H), GPU_K, dtype, device="cuda")
        slopes = alibi_slopes(H).cuda() if positions == "alibi" else None
        got, want, real = run_kernel(kernel_name, doc_lens, q, k, v, slopes, grad=True, causal=causal)
        tol = GPU_REL_TOL[dtype]
        mask = real.expand_as(want[0])
        errors = {"out": relative_error(got[0].cpu()[mask], want[0][mask])}
        for name, g, r in zip("qkv", got[1:], want[1:], strict=True):
            errors[f"d{name}"] = relative_error(g, r) if g is not None else math.inf
        bad = {n: e for n, e in errors.items() if not e < tol}
        assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("call", ["stacked", "apart"])
@pytest.mark.parametrize("kv", ["mha", "gqa"])
@pytest.mark.parametrize("plan", ["fa4:grouped", "fa4:per_document", "fa4:block_sparse", "fa4 dense"])
def test_gpu_fa4_plans_match_reference(request, plan, kv, call):
    """The fa4 plans for packed rows (short documents grouped under the CuTe mask, one sequence
    each, or the batch as one block-sparse sequence) and dense causal rows in bf16, forward and
    q/k/v gradients, against float64: documents shorter and longer than a tile, length-1
    documents, padding. q, k, v go in as the projection's stack (FA4 reads strided views of it and
    writes dq, dk, dv into one stack) or apart."""
    if problem := attn.fa4_problem():
        pytest.skip(problem)
    doc_lens, T_ = [[3, 40, 1, 150, 20, 7], [100, 100, 30], [1, 1, 250]], 256
    if plan == "fa4 dense":
        plan, doc_lens = "fa4", [[T_]] * 3
    q, k, v = random_qkv(case_generator(request), 3, T_, 4, KV[kv](4), GPU_K, torch.bfloat16, device="cuda")
    got, want, real = run_kernel(plan, doc_lens, q, k, v, None, grad=True, stacked=call == "stacked")
    errors = {"out": relative_error(got[0].cpu()[real.expand_as(want[0])], want[0][real.expand_as(want[0])])}
    errors |= {f"d{n}": relative_error(g, r) for n, g, r in zip("qkv", got[1:], want[1:], strict=True)}
    assert all(e < GPU_REL_TOL[torch.bfloat16] for e in errors.values()), errors


def test_sdpa_warns_once_about_dense_masks_on_cuda(caplog, monkeypatch):
    monkeypatch.setattr(attn.SdpaAttention, "_warned_dense", False)
    with caplog.at_level("WARNING", logger="lit_xf.attention"):
        attn.SdpaAttention.warn_dense("cpu")  # CPU: sdpa is what auto picks there; no warning
        assert not caplog.records
        attn.SdpaAttention.warn_dense(torch.device("cuda"))
        attn.SdpaAttention.warn_dense(torch.device("cuda", 0))
    assert len(caplog.records) == 1 and "auto" in caplog.records[0].getMessage()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel_name", ["fa4", "xformers", "sdpa"])
def test_gpu_compiled_blocks_reuse_graphs_across_packed_batches(kernel_name):
    """Compiled blocks on CUDA, bf16: packed batches with new document layouts (and new
    ``cu_seqlens`` buckets for fa4) compile nothing after the second batch and match eager."""
    if kernel_name == "xformers" and (problem := attn.xformers_problem()):
        pytest.skip(problem)
    if kernel_name == "fa4" and (problem := attn.fa4_problem()):
        pytest.skip(problem)
    torch._dynamo.reset()
    torch.manual_seed(0)
    kw = dict(vocab_size=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256, attention=kernel_name)
    eager, compiled = TinyGPT(**kw).cuda(), TinyGPT(**kw).cuda()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_model("blocks")
    gen = torch.Generator().manual_seed(1)
    graphs = []
    for i in range(6):
        rows = []
        for _ in range(2):
            cuts = sorted(torch.randperm(255, generator=gen)[: 3 + 4 * i].add(1).tolist())
            rows.append([b - a for a, b in zip([0, *cuts], [*cuts, 256], strict=True)])
        ids = torch.randint(0, 64, (2, 256), generator=gen).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want, got = eager(ids, doc_lens=rows), compiled(ids, doc_lens=rows)
        got.float().square().mean().backward()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        assert relative_error(got.float(), want.double().cpu()) < 2e-2, i
    assert graphs[2:] == [graphs[1]] * 4, f"graphs compiled after each batch: {graphs}"


# --------------------------------------------------------------------------------------------
# Sliding-window attention
# --------------------------------------------------------------------------------------------
WINDOW_LAYOUTS = ["causal", "padded", "packed", "mixed"]
WINDOWS = [1, 5, 16]  # 1: each token sees only itself; 16: shorter than some documents, longer than others


def windowed_allowed(doc_lens, seq_len, window) -> torch.Tensor:
    """``[B·T, B·T]``: ``block_causal_allowed`` and i − j < window."""
    i = torch.arange(len(doc_lens) * seq_len)
    return block_causal_allowed(doc_lens, seq_len) & (i[:, None] - i[None, :] < window)


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


def test_window_needs_causal_attention_and_a_plan_that_has_one():
    with pytest.raises(ValueError, match="needs causal attention"):
        DocLayout([[T]], T, causal=False, window=4)
    for plan in ("fa4:grouped", "fa4:block_sparse"):
        with pytest.raises(ValueError, match=f"attention='{plan}' has no sliding window.*'fa4:per_document'"):
            TinyGPT(attention=plan, attention_window=8)
        with pytest.raises(ValueError, match="has no sliding window"):
            attn.fa4_varlen(DocLayout([[30, 98], [128]], 128, window=8), plan.split(":")[1])


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout_name", WINDOW_LAYOUTS)
@pytest.mark.parametrize("kv,heads_positions", [("mha", (4, "none")), ("gqa", (4, "alibi"))])
@pytest.mark.parametrize("kernel_name", ["naive", "sdpa"])
def test_window_kernels_match_reference(request, kernel_name, kv, heads_positions, layout_name, window):
    """Forward and q/k/v gradients in float64 against per-document attention over the window."""
    H, positions = heads_positions
    doc_lens, _ = layout_spec(layout_name)
    q, k, v = random_qkv(case_generator(request), len(doc_lens), T, H, KV[kv](H), 8, torch.float64)
    slopes = alibi_slopes(H) if positions == "alibi" else None
    got, want, real = run_kernel(kernel_name, doc_lens, q, k, v, slopes, grad=True, window=window)
    assert_matches(got, want, real, CPU_TOL[torch.float64])


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout_name", WINDOW_LAYOUTS)
def test_window_flex_forward_matches_reference(request, layout_name, window):
    doc_lens, _ = layout_spec(layout_name)
    q, k, v = random_qkv(case_generator(request), len(doc_lens), T, 4, 2, 8, torch.float64)
    got, want, real = run_kernel("flex", doc_lens, q, k, v, alibi_slopes(4), grad=False, window=window)
    assert_matches(got, want, real, CPU_TOL[torch.float64])


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


@pytest.mark.parametrize("window", [7, 64])
@pytest.mark.parametrize("plan", ["fa4", "fa4:per_document", "fa4 dense"])
def test_window_fa4_through_the_ops(fa4_ops_on_cpu, plan, window):
    """fa4 with a window: the plan is one sequence per document, the window reaches the forward and
    the backward op, and output and gradients equal windowed attention (stand-in kernels on the CPU:
    this checks lit_xf's wiring, not FA4's window itself)."""
    doc_lens, T_ = [[3, 40, 1, 150, 20, 7], [100, 100, 30], [1, 1, 250]], 256
    if plan == "fa4 dense":
        plan, doc_lens = "fa4", [[T_]] * 3
    layout = DocLayout(doc_lens, T_, window=window)
    if layout.block_diagonal:
        fa4_plan = attn.fa4_varlen(layout, plan.partition(":")[2] or "auto")
        assert fa4_plan.seg_pos is None and not fa4_plan.blocks  # one sequence per segment
    q, k, v = random_qkv(torch.Generator().manual_seed(7), 3, T_, 4, 2, 16, torch.bfloat16)
    got, want, real = run_kernel(plan, doc_lens, q, k, v, None, grad=True, stacked=True, window=window)
    assert_matches(got, want, real, 2e-2)


def test_window_fa4_call_arguments():
    """FA4's local attention for a window of W: keys i − (W − 1) .. i, spelled per interface."""
    fwd = attn._fa4_varlen_kwargs(None, None, 8, True, window=5)
    assert fwd == {"causal": True, "window_size": (4, 0)}
    bwd = attn._fa4_varlen_kwargs(None, None, 8, True, window=5, backward=True)
    assert bwd == {"causal": True, "window_size_left": 4, "window_size_right": 0}
    assert attn._fa4_varlen_kwargs(None, None, 8, True, window=0) == {"causal": True}


def test_window_that_hides_nothing_keeps_the_fast_paths():
    """A window as long as every document changes no mask: sdpa keeps ``is_causal``, fa4 its
    grouped plans and no window argument."""
    short = DocLayout([[30] * 4 + [8], [32] * 4], 128, window=64)
    assert not short.windowed and attn.fa4_varlen(short, "auto").blocks
    full = DocLayout.full_rows(2, T, window=T)
    ctx = attn.make_kernel("sdpa").prepare(
        full, full.position_ids(), None, n_heads=4, n_kv_heads=4, dtype=torch.float32, device="cpu"
    )
    assert ctx.bias is None


def test_auto_puts_native_windows_first_on_cuda():
    for packed, gqa in itertools.product([False, True], repeat=2):
        order = attn.auto_order("cuda", packed=packed, alibi=False, gqa=gqa, seq_len=T, windowed=True)
        assert order == ("fa4", "xformers", "flex", "sdpa")
        alibi = attn.auto_order("cuda", packed=packed, alibi=True, gqa=gqa, seq_len=T, windowed=True)
        assert alibi[0] == "flex" and alibi[-1] == "sdpa"
    assert attn.auto_order("cpu", packed=True, alibi=False, gqa=False, seq_len=T, windowed=True) == ("sdpa",)


def test_tinygpt_window_equals_windowed_naive_and_is_a_no_op_when_long():
    """The model's window reaches the kernel: sdpa with a window equals naive with it, differs from
    no window, and a window as long as the rows changes nothing."""
    torch.manual_seed(0)
    kw = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, max_seq_len=T, positions="rope")
    ids, rows = torch.randint(0, 32, (2, T)), [[5, 30, 13], [T]]
    weights, outs = TinyGPT(**kw).double().state_dict(), {}
    for name, window in [("naive", 6), ("sdpa", 6), ("sdpa", None), ("sdpa", T)]:
        model = TinyGPT(**kw, attention=name, attention_window=window).double()
        model.load_state_dict(weights)
        outs[name, window] = model(ids, doc_lens=rows)
    torch.testing.assert_close(outs["sdpa", 6], outs["naive", 6])
    assert not torch.allclose(outs["sdpa", 6], outs["sdpa", None])
    torch.testing.assert_close(outs["sdpa", T], outs["sdpa", None])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [1, 16, 100])
@pytest.mark.parametrize("layout_name", ["causal", "padded", "packed"])
@pytest.mark.parametrize("kernel_name", ["fa4", "xformers", "flex", "sdpa"])
def test_gpu_window_kernels_match_reference(request, kernel_name, layout_name, window):
    """Each kernel with a sliding window on CUDA in bf16, forward and q/k/v gradients (GQA 4q/2kv)
    against float64 windowed attention; fa4 runs FA4's local attention, xformers its local masks."""
    if kernel_name == "xformers" and (problem := attn.xformers_problem()):
        pytest.skip(problem)
    if kernel_name == "fa4" and (problem := attn.fa4_problem()):
        pytest.skip(problem)
    doc_lens, _ = layout_spec(layout_name)
    q, k, v = random_qkv(case_generator(request), len(doc_lens), T, 4, 2, GPU_K, torch.bfloat16, device="cuda")
    got, want, real = run_kernel(kernel_name, doc_lens, q, k, v, None, grad=True, stacked=True, window=window)
    mask = real.expand_as(want[0])
    errors = {"out": relative_error(got[0].cpu()[mask], want[0][mask])}
    errors |= {f"d{n}": relative_error(g, r) for n, g, r in zip("qkv", got[1:], want[1:], strict=True)}
    if window == 1:  # each query sees only itself: softmax ≡ 1, so the exact dq, dk are 0; size them against dv
        assert want[1].abs().max() == 0 and want[2].abs().max() == 0
        errors["dq"], errors["dk"] = (float(g.double().cpu().norm() / want[3].norm()) for g in got[1:3])
    assert all(e < GPU_REL_TOL[torch.bfloat16] for e in errors.values()), errors
