"""LitTinyGPT: training, checkpoints, injection from YAML, FLOPs, sampling, and padded == packed."""

import dataclasses
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from jsonargparse import ArgumentParser
from torch.utils.data import DataLoader

from lit_xf import GPTConfig, LitTinyGPT, TinyGPT
from lit_xf.attention import SdpaAttention
from lit_xf.data import TextDataModule, collate_rows, pack_documents
from lit_xf.loss import compiled_token_cross_entropy, token_cross_entropy
from lit_xf.model import GeluMLP, SwiGLU, quack_call_problem, quack_mlp_problem
from lit_xf.module import adamw, attended_pairs, flat_arch

TRAINER = dict(
    accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
)


@pytest.mark.slow
def test_counting_task_reaches_99_percent_and_generates_the_count():
    """The tutorial's task: next-token accuracy >= 99% on held-out sequences, then the model counts."""
    torch.manual_seed(0)
    dm = TextDataModule(corpus="counting", batch_mode="padded", seq_len=64, batch_size=32, counting_documents=32 * 100)
    model = LitTinyGPT(GPTConfig(vocab_size=dm.vocab_size, max_seq_len=64, attention="sdpa"), lr=3e-3, warmup_steps=10)
    trainer = L.Trainer(max_steps=70, limit_val_batches=4, **TRAINER)
    trainer.fit(model, dm)
    (metrics,) = trainer.validate(model, dm, verbose=False)
    assert metrics["val/acc"] >= 0.99, metrics

    prompt = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(prompt, max_new_tokens=10, temperature=0)
    assert out[0].tolist() == list(range(5, 19))


def _loader(*batches):
    return DataLoader(list(batches), batch_size=None, collate_fn=lambda b: b)


def _batch(vocab=50, B=2, T=16, doc_lens=((5, 11), (16,))):
    rows = [[torch.randint(0, vocab, (n,)).tolist() for n in row] for row in doc_lens]
    return collate_rows(rows, T, pad_id=vocab - 1)


@pytest.mark.parametrize(
    "arch",
    [
        dict(),
        dict(ffn="gelu", norm="rmsnorm", positions="rope", n_kv_heads=2, tie_embeddings=True),
        dict(positions="alibi", n_kv_heads=1, n_heads=4),
        dict(positions="rope", attention_window=4),  # trained and reloaded with its sliding window
    ],
)
def test_checkpoint_round_trip_gives_identical_logits(tmp_path, arch):
    torch.manual_seed(0)
    batch = _batch()
    model = LitTinyGPT(GPTConfig(vocab_size=50, d_model=32, n_layers=2, max_seq_len=16, attention="sdpa", **arch))
    trainer = L.Trainer(max_steps=2, **TRAINER)
    trainer.fit(model, _loader(batch, batch))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    loaded = LitTinyGPT.load_from_checkpoint(path)
    model.eval(), loaded.eval()
    args = (batch["input_ids"], batch["position_ids"], batch["doc_lens"])
    assert torch.equal(model(*args), loaded(*args))
    assert loaded.hparams == model.hparams and loaded.model.config == model.model.config
    assert torch.load(path, weights_only=True)["hyper_parameters"]["arch"] == model.model.config.to_dict()


def test_checkpoint_from_another_config_is_refused_clearly(tmp_path):
    model = LitTinyGPT(GPTConfig(vocab_size=50, d_model=32, n_layers=1, max_seq_len=16))
    trainer = L.Trainer(max_steps=1, **TRAINER)
    trainer.fit(model, _loader(_batch()))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    expected = r"another configuration.*tok_emb.weight: checkpoint \[50, 32\] vs model \[50, 64\]"
    with pytest.raises(ValueError, match=expected):
        LitTinyGPT.load_from_checkpoint(path, arch=GPTConfig(vocab_size=50, d_model=64, n_layers=1, max_seq_len=16))
    other = LitTinyGPT(GPTConfig(vocab_size=50, d_model=32, n_layers=2, max_seq_len=16))
    with pytest.raises(ValueError, match="n_layers: checkpoint 1 vs model 2"):
        L.Trainer(max_steps=2, **TRAINER).fit(other, _loader(_batch()), ckpt_path=path)


