"""FlashAttention-4's side of lit_xf without a GPU: the packed-row plans (sequences, grouping,
block-sparse lists) against masks written here, the custom ops' fake shapes and arguments, and every
plan through the ops and their autograd with float64 stand-in kernels on the CPU; on a GPU, every
plan in bf16 against the float64 reference."""

from __future__ import annotations

import itertools
import math
import sys

import numpy as np
import pytest
import torch
from attention_cases import (
    GPU_K,
    GPU_REL_TOL,
    KV,
    assert_matches,
    block_causal_allowed,
    case_generator,
    one_cpu_thread,  # noqa: F401 -- autouse
    random_qkv,
    relative_error,
    run_kernel,
)

from lit_xf import attention as attn
from lit_xf.attention import DocLayout
from lit_xf.attention.fa4.ops import _fa4_varlen_kwargs
from lit_xf.bench.packing import lognormal_doc_lens
from lit_xf.model import TinyGPT


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
        stack = torch.empty(64, 8 + 2 * 2, 32, dtype=torch.bfloat16)  # H = 8, G = 2
        apart = [torch.empty(64, h, 32, dtype=torch.bfloat16) for h in (8, 2, 2)]
        cu, seg_pos = torch.zeros(8, dtype=torch.int32), torch.zeros(64, dtype=torch.int32)
        for qkv in ([stack], apart):
            for grouped in (None, seg_pos):
                out, lse = attn.fa4_forward(qkv, 2, cu, grouped, 32, True, [], 0)
                assert out.shape == (64, 8, 32) and lse.shape == (8, 64) and lse.dtype == torch.float32
                dqkv = attn.fa4_backward(out, qkv, 2, out, lse, cu, grouped, 32, True, 0)
                assert [g.shape for g in dqkv] == [t.shape for t in qkv]
                assert all(g.is_contiguous() for g in dqkv)
        qkv1 = [stack.view(1, 64, 12, 32)]  # block-sparse forward: one sequence
        blocks = [torch.zeros(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32)] * 2
        out, lse = attn.fa4_forward(qkv1, 2, cu, seg_pos, 32, True, blocks, 0)
        assert out.shape == (1, 64, 8, 32) and lse.shape == (1, 8, 64)
        qkv4 = [stack.view(2, 32, 12, 32)]
        out, lse = attn.fa4_forward(qkv4, 2, None, None, 32, True, [], 0)
        assert out.shape == (2, 32, 8, 32) and lse.shape == (2, 8, 32)
        assert attn.fa4_backward(out, qkv4, 2, out, lse, None, None, 32, True, 0)[0].shape == qkv4[0].shape


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

    def varlen(doc_lens, grouping):
        kernel = attn.Fa4Attention(grouping)
        ctx = kernel.prepare(
            DocLayout(doc_lens, 8), None, None, n_heads=2, n_kv_heads=2, dtype=torch.bfloat16, device="cpu"
        )
        assert isinstance(ctx.plan, attn.Fa4Plan) and ctx.plan.window == 0
        return ctx.plan.varlen

    alone = varlen([[3, 5], [2], [8]], "per_document")  # 5 segments -> 6 boundaries, bucketed to 8 entries
    assert alone.seg_pos is None and alone.cu_seqlens.dtype == torch.int32
    assert alone.cu_seqlens.tolist() == [0, 3, 8, 10, 16, 24, 24, 24]
    grouped = varlen([[3, 5], [2], [8]], "grouped")  # 24 tokens: one group (auto: the same, 24 not a multiple of 128)
    auto = varlen([[3, 5], [2], [8]], "auto")
    assert torch.equal(auto.cu_seqlens, grouped.cu_seqlens) and torch.equal(auto.seg_pos, grouped.seg_pos)
    assert grouped.cu_seqlens.tolist() == [0, 24, 24, 24]
    assert grouped.seg_pos.dtype == torch.int32
    assert grouped.seg_pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 5, *range(8)]
    assert varlen([[8], [5]], "auto") is None  # one document per row: dense causal
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
    monkeypatch.setitem(sys.modules, "lit_xf.attention.fa4.mask", types.SimpleNamespace(segment_causal=mask))
    cu, seg_pos = torch.zeros(4, dtype=torch.int32), torch.zeros(8, dtype=torch.int32)
    grouped = _fa4_varlen_kwargs(cu, seg_pos, 8, True)
    assert grouped["causal"] is False and grouped["mask_mod"] is mask and grouped["aux_tensors"] == [seg_pos]
    assert grouped["cu_seqlens_q"] is cu and grouped["cu_seqlens_k"] is cu and grouped["max_seqlen_q"] == 8
    alone = _fa4_varlen_kwargs(cu, None, 8, True)
    assert alone["causal"] is True and "mask_mod" not in alone and alone["max_seqlen_k"] == 8
    assert _fa4_varlen_kwargs(None, None, 8, False) == {"causal": False}
    # block-sparse forward: one dense sequence under the block lists and the CuTe mask (cu_seqlens,
    # for the backward, not passed)
    fake_lists = types.SimpleNamespace(BlockSparseTensorsTorch=lambda *lists, block_size: (lists, block_size))
    monkeypatch.setitem(sys.modules, "flash_attn.cute.block_sparsity", fake_lists)
    blocks = [torch.full((1,), n, dtype=torch.int32) for n in range(4)]
    kw = _fa4_varlen_kwargs(cu, seg_pos, 8, True, blocks)
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
    """[q, k, v] as given, or the views of [stack]."""
    return qkv[0].split((qkv[0].shape[-2] - 2 * G, G, G), dim=-2) if len(qkv) == 1 else qkv


