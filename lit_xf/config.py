"""GPTConfig: the architecture of a TinyGPT, in one frozen dataclass.

``TinyGPT(config)`` builds it, ``LitTinyGPT(arch=config)`` trains it, and LightningCLI shows its
fields as ``model.arch.<field>``. Impossible combinations are refused when the config is built,
naming the combination and what would work; sizes derived from the fields (``head_dim``,
``kv_heads``, ``q_per_kv``) are properties here and nowhere else. Device-dependent checks (can this
kernel run on this GPU?) stay with the model: ``TinyGPT.check_kernel``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import torch.nn as nn

from lit_xf.attention import (
    ATTENTION_CHOICES,
    FA4_WINDOWLESS_PLANS,
    POSITION_SCHEMES,
    KernelName,
    PositionScheme,
    check_window,
)

FfnName = Literal["swiglu", "gelu"]
FFN_NAMES: tuple[str, ...] = get_args(FfnName)
NormName = Literal["layernorm", "rmsnorm"]
NORM_NAMES: tuple[str, ...] = get_args(NormName)
MlpKernel = Literal["auto", "torch", "quack"]
MLP_KERNELS: tuple[str, ...] = get_args(MlpKernel)
GeluApprox = Literal["tanh", "exact"]
GELU_APPROXES: tuple[str, ...] = get_args(GeluApprox)
Checkpointing = Literal["none", "selective", "full"]
CHECKPOINTING: tuple[str, ...] = get_args(Checkpointing)

# Fields that fix the weights' shapes or meaning: a checkpoint must agree with the model on all of them.
WEIGHT_FIELDS: tuple[str, ...] = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "positions",
    "ffn",
    "norm",
    "tie_embeddings",
    "head_dim",
    "intermediate_size",
    "qkv_bias",
    "proj_bias",
    "mlp_bias",
    "norm_bias",
)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The architecture of a TinyGPT. The defaults are the tutorial's model: d=128, 3 layers, 8
    heads, SwiGLU with hidden 4·d, LayerNorm, learned absolute positions.

    Args:
        vocab_size: number of token ids (under ``lit-xf``: the data's tokenizer sets it).
        d_model: width of the residual stream.
        n_layers: number of transformer blocks.
        n_heads: query heads; divides ``d_model`` unless ``head_dim`` is given.
        n_kv_heads: key/value heads for grouped-query attention; divides ``n_heads``; null means
            ``n_heads``; 1 is multi-query.
        max_seq_len: longest row (tokens) the model accepts (under ``lit-xf``: ``data.seq_len``).
        attention: attention kernel: ``auto naive sdpa xformers flex fa4``, or ``fa4:<plan>`` with
            fa4's plan for packed rows forced (``grouped``, ``per_document``, ``block_sparse``).
        positions: ``learned`` (absolute embeddings), ``rope``, ``alibi`` or ``none``. Positions
            count inside each document, so they restart at every document of a packed row.
        ffn: ``swiglu``, ``gelu``, or a factory ``dim -> nn.Module`` called once per layer (in YAML:
            ``{class_path: lit_xf.model.SwiGLU, init_args: {hidden_mult: 2.667}}``).
        norm: ``layernorm`` or ``rmsnorm``.
        tie_embeddings: share the token embedding with the output projection.
        dropout: dropout probability on each block's two residual branches.
        rope_base: RoPE's base θ: pair i of a head rotates by position · θ^(−2i/head_dim).
        mlp_kernel: how ``ffn: gelu`` runs: ``torch``, ``quack`` (bias + GELU fused into
            quack-kernels' GEMMs; CUDA, Hopper+, bf16/fp16) or ``auto`` (quack where it can run).
        attention_window: sliding-window attention: each token attends to at most this many most
            recent tokens of its document, itself included (null: all of them).
        head_dim: width K of every query, key and value head (null: d_model / n_heads). The q/k/v
            projection is d_model -> (H + 2G)·K, the output projection H·K -> d_model.
        intermediate_size: hidden width of ``ffn: gelu`` / ``swiglu`` (null: 4·d_model).
        qkv_bias: bias on the q/k/v projection (GPT-2, Qwen2).
        proj_bias: bias on the attention output projection (GPT-2).
        mlp_bias: biases in the FFN's two (SwiGLU: three) projections (null: gelu has them,
            swiglu not).
        norm_bias: LayerNorm's additive bias (null: yes; RMSNorm has none, so only null/false).
        norm_eps: ε of every norm, x / sqrt(mean + ε) (null: LayerNorm 1e-5, RMSNorm the dtype's
            ``finfo.eps``).
        gelu: ``tanh`` (GPT-2's approximation, ``gelu_new``) or ``exact`` (erf) GELU in ``ffn: gelu``.
        activation_checkpointing: recompute blocks' activations in the backward instead of keeping
            them (``torch.utils.checkpoint``, non-reentrant): ``none``; ``selective``, the
            even-numbered blocks (about half the activations kept, a third more block compute on
            the checkpointed ones); ``full``, every block (only each block's input kept). See
            docs/memory.md.
    """

    vocab_size: int = 258
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 8
    n_kv_heads: int | None = None
    max_seq_len: int = 512
    attention: KernelName = "auto"
    positions: PositionScheme = "learned"
    ffn: str | Callable[[int], nn.Module] = "swiglu"
    norm: NormName = "layernorm"
    tie_embeddings: bool = False
    dropout: float = 0.0
    rope_base: float = 10000.0
    mlp_kernel: MlpKernel = "torch"
    attention_window: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    qkv_bias: bool = False
    proj_bias: bool = False
    mlp_bias: bool | None = None
    norm_bias: bool | None = None
    norm_eps: float | None = None
    gelu: GeluApprox = "tanh"
    activation_checkpointing: Checkpointing = "none"

    def __post_init__(self) -> None:
        _check_sizes(self)
        _check_names(self)
        _check_mlp_kernel(self.mlp_kernel, self.ffn, self.gelu)
        _check_window(self.attention_window, self.attention)
        _check_ffn_options(self)
        _check_norm_options(self)
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ValueError(
                f"unknown activation_checkpointing {self.activation_checkpointing!r}; "
                f"choose one of {', '.join(CHECKPOINTING)}"
            )

    # -- derived sizes ---------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        """Key/value heads G: ``n_kv_heads``, or ``n_heads`` when that is null."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        """K, the width of every query, key and value head: ``head_dim``, or d_model / n_heads."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """Hidden width of the named FFNs: ``intermediate_size``, or 4·d_model."""
        return self.intermediate_size or 4 * self.d_model

    @property
    def q_per_kv(self) -> int:
        """Query heads that share one key/value head: H / G."""
        return self.n_heads // self.kv_heads

    # -- plain values ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (what checkpoints store); ``GPTConfig.from_dict`` reverses it."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GPTConfig:
        """``GPTConfig(**values)``, refusing unknown keys by name."""
        unknown = sorted(set(values) - set(FIELD_NAMES))
        if unknown:
            known = ", ".join(FIELD_NAMES)
            raise ValueError(f"unknown GPTConfig field(s) {', '.join(unknown)}; the fields are {known}")
        return cls(**values)


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(GPTConfig))


