"""The CuTe mask FlashAttention-4 applies when lit_xf groups several short segments (documents or
padding) into one varlen sequence. Imported only where ``flash-attn-4`` is installed."""

import cutlass
import cutlass.cute as cute


@cute.jit
def segment_causal(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
    """Query i sees key j (both indices within the sequence) iff j ≤ i and i − j ≤ p_i, where
    p_i = ``aux_tensors[0][offset_q + i]`` is token i's position in its segment: causal attention
    confined to i's segment, since segments are contiguous."""
    seg_pos = aux_tensors[0]
    token = cute.make_rmem_tensor(1, cutlass.Int32)
    token.store(q_idx + seqlen_info.offset_q)
    reach = cute.make_rmem_tensor(1, cutlass.Int32)
    reach[0] = seg_pos[token[0]]
    return (kv_idx <= q_idx) & (q_idx - kv_idx <= reach.load())
