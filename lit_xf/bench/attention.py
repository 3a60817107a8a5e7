"""``lit-xf bench attention``: forward+backward time, TFLOP/s and peak memory per kernel across
sequence lengths, and ``auto`` against the fastest single kernel of each case.

TFLOP/s counts FlashAttention's convention: forward 4·H·K per attended (query, key) pair, the
backward 2.5× that (it recomputes the scores), so 3.5 × 4·H·K·pairs for forward+backward.
"""

from __future__ import annotations

import math
import statistics

import torch

from lit_xf.attention import DocLayout, alibi_slopes, make_kernel
from lit_xf.bench.output import progress
from lit_xf.bench.timing import measure, queued_gpu_ms, time_call

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def attention_flops(layout: DocLayout, n_heads: int, head_dim: int) -> float:
    """Forward+backward FLOPs as FlashAttention counts them: 3.5 × 4·H·K·(attended pairs), the pairs
    counted by the layout's one rule (``DocLayout.attended_pairs``: n(n+1)/2 per causal document)."""
    return 3.5 * 4 * n_heads * head_dim * layout.attended_pairs()


def fwd_bwd_case(
    kernel_name: str,
    layout: DocLayout,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    dtype,
    device,
    alibi: bool = False,
    seed: int = 0,
    kernel=None,
):
    """Random q ``[B, T, H, K]``, k, v ``[B, T, kv, K]`` and an output gradient; returns
    (step: the kernel forward + backward, prepare: building its context, (q, k, v, do), ctx).
    ``kernel``: the instance to run (default ``make_kernel(kernel_name)``). The context is prepared
    here, before any timing: ``auto`` measures its candidates in that first ``prepare``."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, T = layout.batch_size, layout.seq_len

    def rand(h):
        return torch.randn(B, T, h, head_dim, generator=g, device=device, dtype=dtype).requires_grad_()

    q, k, v = rand(n_heads), rand(n_kv_heads), rand(n_kv_heads)
    do = torch.randn(B, T, n_heads, head_dim, generator=g, device=device, dtype=dtype)
    kernel = kernel or make_kernel(kernel_name)
    position_ids = layout.position_ids(device)
    slopes = alibi_slopes(n_heads).to(device) if alibi else None

    def prepare():
        return kernel.prepare(
            layout,
            position_ids,
            slopes,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            dtype=dtype,
            device=device,
            head_dim=head_dim,
        )

    ctx = prepare()

    def step():
        out = kernel(q, k, v, ctx)
        out.backward(do)
        return out

    return step, prepare, (q, k, v, do), ctx


def plan_note(ctx) -> str:
    """What the prepared context's plan ran (fa4: which packing plan); "" where a kernel has one way."""
    return ctx.plan.describe()


