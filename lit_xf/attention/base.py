"""The kernel interface: ``AttentionKernel``, the per-batch ``AttentionContext`` it prepares, and
the helpers every kernel shares.

Usage: once per forward ``ctx = kernel.prepare(layout, position_ids, alibi_slopes, ...)``; in every
layer ``out_BTHK = kernel(q_BTHK, k_BTGK, v_BTGK, ctx)`` (or ``ctx.kernel.attend_qkv(qkv_BTCK, G,
ctx)``). ``ctx.plan`` is the kernel's own plan (``NaivePlan``, ``SdpaPlan``, ...): only the kernel
that built it reads it; callers may ask it ``describe()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from lit_xf.attention.layout import DocLayout


class AttentionPlan:
    """What a kernel's ``prepare`` built for one batch (its mask, bias or sequence plan). Each
    kernel has its own frozen dataclass of this type; callers never look inside."""

    def describe(self) -> str:
        """How the kernel runs this batch, where it has a choice worth reporting ('' otherwise)."""
        return ""

    def nbytes(self) -> int:
        """Device bytes this plan holds (masks, biases, block and sequence lists), each storage once."""
        seen: dict[int, int] = {}
        _collect_storages(self, seen, depth=0)
        return sum(seen.values())


def _collect_storages(obj, seen: dict[int, int], depth: int) -> None:
    """Tensors reachable from ``obj`` through attributes, dataclass fields and sequences (3 levels)."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return
    if depth > 3 or obj is None or isinstance(obj, (str, int, float, bool, type)):
        return
    if isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    elif hasattr(obj, "__dict__") or hasattr(obj, "__slots__"):
        names = list(getattr(obj, "__dict__", {})) or list(getattr(obj, "__slots__", ()))
        items = [getattr(obj, n, None) for n in names]
    else:
        return
    for item in items:
        _collect_storages(item, seen, depth + 1)


P = TypeVar("P", bound=AttentionPlan)


@dataclass
class AttentionContext(Generic[P]):
    """What ``prepare`` built once per forward and every layer shares. ``kernel`` is the kernel
    that runs the batch (under ``auto``: the one it chose)."""

    kernel: AttentionKernel[P]
    layout: DocLayout
    position_ids: torch.Tensor | None  # [B, T]
    slopes: torch.Tensor | None  # [H] ALiBi slopes or None
    plan: P | None = None  # the kernel's own plan, set by prepare
    # A bias built for ``layout`` beforehand (the batch's ``attn_bias``, made in a loader worker);
    # a kernel whose plan is that bias (xformers) adopts it instead of building one.
    bias: Any = None
    # False: torch.compile must not trace the kernel call (its plan holds per-batch Python values,
    # which would be guarded on and recompile every batch); it runs eagerly between graphs.
    traceable: bool = True


SHORT_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


class AttentionKernel(Generic[P]):
    """One attention implementation. Subclasses set ``name`` and implement ``support`` (why a
    configuration can't run, or None), ``_plan`` (the batch's plan, of the kernel's own type),
    ``_attend`` and, when the plan holds per-batch Python values, ``_traceable``."""

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
            from lit_xf.attention.kernels import kernel_report  # the registry imports every kernel module

            report = kernel_report(**config)
            ok = [n for n, why in report.items() if why is None]
            raise ValueError(
                f"attention={self.name!r} can't run {describe_config(config)}: {reason}. "
                f"Kernels that can: {', '.join(ok) or 'none'}."
            )

    def dtype_problem(self, dtype: torch.dtype) -> str | None:
        """Why this kernel can't compute in ``dtype``, or ``None`` if it can."""
        if self.dtypes is None or dtype in self.dtypes:
            return None
        return f"runs {'/'.join(SHORT_DTYPE_NAMES.get(d, str(d)) for d in self.dtypes)} only, not {dtype}"

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
        layers: int | None = None,
        qkv_stacked: bool = False,
        bias: Any = None,
    ) -> AttentionContext[P]:
        """The per-batch context (the kernel's plan) for ``layout``. Hints for ``auto``'s measurement,
        ignored by the kernels: ``head_dim``; ``layers``, how many calls share the context; ``qkv_stacked``,
        whether they go through ``attend_qkv`` (else ``kernel(q, k, v, ctx)``). ``bias``: an xformers
        bias already built for exactly ``layout`` on ``device`` (the batch's ``attn_bias``), or None."""
        problem = self.dtype_problem(dtype)
        if problem is not None:
            raise ValueError(
                f"attention={self.name!r} {problem}: train with precision 'bf16-mixed' or '16-mixed', "
                "or choose attention='auto'"
            )
        ctx = AttentionContext(self, layout, position_ids, slopes, bias=bias)
        ctx.plan = self._plan(ctx, n_heads=n_heads, dtype=dtype, device=device)
        ctx.traceable = self._traceable(ctx)
        return ctx

    def explain(self) -> str:
        """Why this kernel runs the batches (``auto`` says what it measured)."""
        return f"attention={self.name!r} as configured"

    def __call__(self, q_BTHK, k_BTGK, v_BTGK, ctx: AttentionContext[P]) -> torch.Tensor:
        if ctx.traceable:
            return ctx.kernel._attend(q_BTHK, k_BTGK, v_BTGK, ctx)
        return _attend_eagerly(q_BTHK, k_BTGK, v_BTGK, ctx)

    def attend_qkv(self, qkv_BTCK: torch.Tensor, n_kv_heads: int, ctx: AttentionContext[P]) -> torch.Tensor:
        """Attention of q, k, v stacked along the head axis (C = H + 2G, the fused projection's
        layout): ``[B, T, C, K] -> [B, T, H, K]``. Kernels that take the stack whole (fa4) write
        its gradient in one buffer; the others split it into views."""
        return self(*split_qkv(qkv_BTCK, n_kv_heads), ctx)

    def _plan(self, ctx: AttentionContext[P], *, n_heads: int, dtype, device) -> P:
        raise NotImplementedError

    def _traceable(self, ctx: AttentionContext[P]) -> bool:
        return True

    def _attend(self, q_BTHK, k_BTGK, v_BTGK, ctx: AttentionContext[P]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@torch.compiler.disable
def _attend_eagerly(q_BTHK, k_BTGK, v_BTGK, ctx: AttentionContext) -> torch.Tensor:
    return ctx.kernel._attend(q_BTHK, k_BTGK, v_BTGK, ctx)


def describe_config(config: dict) -> str:
    """'GQA 8q/2kv + ALiBi training on cuda' for a ``support`` configuration."""
    dev = torch.device(config["device"]).type
    gqa = f"GQA {config['n_heads']}q/{config['n_kv_heads']}kv" if config["n_kv_heads"] != config["n_heads"] else "MHA"
    return f"{gqa}{' + ALiBi' if config['alibi'] else ''} {'training' if config['training'] else 'inference'} on {dev}"


def repeat_kv(x_BTGK: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[B, T, G, K] -> [B, T, H, K]``, each kv head repeated for its H/G query heads."""
    B, T, G, K = x_BTGK.shape
    if G == n_heads:
        return x_BTGK
    return x_BTGK[:, :, :, None, :].expand(B, T, G, n_heads // G, K).reshape(B, T, n_heads, K)


def split_qkv(qkv: torch.Tensor, n_kv_heads: int) -> list[torch.Tensor]:
    """The q, k, v views of a stack along the head axis ``[..., H + 2G, K]``."""
    G = n_kv_heads
    return list(qkv.split((qkv.shape[-2] - 2 * G, G, G), dim=-2))
