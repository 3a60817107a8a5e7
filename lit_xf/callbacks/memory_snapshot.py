"""``MemorySnapshot``: the CUDA allocator's history for chosen steps, and on an out-of-memory error.

Files, in the run directory (``trainer.log_dir``, else ``default_root_dir``, or ``dirpath``):

- ``memory_snapshot_<what>.pickle``: ``torch.cuda.memory._dump_snapshot``'s pickle (open it at
  https://pytorch.org/memory_viz, or with ``python -m torch.cuda._memory_viz trace_plot``);
- ``memory_timeline_<what>.html``: a self-contained page (``lit_xf.memory_timeline``): allocated
  bytes over the events, the live allocations at the peak with their Python frames; no network;
- ``memory_viz_<what>.html``: PyTorch's interactive viewer with the snapshot embedded
  (``torch.cuda._memory_viz.trace_plot``; it loads its script from a CDN when opened).

``<what>`` is ``steps<a>-<b>`` or ``oom_step<n>``. The paths are logged and written to
TensorBoard's text tab (``memory/snapshot``).

On OOM: with ``on_oom`` the history is recorded from the start of fit, so that the snapshot shows
how the memory filled; torch's OOM observer dumps the pickle inside the failing allocation (before
anything is freed) and ``on_exception`` writes the pages before the error propagates. Recording
costs per allocation; ``stacks`` chooses what each event keeps: ``"none"`` (sizes and addresses
only: cheapest), ``"python"`` (the Python stack: where a tensor was made), ``"all"`` (also C++
frames: the slowest). Off (not in ``trainer.callbacks``) it costs nothing. CUDA only: elsewhere it
warns once and does nothing.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from lit_xf.callbacks.run_info import tensorboard_loggers
from lit_xf.memory_timeline import timeline_html

__all__ = ["SNAPSHOT_TAG", "MemorySnapshot", "write_snapshot_files"]

log = logging.getLogger(__name__)

SNAPSHOT_TAG = "memory/snapshot"
Stacks = Literal["none", "python", "all"]
_STACKS = ("none", "python", "all")


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_snapshot_files(snapshot: dict, directory: str, what: str, pickle_path: str | None = None) -> dict[str, str]:
    """Write the pickle (unless ``pickle_path`` already holds it) and both pages; returns
    ``{"pickle", "timeline", "viz"}`` paths. Each file appears whole or not at all."""
    os.makedirs(directory, exist_ok=True)
    paths = {
        "pickle": pickle_path or os.path.join(directory, f"memory_snapshot_{what}.pickle"),
        "timeline": os.path.join(directory, f"memory_timeline_{what}.html"),
        "viz": os.path.join(directory, f"memory_viz_{what}.html"),
    }
    if pickle_path is None:
        _atomic_write(paths["pickle"], pickle.dumps(snapshot))
    _atomic_write(paths["timeline"], timeline_html(snapshot, title=f"CUDA memory, {what}").encode())
    from torch.cuda._memory_viz import trace_plot

    _atomic_write(paths["viz"], trace_plot(snapshot).encode())
    return paths


class MemorySnapshot(Callback):
    """Record the CUDA allocator's history (``torch.cuda.memory._record_memory_history``) for
    ``steps`` and/or the whole fit (``on_oom``) and write a snapshot with its two HTML pages.

    Args:
        steps: ``(start, stop)``: snapshot steps ``start`` up to, not including, ``stop``.
        on_oom: record from fit start and write the snapshot when a CUDA out-of-memory error ends
            the fit (the files are also attached to the error: ``err.memory_snapshot_files``).
        stacks: ``"none"``, ``"python"`` or ``"all"``: the stack kept per allocation event.
        max_entries: allocator events kept (the oldest are dropped).
        dirpath: where the files go (default: the run directory).
    """

    def __init__(
        self,
        steps: tuple[int, int] | None = None,
        on_oom: bool = True,
        stacks: Stacks = "python",
        max_entries: int = 200_000,
        dirpath: str | None = None,
    ) -> None:
        self.steps = tuple(steps) if steps is not None else None
        self.on_oom = on_oom
        self.stacks = stacks
        self.max_entries = max_entries
        self.dirpath = dirpath
        self.files: dict[str, dict[str, str]] = {}  # what -> paths
        self._enabled = False
        self._recording = False
        self._window_done = False
        self._oom_pickle: str | None = None
        self._observer_attached = False

    # -- configuration

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.steps is not None and not (len(self.steps) == 2 and 0 <= int(self.steps[0]) < int(self.steps[1])):
            raise ValueError(f"MemorySnapshot steps must be (start, stop) with 0 <= start < stop, got {self.steps}")
        if self.stacks not in _STACKS:
            raise ValueError(f"MemorySnapshot stacks={self.stacks!r}: use one of {', '.join(_STACKS)}")
        if self.max_entries <= 0:
            raise ValueError(f"MemorySnapshot max_entries must be positive, got {self.max_entries}")
        if self.steps is None and not self.on_oom:
            raise ValueError("MemorySnapshot with steps=None and on_oom=False records nothing: give steps or on_oom")
        self._enabled = trainer.strategy.root_device.type == "cuda" and trainer.is_global_zero
        if trainer.strategy.root_device.type != "cuda":
            rank_zero_warn(
                f"MemorySnapshot: the device is {trainer.strategy.root_device.type!r}; the allocator history "
                "is CUDA's, nothing is recorded"
            )

    def record_kwargs(self) -> dict[str, Any]:
        """``_record_memory_history`` arguments for ``stacks``."""
        if self.stacks == "none":
            return {"enabled": "all", "context": None, "stacks": "python", "max_entries": self.max_entries}
        return {"enabled": "all", "context": "all", "stacks": self.stacks, "max_entries": self.max_entries}

    def directory(self, trainer: Trainer) -> str:
        return self.dirpath or trainer.log_dir or trainer.default_root_dir

    # -- hooks

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled and self.on_oom:
            self._start()
            self._attach_observer(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._enabled and self.steps is not None and not self._window_done and not self._recording:
            if self.steps[0] <= trainer.global_step < self.steps[1]:
                self._start()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._enabled and self.steps is not None and not self._window_done and trainer.global_step >= self.steps[1]:
            self._window_done = True
            self._write(trainer, f"steps{self.steps[0]}-{self.steps[1] - 1}", torch.cuda.memory._snapshot())
            if not self.on_oom:
                self._stop()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled and self.steps is not None and not self._window_done and self._recording:
            self._window_done = True  # the fit ended inside the window
            self._write(trainer, f"steps{self.steps[0]}-{trainer.global_step - 1}", torch.cuda.memory._snapshot())
        self._stop()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not (self.on_oom and isinstance(exception, torch.OutOfMemoryError)):
            self._stop()
            return
        what = f"oom_step{trainer.global_step}"
        snapshot = None
        if self._oom_pickle is not None:  # dumped by the observer, at the failing allocation
            with open(self._oom_pickle, "rb") as f:
                snapshot = pickle.load(f)  # our own file, written moments ago
        elif self._enabled:
            snapshot = torch.cuda.memory._snapshot()
        if snapshot is not None:
            paths = self._write(trainer, what, snapshot, pickle_path=self._oom_pickle)
            exception.memory_snapshot_files = paths
        self._stop()

    # -- workers

    def _start(self) -> None:
        if not self._recording:
            torch.cuda.memory._record_memory_history(**self.record_kwargs())
            self._recording = True

    def _stop(self) -> None:
        if self._recording:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._recording = False

    def _attach_observer(self, trainer: Trainer) -> None:
        """torch's OOM observer: dump the pickle inside the failing allocation (first OOM only)."""
        attach = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
        if attach is None or self._observer_attached:
            return
        directory = self.directory(trainer)

        def observer(device: int, alloc: int, device_allocated: int, device_free: int) -> None:
            if self._oom_pickle is not None:
                return
            try:
                os.makedirs(directory, exist_ok=True)
                path = os.path.join(directory, f"memory_snapshot_oom_step{trainer.global_step}.pickle")
                torch.cuda.memory._dump_snapshot(path)
                self._oom_pickle = path
            except Exception as err:  # never mask the OOM itself
                log.warning("MemorySnapshot: could not dump the OOM snapshot: %s", err)

        attach(observer)
        self._observer_attached = True

    def _write(self, trainer: Trainer, what: str, snapshot: dict, pickle_path: str | None = None) -> dict[str, str]:
        paths = write_snapshot_files(snapshot, self.directory(trainer), what, pickle_path)
        self.files[what] = paths
        text = ", ".join(f"{k}: {v}" for k, v in paths.items())
        log.info("memory snapshot (%s): %s", what, text)
        for logger in tensorboard_loggers(trainer):
            rows = "\n".join(f"| {k} | `{v}` |" for k, v in paths.items())
            logger.experiment.add_text(
                SNAPSHOT_TAG, f"{what}\n\n| file | path |\n|---|---|\n{rows}", trainer.global_step
            )
        return paths
