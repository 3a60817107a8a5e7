"""What every model family's converter provides, and the checks they share.

A family module (``gpt2``, ``llama``, ``mpt``) has:

- ``MODEL_TYPES``: the ``config.json`` ``model_type`` values it reads;
- ``config_from_hf(hf: dict) -> GPTConfig``, refusing (``ConversionError``, the option named) what
  TinyGPT can't compute;
- ``weights_from_hf(tensors, config) -> dict``: HF tensor names -> TinyGPT's state_dict keys;
- ``config_to_hf(config, dtype) -> dict``: the ``config.json`` of the matching HF model, refusing an
  architecture the family can't express;
- ``weights_to_hf(state_dict, config) -> dict``: the reverse of ``weights_from_hf``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from lit_xf.config import GPTConfig


class ConversionError(ValueError):
    """A model, option or file that can't be converted; the message names it and what would work."""


def refuse_options(family: str, hf: Mapping[str, Any], wanted: Mapping[str, Iterable[Any]]) -> None:
    """Refuse every ``hf[key]`` whose value is not among ``wanted[key]`` (a missing key counts as its
    first wanted value), naming them all."""
    bad = []
    for key, allowed in wanted.items():
        allowed = list(allowed)
        value = hf.get(key, allowed[0])
        if value not in allowed:
            bad.append(f"{key}={value!r} (supported: {', '.join(repr(a) for a in allowed)})")
    if bad:
        raise ConversionError(f"{family} options lit_xf's TinyGPT can't compute: {'; '.join(bad)}")


def require_arch(family: str, config: GPTConfig, wanted: Mapping[str, Any]) -> None:
    """Refuse a config whose fields differ from ``wanted`` (values, or predicates on the config)."""
    bad = []
    for key, want in wanted.items():
        value = getattr(config, key)
        ok = want(config) if callable(want) else value == want
        if not ok:
            bad.append(f"{key}={value!r}" + ("" if callable(want) else f" (needs {want!r})"))
    if bad:
        raise ConversionError(f"a {family} model can't express this architecture: {'; '.join(bad)}")


def strip_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Names without ``prefix`` where they have it (checkpoints saved from the base model lack it)."""
    return {k.removeprefix(prefix): v for k, v in tensors.items()}


def take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Pop ``name``; ``ConversionError`` if the checkpoint lacks it."""
    if name not in tensors:
        raise ConversionError(f"the checkpoint has no tensor {name!r}")
    return tensors.pop(name)


def refuse_leftovers(family: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Tensors the mapping did not use: weights TinyGPT has no place for."""
    if tensors:
        names = sorted(tensors)
        raise ConversionError(
            f"the {family} checkpoint holds {len(names)} tensor(s) TinyGPT has no place for: "
            f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
        )


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (config.json's ``dtype``)."""
    return str(dtype).removeprefix("torch.")