def test_checkpoint_with_flat_architecture_hyperparameters(tmp_path):
    """A checkpoint from before GPTConfig (architecture fields flat beside lr) is refused with the
    ``arch=GPTConfig(...)`` that loads it, and loads with it."""
    arch = GPTConfig(vocab_size=50, d_model=32, n_layers=1, max_seq_len=16, positions="rope", attention="sdpa")
    model = LitTinyGPT(arch, lr=2e-3)
    trainer = L.Trainer(max_steps=1, **TRAINER)
    trainer.fit(model, _loader(_batch()))
    path = tmp_path / "flat.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    hp = checkpoint["hyper_parameters"]
    hp.update(hp.pop("arch"))  # the old layout
    torch.save(checkpoint, path)
    assert flat_arch(hp) == arch.to_dict() and flat_arch({"lr": 1e-3}) is None

    want = "arch=GPTConfig(vocab_size=50, d_model=32, n_layers=1, max_seq_len=16, attention='sdpa', positions='rope')"
    expected = r"flat hyperparameters.*d_model: checkpoint 32 vs model 128.*" + re.escape(want)
    with pytest.raises(ValueError, match=expected):
        LitTinyGPT.load_from_checkpoint(path)
    loaded = LitTinyGPT.load_from_checkpoint(path, arch=arch)
    assert loaded.hparams.lr == 2e-3 and loaded.model.config == arch
    ids = torch.randint(0, 50, (2, 16))
    model.eval(), loaded.eval()
    assert torch.equal(model(ids), loaded(ids))


def test_gpt_config_derives_sizes_and_refuses_what_cannot_be_built():
    config = GPTConfig(d_model=96, n_heads=6, n_kv_heads=2)
    assert (config.head_size, config.kv_heads, config.q_per_kv) == (16, 2, 3)
    assert (GPTConfig(d_model=96, n_heads=5, head_dim=8).head_size, config.ffn_hidden) == (8, 384)
    assert GPTConfig().kv_heads == 8 and GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown GPTConfig field.*d_modle"):
        GPTConfig.from_dict({"d_modle": 64})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.d_model = 64
    for bad, message in (
        (dict(n_heads=5, d_model=192), r"n_heads=5 must divide d_model=192 \(e.g. n_heads=4\)"),
        (dict(n_kv_heads=3), r"n_kv_heads=3 must divide n_heads=8"),
        (dict(n_kv_heads=0), r"n_kv_heads must be a positive integer or None"),
        (dict(d_model=24, n_heads=8, positions="rope"), r"RoPE needs an even head dim, got d_model/n_heads=3"),
        (dict(ffn="relu"), r"unknown ffn 'relu'"),
        (dict(norm="batchnorm"), r"unknown norm 'batchnorm'"),
        (dict(dropout=1.0), r"dropout must be a probability"),
        (dict(attention="fa4:grouped", attention_window=8), r"has no sliding window"),
        (dict(head_dim=5, positions="rope"), r"RoPE needs an even head dim.*got head_dim=5"),
        (dict(head_dim=0), r"head_dim must be a positive integer or None"),
        (dict(intermediate_size=-3), r"intermediate_size must be a positive integer"),
        (dict(norm="rmsnorm", norm_bias=True), r"RMSNorm has no bias"),
        (dict(norm_eps=0.0), r"norm_eps must be a small positive number"),
        (dict(gelu="erf"), r"unknown gelu 'erf'; choose one of tanh, exact"),
        (dict(gelu="exact"), r"ffn='swiglu' has no GELU"),
        (dict(ffn="gelu", gelu="exact", mlp_kernel="quack"), r"fuses the tanh GELU only"),
        (dict(ffn=lambda d: torch.nn.Identity(), intermediate_size=64), r"intermediate_size=64 applies to ffn"),
    ):
        with pytest.raises(ValueError, match=message):
            GPTConfig(**bad)
    # TinyGPT takes the config, or its fields as keywords (validated the same way)
    assert TinyGPT(config, vocab_size=40).config == dataclasses.replace(config, vocab_size=40)
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide"):
        TinyGPT(n_kv_heads=3)
    with pytest.raises(TypeError, match="TinyGPT takes a GPTConfig"):
        TinyGPT({"d_model": 64})


