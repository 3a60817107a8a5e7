"""``KernelTimer``: per-step device time of forward, backward and optimizer (``time/*``), and a
periodic ``torch.profiler`` window giving the attention kernels' share and the top kernels."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lit_xf.callbacks.deferred import DeviceClock, StepMonitor
from lit_xf.callbacks.run_info import tensorboard_loggers

__all__ = [
    "ATTENTION_KERNEL_PATTERN",
    "TIME_TAGS",
    "TOP_KERNELS_TAG",
    "KernelTimer",
    "attention_share",
    "top_kernels_table",
]

#: Scalar tags of ``KernelTimer``, one value per optimizer step (``time/attention_share``: profiled steps only).
TIME_TAGS = (
    "time/forward_ms",  # batch start -> before backward, summed over micro-batches
    "time/backward_ms",  # before -> after backward, summed over micro-batches
    "time/optimizer_ms",  # last after-backward -> batch end (unscale, clipping, step)
    "time/step_ms",  # first micro-batch start -> batch end of the optimizer step
    "time/attention_share",  # attention kernels' share of profiled time
)
#: Text tag of the top kernels of each profiled step (TensorBoard only).
TOP_KERNELS_TAG = "time/top_kernels"
_KINETO_LOG_LEVEL = "KINETO_LOG_LEVEL"

#: Kernel (or, on CPU, op) names counted as attention: xformers/PyTorch memory-efficient
#: (``fmha_cutlassF/B``), FlashAttention 2/3/4 (``flash_*``), cuDNN SDPA (``*sdpa*``/``*fmha*``),
#: FlexAttention (``*flex*``) and anything naming attention (``efficient_attention``, ...).
#: GEMMs (``cutlass_80_...``, ``sm90_xmma...``) and softmax are not matched, so a naive
#: (matmul + softmax) attention counts as ~0.
ATTENTION_KERNEL_PATTERN = r"fmha|flash|attention|attn|cutlass[FB]|sdpa|flex"


def attention_share(kernels: Iterable[tuple[str, float]], pattern: str = ATTENTION_KERNEL_PATTERN) -> float | None:
    """Share of time spent in kernels whose name matches ``pattern`` (case-insensitive search).

    share = Σ time of matching names / Σ time; ``kernels`` are ``(name, time)`` pairs in any one
    unit; ``None`` when the total time is zero.
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


@dataclass
class _TimedStep:
    step: int
    micro: list = field(default_factory=list)  # per micro-batch: [start, [[bwd_start, bwd_end], ...]]
    end: Any = None


class KernelTimer(StepMonitor):
    """Per-step device time of forward, backward and optimizer (``time/*``), plus a periodic profile.

    Marks: forward = batch start -> ``on_before_backward``; backward = ``on_before_backward`` ->
    ``on_after_backward`` (both summed over the micro-batches of an accumulated step); optimizer =
    the last ``on_after_backward`` -> batch end (GradScaler's unscaling, gradient clipping and the
    step; Lightning zeroes gradients before each backward); step = first micro-batch start -> batch
    end: four marks per step without accumulation. On CUDA the marks are CUDA events read later
    (no per-step host sync; see ``lit_xf.callbacks.deferred``); elsewhere a synchronized
    ``time.perf_counter``. Made for automatic optimization; under manual optimization the phases are
    whatever falls between the hooks.

    Every ``profile_every_n_steps`` steps (steps ``n-1, 2n-1, ...``, after warm-up) one whole step
    runs under ``torch.profiler``; ``time/attention_share`` is the share of kernel time in kernels
    whose name matches ``attention_pattern``, and the top kernels go to TensorBoard as text
    (``time/top_kernels``). On CPU there are no kernels: the share is over ops' self CPU time (the
    SDPA CPU op matches the pattern), which keeps the tag meaningful and testable there. The profiled
    step is slower (the profiler syncs when it stops, and adds overhead); its ``time/*`` values
    include that. On CPU, the profiler's library (kineto) prints ``USDT: ... profiler_start`` and
    ``... profiler_stop`` for each profiled step; ``setup`` silences them by setting
    ``KINETO_LOG_LEVEL=6`` unless it is set (read when kineto first profiles). That level hides
    kineto's errors too (USDT ranks above ERROR), so on CUDA, where they report CUPTI problems, it
    is left alone.

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
        self._clock = DeviceClock(trainer.strategy.root_device)
        if self.profile_every_n_steps and not self._clock.on_cuda:
            os.environ.setdefault(_KINETO_LOG_LEVEL, "6")  # quiet: see the class docstring

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
        """Record one time mark; at a step's end, queue the step (and finish a profiled step)."""
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
        """Stop the profiler (a sync) and log the step's attention share and top kernels now."""
        profiler, self._profiler = self._profiler, None
        profiler.stop()
        kernels = _profiled_times(profiler, on_device=self._clock.on_cuda)
        share = attention_share(kernels, self.attention_pattern)
        if share is not None:
            self._log(trainer, {"time/attention_share": share}, step)
        text = top_kernels_table(kernels, self.top_k, self.attention_pattern)
        for logger in tensorboard_loggers(trainer):
            logger.experiment.add_text(TOP_KERNELS_TAG, text, global_step=step)
