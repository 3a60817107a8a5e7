"""Training monitors: peak CUDA memory, per-phase kernel timings and throughput/MFU.

Three Lightning callbacks, each in the shape of Lightning's ``DeviceStatsMonitor`` /
``ThroughputMonitor``: arguments stored in ``__init__``, checked in ``setup``, thin hooks that call
one private worker, tags with a stable prefix.

Scalar tags (one value per optimizer step, see :data:`TAGS`)::

    memory/peak_allocated_mib       peak bytes held by tensors during the step, MiB    (CUDA only)
    memory/peak_reserved_mib        peak bytes reserved by the caching allocator, MiB  (CUDA only)
    memory/alloc_retries            cudaMalloc retries (cache flush + retry) in the step (CUDA only)
    memory/ooms                     out-of-memory errors raised in the step            (CUDA only)
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

Text tags (TensorBoard only): ``run/info`` (kernel choices, library versions, device; once, after
the first training batch so a lazily resolved ``auto`` kernel shows its real choice) and
``time/top_kernels`` (the top kernels of each profiled step). :func:`add_custom_scalars_layout`
writes ready-made charts of the scalars to TensorBoard's "Custom Scalars" tab.

Logging. Every value belongs to the optimizer step it measures: the step index is
``trainer.global_step`` read when that step's first micro-batch starts, which is the index
Lightning's own ``self.log`` uses for the same step, so the curves share an x-axis. The monitors'
values of one step are merged and written together, once every monitor has reported that step
(one TensorBoard event per step, or ``logger.log_metrics(metrics, step=...)`` for other
loggers), on global rank zero only; what is left is written at train end. TensorBoard events are
written by a child process (``lit_xf.tb_writer``) into the logger's directory, in batches; the
training thread only queues them. They are on disk when training ends (or fails).
``pl_module.log`` is not used: from a callback it goes through the logger connector, which writes
only every ``log_every_n_steps`` and syncs across ranks with ``sync_dist``; direct writes give
exactly one point per step and tag, whatever ``log_every_n_steps`` is, and never communicate.
All numbers are rank zero's device (multiply rates by the world size for the job's total).

Synchronization. On CUDA, timings are CUDA events recorded on the current stream at the hooks and
read later: a finished step's events are read once its last event has completed (``query()``), so
no step waits on the GPU; values are then logged with the step they belong to. Memory statistics
are allocator bookkeeping on the host and need no sync. The reading, merging and writing happen in
``on_after_backward``, ``_READ_EVERY`` steps at a time, while the device runs that backward: at a
step's end, where an optimizer step that syncs (a logged ``loss.item()``, GradScaler's inf check
without a fused optimizer) leaves the device idle, the monitors only record marks and counts. At
most ``_MAX_PENDING`` steps stay unread before the oldest is waited for, and ``on_train_end`` waits
for the rest. The profiler window (``KernelTimer``) syncs when it stops, once per
``profile_every_n_steps``. Without CUDA, clocks are ``time.perf_counter`` after the device's
``synchronize`` (a no-op on CPU).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
import time
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import lightning
import torch
from lightning.fabric.loggers import TensorBoardLogger
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_xf.tb_writer import ScalarEventProcess

__all__ = [
    "ATTENTION_KERNEL_PATTERN",
    "TAGS",
    "TEXT_TAGS",
    "KernelTimer",
    "PeakMemoryMonitor",
    "ThroughputMonitor",
    "add_custom_scalars_layout",
    "attention_share",
    "dense_peak_flops",
    "log_run_info",
    "resolve_peak_flops",
    "top_kernels_table",
]

MEMORY_TAGS = (
    "memory/peak_allocated_mib",
    "memory/peak_reserved_mib",
    "memory/alloc_retries",
    "memory/ooms",
)
TIME_TAGS = (
    "time/forward_ms",
    "time/backward_ms",
    "time/optimizer_ms",
    "time/step_ms",
    "time/attention_share",
)
THROUGHPUT_TAGS = (
    "throughput/tokens_per_s",
    "throughput/real_tokens_per_s",
    "throughput/padding_efficiency",
    "throughput/tflops",
    "throughput/mfu",
)
#: Every scalar tag the callbacks write (stable names; see the module docstring).
TAGS = MEMORY_TAGS + TIME_TAGS + THROUGHPUT_TAGS
#: Text tags written to TensorBoard loggers.
TEXT_TAGS = ("run/info", "time/top_kernels")

#: Kernel (or, on CPU, op) names counted as attention: xformers/PyTorch memory-efficient
#: (``fmha_cutlassF/B``), FlashAttention 2/3/4 (``flash_*``), cuDNN SDPA (``*sdpa*``/``*fmha*``),
#: FlexAttention (``*flex*``) and anything naming attention (``efficient_attention``, ...).
#: GEMMs (``cutlass_80_...``, ``sm90_xmma...``) and softmax are not matched, so a naive
#: (matmul + softmax) attention counts as ~0.
ATTENTION_KERNEL_PATTERN = r"fmha|flash|attention|attn|cutlass[FB]|sdpa|flex"

_MIB = 2**20
_READ_EVERY = 8  # finished steps read together (one warm loop instead of scattered per-step work)
_MAX_PENDING = 32  # unread steps before the oldest is waited for


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit-tested without a Trainer)


def attention_share(kernels: Iterable[tuple[str, float]], pattern: str = ATTENTION_KERNEL_PATTERN) -> float | None:
    """Share of time spent in kernels whose name matches ``pattern`` (case-insensitive search).

    ``kernels`` are ``(name, time)`` pairs in any one unit; ``None`` when the total time is zero.
    """
    rx = re.compile(pattern, re.IGNORECASE)
    total = matched = 0.0
    for name, t in kernels:
        total += t
        if rx.search(name):
            matched += t
    return matched / total if total > 0 else None


def top_kernels_table(
    kernels: Iterable[tuple[str, float]], k: int = 10, pattern: str = ATTENTION_KERNEL_PATTERN
) -> str:
    """Markdown table of the ``k`` names with the most total time (µs in, ms out)."""
    rx = re.compile(pattern, re.IGNORECASE)
    totals: dict[str, list[float]] = {}
    for name, t in kernels:
        entry = totals.setdefault(name, [0.0, 0])
        entry[0] += t
        entry[1] += 1
    grand = sum(t for t, _ in totals.values()) or 1.0
    rows = ["| share | ms | calls | attention | name |", "|---:|---:|---:|:---:|---|"]
    for name, (t, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:k]:
        shown = name if len(name) <= 160 else name[:157] + "..."
        shown = shown.replace("|", "\\|")
        flag = "yes" if rx.search(name) else ""
        rows.append(f"| {t / grand:.1%} | {t / 1e3:.3f} | {calls} | {flag} | `{shown}` |")
    return "\n".join(rows)


# Dense (not 2:4 sparse) peaks per GPU from NVIDIA's datasheets. Lightning's table lists H200 SXM
# and H100 NVL at their sparse figures and does not parse a plain "NVIDIA H200", so Hopper is
# looked up here. Keys: bf16/fp16, tf32 (fp32 matmuls with TF32 allowed), fp32, fp64.
_HOPPER_DENSE = {
    "sxm": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12, "fp64": 33.5e12},
    "nvl": {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12, "fp64": 30.0e12},
    "pcie": {"bf16": 756.0e12, "tf32": 378.0e12, "fp32": 51.2e12, "fp64": 25.6e12},
}


def _dtype_key(dtype: torch.dtype, tf32: bool) -> str | None:
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype == torch.float32:
        return "tf32" if tf32 else "fp32"
    if dtype == torch.float64:
        return "fp64"
    return None


def dense_peak_flops(device_name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Dense peak FLOP/s of a Hopper GPU (H100/H200 SXM, NVL, PCIe) by its CUDA name, else ``None``.

    ``"NVIDIA H200"``/``"NVIDIA H100 80GB HBM3"`` with bf16 or fp16 -> 989.4e12.
    """
    chip = device_name.lower()
    if "h100" not in chip and "h200" not in chip:
        return None
    if "nvl" in chip:
        form = "nvl"
    elif "pcie" in chip or "hbm2e" in chip:
        form = "pcie"
    else:
        form = "sxm"
    key = _dtype_key(dtype, tf32)
    return _HOPPER_DENSE[form].get(key) if key else None