def test_ffn_and_norm_swap_from_yaml():
    parser = ArgumentParser()
    parser.add_class_arguments(LitTinyGPT, "model")
    arch = {
        "vocab_size": 50,
        "d_model": 32,
        "max_seq_len": 16,
        "norm": "rmsnorm",
        "ffn": {"class_path": "lit_xf.model.GeluMLP", "init_args": {"hidden_mult": 2}},
    }
    cfg = parser.parse_string(yaml.safe_dump({"model": {"arch": arch, "lr": 1e-2}}))
    model = parser.instantiate_classes(cfg).model
    assert model.hparams.lr == 1e-2 and model.model.config.d_model == 32
    for block in model.model.blocks:
        assert isinstance(block.ffn, GeluMLP) and block.ffn.fc1.out_features == 64
        assert isinstance(block.norm1, torch.nn.RMSNorm)
    assert len({id(b.ffn) for b in model.model.blocks}) == len(model.model.blocks)  # one FFN per layer

    cfg = parser.parse_string(yaml.safe_dump({"model": {"arch": {"vocab_size": 50, "d_model": 32, "ffn": "swiglu"}}}))
    assert isinstance(parser.instantiate_classes(cfg).model.model.blocks[0].ffn, SwiGLU)


def test_quack_call_problem_runs_one_fused_mlp_forward_and_backward():
    """Importing quack is not enough (some versions fail at their first call): the probe runs one
    small MLP through the given ``mlp_func`` with gradients on, even under ``no_grad`` or
    inference mode, and reports the call's error, without touching the global RNG."""
    calls = []

    def working(x, w1, w2, activation):
        calls.append((tuple(x.shape), tuple(w1.shape), tuple(w2.shape), activation, x.requires_grad))
        return F.gelu(x @ w1.T, approximate="tanh") @ w2.T

    def broken(x, w1, w2, activation):
        raise TypeError("epilogue fn depends on <ContextVar name='_LOC_TRANSFORMS'>\nmore detail")

    rng = torch.get_rng_state()
    with torch.inference_mode():
        assert quack_call_problem(working, torch.device("cpu")) is None
    with torch.no_grad():
        problem = quack_call_problem(broken, torch.device("cpu"))
    assert calls == [((128, 64), (128, 64), (64, 128), "gelu_tanh_approx", True)]
    assert problem == (
        "quack-kernels failed a fused-MLP check on cpu (TypeError: epilogue fn depends on "
        "<ContextVar name='_LOC_TRANSFORMS'>)"
    )
    assert torch.equal(rng, torch.get_rng_state())


