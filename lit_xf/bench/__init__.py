"""Benchmarks, one module per benchmark: ``lit-xf bench {attention,correctness,packing,train,curves,compare}``
(``python -m lit_xf.bench`` the same).

- ``attention``: fwd+bwd time, TFLOP/s and peak memory per kernel across sequence lengths.
- ``correctness``: every kernel against the float64 reference, forward and q/k/v gradients.
- ``packing``: the same documents padded to the longest vs packed, per kernel.
- ``train``: end-to-end steps, a hand-written loop vs Lightning vs lit_xf with its monitors.
- ``curves``: TensorBoard runs' curves side by side.
- ``compare``: a rerun's results files against the committed ones (exit 1 on a regression).

Shared pieces: ``timing`` (device-synchronized timings, GPU time of queued calls, GC pauses),
``profile`` (a profiler window over training steps), ``output`` (tables, files, plots, environment)
and ``cli`` (the parser and ``main``).
"""

from lit_xf.bench.attention import (
    DTYPES,
    attention_flops,
    bench_attention,
    fwd_bwd_case,
    gpu_vs_best,
    plan_note,
    run_case,
)
from lit_xf.bench.cli import build_parser, main
from lit_xf.bench.correctness import TOLERANCE, bench_correctness, reference, rel_err, run_kernel
from lit_xf.bench.curves import CURVE_TAGS, bench_curves, read_scalars
from lit_xf.bench.output import environment, markdown_table, plot_attention, progress, write_outputs
from lit_xf.bench.packing import bench_packing, lognormal_doc_lens
from lit_xf.bench.profile import GAP_SIZES_US, KERNEL_GROUPS, ProfileWindow, idle_by_gap_size, kernel_intervals
from lit_xf.bench.timing import GcPauses, measure, queued_gpu_ms, sleep_cycles_per_ms, sync, time_call
from lit_xf.bench.train import MonitorHookTime, StepClock, as_full_rows, bench_train, hand_loop

__all__ = [
    "CURVE_TAGS",
    "DTYPES",
    "GAP_SIZES_US",
    "KERNEL_GROUPS",
    "TOLERANCE",
    "GcPauses",
    "MonitorHookTime",
    "ProfileWindow",
    "StepClock",
    "as_full_rows",
    "attention_flops",
    "bench_attention",
    "bench_correctness",
    "bench_curves",
    "bench_packing",
    "bench_train",
    "build_parser",
    "environment",
    "plan_note",
    "fwd_bwd_case",
    "gpu_vs_best",
    "hand_loop",
    "idle_by_gap_size",
    "kernel_intervals",
    "lognormal_doc_lens",
    "main",
    "markdown_table",
    "measure",
    "plot_attention",
    "progress",
    "queued_gpu_ms",
    "read_scalars",
    "reference",
    "rel_err",
    "run_case",
    "run_kernel",
    "sleep_cycles_per_ms",
    "sync",
    "time_call",
    "write_outputs",
]
