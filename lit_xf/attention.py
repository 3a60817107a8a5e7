"""Attention kernels behind one interface, and the document layout they mask by.

Every kernel computes, for query token i of head h (K = head dim, G kv heads shared by H/G query
heads each, so query head h reads kv head ⌊h·G/H⌋):

    out_i = Σ_j softmax_j( q_i·k_j / √K + b_h(i, j) ) v_j,   j ranging over keys i may see:
    j ≤ i and j in i's document (causal within documents; rows without packing: plain causal),
    and with a sliding window of W tokens also i − j < W (the W most recent keys, i's own included)
    b_h(i, j) = −m_h · |pos_i − pos_j| with ALiBi (slope m_h), 0 otherwise.

Kernels: ``naive`` (materializes the B×H×T×T scores; the reference), ``sdpa`` (PyTorch
``scaled_dot_product_attention``), ``xformers`` (``memory_efficient_attention`` with xformers' bias
objects), ``flex`` (FlexAttention: document ``BlockMask``, ALiBi ``score_mod``), ``fa4``
(FlashAttention-4: varlen for packed rows, optional ``flash-attn-4``) and ``auto`` (picks per device
and batch layout; see ``AUTO_PREFERENCE``).

Usage: ``kernel = make_kernel(name)``; once per forward ``ctx = kernel.prepare(layout,
position_ids, alibi_slopes)``; in every layer ``out_BTHK = kernel(q_BTHK, k_BTGK, v_BTGK, ctx)``.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import itertools
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# A kernel, or fa4 with its packed-row plan forced (``Fa4Attention.GROUPINGS``)
KernelName = Literal[
    "auto", "naive", "sdpa", "xformers", "flex", "fa4", "fa4:grouped", "fa4:per_document", "fa4:block_sparse"
]
PositionScheme = Literal["learned", "rope", "alibi", "none"]
ATTENTION_CHOICES: tuple[str, ...] = get_args(KernelName)
KERNEL_NAMES: tuple[str, ...] = tuple(n for n in ATTENTION_CHOICES if ":" not in n)
POSITION_SCHEMES: tuple[str, ...] = get_args(PositionScheme)

# xformers has no ALiBi: it gets a dense [B, H, T, T] bias. Refuse biases above this many bytes.
XFORMERS_DENSE_BIAS_BUDGET_BYTES = 2 * 2**30


# --------------------------------------------------------------------------------------------
# The facts a batch carries: document lengths per row.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DocLayout:
    """Documents of each row: ``doc_lens[b]`` lists row b's document lengths in order; tokens past
    ``sum(doc_lens[b])`` are padding. Tokens attend within their document, causally unless
    ``causal=False``. A causal row with one document needs only a plain causal mask (padding follows
    every real token, so no real token sees it); otherwise each row is block-diagonal, padding
    being one more block. ``window`` (causal only): each query sees at most the ``window`` most
    recent keys of its block, itself included (sliding-window attention); None: all of them."""

    doc_lens: tuple[tuple[int, ...], ...]
    seq_len: int
    causal: bool
    window: int | None

    def __init__(self, doc_lens, seq_len: int, causal: bool = True, window: int | None = None):
        check_window(window, causal)
        rows = tuple(tuple(map(int, row)) for row in doc_lens)
        for b, row in enumerate(rows):
            if not row or min(row) < 1 or sum(row) > seq_len:
                raise ValueError(
                    f"doc_lens row {b} = {list(row)}: need at least one document, lengths >= 1, summing to at most "
                    f"seq_len={seq_len}"
                )
        object.__setattr__(self, "doc_lens", rows)
        object.__setattr__(self, "seq_len", int(seq_len))
        object.__setattr__(self, "causal", bool(causal))
        object.__setattr__(self, "window", window)

    @classmethod
    def full_rows(cls, batch_size: int, seq_len: int, causal: bool = True, window: int | None = None) -> DocLayout:
        """One document filling each row."""
        return cls([[seq_len]] * batch_size, seq_len, causal, window)

    @functools.cached_property
    def windowed(self) -> bool:
        """The window hides some key from some real query: a document is longer than it (what
        padding queries see is never used)."""
        return self.window is not None and any(n > self.window for row in self.doc_lens for n in row)

    @property
    def batch_size(self) -> int:
        return len(self.doc_lens)

    @functools.cached_property
    def packed(self) -> bool:
        """Some row holds several documents."""
        return any(len(row) > 1 for row in self.doc_lens)

    @functools.cached_property
    def block_diagonal(self) -> bool:
        """The mask needs blocks: packed rows, or padding that non-causal attention would see."""
        return self.packed or (not self.causal and any(sum(row) < self.seq_len for row in self.doc_lens))

    def segment_lens(self) -> list[list[int]]:
        """Per row, the blocks attention is confined to: the documents, then the padding (if any)
        as one more block. Each row sums to ``seq_len``."""
        out = []
        for row in self.doc_lens:
            pad = self.seq_len - sum(row)
            out.append(list(row) + ([pad] if pad else []))
        return out

    def segment_ids(self, device=None) -> torch.Tensor:
        """``[B, T]`` index of each token's block within its row (all zeros without blocks)."""
        if not self.block_diagonal:
            return torch.zeros(self.batch_size, self.seq_len, dtype=torch.long, device=device)
        ids = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in self.segment_lens()]
        return torch.stack(ids).to(device)

    def position_ids(self, device=None) -> torch.Tensor:
        """``[B, T]`` position of each token inside its document; padding continues counting."""
        rows = []
        for row in self.doc_lens:
            tail = self.seq_len - sum(row[:-1])  # the last document and the padding after it
            rows.append(torch.cat([torch.arange(n) for n in row[:-1]] + [torch.arange(tail)]))
        return torch.stack(rows).to(device)

    def dense_mask(self, device=None) -> torch.Tensor:
        """``[B, T, T]`` bool, True where query i may attend key j."""
        seg = self.segment_ids(device)
        same_block = seg[:, :, None] == seg[:, None, :]
        if not self.causal:
            return same_block
        t = torch.arange(self.seq_len, device=device)
        return _causal_window(t[:, None], t[None, :], self.window)[None] & same_block

    def xformers_bias(self, device=None):
        """The matching xformers bias: ``LowerTriangularMask`` (or None when not causal) without
        blocks, else a ``BlockDiagonal[Causal]Mask`` over all rows flattened to ``[1, B·T]``
        (xformers' block-diagonal biases need batch size 1); their local-attention forms with a
        window."""
        bias = import_xformers_ops().fmha.attn_bias
        if not self.block_diagonal:
            if not self.causal:
                return None
            if self.window is None:
                return bias.LowerTriangularMask()
            return bias.LowerTriangularFromBottomRightLocalAttentionMask(self.window)  # T×T: bottom right = top left
        flat = [n for row in self.segment_lens() for n in row]
        if not self.causal:
            return bias.BlockDiagonalMask.from_seqlens(flat, device=device)
        mask = bias.BlockDiagonalCausalMask.from_seqlens(flat, device=device)
        return mask if self.window is None else mask.make_local_attention(self.window)