def bench_attention(args) -> list[dict]:
    """One row per (sequence length, kernel) on full causal or non-causal rows of ``--batch``."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    rows = []
    auto = make_kernel("auto")  # one instance: its rows and the comparison below run the same choice
    for seq_len in args.seq_lens:
        layout = DocLayout.full_rows(args.batch, seq_len, causal=args.causal, window=args.window)
        for name in args.kernels:
            row = dict(
                kernel=name,
                seq_len=seq_len,
                batch=args.batch,
                heads=args.heads,
                kv_heads=args.kv_heads,
                head_dim=args.head_dim,
                dtype=args.dtype,
                causal=args.causal,
                alibi=args.alibi,
                window=args.window,
            )
            row.update(run_case(name, layout, args, dtype, device, kernel=auto if name == "auto" else None))
            rows.append(row)
            progress(row)
        _auto_against_best(rows[-len(args.kernels) :], layout, args, dtype, device, auto)
    return rows


def run_case(name: str, layout: DocLayout, args, dtype, device, kernel=None) -> dict:
    """Time one kernel fwd+bwd on ``layout``: ms (median), gpu_ms (CUDA: calls queued behind a GPU
    sleep), TFLOP/s, peak MiB, prepare_ms and a note (the fa4 plan, auto's choice, or why it did
    not run: unsupported, out of memory, a batch the kernel refuses); for auto also ``auto_reason``
    (what it measured, ``AutoAttention.last_reason``). ``kernel``: the instance (default: a new one)."""
    kv_heads = args.kv_heads or args.heads
    reason = (
        make_kernel(name).support(
            device=device,
            n_heads=args.heads,
            n_kv_heads=kv_heads,
            alibi=args.alibi,
            training=True,
            seq_len=layout.seq_len,
        )
        if name != "auto"
        else None
    )
    if reason:
        return dict(ms=None, tflops=None, peak_mib=None, note=reason)
    kernel = kernel or make_kernel(name)
    try:
        step, prepare, _, ctx = fwd_bwd_case(
            name, layout, args.heads, kv_heads, args.head_dim, dtype, device, alibi=args.alibi, kernel=kernel
        )
        auto_reason = getattr(kernel, "last_reason", None)
        ms, peak = measure(step, device, args.warmup, args.reps)
        gpu_ms = queued_gpu_ms(step, args.reps)[0] if device.type == "cuda" else None
        prep_ms, _ = measure(prepare, device, 1, max(3, args.reps // 2))
        chosen = ctx.kernel.name
        plan = plan_note(ctx)
        del step, ctx
    except torch.OutOfMemoryError:
        return dict(ms=None, tflops=None, peak_mib=None, note="out of memory")
    except ValueError as e:  # a kernel refusing this batch (e.g. the dense ALiBi budget) is a result
        return dict(ms=None, tflops=None, peak_mib=None, note=str(e).split(";")[0])
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tflops = attention_flops(layout, args.heads, args.head_dim) / (ms * 1e-3) / 1e12
    return dict(
        ms=round(ms, 3),
        gpu_ms=None if gpu_ms is None else round(gpu_ms, 3),
        tflops=round(tflops, 1),
        peak_mib=None if math.isnan(peak) else round(peak, 1),
        prepare_ms=round(prep_ms, 3),
        note=plan if name != "auto" else f"auto → {chosen} {plan}".strip(),
        **({"auto_reason": auto_reason} if name == "auto" else {}),
    )


def _auto_against_best(rows: list[dict], layout, args, dtype, device, kernel=None) -> None:
    """``auto_vs_best`` on the auto row: auto's time over the fastest single kernel's, timed
    alternately call by call (A B B A ...) so that drift and launch noise fall on both alike.
    On CUDA also ``auto_vs_best_gpu`` (``gpu_vs_best``): the same on GPU time alone, which a
    kernel whose host side paces its calls (FA4's Python) does not inflate. ``kernel``: the auto
    instance that ran the auto row, so its choice (measured in that row's first ``prepare``, before
    any timing) is the one compared; auto measures each kernel call by call too."""
    auto, best = _auto_and_fastest(rows, "ms")
    if auto is None:
        return
    auto.update(gpu_vs_best(rows))
    kv = args.kv_heads or args.heads
    steps = [
        fwd_bwd_case(name, layout, args.heads, kv, args.head_dim, dtype, device, alibi=args.alibi, kernel=k)[0]
        for name, k in (("auto", kernel), (best["kernel"], None))
    ]
    times: list[list[float]] = [[], []]
    for step in steps:
        for _ in range(args.warmup):
            step()
    for i in range(2 * args.reps):
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            times[j].append(time_call(steps[j], device))
    auto["best_kernel"] = best["kernel"]
    auto["auto_vs_best"] = round(statistics.median(times[0]) / statistics.median(times[1]), 3)
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()


def gpu_vs_best(rows: list[dict]) -> dict:
    """``{"best_kernel_gpu", "auto_vs_best_gpu"}``: the single kernel with the least ``gpu_ms`` and
    auto's ``gpu_ms`` over it; empty where GPU times are missing (a CPU run, a failed kernel)."""
    auto, best = _auto_and_fastest(rows, "gpu_ms")
    if auto is None:
        return {}
    return {"best_kernel_gpu": best["kernel"], "auto_vs_best_gpu": round(auto["gpu_ms"] / best["gpu_ms"], 3)}


def _auto_and_fastest(rows: list[dict], key: str) -> tuple[dict | None, dict | None]:
    """(the auto row, the single-kernel row with the least ``key``), both with a ``key`` value;
    (None, None) when either is missing."""
    auto = next((r for r in rows if r["kernel"] == "auto" and r.get(key)), None)
    timed = [r for r in rows if r["kernel"] != "auto" and r.get(key)]
    if auto is None or not timed:
        return None, None
    return auto, min(timed, key=lambda r: r[key])
