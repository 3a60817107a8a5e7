"""Run-level TensorBoard text and charts: ``run/info`` and the "Custom Scalars" layout.

Helpers, not a callback: the first lit_xf monitor in ``trainer.callbacks`` calls them (see
``StepMonitor``), so a config that lists any monitor gets them without naming another callback.
Both go only to ``TensorBoardLogger``s, through their public ``experiment`` (a ``SummaryWriter``).
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
from typing import Any

import lightning
import torch
from lightning.fabric.loggers import TensorBoardLogger
from lightning.pytorch import LightningModule, Trainer

__all__ = ["RUN_INFO_TAG", "add_custom_scalars_layout", "log_run_info", "tensorboard_loggers"]

RUN_INFO_TAG = "run/info"

# Chart title -> its tags, per category. The tags are the monitors' (``lit_xf.callbacks.TAGS``).
_LAYOUT = {
    "lit_xf memory": {
        "peak memory (MiB; CUDA only, empty on CPU)": ("memory/peak_allocated_mib", "memory/peak_reserved_mib"),
        "allocator retries and OOMs per step (CUDA only)": ("memory/alloc_retries", "memory/ooms"),
        "breakdown (MiB; MemoryBreakdown, activations CUDA only)": (
            "memory/params_mib",
            "memory/grads_mib",
            "memory/optimizer_mib",
            "memory/forward_end_mib",
            "memory/activations_mib",
            "memory/attention_plan_mib",
        ),
    },
    "lit_xf time": {
        "step phases (ms)": ("time/forward_ms", "time/backward_ms", "time/optimizer_ms", "time/step_ms"),
        "attention share of device time": ("time/attention_share",),
    },
    "lit_xf throughput": {
        "tokens/s": ("throughput/tokens_per_s", "throughput/real_tokens_per_s"),
        "padding efficiency": ("throughput/padding_efficiency",),
        "TFLOP/s": ("throughput/tflops",),
        "MFU (needs a known peak FLOP/s, none on CPU: see run/info)": ("throughput/mfu",),
    },
}


def tensorboard_loggers(trainer: Trainer) -> list[TensorBoardLogger]:
    """The trainer's TensorBoard loggers (Lightning's ``TensorBoardLogger`` and its subclasses)."""
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _tag_regex(tag: str) -> str:
    """A chart's tag regex: the tag, after any logger prefix (``prefix-tag``). TensorBoard anchors
    it at the start (``re.match``), so it must allow the prefix itself."""
    return "(?:.+-)?" + re.escape(tag) + "$"


def add_custom_scalars_layout(logger: Any) -> dict | None:
    """Write the "Custom Scalars" charts of the monitors' tags to a ``TensorBoardLogger``; returns the layout.

    Does nothing (returns ``None``) for other loggers. TensorBoard keeps the last layout written to
    a run, so writing the same layout again is harmless.
    """
    if not isinstance(logger, TensorBoardLogger):
        return None
    layout = {
        category: {title: ["Multiline", [_tag_regex(t) for t in tags]] for title, tags in charts.items()}
        for category, charts in _LAYOUT.items()
    }
    logger.experiment.add_custom_scalars(layout)
    return layout


def _library_version(name: str) -> str:
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return importlib.metadata.version(name) + " (installed)"
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def log_run_info(trainer: Trainer, pl_module: LightningModule, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Write the run's kernel choices, library versions and device as ``run/info`` text; returns the facts.

    ``extra`` adds rows (the monitors' ``run_facts()``, e.g. the MFU denominator). Text goes to every
    ``TensorBoardLogger`` of ``trainer`` (call on rank zero). xformers is not imported for this:
    its version comes from the loaded module or the installed metadata.
    """
    device = trainer.strategy.root_device
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{device.type} ({platform.processor() or platform.machine()})"
    info = {
        "attention kernel": str(getattr(pl_module, "attention_kernel_name", "unknown")),
        "MLP kernel": str(getattr(pl_module, "mlp_kernel_name", "unknown")),
        "device": device_name,
        "world size": str(trainer.world_size),
        "precision": str(trainer.precision),
        "accumulate_grad_batches": str(trainer.accumulate_grad_batches),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "xformers": _library_version("xformers"),
        "CUDA runtime": str(torch.version.cuda),
        "cuDNN": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "python": platform.python_version(),
    }
    model = getattr(pl_module, "model", None)
    if hasattr(model, "attention_window"):  # TinyGPT's sliding window
        window = model.attention_window
        info["attention window"] = "none" if window is None else f"{window} tokens"
    if hasattr(model, "attention_kernel_reason"):  # why that kernel: auto's measurements per case
        info["attention kernel reason"] = model.attention_kernel_reason.replace("\n", "<br>")
    info.update(extra or {})
    text = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in info.items())
    for logger in tensorboard_loggers(trainer):
        logger.experiment.add_text(RUN_INFO_TAG, text, global_step=trainer.global_step)
    return info