def check_window(window, causal: bool = True) -> None:
    """Raise ``ValueError`` unless ``window`` is None or a positive int (with causal attention)."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"attention_window must be a positive number of tokens or None, got {window!r}")
    if not causal:
        raise ValueError("attention_window is a causal sliding window; it needs causal attention")


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): for n a power of two, m_h = 2^(−8h/n), h = 1..n.
    Otherwise the n' = 2^⌊log2 n⌋ slopes, then every other slope of the 2n' sequence."""

    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    base = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(base) + powers(2 * base)[0::2][: n_heads - base]
    return torch.tensor(slopes, dtype=torch.float32)


def repeat_kv(x_BTGK: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[B, T, G, K] -> [B, T, H, K]``, each kv head repeated for its H/G query heads."""
    B, T, G, K = x_BTGK.shape
    if G == n_heads:
        return x_BTGK
    return x_BTGK[:, :, :, None, :].expand(B, T, G, n_heads // G, K).reshape(B, T, n_heads, K)


def _alibi_bias(position_ids: torch.Tensor, slopes: torch.Tensor, dtype) -> torch.Tensor:
    """``[B, H, T, T]`` additive bias −m_h·|pos_i − pos_j| (symmetric, so non-causal attention is
    penalized by distance both ways), computed in float32 (float64 for float64) and rounded once to
    ``dtype`` — in bf16 that rounding grows with distance; flex keeps the bias in float32."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    dist = (position_ids[:, None, :, None] - position_ids[:, None, None, :]).abs().to(compute)
    return (-slopes.to(dist.device, compute)[None, :, None, None] * dist).to(dtype)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@dataclass
class AttentionContext:
    """What ``prepare`` built once per forward and every layer shares."""

    kernel: AttentionKernel
    layout: DocLayout
    position_ids: torch.Tensor | None  # [B, T]
    slopes: torch.Tensor | None  # [H] ALiBi slopes or None
    bias: Any = None  # the kernel's own mask / bias object
    # False: torch.compile must not trace the kernel call (its bias holds per-batch Python values,
    # which would be guarded on and recompile every batch); it runs eagerly between graphs.
    traceable: bool = True


class AttentionKernel:
    """One attention implementation. Subclasses set ``name`` and implement ``support`` (why a
    configuration can't run, or None), ``_bias`` and ``_attend``."""

    name = "base"
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any dtype

    def support(
        self,
        *,
        device: torch.device,
        n_heads: int,
        n_kv_heads: int,
        alibi: bool,
        training: bool,
        seq_len: int | None = None,
    ) -> str | None:
        return None

    def check(self, **config) -> None:
        """Raise ``ValueError`` naming the combination and the kernels that would run it."""
        reason = self.support(**config)
        if reason:
            ok = [n for n in KERNEL_NAMES[1:] if make_kernel(n).support(**config) is None]
            raise ValueError(
                f"attention={self.name!r} can't run {_describe(config)}: {reason}. "
                f"Kernels that can: {', '.join(ok) or 'none'}."
            )

    def dtype_problem(self, dtype: torch.dtype) -> str | None:
        """Why this kernel can't compute in ``dtype``, or ``None`` if it can."""
        if self.dtypes is None or dtype in self.dtypes:
            return None
        return f"runs {'/'.join(_SHORT_DTYPE_NAMES.get(d, str(d)) for d in self.dtypes)} only, not {dtype}"

    def prepare(
        self,
        layout: DocLayout,
        position_ids: torch.Tensor | None,
        slopes: torch.Tensor | None,
        *,
        n_heads: int,
        n_kv_heads: int,
        dtype: torch.dtype,
        device,
        head_dim: int | None = None,
    ) -> AttentionContext:
        """The per-batch context (bias, plan) for ``layout``; ``head_dim`` informs ``auto``'s choice."""
        problem = self.dtype_problem(dtype)
        if problem is not None:
            raise ValueError(
                f"attention={self.name!r} {problem}: train with precision 'bf16-mixed' or '16-mixed', "
                "or choose attention='auto'"
            )
        ctx = AttentionContext(self, layout, position_ids, slopes)
        ctx.bias = self._bias(ctx, n_heads=n_heads, dtype=dtype, device=device)
        ctx.traceable = self._traceable(ctx)
        return ctx

    def __call__(self, q_BTHK, k_BTGK, v_BTGK, ctx: AttentionContext) -> torch.Tensor:
        if ctx.traceable:
            return ctx.kernel._attend(q_BTHK, k_BTGK, v_BTGK, ctx)
        return _attend_eagerly(q_BTHK, k_BTGK, v_BTGK, ctx)

    def attend_qkv(self, qkv_BTCK: torch.Tensor, n_kv_heads: int, ctx: AttentionContext) -> torch.Tensor:
        """Attention of q, k, v stacked along the head axis (C = H + 2G, the fused projection's
        layout): ``[B, T, C, K] -> [B, T, H, K]``. Kernels that take the stack whole (fa4) write
        its gradient in one buffer; the others split it into views."""
        return self(*_split_qkv(qkv_BTCK, n_kv_heads), ctx)

    def _bias(self, ctx, *, n_heads, dtype, device):
        return None

    def _traceable(self, ctx) -> bool:
        return True

    def _attend(self, q_BTHK, k_BTGK, v_BTGK, ctx) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@torch.compiler.disable
def _attend_eagerly(q_BTHK, k_BTGK, v_BTGK, ctx: AttentionContext) -> torch.Tensor:
    return ctx.kernel._attend(q_BTHK, k_BTGK, v_BTGK, ctx)


_SHORT_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _describe(config: dict) -> str:
    dev = torch.device(config["device"]).type
    gqa = f"GQA {config['n_heads']}q/{config['n_kv_heads']}kv" if config["n_kv_heads"] != config["n_heads"] else "MHA"
    return f"{gqa}{' + ALiBi' if config['alibi'] else ''} {'training' if config['training'] else 'inference'} on {dev}"


def _dense_bias(ctx: AttentionContext, n_heads: int, dtype, device, pad_to: int = 1) -> torch.Tensor | None:
    """Additive float bias ``[B, 1|H, T, T]``: −inf outside the mask, ALiBi inside. With ``pad_to``,
    sliced from a buffer whose last dim is a multiple of it (xformers wants stride(-2) % 8 == 0)."""
    layout = ctx.layout
    T = layout.seq_len
    heads = n_heads if ctx.slopes is not None else 1
    buf = torch.zeros(layout.batch_size, heads, T, -(-T // pad_to) * pad_to, dtype=dtype, device=device)
    bias = buf[..., :T]
    if ctx.slopes is not None:
        bias += _alibi_bias(ctx.position_ids, ctx.slopes, dtype)
    bias.masked_fill_(~layout.dense_mask(device)[:, None], float("-inf"))
    return bias


class NaiveAttention(AttentionKernel):
    """The reference: softmax(q kᵀ/√K + bias) v with the B×H×T×T scores materialized."""

    name = "naive"

    def _bias(self, ctx, *, n_heads, dtype, device):
        return _dense_bias(ctx, n_heads, dtype, device)

    def _attend(self, q_BTHK, k_BTGK, v_BTGK, ctx):
        H, K = q_BTHK.shape[2], q_BTHK.shape[3]
        q, k, v = (x.transpose(1, 2) for x in (q_BTHK, repeat_kv(k_BTGK, H), repeat_kv(v_BTGK, H)))
        scores_BHTT = q @ k.transpose(-1, -2) / math.sqrt(K) + ctx.bias
        return (scores_BHTT.softmax(-1) @ v).transpose(1, 2)


class SdpaAttention(AttentionKernel):
    """``F.scaled_dot_product_attention``: ``is_causal`` for rows of one document (cuDNN / flash on
    GPU), a dense boolean mask for packed rows and sliding windows, a dense float bias for ALiBi.
    GQA through ``enable_gqa`` (no K/V copies)."""

    name = "sdpa"
    _warned_dense = False

    def _bias(self, ctx, *, n_heads, dtype, device):
        dense = ctx.layout.block_diagonal or ctx.layout.windowed
        if ctx.slopes is not None or dense:
            self.warn_dense(device)
        if ctx.slopes is not None:
            return _dense_bias(ctx, n_heads, dtype, device)
        if dense:
            return ctx.layout.dense_mask(device)[:, None]
        return None

    @classmethod
    def warn_dense(cls, device) -> None:
        """Once per process on CUDA: a dense mask sends SDPA down its slow path."""
        if torch.device(device).type == "cuda" and not cls._warned_dense:
            cls._warned_dense = True
            log.warning(
                "attention='sdpa' with packed rows, a sliding window or ALiBi builds a dense [B, (H,) T, T] "
                "mask and runs SDPA's slow path (H200: 1.37 s vs 7.9 ms for xformers on 99k packed tokens); "
                "attention='auto' picks xformers or flex for these batches"
            )

    def _attend(self, q_BTHK, k_BTGK, v_BTGK, ctx):
        q, k, v = (x.transpose(1, 2) for x in (q_BTHK, k_BTGK, v_BTGK))
        gqa = k.shape[1] != q.shape[1]
        if ctx.bias is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=ctx.layout.causal, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.bias, enable_gqa=gqa)
        return out.transpose(1, 2)


class XformersAttention(AttentionKernel):
    """``xformers.ops.memory_efficient_attention`` on ``[B, T, H, K]``: ``LowerTriangularMask`` for
    rows of one document; packed rows flattened to ``[1, B·T, H, K]`` under a
    ``BlockDiagonalCausalMask``. GQA repeats K/V to H heads (xformers' 5-D GQA layout has no
    backward). ALiBi only as a dense, 8-aligned ``[B, H, T, T]`` bias, refused above
    ``XFORMERS_DENSE_BIAS_BUDGET_BYTES``."""

    name = "xformers"

    def support(self, *, device, n_heads, n_kv_heads, alibi, training, seq_len=None):
        if torch.device(device).type != "cuda":
            return "xformers' attention kernels are CUDA-only"
        problem = xformers_problem()
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

    def _bias(self, ctx, *, n_heads, dtype, device):
        if ctx.slopes is not None:
            need = dense_bias_bytes(
                ctx.layout.batch_size, n_heads, ctx.layout.seq_len, itemsize=torch.finfo(dtype).bits // 8
            )
            if need > XFORMERS_DENSE_BIAS_BUDGET_BYTES:
                raise ValueError(
                    f"xformers ALiBi bias for this batch needs {need / 2**30:.1f} GiB "
                    f"(budget {XFORMERS_DENSE_BIAS_BUDGET_BYTES / 2**30:.0f} GiB); "
                    "use attention='flex' (O(T) memory) or a smaller batch"
                )
            return _dense_bias(ctx, n_heads, dtype, device, pad_to=8)
        return ctx.layout.xformers_bias(device)

    def _traceable(self, ctx) -> bool:
        # A block-diagonal bias carries the batch's segment lengths as Python lists.
        return not ctx.layout.block_diagonal

    def _attend(self, q_BTHK, k_BTGK, v_BTGK, ctx):
        memory_efficient_attention = import_xformers_ops().memory_efficient_attention
        B, T, H, K = q_BTHK.shape
        k, v = repeat_kv(k_BTGK, H), repeat_kv(v_BTGK, H)
        if ctx.layout.block_diagonal and ctx.slopes is None:
            out = memory_efficient_attention(
                q_BTHK.reshape(1, B * T, H, K), k.reshape(1, B * T, H, K), v.reshape(1, B * T, H, K), attn_bias=ctx.bias
            )
            return out.view(B, T, H, K)
        return memory_efficient_attention(q_BTHK, k, v, attn_bias=ctx.bias)


def dense_bias_bytes(batch: int, n_heads: int, seq_len: int, itemsize: int = 2) -> int:
    return batch * n_heads * seq_len * (-(-seq_len // 8) * 8) * itemsize


class FlexAttention(AttentionKernel):
    """FlexAttention: the document mask and sliding window as a ``BlockMask`` (built once per
    forward from segment ids by one compiled function, so new batches don't recompile), ALiBi as a
    ``score_mod``, native GQA. O(T) memory. Compiled on CUDA; on CPU it runs eagerly and has no
    backward."""

    name = "flex"

    def support(self, *, device, n_heads, n_kv_heads, alibi, training, seq_len=None):
        if training and torch.device(device).type != "cuda":
            return "FlexAttention has no backward on CPU"
        return None

    def _bias(self, ctx, *, n_heads, dtype, device):
        return _flex_block_mask(ctx.layout, torch.device(device))

    def _attend(self, q_BTHK, k_BTGK, v_BTGK, ctx):
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
        out = attend(q, k, v, score_mod=score_mod, block_mask=ctx.bias, enable_gqa=k.shape[1] != q.shape[1])
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
        return _causal_window(q_idx, kv_idx, window) & (seg_BT[b, q_idx] == seg_BT[b, kv_idx])

    B, T = seg_BT.shape
    return create_block_mask(same_doc_causal if causal else same_doc, B, None, T, T, device=seg_BT.device)


def _causal_window(q_idx, kv_idx, window: int | None):
    """Key visible to query: 0 ≤ q − kv (< window). The one rule for dense masks and flex's mask_mod."""
    visible = q_idx >= kv_idx
    return visible if window is None else visible & (q_idx - kv_idx < window)


@functools.cache
def _causal_block_mask(seq_len: int, device: torch.device, window: int | None = None):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return _causal_window(q_idx, kv_idx, window)

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


class Fa4Attention(AttentionKernel):
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
        problem = fa4_problem()
        if problem:
            return problem
        if alibi:
            return "lit_xf does not run ALiBi on FlashAttention-4 (its score_mod backward gives NaN gradients with GQA)"
        return None

    def _bias(self, ctx, *, n_heads, dtype, device):
        if not ctx.layout.block_diagonal:
            return None
        return fa4_varlen(ctx.layout, self.grouping).to(device)

    def _attend(self, q_BTHK, k_BTGK, v_BTGK, ctx):
        # q, k, v apart (rotated by RoPE): one copy into the stack here, none in the backward
        return self.attend_qkv(torch.cat((q_BTHK, k_BTGK, v_BTGK), dim=2), k_BTGK.shape[2], ctx)

    def attend_qkv(self, qkv_BTCK, n_kv_heads, ctx):
        causal, G = ctx.layout.causal, n_kv_heads
        window = ctx.layout.window if ctx.layout.windowed else 0  # 0: no window
        B, T, C, K = qkv_BTCK.shape
        H = C - 2 * G
        if ctx.bias is None:
            return fa4_forward(qkv_BTCK, G, None, None, T, causal, [], window)[0]
        plan = ctx.bias
        if plan.blocks:  # one sequence of N = B·T tokens: [1, N, C, K]
            args = (plan.cu_seqlens, plan.seg_pos, T, causal, list(plan.blocks), window)
            return fa4_forward(qkv_BTCK.reshape(1, B * T, C, K), G, *args)[0].view(B, T, H, K)
        args = (plan.cu_seqlens, plan.seg_pos, T, causal, [], window)
        return fa4_forward(qkv_BTCK.reshape(B * T, C, K), G, *args)[0].view(B, T, H, K)

    def __repr__(self) -> str:
        return f"Fa4Attention(grouping={self.grouping!r})"


# Plans whose CuTe mask sees whole segments: no sliding window.
FA4_WINDOWLESS_PLANS = ("grouped", "block_sparse")
# Hopper's FA4 backward tile for head dim ≤ 64 is 128×128 (forward: 192 query rows × 128 keys):
# a grouped sequence of up to 128 tokens takes one tile each way.
FA4_GROUP_TOKENS = 128
# Group when that needs at most this fraction of the tiles of one sequence per segment: grouped
# tiles apply the CuTe mask to every score, per-segment tiles only on the diagonal. H200, H=12,
# K=64 (docs/benchmarks.md §4): grouping won at tile ratios 0.19 (2.5x), ~0.4 and 0.54 (1.5-1.7x),
# tied or lost from 1.17 on.
FA4_GROUPED_TILE_RATIO = 0.7


@dataclass(frozen=True)
class Fa4Varlen:
    """Block-diagonal rows for FA4, flattened to N = B·T tokens. ``cu_seqlens`` (int32, bucketed
    by ``bucketed_bounds``) bounds the sequences FA4 runs: each segment alone (``seg_pos`` None;
    FA4's causal mask), or consecutive segments grouped (``seg_pos`` int32 [N]: each token's
    position in its segment, read by the CuTe mask ``lit_xf.fa4_mask.segment_causal``). The
    block-sparse plan adds ``blocks``, the int32 block lists of ``fa4_block_sparse`` for a forward
    over one sequence of N tokens; its backward runs the grouped ``cu_seqlens``."""

    cu_seqlens: torch.Tensor | None
    seg_pos: torch.Tensor | None = None
    blocks: tuple[torch.Tensor, ...] = ()

    def to(self, device) -> Fa4Varlen:
        """The plan on ``device`` in one copy. To CUDA from pinned memory: a copy from pageable
        memory over ~1 MiB waits for the work already queued on the stream (the previous step).
        numpy fills the pinned buffer: torch's CPU copy into it (``pin_memory()``) took 4-5 ms per
        step on a busy 16-core host, spread over its intra-op threads."""
        parts = [t for t in (self.cu_seqlens, self.seg_pos, *self.blocks) if t is not None]
        sizes = [t.numel() for t in parts]
        flat = torch.empty(sum(sizes), dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
        np.concatenate([t.numpy().reshape(-1) for t in parts], out=flat.numpy())
        moved = iter(flat.to(device, non_blocking=True).split(sizes))
        cu = next(moved) if self.cu_seqlens is not None else None
        seg_pos = next(moved) if self.seg_pos is not None else None
        return Fa4Varlen(cu, seg_pos, tuple(next(moved).view(t.shape) for t in self.blocks))


def fa4_varlen(layout: DocLayout, grouping: str = "auto") -> Fa4Varlen:
    """FA4's plan for a block-diagonal layout, built on the host. Causal rows: "block_sparse", or
    "auto" where ``fa4_grouping_pays``, gives the block-sparse forward with the grouped backward
    (B·T a multiple of ``FA4_BLOCK``; else grouped); "grouped" the grouped sequences both ways.
    Else (and "per_document", and a window that hides keys): one varlen sequence per segment."""
    segments = [n for row in layout.segment_lens() for n in row]
    if layout.windowed and grouping in FA4_WINDOWLESS_PLANS:
        raise ValueError(
            f"fa4:{grouping} has no sliding window (its CuTe mask sees whole segments); "
            "use attention='fa4' or 'fa4:per_document' with attention_window"
        )
    if layout.causal and grouping != "per_document" and not layout.windowed:
        bounds = group_bounds(segments)
        if grouping in ("grouped", "block_sparse") or fa4_grouping_pays(segments, bounds):
            whole_blocks = (layout.batch_size * layout.seq_len) % FA4_BLOCK == 0
            if grouping != "grouped" and whole_blocks:
                return fa4_block_sparse(segments, bounds)
            return Fa4Varlen(bucketed_bounds(bounds), segment_positions(segments))
    return Fa4Varlen(bucketed_bounds([0, *itertools.accumulate(segments)]))


# The plans are built on the host once per forward, in numpy: torch's CPU ops split even 64k-element
# tensors over its intra-op threads, and on a busy host (loader workers, compile workers) each such
# op took 5-10 ms on an H200 machine's 16 cores, long enough to leave the GPU idle.
def segment_positions(segments: list[int]) -> torch.Tensor:
    """int32 [Σ segments]: each token's position in its segment (consecutive segments of ≥ 1 token)."""
    lens = np.asarray(segments, dtype=np.int32)
    starts = np.cumsum(lens, dtype=np.int32) - lens
    return torch.from_numpy(np.arange(lens.sum(), dtype=np.int32) - np.repeat(starts, lens))


# Query and key block of the block-sparse plan: Hopper's FA4 tile for head dims up to 128 (forward
# and backward); FA4 wants the key block equal to its tile and the query block a multiple of it.
FA4_BLOCK = 128


def fa4_block_sparse(segments: list[int], bounds: list[int] | None = None, block: int = FA4_BLOCK) -> Fa4Varlen:
    """The block-sparse plan for one causal sequence of consecutive ``segments`` (N = Σ tokens, a
    multiple of ``block``): each token's position in its segment (``seg_pos``, for the CuTe mask)
    and FA4's block lists for the forward; for the backward, ``cu_seqlens`` of the grouped
    sequences (``bounds`` from ``group_bounds``, computed when not given).
    Query block i and key block j (``block`` tokens each) hold some visible pair (j ≤ i in a
    shared segment) or none (skipped); all pairs are visible when j < i and one segment spans both
    blocks (run unmasked), else the mask decides per pair. ``blocks``: per query block, the count
    and the ascending indices of masked key blocks, then of unmasked ones (int32 ``[1, 1, n]``,
    ``[1, 1, n, width]``, see ``_block_lists``).

    Segments are contiguous, so each row's lists are ranges, found by binary search in O(n log n)
    for n = N / block blocks (a dense [n, n] map took 0.38 s at n = 4096 on one CPU core): with
    first_i / last_i the first and last segment in block i, the visible key blocks are
    [lo_i, i], lo_i the first block whose last segment reaches first_i; the unmasked ones are
    [a_i, i) when block i lies inside one segment (first_i = last_i), a_i that segment's first
    block, else none; the masked ones are the rest, [lo_i, a_i) and i itself."""
    seg_pos = segment_positions(segments)
    seg = np.cumsum(seg_pos.numpy() == 0) - 1  # each token's segment: a segment starts at position 0
    first, last = seg.reshape(-1, block)[:, 0], seg.reshape(-1, block)[:, -1]  # both ascending
    i = np.arange(len(first))
    lo = np.searchsorted(last, first, side="left")
    a = np.where(first == last, np.searchsorted(first, last, side="left"), i)
    cu_seqlens = bucketed_bounds(group_bounds(segments) if bounds is None else bounds)
    masked = _block_lists(np.stack([lo, i], -1), np.stack([a - lo, np.ones_like(i)], -1), len(i))
    full = _block_lists(a[:, None], (i - a)[:, None], len(i))
    return Fa4Varlen(cu_seqlens, seg_pos, (*masked, *full))


def _block_lists(starts: np.ndarray, lengths: np.ndarray, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row r, the concatenated ranges [starts[r, p], starts[r, p] + lengths[r, p]) (ascending,
    disjoint) as the count and the column indices, then zeros (FA4 reads a row's first ``count``):
    int32 [1, 1, rows] and [1, 1, rows, width], FA4's block-sparse layout with compact rows.
    ``width`` is the largest count rounded up to a power of two (at least 4, at most ``cols``):
    short documents list 1–3 blocks per row, so the lists stay a few KiB instead of rows × cols,
    and their shape takes few values (few recompiles)."""
    count = lengths.sum(-1).astype(np.int32)
    width = min(cols, max(4, 1 << (int(count.max(initial=0)) - 1).bit_length()))
    slot = np.arange(width)[None, :]
    index = np.zeros((len(count), width), dtype=np.int32)
    before = np.zeros(len(count), dtype=lengths.dtype)  # slots taken by the row's earlier ranges
    for p in range(starts.shape[1]):
        k = slot - before[:, None]
        inside = (k >= 0) & (k < lengths[:, p, None])
        index[inside] = (starts[:, p, None] + k)[inside]
        before = before + lengths[:, p]
    return torch.from_numpy(count)[None, None], torch.from_numpy(index)[None, None]


def group_bounds(segments: list[int], group_tokens: int = FA4_GROUP_TOKENS) -> list[int]:
    """Token boundaries ``[0, …, N]`` of consecutive segments grouped greedily into sequences of at
    most ``group_tokens`` tokens; a longer segment is a sequence of its own. Never splits one."""
    bounds, start, prev = [0], 0, 0
    for end in itertools.accumulate(segments):
        if end - start > group_tokens and prev > start:  # the open group is full: close it
            bounds.append(prev)
            start = prev
        prev = end
    bounds.append(prev)
    return bounds


def fa4_grouping_pays(
    segments: list[int], bounds: list[int] | None = None, group_tokens: int = FA4_GROUP_TOKENS
) -> bool:
    """Whether grouped sequences (``bounds`` from ``group_bounds``) need at most
    ``FA4_GROUPED_TILE_RATIO`` × the 128×128 tiles of one causal sequence per segment (m(m+1)/2
    tiles for m = ⌈n/128⌉). A grouped sequence skips no tile above its diagonal (m² tiles), so
    grouping a long document alone costs up to 2×."""
    g = group_tokens
    bounds = group_bounds(segments, g) if bounds is None else bounds
    long_blocks = [(n + g - 1) // g for n in segments if n > g]  # segments of one tile count 1 each
    alone = len(segments) + sum(m * (m + 1) // 2 - 1 for m in long_blocks)
    grouped = sum(((b - a + g - 1) // g) ** 2 for a, b in itertools.pairwise(bounds))
    return grouped <= FA4_GROUPED_TILE_RATIO * alone


def bucketed_bounds(bounds: list[int]) -> torch.Tensor:
    """int32 ``bounds``, then repeats of the total (zero-length sequences) up to the next power of
    two entries (at least 4), so the tensor's length takes few values."""
    out = np.full(max(4, 1 << (len(bounds) - 1).bit_length()), bounds[-1], dtype=np.int32)
    out[: len(bounds)] = bounds
    return torch.from_numpy(out)


# FA4 as two custom ops: torch.compile sees one opaque op per call (no graph break, no guards on the
# batch's layout), and autograd pairs them. qkv stacks q, k, v along the head axis, C = H + 2G heads
# (the fused projection's output, split into views for FA4): [B, T, C, K] (dense, cu_seqlens None)
# or [N, C, K] tokens under cu_seqlens; the backward writes dq, dk, dv into one such stack, so no
# copy joins them. lse is fp32 [B, H, T] or [H, N]. max_seqlen bounds every sequence (the row
# length T). seg_pos (int32 [N], see Fa4Varlen) marks grouped sequences: FA4 then masks with
# lit_xf.fa4_mask.segment_causal instead of its causal mask. blocks (empty, or the four block lists
# of fa4_block_sparse) makes the forward a dense [1, N] call, block-sparse under that mask; its
# backward takes the same tokens as [N, C, K] under cu_seqlens.
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
        from lit_xf.fa4_mask import segment_causal

        kw.update(causal=False, mask_mod=segment_causal, aux_tensors=[seg_pos])
    return kw


def _split_qkv(qkv: torch.Tensor, n_kv_heads: int) -> list[torch.Tensor]:
    G = n_kv_heads
    return list(qkv.split((qkv.shape[-2] - 2 * G, G, G), dim=-2))


@torch.library.custom_op("lit_xf::fa4_forward", mutates_args=(), device_types="cuda")
def fa4_forward(
    qkv: torch.Tensor,
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
        out, lse = attend(*_split_qkv(qkv, n_kv_heads), return_lse=True, **kw)[:2]
    return out, lse


@fa4_forward.register_fake
def _(qkv, n_kv_heads, cu_seqlens, seg_pos, max_seqlen, causal, blocks, window):
    # FA4 allocates both contiguous
    H = qkv.shape[-2] - 2 * n_kv_heads
    varlen = cu_seqlens is not None and not blocks
    lse_shape = (H, qkv.shape[0]) if varlen else (qkv.shape[0], H, qkv.shape[1])
    return qkv.new_empty((*qkv.shape[:-2], H, qkv.shape[-1])), qkv.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("lit_xf::fa4_backward", mutates_args=(), device_types="cuda")
def fa4_backward(
    dout: torch.Tensor,
    qkv: torch.Tensor,
    n_kv_heads: int,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    seg_pos: torch.Tensor | None,
    max_seqlen: int,
    causal: bool,
    window: int,
) -> torch.Tensor:
    """d qkv of ``fa4_forward`` (FA4's own backward kernel), dq, dk, dv written into one stack."""
    from flash_attn.cute.interface import _flash_attn_bwd

    kw = _fa4_varlen_kwargs(cu_seqlens, seg_pos, max_seqlen, causal, window=window, backward=True)
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    dq, dk, dv = _split_qkv(dqkv, n_kv_heads)
    _flash_attn_bwd(*_split_qkv(qkv, n_kv_heads), out, dout, lse, dq=dq, dk=dk, dv=dv, **kw)
    return dqkv


@fa4_backward.register_fake
def _(dout, qkv, n_kv_heads, out, lse, cu_seqlens, seg_pos, max_seqlen, causal, window):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _fa4_setup_context(ctx, inputs, output):
    qkv, n_kv_heads, cu_seqlens, seg_pos, max_seqlen, causal, blocks, window = inputs
    ctx.save_for_backward(qkv, output[0], output[1], cu_seqlens, seg_pos)
    ctx.n_kv_heads, ctx.max_seqlen, ctx.causal, ctx.n_blocks = n_kv_heads, max_seqlen, causal, len(blocks)
    ctx.window = window


def _fa4_grad(ctx, dout, _dlse):
    qkv, out, lse, cu_seqlens, seg_pos = ctx.saved_tensors
    if ctx.n_blocks:  # a block-sparse forward over [1, N]: the backward runs [N] under cu_seqlens
        dout, qkv, out, lse = (t[0] for t in (dout, qkv, out, lse))
    dqkv = fa4_backward(
        dout, qkv, ctx.n_kv_heads, out, lse, cu_seqlens, seg_pos, ctx.max_seqlen, ctx.causal, ctx.window
    )
    if ctx.n_blocks:
        dqkv = dqkv[None]
    # one gradient per input, and per tensor of the list input (autograd checks the structure)
    return dqkv, None, None, None, None, None, [None] * ctx.n_blocks, None


fa4_forward.register_autograd(_fa4_grad, setup_context=_fa4_setup_context)


# --------------------------------------------------------------------------------------------
# auto
# --------------------------------------------------------------------------------------------
# Fastest kernel per case on CUDA (H200 measurements in docs/attention.md), first supported wins.
AUTO_PREFERENCE = {
    # (packed, alibi, gqa) -> order; fa4 only where installed (the optional flash-attn-4)
    (False, False, False): ("sdpa", "fa4", "xformers", "flex"),
    (False, False, True): ("sdpa", "fa4", "flex", "xformers"),
    (True, False, False): ("fa4", "xformers", "flex", "sdpa"),
    (True, False, True): ("fa4", "xformers", "flex", "sdpa"),
    (False, True, False): ("flex", "xformers", "sdpa"),
    (False, True, True): ("flex", "xformers", "sdpa"),
    (True, True, False): ("flex", "xformers", "sdpa"),
    (True, True, True): ("flex", "xformers", "sdpa"),
}


# Rows of one document with MHA, fa4 against sdpa (cuDNN), H200, bf16, fwd+bwd. fa4 wins long rows
# (1 × 16384: 6.61 vs 7.34 ms, 2 × 8192: 3.57 vs 3.76; H=16, K=128) and the 124M training step's
# 16 × 2048 rows (H=12, K=64: 67.7 vs 70.4 ms per step, no [B, H, T, K] copies of the q/k/v stack;
# per call on the GPU alone a tie, 1.19 vs 1.18 ms). sdpa wins or ties elsewhere: K=128 at 2048
# tokens (8 × 2048: 1.23 vs 1.37 ms on the GPU; 256 padded rows of 2048: ~40 vs 48 ms), 4 × 4096
# (a tie), 16 × 1024 (0.42 vs 0.48 ms on the GPU), and small batches, where the host paces FA4's
# ~1 ms of Python per fwd+bwd.
AUTO_FA4_MIN_ROW_LEN = 8192
AUTO_FA4_SMALL_HEADS = dict(head_dim=64, row_len=2048, batch_tokens=32768)


def fa4_leads_rows(seq_len: int | None, batch_size: int | None = None, head_dim: int | None = None) -> bool:
    """Whether ``auto`` tries fa4 before sdpa for MHA rows of one document: rows of
    ``AUTO_FA4_MIN_ROW_LEN`` tokens or more, or, for heads of at most 64 dims, rows of 2048+ tokens
    in batches of 32768+ tokens (``AUTO_FA4_SMALL_HEADS``)."""
    if seq_len is None:
        return False
    if seq_len >= AUTO_FA4_MIN_ROW_LEN:
        return True
    small = AUTO_FA4_SMALL_HEADS
    return (
        head_dim is not None
        and head_dim <= small["head_dim"]
        and seq_len >= small["row_len"]
        and (batch_size or 1) * seq_len >= small["batch_tokens"]
    )


def auto_order(
    device_type: str,
    *,
    packed: bool,
    alibi: bool,
    gqa: bool,
    seq_len: int | None,
    batch_size: int | None = None,
    head_dim: int | None = None,
    windowed: bool = False,
) -> tuple[str, ...]:
    """Kernels ``auto`` tries, fastest first, for one case (the first that supports it wins). A
    sliding window that hides keys puts the kernels with a native window first: fa4 (H200: fastest,
    or within 5% of xformers, in every windowed case measured), xformers, flex; sdpa, which needs a
    dense mask, last."""
    if device_type != "cuda":
        return ("sdpa",)
    if windowed and not alibi:
        return ("fa4", "xformers", "flex", "sdpa")
    order = AUTO_PREFERENCE[(packed, alibi, gqa)]
    if not (packed or alibi or gqa) and fa4_leads_rows(seq_len, batch_size, head_dim):
        order = ("fa4", *(n for n in order if n != "fa4"))
    return order


class AutoAttention(AttentionKernel):
    """Picks per device and batch layout the fastest kernel that supports the case (``auto_order``:
    ``AUTO_PREFERENCE`` on CUDA, fa4 first where ``fa4_leads_rows``, ``sdpa`` on CPU) and logs each new choice
    once."""

    name = "auto"

    def __init__(self):
        self._kernels = {n: make_kernel(n) for n in ("sdpa", "xformers", "flex", "fa4")}
        self._logged: set = set()
        self.last_choice: str | None = None

    def _why_not(self, name: str, config: dict, dtype: torch.dtype | None) -> str | None:
        kernel = self._kernels[name]
        return (dtype is not None and kernel.dtype_problem(dtype)) or kernel.support(**config)

    def choose(
        self,
        *,
        device,
        n_heads,
        n_kv_heads,
        alibi,
        training,
        packed,
        seq_len=None,
        batch_size=None,
        head_dim=None,
        dtype=None,
        windowed=False,
    ) -> str:
        device = torch.device(device)
        config = dict(
            device=device, n_heads=n_heads, n_kv_heads=n_kv_heads, alibi=alibi, training=training, seq_len=seq_len
        )
        gqa = n_kv_heads != n_heads
        order = auto_order(
            device.type,
            packed=packed,
            alibi=alibi,
            gqa=gqa,
            seq_len=seq_len,
            batch_size=batch_size,
            head_dim=head_dim,
            windowed=windowed,
        )
        for name in order:
            if self._why_not(name, config, dtype) is None:
                key = (device.type, packed, alibi, gqa, training, dtype, windowed, name)
                if key not in self._logged:
                    self._logged.add(key)
                    skipped = {n: self._why_not(n, config, dtype) for n in order[: order.index(name)]}
                    why = "; ".join(f"{n}: {r}" for n, r in skipped.items())
                    log.info(
                        "attention=auto chose %r for %s rows%s, %s%s",
                        name,
                        "packed" if packed else "causal",
                        " with a sliding window" if windowed else "",
                        _describe(config),
                        f" ({why})" if why else "",
                    )
                return name
        return "sdpa"

    def prepare(self, layout, position_ids, slopes, *, n_heads, n_kv_heads, dtype, device, head_dim=None):
        name = self.choose(
            device=device,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            alibi=slopes is not None,
            training=torch.is_grad_enabled(),
            packed=layout.block_diagonal,
            seq_len=layout.seq_len,
            batch_size=layout.batch_size,
            head_dim=head_dim,
            dtype=dtype,
            windowed=layout.windowed,
        )
        self.last_choice = name
        return self._kernels[name].prepare(
            layout, position_ids, slopes, n_heads=n_heads, n_kv_heads=n_kv_heads, dtype=dtype, device=device
        )


KERNELS: dict[str, type[AttentionKernel]] = {
    "naive": NaiveAttention,
    "sdpa": SdpaAttention,
    "xformers": XformersAttention,
    "flex": FlexAttention,
    "fa4": Fa4Attention,
    "auto": AutoAttention,
}


def make_kernel(name: str) -> AttentionKernel:
    """The kernel called ``name`` (one of ``ATTENTION_CHOICES``: a kernel, or ``fa4:<plan>``)."""
    if name not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention kernel {name!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
    base, _, plan = name.partition(":")
    return Fa4Attention(plan) if plan else KERNELS[base]()


# --------------------------------------------------------------------------------------------
# xformers loading: its _C.so links libcudart.so.12, which a CUDA-13 torch doesn't ship.
# --------------------------------------------------------------------------------------------
def _preload_cudart12() -> str | None:
    """Load ``libcudart.so.12`` from the ``nvidia-cuda-runtime-cu12`` package (if installed) with
    RTLD_GLOBAL, so xformers' extension resolves it without LD_LIBRARY_PATH. Returns its path."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(root) / "lib" / "libcudart.so.12"
        if lib.exists():
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            return str(lib)
    return None


def import_xformers_ops():
    """``xformers.ops``. With flash-attn-4 installed, a ``flash_attn`` package exists that is not
    FlashAttention-2: xformers 0.0.35 would import FA2's interface from it and fail. It is hidden
    from xformers' first import (xformers then uses its own FA2 build), then restored."""
    if "xformers.ops" in sys.modules:
        return sys.modules["xformers.ops"]
    hide = _flash_attn_is_not_fa2()
    missing = object()
    saved = sys.modules.get("flash_attn", missing)
    if hide:
        sys.modules["flash_attn"] = None  # find_spec("flash_attn") -> None while xformers imports
    try:
        import xformers.ops
    finally:
        if hide:
            if saved is missing:
                del sys.modules["flash_attn"]
            else:
                sys.modules["flash_attn"] = saved
    return xformers.ops


def _flash_attn_is_not_fa2() -> bool:
    try:
        return (
            importlib.util.find_spec("flash_attn") is not None
            and importlib.util.find_spec("flash_attn.flash_attn_interface") is None
        )
    except (ImportError, ValueError):
        return False


@functools.cache
def fa4_problem() -> str | None:
    """Why FlashAttention-4 can't run here, or None (installed, importable, Hopper or newer GPU)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return f"FlashAttention-4 needs a Hopper or newer GPU (compute capability 9.0+), this one is {major}.{minor}"
    try:
        spec = importlib.util.find_spec("flash_attn.cute")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "flash-attn-4 is not installed (pip install 'lit_xf[fa4]')"
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:  # broken install
        return f"flash-attn-4 failed to import ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return None


@functools.cache
def xformers_problem() -> str | None:
    """Why xformers' CUDA attention can't run here, or None if a tiny attention call succeeded."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if (torch.version.cuda or "").split(".")[0] != "12":
        lib = _preload_cudart12()
        if lib is None:
            log.debug("libcudart.so.12 not found; xformers may fail to load its extension")
    os.environ.setdefault("XFORMERS_IGNORE_FLASH_VERSION_CHECK", "1")
    try:
        xops = import_xformers_ops()
    except Exception as e:  # broken install
        return f"xformers failed to import ({type(e).__name__}: {e})"
    try:
        x = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(x, x, x, attn_bias=xops.LowerTriangularMask())
    except Exception as e:
        hint = " (pip install 'lit_xf[gpu]' for its CUDA-12 runtime)" if "build" in str(e).lower() else ""
        return f"xformers can't run its CUDA kernels: {str(e).splitlines()[0][:160]}{hint}"
    return None


def kernel_report(
    device: torch.device | str,
    *,
    n_heads: int = 8,
    n_kv_heads: int | None = None,
    alibi: bool = False,
    training: bool = True,
    seq_len: int | None = None,
) -> dict[str, str | None]:
    """For each concrete kernel, None if it runs this configuration on ``device``, else why not."""
    config = dict(
        device=torch.device(device),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads or n_heads,
        alibi=alibi,
        training=training,
        seq_len=seq_len,
    )
    return {n: make_kernel(n).support(**config) for n in KERNEL_NAMES[1:]}