def test_gelu_mlp_kernel_choice_off_gpu_and_its_errors(caplog):
    """``mlp_kernel``: ``auto`` runs torch's MLP where quack can't run (here: CPU, float32), eager
    and compiled as one graph, with the same result as ``torch``; an explicit ``quack`` that can't
    run, or on another FFN, or an unknown name is refused with the reason; CUDA graphs over quack's
    MLP get a warning (measured 7x slower)."""
    torch.manual_seed(0)
    auto, plain = GeluMLP(16, kernel="auto"), GeluMLP(16)
    plain.load_state_dict(auto.state_dict())
    x = torch.randn(2, 5, 16)
    assert torch.equal(auto(x), plain(x))
    torch.testing.assert_close(torch.compile(auto, fullgraph=True)(x), plain(x))  # no graph break
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(auto(x), plain(x))
    assert "bf16/fp16" in quack_mlp_problem(torch.device("cpu"), torch.float32)
    assert "multiples of 8" in quack_mlp_problem(torch.device("cpu"), torch.bfloat16, 12, 48)
    assert "CUDA-only" in quack_mlp_problem(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(RuntimeError, match="mlp_kernel='quack' can't run this call: it computes in bf16"):
        GeluMLP(16, kernel="quack")(x)  # float32, no autocast
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="mlp_kernel='quack' can't run here: it is CUDA-only"):
            LitTinyGPT(GPTConfig(ffn="gelu", mlp_kernel="quack"))
    with pytest.raises(ValueError, match="fuses the GELU MLP only"):
        TinyGPT(ffn="swiglu", mlp_kernel="quack")
    with pytest.raises(ValueError, match="unknown mlp_kernel 'fast'; choose one of auto, torch, quack"):
        LitTinyGPT(GPTConfig(ffn="gelu", mlp_kernel="fast"))
    lit = LitTinyGPT(GPTConfig(ffn="gelu", mlp_kernel="auto"))
    assert all(block.ffn.kernel == "auto" for block in lit.model.blocks)
    assert lit.mlp_kernel_name == "torch (quack: it computes in bf16/fp16, this call in torch.float32 " + (
        "(train with precision bf16-mixed or 16-mixed))"
    )  # run/info's line; no trainer: 32-bit
    assert LitTinyGPT(GPTConfig(ffn="swiglu", mlp_kernel="auto")).mlp_kernel_name == "torch"
    with caplog.at_level("WARNING", logger="lit_xf.model"):
        TinyGPT(ffn="gelu", mlp_kernel="auto").compile_model("cudagraphs")
        TinyGPT(ffn="gelu").compile_model("cudagraphs")
    warned = [r.getMessage() for r in caplog.records if r.name == "lit_xf.model"]
    assert len(warned) == 1 and "7x slower" in warned[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_quack_gelu_mlp_matches_float64(dtype):
    """quack's fused GELU MLP under autocast, forward and every gradient (x, both weights, both
    biases), against the same MLP in float64: within the error of torch's own 16-bit MLP."""
    if problem := quack_mlp_problem(torch.device("cuda"), dtype, 256, 1024):
        pytest.skip(problem)
    torch.manual_seed(0)
    ref = GeluMLP(256).double()
    for p in ref.parameters():  # nonzero biases, so their gradients and the epilogue's bias are tested
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(4, 512, 256, dtype=torch.float64)
    dout = torch.randn(4, 512, 256, dtype=torch.float64)

    def run(mlp, inputs, autocast):
        inputs = inputs.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            out = mlp(inputs)
        out.backward(dout.to(out.device, out.dtype))
        return [out, inputs.grad] + [p.grad for p in (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)]

    want = run(ref, x, autocast=False)
    errors = {}
    for kernel in ("quack", "torch"):
        mlp = GeluMLP(256, kernel=kernel).cuda()
        mlp.load_state_dict(ref.state_dict())
        got = run(mlp, x.float().cuda(), autocast=True)
        errors[kernel] = [((g.double().cpu() - w).norm() / w.norm()).item() for g, w in zip(got, want, strict=True)]
    names = ("out", "dx", "dW1", "db1", "dW2", "db2")
    assert all(q < 2e-2 and q < 2 * t + 1e-3 for q, t in zip(*errors.values(), strict=True)), dict(
        zip(names, zip(*errors.values(), strict=True), strict=True)
    )


def test_flops_count_document_sparsity():
    model = LitTinyGPT(GPTConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, attention="sdpa"))
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    per_pair = 4 * 2 * 4 * 8  # 4 · layers · heads · head_dim

    packed = _batch(doc_lens=((5, 11), (16,)))
    pairs = 5 * 6 // 2 + 11 * 12 // 2 + 16 * 17 // 2
    assert model.flops_per_batch(packed) == 3 * (2 * matmul * 32 + per_pair * pairs)
    assert packed["stats"]["causal_pairs"] == pairs  # counted by the collate; the same without it:
    assert model.flops_per_batch({"doc_lens": packed["doc_lens"]}) == model.flops_per_batch(packed)

    padded = _batch(doc_lens=((5,), (16,)))  # padding is not useful work
    assert model.flops_per_batch(padded) == 3 * (2 * matmul * 21 + per_pair * (15 + 136))


def test_attended_pairs_counts_each_querys_visible_keys():
    for n in range(1, 30):
        for window in (None, 1, 3, 10):
            want = sum(min(i + 1, window or n) for i in range(n))
            assert attended_pairs(n, window) == want, (n, window)


def test_flops_count_the_sliding_window():
    """With a window the attention term counts min(i + 1, W) keys per query, not the collate's
    causal pairs."""
    model = LitTinyGPT(GPTConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, attention_window=4))
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    packed = _batch(doc_lens=((5, 11), (16,)))
    pairs = (10 + 4) + (10 + 7 * 4) + (10 + 12 * 4)  # W(W+1)/2 + (n − W)·W per document
    assert model.flops_per_batch(packed) == 3 * (2 * matmul * 32 + 4 * 2 * 4 * 8 * pairs)


