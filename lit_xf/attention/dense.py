"""Dense ``[B, 1|H, T, T]`` additive biases (naive, sdpa with masks or ALiBi, xformers with ALiBi):
0 where ``DocLayout.dense_mask`` lets query i see key j, −inf elsewhere, plus ALiBi's
−m_h·|pos_i − pos_j| when given slopes."""

from __future__ import annotations

import torch

from lit_xf.attention.layout import DocLayout
from lit_xf.attention.positions import alibi_bias


def dense_bias(
    layout: DocLayout,
    position_ids_BT: torch.Tensor | None,
    slopes_H: torch.Tensor | None,
    n_heads: int,
    dtype,
    device,
    pad_to: int = 1,
) -> torch.Tensor:
    """Additive float bias ``[B, 1|H, T, T]`` (H with ALiBi): −inf outside the mask, ALiBi inside.
    With ``pad_to``, sliced from a buffer whose last dim is a multiple of it (xformers wants
    stride(-2) % 8 == 0)."""
    T = layout.seq_len
    heads = n_heads if slopes_H is not None else 1
    buf = torch.zeros(layout.batch_size, heads, T, -(-T // pad_to) * pad_to, dtype=dtype, device=device)
    bias = buf[..., :T]
    if slopes_H is not None:
        bias += alibi_bias(position_ids_BT, slopes_H, dtype)
    bias.masked_fill_(~layout.dense_mask(device)[:, None], float("-inf"))
    return bias


def dense_bias_bytes(batch: int, n_heads: int, seq_len: int, itemsize: int = 2) -> int:
    """Bytes of a ``[batch, n_heads, T, T]`` bias whose last dim is padded to a multiple of 8."""
    return batch * n_heads * seq_len * (-(-seq_len // 8) * 8) * itemsize
