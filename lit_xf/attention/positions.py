"""Position schemes and ALiBi: head slopes and the additive bias −m_h·|pos_i − pos_j|."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

PositionScheme = Literal["learned", "rope", "alibi", "none"]
POSITION_SCHEMES: tuple[str, ...] = get_args(PositionScheme)


def alibi_slopes(n_heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): for n a power of two, m_h = 2^(−8h/n), h = 1..n.
    Otherwise the n' = 2^⌊log2 n⌋ slopes, then every other slope of the 2n' sequence. Computed in
    float64 and rounded once to ``dtype``."""

    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    base = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(base) + powers(2 * base)[0::2][: n_heads - base]
    return torch.tensor(slopes, dtype=torch.float64).to(dtype)


def alibi_bias(position_ids_BT: torch.Tensor, slopes_H: torch.Tensor, dtype) -> torch.Tensor:
    """``[B, H, T, T]`` additive bias −m_h·|pos_i − pos_j| (symmetric, so non-causal attention is
    penalized by distance both ways), computed in float32 (float64 for float64) and rounded once to
    ``dtype`` — in bf16 that rounding grows with distance; flex keeps the bias in float32."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    dist = (position_ids_BT[:, None, :, None] - position_ids_BT[:, None, None, :]).abs().to(compute)
    return (-slopes_H.to(dist.device, compute)[None, :, None, None] * dist).to(dtype)
