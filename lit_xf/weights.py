"""A TinyGPT's weights on their own: one safetensors file that holds its architecture, read without running code.

    model.safetensors    TinyGPT's state_dict (``tok_emb.weight``, ``blocks.0.attn.qkv.weight``, ...);
                         metadata ``lit_xf.arch`` = the GPTConfig's fields as JSON

With tied embeddings only ``tok_emb.weight`` is stored (safetensors holds no shared tensors);
``lm_head.weight`` is that tensor again when read. :func:`read_weights` also reads the weights of a
Lightning checkpoint (``lit-xf fit``'s ``last.ckpt``, loaded weights only) and a folder holding
``model.safetensors``. ``LitTinyGPT(init_weights=...)`` starts training from such weights
(:func:`load_weights`, which names every key and shape that doesn't fit).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lit_xf.checkpoints import CheckpointError, load_checkpoint

WEIGHTS_FILE = "model.safetensors"
ARCH_KEY = "lit_xf.arch"
TOKENIZER_KEY = "lit_xf.tokenizer"


@dataclass
class Weights:
    """What a weights file holds: the architecture's fields (None where the file doesn't say), the
    state_dict (TinyGPT's keys) and the tokenizer state (``lit_xf.tokenizer_state``) if stored."""

    arch: dict[str, Any] | None
    state_dict: dict[str, torch.Tensor]
    tokenizer: dict[str, Any] | None = None


def weights_path(path: str | Path) -> Path:
    """``path`` itself, or ``path/model.safetensors`` for a folder."""
    path = Path(path)
    return path / WEIGHTS_FILE if path.is_dir() else path


def read_weights(path: str | Path) -> Weights:
    """The weights at ``path``: a ``.safetensors`` file, a folder holding ``model.safetensors``, or a
    Lightning checkpoint (read with ``weights_only=True``; its ``model.`` prefix dropped).
    Raises ``CheckpointError`` naming the file."""
    file = weights_path(path)
    if not file.is_file():
        raise CheckpointError(
            f"weights {file} do not exist (a .safetensors file, a folder with {WEIGHTS_FILE}, or a lit-xf .ckpt)"
        )
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"weights {file} can't be read as safetensors ({err})") from err
        arch = json.loads(meta[ARCH_KEY]) if ARCH_KEY in meta else None
        tokenizer = json.loads(meta[TOKENIZER_KEY]) if TOKENIZER_KEY in meta else None
        if arch and arch.get("tie_embeddings") and "tok_emb.weight" in tensors:
            tensors.setdefault("lm_head.weight", tensors["tok_emb.weight"])
        return Weights(arch, tensors, tokenizer)
    checkpoint = load_checkpoint(file, map_location="cpu")
    if "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {file} holds no state_dict (a sharded checkpoint is a folder of shards)")
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    hparams = checkpoint.get("hyper_parameters") or {}
    arch = hparams.get("arch")
    arch = dict(arch) if isinstance(arch, Mapping) else None
    return Weights(arch, state, (checkpoint.get("lit_xf") or {}).get("tokenizer"))


def save_weights(
    path: str | Path, arch: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], tokenizer: dict | None = None
) -> Path:
    """Write ``state_dict`` with ``arch`` (and the tokenizer state) as one safetensors file,
    atomically (a temporary file beside it, then a rename). Returns the file's path."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if arch.get("tie_embeddings"):
        tensors.pop("lm_head.weight", None)
    meta = {ARCH_KEY: json.dumps(dict(arch))}
    if tokenizer:
        meta[TOKENIZER_KEY] = json.dumps(tokenizer)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return path


def check_fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path = "weights") -> None:
    """Refuse, with the keys named, weights missing from ``state_dict``, unexpected, or shaped unlike
    ``model``'s (which may live on the meta device)."""
    mine = model.state_dict()
    missing = sorted(mine.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - mine.keys())
    shapes = [
        f"{k}: {list(state_dict[k].shape)} vs the model's {list(v.shape)}"
        for k, v in mine.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        what = shapes[:3] + [
            f"{len(keys)} {name} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for keys, name in ((missing, "missing"), (unexpected, "unexpected"))
            if keys
        ]
        raise ValueError(
            f"{source} don't fit this model ({'; '.join(what)}); build the model with the architecture they were "
            "saved with (the config.yaml written beside them by lit-xf convert)"
        )


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str | Path = "weights") -> None:
    """Copy ``state_dict`` into ``model`` (converted to its dtype) after :func:`check_fits`."""
    check_fits(model, state_dict, source)
    mine = model.state_dict()
    with torch.no_grad():
        for key, tensor in mine.items():
            tensor.copy_(state_dict[key])
