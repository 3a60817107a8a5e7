"""Peak FLOP/s lookup and precision dtypes (``lit_xf.hardware``)."""

import pytest
import torch

from lit_xf.hardware import dense_peak_flops, precision_dtype, resolve_peak_flops


def test_peak_flops_lookup():
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA GH200 480GB"):
        for dtype in (torch.bfloat16, torch.float16):
            assert dense_peak_flops(name, dtype) == pytest.approx(989e12, rel=1e-3), name
    assert dense_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == pytest.approx(756e12)
    assert dense_peak_flops("NVIDIA H200 NVL", torch.bfloat16) == pytest.approx(835.5e12)
    assert dense_peak_flops("NVIDIA H100 80GB HBM3", torch.float32, tf32=True) == pytest.approx(494.7e12)
    assert dense_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) is None  # left to Lightning's table
    cpu = torch.device("cpu")
    assert resolve_peak_flops(cpu, "bf16-mixed") is None
    assert resolve_peak_flops(cpu, "32-true", override=2e12) == 2e12


def test_precision_dtype():
    expected = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "64-true": torch.float64, 32: torch.float32}
    assert {p: precision_dtype(p) for p in expected} == expected