@pytest.mark.parametrize("attention", ["naive", "sdpa", "flex"])
@pytest.mark.parametrize("positions", ["learned", "rope", "alibi"])
def test_per_document_losses_equal_padded_and_packed(attention, positions):
    """The leakage test: the same documents and weights give the same loss per document whether each
    has its own padded row or shares packed rows with others (fp32, 1e-5)."""
    torch.manual_seed(0)
    T, vocab = 32, 60
    docs = [torch.randint(0, vocab - 1, (n,)).tolist() for n in (1, 3, 7, 12, 20, 32, 2, 9, 15, 5)]
    model = TinyGPT(
        vocab_size=vocab,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_seq_len=T,
        attention=attention,
        positions=positions,
    ).eval()

    def losses(rows_of_ids):
        rows = [[docs[i] for i in ids] for ids in rows_of_ids]
        batch = collate_rows(rows, T, pad_id=vocab - 1)
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["position_ids"], batch["doc_lens"])
        nll = F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
        out = {}
        for b, ids in enumerate(rows_of_ids):
            start = 0
            for i in ids:
                n = len(docs[i])
                if n > 1:
                    out[i] = nll[b, start : start + n - 1].mean().item()
                    assert (batch["labels"][b, start + n - 1] == -100).item()  # no label across documents
                start += n
        return out

    packed_rows = pack_documents([len(d) for d in docs], T)
    assert max(len(r) for r in packed_rows) > 1
    padded = losses([[i] for i in range(len(docs))])
    packed = losses(packed_rows)
    assert padded.keys() == packed.keys()
    for i in padded:
        assert packed[i] == pytest.approx(padded[i], abs=1e-5), (i, attention, positions)


def test_imported_like_an_outside_project(tmp_path):
    """A user's own DataModule (no lit_xf.data) feeding contract-shaped batches to LitTinyGPT under a
    plain Trainer: the loss goes down."""

    class RepeatDataModule(L.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            batches = []
            for _ in range(30):
                ids = torch.randint(0, 8, (4, 1), generator=g).repeat(1, 24)  # predict: same token again
                labels = torch.cat([ids[:, 1:], torch.full((4, 1), -100)], dim=1)
                batches.append({"input_ids": ids, "labels": labels, "doc_lens": [[24]] * 4})
            return _loader(*batches)

    arch = GPTConfig(vocab_size=8, d_model=32, n_layers=1, n_heads=2, max_seq_len=24)
    model = LitTinyGPT(arch, lr=1e-2, warmup_steps=0)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    L.Trainer(max_epochs=1, callbacks=[Record()], **TRAINER).fit(model, RepeatDataModule())
    assert len(losses) == 30 and losses[-1] < 0.2 * losses[0]


def test_generate_validates_and_respects_top_k_and_eos():
    torch.manual_seed(0)
    model = LitTinyGPT(GPTConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, max_seq_len=8))
    out = model.generate(torch.tensor([1, 2]), max_new_tokens=12, top_k=1)  # top-1 sampling == greedy
    assert out.shape == (14,)  # a 1-D prompt gives a 1-D result; context cropped past max_seq_len
    assert torch.equal(out, model.generate(torch.tensor([1, 2]), max_new_tokens=12, temperature=0))
    first = int(out[2])
    stopped = model.generate(torch.tensor([[1, 2]]), max_new_tokens=12, temperature=0, eos_id=first)
    assert stopped.shape == (1, 3)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(torch.tensor([1]), 2, temperature=-1)


def test_warmup_cosine_schedule():
    from lit_xf.module import warmup_cosine

    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)


