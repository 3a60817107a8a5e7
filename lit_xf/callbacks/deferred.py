"""What the monitors share: a device clock read without waiting, and optimizer-step windows whose
records are read once the device has finished them.

``DeviceClock`` marks are CUDA events recorded on the training stream (elsewhere: the host clock
after the device's ``synchronize``, a no-op on CPU). ``StepMonitor`` turns micro-batch hooks into one
record per optimizer step and keeps finished steps' records until their last mark has completed
(``query()``): they are read in ``on_after_backward``, ``_READ_EVERY`` steps at a time, while the
device runs that backward; past ``_MAX_PENDING`` unread steps the oldest is waited for, and train
end waits for the rest. A step's values are then logged by that monitor alone, for that step's
index, through every logger of the trainer (``logger.log_metrics(metrics, step=step)``, rank zero).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_xf.callbacks.run_info import add_custom_scalars_layout, log_run_info, tensorboard_loggers

__all__ = ["DeviceClock", "StepMonitor"]

_READ_EVERY = 8  # finished steps read together (one warm loop instead of scattered per-step work)
_MAX_PENDING = 32  # unread steps before the oldest is waited for


def _synchronize(device: torch.device) -> None:
    backend = getattr(torch, device.type, None)
    if backend is not None and hasattr(backend, "synchronize"):
        backend.synchronize()


class DeviceClock:
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
        """Whether ``mark`` has completed; never waits."""
        return not self.on_cuda or mark.query()

    def wait(self, mark: Any) -> None:
        if self.on_cuda:
            mark.synchronize()

    @staticmethod
    def ms(start: Any, end: Any) -> float:
        if isinstance(start, float):
            return (end - start) * 1e3
        return start.elapsed_time(end)


class StepMonitor(Callback):
    """Base of the monitors: one record per optimizer step, read later, logged by this monitor.

    A step's window opens at the first ``on_train_batch_start`` after the previous optimizer step and
    closes at the ``on_train_batch_end`` where ``trainer.global_step`` has moved (the optimizer
    stepped), so gradient accumulation gives one window per optimizer step; its index is
    ``trainer.global_step`` at the window's start, the index Lightning's ``self.log`` uses for the
    same step. Subclasses ``_queue`` a record with an ``end`` mark (and a ``step``) when a window
    closes and turn it into ``{tag: value}`` in ``_measure``.

    The first monitor in ``trainer.callbacks`` also writes the run-level TensorBoard text: the
    Custom Scalars layout at fit start and ``run/info`` after the first training backward (so a
    lazily resolved ``auto`` kernel shows its real choice), with every monitor's ``run_facts()``.
    """

    def __init__(self) -> None:
        self._step: int | None = None
        self._pending: deque = deque()
        self._clock: DeviceClock | None = None
        self._run_info_due = False

    def run_facts(self) -> dict[str, str]:
        """Rows this monitor adds to ``run/info`` (known after ``setup``)."""
        return {}

    # -- step windows

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

    # -- deferred reading

    def _queue(self, trainer: Trainer, record: Any) -> None:
        """Keep a finished step's record to be read in a later ``on_after_backward``; past
        ``_MAX_PENDING`` unread records, read now (waiting for the oldest)."""
        self._pending.append(record)
        if len(self._pending) > _MAX_PENDING:
            self._read_pending(trainer)

    def _read_pending(self, trainer: Trainer, wait: bool = False) -> None:
        """Log every pending record whose last mark has completed, in order (all of them when ``wait``)."""
        while self._pending:
            record = self._pending[0]
            if wait or len(self._pending) > _MAX_PENDING:
                self._wait(record)
            elif not self._ready(record):
                return
            self._pending.popleft()
            self._log(trainer, self._measure(record), record.step)

    def _ready(self, record: Any) -> bool:
        return self._clock.ready(record.end)

    def _wait(self, record: Any) -> None:
        self._clock.wait(record.end)

    def _measure(self, record: Any) -> dict[str, float]:
        raise NotImplementedError

    @staticmethod
    def _log(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
        """One step's values of this monitor: one ``log_metrics`` call per logger, rank zero only.

        ``pl_module.log`` is not used: from a callback it writes only every ``log_every_n_steps``
        and syncs across ranks with ``sync_dist``; this gives one point per step and tag and never
        communicates."""
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # -- run-level text

    def _leads(self, trainer: Trainer) -> bool:
        """Whether this is the first monitor of ``trainer``: the one that writes run-level text."""
        return next((cb for cb in trainer.callbacks if isinstance(cb, StepMonitor)), None) is self

    def _log_run_info(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._run_info_due:
            self._run_info_due = False
            facts = {k: v for cb in trainer.callbacks if isinstance(cb, StepMonitor) for k, v in cb.run_facts().items()}
            log_run_info(trainer, pl_module, facts)

    # -- hooks

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._step = None
        self._pending.clear()
        self._run_info_due = trainer.is_global_zero and self._leads(trainer)
        if self._run_info_due:
            for logger in tensorboard_loggers(trainer):
                add_custom_scalars_layout(logger)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Read and log finished steps here, ``_READ_EVERY`` at a time, while the device runs this
        backward: the host work then overlaps device work, which it would not right after an
        optimizer step that syncs (a GradScaler without fused optimizer, a logged ``loss.item()``)."""
        if len(self._pending) >= _READ_EVERY:
            self._read_pending(trainer)
        self._log_run_info(trainer, pl_module)

    def _end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Train end (rank zero): log what is left."""
        self._read_pending(trainer, wait=True)
        self._log_run_info(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # what was measured before the failure still reaches the logs
        try:
            self._read_pending(trainer, wait=True)
        except RuntimeError:  # the device may be what failed: keep what was read
            pass
