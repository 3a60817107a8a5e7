"""The kernels by short name: ``KERNELS`` (the one name -> class map), ``make_kernel`` and
``kernel_report`` (which kernels run a configuration here)."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from lit_xf.attention.auto import AutoAttention
from lit_xf.attention.base import AttentionKernel
from lit_xf.attention.fa4 import Fa4Attention
from lit_xf.attention.flex import FlexAttention
from lit_xf.attention.naive import NaiveAttention
from lit_xf.attention.sdpa import SdpaAttention
from lit_xf.attention.xformers import XformersAttention

# A kernel, or fa4 with its packed-row plan forced (``Fa4Attention.GROUPINGS``)
KernelName = Literal[
    "auto", "naive", "sdpa", "xformers", "flex", "fa4", "fa4:grouped", "fa4:per_document", "fa4:block_sparse"
]
ATTENTION_CHOICES: tuple[str, ...] = get_args(KernelName)
KERNEL_NAMES: tuple[str, ...] = tuple(n for n in ATTENTION_CHOICES if ":" not in n)

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
