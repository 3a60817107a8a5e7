"""lit_xf: memory-efficient GPT training with PyTorch Lightning and xFormers.

``GPTConfig``, ``TinyGPT`` and ``LitTinyGPT`` are imported on first use (PEP 562), so importing a
light submodule (``lit_xf.cli`` for ``lit-xf --help``) does not import torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lit_xf.config import GPTConfig
    from lit_xf.model import TinyGPT
    from lit_xf.module import LitTinyGPT

__all__ = ["GPTConfig", "LitTinyGPT", "TinyGPT"]
__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {"GPTConfig": "lit_xf.config", "TinyGPT": "lit_xf.model", "LitTinyGPT": "lit_xf.module"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'lit_xf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
