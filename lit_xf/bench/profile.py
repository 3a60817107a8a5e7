"""A ``torch.profiler`` window over a few training steps (``lit-xf bench train --profile-steps``):
wall time, device kernel time, the time the GPU is busy (the union of kernel intervals; the rest
of the wall time it waits for the host), kernel time per group, and idle gaps by size, all per step.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import torch

from lit_xf.bench.timing import sync
from lit_xf.callbacks import ATTENTION_KERNEL_PATTERN

# Kernel groups of a profiled window: the first pattern that matches a kernel's name (case-insensitive).
KERNEL_GROUPS = (
    ("attention", ATTENTION_KERNEL_PATTERN),
    ("gemm", r"gemm|nvjet|cublas|xmma|cutlass|triton_tem"),  # triton_tem: Inductor's GEMM templates
    ("loss", r"softmax|cross_entropy|nll"),
    ("norm", r"norm"),
    ("optimizer", r"adam|multi_tensor"),
    ("memcpy/memset", r"^memcpy|^memset"),
)

# Idle gaps between device work by size: launch gaps of kernels queued back to back (< 5 µs),
# short waits, and the host falling behind or a synchronization (≥ 100 µs).
GAP_SIZES_US = ((0.0, "<5us"), (5.0, "5-100us"), (100.0, ">=100us"))


class ProfileWindow:
    """``torch.profiler`` over steps ``[start, stop)`` of one run (``--profile-steps``): wall time,
    GPU kernel time, the time the GPU is busy (union of kernel intervals; the rest of the wall time
    it waits for the host) and kernel time per ``KERNEL_GROUPS`` group, all per step. Synchronizes
    at both ends. ``steps=None``: does nothing."""

    def __init__(self, steps: tuple[int, int] | None, device: torch.device):
        self.steps, self.device = steps, device
        self.result: dict | None = None
        self._profiler = None

    def at_step(self, step: int) -> None:
        """Call at the start of every step."""
        if self.steps is None or self.result is not None:
            return
        if self._profiler is not None:
            self._last = step
        if step == self.steps[0] and self._profiler is None:
            kinds = torch.profiler.ProfilerActivity
            activities = [kinds.CPU] + ([kinds.CUDA] if self.device.type == "cuda" else [])
            sync(self.device)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.start()
            self._t0, self._first, self._last = time.perf_counter(), step, step
        elif step >= self.steps[1] and self._profiler is not None:
            self.finish(step)

    def finish(self, step: int | None = None) -> None:
        """Close the window at ``step`` (or at the end of the run) and summarize it."""
        if self._profiler is None:
            return
        sync(self.device)
        wall_ms = (time.perf_counter() - self._t0) * 1e3
        self._profiler.stop()
        n = max(1, (step if step is not None else self._last + 1) - self._first)
        kernels = kernel_intervals(self._profiler)
        self._profiler = None
        self.result = {"steps": [self._first, self._first + n], "wall_ms_per_step": wall_ms / n}
        if not kernels:
            return  # no device kernels (CPU)
        kernels.sort(key=lambda k: k[1])
        busy, end = 0.0, kernels[0][1]
        groups: dict[str, float] = {}
        names: dict[str, float] = {}
        gaps: list[float] = []  # µs between the end of all earlier work and the next start
        for name, start, dur in kernels:
            if start > end:
                gaps.append(start - end)
            busy += max(0.0, start + dur - max(start, end))
            end = max(end, start + dur)
            group = next((g for g, pattern in KERNEL_GROUPS if re.search(pattern, name, re.I)), "other")
            groups[group] = groups.get(group, 0.0) + dur
            names[name] = names.get(name, 0.0) + dur
        self.result |= {
            "gpu_kernel_ms_per_step": sum(groups.values()) / 1e3 / n,
            "gpu_busy_ms_per_step": busy / 1e3 / n,
            "gpu_busy_frac": busy / 1e3 / wall_ms,
            "gpu_idle_ms_per_step": idle_by_gap_size(gaps, n),
            "kernel_ms_per_step": {g: round(v / 1e3 / n, 3) for g, v in sorted(groups.items(), key=lambda x: -x[1])},
            "top_kernels_ms_per_step": [
                (k[:100], round(v / 1e3 / n, 3)) for k, v in sorted(names.items(), key=lambda x: -x[1])[:10]
            ],
        }


def idle_by_gap_size(gaps_us: list[float], steps: int) -> dict[str, dict[str, float]]:
    """Per step, the GPU's idle gaps (µs, between device intervals) grouped by ``GAP_SIZES_US``:
    ``{size: {"count": gaps per step, "ms": idle ms per step}}``."""
    out = {label: {"count": 0.0, "ms": 0.0} for _, label in GAP_SIZES_US}
    for gap in gaps_us:
        label = [lab for low, lab in GAP_SIZES_US if gap >= low][-1]
        out[label]["count"] += 1 / steps
        out[label]["ms"] += gap / 1e3 / steps
    return {label: {k: round(v, 3) for k, v in d.items()} for label, d in out.items()}


def kernel_intervals(profiler) -> list[tuple[str, float, float]]:
    """(name, start µs, duration µs) of every device kernel, copy and memset the profiler recorded."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        profiler.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    device_kinds = ("kernel", "gpu_memcpy", "gpu_memset")
    return [(e["name"], float(e["ts"]), float(e["dur"])) for e in events if e.get("cat") in device_kinds and "dur" in e]
