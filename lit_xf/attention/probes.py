"""What this machine can run, and the import workarounds that make it run.

- xformers 0.0.35's ``_C.so`` links ``libcudart.so.12``, which a CUDA-13 torch doesn't ship:
  ``_preload_cudart12`` loads it from the ``nvidia-cuda-runtime-cu12`` package.
- flash-attn-4 installs a ``flash_attn`` package that is not FlashAttention-2, which xformers would
  import and fail on: ``import_xformers_ops`` hides it during xformers' first import.
- ``xformers_problem`` / ``fa4_problem``: why a kernel can't run here, or None (cached per process).

Nothing here imports xformers or flash-attn at module import.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _preload_cudart12() -> str | None:
    """Load ``libcudart.so.12`` from the ``nvidia-cuda-runtime-cu12`` package (if installed) with
    RTLD_GLOBAL, so xformers' extension resolves it without LD_LIBRARY_PATH. Returns its path."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(root) / "lib" / "libcudart.so.12"
        if lib.exists():
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            return str(lib)
    return None


def import_xformers_ops():
    """``xformers.ops``. With flash-attn-4 installed, a ``flash_attn`` package exists that is not
    FlashAttention-2: xformers 0.0.35 would import FA2's interface from it and fail. It is hidden
    from xformers' first import (xformers then uses its own FA2 build), then restored."""
    if "xformers.ops" in sys.modules:
        return sys.modules["xformers.ops"]
    hide = _flash_attn_is_not_fa2()
    missing = object()
    saved = sys.modules.get("flash_attn", missing)
    if hide:
        sys.modules["flash_attn"] = None  # find_spec("flash_attn") -> None while xformers imports
    try:
        import xformers.ops
    finally:
        if hide:
            if saved is missing:
                del sys.modules["flash_attn"]
            else:
                sys.modules["flash_attn"] = saved
    return xformers.ops


def _flash_attn_is_not_fa2() -> bool:
    try:
        return (
            importlib.util.find_spec("flash_attn") is not None
            and importlib.util.find_spec("flash_attn.flash_attn_interface") is None
        )
    except (ImportError, ValueError):
        return False


@functools.cache
def fa4_problem() -> str | None:
    """Why FlashAttention-4 can't run here, or None (installed, importable, Hopper or newer GPU)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return f"FlashAttention-4 needs a Hopper or newer GPU (compute capability 9.0+), this one is {major}.{minor}"
    try:
        spec = importlib.util.find_spec("flash_attn.cute")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "flash-attn-4 is not installed (pip install 'lit_xf[fa4]')"
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:  # broken install
        return f"flash-attn-4 failed to import ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    return None


@functools.cache
def xformers_problem() -> str | None:
    """Why xformers' CUDA attention can't run here, or None if a tiny attention call succeeded."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if (torch.version.cuda or "").split(".")[0] != "12":
        lib = _preload_cudart12()
        if lib is None:
            log.debug("libcudart.so.12 not found; xformers may fail to load its extension")
    os.environ.setdefault("XFORMERS_IGNORE_FLASH_VERSION_CHECK", "1")
    try:
        xops = import_xformers_ops()
    except Exception as e:  # broken install
        return f"xformers failed to import ({type(e).__name__}: {e})"
    try:
        x = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(x, x, x, attn_bias=xops.LowerTriangularMask())
    except Exception as e:
        hint = " (pip install 'lit_xf[gpu]' for its CUDA-12 runtime)" if "build" in str(e).lower() else ""
        return f"xformers can't run its CUDA kernels: {str(e).splitlines()[0][:160]}{hint}"
    return None