def _tiny_counting() -> TextDataModule:
    """Counting rows of 8 tokens, vocab 16 (+ pad): the model's vocab_size is 17."""
    return TextDataModule(
        corpus="counting",
        batch_mode="padded",
        seq_len=8,
        batch_size=4,
        counting_vocab=16,
        counting_length=8,
        counting_documents=64,
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_compiled_model_matches_eager_on_full_padded_and_packed_rows(mode):
    torch.manual_seed(0)
    eager = TinyGPT(vocab_size=40, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, attention="sdpa")
    compiled = TinyGPT(vocab_size=40, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, attention="sdpa")
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_model(mode)
    ids = torch.randint(0, 40, (2, 16))
    for doc_lens in (None, [[16], [9]], [[5, 11], [16]]):  # full, padded, packed rows
        want, got = eager(ids, doc_lens=doc_lens), compiled(ids, doc_lens=doc_lens)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        want.square().mean().backward()
        got.square().mean().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    with pytest.raises(RuntimeError, match="already compiled"):
        compiled.compile_model(mode)


class _ListBiasSdpa(SdpaAttention):
    """sdpa whose plan also carries the batch's segment lengths as Python lists (as xformers'
    block-diagonal masks do), marked untraceable."""

    name = "list_bias_sdpa"

    def _plan(self, ctx, *, n_heads, dtype, device):
        return super()._plan(ctx, n_heads=n_heads, dtype=dtype, device=device), ctx.layout.segment_lens()

    def _traceable(self, ctx):
        return not ctx.layout.block_diagonal

    def _attend(self, q_BTHK, k_BTGK, v_BTGK, ctx):
        plan, lens = ctx.plan
        assert sum(map(sum, lens)) == q_BTHK.shape[0] * q_BTHK.shape[1]
        return SdpaAttention._attend(self, q_BTHK, k_BTGK, v_BTGK, dataclasses.replace(ctx, plan=plan))


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["sdpa", "list_bias"])
def test_new_packed_layouts_reuse_the_compiled_blocks(kernel):
    """Blocks compiled once serve packed batches with other document lengths: a traceable bias is
    tensors of fixed shape; an untraceable one runs eagerly between the graphs, unguarded."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=40, d_model=16, n_layers=2, n_heads=4, max_seq_len=16, attention="sdpa")
    if kernel == "list_bias":
        model.kernel = _ListBiasSdpa()
    model.compile_model("blocks")
    ids = torch.randint(0, 40, (2, 16))
    layouts = ([[5, 11], [16]], [[3, 3, 10], [8, 8]], [[1, 15], [2, 2, 2, 10]], [[7, 9], [4, 12]])
    graphs = []
    for doc_lens in layouts:
        model(ids, doc_lens=doc_lens).sum().backward()
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[0] > 0
    assert graphs[1:] == [graphs[0]] * 3, f"graphs compiled after each batch: {graphs}"


def test_compile_option_is_validated_and_cudagraphs_stays_eager_on_cpu(caplog):
    with pytest.raises(ValueError, match="compile='fast'"):
        LitTinyGPT(compile="fast")
    with pytest.raises(ValueError, match="unknown compile mode"):
        TinyGPT().compile_model("fast")
    dm = _tiny_counting()
    model = LitTinyGPT(GPTConfig(vocab_size=17, d_model=16, n_layers=1, n_heads=2, max_seq_len=8), compile="cudagraphs")
    with caplog.at_level("INFO"):
        L.Trainer(max_steps=2, limit_val_batches=0, **TRAINER).fit(model, dm)
    assert model.model.compile_mode is None  # CUDA graphs need CUDA: eager here, and it said so
    assert any("needs a CUDA device" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_compiled_loss_equals_eager_and_compiled_models_use_it(reduction):
    """The compiled cross-entropy (fused fp32 log-softmax over 16-bit logits) gives the eager
    value and gradient, ignoring the -100 targets; a compiled LitTinyGPT trains with it."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = labels[2, 4] = -100
    results = []
    for fn in (token_cross_entropy, compiled_token_cross_entropy):
        x = logits.clone().requires_grad_()
        loss = fn(x, labels, reduction=reduction)
        loss.backward()
        results.append((loss.detach(), x.grad.float()))
    (eager, eager_grad), (compiled, compiled_grad) = results
    assert eager.dtype == compiled.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-2, atol=1e-3)  # bf16 gradient
    assert compiled_grad[0, :2].abs().max() == 0 and compiled_grad[1].abs().max() > 0

    model = LitTinyGPT(GPTConfig(vocab_size=17, d_model=16, n_layers=1, n_heads=2, max_seq_len=8), compile="blocks")
    assert model._cross_entropy is token_cross_entropy
    L.Trainer(max_steps=1, limit_val_batches=0, **TRAINER).fit(model, _tiny_counting())
    assert model._cross_entropy is compiled_token_cross_entropy


