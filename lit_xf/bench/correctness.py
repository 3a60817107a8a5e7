"""``lit-xf bench correctness``: every kernel × dtype × mask × GQA × ALiBi, forward and q/k/v
gradients, against the float64 reference attention.

Error is relative, ‖x − ref‖ / ‖ref‖ in float64, with a tolerance per dtype (``TOLERANCE``); the
output is compared at real tokens only (the output gradient is zero at padding).
"""

from __future__ import annotations

import torch

from lit_xf.attention import DocLayout, alibi_slopes, make_kernel
from lit_xf.attention.reference import reference_attention
from lit_xf.bench.attention import DTYPES
from lit_xf.bench.output import progress

# Relative-error tolerance per dtype (outputs and gradients).
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-10}


def rel_err(x: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """‖x − ref‖ / ‖scale‖ (``scale`` defaults to ``ref``) in float64; infinite when x holds NaN or inf."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    scale = ref if scale is None else scale.double()
    return float((x - ref).norm() / scale.norm().clamp_min(1e-30))


def _layouts(batch: int, seq_len: int, window: int | None = None) -> dict[str, DocLayout]:
    """The masks of the matrix: full causal rows, one padded document per row, packed rows
    (a 1-token document, two long ones, a 3-token one, then padding)."""
    return {
        "causal": DocLayout.full_rows(batch, seq_len, window=window),
        "padded": DocLayout([[seq_len - 7 * (b + 1)] for b in range(batch)], seq_len, window=window),
        "packed": DocLayout([[1, seq_len // 3, seq_len // 2 - 5, 3] for _ in range(batch)], seq_len, window=window),
    }


def _random_inputs(layout: DocLayout, H: int, kv: int, K: int, device, seed: int) -> list[torch.Tensor]:
    """float64 q ``[B,T,H,K]``, k, v ``[B,T,kv,K]`` and an output gradient that is zero at pads."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, T = layout.batch_size, layout.seq_len
    q, k, v, do = (torch.randn(B, T, h, K, generator=g, device=device, dtype=torch.float64) for h in (H, kv, kv, H))
    for b, row in enumerate(layout.doc_lens):
        do[b, sum(row) :] = 0
    return [q, k, v, do]


def run_kernel(name: str, layout: DocLayout, inputs: list[torch.Tensor], dtype, alibi: bool):
    """Forward + backward of kernel ``name`` on ``inputs`` cast to ``dtype``: (out, dq, dk, dv)."""
    q, k, v = (x.detach().to(dtype, copy=True).requires_grad_() for x in inputs[:3])
    H, kv = q.shape[2], k.shape[2]
    kernel = make_kernel(name)
    slopes = alibi_slopes(H).to(q.device) if alibi else None
    ctx = kernel.prepare(
        layout, layout.position_ids(q.device), slopes, n_heads=H, n_kv_heads=kv, dtype=dtype, device=q.device
    )
    out = kernel(q, k, v, ctx)
    out.backward(inputs[3].to(dtype))
    return out.detach(), q.grad, k.grad, v.grad


def reference(layout: DocLayout, inputs: list[torch.Tensor], alibi: bool):
    """The float64 reference every kernel is checked against: (out, dq, dk, dv) of ``inputs``
    (q, k, v, output gradient) on ``layout``, with the slopes ``alibi_slopes(H)`` when ``alibi``."""
    q, k, v = (x.detach().double().clone().requires_grad_() for x in inputs[:3])
    slopes = alibi_slopes(q.shape[2]).tolist() if alibi else None
    out = reference_attention(q, k, v, layout.doc_lens, slopes, causal=layout.causal, window=layout.window)
    out.backward(inputs[3].double())
    return out.detach(), q.grad, k.grad, v.grad


def bench_correctness(args) -> list[dict]:
    """One row per mask × kv heads (H, 2, 1) × ALiBi × dtype × kernel; status pass, FAIL,
    unsupported or error."""
    device = torch.device(args.device)
    H, K = args.heads, args.head_dim
    rows = []
    for layout_name, layout in _layouts(args.batch, args.seq_len, args.window).items():
        real = torch.zeros(layout.batch_size, layout.seq_len, dtype=torch.bool, device=device)
        for b, row in enumerate(layout.doc_lens):
            real[b, : sum(row)] = True
        for kv in sorted({H, 2, 1}, reverse=True):
            for alibi in (False, True):
                inputs = _random_inputs(layout, H, kv, K, device, seed=len(rows))
                ref = reference(layout, inputs, alibi)
                for dtype_name in args.dtypes:
                    for name in args.kernels:
                        row = dict(kernel=name, dtype=dtype_name, mask=layout_name, heads=f"{H}q/{kv}kv", alibi=alibi)
                        if args.window:
                            row["window"] = args.window
                        row.update(_check(name, layout, inputs, ref, DTYPES[dtype_name], alibi, real))
                        rows.append(row)
                        progress(row)
    return rows


def _check(name, layout, inputs, ref, dtype, alibi, real) -> dict:
    """One kernel against the reference: status, the worst and each relative error."""
    H, kv = inputs[0].shape[2], inputs[1].shape[2]
    reason = make_kernel(name).support(
        device=inputs[0].device, n_heads=H, n_kv_heads=kv, alibi=alibi, training=True, seq_len=layout.seq_len
    )
    if reason:
        return dict(status="unsupported", note=reason)
    try:
        got = run_kernel(name, layout, inputs, dtype, alibi)
    except Exception as e:  # a kernel failing is a result to report, not the end of the matrix
        return dict(status="error", note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    # A window of 1 lets each query see only itself: softmax is exactly 1, so the exact dq and dk
    # are 0 and their rounding noise is measured against the size of dv instead.
    qk_scale = ref[3] if layout.window == 1 else None
    errs = dict(
        out=rel_err(got[0][real], ref[0][real]),
        dq=rel_err(got[1], ref[1], qk_scale),
        dk=rel_err(got[2], ref[2], qk_scale),
        dv=rel_err(got[3], ref[3]),
    )
    worst = max(errs.values())
    return dict(
        status="pass" if worst <= TOLERANCE[dtype] else "FAIL",
        max_rel_err=f"{worst:.1e}",
        **{f"err_{k}": f"{e:.1e}" for k, e in errs.items()},
    )
