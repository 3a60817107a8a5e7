"""MPT (``model_type: mpt``, ``MptForCausalLM``) <-> TinyGPT.

TinyGPT with ALiBi (slopes 2^(−8h/H), H a power of two: MPT's ``alibi_bias_max`` 8), bias-free
LayerNorm, the exact-GELU MLP of width 4·d without biases, no biases in attention, tied embeddings.
MPT adds −m·(T−1−j) to every query's scores, TinyGPT −m·(i−j): per query row the two differ by a
constant, which softmax ignores. ``Wqkv``'s rows are q, k, v: TinyGPT's ``qkv`` order.

    transformer.wte                      tok_emb (= lm_head)
    transformer.blocks.i.norm_1, norm_2  blocks.i.norm1, blocks.i.norm2
    transformer.blocks.i.attn.Wqkv       blocks.i.attn.qkv
    transformer.blocks.i.attn.out_proj   blocks.i.attn.proj
    transformer.blocks.i.ffn.up_proj     blocks.i.ffn.fc1
    transformer.blocks.i.ffn.down_proj   blocks.i.ffn.fc2
    transformer.norm_f                   norm_f
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

MODEL_TYPES = ("mpt",)
_NAMES = {
    "norm_1.weight": "norm1.weight",
    "norm_2.weight": "norm2.weight",
    "attn.Wqkv.weight": "attn.qkv.weight",
    "attn.out_proj.weight": "attn.proj.weight",
    "ffn.up_proj.weight": "ffn.fc1.weight",
    "ffn.down_proj.weight": "ffn.fc2.weight",
}


def config_from_hf(hf: dict[str, Any], max_seq_len: int | None = None) -> GPTConfig:
    refuse_options(
        "MPT", hf, {"expansion_ratio": [4], "no_bias": [True], "logit_scale": [None], "embedding_fraction": [1.0, 1]}
    )
    attn = hf.get("attn_config") or {}
    refuse_options(
        "MPT attn_config",
        attn,
        {
            "alibi": [True],
            "alibi_bias_max": [8],
            "attn_type": ["multihead_attention"],
            "clip_qkv": [None],
            "softmax_scale": [None],
            "qk_ln": [False],
            "prefix_lm": [False],
            "attn_uses_sequence_id": [False],
        },
    )
    heads = hf["n_heads"]
    if heads & (heads - 1):
        raise ConversionError(
            f"MPT with n_heads={heads}: MPT orders ALiBi slopes differently from TinyGPT unless the head count is "
            "a power of two"
        )
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["d_model"],
        n_layers=hf["n_layers"],
        n_heads=heads,
        max_seq_len=max_seq_len or hf.get("max_seq_len", 2048),
        positions="alibi",
        ffn="gelu",
        gelu="exact",
        mlp_bias=False,
        norm="layernorm",
        norm_bias=False,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=True,
    )


def weights_from_hf(tensors: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    t = strip_prefix(tensors, "transformer.")
    out = {"tok_emb.weight": take(t, "wte.weight")}
    for i in range(c.n_layers):
        for hf_name, name in _NAMES.items():
            out[f"blocks.{i}.{name}"] = take(t, f"blocks.{i}.{hf_name}")
    out["norm_f.weight"] = take(t, "norm_f.weight")
    t.pop("lm_head.weight", None)  # tied to wte
    out["lm_head.weight"] = out["tok_emb.weight"]
    refuse_leftovers("MPT", t)
    return out


def config_to_hf(c: GPTConfig, dtype: torch.dtype) -> dict[str, Any]:
    require_arch(
        "MPT",
        c,
        {
            "positions": "alibi",
            "norm": "layernorm",
            "norm_bias": False,
            "ffn": "gelu",
            "gelu": "exact",
            "mlp_bias": False,
            "qkv_bias": False,
            "proj_bias": False,
            "tie_embeddings": True,
            "intermediate_size": lambda c: c.ffn_hidden == 4 * c.d_model,
            "n_kv_heads": lambda c: c.kv_heads == c.n_heads,
            "head_dim": lambda c: c.head_size * c.n_heads == c.d_model,
            "n_heads": lambda c: c.n_heads & (c.n_heads - 1) == 0,
            "attention_window": None,
        },
    )
    return {
        "model_type": "mpt",
        "architectures": ["MptForCausalLM"],
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "n_heads": c.n_heads,
        "n_layers": c.n_layers,
        "expansion_ratio": 4,
        "max_seq_len": c.max_seq_len,
        "layer_norm_epsilon": c.norm_eps or 1e-5,
        "no_bias": True,
        "tie_word_embeddings": True,
        "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_pdrop": 0},
        "resid_pdrop": c.dropout,
        "dtype": dtype_name(dtype),
    }


def weights_to_hf(sd: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    out = {"transformer.wte.weight": take(sd, "tok_emb.weight")}
    for i in range(c.n_layers):
        for hf_name, name in _NAMES.items():
            out[f"transformer.blocks.{i}.{hf_name}"] = take(sd, f"blocks.{i}.{name}")
    out["transformer.norm_f.weight"] = take(sd, "norm_f.weight")
    take(sd, "lm_head.weight")  # tied
    refuse_leftovers("lit_xf", sd)
    return out
