"""FlashAttention-4 as two ``torch.library`` custom ops, ``lit_xf::fa4_forward`` and
``lit_xf::fa4_backward``, paired by ``register_autograd``: torch.compile sees one opaque op per call
(no graph break, no guards on the batch's layout). flash-attn-4 is imported only when an op runs.
"""

from __future__ import annotations

import torch

from lit_xf.attention.base import split_qkv
from lit_xf.attention.fa4.plans import FA4_BLOCK


# FA4 as two custom ops: torch.compile sees one opaque op per call (no graph break, no guards on the
# batch's layout), and autograd pairs them. qkv is [q, k, v] (separate tensors: RoPE's rotated q and k)
# or [stack], q, k, v stacked along the head axis, C = H + 2G heads (the fused projection's output,
# split into views for FA4); each is [B, T, heads, K] (dense, cu_seqlens None) or [N, heads, K]
# tokens under cu_seqlens. The backward writes dq, dk, dv into tensors shaped like qkv's (one stack
# for a stack: no copy joins them; three contiguous tensors for three: no copy splits them, and the
# forward copies nothing). lse is fp32 [B, H, T] or [H, N]. max_seqlen bounds every sequence (the row
# length T). seg_pos (int32 [N], see Fa4Varlen) marks grouped sequences: FA4 then masks with
# lit_xf.attention.fa4.mask.segment_causal instead of its causal mask. blocks (empty, or the four block lists
# of fa4_block_sparse) makes the forward a dense [1, N] call, block-sparse under that mask; its
# backward takes the same tokens as [N, heads, K] under cu_seqlens.
def q_k_v(qkv: list[torch.Tensor], n_kv_heads: int) -> list[torch.Tensor]:
    """q, k, v: the list itself, or the views of its one stack."""
    return split_qkv(qkv[0], n_kv_heads) if len(qkv) == 1 else list(qkv)


def _fa4_varlen_kwargs(cu_seqlens, seg_pos, max_seqlen, causal, blocks=(), window=0, backward=False) -> dict:
    kw = dict(causal=causal)
    if window and backward:  # FA4's local attention: keys i − (window − 1) .. i
        kw.update(window_size_left=window - 1, window_size_right=0)
    elif window:
        kw["window_size"] = (window - 1, 0)
    if blocks:
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

        kw["block_sparse_tensors"] = BlockSparseTensorsTorch(*blocks, block_size=(FA4_BLOCK, FA4_BLOCK))
    elif cu_seqlens is not None:
        kw.update(cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
    if seg_pos is not None:
        from lit_xf.attention.fa4.mask import segment_causal

        kw.update(causal=False, mask_mod=segment_causal, aux_tensors=[seg_pos])
    return kw


@torch.library.custom_op("lit_xf::fa4_forward", mutates_args=(), device_types="cuda")
def fa4_forward(
    qkv: list[torch.Tensor],
    n_kv_heads: int,
    cu_seqlens: torch.Tensor | None,
    seg_pos: torch.Tensor | None,
    max_seqlen: int,
    causal: bool,
    blocks: list[torch.Tensor],
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ/√K, causal per segment, the ``window`` most recent keys if > 0) v and its
    row-wise log-sum-exp."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    kw = _fa4_varlen_kwargs(cu_seqlens, seg_pos, max_seqlen, causal, blocks, window)
    attend = flash_attn_func if cu_seqlens is None or blocks else flash_attn_varlen_func
    with torch.no_grad():
        out, lse = attend(*q_k_v(qkv, n_kv_heads), return_lse=True, **kw)[:2]
    return out, lse


@fa4_forward.register_fake
def _(qkv, n_kv_heads, cu_seqlens, seg_pos, max_seqlen, causal, blocks, window):
    # FA4 allocates both contiguous
    q = q_k_v(qkv, n_kv_heads)[0]
    H = q.shape[-2]
    varlen = cu_seqlens is not None and not blocks
    lse_shape = (H, q.shape[0]) if varlen else (q.shape[0], H, q.shape[1])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("lit_xf::fa4_backward", mutates_args=(), device_types="cuda")
def fa4_backward(
    dout: torch.Tensor,
    qkv: list[torch.Tensor],
    n_kv_heads: int,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    seg_pos: torch.Tensor | None,
    max_seqlen: int,
    causal: bool,
    window: int,
) -> list[torch.Tensor]:
    """d qkv of ``fa4_forward`` (FA4's own backward kernel): dq, dk, dv written into contiguous
    tensors shaped like ``qkv``'s (one stack, or three)."""
    from flash_attn.cute.interface import _flash_attn_bwd

    kw = _fa4_varlen_kwargs(cu_seqlens, seg_pos, max_seqlen, causal, window=window, backward=True)
    dqkv = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in qkv]
    dq, dk, dv = q_k_v(dqkv, n_kv_heads)
    _flash_attn_bwd(*q_k_v(qkv, n_kv_heads), out, dout, lse, dq=dq, dk=dk, dv=dv, **kw)
    return dqkv


@fa4_backward.register_fake
def _(dout, qkv, n_kv_heads, out, lse, cu_seqlens, seg_pos, max_seqlen, causal, window):
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in qkv]


def _fa4_setup_context(ctx, inputs, output):
    qkv, n_kv_heads, cu_seqlens, seg_pos, max_seqlen, causal, blocks, window = inputs
    ctx.save_for_backward(*qkv, output[0], output[1], cu_seqlens, seg_pos)
    ctx.n_kv_heads, ctx.max_seqlen, ctx.causal, ctx.n_blocks = n_kv_heads, max_seqlen, causal, len(blocks)
    ctx.window = window


def _fa4_grad(ctx, dout, _dlse):
    *qkv, out, lse, cu_seqlens, seg_pos = ctx.saved_tensors
    if ctx.n_blocks:  # a block-sparse forward over [1, N]: the backward runs [N] under cu_seqlens
        dout, out, lse = dout[0], out[0], lse[0]
        qkv = [t[0] for t in qkv]
    dqkv = fa4_backward(
        dout, qkv, ctx.n_kv_heads, out, lse, cu_seqlens, seg_pos, ctx.max_seqlen, ctx.causal, ctx.window
    )
    if ctx.n_blocks:
        dqkv = [g[None] for g in dqkv]
    # one gradient per input, and per tensor of the list input (autograd checks the structure)
    return dqkv, None, None, None, None, None, [None] * ctx.n_blocks, None


fa4_forward.register_autograd(_fa4_grad, setup_context=_fa4_setup_context)
