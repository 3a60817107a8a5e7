"""An out-of-memory error as one line: the step, the peak, the largest consumers, what would fit.

Pure arithmetic over ``lit_xf.memory_estimate`` (no torch): ``fit_suggestions`` asks the estimate
which smaller ``batch_size``, which checkpointing mode and which O(T) kernel would fit the card;
``oom_message`` writes the line. ``lit_xf.memory_facts.oom_report`` fills them from a live run.
"""

from __future__ import annotations

import dataclasses
import re

from lit_xf.memory_estimate import (
    HEADROOM,
    Estimate,
    ModelDims,
    RunShape,
    estimate,
    format_bytes,
    largest_batch_size,
)

__all__ = ["fit_suggestions", "oom_message", "requested_bytes"]

_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def requested_bytes(message: str) -> int | None:
    """The size in torch's "Tried to allocate 2.00 GiB" (None when the message has none)."""
    found = re.search(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)", message)
    return int(float(found.group(1)) * _UNITS[found.group(2)]) if found else None


def fit_suggestions(dims: ModelDims, run: RunShape, capacity: int) -> list[str]:
    """Changes that the estimate says fit in ``HEADROOM · capacity``, each as the config key to set."""
    out = []
    b = largest_batch_size(dims, run, capacity)
    if 0 < b < run.batch_size:
        out.append(f"--data.batch_size {b}")
    for mode in ("selective", "full"):
        if mode == run.activation_checkpointing or (mode == "selective" and run.activation_checkpointing == "full"):
            continue
        changed = dataclasses.replace(run, activation_checkpointing=mode)
        if estimate(dims, changed).peak <= HEADROOM * capacity:
            out.append(f"--model.arch.activation_checkpointing {mode}")
            break
        b = largest_batch_size(dims, changed, capacity)
        if mode == "full" and b > 0:
            out.append(f"--model.arch.activation_checkpointing full with --data.batch_size {b}")
    kind = estimate(dims, run).kernel_kind
    if kind != "linear":
        for kernel in ("auto", "fa4", "xformers", "flex"):
            changed = dataclasses.replace(run, attention=kernel)
            if estimate(dims, changed).peak <= HEADROOM * capacity:
                out.append(f"--model.arch.attention {kernel} (O(T) memory instead of {kind})")
                break
    return out


def oom_message(
    step: int,
    peak: int | None,
    capacity: int | None,
    est: Estimate,
    suggestions: list[str],
    requested: int | None = None,
    files: dict[str, str] | None = None,
) -> str:
    """One line: ``CUDA out of memory at step 3 (asked for 2.00 GiB; peak 139.2 GiB of 139.8 GiB);
    estimated peak 150 GiB, largest: logits 40 GiB, ...; would fit: ...; snapshot: ...``."""
    asked = f"asked for {format_bytes(requested)}; " if requested else ""
    held = f"peak {format_bytes(peak)}" if peak is not None else "peak unknown"
    card = f" of {format_bytes(capacity)}" if capacity else ""
    largest = ", ".join(f"{name} {format_bytes(value)}" for name, value in est.largest(3))
    parts = [
        f"CUDA out of memory at step {step} ({asked}{held}{card})",
        f"estimated peak {format_bytes(est.peak)} at the {est.phase}, largest: {largest}",
    ]
    if capacity and est.peak <= HEADROOM * capacity:
        parts.append(
            "that fits the card: memory outside this step's tensors is short (another process, the allocator's "
            "fragmentation: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True), the snapshot shows what was live"
        )
    elif suggestions:
        parts.append("would fit: " + " | ".join(suggestions))
    else:
        parts.append("nothing the estimate knows fits: a smaller model (d_model, n_layers) or more devices")
    if files:
        parts.append("snapshot: " + (files.get("timeline") or files.get("pickle", "")))
    parts.append("lit-xf estimate --config ... shows the terms")
    return "; ".join(parts)