def _check_sizes(c: GPTConfig) -> None:
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
        value = getattr(c, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if c.n_kv_heads is not None and (not isinstance(c.n_kv_heads, int) or c.n_kv_heads < 1):
        raise ValueError(f"n_kv_heads must be a positive integer or None (= n_heads), got {c.n_kv_heads!r}")
    for name in ("head_dim", "intermediate_size"):
        value = getattr(c, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None (the default width), got {value!r}")
    if c.d_model % c.n_heads and c.head_dim is None:
        divisor = max(h for h in range(1, min(c.n_heads, c.d_model) + 1) if c.d_model % h == 0)
        raise ValueError(
            f"n_heads={c.n_heads} must divide d_model={c.d_model} (e.g. n_heads={divisor}), or set head_dim"
        )
    if c.n_heads % c.kv_heads:
        divisors = [g for g in range(1, c.n_heads + 1) if c.n_heads % g == 0]
        raise ValueError(f"n_kv_heads={c.kv_heads} must divide n_heads={c.n_heads} (divisors: {divisors})")
    if c.head_size % 2 and c.positions == "rope":
        what = f"head_dim={c.head_dim}" if c.head_dim else f"d_model/n_heads={c.head_size}"
        raise ValueError(f"RoPE needs an even head dim, got {what} (it rotates pairs of dims)")
    if not 0 <= c.dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {c.dropout!r}")
    if not c.rope_base > 0:
        raise ValueError(f"rope_base must be positive, got {c.rope_base!r}")


def _check_names(c: GPTConfig) -> None:
    if c.attention not in ATTENTION_CHOICES:
        raise ValueError(f"unknown attention kernel {c.attention!r}; choose one of {', '.join(ATTENTION_CHOICES)}")
    if c.positions not in POSITION_SCHEMES:
        raise ValueError(f"unknown positions {c.positions!r}; choose one of {', '.join(POSITION_SCHEMES)}")
    if c.ffn not in FFN_NAMES if isinstance(c.ffn, str) else not callable(c.ffn):
        raise ValueError(
            f"unknown ffn {c.ffn!r}; choose one of {', '.join(FFN_NAMES)} or pass a factory dim -> nn.Module"
        )
    if c.norm not in NORM_NAMES:
        raise ValueError(f"unknown norm {c.norm!r}; choose one of {', '.join(NORM_NAMES)}")


def _check_mlp_kernel(mlp_kernel, ffn, gelu) -> None:
    if mlp_kernel not in MLP_KERNELS:
        raise ValueError(f"unknown mlp_kernel {mlp_kernel!r}; choose one of {', '.join(MLP_KERNELS)}")
    if mlp_kernel == "quack" and ffn != "gelu":
        raise ValueError(
            f"mlp_kernel='quack' fuses the GELU MLP only (ffn='gelu'), not ffn={ffn!r}; use 'auto' or 'torch'"
        )
    if mlp_kernel == "quack" and gelu != "tanh":
        raise ValueError(
            f"mlp_kernel='quack' fuses the tanh GELU only, not gelu={gelu!r}; use mlp_kernel 'auto' or 'torch'"
        )


def _check_ffn_options(c: GPTConfig) -> None:
    if c.gelu not in GELU_APPROXES:
        raise ValueError(f"unknown gelu {c.gelu!r}; choose one of {', '.join(GELU_APPROXES)}")
    named = isinstance(c.ffn, str)
    for name, value, default in (("intermediate_size", c.intermediate_size, None), ("mlp_bias", c.mlp_bias, None)):
        if value != default and not named:
            raise ValueError(
                f"{name}={value!r} applies to ffn 'gelu' or 'swiglu', not to a factory (set it in the factory's "
                "init_args instead)"
            )
    if c.gelu != "tanh" and c.ffn != "gelu":
        raise ValueError(f"gelu={c.gelu!r} chooses ffn='gelu''s activation; ffn={c.ffn!r} has no GELU")


def _check_norm_options(c: GPTConfig) -> None:
    if c.norm_bias and c.norm == "rmsnorm":
        raise ValueError("norm_bias=True: RMSNorm has no bias; use norm='layernorm' or leave norm_bias null")
    if c.norm_eps is not None and not (isinstance(c.norm_eps, int | float) and 0 < c.norm_eps < 1):
        raise ValueError(f"norm_eps must be a small positive number (e.g. 1e-5) or null, got {c.norm_eps!r}")


def _check_window(window, attention) -> None:
    check_window(window)
    if window is not None and attention.startswith("fa4:") and attention[4:] in FA4_WINDOWLESS_PLANS:
        raise ValueError(
            f"attention={attention!r} has no sliding window (its mask sees whole documents); "
            "use attention='fa4', 'fa4:per_document' or 'auto' with attention_window"
        )