def precision_dtype(precision: str | int) -> torch.dtype:
    """The matmul dtype of a Lightning precision string (``"bf16-mixed"``, ``"16-true"``, ...)."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    if p.startswith("64"):
        return torch.float64
    return torch.float32


def resolve_peak_flops(device: torch.device, precision: str | int, override: float | None = None) -> float | None:
    """Peak FLOP/s of ``device`` at ``precision``: ``override``, the dense Hopper table, Lightning's table.

    ``None`` on CPU or for unknown GPUs (then MFU is not logged).
    """
    if override is not None:
        return float(override)
    if device.type == "cpu":
        return None
    dtype = precision_dtype(precision)
    if device.type == "cuda":
        tf32 = torch.get_float32_matmul_precision() != "highest"
        found = dense_peak_flops(torch.cuda.get_device_name(device), dtype, tf32=tf32)
        if found is not None:
            return found
    try:
        found = get_available_flops(device, dtype)
    except Exception:  # e.g. an accelerator Lightning's table cannot query
        return None
    return float(found) if found else None


# ---------------------------------------------------------------------------------------------
# TensorBoard: layout and run info

_LAYOUT_DONE: weakref.WeakSet = weakref.WeakSet()
_RUN_INFO_DONE: weakref.WeakSet = weakref.WeakSet()
_RUN_INFO_TRAINERS: weakref.WeakSet = weakref.WeakSet()


def _tensorboard_loggers(trainer: Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def add_custom_scalars_layout(logger: Any) -> dict | None:
    """Write the "Custom Scalars" charts for :data:`TAGS` to a ``TensorBoardLogger``; returns the layout.

    Does nothing (returns ``None``) for other loggers. Call once per logger (TensorBoard keeps one
    layout per writer); the callbacks do so on rank zero at fit start.
    """
    if not isinstance(logger, TensorBoardLogger):
        return None
    prefix = getattr(logger, "_prefix", "") or ""
    lead = re.escape(prefix + "-") if prefix else ""

    def tags(*names: str) -> list[str]:
        return [lead + re.escape(n) + "$" for n in names]

    layout = {
        "lit_xf memory": {
            "peak memory (MiB)": ["Multiline", tags("memory/peak_allocated_mib", "memory/peak_reserved_mib")],
            "allocator retries and OOMs per step": ["Multiline", tags("memory/alloc_retries", "memory/ooms")],
        },
        "lit_xf time": {
            "step phases (ms)": [
                "Multiline",
                tags("time/forward_ms", "time/backward_ms", "time/optimizer_ms", "time/step_ms"),
            ],
            "attention share of device time": ["Multiline", tags("time/attention_share")],
        },
        "lit_xf throughput": {
            "tokens/s": ["Multiline", tags("throughput/tokens_per_s", "throughput/real_tokens_per_s")],
            "padding efficiency": ["Multiline", tags("throughput/padding_efficiency")],
            "TFLOP/s": ["Multiline", tags("throughput/tflops")],
            "MFU": ["Multiline", tags("throughput/mfu")],
        },
    }
    logger.experiment.add_custom_scalars(layout)
    return layout


def _library_version(name: str) -> str:
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return importlib.metadata.version(name) + " (installed)"
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def log_run_info(trainer: Trainer, pl_module: LightningModule) -> dict[str, str]:
    """Write the run's kernel choices, library versions and device as ``run/info`` text; returns the facts.

    Text goes to every ``TensorBoardLogger`` of ``trainer`` (call on rank zero). xformers is not
    imported for this: its version comes from the loaded module or the installed metadata.
    """
    device = trainer.strategy.root_device
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{device.type} ({platform.processor() or platform.machine()})"
    info = {
        "attention kernel": str(getattr(pl_module, "attention_kernel_name", "unknown")),
        "MLP kernel": str(getattr(pl_module, "mlp_kernel_name", "unknown")),
        "device": device_name,
        "world size": str(trainer.world_size),
        "precision": str(trainer.precision),
        "accumulate_grad_batches": str(trainer.accumulate_grad_batches),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "xformers": _library_version("xformers"),
        "CUDA runtime": str(torch.version.cuda),
        "cuDNN": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "python": platform.python_version(),
    }
    model = getattr(pl_module, "model", None)
    if hasattr(model, "attention_window"):  # TinyGPT's sliding window
        window = model.attention_window
        info["attention window"] = "none" if window is None else f"{window} tokens"
    for cb in trainer.callbacks:
        if isinstance(cb, ThroughputMonitor) and cb._peak_flops is not None:
            info["peak FLOP/s (MFU denominator)"] = f"{cb._peak_flops:.4g}"
    text = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in info.items())
    for logger in _tensorboard_loggers(trainer):
        logger.experiment.add_text("run/info", text, global_step=trainer.global_step)
    return info


def _log_layout_once(trainer: Trainer) -> None:
    if not trainer.is_global_zero:
        return
    for logger in _tensorboard_loggers(trainer):
        if logger not in _LAYOUT_DONE:
            _LAYOUT_DONE.add(logger)
            add_custom_scalars_layout(logger)


def _log_run_info_once(trainer: Trainer, pl_module: LightningModule) -> None:
    if trainer in _RUN_INFO_TRAINERS:  # every monitor calls this once: the first one writes
        return
    _RUN_INFO_TRAINERS.add(trainer)
    if not trainer.is_global_zero:
        return
    loggers = [lg for lg in _tensorboard_loggers(trainer) if lg not in _RUN_INFO_DONE]
    if loggers:
        _RUN_INFO_DONE.update(loggers)
        log_run_info(trainer, pl_module)


def _log_metrics(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    if metrics and trainer.is_global_zero:
        for logger in trainer.loggers:
            if not _write_tensorboard_event(logger, metrics, step):
                logger.log_metrics(metrics, step=step)


class _StepScalars:
    """One trainer's monitor scalars, merged per step so that a step costs one write per logger
    (each TensorBoard event costs tens of µs of the training thread's time).

    Monitors that report every step register (``join``); a step is written once all of them have
    reported it, once it is ``2·_MAX_PENDING + 1`` steps older than the newest report (a monitor
    skipped it), or at ``flush``. Extra values for a step (a profiled step's attention share) merge
    in without counting as a report; one arriving after its step was written goes out on its own.
    """

    def __init__(self) -> None:
        self.reporters: set[int] = set()
        self.ended: set[int] = set()
        self.steps: dict[int, tuple[dict[str, float], set[int]]] = {}

    def join(self, reporter: object) -> None:
        self.reporters.add(id(reporter))
        self.ended.discard(id(reporter))

    def add(self, trainer: Trainer, metrics: dict[str, float], step: int, reporter: object = None) -> None:
        values, seen = self.steps.setdefault(step, ({}, set()))
        values.update(metrics)
        if reporter is None:
            return
        seen.add(id(reporter))
        if seen >= self.reporters:
            del self.steps[step]
            _log_metrics(trainer, values, step)
        for old in [s for s in self.steps if s < step - 2 * _MAX_PENDING]:
            _log_metrics(trainer, self.steps.pop(old)[0], old)

    def end(self, trainer: Trainer, reporter: object) -> None:
        """``reporter`` has logged its last step: once every reporter has, write what is left."""
        self.ended.add(id(reporter))
        if self.ended >= self.reporters:
            self.flush(trainer)

    def flush(self, trainer: Trainer) -> None:
        for step in sorted(self.steps):
            _log_metrics(trainer, self.steps.pop(step)[0], step)
        _close_event_processes(trainer)


_STEP_SCALARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _flush_step_scalars(trainer: Trainer) -> None:
    scalars = _STEP_SCALARS.get(trainer)
    if scalars is not None:
        scalars.flush(trainer)


def _step_scalars(trainer: Trainer) -> _StepScalars:
    scalars = _STEP_SCALARS.get(trainer)
    if scalars is None:
        scalars = _STEP_SCALARS[trainer] = _StepScalars()
    return scalars


# TensorBoardLogger -> its child writer (ScalarEventProcess), or None: write in this process
_EVENT_PROCESSES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _write_tensorboard_event(logger: Any, metrics: dict[str, float], step: int) -> bool:
    """All of a step's scalars as one TensorBoard event (``log_metrics`` writes one event per
    scalar), written by a child process where the log directory is local (``lit_xf.tb_writer``),
    else by the logger's own writer. False for loggers other than TensorBoard's."""
    if not isinstance(logger, TensorBoardLogger):
        return False
    prefix = (logger._prefix + logger.LOGGER_JOIN_CHAR) if getattr(logger, "_prefix", "") else ""
    tagged = {prefix + tag: float(v) for tag, v in metrics.items()}
    writer = _event_process(logger)
    if writer is not None:
        try:
            writer.add(step, tagged)
        except OSError as err:  # this step is among the unsent ones
            _event_process_failed(logger, writer, err)
        return True
    _write_in_process(logger, tagged, step)
    return True


def _event_process(logger: Any) -> ScalarEventProcess | None:
    if logger not in _EVENT_PROCESSES:
        writer = None
        log_dir = str(logger.log_dir)
        if "://" not in log_dir:  # remote file systems: the logger's own (fsspec) writer
            try:
                writer = ScalarEventProcess(log_dir)
            except OSError as err:
                rank_zero_warn(f"TensorBoard writer process not started ({err}); scalars are written in-process.")
        _EVENT_PROCESSES[logger] = writer
    return _EVENT_PROCESSES[logger]


def _event_process_failed(logger: Any, writer: ScalarEventProcess, err: OSError) -> None:
    """Write what the child did not take in-process, and keep writing there."""
    rank_zero_warn(f"{err}; monitor scalars are written in-process from here on.")
    _EVENT_PROCESSES[logger] = None
    writer.abandon()
    for step, _, tagged in writer.unsent:
        _write_in_process(logger, tagged, step)
    writer.unsent = []


def _close_event_processes(trainer: Trainer) -> None:
    """End the trainer's writer processes: their events are on disk when this returns."""
    for logger in _tensorboard_loggers(trainer):
        writer = _EVENT_PROCESSES.pop(logger, None)
        if writer is not None:
            try:
                writer.close()
            except OSError as err:
                _event_process_failed(logger, writer, err)


def _write_in_process(logger: Any, tagged: dict[str, float], step: int) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = [Summary.Value(tag=tag, simple_value=value) for tag, value in tagged.items()]
    logger.experiment._get_file_writer().add_summary(Summary(value=values), step)


# ---------------------------------------------------------------------------------------------
# Clocks and step windows


def _synchronize(device: torch.device) -> None:
    backend = getattr(torch, device.type, None)
    if backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


class _Clock:
    """Time marks: CUDA events (read later) or the synchronized host clock.

    Events are recorded on the stream that was current for ``device`` when the clock was made (the
    stream Lightning trains on), and read events are recycled (``recycle``): a mark is then one
    ``cudaEventRecord`` and little Python."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        self._stream = torch.cuda.current_stream(device) if self.on_cuda else None
        self._free: list = []

    def mark(self) -> Any:
        if self.on_cuda:
            event = self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)
            event.record(self._stream)
            return event
        _synchronize(self.device)
        return time.perf_counter()

    def recycle(self, marks: Iterable[Any]) -> None:
        """Reuse completed, already read events for later marks."""
        if self.on_cuda:
            self._free.extend(m for m in marks if m is not None)

    def ready(self, mark: Any) -> bool:
        return not self.on_cuda or mark.query()

    def wait(self, mark: Any) -> None:
        if self.on_cuda:
            mark.synchronize()

    @staticmethod
    def ms(start: Any, end: Any) -> float:
        if isinstance(start, float):
            return (end - start) * 1e3
        return start.elapsed_time(end)


class _StepCallback(Callback):
    """Tracks optimizer-step windows over micro-batches and reads deferred timings in order.

    A window opens at the first ``on_train_batch_start`` after the previous optimizer step and closes
    at the ``on_train_batch_end`` where ``trainer.global_step`` has moved (the optimizer stepped), so
    gradient accumulation gives one window per optimizer step.
    """

    def __init__(self) -> None:
        self._step: int | None = None
        self._pending: deque = deque()
        self._clock: _Clock | None = None
        self._run_info_due = True

    def _open(self, trainer: Trainer) -> bool:
        """True on the first micro-batch of an optimizer step."""
        if self._step is None:
            self._step = trainer.global_step
            return True
        return False

    def _close(self, trainer: Trainer) -> int | None:
        """The finished step's index when this batch ran the optimizer, else ``None``."""
        if self._step is None or trainer.global_step == self._step:
            return None
        step, self._step = self._step, None
        return step

    def _queue(self, trainer: Trainer, record: Any) -> None:
        """Keep a finished step's record to be read in a later ``on_after_backward``; past
        ``_MAX_PENDING`` unread records, read now (waiting for the oldest)."""
        self._pending.append(record)
        if len(self._pending) > _MAX_PENDING:
            self._read_pending(trainer)

    def _read_pending(self, trainer: Trainer, wait: bool = False) -> None:
        """Log every pending record whose last mark has completed (all of them when ``wait``)."""
        while self._pending:
            record = self._pending[0]
            if wait or len(self._pending) > _MAX_PENDING:
                self._wait(record)
            elif not self._ready(record):
                return
            self._pending.popleft()
            _step_scalars(trainer).add(trainer, self._measure(record), record.step, reporter=self)

    def _ready(self, record: Any) -> bool:
        return self._clock.ready(record.end)

    def _wait(self, record: Any) -> None:
        self._clock.wait(record.end)

    def _measure(self, record: Any) -> dict[str, float]:
        raise NotImplementedError

    def _reports(self) -> bool:
        """Whether this monitor logs a value for every step (it then joins the step merging)."""
        return True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step = None
        self._pending.clear()
        self._run_info_due = True
        _log_layout_once(trainer)
        if self._reports():
            _step_scalars(trainer).join(self)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Read and log finished steps here, ``_READ_EVERY`` at a time, while the device runs this
        backward: the host work then overlaps device work, which it would not right after an
        optimizer step that syncs (a GradScaler without fused optimizer, a logged ``loss.item()``)."""
        if len(self._pending) >= _READ_EVERY:
            self._read_pending(trainer)
        self._log_run_info(trainer, pl_module)  # after the first forward: a lazy ``auto`` shows its choice

    def _log_run_info(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._run_info_due:
            self._run_info_due = False
            _log_run_info_once(trainer, pl_module)

    def _end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Train end (rank zero): read what is left and tell the step merging this monitor is done."""
        self._read_pending(trainer, wait=True)
        self._log_run_info(trainer, pl_module)
        if self._reports():
            _step_scalars(trainer).end(trainer, self)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _flush_step_scalars(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # what was measured before the failure still reaches the logs
        try:
            self._read_pending(trainer, wait=True)
        except RuntimeError:  # the device may be what failed: keep what was read
            pass
        _flush_step_scalars(trainer)


# ---------------------------------------------------------------------------------------------
# PeakMemoryMonitor


@dataclass
class _MemoryStep:
    step: int
    allocated: int  # peak bytes
    reserved: int  # peak bytes
    retries: int  # so far
    ooms: int  # so far


def _alloc_events(stats: dict) -> tuple[int, int]:
    """(allocation retries, OOMs) so far, from ``torch.cuda.memory_stats_as_nested_dict``."""
    return stats.get("num_alloc_retries", 0), stats.get("num_ooms", 0)


class PeakMemoryMonitor(_StepCallback):
    """Per-step peak CUDA memory, allocator retries and OOMs of rank zero's device (``memory/*``).

    Peak statistics are reset at the start of each optimizer step (first micro-batch), so each value
    is that step's peak. ``memory/alloc_retries`` and ``memory/ooms`` count the events during the
    step. Without CUDA nothing is logged and one warning says why.

    Args:
        snapshot_steps: ``(start, stop)``: record the allocator history from step ``start`` up to,
            not including, step ``stop`` and dump it as a pickle for https://pytorch.org/memory_viz.
        snapshot_dir: where the snapshot goes; default ``trainer.log_dir`` (the logger's version dir).
        snapshot_max_entries: allocation events kept by ``_record_memory_history``.
    """

    def __init__(
        self,
        snapshot_steps: tuple[int, int] | None = None,
        snapshot_dir: str | None = None,
        snapshot_max_entries: int = 100_000,
    ) -> None:
        super().__init__()
        self.snapshot_steps = snapshot_steps
        self.snapshot_dir = snapshot_dir
        self.snapshot_max_entries = snapshot_max_entries
        self._enabled = False
        self._warned = False
        self._base: tuple[int, int] = (0, 0)
        self._recording = False
        self._snapshot_done = False
        self.snapshot_path: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.snapshot_steps is not None:
            start, stop = self.snapshot_steps
            if not (0 <= int(start) < int(stop)):
                raise ValueError(
                    f"snapshot_steps must be (start, stop) with 0 <= start < stop, got {self.snapshot_steps}"
                )
        if self.snapshot_max_entries <= 0:
            raise ValueError(f"snapshot_max_entries must be positive, got {self.snapshot_max_entries}")
        self._device = trainer.strategy.root_device
        self._enabled = self._device.type == "cuda"
        if self._enabled:  # an int index: torch.cuda's memory functions parse a torch.device each call
            self._index = self._device.index if self._device.index is not None else torch.cuda.current_device()
            self._base = _alloc_events(torch.cuda.memory_stats_as_nested_dict(self._index))
        if not self._enabled and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"PeakMemoryMonitor: the root device is {self._device.type!r}, not CUDA; memory/* tags are not "
                "logged (they come from torch.cuda's caching-allocator statistics)."
            )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._open(trainer):
            self._update(trainer, step=None)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._close(trainer)
        if step is not None:
            self._update(trainer, step=step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._recording:
            self._dump_snapshot(trainer)
        if trainer.is_global_zero:
            self._end(trainer, pl_module)

    def _reports(self) -> bool:
        return self._enabled

    def _update(self, trainer: Trainer, step: int | None) -> None:
        """At a step's start (``step is None``) reset peaks; at its end keep the step's statistics."""
        if not (self._enabled and trainer.is_global_zero):
            return
        if step is None:
            torch.cuda.reset_peak_memory_stats(self._index)
            self._maybe_start_snapshot(trainer.global_step)
            return
        # One read per step, unflattened (``memory_stats`` flattens ~150 keys in Python).
        stats = torch.cuda.memory_stats_as_nested_dict(self._index)
        retries, ooms = _alloc_events(stats)
        self._queue(
            trainer,
            _MemoryStep(
                step, stats["allocated_bytes"]["all"]["peak"], stats["reserved_bytes"]["all"]["peak"], retries, ooms
            ),
        )
        if self._recording and step >= self.snapshot_steps[1] - 1:
            self._dump_snapshot(trainer)

    def _ready(self, record: _MemoryStep) -> bool:
        return True  # host bookkeeping, read when the step ended

    def _wait(self, record: _MemoryStep) -> None:
        pass

    def _measure(self, record: _MemoryStep) -> dict[str, float]:
        metrics = {
            "memory/peak_allocated_mib": record.allocated / _MIB,
            "memory/peak_reserved_mib": record.reserved / _MIB,
            "memory/alloc_retries": float(record.retries - self._base[0]),
            "memory/ooms": float(record.ooms - self._base[1]),
        }
        self._base = (record.retries, record.ooms)
        return metrics

    def _maybe_start_snapshot(self, step: int) -> None:
        if self.snapshot_steps is None or self._recording or self._snapshot_done:
            return
        start, stop = self.snapshot_steps
        if start <= step < stop:
            torch.cuda.memory._record_memory_history(max_entries=self.snapshot_max_entries)
            self._recording = True
            self._snapshot_from = step

    def _dump_snapshot(self, trainer: Trainer) -> None:
        directory = self.snapshot_dir or trainer.log_dir or trainer.default_root_dir
        os.makedirs(directory, exist_ok=True)
        last = trainer.global_step - 1
        path = os.path.join(directory, f"memory_snapshot_steps{self._snapshot_from}-{last}.pickle")
        torch.cuda.memory._dump_snapshot(path)
        torch.cuda.memory._record_memory_history(enabled=None)
        self._recording = False
        self._snapshot_done = True
        self.snapshot_path = path
        rank_zero_info(f"PeakMemoryMonitor: memory snapshot of steps {self._snapshot_from}-{last} -> {path}")


# ---------------------------------------------------------------------------------------------
# KernelTimer


@dataclass
class _TimedStep:
    step: int
    micro: list = field(default_factory=list)  # per micro-batch: [start, [[bwd_start, bwd_end], ...]]
    end: Any = None


class KernelTimer(_StepCallback):
    """Per-step device time of forward, backward and optimizer (``time/*``), plus a periodic profile.

    Marks: forward = batch start -> ``on_before_backward``; backward = ``on_before_backward`` ->
    ``on_after_backward`` (both summed over the micro-batches of an accumulated step); optimizer =
    the last ``on_after_backward`` -> batch end (GradScaler's unscaling, gradient clipping and the
    step; Lightning zeroes gradients before each backward); step = first micro-batch start -> batch
    end: four marks per step without accumulation. On CUDA the marks are CUDA events read later
    (no per-step host sync; see the module docstring); elsewhere a synchronized
    ``time.perf_counter``. Made for automatic optimization; under manual optimization the phases are
    whatever falls between the hooks.

    Every ``profile_every_n_steps`` steps (steps ``n-1, 2n-1, ...``, after warm-up) one whole step
    runs under ``torch.profiler``; ``time/attention_share`` is the share of kernel time in kernels
    whose name matches ``attention_pattern``, and the top kernels go to TensorBoard as text
    (``time/top_kernels``). On CPU there are no kernels: the share is over ops' self CPU time (the
    SDPA CPU op matches the pattern), which keeps the tag meaningful and testable there. The profiled
    step is slower (the profiler syncs and adds overhead); its ``time/*`` values include that.

    Args:
        profile_every_n_steps: profile one step every this many; 0 disables profiling.
        attention_pattern: regex (case-insensitive ``search``) naming attention kernels.
        top_k: rows in the top-kernels table.
    """

    def __init__(
        self,
        profile_every_n_steps: int = 500,
        attention_pattern: str = ATTENTION_KERNEL_PATTERN,
        top_k: int = 10,
    ) -> None:
        super().__init__()
        self.profile_every_n_steps = profile_every_n_steps
        self.attention_pattern = attention_pattern
        self.top_k = top_k
        self._current: _TimedStep | None = None
        self._profiler: Any = None
        self._profile_warned = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(self.profile_every_n_steps, int) or self.profile_every_n_steps < 0:
            raise ValueError(f"profile_every_n_steps must be an int >= 0, got {self.profile_every_n_steps!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        try:
            re.compile(self.attention_pattern)
        except re.error as err:
            raise ValueError(f"attention_pattern is not a valid regex: {err}") from err
        self._clock = _Clock(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._mark(trainer, "batch_start", first=self._open(trainer))

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        self._mark(trainer, "before_backward")

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mark(trainer, "after_backward")
        super().on_after_backward(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._mark(trainer, "batch_end", step=self._close(trainer))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None
        if trainer.is_global_zero:
            self._end(trainer, pl_module)

    def _mark(self, trainer: Trainer, event: str, first: bool = False, step: int | None = None) -> None:
        """Record one time mark; at a step's end, queue the step and log what has completed."""
        if not trainer.is_global_zero:
            return
        if event == "batch_start":
            if first:
                self._maybe_start_profiler(trainer.global_step)
                self._current = _TimedStep(step=trainer.global_step)
            if self._current is not None:
                self._current.micro.append([self._clock.mark(), []])
            return
        current = self._current
        if current is None or not current.micro:
            return
        if event == "before_backward":
            current.micro[-1][1].append([self._clock.mark(), None])
        elif event == "after_backward" and current.micro[-1][1]:
            current.micro[-1][1][-1][1] = self._clock.mark()
        elif event == "batch_end" and step is not None:
            current.end = self._clock.mark()
            self._current = None
            if self._profiler is not None:
                self._finish_profile(trainer, step)
            self._queue(trainer, current)

    def _measure(self, record: _TimedStep) -> dict[str, float]:
        ms = self._clock.ms
        forward = backward = 0.0
        for start, pairs in record.micro:
            if pairs:
                forward += ms(start, pairs[0][0])
            backward += sum(ms(b, a) for b, a in pairs if a is not None)
        metrics = {"time/forward_ms": forward, "time/backward_ms": backward}
        last_pairs = record.micro[-1][1]
        if last_pairs and last_pairs[-1][1] is not None:
            metrics["time/optimizer_ms"] = ms(last_pairs[-1][1], record.end)
        metrics["time/step_ms"] = ms(record.micro[0][0], record.end)
        self._clock.recycle(
            [record.end] + [m for start, pairs in record.micro for m in (start, *(x for pair in pairs for x in pair))]
        )
        return metrics

    def _maybe_start_profiler(self, step: int) -> None:
        n = self.profile_every_n_steps
        if n <= 0 or (step + 1) % n != 0:
            return
        # On a GPU only device kernels are collected: CPU-op events would multiply the cost of
        # processing the window, and the attention share is a share of GPU time.
        kinds = torch.profiler.ProfilerActivity
        activities = [kinds.CUDA if self._clock.on_cuda else kinds.CPU]
        profiler = torch.profiler.profile(activities=activities)
        try:
            profiler.start()
        except RuntimeError as err:  # another profiler is active
            if not self._profile_warned:
                self._profile_warned = True
                rank_zero_warn(f"KernelTimer: could not start torch.profiler ({err}); skipping profiled steps.")
            return
        self._profiler = profiler

    def _finish_profile(self, trainer: Trainer, step: int) -> None:
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        kernels = _profiled_times(profiler, on_device=self._clock.on_cuda)
        share = attention_share(kernels, self.attention_pattern)
        if share is not None:
            _step_scalars(trainer).add(trainer, {"time/attention_share": share}, step)
        text = top_kernels_table(kernels, self.top_k, self.attention_pattern)
        for logger in _tensorboard_loggers(trainer):
            logger.experiment.add_text("time/top_kernels", text, global_step=step)


def _profiled_times(profiler: Any, on_device: bool) -> list[tuple[str, float]]:
    """``(name, µs)`` of device kernels (GPU) or of CPU ops' self time (CPU) from a stopped profiler."""
    from torch.autograd import DeviceType

    out = []
    for evt in profiler.events():
        if evt.is_async:
            continue
        if on_device and evt.device_type != DeviceType.CPU:
            out.append((evt.name, float(evt.device_time_total)))
        elif not on_device and evt.device_type == DeviceType.CPU:
            out.append((evt.name, float(evt.self_cpu_time_total)))
    return out


# ---------------------------------------------------------------------------------------------
# ThroughputMonitor


@dataclass
class _CountedStep:
    step: int
    start: Any
    end: Any
    tokens: int
    real_tokens: int
    flops: int | None


class ThroughputMonitor(_StepCallback):
    """Per-step tokens/s, real tokens/s, padding efficiency, TFLOP/s and MFU (``throughput/*``).

    Counts come from ``batch["stats"]`` (host ints ``tokens``, ``real_tokens``) and
    ``pl_module.flops_per_batch(batch)`` (forward+backward FLOPs), summed over a step's
    micro-batches. A step's time runs from the previous optimizer step's end (or, after training
    or validation starts, this step's first micro-batch) to this step's end, so data-loading stalls
    count. Rates are averaged over the last ``window`` steps (Σ counts / Σ seconds);
    ``padding_efficiency`` is this step's real / total tokens. MFU = achieved FLOP/s / peak, with the
    peak from ``peak_flops``, else the dense table for the device and precision (H100/H200 SXM
    bf16/fp16: 989.4e12), else Lightning's ``get_available_flops``; no peak (e.g. CPU) -> no MFU tag.
    All figures are rank zero's device.

    Args:
        window: steps in the moving average of the rates.
        peak_flops: peak FLOP/s of one device, overriding the lookup.
    """

    def __init__(self, window: int = 20, peak_flops: float | None = None) -> None:
        super().__init__()
        self.window = window
        self.peak_flops = peak_flops
        self._peak_flops: float | None = None
        self._anchor: Any = None
        self._counts = [0, 0, 0]
        self._has_flops = True
        self._warned_stats = False
        self._history: deque = deque()
        self._sums = [0.0, 0, 0, 0]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ValueError(f"peak_flops must be positive, got {self.peak_flops}")
        device = trainer.strategy.root_device
        self._clock = _Clock(device)
        self._peak_flops = resolve_peak_flops(device, trainer.precision, self.peak_flops)
        self._has_flops = callable(getattr(pl_module, "flops_per_batch", None))
        if not self._has_flops:
            rank_zero_warn(
                f"ThroughputMonitor: {type(pl_module).__name__} has no flops_per_batch(batch); "
                "throughput/tflops and throughput/mfu are not logged."
            )
        self._history = deque(maxlen=self.window)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._anchor = None
        self._counts = [0, 0, 0]
        self._history.clear()
        self._sums = [0.0, 0, 0, 0]  # seconds, tokens, real tokens, FLOPs in the window

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._anchor = None  # validation time is not training time

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._step is not None and trainer.is_global_zero:  # validation inside an accumulation window
            self._anchor = self._clock.mark()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._open(trainer):
            self._update(trainer, pl_module, batch, phase="start")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._update(trainer, pl_module, batch, phase="end", step=self._close(trainer))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self._end(trainer, pl_module)

    def _update(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, phase: str, step: int | None = None
    ) -> None:
        """Anchor the clock at a step's start; count each micro-batch; queue the step at its end."""
        if not trainer.is_global_zero:
            return
        if phase == "start":
            if self._anchor is None:
                self._anchor = self._clock.mark()
            return
        tokens, real = self._batch_tokens(batch)
        self._counts[0] += tokens
        self._counts[1] += real
        if self._has_flops:
            self._counts[2] += int(pl_module.flops_per_batch(batch))
        if step is None or self._anchor is None:
            return
        end = self._clock.mark()
        tokens, real, flops = self._counts
        record = _CountedStep(step, self._anchor, end, tokens, real, flops if self._has_flops else None)
        self._anchor = end
        self._counts = [0, 0, 0]
        self._queue(trainer, record)

    def _batch_tokens(self, batch: Any) -> tuple[int, int]:
        stats = batch.get("stats") if isinstance(batch, dict) else None
        if stats is not None:
            return int(stats["tokens"]), int(stats["real_tokens"])
        if not self._warned_stats:
            self._warned_stats = True
            rank_zero_warn("ThroughputMonitor: batch has no 'stats'; counting input_ids.numel() as real tokens.")
        n = int(batch["input_ids"].numel())
        return n, n

    def _measure(self, record: _CountedStep) -> dict[str, float]:
        seconds = self._clock.ms(record.start, record.end) / 1e3
        self._clock.recycle([record.start])  # the previous step's end; this step's end anchors the next
        entry = (seconds, record.tokens, record.real_tokens, record.flops or 0)
        if len(self._history) == self.window:  # the oldest leaves the window
            self._sums = [a - b for a, b in zip(self._sums, self._history[0], strict=True)]
        self._history.append(entry)
        self._sums = [a + b for a, b in zip(self._sums, entry, strict=True)]
        total_s, tokens, real, flops = self._sums
        metrics = {}
        if record.tokens > 0:
            metrics["throughput/padding_efficiency"] = record.real_tokens / record.tokens
        if total_s <= 0:
            return metrics
        metrics["throughput/tokens_per_s"] = tokens / total_s
        metrics["throughput/real_tokens_per_s"] = real / total_s
        if record.flops is not None:
            flops_per_s = flops / total_s
            metrics["throughput/tflops"] = flops_per_s / 1e12
            if self._peak_flops:
                metrics["throughput/mfu"] = flops_per_s / self._peak_flops
        return metrics
