"""Attention kernels, masks and positions checked against references written independently of
``lit_xf``'s own mask helpers: the float64 ``lit_xf.attention.reference.reference_attention`` (one
document at a time; for query i and key j of one document and query head h,

    out_i = Σ_{j ≤ i} softmax_j( q_i·k_j / √K − m_h·(i − j) ) v_j,   kv head = h // (H / G),

m_h = 0 without ALiBi; non-causal layouts drop j ≤ i and keep attention inside the document) and the
masks of ``attention_cases``. Padding positions are left out (their outputs are zero in the
reference and never compared; losses only cover real tokens). The layout's own rules are in
``test_layout.py``, FlashAttention-4's plans and ops in ``test_fa4.py``, ``auto``'s choice in
``test_auto.py``, RoPE and ALiBi in ``test_positions.py``.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest
import torch
from attention_cases import (
    BIDIR_LAYOUTS,
    CPU_TOL,
    GPU_K,
    GPU_REL_TOL,
    KV,
    LAYOUTS,
    T,
    assert_matches,
    block_causal_allowed,
    case_generator,
    layout_spec,
    one_cpu_thread,  # noqa: F401 -- autouse
    positions_in_doc,
    random_qkv,
    real_mask,
    relative_error,
    run_kernel,
)

import lit_xf.attention.xformers as xformers_kernel
from lit_xf import attention as attn
from lit_xf.attention import (
    XFORMERS_DENSE_BIAS_BUDGET_BYTES,
    DocLayout,
    XformersAttention,
    alibi_slopes,
    dense_bias_bytes,
    make_kernel,
    probes,
)
from lit_xf.attention.reference import paper_slopes, reference_attention
from lit_xf.model import TinyGPT

HEADS_POSITIONS = [(4, "none"), (4, "alibi"), (6, "alibi")]  # 6: a non-power-of-two head count


# --------------------------------------------------------------------------------------------
# The reference itself
# --------------------------------------------------------------------------------------------
def test_reference_by_hand():
    """Length-1 documents return their value vector; a 2-token document matches scalar arithmetic."""
    gen = torch.Generator().manual_seed(0)
    H, G, K = 4, 2, 3
    q, k, v = random_qkv(gen, 1, 4, H, G, K, torch.float64)
    slopes = [0.5, 0.25, 0.125, 0.0625]
    out = reference_attention(q, k, v, [[1, 2, 1]], slopes)
    for h in range(H):
        g = h // 2
        torch.testing.assert_close(out[0, 0, h], v[0, 0, g])
        torch.testing.assert_close(out[0, 3, h], v[0, 3, g])
        torch.testing.assert_close(out[0, 1, h], v[0, 1, g])  # first token of the second document
        s0 = float(q[0, 2, h] @ k[0, 1, g]) / math.sqrt(K) - slopes[h] * 1
        s1 = float(q[0, 2, h] @ k[0, 2, g]) / math.sqrt(K)
        w0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
        torch.testing.assert_close(out[0, 2, h], w0 * v[0, 1, g] + (1 - w0) * v[0, 2, g])
    # Non-causal: the first token of a document sees the later one too.
    bidir = reference_attention(q, k, v, [[1, 2, 1]], causal=False)
    for h in range(H):
        g = h // 2
        s0 = float(q[0, 1, h] @ k[0, 1, g]) / math.sqrt(K)
        s1 = float(q[0, 1, h] @ k[0, 2, g]) / math.sqrt(K)
        w0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
        torch.testing.assert_close(bidir[0, 1, h], w0 * v[0, 1, g] + (1 - w0) * v[0, 2, g])
        torch.testing.assert_close(bidir[0, 3, h], v[0, 3, g])


# --------------------------------------------------------------------------------------------
# Kernels vs the reference (CPU)
# --------------------------------------------------------------------------------------------
# (layout, kv heads, (heads, positions)). Non-causal layouts run without ALiBi: the kernels' bias
# −m·(pos_i − pos_j) turns into a reward growing with distance for future keys, not a bidirectional
# ALiBi worth pinning down in a test. "single" (a batch of one full row) runs the same code as "causal".
CPU_CASES = [(layout, kv, hp) for layout in LAYOUTS if layout != "single" for kv in KV for hp in HEADS_POSITIONS] + [
    (layout, kv, (4, "none")) for layout in BIDIR_LAYOUTS for kv in KV
]
CASE_IDS = [f"{lay}-{kv}-{p}{h}" for lay, kv, (h, p) in CPU_CASES]


# naive computes the same way in every dtype: float64 only; sdpa dispatches per dtype.
@pytest.mark.parametrize(
    "kernel_name,dtype",
    [("naive", torch.float64), ("sdpa", torch.float64), ("sdpa", torch.float32)],
    ids=["naive-f64", "sdpa-f64", "sdpa-f32"],
)
@pytest.mark.parametrize("layout_name,kv,heads_positions", CPU_CASES, ids=CASE_IDS)
def test_kernel_matches_reference(request, kernel_name, layout_name, kv, heads_positions, dtype):
    doc_lens, causal = layout_spec(layout_name)
    H, positions = heads_positions
    q, k, v = random_qkv(case_generator(request), len(doc_lens), T, H, KV[kv](H), 8, dtype)
    slopes = alibi_slopes(H) if positions == "alibi" else None
    got, want, real = run_kernel(kernel_name, doc_lens, q, k, v, slopes, grad=True, causal=causal)
    assert_matches(got, want, real, CPU_TOL[dtype])


# Eager FlexAttention on CPU traces every new shape / score_mod / mask (~0.3 s each): float32 on a few.
FLEX_CASES = [(*case, torch.float64) for case in CPU_CASES] + [
    ("packed", kv, hp, torch.float32) for kv, hp in [("mqa", (4, "none")), ("gqa", (6, "alibi")), ("mha", (4, "alibi"))]
]


@pytest.mark.parametrize(
    "layout_name,kv,heads_positions,dtype",
    FLEX_CASES,
    ids=[f"{lay}-{kv}-{p}{h}-{str(dt)[6:]}" for lay, kv, (h, p), dt in FLEX_CASES],
)
def test_flex_forward_matches_reference(request, layout_name, kv, heads_positions, dtype):
    """FlexAttention has no backward on CPU: forward only, eager."""
    doc_lens, causal = layout_spec(layout_name)
    H, positions = heads_positions
    q, k, v = random_qkv(case_generator(request), len(doc_lens), T, H, KV[kv](H), 8, dtype)
    slopes = alibi_slopes(H) if positions == "alibi" else None
    got, want, real = run_kernel("flex", doc_lens, q, k, v, slopes, grad=False, causal=causal)
    assert_matches(got, want, real, CPU_TOL[dtype])


# --------------------------------------------------------------------------------------------
# xformers' dense ALiBi bias
# --------------------------------------------------------------------------------------------
def test_xformers_alibi_bias_is_aligned_and_correct():
    """The dense ALiBi bias xformers gets: ``[B, H, T, T]`` with stride(−2) a multiple of 8 (T = 13
    isn't), −m_h·(i − j) inside each document, −inf elsewhere."""
    doc_lens, T_, H = [[5, 1, 4], [13]], 13, 3
    layout = DocLayout(doc_lens, T_)
    ctx = XformersAttention().prepare(
        layout, layout.position_ids(), alibi_slopes(H), n_heads=H, n_kv_heads=H, dtype=torch.float32, device="cpu"
    )
    bias = ctx.plan.bias
    assert bias.shape == (2, H, T_, T_)
    assert bias.stride(-2) % 8 == 0
    slopes = paper_slopes(H)
    real = real_mask(doc_lens, T_)
    allowed = block_causal_allowed(doc_lens, T_)
    for b in range(2):
        rows = slice(b * T_, (b + 1) * T_)
        pos = positions_in_doc(doc_lens, T_)[b].double()
        for h in range(H):
            want = (-slopes[h] * (pos[:, None] - pos[None, :])).masked_fill(~allowed[rows, rows], float("-inf"))
            torch.testing.assert_close(bias[b, h][real[b]].double(), want[real[b]])
            assert torch.isfinite(bias[b, h]).any(dim=-1).all()  # no query row is fully masked


# --------------------------------------------------------------------------------------------
# No leakage across documents: a packed forward equals each document alone
# --------------------------------------------------------------------------------------------
LEAK_LAYOUTS = {"packed": [[1, 9, 14, 1, 6], [20, 3]], "padded": [[31], [12]]}
LEAK_CASES = [
    (kernel, layout, positions)
    for kernel in ("naive", "sdpa")
    for layout in LEAK_LAYOUTS
    for positions in ("learned", "rope", "alibi", "none")
] + [
    ("auto", "packed", "alibi"),
    ("flex", "packed", "rope"),
    ("flex", "packed", "alibi"),
]  # eager flex traces each new length


@pytest.mark.parametrize("kernel_name,layout_name,positions", LEAK_CASES, ids=["-".join(c) for c in LEAK_CASES])
def test_packed_forward_equals_documents_alone(kernel_name, layout_name, positions):
    T_, layout = 32, LEAK_LAYOUTS[layout_name]
    torch.manual_seed(0)
    model = (
        TinyGPT(
            vocab_size=64,
            d_model=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            max_seq_len=T_,
            attention=kernel_name,
            positions=positions,
        )
        .double()
        .eval()
    )
    ids = torch.randint(0, 64, (len(layout), T_))
    with torch.no_grad():
        packed = model(ids, doc_lens=layout)
        assert torch.isfinite(packed).all()
        for b, row in enumerate(layout):
            start = 0
            for L in row:
                alone = model(ids[b : b + 1, start : start + L])
                torch.testing.assert_close(packed[b, start : start + L], alone[0], atol=1e-10, rtol=1e-10)
                start += L


def test_packed_forward_float32_sdpa_with_grad():
    """The training path (grad on, float32, MQA, ALiBi) keeps documents apart too: a document's
    logits match it run alone, and its loss has no gradient on other documents' embeddings."""
    torch.manual_seed(0)
    model = TinyGPT(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        max_seq_len=24,
        attention="sdpa",
        positions="alibi",
    )
    ids = torch.randint(0, 64, (1, 24))
    emb = {}

    def keep(module, inputs, out):
        out.retain_grad()
        emb["x"] = out

    hook = model.tok_emb.register_forward_hook(keep)
    logits = model(ids, doc_lens=[[8, 10]])
    hook.remove()
    logits[:, 8:18].sum().backward()
    grad = emb["x"].grad
    assert (grad[:, :8] == 0).all() and (grad[:, 18:] == 0).all()
    assert grad[:, 8:18].abs().sum() > 0
    torch.testing.assert_close(logits[:, 8:18], model(ids[:, 8:18]), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Configuration-time errors
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_xformers_on_cpu_is_refused_at_construction():
    with pytest.raises(ValueError, match="xformers") as err:
        TinyGPT(attention="xformers")
    msg = str(err.value)
    assert "CUDA" in msg
    assert "Kernels that can: naive, sdpa, flex" in msg


def test_flex_training_on_cpu_is_refused():
    flex = make_kernel("flex")
    with pytest.raises(ValueError, match="flex") as err:
        flex.check(device="cpu", n_heads=8, n_kv_heads=8, alibi=False, training=True)
    assert "no backward on CPU" in str(err.value)
    assert "naive, sdpa" in str(err.value)
    flex.check(device="cpu", n_heads=8, n_kv_heads=8, alibi=False, training=False)  # inference is fine


def test_flex_backward_on_cpu_really_raises():
    """The refusal above mirrors torch: if this starts passing, the support table can be relaxed."""
    layout = DocLayout([[6]], 6)
    q = torch.randn(1, 6, 2, 8, requires_grad=True)
    flex = make_kernel("flex")
    ctx = flex.prepare(layout, layout.position_ids(), None, n_heads=2, n_kv_heads=2, dtype=q.dtype, device="cpu")
    with pytest.raises(NotImplementedError):
        flex(q, q, q, ctx).sum().backward()


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(d_model=30, n_heads=8), r"n_heads=8 must divide d_model=30 \(e.g. n_heads=6\)"),
        (dict(n_heads=8, n_kv_heads=3), r"n_kv_heads=3 must divide n_heads=8 \(divisors: \[1, 2, 4, 8\]\)"),
        (dict(attention="fast"), r"unknown attention kernel 'fast'; choose one of auto, naive, sdpa, xformers, flex"),
        (dict(positions="sinusoidal"), r"unknown positions 'sinusoidal'; choose one of learned, rope, alibi, none"),
        (dict(ffn="relu"), r"unknown ffn 'relu'; choose one of swiglu, gelu"),
        (dict(norm="batchnorm"), r"unknown norm 'batchnorm'; choose one of layernorm, rmsnorm"),
        (dict(d_model=24, n_heads=8, positions="rope"), r"RoPE needs an even head dim"),
        (dict(n_layers=0), r"n_layers must be a positive integer"),
    ],
)
def test_bad_model_config_raises(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        TinyGPT(**{"attention": "sdpa", **kwargs})


def test_unknown_kernel_name():
    with pytest.raises(ValueError, match="unknown attention kernel 'fast'; choose one of auto, naive"):
        make_kernel("fast")


def test_dense_bias_bytes_counts_the_8_aligned_buffer():
    assert dense_bias_bytes(1, 8, 16) == 8 * 16 * 16 * 2
    assert dense_bias_bytes(1, 8, 10) == 8 * 10 * 16 * 2  # last dim padded 10 -> 16
    assert dense_bias_bytes(3, 2, 17, itemsize=4) == 3 * 2 * 17 * 24 * 4


def test_xformers_alibi_budget_refused_in_support(monkeypatch):
    """``support`` first needs CUDA and a working xformers; pretend both to reach the budget rule."""
    assert "CUDA" in XformersAttention().support(
        device="cpu", n_heads=8, n_kv_heads=8, alibi=True, training=True, seq_len=128
    )
    monkeypatch.setattr(probes, "xformers_problem", lambda: None)
    xf = XformersAttention()
    config = dict(device="cuda", n_heads=16, n_kv_heads=16, alibi=True, training=True)
    assert xf.support(**config, seq_len=4096) is None  # 16·4096·4096·2 B = 512 MiB
    reason = xf.support(**config, seq_len=16384)  # 8 GiB
    assert reason is not None and "ALiBi" in reason and "8.0 GiB" in reason
    assert xf.support(**{**config, "alibi": False}, seq_len=16384) is None
    # The largest seq_len within budget for one row and 16 heads (T multiple of 8: 16·T²·2 ≤ budget).
    t_max = int(math.isqrt(XFORMERS_DENSE_BIAS_BUDGET_BYTES // (16 * 2))) // 8 * 8
    assert xf.support(**config, seq_len=t_max) is None
    assert xf.support(**config, seq_len=t_max + 8) is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_xformers_alibi_budget_refused_per_batch(monkeypatch, dtype):
    """``prepare`` refuses a batch whose dense bias (in the batch's dtype) exceeds the budget, naming
    flex as the way out; it builds the bias when it fits."""
    B, H, T_ = 2, 4, 13
    layout = DocLayout([[13], [6, 7]], T_)
    need = dense_bias_bytes(B, H, T_, itemsize=torch.finfo(dtype).bits // 8)

    def prepare():
        return XformersAttention().prepare(
            layout, layout.position_ids(), alibi_slopes(H), n_heads=H, n_kv_heads=H, dtype=dtype, device="cpu"
        )

    monkeypatch.setattr(xformers_kernel, "XFORMERS_DENSE_BIAS_BUDGET_BYTES", need - 1)
    with pytest.raises(ValueError, match="attention='flex'"):
        prepare()
    monkeypatch.setattr(xformers_kernel, "XFORMERS_DENSE_BIAS_BUDGET_BYTES", need)
    bias = prepare().plan.bias
    assert bias.dtype == dtype and bias.shape == (B, H, T_, T_)
    assert bias.untyped_storage().nbytes() == need


def test_xformers_imports_beside_a_flash_attn_4_package(tmp_path):
    """flash-attn-4 installs a ``flash_attn`` package without FA2's interface; xformers 0.0.35 would
    import FA2 from it and fail. lit_xf hides it during xformers' import and restores it after."""
    fake = tmp_path / "flash_attn" / "cute"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("MARK = 'fa4'\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import lit_xf.attention.probes as a\n"
        "assert a._flash_attn_is_not_fa2()\n"
        "import flash_attn.cute\n"  # imported before xformers, as a user might
        "ops = a.import_xformers_ops()\n"
        "assert hasattr(ops, 'memory_efficient_attention')\n"
        "import flash_attn.cute as c; assert c.MARK == 'fa4' and sys.modules['flash_attn'] is not None\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize(
    "H,G,T_,want",
    [
        (4, 1, 48, 2),
        (8, 2, 48, 4),
        (16, 2, 100, 8),
        (3, 1, 48, 3),
        (12, 4, 48, 12),
        (4, 2, 48, None),
        (8, 1, 256, None),
        (8, 8, 48, None),
    ],
)
def test_flex_trainable_kv_heads_rule(H, G, T_, want):
    assert attn.flex_trainable_kv_heads(H, G, T_) == want


@pytest.mark.parametrize("H,G", [(4, 1), (8, 2), (12, 4)])
def test_repeating_kv_to_trainable_heads_keeps_gqa_semantics(request, H, G):
    """What flex does for groups > 2 (repeat K/V to fewer query heads per kv head) gives the same
    output and q/k/v gradients as the original grouping (checked with sdpa in float64)."""
    q, k, v = random_qkv(case_generator(request), 2, T, H, G, 8, torch.float64)
    target = attn.flex_trainable_kv_heads(H, G, T)
    got = run_kernel("sdpa", LAYOUTS["padded"], q, k, v, None, grad=True)[0]
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    layout = DocLayout(LAYOUTS["padded"], T)
    kernel = make_kernel("sdpa")
    ctx = kernel.prepare(
        layout, layout.position_ids("cpu"), None, n_heads=H, n_kv_heads=target, dtype=torch.float64, device="cpu"
    )
    out = kernel(leaves[0], attn.repeat_kv(leaves[1], target), attn.repeat_kv(leaves[2], target), ctx)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    real = real_mask(LAYOUTS["padded"], T, "cpu")[:, :, None, None]
    (out * dout * real).sum().backward()
    assert torch.allclose(out * real, got[0] * real, atol=1e-12)
    for leaf, g in zip(leaves, got[1:], strict=True):
        assert torch.allclose(leaf.grad, g, atol=1e-12)


# --------------------------------------------------------------------------------------------
# GPU: every kernel in half precision against the float64 reference
# --------------------------------------------------------------------------------------------
# Flex compiles one kernel per shape / dtype / score_mod / mask kind: keep its cases few (B = 2, one T).
GPU_CASES = [(kernel, *case) for kernel in ("naive", "sdpa", "xformers") for case in CPU_CASES] + [
    ("flex", "padded", "mqa", (4, "alibi")),
    ("flex", "padded", "mha", (4, "none")),
    ("flex", "packed", "mha", (4, "none")),
    ("flex", "packed", "gqa", (4, "alibi")),
    ("flex", "padded", "gqa", (8, "alibi")),  # 4 query heads per kv head: K/V repeated to train (T % 128)
    ("fa4", "causal", "gqa", (4, "none")),
    ("fa4", "padded", "mqa", (4, "none")),
    ("fa4", "packed", "mha", (4, "none")),
    ("fa4", "packed", "gqa", (4, "none")),
    ("flex", "bidir-packed", "gqa", (4, "none")),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestGpuKernelsAgainstReference:
    @pytest.fixture(autouse=True)
    def _room_for_flex_recompiles(self):
        import torch._dynamo.config as dynamo_config

        # Hitting the recompile limit would silently fall back to eager flex and test the wrong thing.
        with dynamo_config.patch(recompile_limit=64):
            yield

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    @pytest.mark.parametrize(
        "kernel_name,layout_name,kv,heads_positions",
        GPU_CASES,
        ids=[f"{k}-{lay}-{kv}-{p}{h}" for k, lay, kv, (h, p) in GPU_CASES],
    )
    def test_forward_and_backward(self, request, kernel_name, layout_name, kv, heads_positions, dtype):
        if kernel_name == "xformers" and (problem := attn.xformers_problem()):
            pytest.skip(problem)
        if kernel_name == "fa4" and (problem := attn.fa4_problem()):
            pytest.skip(problem)
        H, positions = heads_positions
        doc_lens, causal = layout_spec(layout_name)
        q, k, v = random_qkv(case_generator(request), len(doc_lens), T, H, KV[kv](H), GPU_K, dtype, device="cuda")
        slopes = alibi_slopes(H).cuda() if positions == "alibi" else None
        got, want, real = run_kernel(kernel_name, doc_lens, q, k, v, slopes, grad=True, causal=causal)
        tol = GPU_REL_TOL[dtype]
        mask = real.expand_as(want[0])
        errors = {"out": relative_error(got[0].cpu()[mask], want[0][mask])}
        for name, g, r in zip("qkv", got[1:], want[1:], strict=True):
            errors[f"d{name}"] = relative_error(g, r) if g is not None else math.inf
        bad = {n: e for n, e in errors.items() if not e < tol}
        assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


def test_sdpa_warns_once_about_dense_masks_on_cuda(caplog, monkeypatch):
    monkeypatch.setattr(attn.SdpaAttention, "_warned_dense", False)
    with caplog.at_level("WARNING", logger="lit_xf.attention"):
        attn.SdpaAttention.warn_dense("cpu")  # CPU: sdpa is what auto picks there; no warning
        assert not caplog.records
        attn.SdpaAttention.warn_dense(torch.device("cuda"))
        attn.SdpaAttention.warn_dense(torch.device("cuda", 0))
    assert len(caplog.records) == 1 and "auto" in caplog.records[0].getMessage()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel_name", ["fa4", "xformers", "sdpa"])
def test_gpu_compiled_blocks_reuse_graphs_across_packed_batches(kernel_name):
    """Compiled blocks on CUDA, bf16: packed batches with new document layouts (and new
    ``cu_seqlens`` buckets for fa4) compile nothing after the second batch and match eager."""
    if kernel_name == "xformers" and (problem := attn.xformers_problem()):
        pytest.skip(problem)
    if kernel_name == "fa4" and (problem := attn.fa4_problem()):
        pytest.skip(problem)
    torch._dynamo.reset()
    torch.manual_seed(0)
    kw = dict(vocab_size=64, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256, attention=kernel_name)
    eager, compiled = TinyGPT(**kw).cuda(), TinyGPT(**kw).cuda()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_model("blocks")
    gen = torch.Generator().manual_seed(1)
    graphs = []
    for i in range(6):
        rows = []
        for _ in range(2):
            cuts = sorted(torch.randperm(255, generator=gen)[: 3 + 4 * i].add(1).tolist())
            rows.append([b - a for a, b in zip([0, *cuts], [*cuts, 256], strict=True)])
        ids = torch.randint(0, 64, (2, 256), generator=gen).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want, got = eager(ids, doc_lens=rows), compiled(ids, doc_lens=rows)
        got.float().square().mean().backward()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        assert relative_error(got.float(), want.double().cpu()) < 2e-2, i
    assert graphs[2:] == [graphs[1]] * 4, f"graphs compiled after each batch: {graphs}"


# --------------------------------------------------------------------------------------------
# Sliding-window attention
# --------------------------------------------------------------------------------------------
WINDOW_LAYOUTS = ["causal", "padded", "packed", "mixed"]
WINDOWS = [1, 5, 16]  # 1: each token sees only itself; 16: shorter than some documents, longer than others


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout_name", WINDOW_LAYOUTS)
@pytest.mark.parametrize("kv,heads_positions", [("mha", (4, "none")), ("gqa", (4, "alibi"))])
@pytest.mark.parametrize("kernel_name", ["naive", "sdpa"])
def test_window_kernels_match_reference(request, kernel_name, kv, heads_positions, layout_name, window):
    """Forward and q/k/v gradients in float64 against per-document attention over the window."""
    H, positions = heads_positions
    doc_lens, _ = layout_spec(layout_name)
    q, k, v = random_qkv(case_generator(request), len(doc_lens), T, H, KV[kv](H), 8, torch.float64)
    slopes = alibi_slopes(H) if positions == "alibi" else None
    got, want, real = run_kernel(kernel_name, doc_lens, q, k, v, slopes, grad=True, window=window)
    assert_matches(got, want, real, CPU_TOL[torch.float64])


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("layout_name", WINDOW_LAYOUTS)
def test_window_flex_forward_matches_reference(request, layout_name, window):
    doc_lens, _ = layout_spec(layout_name)
    q, k, v = random_qkv(case_generator(request), len(doc_lens), T, 4, 2, 8, torch.float64)
    got, want, real = run_kernel("flex", doc_lens, q, k, v, alibi_slopes(4), grad=False, window=window)
    assert_matches(got, want, real, CPU_TOL[torch.float64])


def test_window_that_hides_nothing_keeps_the_fast_paths():
    """A window as long as every document changes no mask: sdpa keeps ``is_causal``, fa4 its
    grouped plans and no window argument."""
    short = DocLayout([[30] * 4 + [8], [32] * 4], 128, window=64)
    assert not short.windowed and attn.fa4_varlen(short, "auto").blocks
    full = DocLayout.full_rows(2, T, window=T)
    ctx = attn.make_kernel("sdpa").prepare(
        full, full.position_ids(), None, n_heads=4, n_kv_heads=4, dtype=torch.float32, device="cpu"
    )
    assert ctx.plan.mask_BHTT is None


def test_tinygpt_window_equals_windowed_naive_and_is_a_no_op_when_long():
    """The model's window reaches the kernel: sdpa with a window equals naive with it, differs from
    no window, and a window as long as the rows changes nothing."""
    torch.manual_seed(0)
    kw = dict(vocab_size=32, d_model=32, n_layers=2, n_heads=4, max_seq_len=T, positions="rope")
    ids, rows = torch.randint(0, 32, (2, T)), [[5, 30, 13], [T]]
    weights, outs = TinyGPT(**kw).double().state_dict(), {}
    for name, window in [("naive", 6), ("sdpa", 6), ("sdpa", None), ("sdpa", T)]:
        model = TinyGPT(**kw, attention=name, attention_window=window).double()
        model.load_state_dict(weights)
        outs[name, window] = model(ids, doc_lens=rows)
    torch.testing.assert_close(outs["sdpa", 6], outs["naive", 6])
    assert not torch.allclose(outs["sdpa", 6], outs["sdpa", None])
    torch.testing.assert_close(outs["sdpa", T], outs["sdpa", None])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [1, 16, 100])
@pytest.mark.parametrize("layout_name", ["causal", "padded", "packed"])
@pytest.mark.parametrize("kernel_name", ["fa4", "xformers", "flex", "sdpa"])
def test_gpu_window_kernels_match_reference(request, kernel_name, layout_name, window):
    """Each kernel with a sliding window on CUDA in bf16, forward and q/k/v gradients (GQA 4q/2kv)
    against float64 windowed attention; fa4 runs FA4's local attention, xformers its local masks."""
    if kernel_name == "xformers" and (problem := attn.xformers_problem()):
        pytest.skip(problem)
    if kernel_name == "fa4" and (problem := attn.fa4_problem()):
        pytest.skip(problem)
    doc_lens, _ = layout_spec(layout_name)
    q, k, v = random_qkv(case_generator(request), len(doc_lens), T, 4, 2, GPU_K, torch.bfloat16, device="cuda")
    got, want, real = run_kernel(kernel_name, doc_lens, q, k, v, None, grad=True, stacked=True, window=window)
    mask = real.expand_as(want[0])
    errors = {"out": relative_error(got[0].cpu()[mask], want[0][mask])}
    errors |= {f"d{n}": relative_error(g, r) for n, g, r in zip("qkv", got[1:], want[1:], strict=True)}
    if window == 1:  # each query sees only itself: softmax ≡ 1, so the exact dq, dk are 0; size them against dv
        assert want[1].abs().max() == 0 and want[2].abs().max() == 0
        errors["dq"], errors["dk"] = (float(g.double().cpu().norm() / want[3].norm()) for g in got[1:3])
    assert all(e < GPU_REL_TOL[torch.bfloat16] for e in errors.values()), errors


# --------------------------------------------------------------------------------------------
# Each kernel's plan
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout_name", ["causal", "packed"])
def test_each_kernel_prepares_a_plan_of_its_own(layout_name):
    """``prepare`` gives each kernel's context a plan of the kernel's own type, which only that
    kernel reads; ``auto``'s context carries the kernel it chose. Traceable unless the plan holds
    per-batch Python values (xformers' block-diagonal masks)."""
    doc_lens, _ = layout_spec(layout_name)
    layout = DocLayout(doc_lens, T)
    packed = layout.block_diagonal
    want = {
        "naive": attn.NaivePlan,
        "sdpa": attn.SdpaPlan,
        "flex": attn.FlexPlan,
        "fa4": attn.Fa4Plan,
        "xformers": attn.XformersPlan,
        "auto": attn.SdpaPlan,  # auto on the CPU: sdpa
    }
    for name, plan_type in want.items():
        if name == "xformers" and (packed or importlib.util.find_spec("xformers") is None):
            continue  # its block-diagonal bias pins host memory for the GPU: CUDA only
        dtype = torch.bfloat16 if name == "fa4" else torch.float32
        ctx = make_kernel(name).prepare(
            layout, layout.position_ids(), None, n_heads=4, n_kv_heads=2, dtype=dtype, device="cpu"
        )
        assert type(ctx.plan) is plan_type, name
        assert ctx.kernel.name == ("sdpa" if name == "auto" else name)
        assert ctx.traceable == (not (name == "xformers" and packed)), name
    naive = make_kernel("naive").prepare(layout, None, None, n_heads=4, n_kv_heads=2, dtype=torch.float32, device="cpu")
    assert naive.plan.bias_BHTT.shape == (2, 1, T, T)
    sdpa = make_kernel("sdpa").prepare(layout, None, None, n_heads=4, n_kv_heads=2, dtype=torch.float32, device="cpu")
    assert (sdpa.plan.mask_BHTT is None) == (not packed)  # rows of one document: is_causal
    fa4 = make_kernel("fa4:grouped").prepare(
        layout, None, None, n_heads=4, n_kv_heads=2, dtype=torch.bfloat16, device="cpu"
    )
    assert fa4.plan.describe() == ("documents grouped" if packed else "")
    assert sdpa.plan.describe() == ""
