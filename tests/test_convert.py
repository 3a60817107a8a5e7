"""Hugging Face <-> lit_xf conversion against transformers' own models (random weights, no network).

For GPT-2, Llama (GQA, RoPE, head_dim != d_model / n_heads) and MPT (ALiBi): logits equal HF's on
padded rows and, per document, on packed rows (fp32 within 1e-5 relative, float64 within 1e-10);
HF -> lit_xf -> HF gives back every tensor bit for bit; greedy generation gives the same 20 ids.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_cli import ROOT, run_cli  # noqa: E402

from lit_xf.cli import main as cli_main  # noqa: E402
from lit_xf.config import GPTConfig  # noqa: E402
from lit_xf.convert import ConversionError, from_hf, load_model, to_hf  # noqa: E402
from lit_xf.convert.hf_files import INDEX, read_tensors  # noqa: E402
from lit_xf.module import LitTinyGPT  # noqa: E402

VOCAB = 320  # > the tokenizer's 300 ids: spare embedding rows, as real checkpoints have
T = 24
TEXT = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 20

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=T, bos_token_id=0, eos_token_id=0
    ),
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        intermediate_size=48,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        bos_token_id=0,
        eos_token_id=0,
    ),
    "mpt": lambda: transformers.MptConfig(
        d_model=32, n_layers=2, n_heads=4, vocab_size=VOCAB, max_seq_len=64, eos_token_id=0
    ),
}


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE of 300 ids with ``<|endoftext|>`` = 0, as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """family -> (HF model in fp32, eval, eager attention; its saved folder; the converted folder)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (name, make) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(make(), attn_implementation="eager").eval()
        folder = root / name
        model.save_pretrained(folder, max_shard_size="40KB" if name == "llama" else "5GB")
        write_tokenizer(folder)
        lit = root / f"{name}_lit"
        from_hf(folder, lit)
        out[name] = (model, folder, lit)
    return out


@contextlib.contextmanager
def hf_in_float64():
    """HF's Llama computes RMSNorm, the RoPE angles and its softmax, and MPT its softmax, in float32
    whatever the model's dtype, which limits a float64 comparison to ~1e-7. Here they stay in float64
    (same math)."""
    from transformers.models.llama import modeling_llama

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        K = 2 * self.inv_freq.numel()
        inv_freq = 1.0 / self.config.rope_parameters["rope_theta"] ** (torch.arange(0, K, 2, dtype=torch.float64) / K)
        angles = position_ids[..., None].double() * inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)

    to_float, softmax = torch.Tensor.float, torch.nn.functional.softmax

    def softmax64(x, dim=None, dtype=None, **kwargs):
        return softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype, **kwargs)

    with (
        mock.patch.object(torch.nn.functional, "softmax", softmax64),
        mock.patch.object(modeling_llama.LlamaRMSNorm, "forward", rms_norm),
        mock.patch.object(modeling_llama.LlamaRotaryEmbedding, "forward", rotary),
        mock.patch.object(torch.Tensor, "float", lambda x: x if x.dtype == torch.float64 else to_float(x)),
    ):
        yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.mark.parametrize("family", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_logits_equal_hf_on_padded_and_packed_rows(hf_models, family, dtype):
    hf, _, lit = hf_models[family]
    hf = hf.to(dtype)
    ours = load_model(lit, attention="sdpa").to(dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, T), generator=g)
    lengths = [T, 15]
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    docs = [7, 11, 6]  # one packed row
    with torch.no_grad(), hf_in_float64() if dtype == torch.float64 else contextlib.nullcontext():
        want_padded = hf(ids, attention_mask=mask).logits
        want_docs = [hf(part[None]).logits[0] for part in ids[0].split(docs)]
    with torch.no_grad():
        got_padded = ours(ids, doc_lens=[[n] for n in lengths])
        got_packed = ours(ids[:1], doc_lens=[docs])[0]
    hf.float()
    for b, n in enumerate(lengths):
        assert rel_err(got_padded[b, :n], want_padded[b, :n]) < TOL[dtype]
    for got, want in zip(got_packed.split(docs), want_docs, strict=True):
        assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_round_trip_gives_back_every_tensor_and_the_same_greedy_ids(hf_models, family, tmp_path):
    hf, folder, lit = hf_models[family]
    back = tmp_path / "back"
    done = to_hf(lit, back, shard_bytes=30_000)
    assert done.family == family and done.tokenizer and (back / INDEX).is_file()  # sharded on the way out too
    original, returned = read_tensors(folder), read_tensors(back)
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) and original[k].dtype == returned[k].dtype for k in original)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(back)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 0

    prompt = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    module = LitTinyGPT(arch=load_model(lit).config, init_weights=str(lit))
    got = module.generate(prompt, max_new_tokens=20, temperature=0.0)
    assert got.shape == (1, 24) and torch.equal(got, want)


