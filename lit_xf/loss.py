"""Next-token cross-entropy: on logits, and fused with the output projection for training.

Real targets are labels ≠ ``IGNORE_INDEX`` (pads and document ends). ``nll = logsumexp(z) − z[label]``
per token, computed in fp32 from 16-bit logits ``z``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """−log softmax(logits)[label] over the real targets, computed in fp32 (or wider); the mean
    over them, or their sum (``reduction="sum"``)."""
    logits_NV = logits_BTV.flatten(0, 1)
    return F.cross_entropy(
        logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32)),
        labels_BT.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


# Compiled, the fp32 upcast, log-softmax and its gradient fuse into passes over the 16-bit logits;
# eagerly they materialize fp32 logits and an fp32 gradient (B·T·V·4 bytes each: 6.6 GB at 32k
# tokens × 50k vocabulary). Compiled on first call: ``torch.compile`` imports dynamo and inductor
# (seconds and tens of MiB), which a run that never calls it should not pay at import.
@functools.cache
def _compiled_cross_entropy():
    return torch.compile(token_cross_entropy)


def compiled_token_cross_entropy(
    logits_BTV: torch.Tensor, labels_BT: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """``token_cross_entropy`` through ``torch.compile`` (compiled on the first call)."""
    return _compiled_cross_entropy()(logits_BTV, labels_BT, reduction=reduction)


def token_hits(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(real target tokens whose label logit is the row's maximum, real target tokens), counted on
    the device without a host sync (boolean indexing would sync). A label tied for the maximum
    counts, as in ``linear_cross_entropy``'s hits, so train/acc and val/acc count alike (16-bit
    logits tie often)."""
    real_BT = labels_BT != IGNORE_INDEX
    z_label_BT = logits_BTV.gather(-1, torch.where(real_BT, labels_BT, 0)[..., None])[..., 0]
    return ((z_label_BT >= logits_BTV.amax(-1)) & real_BT).sum(), real_BT.sum()


class LossParts(NamedTuple):
    """``nll_sum``: Σ nll over the real targets (differentiable); ``hits``: real targets whose
    label logit is the row's maximum; ``real``: real targets. Counts are int64 device tensors."""

    nll_sum: torch.Tensor
    hits: torch.Tensor
    real: torch.Tensor


def linear_cross_entropy(hidden_BTD: torch.Tensor, weight_VD: torch.Tensor, labels_BT: torch.Tensor) -> LossParts:
    """Cross-entropy of the logits ``z = hidden · weightᵀ`` (the output projection) without keeping
    them: the forward pass writes ∂nll/∂z = softmax(z) − onehot(label) (zero on ignored rows) over
    the logits, in place, so the backward is two GEMMs, dh = g·(∂z) W and dW = g·(∂z)ᵀ h, with
    g the upstream gradient of ``nll_sum``. One read of the logits for the log-sum-exp and one
    read-write for the gradient (a Triton kernel on CUDA) replace the log-softmax pass of the
    forward and the read-read-write of the backward, and the [N, V] gradient buffer is never
    allocated. No host sync: g stays a device tensor. The matmuls run in autocast's dtype when it
    is on; gradients come back in the inputs' dtypes, dW accumulated in fp32."""
    N, device = labels_BT.numel(), hidden_BTD.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    with torch.autocast(device, enabled=False):
        return LossParts(*_LinearCrossEntropy.apply(hidden_BTD.reshape(N, -1), weight_VD, labels_BT.reshape(N), dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, labels_N, dtype):
        dtype = dtype or torch.promote_types(hidden_ND.dtype, weight_VD.dtype)
        h, w = hidden_ND.to(dtype), weight_VD.to(dtype)
        logits_NV = h @ w.t()
        nll_N, hit_N = _nll_and_grad_in_place(logits_NV, labels_N)
        ctx.save_for_backward(h, w, logits_NV)  # logits_NV now holds ∂nll/∂z
        ctx.in_dtypes = (hidden_ND.dtype, weight_VD.dtype)
        hits, real = hit_N.sum(), (labels_N != IGNORE_INDEX).sum()
        ctx.mark_non_differentiable(hits, real)
        return nll_N.sum(), hits, real

    @staticmethod
    def backward(ctx, grad_nll, _grad_hits, _grad_real):
        h, w, dz_NV = ctx.saved_tensors
        g = grad_nll.to(torch.promote_types(grad_nll.dtype, torch.float32))
        dh = _mm_wide(dz_NV, w).mul_(g).to(ctx.in_dtypes[0]) if ctx.needs_input_grad[0] else None
        dw = _mm_wide(dz_NV.t(), h).mul_(g).to(ctx.in_dtypes[1]) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None


def _mm_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b returned in fp32 or wider (16-bit inputs stay 16-bit on CUDA)."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32)
    wide = torch.promote_types(a.dtype, torch.float32)
    return a.to(wide) @ b.to(wide)


def _nll_and_grad_in_place(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: nll (fp32, 0 where ignored) and hit (label logit = row max, false where ignored);
    ``logits_NV`` is overwritten with softmax − onehot (zero rows where ignored)."""
    if logits_NV.is_cuda and _triton_available():
        return _triton_nll_and_grad(logits_NV, labels_N)
    z = logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32))
    real = labels_N != IGNORE_INDEX
    label = torch.where(real, labels_N, 0)[:, None]
    z_label = z.gather(1, label)[:, 0]
    hit = real & (z_label >= z.amax(-1))
    lse = z.logsumexp(-1)
    grad = (z - lse[:, None]).exp_().scatter_add_(1, label, -torch.ones_like(lse)[:, None])
    logits_NV.copy_(grad.mul_(real[:, None]))
    return torch.where(real, lse - z_label, 0.0), hit


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Columns per loop iteration and warps per row of the Triton kernel (H200: see docs/benchmarks.md).
CE_BLOCK, CE_WARPS = 8192, 16


def _triton_nll_and_grad(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from lit_xf._ce_kernel import nll_and_grad_kernel

    N, V = logits_NV.shape
    nll_N = torch.empty(N, dtype=torch.float32, device=logits_NV.device)
    hit_N = torch.empty(N, dtype=torch.bool, device=logits_NV.device)
    block = min(CE_BLOCK, max(16, 1 << (V - 1).bit_length()))
    args = (logits_NV, labels_N.contiguous(), nll_N, hit_N, logits_NV.stride(0), V, IGNORE_INDEX)
    nll_and_grad_kernel[(N,)](*args, BLOCK=block, num_warps=CE_WARPS)
    return nll_N, hit_N