def test_datamodule_moves_only_the_batch_tensors():
    dm = TextDataModule(
        corpus="counting",
        batch_mode="packed",
        seq_len=16,
        batch_size=2,
        counting_vocab=16,
        counting_length=5,
        counting_documents=32,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert {k for k, v in moved.items() if isinstance(v, torch.Tensor)} == {"input_ids", "labels", "position_ids"}
    assert all(moved[k].device.type == "meta" for k in ("input_ids", "labels", "position_ids"))
    assert moved["doc_lens"] is batch["doc_lens"] and moved["stats"] is batch["stats"]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fused_adamw_is_clipped_without_a_grad_scaler(algorithm):
    """bf16-mixed has no GradScaler: LitTinyGPT clips a fused AdamW's gradients itself (Lightning's
    plugin would refuse), to the same result as the foreach optimizer under Lightning's clipping.

    Tolerance. Both optimizers evaluate AdamW's formula in fp32 in different operation orders (the
    fused kernel's order also depends on the CPU's vector width), so after the first step the
    weights differ by a few ulps (u = 2^-24; 2e-9 on an AVX-512 Xeon). bf16-mixed then rounds each
    forward's matmul inputs to bf16 (unit roundoff u_bf16 = 2^-8): wherever an ulp-sized difference
    straddles a bf16 rounding boundary, the gradients change by O(u_bf16) relatively, and AdamW's
    normalized update lr·m̂/(√v̂ + ε) passes that on. Elementwise the change has no useful bound (an
    element whose m̂/√v̂ is near 0 can move by up to 2·lr per step: on an AMD EPYC the two differed by
    up to 1.6e-4, against steps of 1e-2), but the direction of the whole update moves by
    O(u_bf16): ‖θ_fused − θ_foreach‖ / ‖θ_foreach − θ_0‖ ≤ 2·u_bf16. Measured by perturbing one
    foreach run's weights by 1 to 64 ulps after its first step: 0.5e-3 to 2.2e-3 (in 32-true the
    same perturbation stays at 7e-7). Bugs are far above: no clipping gives 0.18 to 0.20, the other
    algorithm 0.25 to 0.27, twice the threshold 0.047 to 0.067."""

    def run(fused: bool):
        class Probe(LitTinyGPT):
            def configure_optimizers(self):
                opt = torch.optim.AdamW(self.parameters(), lr=1e-2, fused=fused)
                return opt

            def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
                super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
                grads = [p.grad for p in self.parameters() if p.grad is not None]
                seen.append(
                    max(g.abs().max() for g in grads)
                    if algorithm == "value"
                    else torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
                )

        seen: list[torch.Tensor] = []
        torch.manual_seed(0)
        dm = _tiny_counting()
        model = Probe(GPTConfig(vocab_size=17, d_model=16, n_layers=1, n_heads=2, max_seq_len=8, attention="sdpa"))
        trainer = L.Trainer(
            max_steps=4,
            limit_val_batches=0,
            precision="bf16-mixed",
            gradient_clip_val=1e-3,
            gradient_clip_algorithm=algorithm,
            **TRAINER,
        )
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        trainer.fit(model, dm)
        return torch.stack(seen), start, torch.cat([p.detach().flatten() for p in model.parameters()])

    fused_seen, start, fused = run(fused=True)
    plain_seen, _, plain = run(fused=False)
    assert len(fused_seen) == 4 and bool((fused_seen <= 1e-3 * (1 + 1e-4)).all())
    torch.testing.assert_close(fused_seen, plain_seen)
    u_bf16 = 2.0**-8
    relative = (fused - plain).norm() / (plain - start).norm()
    assert relative <= 2 * u_bf16, f"fused and foreach AdamW updates differ by {relative:.2e} of the update"


def test_adamw_is_fused_on_cuda_unless_clipping_under_a_grad_scaler():
    model = TinyGPT(vocab_size=17, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)
    fused = {
        (device, scaled): adamw(model, 1e-3, (0.9, 0.95), 0.1, torch.device(device), scaled).defaults["fused"]
        for device in ("cpu", "cuda")
        for scaled in (False, True)
    }
    assert fused == {("cpu", False): False, ("cpu", True): False, ("cuda", False): True, ("cuda", True): False}
    groups = adamw(model, 1e-3, (0.9, 0.95), 0.1, torch.device("cpu")).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_token_hits_match_torchmetrics_and_skip_ignored_labels():
    from torchmetrics.classification import MulticlassAccuracy

    from lit_xf.loss import IGNORE_INDEX, token_hits

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 20), generator=gen)
    labels[:, 15:] = IGNORE_INDEX
    labels[0, :8] = logits[0, :8].argmax(-1)  # some right answers
    want = MulticlassAccuracy(11, average="micro", ignore_index=IGNORE_INDEX)(logits.flatten(0, 1), labels.flatten())
    hits, real = token_hits(logits, labels)
    assert real == 45 and hits / real == pytest.approx(want.item()) and 0 < want < 1
    assert token_hits(logits, torch.full_like(labels, IGNORE_INDEX)) == (0, 0)


