"""Timing helpers shared by the benchmarks: medians of device-synchronized timings, GPU time of calls
queued behind a GPU sleep, and garbage-collector pauses.

On CUDA a call is timed with CUDA events; elsewhere with the host clock. Memory is the peak
allocated during a call above what was allocated before it (CUDA only).
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10) -> tuple[float, float]:
    """(median ms, peak MiB above the memory allocated before) of ``fn()``; the peak is NaN off CUDA."""
    for _ in range(warmup):
        fn()
    peak = float("nan")
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(time_call(fn, device) for _ in range(reps)), peak


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """ms of one ``fn()``: CUDA events on a GPU, the host clock elsewhere."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def queued_gpu_ms(fn: Callable[[], object], calls: int = 10, sleep_ms: float = 100.0) -> tuple[float, float]:
    """(GPU ms, host ms) per ``fn()`` on CUDA: ``calls`` calls queued behind a GPU sleep, so the GPU
    runs them back to back whatever the host's pace (as in a training step that keeps the host
    ahead); the host's time to issue one call comes with it. Raises if issuing outlasts the sleep."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(sleep_ms * sleep_cycles_per_ms()))
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_ms = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    if host_ms > 0.9 * sleep_ms:
        raise RuntimeError(f"issuing {calls} calls took {host_ms:.0f} ms, past the {sleep_ms:.0f} ms GPU sleep")
    return start.elapsed_time(end) / calls, host_ms / calls


@functools.cache
def sleep_cycles_per_ms() -> float:
    """``torch.cuda._sleep`` cycles per ms on this GPU (timed once)."""
    torch.cuda._sleep(10**6)  # warm
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**8)
    end.record()
    end.synchronize()
    return 10**8 / start.elapsed_time(end)


class GcPauses:
    """Python garbage-collector pauses during a ``with`` block (``gc.callbacks``); ``since(t0)``:
    (ms paused, full collections) in those that started at ``time.perf_counter()`` ≥ t0."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int, float]] = []

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._note)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._note)

    def _note(self, phase: str, info: dict) -> None:
        self.events.append((phase, info["generation"], time.perf_counter()))

    def since(self, t0: float) -> tuple[float, int]:
        ms, full, start = 0.0, 0, None
        for phase, generation, t in self.events:
            if phase == "start":
                start = t
            elif start is not None:
                if start >= t0:
                    ms += (t - start) * 1e3
                    full += generation == 2
                start = None
        return ms, full
