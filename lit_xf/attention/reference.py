"""The float64 reference attention the tests and the correctness benchmark compare kernels with.

Written from the definition, one document at a time, independently of lit_xf's masks
(``DocLayout``) and slopes: for query i and key j of one document (offsets inside it) and query
head h reading kv head g = h // (H / G),

    out_i = Σ_j softmax_j( q_i·k_j / √K − m_h·(i − j) ) v_j   over j ≤ i (all j if not causal),
    and i − j < W with a sliding window of W tokens,

m_h the ALiBi slopes (0 without). Padding outputs are zero. The ALiBi term uses the signed i − j:
it equals the kernels' −m_h·|pos_i − pos_j| on causal pairs only, so compare non-causal layouts
without ALiBi.
"""

from __future__ import annotations

import math

import torch


def paper_slopes(n: int) -> list[float]:
    """ALiBi slopes as built in Press et al.'s code: 2^(−8h/n) for n a power of two; otherwise the
    slopes of the closest smaller power of two p, then the odd-indexed slopes of 2p, 2^(−4(2i+1)/p)."""
    p = 1 << (n.bit_length() - 1)
    first = [2.0 ** (-8.0 * h / p) for h in range(1, p + 1)]
    extra = [2.0 ** (-4.0 * (2 * i + 1) / p) for i in range(n - p)]
    return first + extra


def reference_attention(
    q_BTHK, k_BTGK, v_BTGK, doc_lens, slopes=None, causal: bool = True, window: int | None = None
) -> torch.Tensor:
    """float64 attention ``[B, T, H, K]`` of rows holding documents ``doc_lens`` (see the module
    docstring); ``slopes``: H ALiBi slopes (a list or tensor) or None; keys i − j < ``window`` only
    when given. Zero at padding. Differentiable (for reference gradients)."""
    q, k, v = (x.double() for x in (q_BTHK, k_BTGK, v_BTGK))
    B, T, H, K = q.shape
    G = k.shape[2]
    kv_of_head = torch.arange(H, device=q.device) // (H // G)
    m_H = torch.zeros(H, dtype=torch.float64, device=q.device)
    if slopes is not None:
        m_H = torch.as_tensor(slopes, dtype=torch.float64).to(q.device)
    rows = []
    for b, row in enumerate(doc_lens):
        pieces, start = [], 0
        for L in row:
            idx = torch.arange(L, device=q.device)
            dist_LL = (idx[:, None] - idx[None, :]).double()  # i − j inside the document
            doc = slice(start, start + L)
            q_LHK, k_LHK, v_LHK = q[b, doc], k[b, doc][:, kv_of_head], v[b, doc][:, kv_of_head]
            scores_HLL = torch.einsum("ihk,jhk->hij", q_LHK, k_LHK) / math.sqrt(K) - m_H[:, None, None] * dist_LL
            if causal:
                scores_HLL = scores_HLL.masked_fill(idx[None, :] > idx[:, None], float("-inf"))
            if window is not None:
                scores_HLL = scores_HLL.masked_fill(dist_LL >= window, float("-inf"))
            pieces.append(torch.einsum("hij,jhk->ihk", scores_HLL.softmax(-1), v_LHK))
            start += L
        pieces.append(q.new_zeros(T - start, H, K))
        rows.append(torch.cat(pieces))
    return torch.stack(rows)
