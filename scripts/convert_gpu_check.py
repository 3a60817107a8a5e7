"""Converted models' logits on every attention kernel that imports, against transformers' own.

Builds a random Llama-like model (GQA 8q/2kv, RoPE, head_dim 64 where d_model / n_heads is 32) and
a GPT-2 from configs (no downloads), converts each with ``lit_xf.convert.from_hf``, and compares
HF's logits (eager attention) with lit_xf's on padded rows (one document per row, right padding)
and packed rows (each document against HF run on it alone), per kernel.

Tolerance: both sides round every layer's activations to the compute dtype; with unit roundoff
u = eps/2 (bf16: 2^-8), errors of independent roundings grow like sqrt(number of roundings), a few
per layer, so the bound is ``max|Δ| <= 16 · u · sqrt(layers + 1) · max|HF logits|`` (2 layers:
bf16 0.11, fp32 1.7e-6 of the largest logit). A result beyond
it exits 1. ``--out results.json`` gets every case's error and bound.

    python scripts/convert_gpu_check.py --out convert_gpu.json                         # CUDA, bf16
    python scripts/convert_gpu_check.py --device cpu --dtype float32 --kernels sdpa --out x.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

KERNELS = ("sdpa", "xformers", "flex", "fa4")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def hf_models(vocab: int, seq_len: int) -> dict:
    import transformers

    return {
        "llama_gqa": transformers.LlamaConfig(
            hidden_size=256,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=512,
            vocab_size=vocab,
            max_position_embeddings=seq_len,
            tie_word_embeddings=False,
        ),
        "gpt2": transformers.GPT2Config(n_embd=256, n_layer=2, n_head=4, vocab_size=vocab, n_positions=seq_len),
    }


def tolerance(dtype: torch.dtype, layers: int) -> float:
    """16 · u · sqrt(layers + 1), u the unit roundoff (relative to the largest |logit|)."""
    return 16 * (torch.finfo(dtype).eps / 2) * math.sqrt(layers + 1)


def run(device: str, dtype: torch.dtype, kernels: list[str], seq_len: int = 128, batch: int = 2) -> list[dict]:
    import transformers

    from lit_xf.convert import from_hf, load_model

    results = []
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, config) in enumerate(hf_models(512, seq_len).items()):
            torch.manual_seed(i)
            hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
            hf.save_pretrained(Path(tmp) / name)
            from_hf(Path(tmp) / name, Path(tmp) / f"{name}_lit")
            hf = hf.to(device, dtype)
            ids = torch.randint(0, 512, (batch, seq_len), generator=g).to(device)
            lengths = [seq_len] + [seq_len // 2 + 3] * (batch - 1)
            mask = (torch.arange(seq_len, device=device)[None] < torch.tensor(lengths, device=device)[:, None]).long()
            docs = [seq_len // 4, seq_len // 2, seq_len - seq_len // 4 - seq_len // 2]
            with torch.no_grad():
                want_padded = hf(ids, attention_mask=mask).logits.float()
                want_docs = [hf(part[None]).logits[0].float() for part in ids[0].split(docs)]
            bound = tolerance(dtype, config.num_hidden_layers if name != "gpt2" else config.n_layer)
            for kernel in kernels:
                row = {"model": name, "kernel": kernel, "dtype": str(dtype).removeprefix("torch."), "bound": bound}
                try:  # TinyGPT refuses a kernel that can't run here when it is built
                    ours = load_model(Path(tmp) / f"{name}_lit", attention=kernel).to(device, dtype)
                    with torch.no_grad():
                        padded = ours(ids, doc_lens=[[n] for n in lengths]).float()
                        packed = ours(ids[:1], doc_lens=[docs])[0].float()
                except (ValueError, RuntimeError, ImportError) as err:
                    row["skipped"] = str(err).splitlines()[0][:200]
                    results.append(row)
                    continue
                scale = float(want_padded.abs().max())
                err_padded = max(float((padded[b, :n] - want_padded[b, :n]).abs().max()) for b, n in enumerate(lengths))
                err_packed = max(float((p - w).abs().max()) for p, w in zip(packed.split(docs), want_docs, strict=True))
                row |= {"padded_rel": err_padded / scale, "packed_rel": err_packed / scale}
                row["ok"] = row["padded_rel"] <= bound and row["packed_rel"] <= bound
                results.append(row)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    p.add_argument("--seq_len", type=int, default=128)
    args = p.parse_args(argv)
    results = run(args.device, DTYPES[args.dtype], args.kernels, args.seq_len)
    Path(args.out).write_text(json.dumps({"device": args.device, "results": results}, indent=2))
    for r in results:
        what = (
            r.get("skipped") or f"padded {r['padded_rel']:.2e}  packed {r['packed_rel']:.2e}  (bound {r['bound']:.2e})"
        )
        print(
            f"{r['model']:10s} {r['kernel']:9s} {'ok ' if r.get('ok') else ('-- ' if 'skipped' in r else 'BAD')} {what}"
        )
    compared = [r for r in results if "skipped" not in r]
    if not compared:
        print("no kernel ran", file=sys.stderr)
        return 2
    return 0 if all(r["ok"] for r in compared) else 1


if __name__ == "__main__":
    sys.exit(main())
