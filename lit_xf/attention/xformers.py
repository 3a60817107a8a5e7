"""``xformers``: ``xformers.ops.memory_efficient_attention`` with xformers' own bias objects."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lit_xf.attention import probes  # called through the module: one place to stand in for the probes
from lit_xf.attention.base import AttentionContext, AttentionKernel, AttentionPlan, repeat_kv
from lit_xf.attention.dense import dense_bias, dense_bias_bytes

# xformers has no ALiBi: it gets a dense [B, H, T, T] bias. Refuse biases above this many bytes.
XFORMERS_DENSE_BIAS_BUDGET_BYTES = 2 * 2**30


@dataclass(frozen=True)
class XformersPlan(AttentionPlan):
    """xformers' ``attn_bias``: a bias object (``DocLayout.xformers_bias``), None (non-causal full
    rows) or a dense 8-aligned ``[B, H, T, T]`` tensor (ALiBi). ``flat``: the rows run flattened to
    ``[1, B·T]`` under a block-diagonal bias (which holds the segment lengths as Python lists)."""

    bias: Any
    flat: bool = False


class XformersAttention(AttentionKernel[XformersPlan]):
    """``xformers.ops.memory_efficient_attention`` on ``[B, T, H, K]``: ``LowerTriangularMask`` for
    rows of one document; packed rows flattened to ``[1, B·T, H, K]`` under a
    ``BlockDiagonalCausalMask``. GQA repeats K/V to H heads (xformers' 5-D GQA layout has no
    backward). ALiBi only as a dense, 8-aligned ``[B, H, T, T]`` bias, refused above
    ``XFORMERS_DENSE_BIAS_BUDGET_BYTES``."""

    name = "xformers"

    def support(self, *, device, n_heads, n_kv_heads, alibi, training, seq_len=None):
        if torch.device(device).type != "cuda":
            return "xformers' attention kernels are CUDA-only"
        problem = probes.xformers_problem()
        if problem:
            return problem
        if alibi and seq_len is not None:
            need = dense_bias_bytes(1, n_heads, seq_len)
            if need > XFORMERS_DENSE_BIAS_BUDGET_BYTES:
                return (
                    f"ALiBi needs a dense {n_heads}×{seq_len}×{seq_len} bias per row "
                    f"({need / 2**30:.1f} GiB > budget {XFORMERS_DENSE_BIAS_BUDGET_BYTES / 2**30:.0f} GiB)"
                )
        return None

    def _plan(self, ctx: AttentionContext[XformersPlan], *, n_heads, dtype, device) -> XformersPlan:
        layout = ctx.layout
        if ctx.slopes is not None:
            need = dense_bias_bytes(layout.batch_size, n_heads, layout.seq_len, itemsize=torch.finfo(dtype).bits // 8)
            if need > XFORMERS_DENSE_BIAS_BUDGET_BYTES:
                raise ValueError(
                    f"xformers ALiBi bias for this batch needs {need / 2**30:.1f} GiB "
                    f"(budget {XFORMERS_DENSE_BIAS_BUDGET_BYTES / 2**30:.0f} GiB); "
                    "use attention='flex' (O(T) memory) or a smaller batch"
                )
            return XformersPlan(dense_bias(layout, ctx.position_ids, ctx.slopes, n_heads, dtype, device, pad_to=8))
        if ctx.bias is not None:  # built for this layout in a loader worker, moved with the batch
            return XformersPlan(ctx.bias, flat=layout.block_diagonal)
        return XformersPlan(layout.xformers_bias(device), flat=layout.block_diagonal)

    def _traceable(self, ctx: AttentionContext[XformersPlan]) -> bool:
        # A block-diagonal bias carries the batch's segment lengths as Python lists.
        return not ctx.layout.block_diagonal

    def _attend(self, q_BTHK, k_BTGK, v_BTGK, ctx: AttentionContext[XformersPlan]):
        memory_efficient_attention = probes.import_xformers_ops().memory_efficient_attention
        B, T, H, K = q_BTHK.shape
        k, v = repeat_kv(k_BTGK, H), repeat_kv(v_BTGK, H)
        plan = ctx.plan
        if plan.flat:
            flat = (x.reshape(1, B * T, H, K) for x in (q_BTHK, k, v))
            return memory_efficient_attention(*flat, attn_bias=plan.bias).view(B, T, H, K)
        return memory_efficient_attention(q_BTHK, k, v, attn_bias=plan.bias)
