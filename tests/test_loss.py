"""Cross-entropy fused with the output projection against the loss on materialized logits."""

import pytest
import torch

from lit_xf import GPTConfig, LitTinyGPT
from lit_xf.loss import IGNORE_INDEX, _nll_and_grad_in_place, linear_cross_entropy, token_cross_entropy, token_hits


def _inputs(dtype=torch.float64, B=3, T=7, D=16, V=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, dtype=dtype, generator=gen)
    weight = torch.randn(V, D, dtype=dtype, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :3] = IGNORE_INDEX
    labels[-1, -1] = IGNORE_INDEX
    labels[1, :4] = (hidden[1, :4] @ weight.t()).argmax(-1)  # four hits
    return hidden, weight, labels


def test_fused_loss_matches_the_loss_on_logits_forward_and_backward():
    """Σ nll / real, its gradients for hidden and weight (under an upstream factor), hits and the
    real count equal ``token_cross_entropy`` and ``token_hits`` on z = h Wᵀ (float64)."""
    hidden, weight, labels = _inputs()
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    parts = linear_cross_entropy(h1, w1, labels)
    (2.5 * parts.nll_sum / parts.real).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = h2 @ w2.t()
    reference = token_cross_entropy(logits, labels)
    (2.5 * reference).backward()
    assert torch.allclose(parts.nll_sum / parts.real, reference, rtol=1e-12, atol=0)
    assert torch.allclose(h1.grad, h2.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)
    hits, real = token_hits(logits, labels)
    assert parts.real == real == (labels != IGNORE_INDEX).sum() and parts.hits == hits >= 4
    assert not parts.hits.requires_grad and not parts.real.requires_grad


def test_fused_loss_gradcheck():
    hidden, weight, labels = _inputs(B=2, T=4, D=5, V=9)
    assert torch.autograd.gradcheck(
        lambda h, w: linear_cross_entropy(h, w, labels).nll_sum,
        (hidden.requires_grad_(), weight.requires_grad_()),
    )


def test_in_place_gradient_rows():
    """The logits become softmax − onehot(label) row by row, zero rows where the label is ignored;
    nll is 0 and hit false there; a hit is a label logit equal to the row's maximum."""
    z = torch.tensor([[1.0, 3.0, 2.0], [0.5, 0.5, 4.0], [2.0, 1.0, 0.0]])
    labels = torch.tensor([1, 0, IGNORE_INDEX])
    expected = z.softmax(-1) - torch.nn.functional.one_hot(torch.tensor([1, 0, 0]), 3)
    expected[2] = 0
    z_in = z.clone()
    nll, hit = _nll_and_grad_in_place(z_in, labels)
    assert torch.allclose(z_in, expected)
    assert torch.allclose(nll, torch.stack([-z[0].log_softmax(-1)[1], -z[1].log_softmax(-1)[0], torch.tensor(0.0)]))
    assert hit.tolist() == [True, False, False]


def test_fused_loss_without_real_targets_is_zero_with_zero_gradients():
    hidden, weight, _ = _inputs()
    labels = torch.full(hidden.shape[:2], IGNORE_INDEX)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    parts = linear_cross_entropy(h, w, labels)
    (parts.nll_sum / parts.real.clamp(min=1)).backward()
    assert parts.nll_sum == 0 and parts.real == 0 and parts.hits == 0
    assert not h.grad.any() and not w.grad.any()


