"""Benchmarks: ``python -m lit_xf.bench {attention,correctness,packing} [options]`` (or ``lit-xf bench``).

- ``attention``: forward+backward time, TFLOP/s and peak memory per kernel across sequence lengths.
  TFLOP/s counts 3.5 × 4·B·H·M²·K (× ½ when causal; Σ L² over documents when packed): forward
  4·B·H·M²·K, backward 2.5× that (recomputing the scores).
- ``correctness``: every kernel × dtype × mask × GQA × ALiBi, forward and q/k/v gradients, against
  the naive kernel in float64; relative error ‖x − ref‖ / ‖ref‖ with per-dtype tolerances.
- ``packing``: the same documents padded to the longest vs packed, per kernel.

Each run prints a Markdown table last and writes ``<name>.csv``, ``<name>.json`` and (for
``attention``) ``<name>.png`` under ``--out``. Times are medians of CUDA-event timings after warm-up
(host clocks on CPU); memory is the peak allocated during forward+backward above what was allocated
before it.
"""

from __future__ import annotations

import argparse
import collections
import csv
import functools
import gc
import itertools
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from lit_xf.attention import (
    ATTENTION_CHOICES,
    DocLayout,
    Fa4Varlen,
    alibi_slopes,
    make_kernel,
)
from lit_xf.callbacks import ATTENTION_KERNEL_PATTERN, precision_dtype
from lit_xf.data import BATCH_MODES
from lit_xf.model import MLP_KERNELS

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
# Relative-error tolerance per dtype for the correctness matrix (outputs and gradients).
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-10}


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
def measure(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10) -> tuple[float, float]:
    """(median ms, peak MiB above the memory allocated before) of ``fn()``."""
    for _ in range(warmup):
        fn()
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(time_call(fn, device) for _ in range(reps)), peak


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """ms of one ``fn()``: CUDA events on a GPU, the host clock elsewhere."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def queued_gpu_ms(fn: Callable[[], object], calls: int = 10, sleep_ms: float = 100.0) -> tuple[float, float]:
    """(GPU ms, host ms) per ``fn()`` on CUDA: ``calls`` calls queued behind a GPU sleep, so the GPU
    runs them back to back whatever the host's pace (as in a training step that keeps the host
    ahead); the host's time to issue one call comes with it. Raises if issuing outlasts the sleep."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(sleep_ms * _sleep_cycles_per_ms()))
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_ms = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    if host_ms > 0.9 * sleep_ms:
        raise RuntimeError(f"issuing {calls} calls took {host_ms:.0f} ms, past the {sleep_ms:.0f} ms GPU sleep")
    return start.elapsed_time(end) / calls, host_ms / calls


@functools.cache
def _sleep_cycles_per_ms() -> float:
    """``torch.cuda._sleep`` cycles per ms on this GPU (timed once)."""
    torch.cuda._sleep(10**6)  # warm
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**8)
    end.record()
    end.synchronize()
    return 10**8 / start.elapsed_time(end)


