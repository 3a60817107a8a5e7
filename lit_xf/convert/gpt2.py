"""GPT-2 (``model_type: gpt2``, ``GPT2LMHeadModel``) <-> TinyGPT.

TinyGPT with learned positions, LayerNorm (with bias), the GELU MLP (biases; ``gelu_new`` = tanh,
``gelu`` = exact) and biases on the q/k/v and output projections. HF's ``Conv1D`` stores weights
as [in, out], the transpose of ``nn.Linear``'s; ``c_attn``'s output columns are q, k, v of H heads
each, which is TinyGPT's fused ``qkv`` row order.

    wte / wpe                       tok_emb / pos_emb
    h.i.ln_1, h.i.ln_2              blocks.i.norm1, blocks.i.norm2
    h.i.attn.c_attn (transposed)    blocks.i.attn.qkv
    h.i.attn.c_proj (transposed)    blocks.i.attn.proj
    h.i.mlp.c_fc, h.i.mlp.c_proj    blocks.i.ffn.fc1, blocks.i.ffn.fc2 (transposed)
    ln_f, lm_head                   norm_f, lm_head
"""

from __future__ import annotations

from typing import Any

import torch

from lit_xf.config import GPTConfig
from lit_xf.convert.family import (
    ConversionError,
    dtype_name,
    refuse_leftovers,
    refuse_options,
    require_arch,
    strip_prefix,
    take,
)

MODEL_TYPES = ("gpt2",)
GELUS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}
# Conv1D layers: HF weight [in, out] = nn.Linear weight transposed
_TRANSPOSED = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "ffn.fc1", "mlp.c_proj": "ffn.fc2"}
_NORMS = {"ln_1": "norm1", "ln_2": "norm2"}
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older checkpoints hold


def config_from_hf(hf: dict[str, Any], max_seq_len: int | None = None) -> GPTConfig:
    refuse_options(
        "GPT-2",
        hf,
        {
            "activation_function": GELUS,
            "scale_attn_weights": [True],
            "scale_attn_by_inverse_layer_idx": [False],
            "add_cross_attention": [False],
        },
    )
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        max_seq_len=hf.get("n_positions", 1024),
        positions="learned",
        ffn="gelu",
        gelu=GELUS[hf.get("activation_function", "gelu_new")],
        intermediate_size=hf.get("n_inner"),
        norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        qkv_bias=True,
        proj_bias=True,
    )


def weights_from_hf(tensors: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    t = strip_prefix(tensors, "transformer.")
    t = {k: v for k, v in t.items() if not k.endswith(_BUFFERS)}
    out = {"tok_emb.weight": take(t, "wte.weight"), "pos_emb.weight": take(t, "wpe.weight")}
    for i in range(c.n_layers):
        for hf_name, name in _NORMS.items():
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{name}.{p}"] = take(t, f"h.{i}.{hf_name}.{p}")
        for hf_name, name in _TRANSPOSED.items():
            out[f"blocks.{i}.{name}.weight"] = take(t, f"h.{i}.{hf_name}.weight").t().contiguous()
            out[f"blocks.{i}.{name}.bias"] = take(t, f"h.{i}.{hf_name}.bias")
    out["norm_f.weight"], out["norm_f.bias"] = take(t, "ln_f.weight"), take(t, "ln_f.bias")
    head = t.pop("lm_head.weight", None)
    if c.tie_embeddings:
        out["lm_head.weight"] = out["tok_emb.weight"]
    else:
        out["lm_head.weight"] = head if head is not None else take(t, "lm_head.weight")
    refuse_leftovers("GPT-2", t)
    return out


def config_to_hf(c: GPTConfig, dtype: torch.dtype) -> dict[str, Any]:
    require_arch(
        "GPT-2",
        c,
        {
            "positions": "learned",
            "norm": "layernorm",
            "norm_bias": lambda c: c.norm_bias is not False,
            "ffn": "gelu",
            "mlp_bias": lambda c: c.mlp_bias is not False,
            "qkv_bias": True,
            "proj_bias": True,
            "n_kv_heads": lambda c: c.kv_heads == c.n_heads,
            "head_dim": lambda c: c.head_size * c.n_heads == c.d_model,
            "attention_window": None,
        },
    )
    if c.d_model % c.n_heads:
        raise ConversionError(f"GPT-2 needs n_heads={c.n_heads} to divide d_model={c.d_model}")
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": c.vocab_size,
        "n_positions": c.max_seq_len,
        "n_embd": c.d_model,
        "n_layer": c.n_layers,
        "n_head": c.n_heads,
        "n_inner": c.ffn_hidden,
        "activation_function": "gelu_new" if c.gelu == "tanh" else "gelu",
        "layer_norm_epsilon": c.norm_eps or 1e-5,
        "resid_pdrop": c.dropout,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": c.tie_embeddings,
        "dtype": dtype_name(dtype),
    }


def weights_to_hf(sd: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    out = {"transformer.wte.weight": take(sd, "tok_emb.weight"), "transformer.wpe.weight": take(sd, "pos_emb.weight")}
    for i in range(c.n_layers):
        h = f"transformer.h.{i}"
        for hf_name, name in _NORMS.items():
            for p in ("weight", "bias"):
                out[f"{h}.{hf_name}.{p}"] = take(sd, f"blocks.{i}.{name}.{p}")
        for hf_name, name in _TRANSPOSED.items():
            out[f"{h}.{hf_name}.weight"] = take(sd, f"blocks.{i}.{name}.weight").t().contiguous()
            out[f"{h}.{hf_name}.bias"] = take(sd, f"blocks.{i}.{name}.bias")
    out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = take(sd, "norm_f.weight"), take(sd, "norm_f.bias")
    head = take(sd, "lm_head.weight")
    if not c.tie_embeddings:
        out["lm_head.weight"] = head
    refuse_leftovers("lit_xf", sd)
    return out