def like_qkv(grads, qkv):
    """dq, dk, dv shaped as qkv: one stack or three tensors."""
    return [torch.cat(grads, dim=-2)] if len(qkv) == 1 else list(grads)


@pytest.fixture
def fa4_ops_on_cpu():
    """CPU kernels for lit_xf's two FA4 ops (the stand-in above), so the plans, reshapes and
    autograd wiring around FA4 run without a GPU."""
    lib = torch.library.Library("lit_xf", "IMPL")
    seen = []  # the storage of every tensor the forward op received

    def forward(qkv, G, cu, seg_pos, _, causal, blocks, window):
        seen.append([t.untyped_storage().data_ptr() for t in qkv])
        return _fa4_stand_in(*split_qkv(qkv, G), cu, seg_pos, causal, blocks, window)

    lib.impl("fa4_forward", forward, "CPU")
    lib.impl(
        "fa4_backward",
        lambda dout, qkv, G, out, lse, cu, seg_pos, _, causal, window: like_qkv(
            _fa4_stand_in(*split_qkv(qkv, G), cu, seg_pos, causal, (), window, dout), qkv
        ),
        "CPU",
    )
    yield seen
    lib._destroy()


@pytest.mark.parametrize("call", ["stacked", "apart"])
@pytest.mark.parametrize("kv", ["mha", "gqa"])
@pytest.mark.parametrize("plan", ["fa4:grouped", "fa4:per_document", "fa4:block_sparse", "fa4 dense"])
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


@pytest.mark.parametrize("plan", ["fa4:per_document", "fa4:block_sparse", "fa4 dense"])
def test_fa4_reads_q_k_v_apart_without_a_copy(fa4_ops_on_cpu, plan):
    """q, k, v apart (after RoPE) reach FA4 as they are, not copied into a stack, and their
    gradients come back contiguous (a stack's views would make every consumer copy them)."""
    doc_lens = [[3, 40, 85], [128]] if plan != "fa4 dense" else [[128]] * 2
    layout = DocLayout(doc_lens, 128)
    qkv = random_qkv(torch.Generator().manual_seed(3), 2, 128, 4, 2, 16, torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in qkv)
    kernel = attn.make_kernel(plan.split()[0])
    ctx = kernel.prepare(layout, layout.position_ids(), None, n_heads=4, n_kv_heads=2, dtype=q.dtype, device=q.device)
    kernel(q, k, v, ctx).sum().backward()
    assert fa4_ops_on_cpu == [[t.untyped_storage().data_ptr() for t in (q, k, v)]]
    assert all(t.grad is not None and t.grad.is_contiguous() for t in (q, k, v))


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
    assert attn.fa4_grouping_pays(lognormal_doc_lens(256, 32, 2048))
    assert not attn.fa4_grouping_pays(lognormal_doc_lens(256, 422, 2048))  # anchors.md's packed workload
    assert not attn.fa4_grouping_pays([2048] * 8)
    assert not attn.fa4_grouping_pays([100, 100, 100])  # no two fit a tile: nothing to gain


# --------------------------------------------------------------------------------------------
# Sliding windows
# --------------------------------------------------------------------------------------------


def test_fa4_windowless_plans_refuse_a_window():
    for plan in ("fa4:grouped", "fa4:block_sparse"):
        with pytest.raises(ValueError, match=f"attention='{plan}' has no sliding window.*'fa4:per_document'"):
            TinyGPT(attention=plan, attention_window=8)
        with pytest.raises(ValueError, match="has no sliding window"):
            attn.fa4_varlen(DocLayout([[30, 98], [128]], 128, window=8), plan.split(":")[1])


@pytest.mark.parametrize("window", [7, 64])
@pytest.mark.parametrize("plan", ["fa4", "fa4 dense"])
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
    fwd = _fa4_varlen_kwargs(None, None, 8, True, window=5)
    assert fwd == {"causal": True, "window_size": (4, 0)}
    bwd = _fa4_varlen_kwargs(None, None, 8, True, window=5, backward=True)
    assert bwd == {"causal": True, "window_size_left": 4, "window_size_right": 0}
    assert _fa4_varlen_kwargs(None, None, 8, True, window=0) == {"causal": True}


# --------------------------------------------------------------------------------------------
# GPU: every plan in bf16 against the float64 reference
# --------------------------------------------------------------------------------------------


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
