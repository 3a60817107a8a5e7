"""TensorBoard scalar events written in a child process, so that the training thread pays only for
queueing them (``lit_xf.loggers.AsyncTensorBoardLogger`` uses it).

``ScalarEventProcess`` hands steps over in batches (one pickle of ``[[step, wall_time,
{tag: value}], ...]`` per batch: ~0.5 µs per step to encode on a 2-core CPU, JSON took ~10) to
this file run as a script, which writes each entry as one event with tensorboard's own
``EventFileWriter`` into the given log directory (TensorBoard merges a directory's event files).
This module imports only the standard library; the child imports only tensorboard.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class ScalarEventProcess:
    """Queues ``(step, {tag: value})`` and sends them to a child writer every ``batch_steps`` steps
    or ``batch_seconds`` seconds, whichever comes first. ``close`` sends the rest and waits until
    the child has written and closed its file. A failed child raises ``OSError`` from ``add`` /
    ``close``, with the steps not handed over in ``unsent``."""

    def __init__(self, log_dir: str, batch_steps: int = 50, batch_seconds: float = 2.0) -> None:
        self.log_dir = log_dir
        self.batch_steps, self.batch_seconds = batch_steps, batch_seconds
        self.unsent: list[list] = []
        self._last_send = time.monotonic()
        self._stderr = tempfile.TemporaryFile()  # a file, not a pipe: the child never blocks on it
        self._proc = subprocess.Popen(
            [sys.executable, "-u", str(Path(__file__).resolve()), log_dir],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    def add(self, step: int, metrics: dict[str, float]) -> None:
        self.unsent.append([step, time.time(), metrics])
        if len(self.unsent) >= self.batch_steps or time.monotonic() - self._last_send >= self.batch_seconds:
            self._send()

    def _send(self) -> None:
        self._last_send = time.monotonic()
        if not self.unsent:
            return
        frame = pickle.dumps(self.unsent, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self._proc.stdin.write(frame)
            self._proc.stdin.flush()
        except (BrokenPipeError, ValueError) as err:
            raise OSError(f"the TensorBoard writer process exited: {self._error()}") from err
        self.unsent = []

    def close(self, timeout: float = 60.0) -> None:
        """Send what is queued, end the child and wait until its events are on disk."""
        if self._proc.stdin.closed:  # closed, or abandoned
            return
        try:
            self._send()
        finally:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            code = self._proc.wait(timeout)
        except subprocess.TimeoutExpired as err:
            self.abandon()
            raise OSError(f"the TensorBoard writer process did not finish within {timeout} s") from err
        error = self._error()
        self.abandon()
        if code != 0:
            raise OSError(f"the TensorBoard writer process failed (exit {code}): {error}")

    def abandon(self) -> None:
        """Stop the child if it still runs and release the pipes (what is unsent stays in ``unsent``)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for stream in (self._proc.stdin, self._stderr):
            try:
                stream.close()
            except OSError:
                pass

    def _error(self) -> str:
        if self._proc.poll() is None:
            return "still running"
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()[-500:] or "no message"


def _serve(log_dir: str) -> None:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(log_dir, flush_secs=5)
    try:
        while True:
            try:
                steps = pickle.load(sys.stdin.buffer)  # from the training process only, over a pipe
            except EOFError:
                break
            for step, wall_time, metrics in steps:
                values = [Summary.Value(tag=tag, simple_value=value) for tag, value in metrics.items()]
                writer.add_event(Event(step=step, wall_time=wall_time, summary=Summary(value=values)))
    finally:
        writer.close()


if __name__ == "__main__":
    _serve(sys.argv[1])
