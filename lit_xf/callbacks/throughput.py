"""``ThroughputMonitor``: per-step tokens/s, real tokens/s, padding efficiency, TFLOP/s and MFU
(``throughput/*``)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lit_xf.callbacks.deferred import DeviceClock, StepMonitor
from lit_xf.hardware import resolve_peak_flops

__all__ = ["THROUGHPUT_TAGS", "ThroughputMonitor"]

#: Scalar tags of ``ThroughputMonitor``, one value per optimizer step.
THROUGHPUT_TAGS = (
    "throughput/tokens_per_s",  # tokens (B*T, pads included) per second, windowed
    "throughput/real_tokens_per_s",  # non-pad tokens per second, windowed
    "throughput/padding_efficiency",  # real_tokens / tokens of this step's batches
    "throughput/tflops",  # achieved TFLOP/s from ``flops_per_batch``, windowed
    "throughput/mfu",  # achieved FLOP/s / dense peak FLOP/s (when a peak is known)
)


@dataclass
class _CountedStep:
    step: int
    start: Any
    end: Any
    tokens: int
    real_tokens: int
    flops: int | None


class ThroughputMonitor(StepMonitor):
    """Per-step tokens/s, real tokens/s, padding efficiency, TFLOP/s and MFU (``throughput/*``).

    Counts come from ``batch["stats"]`` (host ints ``tokens``, ``real_tokens``) and
    ``pl_module.flops_per_batch(batch)`` (forward+backward FLOPs; lit_xf's count sees each
    document's attention pairs, which a FLOP counter of the dense graph cannot), summed over a
    step's micro-batches. A step's time runs from the previous optimizer step's end (or, after
    training or validation starts, this step's first micro-batch) to this step's end, so
    data-loading stalls count. Rates over the last ``window`` steps w: Σ_w counts / Σ_w seconds
    (from the first step on, over the steps so far); ``padding_efficiency`` is this step's real /
    total tokens. MFU = achieved FLOP/s / peak, with the peak from ``peak_flops``, else
    ``lit_xf.hardware.resolve_peak_flops`` (H100/H200 SXM bf16/fp16: 989.4e12); no peak (e.g. CPU)
    -> no MFU tag. All figures are rank zero's device (multiply rates by the world size for the
    job's total).

    Lightning's ``Throughput`` window is not used: it reports nothing until its window is full, has
    one count per batch ("items") where this logs two, and raises on a step whose count is below
    its batch count (a step of pads only).

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
        self._clock = DeviceClock(device)
        self._peak_flops = resolve_peak_flops(device, trainer.precision, self.peak_flops)
        self._has_flops = callable(getattr(pl_module, "flops_per_batch", None))
        if not self._has_flops:
            rank_zero_warn(
                f"ThroughputMonitor: {type(pl_module).__name__} has no flops_per_batch(batch); "
                "throughput/tflops and throughput/mfu are not logged."
            )
        self._history = deque(maxlen=self.window)

    def run_facts(self) -> dict[str, str]:
        if self._peak_flops is None:
            on = f" for {self._clock.device.type}" if self._clock is not None else ""
            return {
                "throughput/mfu": f"not logged: no peak FLOP/s known{on} (ThroughputMonitor(peak_flops=...) sets one)"
            }
        return {"peak FLOP/s (MFU denominator)": f"{self._peak_flops:.4g}"}

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
        if len(self._history) == self.window:  # the oldest leaves the window: running sums
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
