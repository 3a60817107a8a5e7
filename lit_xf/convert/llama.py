"""Llama-style models (``model_type`` ``llama``, ``mistral``, ``qwen2``) <-> TinyGPT.

TinyGPT with RoPE (HF's ``rotate_half`` pairs dims i and i + K/2, as ``lit_xf.model.rope_rotate``
does), RMSNorm, SwiGLU and grouped-query attention. TinyGPT fuses q/k/v into one projection (rows
q, k, v) and gate/up into ``w12`` (rows gate, up). Biases: Llama's ``attention_bias`` is on q, k, v
and o (``qkv_bias`` and ``proj_bias``), Qwen2's on q, k, v only; Mistral's ``sliding_window`` is
``attention_window`` (at most that many most recent tokens, itself included).

    model.embed_tokens                                  tok_emb
    model.layers.i.input_layernorm                      blocks.i.norm1
    model.layers.i.self_attn.{q,k,v}_proj (stacked)     blocks.i.attn.qkv
    model.layers.i.self_attn.o_proj                     blocks.i.attn.proj
    model.layers.i.post_attention_layernorm             blocks.i.norm2
    model.layers.i.mlp.{gate,up}_proj (stacked)         blocks.i.ffn.w12
    model.layers.i.mlp.down_proj                        blocks.i.ffn.w3
    model.norm, lm_head                                 norm_f, lm_head
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

MODEL_TYPES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def _rope_theta(hf: dict[str, Any], family: str) -> float:
    """RoPE's base from ``rope_parameters`` (transformers 5) or ``rope_theta`` / ``rope_scaling``."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ConversionError(
            f"{family} option rope_type={kind!r} (RoPE scaling) is not supported: TinyGPT's RoPE is the default "
            "rope_type only"
        )
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConversionError(f"{family} option partial_rotary_factor is not supported (TinyGPT rotates whole heads)")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any], max_seq_len: int | None = None) -> GPTConfig:
    kind = hf["model_type"]
    family = _NAMES[kind]
    wanted: dict[str, list] = {"hidden_act": ["silu"], "pretraining_tp": [1]}
    if kind == "qwen2":
        wanted["use_sliding_window"] = [False]
        wanted["layer_types"] = [None, ["full_attention"] * hf.get("num_hidden_layers", 0)]
    if kind != "llama":
        wanted["mlp_bias"] = [False]
    refuse_options(family, hf, wanted)
    theta = _rope_theta(hf, family)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    bias = bool(hf.get("attention_bias", False))
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=None if head_dim * heads == hf["hidden_size"] else head_dim,
        max_seq_len=max_seq_len or hf.get("max_position_embeddings", 2048),
        positions="rope",
        rope_base=theta,
        ffn="swiglu",
        intermediate_size=hf["intermediate_size"],
        mlp_bias=bool(hf.get("mlp_bias", False)),
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if kind == "qwen2" else bias,
        proj_bias=False if kind == "qwen2" else bias,
        attention_window=hf.get("sliding_window") if kind == "mistral" else None,
    )


