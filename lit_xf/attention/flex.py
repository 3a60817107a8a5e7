"""``flex``: FlexAttention, the mask as a ``BlockMask``, ALiBi as a ``score_mod``."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from lit_xf.attention.base import AttentionContext, AttentionKernel, AttentionPlan, repeat_kv
from lit_xf.attention.layout import DocLayout, causal_window


@dataclass(frozen=True)
class FlexPlan(AttentionPlan):
    """The ``BlockMask`` of the batch's layout (None: full attention, non-causal rows without blocks)."""

    block_mask: Any


class FlexAttention(AttentionKernel[FlexPlan]):
    """FlexAttention: the document mask and sliding window as a ``BlockMask`` (built once per
    forward from segment ids by one compiled function, so new batches don't recompile), ALiBi as a
    ``score_mod``, native GQA. O(T) memory. Compiled on CUDA; on CPU it runs eagerly and has no
    backward."""

    name = "flex"

    def support(self, *, device, n_heads, n_kv_heads, alibi, training, seq_len=None):
        if training and torch.device(device).type != "cuda":
            return "FlexAttention has no backward on CPU"
        return None

    def _plan(self, ctx: AttentionContext[FlexPlan], *, n_heads, dtype, device) -> FlexPlan:
        return FlexPlan(_flex_block_mask(ctx.layout, torch.device(device)))

    def _attend(self, q_BTHK, k_BTGK, v_BTGK, ctx: AttentionContext[FlexPlan]):
        from torch.nn.attention.flex_attention import flex_attention

        T, H, G = q_BTHK.shape[1], q_BTHK.shape[2], k_BTGK.shape[2]
        if q_BTHK.is_cuda and torch.is_grad_enabled() and (G := flex_trainable_kv_heads(H, G, T)):
            k_BTGK, v_BTGK = repeat_kv(k_BTGK, G), repeat_kv(v_BTGK, G)
        q, k, v = (x.transpose(1, 2) for x in (q_BTHK, k_BTGK, v_BTGK))
        score_mod = None
        if ctx.slopes is not None:
            pos_BT, slopes_H = ctx.position_ids, ctx.slopes.to(q.device)

            def score_mod(score, b, h, q_idx, kv_idx):
                return score - slopes_H[h] * (pos_BT[b, q_idx] - pos_BT[b, kv_idx]).abs()

        attend = _compiled_flex() if q.is_cuda else flex_attention
        out = attend(q, k, v, score_mod=score_mod, block_mask=ctx.plan.block_mask, enable_gqa=k.shape[1] != q.shape[1])
        return out.transpose(1, 2)


def flex_trainable_kv_heads(n_heads: int, n_kv_heads: int, seq_len: int) -> int | None:
    """kv heads to repeat K/V to so compiled flex can train, or ``None`` if ``n_kv_heads`` is fine.

    With more than 2 query heads per kv head and ``seq_len % 128 != 0``, inductor (torch 2.11) finds
    no kernel for flex's backward (``NoValidChoicesError``; H200: groups of 4 and 8 fail, 2 passes).
    Groups of 2 (or plain MHA) do: the copies' gradients sum back through the repeat.
    """
    if seq_len % 128 == 0 or n_heads // n_kv_heads <= 2:
        return None
    half = n_heads // 2
    return half if n_heads % 2 == 0 and half % n_kv_heads == 0 else n_heads


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _document_block_mask(seg_BT: torch.Tensor, causal: bool, window: int | None = None):
    from torch.nn.attention.flex_attention import create_block_mask

    def same_doc(b, h, q_idx, kv_idx):
        return seg_BT[b, q_idx] == seg_BT[b, kv_idx]

    def same_doc_causal(b, h, q_idx, kv_idx):
        return causal_window(q_idx, kv_idx, window) & (seg_BT[b, q_idx] == seg_BT[b, kv_idx])

    B, T = seg_BT.shape
    return create_block_mask(same_doc_causal if causal else same_doc, B, None, T, T, device=seg_BT.device)


@functools.cache
def _causal_block_mask(seq_len: int, device: torch.device, window: int | None = None):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return causal_window(q_idx, kv_idx, window)

    return create_block_mask(causal, None, None, seq_len, seq_len, device=device)


@functools.cache
def _compiled_document_block_mask():
    # One compiled builder: the segment ids are a graph input, so a new batch of the same shape
    # reuses the compiled code instead of recompiling for a new mask_mod closure.
    return torch.compile(_document_block_mask, dynamic=False)


def _flex_block_mask(layout: DocLayout, device: torch.device):
    """``None`` (full attention), a cached causal (sliding-window) mask, or a per-batch document mask."""
    if not layout.block_diagonal:
        return _causal_block_mask(layout.seq_len, device, layout.window) if layout.causal else None
    seg = layout.segment_ids(device)
    build = _compiled_document_block_mask() if device.type == "cuda" else _document_block_mask
    return build(seg, layout.causal, layout.window)
