"""Positions: RoPE against complex multiplication, ALiBi slopes against the paper's code, and
that positions restart per document (RoPE tables, ALiBi distances, learned embeddings)."""

from __future__ import annotations

import pytest
import torch
from attention_cases import one_cpu_thread, positions_in_doc, random_qkv  # noqa: F401 -- autouse

from lit_xf.attention import DocLayout, alibi_slopes, make_kernel
from lit_xf.attention.reference import paper_slopes, reference_attention
from lit_xf.model import TinyGPT, rope_rotate


def complex_rope(x_BTHK: torch.Tensor, pos_BT: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate the pairs (x_i, x_{i+K/2}) as complex numbers z_i = x_i + i·x_{i+K/2} by pos·θ_i,
    θ_i = base^(−2i/K)."""
    K = x_BTHK.shape[-1]
    theta = base ** (-torch.arange(K // 2, dtype=torch.float64) * 2 / K)
    z = torch.complex(x_BTHK[..., : K // 2].double(), x_BTHK[..., K // 2 :].double())
    z = z * torch.polar(torch.ones_like(theta), pos_BT[..., None, None].double() * theta)
    return torch.cat((z.real, z.imag), dim=-1)


def rope_tables(pos_BT: torch.Tensor, K: int, base: float = 10000.0):
    """cos/sin ``[B, T, 1, K]`` in ``rope_rotate``'s layout (the K/2 angles repeated twice)."""
    theta = base ** (-torch.arange(0, K, 2, dtype=torch.float64) / K)
    ang = pos_BT[..., None].double() * theta
    ang = torch.cat((ang, ang), dim=-1)[:, :, None, :]
    return ang.cos(), ang.sin()


def test_rope_rotate_matches_complex_multiplication():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 3, 16, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, 500, (2, 11), generator=gen)
    got = rope_rotate(x, *rope_tables(pos, 16))
    torch.testing.assert_close(got, complex_rope(x, pos), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths


def test_rope_scores_depend_only_on_position_difference():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 1, 32, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 32, generator=gen, dtype=torch.float64)

    def score(m: int, n: int) -> float:
        qm = rope_rotate(q, *rope_tables(torch.tensor([[m]]), 32))
        kn = rope_rotate(k, *rope_tables(torch.tensor([[n]]), 32))
        return float((qm * kn).sum())

    for m, n in [(5, 2), (0, 0), (3, 9), (40, 1)]:
        for shift in (1, 17, 1000):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-9)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-6)


def test_packed_tinygpt_restarts_rope_positions_per_document(monkeypatch):
    """The cos/sin tables a packed forward hands to ``rope_rotate`` use positions inside each
    document (padding continues counting)."""
    doc_lens, T_, K = [[3, 1, 9, 4], [16]], 20, 8
    model = TinyGPT(
        vocab_size=32, d_model=32, n_layers=1, n_heads=4, max_seq_len=T_, attention="sdpa", positions="rope"
    ).double()
    seen = []

    def spy(x, cos, sin):
        seen.append((cos, sin))
        return rope_rotate(x, cos, sin)

    monkeypatch.setattr("lit_xf.model.rope_rotate", spy)
    model(torch.randint(0, 32, (2, T_)), doc_lens=doc_lens)
    assert len(seen) == 2  # q and k
    cos, sin = rope_tables(positions_in_doc(doc_lens, T_), K)
    for c, s in seen:
        torch.testing.assert_close(c.double(), cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(s.double(), sin, atol=1e-6, rtol=0)


@pytest.mark.parametrize("n", [1, 8, 32])
def test_alibi_slopes_powers_of_two(n):
    expected = torch.tensor([2.0 ** (-8.0 * h / n) for h in range(1, n + 1)], dtype=torch.float64)
    torch.testing.assert_close(alibi_slopes(n).double(), expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize(
    "n,exponents",
    [
        # 2^(−e) for e in: the slopes of the closest smaller power of two, then every other slope of
        # twice that power.
        (5, [2, 4, 6, 8, 1]),
        (6, [2, 4, 6, 8, 1, 3]),
        (12, [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]),
    ],
)
def test_alibi_slopes_non_powers_of_two(n, exponents):
    expected = torch.tensor([2.0**-e for e in exponents], dtype=torch.float64)
    torch.testing.assert_close(alibi_slopes(n).double(), expected, rtol=1e-7, atol=0)
    torch.testing.assert_close(torch.tensor(paper_slopes(n), dtype=torch.float64), expected)


def test_custom_position_ids_drive_alibi():
    """ALiBi distances come from ``position_ids``: shifting every position by a constant changes
    nothing, while positions that don't restart per document are not what the reference computes
    (so the kernel really reads them)."""
    gen = torch.Generator().manual_seed(5)
    doc_lens = [[10, 14]]
    layout = DocLayout(doc_lens, 24)
    q, k, v = random_qkv(gen, 1, 24, 4, 4, 8, torch.float64)
    kernel = make_kernel("naive")

    def attend(pos):
        ctx = kernel.prepare(layout, pos, alibi_slopes(4), n_heads=4, n_kv_heads=4, dtype=q.dtype, device="cpu")
        return kernel(q, k, v, ctx)

    base = attend(layout.position_ids())
    torch.testing.assert_close(attend(layout.position_ids() + 7), base, atol=1e-12, rtol=0)
    ref = reference_attention(q, k, v, doc_lens, paper_slopes(4))
    torch.testing.assert_close(base, ref, atol=1e-10, rtol=1e-10)
    # A scaled position ramp changes ALiBi distances, hence the output.
    assert not torch.allclose(attend(2 * layout.position_ids()), base, atol=1e-6)


@pytest.mark.parametrize("positions", ["learned", "rope", "alibi"])
def test_positions_that_do_not_restart(positions):
    """Feeding a later document absolute row positions changes it with learned embeddings; RoPE and
    ALiBi only see position differences inside a document, so for them the offset cancels."""
    torch.manual_seed(0)
    model = TinyGPT(
        vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=16, attention="sdpa", positions=positions
    ).double()
    ids = torch.randint(0, 64, (1, 16))
    doc_lens = [[6, 10]]
    with torch.no_grad():
        restart = model(ids, doc_lens=doc_lens)
        absolute = model(ids, position_ids=torch.arange(16)[None], doc_lens=doc_lens)
    torch.testing.assert_close(restart[:, :6], absolute[:, :6])
    if positions == "learned":
        assert not torch.allclose(restart[:, 6:], absolute[:, 6:], atol=1e-6)
    else:
        torch.testing.assert_close(restart[:, 6:], absolute[:, 6:], atol=1e-10, rtol=1e-10)
