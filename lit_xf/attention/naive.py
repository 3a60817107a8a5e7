"""``naive``: the reference kernel, scores materialized."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lit_xf.attention.base import AttentionContext, AttentionKernel, AttentionPlan, repeat_kv
from lit_xf.attention.dense import dense_bias


@dataclass(frozen=True)
class NaivePlan(AttentionPlan):
    """The additive bias ``[B, 1|H, T, T]``: −inf outside the mask, ALiBi inside (``dense_bias``)."""

    bias_BHTT: torch.Tensor


class NaiveAttention(AttentionKernel[NaivePlan]):
    """The reference: softmax(q kᵀ/√K + bias) v with the B×H×T×T scores materialized."""

    name = "naive"

    def _plan(self, ctx: AttentionContext[NaivePlan], *, n_heads, dtype, device) -> NaivePlan:
        return NaivePlan(dense_bias(ctx.layout, ctx.position_ids, ctx.slopes, n_heads, dtype, device))

    def _attend(self, q_BTHK, k_BTGK, v_BTGK, ctx: AttentionContext[NaivePlan]):
        H, K = q_BTHK.shape[2], q_BTHK.shape[3]
        q, k, v = (x.transpose(1, 2) for x in (q_BTHK, repeat_kv(k_BTGK, H), repeat_kv(v_BTGK, H)))
        scores_BHTT = q @ k.transpose(-1, -2) / math.sqrt(K) + ctx.plan.bias_BHTT
        return (scores_BHTT.softmax(-1) @ v).transpose(1, 2)
