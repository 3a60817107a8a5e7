"""TinyGPT: a decoder-only transformer built from a pluggable attention kernel and a pluggable FFN.

Pre-norm blocks: x ← x + Attn(Norm(x)); x ← x + FFN(Norm(x)). Plain ``nn.Module``, no Lightning.
Its architecture is one ``GPTConfig`` (``lit_xf.config``: fields, defaults, validation).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lit_xf.attention import AttentionContext, DocLayout, alibi_slopes, bias_on_device, make_kernel
from lit_xf.config import MLP_KERNELS, GPTConfig, MlpKernel
from lit_xf.memory_estimate import checkpointed_layers

log = logging.getLogger(__name__)


class SwiGLU(nn.Module):
    """w3( silu(x W1) ⊙ x W2 ), with W1 and W2 fused into one ``w12`` matmul (W1's rows first);
    hidden = ``hidden``, else mult·dim. (xformers' fused SwiGLU only has an eager path in 0.0.35, so
    this is the same math in torch.)"""

    def __init__(self, dim: int, hidden_mult: float = 4.0, bias: bool = False, hidden: int | None = None):
        super().__init__()
        hidden = hidden or int(hidden_mult * dim)
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)
        self.w3.is_residual_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class GeluMLP(nn.Module):
    """fc2( gelu(x fc1 + b1) ) + b2, hidden = ``hidden``, else mult·dim (GPT-2's MLP). ``approximate``:
    ``"tanh"`` (GPT-2's ``gelu_new``) or ``"none"`` (exact, erf).

    ``kernel``: ``"torch"`` runs two matmuls and the GELU between them (Inductor's kernel when
    compiled); ``"quack"`` runs quack-kernels' GEMMs with bias + GELU in the first one's epilogue
    and dGELU in the backward's, so no [tokens, hidden] pass of its own is left for the GELU
    (CUDA, Hopper or newer, bf16/fp16 compute); ``"auto"`` takes quack where it can run
    (``quack_mlp_problem``), else torch (quack fuses the tanh GELU only). Same weights either way."""

    def __init__(
        self,
        dim: int,
        hidden_mult: float = 4.0,
        bias: bool = True,
        kernel: MlpKernel = "torch",
        hidden: int | None = None,
        approximate: Literal["tanh", "none"] = "tanh",
    ):
        super().__init__()
        if kernel not in MLP_KERNELS:
            raise ValueError(f"unknown mlp_kernel {kernel!r}; choose one of {', '.join(MLP_KERNELS)}")
        if approximate not in ("tanh", "none"):
            raise ValueError(f"unknown GELU approximate={approximate!r}; choose 'tanh' or 'none' (exact)")
        if kernel == "quack" and approximate != "tanh":
            raise ValueError("mlp_kernel='quack' fuses the tanh GELU only; use 'torch' for the exact GELU")
        hidden = hidden or int(hidden_mult * dim)
        self.approximate = approximate
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.fc2.is_residual_projection = True
        self.kernel = kernel

    def quack_problem(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """``quack_mlp_problem`` for this MLP's widths and GELU."""
        if self.approximate != "tanh":
            return "it fuses the tanh GELU only, this MLP has the exact GELU"
        return quack_mlp_problem(torch.device(device), dtype, self.fc1.in_features, self.fc1.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != "torch":
            problem = self.quack_problem(x.device, _compute_dtype(x.device, x.dtype))
            if problem is None:
                from quack.mlp import mlp_func

                return mlp_func(x, self.fc1.weight, self.fc2.weight, "gelu_tanh_approx", self.fc1.bias, self.fc2.bias)
            if self.kernel == "quack":
                raise RuntimeError(f"mlp_kernel='quack' can't run this call: {problem}; use 'auto' or 'torch'")
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


@torch.compiler.assume_constant_result  # compiled forwards take the answer as a constant
def quack_mlp_problem(device: torch.device, dtype: torch.dtype, dim: int = 8, hidden: int = 8) -> str | None:
    """Why quack's fused GELU MLP can't run on ``device`` with ``dtype`` compute (autocast's dtype
    when on) and these widths, or None."""
    if dtype not in (torch.float16, torch.bfloat16):
        return f"it computes in bf16/fp16, this call in {dtype} (train with precision bf16-mixed or 16-mixed)"
    if dim % 8 or hidden % 8:
        return f"its GEMMs need widths that are multiples of 8, got d_model={dim}, hidden={hidden}"
    return _quack_device_problem(torch.device(device))


@functools.cache
def _quack_device_problem(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"it is CUDA-only (device: {device.type})"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"it needs a Hopper or newer GPU (compute capability 9.0+), this one is {major}.{minor}"
    try:
        from quack.mlp import mlp_func
    except ImportError:
        return "quack-kernels is not installed (it comes with pip install 'lit_xf[fa4]')"
    except Exception as e:  # broken install
        return f"quack-kernels failed to import ({_first_line(e)})"
    return quack_call_problem(mlp_func, device)


def quack_call_problem(mlp_func: Callable, device: torch.device) -> str | None:
    """Why one small fused MLP through ``mlp_func`` fails on ``device``, forward and backward, or
    None. quack imports parts of itself at the first call (and some of its versions fail there with
    some nvidia-cutlass-dsl versions), so importing it is not enough to know that it runs."""
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            x_MD, w1_FD, w2_DF = (torch.full(s, 0.01, device=device, dtype=torch.bfloat16) for s in _SMOKE_SHAPES)
            x_MD.requires_grad_()
            mlp_func(x_MD, w1_FD, w2_DF, "gelu_tanh_approx").float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    except Exception as e:
        return f"quack-kernels failed a fused-MLP check on {device} ({_first_line(e)})"
    return None


_SMOKE_SHAPES = ((128, 64), (128, 64), (64, 128))  # x [M, D], fc1 weight [F, D], fc2 weight [D, F]


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"


FFNS: dict[str, Callable[[int], nn.Module]] = {"swiglu": SwiGLU, "gelu": GeluMLP}
NORMS: dict[str, type[nn.Module]] = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


def ffn_factory(c: GPTConfig) -> Callable[[int], nn.Module]:
    """``dim -> FFN`` for the config: its factory, or the named FFN with the config's width, biases,
    GELU and MLP kernel."""
    if not isinstance(c.ffn, str):
        return c.ffn
    options = {"hidden": c.ffn_hidden} | ({} if c.mlp_bias is None else {"bias": c.mlp_bias})
    if c.ffn == "gelu":
        options |= {"kernel": c.mlp_kernel, "approximate": "tanh" if c.gelu == "tanh" else "none"}
    return functools.partial(FFNS[c.ffn], **options)


def norm_factory(c: GPTConfig) -> Callable[[int], nn.Module]:
    """``dim -> norm`` for the config: LayerNorm (ε 1e-5, bias unless ``norm_bias`` is false) or
    RMSNorm (ε the dtype's ``finfo.eps``), ``norm_eps`` replacing either ε."""
    options = {} if c.norm_eps is None else {"eps": c.norm_eps}
    if c.norm == "layernorm" and c.norm_bias is False:
        options["bias"] = False
    return functools.partial(NORMS[c.norm], **options)


CompileMode = Literal["blocks", "model", "cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)


def rope_rotate(x_BTHK: torch.Tensor, cos_BT1K: torch.Tensor, sin_BT1K: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Su et al.): pairs (x_i, x_{i+K/2}) rotated by angle pos·θ_i."""
    x1, x2 = x_BTHK.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x_BTHK * cos_BT1K + rotated * sin_BT1K).to(x_BTHK.dtype)


class SelfAttention(nn.Module):
    """Fused q/k/v projection (H query heads, G kv heads), optional RoPE, the shared kernel, output
    projection."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_size
        d_model, H, G, K = config.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        self.qkv = nn.Linear(d_model, (H + 2 * G) * K, bias=config.qkv_bias)  # rows: H q heads, G k, G v
        self.proj = nn.Linear(H * K, d_model, bias=config.proj_bias)
        self.proj.is_residual_projection = True

    def forward(self, x_BTD: torch.Tensor, ctx: AttentionContext, rope: tuple | None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, G, K = self.n_heads, self.n_kv_heads, self.head_dim
        qkv_BTCK = self.qkv(x_BTD).view(B, T, H + 2 * G, K)
        if rope is None:
            out_BTHK = ctx.kernel.attend_qkv(qkv_BTCK, G, ctx)
        else:
            q, k, v = qkv_BTCK.split((H, G, G), dim=2)
            out_BTHK = ctx.kernel(rope_rotate(q, *rope), rope_rotate(k, *rope), v, ctx)
        return self.proj(out_BTHK.reshape(B, T, H * K))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, ffn: nn.Module, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.norm1, self.attn = norm(config.d_model), SelfAttention(config)
        self.norm2, self.ffn = norm(config.d_model), ffn
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x_BTD: torch.Tensor, ctx: AttentionContext, rope: tuple | None) -> torch.Tensor:
        x_BTD = x_BTD + self.drop(self.attn(self.norm1(x_BTD), ctx, rope))
        return x_BTD + self.drop(self.ffn(self.norm2(x_BTD)))


class TinyGPT(nn.Module):
    """Decoder-only transformer with the architecture ``config`` (a ``GPTConfig``; default
    ``GPTConfig()``). Keyword arguments override its fields, so ``TinyGPT(d_model=256, n_layers=4)``
    is ``TinyGPT(GPTConfig(d_model=256, n_layers=4))``."""

    def __init__(self, config: GPTConfig | None = None, **fields):
        super().__init__()
        config = GPTConfig() if config is None else config
        if not isinstance(config, GPTConfig):
            raise TypeError(f"TinyGPT takes a GPTConfig, got {type(config).__name__}: TinyGPT(GPTConfig(...))")
        if fields:
            config = dataclasses.replace(config, **fields)  # validated again
        self.config = c = config
        self.kernel = make_kernel(c.attention)

        ffn, norm = ffn_factory(c), norm_factory(c)
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.max_seq_len, c.d_model) if c.positions == "learned" else None
        self.blocks = nn.ModuleList(Block(c, ffn(c.d_model), norm) for _ in range(c.n_layers))
        #: Blocks whose activations are recomputed in the backward (``activation_checkpointing``);
        #: emptied when a sharded strategy checkpoints them instead (``LitTinyGPT.configure_model``).
        self.checkpoint_layers = frozenset(checkpointed_layers(c.activation_checkpointing, c.n_layers))
        self.norm_f = norm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        # ALiBi slopes per (device, dtype), built where first needed (``alibi_slopes_for``)
        self._alibi_slopes: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.apply(lambda m: _init_weights(m, c.n_layers))
        self.compile_mode: str | None = None
        self.record_plan_bytes, self.last_plan_bytes = False, 0
        self._compiled_tokens: Callable | None = None
        # An explicit kernel that can't run on this machine fails now, not mid-step.
        self.check_kernel(torch.device("cuda" if torch.cuda.is_available() else "cpu"), training=False)

    # The config's fields the forward pass and the monitors read.
    @property
    def n_heads(self) -> int:
        return self.config.n_heads

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads, resolved (``GPTConfig.kv_heads``)."""
        return self.config.kv_heads

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    @property
    def positions(self) -> str:
        return self.config.positions

    @property
    def position_dtype(self) -> torch.dtype:
        """The precision of RoPE angles and ALiBi slopes: float64 in a float64 model, else float32."""
        return torch.float64 if self.tok_emb.weight.dtype == torch.float64 else torch.float32

    def alibi_slopes_for(self, device: torch.device) -> torch.Tensor | None:
        """ALiBi's head slopes ``[H]`` in ``position_dtype`` on ``device`` (None without ALiBi)."""
        if self.positions != "alibi":
            return None
        key = (torch.device(device), self.position_dtype)
        if key not in self._alibi_slopes:
            self._alibi_slopes[key] = alibi_slopes(self.n_heads, dtype=key[1]).to(key[0])
        return self._alibi_slopes[key]

    def rope_angles(self, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's (cos, sin) ``[B, T, 1, K]``: pair i of a head (dims i and i + K/2) turns by
        pos·θ_i, θ_i = 1 / base^(2i/K), computed in ``position_dtype``."""
        K, dtype = self.config.head_size, self.position_dtype
        inv_freq_K2 = 1.0 / self.config.rope_base ** (
            torch.arange(0, K, 2, dtype=dtype, device=position_ids_BT.device) / K
        )
        angles_BTK = position_ids_BT[..., None].to(dtype) * inv_freq_K2
        angles_BT1K = torch.cat((angles_BTK, angles_BTK), dim=-1)[:, :, None, :]
        return angles_BT1K.cos(), angles_BT1K.sin()

    @property
    def mlp_kernel(self) -> str:
        return self.config.mlp_kernel

    @property
    def attention_window(self) -> int | None:
        return self.config.attention_window

    def check_kernel(self, device: torch.device, training: bool) -> None:
        """Raise ``ValueError`` if the configured attention kernel, or an explicit ``quack`` MLP
        kernel, can't run this model on ``device``."""
        self.kernel.check(
            device=device,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            alibi=self.positions == "alibi",
            training=training,
            seq_len=self.max_seq_len,
        )
        if self.mlp_kernel == "quack":
            problem = self.blocks[0].ffn.quack_problem(device, torch.bfloat16)
            if problem:
                raise ValueError(f"mlp_kernel='quack' can't run here: {problem}. Use mlp_kernel='auto' or 'torch'")

    def mlp_kernel_name(self, device: torch.device, dtype: torch.dtype) -> str:
        """What the GELU MLPs run on ``device`` with ``dtype`` compute: ``quack``, or ``torch`` (for
        ``auto``, with the reason quack can't run)."""
        mlp = self.blocks[0].ffn
        if not isinstance(mlp, GeluMLP) or mlp.kernel == "torch":
            return "torch"
        problem = mlp.quack_problem(device, dtype)
        return "quack" if problem is None else f"torch (quack: {problem})"

    @property
    def attention_kernel_name(self) -> str:
        """The kernel in use (for ``auto``, its latest choice)."""
        return getattr(self.kernel, "last_choice", None) or self.kernel.name

    @property
    def attention_kernel_reason(self) -> str:
        """Why that kernel (for ``auto``: what it measured per case, ``AutoAttention.explain``)."""
        return self.kernel.explain()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_lens: list[list[int]] | None = None,
        *,
        eager: bool = False,
        hidden: bool = False,
        layout: DocLayout | None = None,
        attn_bias=None,
    ) -> torch.Tensor:
        """``input_ids [B, T]`` → logits ``[B, T, V]``, or with ``hidden`` the final normed states
        ``[B, T, D]`` that ``lm_head`` projects (for a loss fused with it). ``doc_lens`` (documents
        per row, as in the batch contract) confines attention to each document; ``position_ids
        [B, T]`` default to positions inside each document. ``eager`` bypasses a whole-model
        compilation (see ``compile_model``), e.g. for calls whose shapes change every time.
        ``layout`` (the batch's ``attn_layout``) is used instead of building one from ``doc_lens``
        when it has this call's shape and window, and then ``attn_bias`` (the batch's xformers bias
        for that layout) is handed to the kernel; otherwise both are ignored."""
        B, T = input_ids.shape
        if T > self.max_seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_seq_len={self.max_seq_len}")
        device = input_ids.device
        window = self.attention_window
        if layout is None or not layout.fits(B, T, window):  # none from the batch, or for another shape
            attn_bias = None
            if doc_lens is None:
                layout = DocLayout.full_rows(B, T, window=window)
            else:
                layout = DocLayout(doc_lens, T, window=window)
        if attn_bias is not None and not bias_on_device(attn_bias, device):
            attn_bias = None
        if position_ids is None:
            position_ids = layout.position_ids(device)
        # The bias is built here, outside any compiled region, once per forward for every layer.
        ctx = self.kernel.prepare(
            layout,
            position_ids,
            self.alibi_slopes_for(device),
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            dtype=_compute_dtype(device, self.tok_emb.weight.dtype),
            device=device,
            head_dim=self.config.head_size,
            layers=len(self.blocks),
            qkv_stacked=self.positions != "rope",  # SelfAttention calls attend_qkv without RoPE
            bias=attn_bias,
        )
        if self.record_plan_bytes:  # for lit_xf.callbacks.MemoryBreakdown's memory/attention_plan_mib
            self.last_plan_bytes = ctx.plan.nbytes() if ctx.plan is not None else 0
        if self._compiled_tokens is None or eager or not ctx.traceable:
            x_BTD = self.forward_tokens(input_ids, position_ids, ctx)
        else:
            if self.compile_mode == "cudagraphs":
                # Each call is a new step: the previous call's outputs may be overwritten from here on.
                torch.compiler.cudagraph_mark_step_begin()
            x_BTD = self._compiled_tokens(input_ids, position_ids, ctx)
        return x_BTD if hidden else self.lm_head(x_BTD)

    def forward_tokens(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        """Embeddings → blocks → final norm for a prepared attention context (the compiled region;
        the output projection stays outside, where a fused loss can take it)."""
        x_BTD = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x_BTD = x_BTD + self.pos_emb(position_ids)
        rope = self.rope_angles(position_ids) if self.positions == "rope" else None
        for i, block in enumerate(self.blocks):
            if i in self.checkpoint_layers and torch.is_grad_enabled():
                # Non-reentrant: the recompute reuses this forward's ctx (no plan rebuilt) and
                # replays the RNG state, so dropout draws the same masks.
                x_BTD = checkpoint(block, x_BTD, ctx, rope, use_reentrant=False)
            else:
                x_BTD = block(x_BTD, ctx, rope)
        return self.norm_f(x_BTD)

    def compile_model(self, mode: CompileMode) -> None:
        """``torch.compile`` in place, attention bias building always left outside:

        - ``blocks``: each block on its own (regional; any batch layout, few recompiles);
        - ``model``: embeddings → logits as one graph. Batches whose attention bias can't be traced
          (xformers' block-diagonal masks hold each batch's lengths as Python lists) run eagerly;
        - ``cudagraphs``: ``model`` replayed as CUDA graphs (``mode="reduce-overhead"``) for
          launch-bound small models with fixed batch shapes. A forward's outputs stay valid until
          the next forward.
        """
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        if self.compile_mode is not None:
            raise RuntimeError(f"the model is already compiled (mode {self.compile_mode!r})")
        self.compile_mode = mode
        if mode == "cudagraphs" and any(getattr(b.ffn, "kernel", "torch") != "torch" for b in self.blocks):
            log.warning(
                "compile='cudagraphs' with mlp_kernel=%r: quack's MLP under CUDA graphs ran 7x slower than "
                "compiled blocks on the 124M config's packed rows (docs/benchmarks.md); consider compile='blocks' "
                "or mlp_kernel='torch'",
                self.mlp_kernel,
            )
        if mode == "blocks":
            for block in self.blocks:
                block.compile()
        else:
            self._compiled_tokens = torch.compile(
                self.forward_tokens, dynamic=False, mode="reduce-overhead" if mode == "cudagraphs" else None
            )

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n


def _compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype q/k/v will have: autocast's when it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def _init_weights(module: nn.Module, n_layers: int) -> None:
    """N(0, 0.02); residual projections N(0, 0.02/√(2·layers)) (GPT-2); zero biases."""
    if isinstance(module, nn.Linear):
        std = 0.02 / math.sqrt(2 * n_layers) if getattr(module, "is_residual_projection", False) else 0.02
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
