"""What a device can do: the matmul dtype of a Lightning precision and the peak FLOP/s of a device.

MFU = achieved FLOP/s / peak FLOP/s of one device at the run's matmul dtype. Lightning's
``get_available_flops`` lists H200 SXM and H100 NVL at their 2:4-sparse figures and does not parse a
plain ``"NVIDIA H200"``, so Hopper's dense peaks are looked up here first. This module depends on
torch and Lightning's fabric only: the model, the module and the benchmarks import it.
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.throughput import get_available_flops

__all__ = ["dense_peak_flops", "precision_dtype", "resolve_peak_flops"]

# Dense (not 2:4 sparse) peaks per GPU from NVIDIA's datasheets, FLOP/s. Keys: bf16/fp16, tf32
# (fp32 matmuls with TF32 allowed), fp32, fp64.
_HOPPER_DENSE = {
    "sxm": {"bf16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12, "fp64": 33.5e12},
    "nvl": {"bf16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12, "fp64": 30.0e12},
    "pcie": {"bf16": 756.0e12, "tf32": 378.0e12, "fp32": 51.2e12, "fp64": 25.6e12},
}


def precision_dtype(precision: str | int) -> torch.dtype:
    """The matmul dtype of a Lightning precision string (``"bf16-mixed"``, ``"16-true"``, ...)."""
    p = str(precision)
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    if p.startswith("64"):
        return torch.float64
    return torch.float32


def _dtype_key(dtype: torch.dtype, tf32: bool) -> str | None:
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    if dtype == torch.float32:
        return "tf32" if tf32 else "fp32"
    if dtype == torch.float64:
        return "fp64"
    return None


def dense_peak_flops(device_name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Dense peak FLOP/s of a Hopper GPU (H100/H200 SXM, NVL, PCIe) by its CUDA name, else ``None``.

    ``"NVIDIA H200"``/``"NVIDIA H100 80GB HBM3"`` with bf16 or fp16 -> 989.4e12.
    """
    chip = device_name.lower()
    if "h100" not in chip and "h200" not in chip:
        return None
    if "nvl" in chip:
        form = "nvl"
    elif "pcie" in chip or "hbm2e" in chip:
        form = "pcie"
    else:
        form = "sxm"
    key = _dtype_key(dtype, tf32)
    return _HOPPER_DENSE[form].get(key) if key else None


def resolve_peak_flops(device: torch.device, precision: str | int, override: float | None = None) -> float | None:
    """Peak FLOP/s of ``device`` at ``precision``: ``override``, the dense Hopper table, Lightning's table.

    ``None`` on CPU or for unknown GPUs (then MFU is not logged).
    """
    if override is not None:
        return float(override)
    if device.type == "cpu":
        return None
    dtype = precision_dtype(precision)
    if device.type == "cuda":
        tf32 = torch.get_float32_matmul_precision() != "highest"
        found = dense_peak_flops(torch.cuda.get_device_name(device), dtype, tf32=tf32)
        if found is not None:
            return found
    try:
        found = get_available_flops(device, dtype)
    except Exception:  # e.g. an accelerator Lightning's table cannot query
        return None
    return float(found) if found else None
