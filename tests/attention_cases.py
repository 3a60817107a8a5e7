"""Shared cases and checks of the attention tests (``test_layout``, ``test_attention``, ``test_fa4``):
named layouts, random inputs, and ``run_kernel``, which runs a kernel and the float64 reference
(``lit_xf.attention.reference``) on the same inputs. Masks written here (``block_causal_allowed``)
are independent of ``lit_xf``'s own mask helpers.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from lit_xf.attention import DocLayout, make_kernel
from lit_xf.attention.reference import paper_slopes, reference_attention

T = 48
# Document lengths per row; tokens after a row's documents are padding.
LAYOUTS = {
    "causal": [[T], [T]],  # one document filling each row
    "padded": [[T - 7], [19]],  # one shorter document per row
    "packed": [[1, 12, 1, 20, 5], [7, 1, 30, 1]],  # length-1 documents, trailing padding
    "single": [[T]],  # batch of one, a single document filling the row
    "mixed": [[5, 1, 42], [T]],  # a packed row without padding beside a full single-document row
}
# Non-causal (bidirectional inside each document; padding must stay invisible to real tokens).
BIDIR_LAYOUTS = {"bidir-full": LAYOUTS["causal"], "bidir-padded": LAYOUTS["padded"], "bidir-packed": LAYOUTS["packed"]}


def layout_spec(name: str) -> tuple[list[list[int]], bool]:
    """``(doc_lens, causal)`` of a named layout."""
    return (LAYOUTS[name], True) if name in LAYOUTS else (BIDIR_LAYOUTS[name], False)


KV = {"mqa": lambda h: 1, "gqa": lambda h: 2, "mha": lambda h: h}
CPU_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """These tensors are tiny: intra-op threads only add synchronization (40x slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def real_mask(doc_lens, seq_len, device=None) -> torch.Tensor:
    """``[B, T]`` bool, True at tokens inside a document."""
    mask = torch.zeros(len(doc_lens), seq_len, dtype=torch.bool, device=device)
    for b, row in enumerate(doc_lens):
        mask[b, : sum(row)] = True
    return mask


def positions_in_doc(doc_lens, seq_len) -> torch.Tensor:
    """``[B, T]`` position inside each token's document; padding continues the last document."""
    out = torch.zeros(len(doc_lens), seq_len, dtype=torch.long)
    for b, row in enumerate(doc_lens):
        start = 0
        for n, L in enumerate(row):
            end = seq_len if n == len(row) - 1 else start + L
            out[b, start:end] = torch.arange(end - start)
            start += L
    return out


def block_causal_allowed(doc_lens, seq_len, causal: bool = True) -> torch.Tensor:
    """``[B·T, B·T]`` bool over the flattened rows: key j visible to query i iff both lie in the same
    block (a document, or a row's trailing padding as one block) and (if causal) j ≤ i."""
    block_of, n_blocks = [], 0
    for row in doc_lens:
        for L in list(row) + ([seq_len - sum(row)] if sum(row) < seq_len else []):
            block_of += [n_blocks] * L
            n_blocks += 1
    block = torch.tensor(block_of)
    pos = torch.arange(len(block_of))
    same = block[:, None] == block[None, :]
    return same & (pos[None, :] <= pos[:, None]) if causal else same


def case_generator(request) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def random_qkv(gen, B, T_, H, G, K, dtype, device="cpu"):
    shapes = ((B, T_, H, K), (B, T_, G, K), (B, T_, G, K))
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype) for s in shapes]


def run_kernel(name, doc_lens, q, k, v, slopes, *, grad: bool, causal: bool = True, stacked: bool = False, window=None):
    """Kernel output and (if ``grad``) the gradients of Σ out·dout over real tokens; and the same for
    the float64 reference on the same (rounded) inputs. ``stacked``: q, k, v go in as one
    ``[B, T, H + 2G, K]`` stack (``attend_qkv``, the model's call), its gradient split for the check."""
    B, T_, H, _ = q.shape
    G = k.shape[2]
    layout = DocLayout(doc_lens, T_, causal, window)
    real = real_mask(doc_lens, T_, q.device)[:, :, None, None]
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * real.cpu()

    kernel = make_kernel(name)  # a kernel name, or an fa4 plan ("fa4:grouped")
    leaves = [x.detach().requires_grad_(grad) for x in (q, k, v)]
    qkv = torch.cat((q, k, v), dim=2).detach().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        ctx = kernel.prepare(
            layout, layout.position_ids(q.device), slopes, n_heads=H, n_kv_heads=G, dtype=q.dtype, device=q.device
        )
        out = ctx.kernel.attend_qkv(qkv, G, ctx) if stacked else kernel(*leaves, ctx)
        if grad:
            (out * dout.to(q.device, q.dtype)).sum().backward()
    if stacked and grad:
        for leaf, g in zip(leaves, qkv.grad.split((H, G, G), dim=2), strict=True):
            leaf.grad = g

    ref_leaves = [x.detach().cpu().double().requires_grad_(grad) for x in (q, k, v)]
    ref_slopes = paper_slopes(H) if slopes is not None else None
    with torch.set_grad_enabled(grad):
        ref = reference_attention(*ref_leaves, doc_lens, ref_slopes, causal, window)
        if grad:
            (ref * dout).sum().backward()
    got = [out.detach()] + ([x.grad for x in leaves] if grad else [])
    want = [ref.detach()] + ([x.grad for x in ref_leaves] if grad else [])
    return got, want, real.cpu()


def assert_matches(got, want, real, tol):
    out, ref = got[0].cpu().double(), want[0]
    assert torch.isfinite(got[0]).all(), "non-finite output (padding included)"
    mask = real.expand_as(ref)
    torch.testing.assert_close(out[mask], ref[mask], atol=tol, rtol=tol, msg=lambda m: f"output: {m}")
    for name, g, r in zip("qkv"[: len(got) - 1], got[1:], want[1:], strict=True):
        assert g is not None, f"no gradient for {name}"
        torch.testing.assert_close(g.cpu().double(), r, atol=tol, rtol=tol, msg=lambda m, n=name: f"d{n}: {m}")


GPU_REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
GPU_K = 64  # head dim of the GPU cases


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float64; NaN/inf anywhere gives inf."""
    got = got.double().cpu()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def windowed_allowed(doc_lens, seq_len, window) -> torch.Tensor:
    """``[B·T, B·T]``: ``block_causal_allowed`` and i − j < window."""
    i = torch.arange(len(doc_lens) * seq_len)
    return block_causal_allowed(doc_lens, seq_len) & (i[:, None] - i[None, :] < window)
