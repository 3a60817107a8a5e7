"""FlashAttention-4 (optional ``flash-attn-4``): ``plans`` (the host-built sequences and block lists
of packed rows), ``ops`` (the ``lit_xf::fa4_forward``/``fa4_backward`` custom ops), ``mask`` (the
CuTe mask of grouped sequences; imports flash-attn-4's CuTe DSL, so only the ops import it, when
they run) and ``kernel`` (``Fa4Attention``)."""

from lit_xf.attention.fa4.kernel import Fa4Attention, Fa4Plan
from lit_xf.attention.fa4.ops import fa4_backward, fa4_forward
from lit_xf.attention.fa4.plans import (
    FA4_BLOCK,
    FA4_GROUP_TOKENS,
    FA4_GROUPED_TILE_RATIO,
    FA4_WINDOWLESS_PLANS,
    Fa4Varlen,
    bucketed_bounds,
    fa4_block_sparse,
    fa4_grouping_pays,
    fa4_varlen,
    group_bounds,
    segment_positions,
)

__all__ = [
    "FA4_BLOCK",
    "FA4_GROUPED_TILE_RATIO",
    "FA4_GROUP_TOKENS",
    "FA4_WINDOWLESS_PLANS",
    "Fa4Attention",
    "Fa4Plan",
    "Fa4Varlen",
    "bucketed_bounds",
    "fa4_backward",
    "fa4_block_sparse",
    "fa4_forward",
    "fa4_grouping_pays",
    "fa4_varlen",
    "group_bounds",
    "segment_positions",
]
