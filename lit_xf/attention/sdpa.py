"""``sdpa``: PyTorch's ``scaled_dot_product_attention``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_xf.attention.base import AttentionContext, AttentionKernel, AttentionPlan
from lit_xf.attention.dense import dense_bias

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SdpaPlan(AttentionPlan):
    """SDPA's ``attn_mask``: None (``is_causal`` for causal rows, nothing otherwise), a bool mask
    ``[B, 1, T, T]`` (packed rows, sliding windows) or a float bias ``[B, H, T, T]`` (ALiBi)."""

    mask_BHTT: torch.Tensor | None


class SdpaAttention(AttentionKernel[SdpaPlan]):
    """``F.scaled_dot_product_attention``: ``is_causal`` for rows of one document (cuDNN / flash on
    GPU), a dense boolean mask for packed rows and sliding windows, a dense float bias for ALiBi.
    GQA through ``enable_gqa`` (no K/V copies)."""

    name = "sdpa"
    _warned_dense = False

    def _plan(self, ctx: AttentionContext[SdpaPlan], *, n_heads, dtype, device) -> SdpaPlan:
        dense = ctx.layout.block_diagonal or ctx.layout.windowed
        if ctx.slopes is not None or dense:
            self.warn_dense(device)
        if ctx.slopes is not None:
            return SdpaPlan(dense_bias(ctx.layout, ctx.position_ids, ctx.slopes, n_heads, dtype, device))
        if dense:
            return SdpaPlan(ctx.layout.dense_mask(device)[:, None])
        return SdpaPlan(None)

    @classmethod
    def warn_dense(cls, device) -> None:
        """Once per process on CUDA: a dense mask sends SDPA down its slow path."""
        if torch.device(device).type == "cuda" and not cls._warned_dense:
            cls._warned_dense = True
            log.warning(
                "attention='sdpa' with packed rows, a sliding window or ALiBi builds a dense [B, (H,) T, T] "
                "mask and runs SDPA's slow path, O(T²) memory (docs/benchmarks.md, 'Padded vs packed'); "
                "attention='auto' times the kernels with block-diagonal masks and keeps the fastest"
            )

    def _attend(self, q_BTHK, k_BTGK, v_BTGK, ctx: AttentionContext[SdpaPlan]):
        q, k, v = (x.transpose(1, 2) for x in (q_BTHK, k_BTGK, v_BTGK))
        gqa = k.shape[1] != q.shape[1]
        mask = ctx.plan.mask_BHTT
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=ctx.layout.causal, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return out.transpose(1, 2)