def weights_from_hf(tensors: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    t = strip_prefix(tensors, "model.")
    t = {k: v for k, v in t.items() if not k.endswith("rotary_emb.inv_freq")}  # older checkpoints' buffer
    out = {"tok_emb.weight": take(t, "embed_tokens.weight")}
    for i in range(c.n_layers):
        hf, lit = f"layers.{i}", f"blocks.{i}"
        out[f"{lit}.norm1.weight"] = take(t, f"{hf}.input_layernorm.weight")
        out[f"{lit}.norm2.weight"] = take(t, f"{hf}.post_attention_layernorm.weight")
        params = ("weight", "bias") if c.qkv_bias else ("weight",)
        for p in params:
            out[f"{lit}.attn.qkv.{p}"] = torch.cat([take(t, f"{hf}.self_attn.{n}_proj.{p}") for n in "qkv"])
        for p in ("weight", "bias") if c.proj_bias else ("weight",):
            out[f"{lit}.attn.proj.{p}"] = take(t, f"{hf}.self_attn.o_proj.{p}")
        for p in ("weight", "bias") if c.mlp_bias else ("weight",):
            out[f"{lit}.ffn.w12.{p}"] = torch.cat([take(t, f"{hf}.mlp.{n}_proj.{p}") for n in ("gate", "up")])
            out[f"{lit}.ffn.w3.{p}"] = take(t, f"{hf}.mlp.down_proj.{p}")
    out["norm_f.weight"] = take(t, "norm.weight")
    head = t.pop("lm_head.weight", None)
    out["lm_head.weight"] = out["tok_emb.weight"] if c.tie_embeddings else head
    if out["lm_head.weight"] is None:
        raise ConversionError("the checkpoint has no tensor 'lm_head.weight' and tie_word_embeddings is false")
    refuse_leftovers("Llama-style", t)
    return out


def model_type_for(c: GPTConfig) -> str:
    """``mistral`` with a sliding window, ``qwen2`` with biases on q/k/v only, else ``llama``."""
    require_arch(
        "Llama-style",
        c,
        {"positions": "rope", "norm": "rmsnorm", "ffn": "swiglu"},
    )
    if c.attention_window is not None:
        require_arch("Mistral", c, {"qkv_bias": False, "proj_bias": False, "mlp_bias": lambda c: not c.mlp_bias})
        return "mistral"
    if c.qkv_bias and not c.proj_bias:
        require_arch("Qwen2", c, {"mlp_bias": lambda c: not c.mlp_bias})
        return "qwen2"
    if c.qkv_bias != c.proj_bias:
        raise ConversionError(
            "a Llama-style model has biases on q/k/v and o together (Llama's attention_bias) or on q/k/v only "
            f"(Qwen2), not qkv_bias={c.qkv_bias} with proj_bias={c.proj_bias}"
        )
    return "llama"


def config_to_hf(c: GPTConfig, dtype: torch.dtype) -> dict[str, Any]:
    kind = model_type_for(c)
    hf = {
        "model_type": kind,
        "architectures": [_ARCHITECTURES[kind]],
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.ffn_hidden,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        # TinyGPT's RMSNorm without norm_eps uses float32's eps
        "rms_norm_eps": c.norm_eps if c.norm_eps is not None else torch.finfo(torch.float32).eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base},
        "tie_word_embeddings": c.tie_embeddings,
        "attention_dropout": 0.0,
        "dtype": dtype_name(dtype),
    }
    if kind == "llama":
        hf |= {"attention_bias": c.qkv_bias, "mlp_bias": bool(c.mlp_bias)}
    elif kind == "mistral":
        hf["sliding_window"] = c.attention_window
    else:
        hf |= {"use_sliding_window": False, "sliding_window": None}
    return hf


def weights_to_hf(sd: dict[str, torch.Tensor], c: GPTConfig) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    H, G, K = c.n_heads, c.kv_heads, c.head_size
    out = {"model.embed_tokens.weight": take(sd, "tok_emb.weight")}
    for i in range(c.n_layers):
        hf, lit = f"model.layers.{i}", f"blocks.{i}"
        out[f"{hf}.input_layernorm.weight"] = take(sd, f"{lit}.norm1.weight")
        out[f"{hf}.post_attention_layernorm.weight"] = take(sd, f"{lit}.norm2.weight")
        for p in ("weight", "bias") if c.qkv_bias else ("weight",):
            q, k, v = take(sd, f"{lit}.attn.qkv.{p}").split((H * K, G * K, G * K))
            for n, part in zip("qkv", (q, k, v), strict=True):
                out[f"{hf}.self_attn.{n}_proj.{p}"] = part.contiguous()
        for p in ("weight", "bias") if c.proj_bias else ("weight",):
            out[f"{hf}.self_attn.o_proj.{p}"] = take(sd, f"{lit}.attn.proj.{p}")
        for p in ("weight", "bias") if c.mlp_bias else ("weight",):
            gate, up = take(sd, f"{lit}.ffn.w12.{p}").chunk(2)
            out[f"{hf}.mlp.gate_proj.{p}"], out[f"{hf}.mlp.up_proj.{p}"] = gate.contiguous(), up.contiguous()
            out[f"{hf}.mlp.down_proj.{p}"] = take(sd, f"{lit}.ffn.w3.{p}")
    out["model.norm.weight"] = take(sd, "norm_f.weight")
    head = take(sd, "lm_head.weight")
    if not c.tie_embeddings:
        out["lm_head.weight"] = head
    refuse_leftovers("lit_xf", sd)
    return out
