"""``fa4``: FlashAttention-4 through lit_xf's custom ops, with the packed-row plans of ``plans``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lit_xf.attention import probes  # called through the module: one place to stand in for the probes
from lit_xf.attention.base import AttentionContext, AttentionKernel, AttentionPlan
from lit_xf.attention.fa4.ops import fa4_forward
from lit_xf.attention.fa4.plans import Fa4Varlen, fa4_varlen


@dataclass(frozen=True)
class Fa4Plan(AttentionPlan):
    """``varlen``: the sequences of block-diagonal rows (``Fa4Varlen``), or None for dense causal
    rows. ``window``: FA4's local attention over that many keys, 0 where no key is hidden."""

    varlen: Fa4Varlen | None
    window: int = 0

    def describe(self) -> str:
        """Which plan runs the packed rows ('' for dense rows)."""
        if self.varlen is None:
            return ""
        if self.varlen.blocks:
            return "block-sparse forward, grouped backward"
        return "one sequence per document" if self.varlen.seg_pos is None else "documents grouped"


class Fa4Attention(AttentionKernel[Fa4Plan]):
    """FlashAttention-4 (``flash-attn-4``, CuTe DSL kernels JIT-compiled per shape; Hopper and
    Blackwell): rows of one document as a dense causal batch, block-diagonal rows flattened to
    ``[B·T]`` tokens as varlen sequences (``Fa4Varlen``; padding is one more segment). Native GQA.
    fp16/bf16 only. No ALiBi: its ``score_mod`` backward gave NaN gradients with GQA (4.0.0b36,
    docs/attention.md).

    FA4 gives every varlen sequence tiles of its own (128 query rows or more), so a 30-token
    document fills a quarter of one. Causal rows of short documents therefore run grouped:
    consecutive segments share sequences of up to ``FA4_GROUP_TOKENS`` tokens, a CuTe mask keeping
    attention inside each segment. The "block_sparse" plan (for causal rows with B·T a multiple of
    128; else grouped) runs the forward as one sequence of B·T tokens under FA4's block sparsity
    (``fa4_block_sparse``): 128×128 blocks with no visible pair are skipped, blocks inside one
    segment run unmasked, the rest under the same CuTe mask; its backward runs the grouped
    sequences (FA4's block-sparse backward was slower, on the GPU and the host). The grouped
    backward gets no causal tile skipping, so long documents run one sequence each instead.
    ``grouping="auto"`` takes "block_sparse" where grouping needs fewer tiles
    (``fa4_grouping_pays``), else "per_document"; "grouped", "per_document" and "block_sparse"
    force a plan. A sliding window that hides keys runs FA4's local attention (``window_size``):
    dense rows as they are, block-diagonal rows one sequence per segment (the grouped plans' CuTe
    mask has no window, so "grouped" and "block_sparse" refuse such batches).

    Called through the custom ops ``lit_xf::fa4_forward``/``fa4_backward``, so ``torch.compile``
    keeps a call inside its graph. Nothing in a call changes with the batch's documents but tensor
    values: ``cu_seqlens``' length is bucketed to a power of two (padded with zero-length
    sequences) and ``max_seqlen`` is the row length T, so new packed batches reuse compiled graphs."""

    name = "fa4"
    dtypes = (torch.float16, torch.bfloat16)
    GROUPINGS = ("auto", "grouped", "per_document", "block_sparse")

    def __init__(self, grouping: str = "auto"):
        if grouping not in self.GROUPINGS:
            raise ValueError(f"fa4 grouping={grouping!r}; choose one of {', '.join(self.GROUPINGS)}")
        self.grouping = grouping

    def support(self, *, device, n_heads, n_kv_heads, alibi, training, seq_len=None):
        if torch.device(device).type != "cuda":
            return "FlashAttention-4 is CUDA-only"
        problem = probes.fa4_problem()
        if problem:
            return problem
        if alibi:
            return "lit_xf does not run ALiBi on FlashAttention-4 (its score_mod backward gives NaN gradients with GQA)"
        return None

    def _plan(self, ctx: AttentionContext[Fa4Plan], *, n_heads, dtype, device) -> Fa4Plan:
        layout = ctx.layout
        window = layout.window if layout.windowed else 0  # 0: no window
        if not layout.block_diagonal:
            return Fa4Plan(None, window)
        return Fa4Plan(fa4_varlen(layout, self.grouping).to(device), window)

    def _attend(self, q_BTHK, k_BTGK, v_BTGK, ctx: AttentionContext[Fa4Plan]):
        # q, k, v apart (RoPE's rotated q and k): FA4 reads them as they are, and its backward
        # writes three contiguous gradients (a stack here would copy q, k, v and keep the copy)
        return self._run([q_BTHK, k_BTGK, v_BTGK], k_BTGK.shape[2], ctx)

    def attend_qkv(self, qkv_BTCK, n_kv_heads, ctx: AttentionContext[Fa4Plan]):
        return self._run([qkv_BTCK], n_kv_heads, ctx)

    def _run(self, qkv: list[torch.Tensor], G: int, ctx: AttentionContext[Fa4Plan]) -> torch.Tensor:
        """FA4 on ``qkv`` ([q, k, v] or [stack], each [B, T, heads, K]): dense rows as they are,
        block-diagonal rows as N = B·T tokens ([N, heads, K], or [1, N, heads, K] block-sparse)."""
        causal, window, varlen = ctx.layout.causal, ctx.plan.window, ctx.plan.varlen
        B, T, _, K = qkv[0].shape
        H = qkv[0].shape[2] - 2 * G if len(qkv) == 1 else qkv[0].shape[2]
        if varlen is None:
            return fa4_forward(qkv, G, None, None, T, causal, [], window)[0]
        if varlen.blocks:  # one sequence of N = B·T tokens
            tokens = [t.reshape(1, B * T, *t.shape[2:]) for t in qkv]
            args = (varlen.cu_seqlens, varlen.seg_pos, T, causal, list(varlen.blocks), window)
        else:
            tokens = [t.reshape(B * T, *t.shape[2:]) for t in qkv]
            args = (varlen.cu_seqlens, varlen.seg_pos, T, causal, [], window)
        return fa4_forward(tokens, G, *args)[0].view(B, T, H, K)

    def __repr__(self) -> str:
        return f"Fa4Attention(grouping={self.grouping!r})"
