"""The torch side of the memory estimate: a model's sizes, a trainer's step shape, and the bytes
tensors hold (each storage counted once, so tied weights and views are not counted twice)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.nn as nn

from lit_xf.config import GPTConfig
from lit_xf.memory_estimate import ModelDims, RunShape
from lit_xf.model import GeluMLP, SwiGLU, TinyGPT

__all__ = [
    "config_dims",
    "device_capacity",
    "model_dims",
    "oom_report",
    "optimizer_state_bytes",
    "run_shape",
    "storage_bytes",
]


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (``None`` entries skipped)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes of the tensors in the optimizers' state (AdamW: ``exp_avg``, ``exp_avg_sq``, ``step``)."""
    return storage_bytes(v for opt in optimizers for state in opt.state.values() for v in state.values())


def _ffn_hidden(ffn: nn.Module) -> tuple[str, int]:
    if isinstance(ffn, GeluMLP):
        return "gelu", ffn.fc1.out_features
    if isinstance(ffn, SwiGLU):
        return "swiglu", ffn.w3.in_features
    raise ValueError(
        f"the memory estimate knows the swiglu and gelu FFNs, not {type(ffn).__name__}; "
        "use model.arch.ffn: swiglu or gelu to estimate"
    )


def model_dims(model: TinyGPT) -> ModelDims:
    """``ModelDims`` of a built model (any device, ``meta`` included)."""
    c = model.config
    block = model.blocks[0]
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    ffn, hidden = _ffn_hidden(block.ffn)
    return ModelDims(
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        n_layers=c.n_layers,
        n_heads=c.n_heads,
        n_kv_heads=c.kv_heads,
        head_dim=c.head_size,
        ffn=ffn,
        ffn_hidden=hidden,
        params=sum(p.numel() for p in model.parameters()),
        block_linear=sum(p.numel() for m in linears for p in m.parameters()),
        block_largest_matrix=max(m.weight.numel() for m in linears),
        norm=c.norm,
        positions=c.positions,
        dropout=c.dropout,
        tie_embeddings=c.tie_embeddings,
        attention_window=c.attention_window,
    )


def config_dims(config: GPTConfig) -> ModelDims:
    """``ModelDims`` of ``config`` without allocating: the model is built on the meta device (with
    a kernel and MLP that build anywhere; neither changes a size)."""
    buildable = dataclasses.replace(config, attention="sdpa", mlp_kernel="torch")
    with torch.device("meta"):
        dims = model_dims(TinyGPT(buildable))
    return dataclasses.replace(dims, attention_window=config.attention_window)


def run_shape(trainer, module) -> RunShape:
    """The ``RunShape`` of a Lightning run: batch size, row length and batch mode from its data
    module, precision and accumulation from the trainer, the kernel and checkpointing from the model."""
    data = trainer.datamodule
    config = module.model.config
    fused = any(getattr(opt, "defaults", {}).get("fused") for opt in getattr(trainer, "optimizers", []) or []) or (
        trainer.strategy.root_device.type == "cuda" and not trainer.optimizers
    )
    return RunShape(
        batch_size=int(getattr(data, "batch_size", 1)),
        seq_len=int(getattr(data, "seq_len", config.max_seq_len)),
        batch_mode=str(getattr(data, "batch_mode", "packed")),
        precision=str(trainer.precision),
        attention=str(getattr(module.model, "attention_kernel_name", config.attention)),
        activation_checkpointing=config.activation_checkpointing,
        accumulate_grad_batches=int(trainer.accumulate_grad_batches),
        fused_optimizer=bool(fused),
    )


def device_capacity(device: torch.device) -> int | None:
    """Total bytes of a CUDA device (None elsewhere)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def oom_report(err: BaseException, trainer, module) -> str:
    """The one-line report of an out-of-memory error in ``trainer.fit(module)`` (``lit_xf.memory_report``)."""
    from lit_xf.memory_estimate import estimate
    from lit_xf.memory_report import fit_suggestions, oom_message, requested_bytes

    device = trainer.strategy.root_device
    capacity = device_capacity(device)
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    dims, run = model_dims(module.model), run_shape(trainer, module)
    est = estimate(dims, run)
    suggestions = fit_suggestions(dims, run, capacity) if capacity else []
    return oom_message(
        trainer.global_step,
        peak,
        capacity,
        est,
        suggestions,
        requested=requested_bytes(str(err)),
        files=getattr(err, "memory_snapshot_files", None),
    )
