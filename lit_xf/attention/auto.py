"""``auto``: per device and batch layout, the fastest kernel that supports the case, from orders
measured on an H200 (``AUTO_PREFERENCE``, ``fa4_leads_rows``, ``auto_order``)."""

from __future__ import annotations

import logging

import torch

from lit_xf.attention.base import AttentionKernel, describe_config
from lit_xf.attention.fa4 import Fa4Attention
from lit_xf.attention.flex import FlexAttention
from lit_xf.attention.sdpa import SdpaAttention
from lit_xf.attention.xformers import XformersAttention

log = logging.getLogger(__name__)

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
        self._kernels = {k.name: k for k in (SdpaAttention(), XformersAttention(), FlexAttention(), Fa4Attention())}
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
                        describe_config(config),
                        f" ({why})" if why else "",
                    )
                return name
        return "sdpa"

    def prepare(self, layout, position_ids, slopes, *, n_heads, n_kv_heads, dtype, device, head_dim=None):
        """The chosen kernel's context: ``ctx.kernel`` is that kernel, ``ctx.plan`` its own plan."""
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
