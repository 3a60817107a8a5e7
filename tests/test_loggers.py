"""``AsyncTensorBoardLogger``: scalars written by a child process, nothing lost when it fails."""

import collections
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from test_callbacks import fit, steps_and_values

from lit_xf.callbacks import KernelTimer, ThroughputMonitor
from lit_xf.loggers import AsyncTensorBoardLogger
from lit_xf.tb_writer import ScalarEventProcess


def _scalar_events_by_pid(run_dir) -> dict[int, collections.Counter]:
    """{pid in the file name: Counter of (step, tag) over that file's scalar values}."""
    found: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in run_dir.glob("events.out.tfevents.*"):
        pid = int(path.name.split(".")[5])  # events.out.tfevents.<time>.<host>.<pid>.<uid>
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.WhichOneof("value") == "simple_value":
                    found[pid][event.step, value.tag] += 1
    return found


def test_monitor_scalars_are_written_by_a_child_process(tmp_path):
    """The training process only queues the scalars; a child writes them, and they are on disk when
    fit returns. Text and the layout stay in the logger's own file."""
    callbacks = [KernelTimer(profile_every_n_steps=0), ThroughputMonitor(window=2)]
    _, events = fit(tmp_path, callbacks, max_steps=5, logger_cls=AsyncTensorBoardLogger)
    assert steps_and_values(events, "time/step_ms")[0] == [0, 1, 2, 3, 4]
    assert steps_and_values(events, "throughput/tokens_per_s")[0] == [0, 1, 2, 3, 4]
    files = _scalar_events_by_pid(tmp_path / "run" / "version_0")
    children = {pid: n for pid, n in files.items() if pid != os.getpid()}
    assert len(children) == 1
    (written,) = children.values()
    assert written[0, "time/step_ms"] == 1 and set(written.values()) == {1}  # one point per step and tag
    assert not files.get(os.getpid())  # no scalar written in this process
    assert len(events.Tensors("run/info/text_summary")) == 1


def test_scalar_event_process_round_trip_in_batches(tmp_path):
    writer = ScalarEventProcess(str(tmp_path), batch_steps=7, batch_seconds=3600)
    for step in range(20):
        writer.add(step, {"a/x": step * 0.5, "a/y": -float(step)})
    assert len(writer.unsent) == 20 - 14  # two batches of 7 sent, the rest queued
    writer.close()
    writer.close()  # a second close does nothing
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    assert steps_and_values(events, "a/x") == (list(range(20)), [s * 0.5 for s in range(20)])
    assert steps_and_values(events, "a/y")[1] == [-float(s) for s in range(20)]


def test_a_dead_writer_process_loses_no_queued_step(tmp_path):
    """The child dies: the steps it had not taken are written in-process, with one warning, and the
    rest of the run is written in-process too; the prefix is applied either way."""
    logger = AsyncTensorBoardLogger(tmp_path, name="run", prefix="pre", batch_calls=50)
    for step in range(3):
        logger.log_metrics({"time/step_ms": float(step)}, step=step)
    child = logger._writer
    child._proc.kill()
    child._proc.wait()
    with pytest.warns(UserWarning, match="writer process"):
        for step in range(3, 60):  # the 50th call sends a batch to the dead child
            logger.log_metrics({"time/step_ms": float(step)}, step=step)
    assert logger._writer is None
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    assert steps_and_values(events, "pre-time/step_ms")[0] == list(range(60))


def test_prefix_and_restart_after_finalize(tmp_path):
    """Tags carry the logger's prefix as ``TensorBoardLogger`` writes them; logging after
    ``finalize`` (a second ``fit``) starts a new child."""
    logger = AsyncTensorBoardLogger(tmp_path, name="run", prefix="pre")
    logger.log_metrics({"a": 1.0, "b": 2.0}, step=0)
    logger.finalize("success")
    logger.log_metrics({"a": 3.0}, step=1)
    logger.finalize("success")
    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    assert steps_and_values(events, "pre-a") == ([0, 1], [1.0, 3.0])
    assert steps_and_values(events, "pre-b") == ([0], [2.0])
