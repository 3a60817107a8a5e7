"""Attention kernels behind one interface, and the document layout they mask by.

Every kernel computes, for query token i of head h (K = head dim, G kv heads shared by H/G query
heads each, so query head h reads kv head ⌊h·G/H⌋):

    out_i = Σ_j softmax_j( q_i·k_j / √K + b_h(i, j) ) v_j,   j ranging over keys i may see:
    j ≤ i and j in i's document (causal within documents; rows without packing: plain causal),
    and with a sliding window of W tokens also i − j < W (the W most recent keys, i's own included)
    b_h(i, j) = −m_h · |pos_i − pos_j| with ALiBi (slope m_h), 0 otherwise.

Modules: ``layout`` (``DocLayout``: which pairs attend, and how many), ``base`` (the kernel
interface), one per kernel family (``naive``, ``sdpa``, ``xformers``, ``flex``, ``fa4``), ``auto``
(the kernel measured fastest per case) and ``auto_cache`` (its choices on disk), ``kernels`` (names
-> kernels), ``probes`` (what runs here, import workarounds), ``positions`` and ``dense`` (ALiBi,
dense biases), ``reference`` (float64 attention for tests and the correctness benchmark).

Usage: ``kernel = make_kernel(name)``; once per forward ``ctx = kernel.prepare(layout,
position_ids, alibi_slopes, ...)``; in every layer ``out_BTHK = kernel(q_BTHK, k_BTGK, v_BTGK, ctx)``.
"""

from lit_xf.attention.auto import AUTO_CANDIDATES, AutoAttention, AutoCase, AutoChoice
from lit_xf.attention.auto_cache import default_cache_dir
from lit_xf.attention.base import (
    AttentionContext,
    AttentionKernel,
    AttentionPlan,
    describe_config,
    repeat_kv,
    split_qkv,
)
from lit_xf.attention.dense import dense_bias, dense_bias_bytes
from lit_xf.attention.fa4 import (
    FA4_BLOCK,
    FA4_GROUP_TOKENS,
    FA4_GROUPED_TILE_RATIO,
    FA4_WINDOWLESS_PLANS,
    Fa4Attention,
    Fa4Plan,
    Fa4Varlen,
    bucketed_bounds,
    fa4_backward,
    fa4_block_sparse,
    fa4_forward,
    fa4_grouping_pays,
    fa4_varlen,
    group_bounds,
    segment_positions,
)
from lit_xf.attention.flex import FlexAttention, FlexPlan, flex_trainable_kv_heads
from lit_xf.attention.kernels import (
    ATTENTION_CHOICES,
    KERNEL_NAMES,
    KERNELS,
    KernelName,
    kernel_report,
    make_kernel,
)
from lit_xf.attention.layout import DocLayout, attended_pairs, bias_on_device, causal_window, check_window
from lit_xf.attention.naive import NaiveAttention, NaivePlan
from lit_xf.attention.positions import POSITION_SCHEMES, PositionScheme, alibi_bias, alibi_slopes
from lit_xf.attention.probes import fa4_problem, import_xformers_ops, xformers_problem
from lit_xf.attention.sdpa import SdpaAttention, SdpaPlan
from lit_xf.attention.xformers import XFORMERS_DENSE_BIAS_BUDGET_BYTES, XformersAttention, XformersPlan

__all__ = [
    "ATTENTION_CHOICES",
    "AUTO_CANDIDATES",
    "FA4_BLOCK",
    "FA4_GROUPED_TILE_RATIO",
    "FA4_GROUP_TOKENS",
    "FA4_WINDOWLESS_PLANS",
    "KERNELS",
    "KERNEL_NAMES",
    "POSITION_SCHEMES",
    "XFORMERS_DENSE_BIAS_BUDGET_BYTES",
    "AttentionContext",
    "AttentionKernel",
    "AttentionPlan",
    "AutoAttention",
    "AutoCase",
    "AutoChoice",
    "DocLayout",
    "bias_on_device",
    "Fa4Attention",
    "Fa4Plan",
    "Fa4Varlen",
    "FlexAttention",
    "FlexPlan",
    "KernelName",
    "NaiveAttention",
    "NaivePlan",
    "PositionScheme",
    "SdpaAttention",
    "SdpaPlan",
    "XformersAttention",
    "XformersPlan",
    "alibi_bias",
    "alibi_slopes",
    "attended_pairs",
    "bucketed_bounds",
    "causal_window",
    "check_window",
    "default_cache_dir",
    "dense_bias",
    "dense_bias_bytes",
    "describe_config",
    "fa4_backward",
    "fa4_block_sparse",
    "fa4_forward",
    "fa4_grouping_pays",
    "fa4_problem",
    "fa4_varlen",
    "flex_trainable_kv_heads",
    "group_bounds",
    "import_xformers_ops",
    "kernel_report",
    "make_kernel",
    "repeat_kv",
    "segment_positions",
    "split_qkv",
    "xformers_problem",
]
