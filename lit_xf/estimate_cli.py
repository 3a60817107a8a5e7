"""``lit-xf estimate``: a config's predicted peak training memory, before anything runs.

    lit-xf estimate --config configs/gpt2_124m.yaml --gpu h200
    lit-xf estimate --config configs/gpt2_124m.yaml --data.batch_size 64 --model.arch.activation_checkpointing full
    lit-xf estimate --config configs/gpt2_124m.yaml --json

The config files are read as ``lit-xf fit`` reads them (later files and ``--KEY VALUE`` pairs
override earlier ones; ``data.seq_len`` is the model's ``max_seq_len``, the tokenizer gives its
vocabulary), the model is built on the meta device for its sizes, and ``lit_xf.memory_estimate``
does the arithmetic. Prints the terms at the peak, one block's saved tensors and, for ``--gpu``,
the largest ``batch_size`` that fits with each checkpointing mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from lit_xf.memory_estimate import (
    CHECKPOINTING_MODES,
    GPUS,
    HEADROOM,
    RunShape,
    estimate,
    format_bytes,
    gpu_capacity,
    largest_batch_size,
    table,
)

PROG = "lit-xf estimate"
_DATA_DEFAULTS = {"batch_mode": "packed", "seq_len": 512, "batch_size": 8, "tokenizer": "byte", "bpe_vocab_size": 4096}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set(config: dict, dotted: str, value: Any) -> None:
    node = config
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--{dotted}: {key} is not a section of the config")
    node[leaf] = value


def load_config(paths: Sequence[str], overrides: Sequence[tuple[str, str]] = ()) -> dict:
    """The merged YAML of ``paths`` with ``(key.path, value)`` overrides (values parsed as YAML)."""
    import yaml

    config: dict = {}
    for path in paths:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: not a config (a YAML mapping with model, data, trainer)")
        config = _merge(config, loaded)
    for key, value in overrides:
        _set(config, key, yaml.safe_load(value))
    return config


def _vocab_size(data: dict) -> int:
    if data.get("corpus") == "counting":
        return int(data.get("counting_vocab", 64)) + 1
    if data.get("tokenizer", "byte") == "bpe":
        return int(data.get("bpe_vocab_size", _DATA_DEFAULTS["bpe_vocab_size"]))
    return 258  # ByteTokenizer: 256 bytes + <eos> + <pad>


def shapes_from_config(config: dict):
    """(``ModelDims``, ``RunShape``) of a parsed config (imports torch to build the meta model)."""
    from lit_xf.config import GPTConfig
    from lit_xf.memory_facts import config_dims

    model, trainer = config.get("model") or {}, config.get("trainer") or {}
    data = {**_DATA_DEFAULTS, **(config.get("data") or {})}
    arch = dict(model.get("arch") or {})
    if isinstance(arch.get("ffn"), dict):
        raise ValueError("the estimate knows ffn: swiglu and gelu, not a class_path factory")
    arch["max_seq_len"] = int(data["seq_len"])
    arch.setdefault("vocab_size", _vocab_size(data))
    gpt = GPTConfig.from_dict(arch)
    precision = str(trainer.get("precision", "32-true"))
    on_gpu = str(trainer.get("accelerator", "auto")) in ("gpu", "cuda", "auto")
    scaled_clipping = precision.startswith("16") and bool(trainer.get("gradient_clip_val"))
    run = RunShape(
        batch_size=int(data["batch_size"]),
        seq_len=int(data["seq_len"]),
        batch_mode=str(data["batch_mode"]),
        precision=precision,
        attention=gpt.attention,
        activation_checkpointing=gpt.activation_checkpointing,
        accumulate_grad_batches=int(trainer.get("accumulate_grad_batches", 1)),
        fused_optimizer=on_gpu and not scaled_clipping,
    )
    return config_dims(gpt), run


def report(dims, run, gpu: str | None) -> tuple[str, dict]:
    """The printed table and the ``--json`` object."""
    est = estimate(dims, run)
    result = est.to_dict()
    capacity = gpu_capacity(gpu) if gpu else None
    text = table(est, capacity, gpu)
    if capacity:
        sizes = {}
        for mode in CHECKPOINTING_MODES:
            changed = dataclasses.replace(run, activation_checkpointing=mode)
            b = largest_batch_size(dims, changed, capacity)
            sizes[mode] = {"batch_size": b, "tokens_per_step": b * run.seq_len * run.accumulate_grad_batches}
        result.update({"gpu": gpu, "capacity_bytes": capacity, "headroom": HEADROOM, "largest": sizes})
        lines = [f"largest batch_size within {HEADROOM:.0%} of {gpu} ({run.seq_len}-token rows):"]
        for mode, found in sizes.items():
            lines.append(
                f"  activation_checkpointing {mode:<9}  {found['batch_size']:>6}"
                f"  ({found['tokens_per_step']} tokens/step)"
            )
        text += "\n\n" + "\n".join(lines)
    return text, result


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Predicted peak memory of a config's training step (lit_xf.memory_estimate). "
        "Any --KEY VALUE of the config overrides it, e.g. --data.batch_size 16.",
    )
    parser.add_argument("--config", action="append", required=True, help="config file (repeatable)")
    parser.add_argument("--gpu", default=None, help=f"{', '.join(GPUS)} or a size like 80GiB: what fits on it")
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    args, rest = parser.parse_known_args(list(argv))
    overrides = []
    it = iter(rest)
    for token in it:
        if not token.startswith("--") or token == "--":
            parser.error(f"unexpected argument {token!r}: overrides are --KEY VALUE pairs, e.g. --data.batch_size 16")
        key, _, value = token[2:].partition("=")
        if not _:
            value = next(it, None)
            if value is None:
                parser.error(f"--{key} needs a value")
        overrides.append((key, value))
    try:
        if args.gpu:
            gpu_capacity(args.gpu)
        dims, run = shapes_from_config(load_config(args.config, overrides))
        text, result = report(dims, run, args.gpu)
    except (ValueError, OSError) as err:
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


__all__ = ["load_config", "main", "report", "shapes_from_config", "format_bytes"]
