"""A Hugging Face model folder's files: ``config.json``, safetensors weights (one file or shards listed
in ``model.safetensors.index.json``), ``tokenizer.json``; read without running code, written into a
folder that appears whole (a temporary folder beside it, then one rename)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from lit_xf.convert.family import ConversionError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
#: Shards written above this many bytes of tensors (transformers' own default is 5 GB too).
DEFAULT_SHARD_BYTES = 5 * 10**9


def read_config(folder: Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON ({err})") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the folder's weights: the shards an index lists, or the one file."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        names = sorted(set(index.get("weight_map", {}).values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if not names or missing:
            raise ConversionError(f"{folder / INDEX} lists shards that are not there: {missing or 'none listed'}")
        return [folder / n for n in names]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = (
        f" (it has {', '.join(others[:3])}: pickles, which lit_xf does not unpickle; save the model with "
        "safe_serialization)"
        if others
        else ""
    )
    raise ConversionError(f"{folder} has no {SINGLE} or {INDEX}{hint}")


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files, by name."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        part = load_file(str(file))
        if clash := part.keys() & tensors.keys():
            raise ConversionError(f"{file} repeats tensors of another shard: {sorted(clash)[:3]}")
        tensors.update(part)
    return tensors


def write_tensors(folder: Path, tensors: Mapping[str, torch.Tensor], shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """``folder/model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` of at most
    ``shard_bytes`` each (a larger tensor gets a shard of its own) with their index."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(Path(folder) / SINGLE), metadata=meta)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(Path(folder) / name), metadata=meta)
        weight_map |= dict.fromkeys(shard, name)
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(folder) / INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")


@contextlib.contextmanager
def atomic_folder(dest: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``dest`` to fill; renamed to ``dest`` when the block ends without an
    error, removed otherwise. An existing ``dest`` is refused unless ``overwrite`` (then replaced)."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise ConversionError(f"{dest} exists already; choose a new folder or pass overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