def test_refused_architectures_are_named_and_nothing_is_written(hf_models, tmp_path):
    _, folder, lit = hf_models["llama"]
    cases = {
        "rope_type='linear'": {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
        "hidden_act='gelu'": {"hidden_act": "gelu"},
        "model_type 'falcon' is not supported": {"model_type": "falcon"},
    }
    for needle, change in cases.items():
        src = tmp_path / needle.split("=")[0].split()[0]
        src.mkdir()
        config = json.loads((folder / "config.json").read_text()) | change
        (src / "config.json").write_text(json.dumps(config))
        with pytest.raises(ConversionError, match=needle):
            from_hf(src, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    mpt = json.loads((hf_models["mpt"][1] / "config.json").read_text())
    mpt["attn_config"]["clip_qkv"] = 8.0
    (tmp_path / "mpt").mkdir()
    (tmp_path / "mpt" / "config.json").write_text(json.dumps(mpt))
    with pytest.raises(ConversionError, match=r"MPT attn_config options .*clip_qkv=8.0"):
        from_hf(tmp_path / "mpt", tmp_path / "out")
    # lit_xf -> HF: an architecture no family expresses, refused by each family's reason
    from lit_xf.weights import read_weights, save_weights

    weights = read_weights(lit)
    arch = weights.arch | {"norm": "layernorm", "norm_bias": False}  # Llama-style weights with LayerNorm: no HF family
    save_weights(tmp_path / "odd.safetensors", arch, weights.state_dict)
    refused = r"no Hugging Face family fits.*GPT-2.*positions='rope'.*norm='layernorm'"
    with pytest.raises(ConversionError, match=refused):
        to_hf(tmp_path / "odd.safetensors", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary folder left
    with pytest.raises(ConversionError, match="exists already"):
        from_hf(folder, lit)


@torch.no_grad()  # flex has no backward on CPU
def test_head_dim_apart_from_d_model_on_every_cpu_kernel():
    """head_dim 12 with d_model 32 and 4 heads: every kernel that runs here gives the naive reference's logits."""
    config = GPTConfig(vocab_size=50, d_model=32, n_heads=4, n_kv_heads=2, head_dim=12, positions="rope", n_layers=2)
    ids = torch.randint(0, 50, (2, 16))
    naive = LitTinyGPT(arch=GPTConfig.from_dict(config.to_dict() | {"attention": "naive"})).model.eval()
    sd = naive.state_dict()
    assert sd["blocks.0.attn.qkv.weight"].shape == (8 * 12, 32) and sd["blocks.0.attn.proj.weight"].shape == (32, 48)
    want = naive(ids, doc_lens=[[16], [5, 11]])
    for kernel in ("sdpa", "flex"):
        model = LitTinyGPT(arch=GPTConfig.from_dict(config.to_dict() | {"attention": kernel})).model.eval()
        model.load_state_dict(sd)
        assert rel_err(model(ids, doc_lens=[[16], [5, 11]]), want) < 1e-5, kernel


def test_cli_converts_fine_tunes_on_packed_rows_and_converts_back(hf_models, tmp_path, capsys):
    _, folder, _ = hf_models["llama"]
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(TEXT))
    # lit-xf convert in this process (its own process costs seconds of imports), lit-xf fit in its own
    assert cli_main(["convert", "from-hf", str(folder), str(tmp_path / "lit"), "--seq_len", "32"]) == 0
    assert "llama (llama family" in capsys.readouterr().out
    args = [
        "fit",
        "--config",
        str(tmp_path / "lit" / "config.yaml"),
        f"--data.corpus={corpus}",
        "--data.batch_size=4",
        "--model.arch.attention=sdpa",
        "--model.lr=1e-3",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=null",
        "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert cli_main(["convert", "to-hf", str(ckpt), str(tmp_path / "tuned")]) == 0
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").eval()
    tuned_w, start_w = read_tensors(tmp_path / "tuned"), read_tensors(folder)
    assert tuned_w.keys() == start_w.keys()
    assert not torch.equal(tuned_w["model.norm.weight"], start_w["model.norm.weight"])  # it trained
    ours = load_model(ckpt, attention="sdpa")
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "tuned")(TEXT[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert rel_err(ours(ids), tuned(ids).logits) < 1e-5
    capsys.readouterr()
    assert cli_main(["convert", "from-hf", str(tmp_path), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "lit-xf: error:" in err and "has no config.json" in err


def test_gpu_check_script_cpu_path(tmp_path):
    """scripts/convert_gpu_check.py (run on the GPU in bf16) on its CPU path: sdpa, fp32."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_gpu_check", ROOT / "scripts" / "convert_gpu_check.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "check.json"
    assert (
        script.main(
            ["--device", "cpu", "--dtype", "float32", "--kernels", "sdpa", "--seq_len", "32", "--out", str(out)]
        )
        == 0
    )
    results = json.loads(out.read_text())["results"]
    assert {r["model"] for r in results} == {"llama_gqa", "gpt2"} and all(r["ok"] for r in results)
    assert all(0 < r["padded_rel"] < r["bound"] and 0 < r["packed_rel"] < r["bound"] for r in results)
    assert script.tolerance(torch.bfloat16, 2) == pytest.approx(16 * 2**-8 * 3**0.5)