def attention_flops(layout: DocLayout, n_heads: int, head_dim: int) -> float:
    """Forward+backward FLOPs as FlashAttention counts them: 3.5 × 4·H·K·(attended pairs), pairs
    per n-token document n² (non-causal), n²/2 (causal), n·W − W²/2 (a window of W < n tokens)."""
    W = layout.window

    def pairs(n: int) -> float:
        if not layout.causal:
            return n * n
        return n * n / 2 if W is None or n <= W else n * W - W * W / 2

    return 3.5 * 4 * n_heads * head_dim * sum(pairs(n) for row in layout.doc_lens for n in row)


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
):
    """Random q/k/v ``[B, T, heads, K]`` and a closure running the kernel forward + backward."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, T = layout.batch_size, layout.seq_len

    def rand(h):
        return torch.randn(B, T, h, head_dim, generator=g, device=device, dtype=dtype).requires_grad_()

    q, k, v = rand(n_heads), rand(n_kv_heads), rand(n_kv_heads)
    do = torch.randn(B, T, n_heads, head_dim, generator=g, device=device, dtype=dtype)
    kernel = make_kernel(kernel_name)
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


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
def bench_attention(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    rows = []
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
            row.update(_run_case(name, layout, args, dtype, device))
            rows.append(row)
            _progress(row)
        _auto_against_best(rows[-len(args.kernels) :], layout, args, dtype, device)
    return rows


def _auto_against_best(rows: list[dict], layout, args, dtype, device) -> None:
    """``auto_vs_best`` on the auto row: auto's time over the fastest single kernel's, timed
    alternately call by call (A B B A ...) so that drift and launch noise fall on both alike.
    On CUDA also ``auto_vs_best_gpu`` (``gpu_vs_best``): the same on GPU time alone, which a
    kernel whose host side paces its calls (FA4's Python) does not inflate."""
    auto, best = _auto_and_fastest(rows, "ms")
    if auto is None:
        return
    auto.update(gpu_vs_best(rows))
    kv = args.kv_heads or args.heads
    steps = [
        fwd_bwd_case(name, layout, args.heads, kv, args.head_dim, dtype, device, alibi=args.alibi)[0]
        for name in ("auto", best["kernel"])
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


def _run_case(name, layout, args, dtype, device) -> dict:
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
    try:
        step, prepare, _, ctx = fwd_bwd_case(
            name, layout, args.heads, kv_heads, args.head_dim, dtype, device, alibi=args.alibi
        )
        ms, peak = measure(step, device, args.warmup, args.reps)
        gpu_ms = queued_gpu_ms(step, args.reps)[0] if device.type == "cuda" else None
        prep_ms, _ = measure(prepare, device, 1, max(3, args.reps // 2))
        chosen = ctx.kernel.name
        plan = ""
        if isinstance(ctx.bias, Fa4Varlen):  # which fa4 plan ran the packed rows
            plan = "one sequence per document" if ctx.bias.seg_pos is None else "documents grouped"
            if ctx.bias.blocks:
                plan = "block-sparse forward, grouped backward"
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
    )


# --------------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------------
def _layouts(batch: int, seq_len: int, window: int | None = None) -> dict[str, DocLayout]:
    return {
        "causal": DocLayout.full_rows(batch, seq_len, window=window),
        "padded": DocLayout([[seq_len - 7 * (b + 1)] for b in range(batch)], seq_len, window=window),
        "packed": DocLayout([[1, seq_len // 3, seq_len // 2 - 5, 3] for _ in range(batch)], seq_len, window=window),
    }


def _rel_err(x: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """‖x − ref‖ / ‖scale‖ (``scale`` defaults to ``ref``) in float64; infinite when x holds NaN or inf."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    scale = ref if scale is None else scale.double()
    return float((x - ref).norm() / scale.norm().clamp_min(1e-30))


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


def bench_correctness(args) -> list[dict]:
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
                ref = run_kernel("naive", layout, inputs, torch.float64, alibi)
                for dtype_name in args.dtypes:
                    for name in args.kernels:
                        row = dict(kernel=name, dtype=dtype_name, mask=layout_name, heads=f"{H}q/{kv}kv", alibi=alibi)
                        if args.window:
                            row["window"] = args.window
                        row.update(_check(name, layout, inputs, ref, DTYPES[dtype_name], alibi, real))
                        rows.append(row)
                        _progress(row)
    return rows


def _check(name, layout, inputs, ref, dtype, alibi, real) -> dict:
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
        out=_rel_err(got[0][real], ref[0][real]),
        dq=_rel_err(got[1], ref[1], qk_scale),
        dk=_rel_err(got[2], ref[2], qk_scale),
        dv=_rel_err(got[3], ref[3]),
    )
    worst = max(errs.values())
    return dict(
        status="pass" if worst <= TOLERANCE[dtype] else "FAIL",
        max_rel_err=f"{worst:.1e}",
        **{f"err_{k}": f"{e:.1e}" for k, e in errs.items()},
    )


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------
def lognormal_doc_lens(n_docs: int, mean: float, max_len: int, seed: int = 0) -> list[int]:
    """Log-normal document lengths (σ = 1) with the given mean, clipped to [1, max_len]."""
    g = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(mean) - sigma**2 / 2
    lens = torch.exp(mu + sigma * torch.randn(n_docs, generator=g)).round().clamp(1, max_len)
    return [int(n) for n in lens]


def _packing_layout(mode: str, lens: list[int], window: int | None) -> DocLayout:
    """``padded``: one document per row, padded to the longest; ``packed``: all in one row."""
    if mode == "padded":
        return DocLayout([[n] for n in lens], max(lens), window=window)
    return DocLayout([lens], sum(lens), window=window)


def bench_packing(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    lens = lognormal_doc_lens(args.docs, args.mean_len, args.max_len, args.seed)
    layouts = {mode: _packing_layout(mode, lens, args.window) for mode in ("padded", "packed")}
    real = sum(lens)
    rows = []
    for mode in args.modes:
        layout = layouts[mode]
        for name in args.kernels:
            row = dict(
                mode=mode,
                kernel=name,
                docs=len(lens),
                real_tokens=real,
                row_tokens=layout.batch_size * layout.seq_len,
                heads=args.heads,
                kv_heads=args.kv_heads,
                alibi=args.alibi,
                window=args.window,
            )
            res = _run_case(name, layout, args, dtype, device)
            if res.get("ms"):
                res["real_tokens_per_s"] = round(real / (res["ms"] * 1e-3))
                res["new_batch_prepare_ms"] = _new_batch_prepare_ms(name, lens, mode, args, dtype, device)
            row.update(res)
            rows.append(row)
            _progress(row)
    return rows


def _new_batch_prepare_ms(name, lens, mode, args, dtype, device, batches: int = 5) -> float:
    """Median time to build the mask of a *new* batch of the same shape (documents reordered):
    what each training step pays, recompilation included."""
    kernel = make_kernel(name)
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(batches + 1):
        order = [lens[i] for i in torch.randperm(len(lens), generator=g)]
        layout = _packing_layout(mode, order, args.window)
        pos = layout.position_ids(device)
        slopes = alibi_slopes(args.heads).to(device) if args.alibi else None
        _sync(device)
        t0 = time.perf_counter()
        kernel.prepare(
            layout, pos, slopes, n_heads=args.heads, n_kv_heads=args.kv_heads or args.heads, dtype=dtype, device=device
        )
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times[1:]), 3)


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
def bench_train(args) -> list[dict]:
    """The same model, data and steps several ways (``--variants``): a hand-written PyTorch loop, a
    bare Lightning Trainer, lit_xf as configured (monitoring callbacks + TensorBoard), each eager or
    compiled. Times steps after ``--warmup-steps`` with synchronized host clocks; ``warmup_s`` is the
    time before them (compilation included) in the first run. With ``--repeats R`` every variant
    runs R times, interleaved, and the median run is reported (``ms_range``: fastest-slowest;
    ``ms_runs``: each run in order; ``time_vs_first``: all its runs' time over the first variant's).
    Odd repeats run the variants in reverse order, so a drift within a repeat, or a run slowed by
    the one before it, weighs on every variant alike; ``ratio_vs_first`` is the median over repeats
    of a run's time over the first variant's run in the same repeat (the overhead measure least
    moved by one slow run).
    MFU counts ``LitTinyGPT.flops_per_batch`` against the device's dense peak. ``--profile-steps
    A:B`` profiles steps A..B-1 (inside the warm-up) of each variant's first run (``ProfileWindow``).
    Per-step losses go to ``<name>_losses.json``; ``loss_diff`` is their mean absolute difference
    from the first variant's (same data, same initialization)."""
    import yaml

    from lit_xf.callbacks import resolve_peak_flops
    from lit_xf.data import TextDataModule

    cfg = yaml.safe_load(Path(args.config).read_text())
    data_kwargs = dict(cfg.get("data") or {})
    if args.batch_size:
        data_kwargs["batch_size"] = args.batch_size
    if args.batch_mode:
        data_kwargs["batch_mode"] = args.batch_mode
    dm = TextDataModule(**data_kwargs)
    dm.setup("fit")
    model_kwargs = dict(cfg.get("model") or {})  # LitTinyGPT's arguments, the architecture under "arch"
    arch = dict(model_kwargs.get("arch") or {}) | dict(vocab_size=dm.vocab_size, max_seq_len=dm.hparams.seq_len)
    if args.attention:
        arch["attention"] = args.attention
    if args.mlp_kernel:
        arch["mlp_kernel"] = args.mlp_kernel
    model_kwargs["arch"] = arch
    trainer_cfg = cfg.get("trainer") or {}
    precision = args.precision or trainer_cfg.get("precision", "32-true")
    device = torch.device(args.device)
    peak = resolve_peak_flops(device, precision)
    parsed = {variant: _parse_variant(variant) for variant in args.variants}  # bad names fail before any run
    if args.profile_steps and args.profile_steps[1] > args.warmup_steps:
        raise ValueError(
            f"--profile-steps {args.profile_steps[0]}:{args.profile_steps[1]} must end by --warmup-steps "
            f"{args.warmup_steps}: the profiled steps are slower, and timed steps must not include them"
        )
    results: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    peaks: dict[str, int | None] = {}
    profiles: dict[str, dict] = {}
    for repeat in range(args.repeats):  # interleaved: drifts in clocks and host load hit every variant alike
        for variant in args.variants if repeat % 2 == 0 else args.variants[::-1]:
            torch.manual_seed(0)
            torch.compiler.reset()  # each run compiles its own model (no stale graphs or CUDA-graph trees)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            base, parts = parsed[variant]
            run = _hand_loop if base == "loop" else _lightning_run
            window = ProfileWindow(args.profile_steps if repeat == 0 else None, device)
            with GcPauses() as pauses:
                res = run(base, parts, model_kwargs, dm, precision, args, trainer_cfg, device, window)
            res["gc_ms"], res["gc_full"] = pauses.since(res["t0"])
            results[variant].append(res)
            peaks[variant] = round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None
            if window.result is not None:
                profiles[variant] = window.result
    rows, curves = [], {}
    tokens = dm.hparams.batch_size * dm.hparams.seq_len
    for variant in args.variants:
        runs = sorted(results[variant], key=lambda r: r["timed_s"])
        res = runs[len(runs) // 2]  # the median run (upper median for an even count)
        ms = res["timed_s"] / (args.steps - args.warmup_steps) * 1e3
        row = dict(
            variant=variant,
            precision=precision,
            attention=res["attention"],
            mlp_kernel=res["mlp_kernel"],
            steps=args.steps,
            ms_per_step=round(ms, 3),
            tokens_per_s=round(tokens / ms * 1e3),
            real_tokens_per_s=round(res["real_tokens"] / res["timed_s"]),
            final_loss=round(res["losses"][-1], 4),
            peak_mib=peaks[variant],
            mfu=round(res["flops"] / res["timed_s"] / peak, 4) if peak else None,
            warmup_s=round(results[variant][0]["warmup_s"], 2),
            gc_ms=round(res["gc_ms"], 1),
            gc_full=res["gc_full"],
        )
        if res.get("hook_us") is not None:
            row["hook_us"] = res["hook_us"]
        if args.repeats > 1:
            fastest, slowest = (r["timed_s"] / res["timed_s"] * ms for r in (runs[0], runs[-1]))
            row["ms_range"] = f"{fastest:.3f}-{slowest:.3f}"
            # in run order: repeat i of every variant ran back to back, so ratios pair up per repeat
            row["ms_runs"] = [round(r["timed_s"] / (args.steps - args.warmup_steps) * 1e3, 3) for r in results[variant]]
            # time of all this variant's runs over all the first variant's: the overhead of, e.g.,
            # lit_xf against lightning+tb, steadier than a ratio of medians
            row["time_vs_first"] = round(
                sum(r["timed_s"] for r in results[variant]) / sum(r["timed_s"] for r in results[args.variants[0]]), 4
            )
            pairs = zip(results[variant], results[args.variants[0]], strict=True)
            row["ratio_vs_first"] = round(statistics.median(r["timed_s"] / f["timed_s"] for r, f in pairs), 4)
        curves[variant] = [round(x, 5) for x in res["losses"]]
        first = curves[args.variants[0]]
        row["loss_diff"] = round(statistics.fmean(abs(a - b) for a, b in zip(curves[variant], first, strict=True)), 5)
        rows.append(row)
        _progress(row)
    base = next((r["tokens_per_s"] for r in rows if r["variant"] == "loop"), None)
    for r in rows:
        r["vs_loop"] = round(r["tokens_per_s"] / base, 3) if base else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name or 'train'}_losses.json").write_text(json.dumps(curves))
    if profiles:
        for r in rows:
            busy = profiles.get(r["variant"], {}).get("gpu_busy_frac")
            r["profiled_gpu_busy"] = round(busy, 4) if busy is not None else None
        (args.out / f"{args.name or 'train'}_profile.json").write_text(json.dumps(profiles, indent=1))
    return rows


class GcPauses:
    """Python garbage-collector pauses during a ``with`` block (``gc.callbacks``); ``since(t0)``:
    (ms paused, full collections) in those that started at ``time.perf_counter()`` ≥ t0."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, float]] = []

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._note)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._note)

    def _note(self, phase: str, info: dict) -> None:
        self.events.append((phase, info["generation"], time.perf_counter()))

    def since(self, t0: float) -> tuple[float, int]:
        ms, full, start = 0.0, 0, None
        for phase, generation, t in self.events:
            if phase == "start":
                start = t
            elif start is not None:
                if start >= t0:
                    ms += (t - start) * 1e3
                    full += generation == 2
                start = None
        return ms, full


# Variant = base ("loop", "lightning", "lit_xf") + optional parts. "lit_xf" is every monitor + TensorBoard;
# "lightning+memory+tb" only the ones named; compile modes apply to the loop too (TinyGPT.compile_model).
_MONITOR_PARTS = {"tb", "memory", "timer", "throughput", "noprofile"}
# "loop+rows": the usual hand-written GPT loop (nanoGPT's): each row is one causal sequence through
# sdpa and torch's MLP, documents attending across their boundaries, positions 0..T-1; same weights and data.
# Loops compute logits and then the loss, as written by hand; "+fused" takes lit_xf's loss instead
# (``linear_cross_entropy``, fused with the output projection).
_LOOP_PARTS = {"rows", "fused"}
_COMPILE_PARTS = {"compile": "blocks", "compile_model": "model", "cudagraphs": "cudagraphs"}


def _parse_variant(variant: str) -> tuple[str, set[str]]:
    base, *extra = variant.split("+")
    parts = set(extra)
    allowed = set(_COMPILE_PARTS) | (_MONITOR_PARTS if base != "loop" else _LOOP_PARTS)
    if base not in ("loop", "lightning", "lit_xf") or parts - allowed or len(parts & set(_COMPILE_PARTS)) > 1:
        raise ValueError(
            f"unknown train variant {variant!r}: use loop, lightning or lit_xf, optionally with one of "
            "+compile +compile_model +cudagraphs; loop also with +rows (no document masking, sdpa) and "
            "+fused (lit_xf's fused loss); "
            "Lightning ones also with +tb +memory +timer +throughput +noprofile"
        )
    if base == "lit_xf":
        parts |= {"tb", "memory", "timer", "throughput"}
    return base, parts


def _compile_mode(parts: set[str]) -> str | bool:
    return next((mode for part, mode in _COMPILE_PARTS.items() if part in parts), False)


def _hand_loop(base, parts, model_kwargs, dm, precision, args, trainer_cfg, device, window) -> dict:
    """What a user writes by hand: autocast (+ GradScaler for fp16), fused AdamW, same schedule."""
    from lit_xf.loss import compiled_token_cross_entropy, linear_cross_entropy, token_cross_entropy
    from lit_xf.module import LitTinyGPT, adamw, warmup_cosine

    rows, fused = "rows" in parts, "fused" in parts
    plain = {"attention": "sdpa", "mlp_kernel": "torch"} if rows else {}  # nanoGPT's loop: torch's kernels only
    lit = LitTinyGPT(**(model_kwargs | {"arch": model_kwargs["arch"] | plain}))  # the Lightning runs' initialization
    hp, model = lit.hparams, lit.model.to(device)
    loss_fn = token_cross_entropy
    if _compile_mode(parts):  # the loss compiled too, as in nanoGPT (whose compiled model returns it)
        model.compile_model(_compile_mode(parts))
        loss_fn = compiled_token_cross_entropy
    clip = trainer_cfg.get("gradient_clip_val")  # as the Lightning runs do: norm clipping
    opt = adamw(model, hp.lr, hp.betas, hp.weight_decay, device, scaled_clipping=bool(clip) and precision == "16-mixed")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, hp.warmup_steps, args.steps, hp.min_lr_ratio)
    )
    amp_dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "16-mixed")
    batches = _cycle(dm.train_dataloader())
    real = flops = 0
    t0, losses, start = None, [], time.perf_counter()
    for step in range(args.steps):
        window.at_step(step)
        if step == args.warmup_steps:
            _sync(device)
            t0 = time.perf_counter()
        batch = next(batches)
        ids, labels = batch["input_ids"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True)
        pos = None if rows else batch["position_ids"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(ids, pos, None if rows else batch["doc_lens"], hidden=fused)
            if fused:  # lit_xf's loss: fused with the output projection
                nll_sum, _, n_real = linear_cross_entropy(out, model.lm_head.weight, labels)
                loss = nll_sum / n_real.clamp(min=1)
        if not fused:
            loss = loss_fn(out, labels)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.detach())
        if t0 is not None:
            real += batch["stats"]["real_tokens"]
            flops += lit.flops_per_batch(batch if not rows else _as_full_rows(batch))
    window.finish()
    _sync(device)
    timed = time.perf_counter() - t0
    return dict(
        t0=t0,
        timed_s=timed,
        real_tokens=real,
        flops=flops,
        warmup_s=t0 - start,
        losses=torch.stack(losses).tolist(),
        attention=model.attention_kernel_name,
        mlp_kernel=model.mlp_kernel_name(device, amp_dtype or next(model.parameters()).dtype),  # its compute dtype
    )


def _as_full_rows(batch: dict) -> dict:
    """The batch as ``loop+rows`` computes it, for its FLOPs: one document per row, and without the
    collate's ``stats`` (they count the real documents' pairs)."""
    B, T = batch["input_ids"].shape
    return {k: v for k, v in batch.items() if k != "stats"} | {"doc_lens": [[T]] * B}


def _lightning_run(base, parts, model_kwargs, dm, precision, args, trainer_cfg, device, window) -> dict:
    import tempfile

    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_xf.callbacks import KernelTimer, PeakMemoryMonitor, ThroughputMonitor
    from lit_xf.module import LitTinyGPT

    clock = _StepClock(args.warmup_steps, device, window)
    monitors = [m() for key, m in (("memory", PeakMemoryMonitor), ("throughput", ThroughputMonitor)) if key in parts]
    if "timer" in parts:
        monitors.append(KernelTimer(profile_every_n_steps=0) if "noprofile" in parts else KernelTimer())
    hook_time = MonitorHookTime(clock, monitors) if args.hook_us and monitors else None
    logger = TensorBoardLogger(tempfile.mkdtemp(prefix="lit_xf_bench_")) if "tb" in parts else False
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        max_steps=args.steps,
        gradient_clip_val=trainer_cfg.get("gradient_clip_val"),
        logger=logger,
        callbacks=[clock, *monitors],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=trainer_cfg.get("log_every_n_steps", 50),
    )
    model = LitTinyGPT(**(model_kwargs | {"compile": _compile_mode(parts)}))
    trainer.fit(model, dm)
    return dict(
        t0=clock.t0,
        timed_s=clock.seconds,
        real_tokens=clock.real_tokens,
        flops=clock.flops,
        warmup_s=clock.t0 - clock.start,
        losses=torch.stack(clock.losses).tolist(),
        attention=model.attention_kernel_name,
        # on the run's device: the module is back on the CPU after fit
        mlp_kernel=model.model.mlp_kernel_name(device, precision_dtype(precision)),
        hook_us=hook_time.per_step(args.steps - args.warmup_steps) if hook_time else None,
    )


class MonitorHookTime:
    """Host time of the monitors' per-step hooks in the timed steps, µs per step and hook
    (``--hook-us``): each hook of each monitor instance is wrapped in ``perf_counter_ns``.
    Lightning's dispatch of the hooks (~6 µs per callback and hook on the H200's host, see
    docs/benchmarks.md §5) is not included; nested calls are not split out."""

    HOOKS = (
        "on_train_batch_start",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_train_batch_end",
    )

    def __init__(self, clock: _StepClock, monitors: list[L.Callback]) -> None:
        self.clock, self.ns = clock, collections.Counter()
        for monitor in monitors:
            for hook in self.HOOKS:
                if getattr(type(monitor), hook) is not getattr(L.Callback, hook):  # overridden
                    setattr(monitor, hook, self._timed(getattr(monitor, hook), f"{type(monitor).__name__}.{hook}"))

    def _timed(self, hook, key: str):
        def timed(*args, **kwargs):
            if self.clock.t0 is None:  # warm-up
                return hook(*args, **kwargs)
            start = time.perf_counter_ns()
            try:
                return hook(*args, **kwargs)
            finally:
                self.ns[key] += time.perf_counter_ns() - start

        return timed

    def per_step(self, steps: int) -> dict[str, float]:
        """{"total": µs, "<Monitor>.<hook>": µs, ...} per timed step, largest first."""
        us = {key: ns / 1e3 / steps for key, ns in self.ns.most_common()}
        return {"total": round(sum(us.values()), 1)} | {key: round(v, 1) for key, v in us.items()}


class _StepClock(L.Callback):
    """Synchronized host time from the start of step ``warmup`` to the end of training, the real
    tokens and FLOPs of the timed steps, and every step's loss (kept on the device until the end)."""

    def __init__(self, warmup: int, device: torch.device, window: ProfileWindow):
        self.warmup, self.device, self.window, self.t0, self.seconds = warmup, device, window, None, 0.0
        self.real_tokens = self.flops = 0
        self.losses: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.window.at_step(trainer.global_step)
        if trainer.global_step == self.warmup and self.t0 is None:
            _sync(self.device)
            self.t0 = time.perf_counter()
        if self.t0 is not None:
            self.real_tokens += batch["stats"]["real_tokens"]
            self.flops += pl_module.flops_per_batch(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())

    def on_train_end(self, trainer, pl_module):
        self.window.finish()
        _sync(self.device)
        self.seconds = time.perf_counter() - self.t0


# Kernel groups of a profiled window: the first pattern that matches a kernel's name (case-insensitive).
KERNEL_GROUPS = (
    ("attention", ATTENTION_KERNEL_PATTERN),
    ("gemm", r"gemm|nvjet|cublas|xmma|cutlass|triton_tem"),  # triton_tem: Inductor's GEMM templates
    ("loss", r"softmax|cross_entropy|nll"),
    ("norm", r"norm"),
    ("optimizer", r"adam|multi_tensor"),
    ("memcpy/memset", r"^memcpy|^memset"),
)


class ProfileWindow:
    """``torch.profiler`` over steps ``[start, stop)`` of one run (``--profile-steps``): wall time,
    GPU kernel time, the time the GPU is busy (union of kernel intervals; the rest of the wall time
    it waits for the host) and kernel time per ``KERNEL_GROUPS`` group, all per step. Synchronizes
    at both ends. ``steps=None``: does nothing."""

    def __init__(self, steps: tuple[int, int] | None, device: torch.device):
        self.steps, self.device = steps, device
        self.result: dict | None = None
        self._profiler = None

    def at_step(self, step: int) -> None:
        """Call at the start of every step."""
        if self.steps is None or self.result is not None:
            return
        if self._profiler is not None:
            self._last = step
        if step == self.steps[0] and self._profiler is None:
            kinds = torch.profiler.ProfilerActivity
            activities = [kinds.CPU] + ([kinds.CUDA] if self.device.type == "cuda" else [])
            _sync(self.device)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
            self._t0, self._first, self._last = time.perf_counter(), step, step
        elif step >= self.steps[1] and self._profiler is not None:
            self.finish(step)

    def finish(self, step: int | None = None) -> None:
        """Close the window at ``step`` (or at the end of the run) and summarize it."""
        if self._profiler is None:
            return
        _sync(self.device)
        wall_ms = (time.perf_counter() - self._t0) * 1e3
        self._profiler.stop()
        n = max(1, (step if step is not None else self._last + 1) - self._first)
        kernels = _kernel_intervals(self._profiler)
        self._profiler = None
        self.result = {"steps": [self._first, self._first + n], "wall_ms_per_step": wall_ms / n}
        if not kernels:
            return  # no device kernels (CPU)
        kernels.sort(key=lambda k: k[1])
        busy, end = 0.0, kernels[0][1]
        groups: dict[str, float] = {}
        names: dict[str, float] = {}
        gaps: list[float] = []  # µs between the end of all earlier work and the next start
        for name, start, dur in kernels:
            if start > end:
                gaps.append(start - end)
            busy += max(0.0, start + dur - max(start, end))
            end = max(end, start + dur)
            group = next((g for g, pattern in KERNEL_GROUPS if re.search(pattern, name, re.I)), "other")
            groups[group] = groups.get(group, 0.0) + dur
            names[name] = names.get(name, 0.0) + dur
        self.result |= {
            "gpu_kernel_ms_per_step": sum(groups.values()) / 1e3 / n,
            "gpu_busy_ms_per_step": busy / 1e3 / n,
            "gpu_busy_frac": busy / 1e3 / wall_ms,
            "gpu_idle_ms_per_step": idle_by_gap_size(gaps, n),
            "kernel_ms_per_step": {g: round(v / 1e3 / n, 3) for g, v in sorted(groups.items(), key=lambda x: -x[1])},
            "top_kernels_ms_per_step": [
                (k[:100], round(v / 1e3 / n, 3)) for k, v in sorted(names.items(), key=lambda x: -x[1])[:10]
            ],
        }


# Idle gaps between device work by size: launch gaps of kernels queued back to back (< 5 µs),
# short waits, and the host falling behind or a synchronization (≥ 100 µs).
GAP_SIZES_US = ((0.0, "<5us"), (5.0, "5-100us"), (100.0, ">=100us"))


def idle_by_gap_size(gaps_us: list[float], steps: int) -> dict[str, dict[str, float]]:
    """Per step, the GPU's idle gaps (µs, between device intervals) grouped by ``GAP_SIZES_US``:
    ``{size: {"count": gaps per step, "ms": idle ms per step}}``."""
    out = {label: {"count": 0.0, "ms": 0.0} for _, label in GAP_SIZES_US}
    for gap in gaps_us:
        label = [lab for low, lab in GAP_SIZES_US if gap >= low][-1]
        out[label]["count"] += 1 / steps
        out[label]["ms"] += gap / 1e3 / steps
    return {label: {k: round(v, 3) for k, v in d.items()} for label, d in out.items()}


def _kernel_intervals(profiler) -> list[tuple[str, float, float]]:
    """(name, start µs, duration µs) of every device kernel, copy and memset the profiler recorded."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        profiler.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    device_kinds = ("kernel", "gpu_memcpy", "gpu_memset")
    return [(e["name"], float(e["ts"]), float(e["dur"])) for e in events if e.get("cat") in device_kinds and "dur" in e]


# --------------------------------------------------------------------------------------------
# curves: TensorBoard runs rendered side by side
# --------------------------------------------------------------------------------------------
CURVE_TAGS = ("memory/peak_allocated_mib", "time/step_ms", "throughput/real_tokens_per_s", "time/attention_share")


def read_scalars(logdir: Path, tags=CURVE_TAGS) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TensorBoard event files under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags if t in have}


def bench_curves(args) -> list[dict]:
    """Per-step curves of several runs in one PNG, and each run's medians (after the first steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {
        Path(d).parent.name if Path(d).name.startswith("version_") else Path(d).name: read_scalars(Path(d))
        for d in args.logdirs
    }
    fig, axes = plt.subplots(1, len(CURVE_TAGS), figsize=(5 * len(CURVE_TAGS), 3.6))
    rows = []
    for name, scalars in runs.items():
        row = {"run": name}
        for ax, tag in zip(axes, CURVE_TAGS, strict=True):
            pts = scalars.get(tag, [])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "." if len(pts) < 20 else "-", label=name)
                row[tag] = round(statistics.median(v for _, v in pts[len(pts) // 10 :]), 3)
                if tag.startswith("time/step"):  # keep the first (compiling) steps from flattening the rest
                    ax.set_ylim(0, 3 * max(row[tag] for row in rows + [row] if row.get(tag)))
            ax.set_title(tag)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        rows.append(row)
    axes[0].legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / f"{args.name or 'curves'}.png", dpi=110)
    plt.close(fig)
    return rows


def _cycle(loader):
    """The loader's batches epoch after epoch, its samplers told each epoch as Lightning tells them
    (so a hand loop sees Lightning's data order past the first epoch)."""
    for epoch in itertools.count():
        for sampler in (loader.sampler, loader.batch_sampler):
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch)
        yield from loader


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------
def _progress(row: dict) -> None:
    print("  " + " ".join(f"{k}={v}" for k, v in row.items() if v not in (None, "")), flush=True)


def markdown_table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(rows: list[dict], out: Path, name: str, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)


def plot_attention(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ms, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        pts = [r for r in rows if r["kernel"] == kernel and r.get("ms")]
        if pts:
            ax_ms.plot([r["seq_len"] for r in pts], [r["ms"] for r in pts], "o-", label=kernel)
            mem = [r for r in pts if r.get("peak_mib")]
            if mem:
                ax_mem.plot([r["seq_len"] for r in mem], [r["peak_mib"] for r in mem], "o-", label=kernel)
    for ax, ylabel in ((ax_ms, "fwd+bwd ms"), (ax_mem, "peak MiB (CUDA only)")):
        ax.set_xscale("log", base=2)
        if ax.lines:
            ax.set_yscale("log")
            ax.legend()
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    meta = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    try:
        import xformers

        meta["xformers"] = xformers.__version__
    except Exception:
        pass
    return meta


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _step_range(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    try:
        if sep and 0 <= int(start) < int(stop):
            return int(start), int(stop)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected START:STOP with 0 <= START < STOP, got {text!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _names(text: str) -> list[str]:
    names = text.split(",")
    bad = [n for n in names if n not in ATTENTION_CHOICES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown kernel(s) {bad}; choose from {', '.join(ATTENTION_CHOICES)}")
    return names


def _packing_modes(text: str) -> list[str]:
    modes = text.split(",")
    if any(m not in ("padded", "packed") for m in modes):
        raise argparse.ArgumentTypeError(f"modes {text!r}: padded, packed or padded,packed")
    return modes


def build_parser() -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(prog="lit-xf bench", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, kernels, dtype):
        sp.add_argument("--device", default=default_device)
        sp.add_argument("--kernels", type=_names, default=kernels)
        sp.add_argument("--out", type=Path, default=Path("bench_results"))
        sp.add_argument("--name", default=None, help="output file stem (default: the command)")
        sp.add_argument("--heads", type=int, default=8)
        sp.add_argument("--kv-heads", type=int, default=None)
        sp.add_argument("--head-dim", type=int, default=64)
        sp.add_argument("--alibi", action="store_true")
        sp.add_argument(
            "--window", type=_positive_int, default=None, help="sliding-window attention over this many tokens (causal)"
        )
        sp.add_argument("--warmup", type=int, default=5)
        sp.add_argument("--reps", type=int, default=30)
        sp.add_argument("--dtype", choices=DTYPES, default=dtype)

    a = sub.add_parser("attention", help="time and memory per kernel across sequence lengths")
    common(a, ["naive", "sdpa", "xformers", "flex", "auto"], "fp16" if default_device == "cuda" else "fp32")
    a.add_argument("--seq-lens", type=_ints, default=[512, 1024, 2048, 4096])
    a.add_argument("--batch", type=int, default=2)
    a.add_argument("--causal", action=argparse.BooleanOptionalAction, default=False)

    c = sub.add_parser("correctness", help="every kernel vs the float64 reference, forward and backward")
    common(c, ["naive", "sdpa", "xformers", "flex"], "fp32")
    c.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp16", "bf16"])
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--batch", type=int, default=2)

    t = sub.add_parser("train", help="end-to-end steps: hand-written loop vs Lightning vs lit_xf with monitors")
    t.add_argument("--config", default="configs/counting.yaml")
    t.add_argument("--device", default=default_device)
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--warmup-steps", type=int, default=50)
    t.add_argument("--precision", default=None, help="default: the config's trainer.precision")
    t.add_argument("--attention", default=None, help="override the config's model.arch.attention")
    t.add_argument("--mlp-kernel", choices=MLP_KERNELS, default=None, help="override model.arch.mlp_kernel")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--batch-mode", choices=BATCH_MODES, default=None, help="override the config's data.batch_mode")
    t.add_argument("--variants", type=lambda s: s.split(","), default=["loop", "lightning", "lit_xf"])
    t.add_argument("--repeats", type=_positive_int, default=1, help="runs per variant, interleaved; median reported")
    t.add_argument(
        "--profile-steps",
        type=_step_range,
        default=None,
        metavar="A:B",
        help="torch.profiler over steps A..B-1 of each variant's first run (within the warm-up): GPU busy "
        "fraction, kernel time by group -> <name>_profile.json",
    )
    t.add_argument(
        "--hook-us",
        action="store_true",
        help="time the monitors' per-step hooks on the host (µs per step and hook -> hook_us)",
    )
    t.add_argument("--out", type=Path, default=Path("bench_results"))
    t.add_argument("--name", default=None)

    cv = sub.add_parser("curves", help="render TensorBoard runs' memory/time/throughput curves to one PNG")
    cv.add_argument("logdirs", nargs="+", help="TensorBoard run folders (e.g. runs/fortunes_packed/version_0)")
    cv.add_argument("--out", type=Path, default=Path("bench_results"))
    cv.add_argument("--name", default=None)

    k = sub.add_parser("packing", help="the same documents padded to the longest vs packed")
    common(k, ["sdpa", "xformers", "flex", "auto"], "bf16" if default_device == "cuda" else "fp32")
    k.add_argument("--docs", type=int, default=256)
    k.add_argument("--mean-len", type=float, default=422)
    k.add_argument("--max-len", type=int, default=2048)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument(
        "--modes", type=_packing_modes, default=["padded", "packed"], help="padded, packed or both (default)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "window", None) and args.command == "attention" and not args.causal:
        parser.error("--window is a causal sliding window: add --causal")
    meta = environment() | {"command": "lit-xf bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"# {meta}", flush=True)
    run = {
        "attention": bench_attention,
        "correctness": bench_correctness,
        "packing": bench_packing,
        "train": bench_train,
        "curves": bench_curves,
    }[args.command]
    rows = run(args)
    name = args.name or args.command
    write_outputs(rows, args.out, name, meta)
    if args.command == "attention":
        plot_attention(
            rows,
            args.out / f"{name}.png",
            f"B={args.batch} H={args.heads} K={args.head_dim} {args.dtype} "
            f"{'causal' if args.causal else 'non-causal'} fwd+bwd",
        )
    print(markdown_table(rows))
    failed = [r for r in rows if r.get("status") in ("FAIL", "error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
