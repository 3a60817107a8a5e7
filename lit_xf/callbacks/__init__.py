"""Training monitors: peak CUDA memory, per-phase kernel timings and throughput/MFU.

Three independent Lightning callbacks, one module each (``memory``, ``kernel_timer``,
``throughput``), in the shape of Lightning's ``DeviceStatsMonitor`` / ``ThroughputMonitor``:
arguments stored in ``__init__``, checked in ``setup``, thin hooks that call one private worker,
tags with a stable prefix. Any one of them works alone.

Scalar tags (one value per optimizer step, see :data:`TAGS`)::

    memory/peak_allocated_mib       peak bytes held by tensors during the step, MiB    (CUDA only)
    memory/peak_reserved_mib        peak bytes reserved by the caching allocator, MiB  (CUDA only)
    memory/alloc_retries            cudaMalloc retries (cache flush + retry) in the step (CUDA only)
    memory/ooms                     out-of-memory errors raised in the step            (CUDA only)
    memory/params_mib               parameters, each storage once           (MemoryBreakdown)
    memory/grads_mib                gradients at the optimizer step         (MemoryBreakdown)
    memory/optimizer_mib            optimizer state                         (MemoryBreakdown)
    memory/forward_end_mib          allocated at the forward's end          (MemoryBreakdown, CUDA only)
    memory/activations_mib          forward end − params − optimizer − grads (MemoryBreakdown, CUDA only)
    memory/attention_plan_mib       the attention kernel's plan (masks)     (MemoryBreakdown)
    time/forward_ms                 batch start -> before backward, summed over micro-batches
    time/backward_ms                before -> after backward, summed over micro-batches
    time/optimizer_ms               last after-backward -> batch end (unscale, clipping, step)
    time/step_ms                    first micro-batch start -> batch end of the optimizer step
    time/attention_share            attention kernels' share of profiled time (profiled steps only)
    throughput/tokens_per_s         tokens (B*T, pads included) per second, windowed
    throughput/real_tokens_per_s    non-pad tokens per second, windowed
    throughput/padding_efficiency   real_tokens / tokens of this step's batches
    throughput/tflops               achieved TFLOP/s from ``flops_per_batch``, windowed
    throughput/mfu                  achieved FLOP/s / dense peak FLOP/s (when a peak is known)

``LearningRateLogger`` (``learning_rate``) adds ``train/lr``, every ``log_every_n_steps`` steps:
one curve per distinct rate, where Lightning's ``LearningRateMonitor`` draws one per parameter group.

Text tags (TensorBoard only): ``run/info`` (kernel choices, library versions, device; once per fit,
after the first training backward so a lazily resolved ``auto`` kernel shows its real choice,
written by the first monitor in ``trainer.callbacks``) and ``time/top_kernels`` (the top kernels of
each profiled step); ``memory/snapshot`` (``MemorySnapshot``: the paths of a snapshot's files).
The first monitor also writes ready-made charts of the scalars to TensorBoard's "Custom Scalars"
tab (:func:`add_custom_scalars_layout`).

Logging. Every value belongs to the optimizer step it measures: the step index is
``trainer.global_step`` read when that step's first micro-batch starts, which is the index
Lightning's own ``self.log`` uses for the same step, so the curves share an x-axis. Each monitor
logs its own values of a step with one ``logger.log_metrics(metrics, step=step)`` call per logger,
on global rank zero only: exactly one point per step and tag, whatever ``log_every_n_steps`` is,
and no communication. What is left unread is logged at train end (or when training fails).
Lightning's ``TensorBoardLogger`` writes one event per scalar in the training process;
``lit_xf.loggers.AsyncTensorBoardLogger`` writes each call as one event from a child process,
which matters for launch-bound steps (``configs/counting.yaml`` on an H200: +21.6% step time
against +2.3%; see ``lit_xf.loggers``). All numbers are rank zero's device.

Synchronization. On CUDA, timings are CUDA events recorded on the current stream at the hooks and
read later (``lit_xf.callbacks.deferred``): a finished step's events are read once its last event
has completed (``query()``), so no step waits on the GPU. Memory statistics are allocator
bookkeeping on the host and need no sync. Reading and logging happen in ``on_after_backward``,
``_READ_EVERY`` steps at a time, while the device runs that backward: at a step's end, where an
optimizer step that syncs (a logged ``loss.item()``, GradScaler's inf check without a fused
optimizer) leaves the device idle, the monitors only record marks and counts. At most
``_MAX_PENDING`` steps stay unread before the oldest is waited for, and ``on_train_end`` waits for
the rest. The profiler window (``KernelTimer``) syncs when it stops, once per
``profile_every_n_steps``. Without CUDA, clocks are ``time.perf_counter`` after the device's
``synchronize`` (a no-op on CPU).
"""

from lit_xf.callbacks.deferred import DeviceClock, StepMonitor
from lit_xf.callbacks.kernel_timer import (
    ATTENTION_KERNEL_PATTERN,
    TIME_TAGS,
    TOP_KERNELS_TAG,
    KernelTimer,
    attention_share,
    top_kernels_table,
)
from lit_xf.callbacks.learning_rate import LR_TAG, LearningRateLogger, learning_rates
from lit_xf.callbacks.memory import MEMORY_TAGS, PeakMemoryMonitor
from lit_xf.callbacks.memory_breakdown import BREAKDOWN_TAGS, MemoryBreakdown
from lit_xf.callbacks.memory_snapshot import SNAPSHOT_TAG, MemorySnapshot
from lit_xf.callbacks.run_info import RUN_INFO_TAG, add_custom_scalars_layout, log_run_info
from lit_xf.callbacks.throughput import THROUGHPUT_TAGS, ThroughputMonitor

# Kept importable from here for existing users; their home is lit_xf.hardware.
from lit_xf.hardware import dense_peak_flops, precision_dtype, resolve_peak_flops

#: Every scalar tag the monitors write (stable names; see the module docstring).
TAGS = MEMORY_TAGS + BREAKDOWN_TAGS + TIME_TAGS + THROUGHPUT_TAGS
#: Text tags written to TensorBoard loggers.
TEXT_TAGS = (RUN_INFO_TAG, TOP_KERNELS_TAG, SNAPSHOT_TAG)

__all__ = [
    "ATTENTION_KERNEL_PATTERN",
    "BREAKDOWN_TAGS",
    "SNAPSHOT_TAG",
    "MemoryBreakdown",
    "MemorySnapshot",
    "LR_TAG",
    "MEMORY_TAGS",
    "TAGS",
    "TEXT_TAGS",
    "THROUGHPUT_TAGS",
    "TIME_TAGS",
    "DeviceClock",
    "KernelTimer",
    "LearningRateLogger",
    "PeakMemoryMonitor",
    "StepMonitor",
    "ThroughputMonitor",
    "add_custom_scalars_layout",
    "attention_share",
    "dense_peak_flops",
    "learning_rates",
    "log_run_info",
    "precision_dtype",
    "resolve_peak_flops",
    "top_kernels_table",
]