class _SyncGuard(L.Callback):
    """Turns any host-device synchronization into an error from the start of each step that logs
    nothing (not the first) until the next step starts, Lightning's end-of-step work included."""

    def __init__(self):
        self.guarded = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step + 1
        logged = step % trainer.log_every_n_steps == 0 or step == trainer.max_steps
        torch.cuda.set_sync_debug_mode(0 if logged or trainer.global_step == 0 else "error")
        self.guarded.append(not logged and trainer.global_step > 0)

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_only_logged_steps_wait_for_the_gpu(tmp_path):
    """A training step that logs nothing never waits for the GPU (so the host can run ahead of it),
    with the progress bar, TensorBoard, the three monitors, clipping and bf16: only the steps that
    write ``train/*`` synchronize."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_xf.callbacks import KernelTimer, PeakMemoryMonitor, ThroughputMonitor

    dm = TextDataModule(corpus="counting", batch_mode="packed", seq_len=64, batch_size=8, counting_documents=800)
    model = LitTinyGPT(GPTConfig(vocab_size=dm.vocab_size, max_seq_len=64, d_model=64, n_layers=2, n_heads=4))
    guard = _SyncGuard()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=16,
        log_every_n_steps=5,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        logger=TensorBoardLogger(tmp_path),
        callbacks=[guard, PeakMemoryMonitor(), KernelTimer(profile_every_n_steps=0), ThroughputMonitor()],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    try:
        trainer.fit(model, dm)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert trainer.global_step == 16 and sum(guard.guarded) == 11  # steps 1-14 but 4, 9, 14
    assert set(trainer.progress_bar_metrics) >= {"train/loss", "train/acc"}


def test_validation_metrics_are_means_over_real_target_tokens():
    """val/loss and val/acc average over every real target token of the run (batches weighted by
    their counts, equal to torchmetrics' micro accuracy), and a batch without targets changes
    neither."""
    from torchmetrics.classification import MulticlassAccuracy

    from lit_xf.loss import IGNORE_INDEX

    torch.manual_seed(0)
    batches = [_batch(doc_lens=((5, 11), (16,))), _batch(doc_lens=((3,), (7, 2))), _batch(doc_lens=((16,), (9,)))]
    empty = _batch(doc_lens=((4,), (6,)))
    empty["labels"].fill_(IGNORE_INDEX)
    model = LitTinyGPT(GPTConfig(vocab_size=50, d_model=32, n_layers=2, max_seq_len=16, attention="sdpa"))
    (got,) = L.Trainer(**TRAINER).validate(model, _loader(*batches, empty), verbose=False)

    accuracy = MulticlassAccuracy(50, average="micro", ignore_index=IGNORE_INDEX)
    nll, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(b["input_ids"], b["position_ids"], b["doc_lens"])
            accuracy.update(logits.flatten(0, 1), b["labels"].flatten())
            nll += token_cross_entropy(logits, b["labels"], reduction="sum").item()
            count += int((b["labels"] != IGNORE_INDEX).sum())
    assert got["val/acc"] == pytest.approx(accuracy.compute().item(), abs=1e-6)
    assert got["val/loss"] == pytest.approx(nll / count, rel=1e-5)