def test_fused_loss_under_autocast_multiplies_in_its_dtype_and_returns_input_dtypes():
    """Under bf16 autocast the logits are a bf16 GEMM (as ``lm_head`` would compute them there);
    gradients come back in fp32 for fp32 inputs, within bf16 error of the fp32 loss."""
    hidden, weight, labels = _inputs(torch.float32, D=64, V=300)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = linear_cross_entropy(h, w, labels)
        bf16_logits = torch.nn.functional.linear(hidden, weight)
    assert bf16_logits.dtype == torch.bfloat16
    loss = parts.nll_sum / parts.real
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    assert torch.allclose(loss, token_cross_entropy(bf16_logits, labels), rtol=1e-5)
    h32, w32 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    token_cross_entropy(h32 @ w32.t(), labels).backward()
    for got, want in ((h.grad, h32.grad), (w.grad, w32.grad)):
        assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_training_step_loss_and_gradients_equal_the_loss_on_logits():
    """LitTinyGPT's training step (fused loss, tied embeddings) gives the loss and every parameter
    gradient of ``token_cross_entropy`` on the model's logits."""
    torch.manual_seed(0)
    model = LitTinyGPT(GPTConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, tie_embeddings=True))
    model.double()
    ids = torch.randint(0, 50, (2, 16))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels, "doc_lens": [[10, 6], [16]]}
    loss = model.training_step(batch, 0)
    loss.backward()
    fused = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    reference = token_cross_entropy(model(ids, doc_lens=batch["doc_lens"]), labels)
    reference.backward()
    assert torch.allclose(loss, reference, rtol=1e-12)
    for name, p in model.named_parameters():
        assert torch.allclose(fused[name], p.grad, rtol=1e-9, atol=1e-12), name


def check_kernel_rows(device: str, V: int, dtype: torch.dtype, rows: int = 64) -> None:
    """The Triton kernel gives the torch path's nll, hits and in-place gradient (ignored rows, one
    certain hit); an out-of-range label reads no memory and gives NaN."""
    from lit_xf import loss

    gen = torch.Generator(device=device).manual_seed(0)
    z = (torch.randn(rows, V, device=device, generator=gen) * 4).to(dtype)
    labels = torch.randint(0, V, (rows,), device=device, generator=gen)
    labels[::7] = IGNORE_INDEX
    labels[1] = z[1].float().argmax()  # one certain hit
    labels[5] = V + 3  # out of range
    z_kernel = z.clone()
    nll_k, hit_k = (t.cpu() for t in loss._triton_nll_and_grad(z_kernel, labels))
    ok = labels.cpu() != V + 3
    z_torch = z.cpu()[ok]
    nll_t, hit_t = _nll_and_grad_in_place(z_torch, labels.cpu()[ok])
    assert torch.allclose(nll_k[ok], nll_t, rtol=1e-5, atol=1e-5)
    assert torch.equal(hit_k[ok], hit_t) and hit_t[1]
    assert (z_kernel.cpu()[ok].float() - z_torch.float()).abs().max() <= torch.finfo(dtype).eps
    assert nll_k[5].isnan() and not hit_k[5]


def test_triton_kernel_interpreted_on_the_cpu_matches_the_torch_rows():
    """``check_kernel_rows`` under Triton's CPU interpreter, where Triton is installed (the CPU
    torch wheel has none)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = (
        f"import sys, torch; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_loss; "
        "[test_loss.check_kernel_rows('cpu', V, dtype, rows=24) for V, dtype in ((258, torch.bfloat16), "
        "(8193, torch.float16))]; print('ok')"
    )
    env = os.environ | {"TRITON_INTERPRET": "1"}  # read when the kernel is defined: a fresh process
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V", [50304, 258, 8193])
def test_gpu_kernel_matches_the_torch_rows(dtype, V):
    """``check_kernel_rows`` on the GPU: ragged last block, a vocabulary smaller than one block."""
    check_kernel_rows("cuda", V, dtype, rows=512)


def test_token_hits_count_ties_like_the_fused_loss():
    """A label tied with another token for the row's maximum (frequent in 16-bit logits) is a hit
    for ``token_hits`` (val/acc) as for ``linear_cross_entropy`` (train/acc), wherever the tie
    sits; arg-max equality would miss the label that comes second."""
    z = torch.tensor([[[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 1.0, 0.0], [0.0, 1.0, 4.0, 4.0], [1.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 0, 2, IGNORE_INDEX]])  # tie, second place; tie, first place; tie, first; ignored
    hits, real = token_hits(z, labels)
    assert (hits.item(), real.item()) == (3, 3)
    _, hit = _nll_and_grad_in_place(z[0].clone(), labels[0])
    assert hit.sum() == hits
    assert (z.argmax(-1) == labels).sum() == 2  # arg-max equality misses the first row's label
    labels[0, 0] = 0  # not the maximum: a miss for both
    assert token_hits(z, labels)[0] == 2 == _nll_and_grad_in_place(z[0].clone(), labels[0])[1].sum()
