"""``AsyncTensorBoardLogger``: Lightning's ``TensorBoardLogger`` with scalars written by a child process.

Writing a TensorBoard event costs the training thread tens of µs (protobuf building, the writer's
queue and lock) and the writer thread as much again under the GIL (tensorboard's pure-Python
CRC-32C), and ``TensorBoardLogger.log_metrics`` writes one event per scalar. This logger turns each
``log_metrics`` call into one event and hands the events in batches to a child process
(``lit_xf.tb_writer``), which writes them with tensorboard's ``EventFileWriter`` into the same log
directory (TensorBoard merges a directory's event files); the training thread only appends to a
list. What that saves per step, against ``TensorBoardLogger`` with the same monitors, is measured
in docs/benchmarks.md ("Monitoring overhead": ``lit-xf bench train`` variants ``+tb`` and ``+atb``);
the shipped configs select this logger.

Select it in a config::

    logger:
      class_path: lit_xf.loggers.AsyncTensorBoardLogger
      init_args: {save_dir: runs, name: counting}

Text, hyperparameters, graphs and the Custom Scalars layout go through ``experiment`` in this
process as usual. The scalars are on disk when ``finalize`` returns (Lightning calls it at the end
of ``fit``, also when training fails). Where the log directory is remote (``s3://...``), or the
child cannot start or dies, scalars are written in-process with ``TensorBoardLogger``'s own writer
(no step is lost; one warning).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor

from lit_xf.tb_writer import ScalarEventProcess

__all__ = ["AsyncTensorBoardLogger"]


class AsyncTensorBoardLogger(TensorBoardLogger):
    """``TensorBoardLogger`` whose ``log_metrics`` queues one event per call to a child writer process.

    Args:
        save_dir, name, version, log_graph, default_hp_metric, prefix, sub_dir, **kwargs: as
            ``TensorBoardLogger``.
        batch_calls: ``log_metrics`` calls queued before they are sent to the child together.
        batch_seconds: a batch is also sent once this many seconds have passed since the last one.
        log_epoch: keep the ``epoch`` scalar Lightning adds to every ``self.log`` call; the configs
            turn it off (their runs count steps, and ``epoch`` would be TensorBoard's first chart).
    """

    def __init__(
        self,
        save_dir: str | Path,
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = True,
        prefix: str = "",
        sub_dir: str | Path | None = None,
        batch_calls: int = 50,
        batch_seconds: float = 2.0,
        log_epoch: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            save_dir,
            name=name,
            version=version,
            log_graph=log_graph,
            default_hp_metric=default_hp_metric,
            prefix=prefix,
            sub_dir=sub_dir,
            **kwargs,
        )
        if batch_calls < 1 or not batch_seconds > 0:
            raise ValueError(f"batch_calls must be >= 1 and batch_seconds > 0, got {batch_calls}, {batch_seconds}")
        self.batch_calls, self.batch_seconds = batch_calls, batch_seconds
        self.log_epoch = log_epoch
        self._tag_prefix = prefix + self.LOGGER_JOIN_CHAR if prefix else ""
        self._writer: ScalarEventProcess | None = None
        self._in_process = False  # remote directory, or the child failed: write here from now on

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.log_epoch and "epoch" in metrics:
            metrics = {k: v for k, v in metrics.items() if k != "epoch"}
            if not metrics:
                return
        writer = None if step is None else self._child()
        nested = {k: v for k, v in metrics.items() if isinstance(v, dict)}  # add_scalars: several runs
        if writer is None or nested:
            super().log_metrics(metrics, step)
            return
        scalars = {self._tag_prefix + k: float(v.item() if isinstance(v, Tensor) else v) for k, v in metrics.items()}
        try:
            writer.add(int(step), scalars)
        except OSError as err:  # this call is among the unsent ones
            self._child_failed(err)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Send what is queued and wait until the child has written it; then close as usual."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError as err:
                self._writer = writer
                self._child_failed(err)
        super().finalize(status)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_writer"] = None  # a process handle does not travel (spawned ranks start their own)
        return state

    def _child(self) -> ScalarEventProcess | None:
        if self._writer is None and not self._in_process:
            log_dir = str(self.log_dir)
            if "://" in log_dir:  # remote file systems: the logger's own (fsspec) writer
                self._in_process = True
                return None
            try:
                self._writer = ScalarEventProcess(log_dir, self.batch_calls, self.batch_seconds)
            except OSError as err:
                self._in_process = True
                rank_zero_warn(f"TensorBoard writer process not started ({err}); scalars are written in-process.")
        return self._writer

    def _child_failed(self, err: OSError) -> None:
        """Write what the child did not take in this process, and keep writing here."""
        rank_zero_warn(f"{err}; scalars are written in-process from here on.")
        writer, self._writer, self._in_process = self._writer, None, True
        writer.abandon()
        for step, _, scalars in writer.unsent:
            for tag, value in scalars.items():  # already prefixed
                self.experiment.add_scalar(tag, value, step)
        writer.unsent = []
