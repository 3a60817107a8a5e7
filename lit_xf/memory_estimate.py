"""Predicted peak training memory of a TinyGPT step, derived tensor by tensor (pure arithmetic).

Bytes of an optimizer step's peak on one CUDA device, as ``torch.cuda.max_memory_allocated`` counts
them (tensors only: no CUDA context, no allocator cache). N = B·T tokens per micro-batch, D the
width, H/G query/kv heads of width K, F the FFN's hidden width, V the vocabulary, L the layers.
Byte widths: ``s`` of activations (2 under 16-bit compute, 4 in fp32), ``r`` of the residual
stream (4 under ``*-mixed``: embeddings and norms run in fp32 under autocast), ``w`` of weights
(4, or 2 under ``*-true`` 16-bit).

What one block's forward saves for its backward (per token unless said):

=====================  ===============================================================
residual in, mid       r·D each (norm1 and norm2 save their inputs) + norm statistics
                       (mean and rstd, fp32: 8; RMSNorm rstd only: 4), per norm
norm outputs           s·D each, the 16-bit copies the next linear saves (fp32: itself)
qkv                    s·(H+2G)·K (the kernel keeps views of the projection's output);
                       naive: s·3H·K, its batched matmuls' copies of q, k and v
RoPE                   s·(H+G)·K: the rotated q and k (naive: within its copies)
attention              s·H·K output (the output projection saves the same tensor) +
                       4·H log-sum-exp; naive: softmax probabilities s·H·T instead of
                       the log-sum-exp (and the output's copy, not a view); sdpa with a dense
                       boolean mask (packed rows, windows): + the float bias it builds
                       per call, s·B·T·⌈T/16⌉·16 per layer; xformers with GQA: +2·s·H·K
                       for the repeated K/V
FFN                    GELU: s·F pre-activation + s·F activation; SwiGLU: s·2F (x W12) +
                       s·F silu + s·F product
dropout (p > 0)        1·D per branch (boolean masks)
weight copies          2 bytes per Linear weight and bias under ``*-mixed`` (autocast's
                       bf16 copies, saved by the linears) — per layer, not per token
=====================  ===============================================================

Outside the blocks: the batch's int64 ``input_ids``, ``labels``, ``position_ids`` (24 per token),
RoPE's fp32 cos/sin (8·K per token, shared by the layers), the attention plan (dense masks and
biases: naive/sdpa 1 or s bytes per B·(1|H)·T² entry, built once per forward), the final norm's
input r·D + 8 and the 16-bit copy of its output s·D, and the loss: ``linear_cross_entropy`` keeps
the logits [N, V] (s bytes each) and overwrites them with their gradient, plus a 16-bit copy of
the output weight (V·D·2) under ``*-mixed``. Its backward adds dh (4·N·D) and dW (4·V·D).

Activation checkpointing: a checkpointed block keeps only its input (r·D per token); its backward
recomputes its forward, so one block's full activations come back for the duration of that
block's backward. ``full`` checkpoints every block, ``selective`` the even-numbered ones
(0, 2, …: ⌈L/2⌉ of L), see ``lit_xf.model.checkpointed_blocks``.

Persistent: weights w·P, AdamW's two states (fp32 under mixed and fp32 precision: 8·P; 2w·P
otherwise), gradients w·P once the backward has made them (and during the forward under gradient
accumulation). The foreach AdamW (CPU, or fp16 with clipping) adds one 4·P temporary; fused adds
none.

The peak is the largest of these moments: the forward's end (+ the loss's fp32 hidden input under
mixed, + the previous step's gradients: Lightning's ``zero_grad`` runs after ``training_step``,
before the backward, so they live through every forward after the first), the loss's backward (+
dh, dW), each block's backward from the last to the first (the remaining blocks' activations, the
gradients made so far and a block's backward temporaries: 2·r·D + c·s·F per token with c = 2 for
GELU, 4 for SwiGLU, + 2·s·H·T of naive's score gradients, + s bytes per weight of the block's
largest matrix), the embedding's backward (all gradients + a dense V·D fp32 gradient) and the
optimizer step (all gradients + temporaries).

Kernels. ``auto`` is estimated as an O(T) kernel: on a GPU it picks the fastest measured one and
those were cuDNN / flash SDPA for plain causal rows and fa4 / xformers block-diagonal for packed
rows (``docs/attention.md``); a run's ``run/info`` names the kernel it took. These are GPU paths:
on a CPU, SDPA's math backend and the loss's non-Triton path keep other tensors.

This module imports nothing from torch: ``lit-xf estimate`` builds the inputs (``ModelDims``) from
a config with the model on the meta device and the arithmetic itself runs anywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = [
    "CHECKPOINTING_MODES",
    "GPUS",
    "HEADROOM",
    "Estimate",
    "ModelDims",
    "RunShape",
    "attention_memory_kind",
    "checkpointed_layers",
    "estimate",
    "format_bytes",
    "gpu_capacity",
    "largest_batch_size",
    "table",
]

CHECKPOINTING_MODES = ("none", "selective", "full")

#: Device memory by name, bytes as ``nvidia-smi`` lists each card's total (MiB · 2^20).
GPUS: dict[str, int] = {
    "h200": 143771 * 2**20,
    "h100": 81559 * 2**20,
    "a100-80gb": 81920 * 2**20,
    "a100-40gb": 40960 * 2**20,
}
#: Fraction of a card's total that a predicted peak may take and still count as fitting: the CUDA
#: context (~0.5 GiB), the caching allocator's fragmentation (reserved above allocated) and the
#: estimate's own error need the rest.
HEADROOM = 0.9

_O_T_KERNELS = ("sdpa", "xformers", "flex", "fa4")


@dataclass(frozen=True)
class ModelDims:
    """A model's sizes, as the estimate needs them (``lit_xf.memory_dims`` reads them off a model).

    ``params``: distinct parameter elements (tied weights once); ``block_linear``: elements of one
    block's Linear weights and biases; ``block_largest_matrix``: the largest weight of a block."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: str  # "gelu" or "swiglu"
    ffn_hidden: int
    params: int
    block_linear: int
    block_largest_matrix: int
    norm: str = "layernorm"
    positions: str = "learned"
    dropout: float = 0.0
    tie_embeddings: bool = False
    attention_window: int | None = None


@dataclass(frozen=True)
class RunShape:
    """What a training step looks like: rows, precision, kernel, checkpointing.

    ``attention``: the configured kernel (``auto``, ``naive``, ``sdpa``, ``xformers``, ``flex``,
    ``fa4`` or ``fa4:<plan>``); ``fused_optimizer``: AdamW's fused CUDA step (lit_xf's default on
    CUDA unless fp16 gradients are clipped)."""

    batch_size: int
    seq_len: int
    batch_mode: str = "packed"
    precision: str = "bf16-mixed"
    attention: str = "auto"
    activation_checkpointing: str = "none"
    accumulate_grad_batches: int = 1
    fused_optimizer: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {self.batch_size} and {self.seq_len}")
        if self.activation_checkpointing not in CHECKPOINTING_MODES:
            raise ValueError(
                f"activation_checkpointing={self.activation_checkpointing!r}: "
                f"use one of {', '.join(CHECKPOINTING_MODES)}"
            )
        if self.batch_mode not in ("padded", "packed", "concat"):
            raise ValueError(f"batch_mode={self.batch_mode!r}: use padded, packed or concat")

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass
class Estimate:
    """The predicted peak: ``terms`` (name -> bytes) held at the peak moment ``phase``."""

    peak: int
    phase: str
    terms: dict[str, int]
    block_parts: dict[str, int]  # one non-checkpointed block's saved tensors, bytes
    phases: dict[str, int]  # every candidate moment's total
    tokens_per_step: int
    kernel_kind: str
    shape: RunShape
    notes: list[str] = field(default_factory=list)

    @property
    def dominant(self) -> str:
        return max(self.terms, key=self.terms.get)

    def largest(self, n: int = 3) -> list[tuple[str, int]]:
        return sorted(self.terms.items(), key=lambda kv: -kv[1])[:n]

    def to_dict(self) -> dict:
        return {
            "peak_bytes": self.peak,
            "peak_gib": self.peak / 2**30,
            "phase": self.phase,
            "dominant": self.dominant,
            "terms_bytes": dict(self.terms),
            "block_parts_bytes": dict(self.block_parts),
            "phases_bytes": dict(self.phases),
            "tokens_per_step": self.tokens_per_step,
            "attention_memory": self.kernel_kind,
            "shape": dataclasses.asdict(self.shape),
            "notes": list(self.notes),
        }


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``, binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _widths(precision: str) -> tuple[int, int, int, bool]:
    """(s activation, r residual, w weight bytes, mixed) of a Lightning precision string."""
    p = str(precision)
    if p.endswith("-mixed"):
        if p.startswith(("bf16", "16")):
            return 2, 4, 4, True
        return 4, 4, 4, False  # "32-mixed" does not exist; treat as fp32
    if p.startswith(("bf16", "16")):
        return 2, 2, 2, False
    if p.startswith("64"):
        return 8, 8, 8, False
    return 4, 4, 4, False


def attention_memory_kind(attention: str, batch_mode: str, positions: str, window: int | None) -> str:
    """How the kernel's memory grows: ``scores`` (naive: T² probabilities per layer),
    ``dense_mask`` (sdpa with a boolean mask: a T² float bias per layer), ``dense_bias`` (an ALiBi
    T² bias built once), or ``linear`` (O(T): flash-style kernels)."""
    kernel = attention.split(":")[0]
    dense_layout = batch_mode == "packed" or window is not None
    if kernel == "naive":
        return "scores"
    if kernel == "sdpa":
        if positions == "alibi":
            return "dense_bias"
        return "dense_mask" if dense_layout else "linear"
    if kernel == "xformers" and positions == "alibi":
        return "dense_bias"
    return "linear"


def checkpointed_layers(mode: str, n_layers: int) -> list[int]:
    """Indices of the blocks a checkpointing mode recomputes: none, the even ones, or all."""
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"activation_checkpointing={mode!r}: use one of {', '.join(CHECKPOINTING_MODES)}")
    if mode == "none":
        return []
    return list(range(0, n_layers, 2)) if mode == "selective" else list(range(n_layers))


def _block_parts(m: ModelDims, run: RunShape, kind: str) -> dict[str, int]:
    """Bytes one block's forward saves for its backward (see the module docstring)."""
    s, r, _w, mixed = _widths(run.precision)
    B, T, N = run.batch_size, run.seq_len, run.tokens
    D, H, G, K, F = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_hidden
    stats = 4 if m.norm == "rmsnorm" else 8
    parts = {
        "residual": N * (2 * r * D + 2 * stats),
        "norm outputs": N * 2 * s * D,
        "qkv": N * s * (H + 2 * G) * K,
        "attention out": N * (s * H * K + 4 * H),
        "ffn": N * s * F * (4 if m.ffn == "swiglu" else 2),
    }
    if m.positions == "rope" and kind != "scores":
        parts["rope q/k"] = N * s * (H + G) * K
    if kind == "scores":
        parts["attention scores"] = B * H * T * T * s
        parts["attention out"] -= N * 4 * H  # no log-sum-exp (the projection saves the reshape's copy)
        parts["qkv"] = N * s * 3 * H * K  # the batched matmuls' copies of q, k, v (K/V repeated to H heads)
    if kind == "dense_mask":
        parts["attention mask"] = B * T * (-(-T // 16) * 16) * s
    if run.attention.split(":")[0] == "xformers" and G != H:
        parts["qkv"] += N * s * 2 * H * K
    if m.dropout > 0:
        parts["dropout masks"] = N * 2 * D
    if mixed:
        parts["weight copies"] = 2 * m.block_linear
    return parts


def _plan_bytes(m: ModelDims, run: RunShape, kind: str) -> int:
    """The attention plan built once per forward and shared by the layers."""
    s = _widths(run.precision)[0]
    B, T = run.batch_size, run.seq_len
    if kind == "scores":
        return B * (m.n_heads if m.positions == "alibi" else 1) * T * T * s
    if kind == "dense_mask":
        return B * T * T  # the boolean [B, 1, T, T] mask
    if kind == "dense_bias":
        return B * m.n_heads * T * (-(-T // 8) * 8) * s
    return 0


def estimate(m: ModelDims, run: RunShape) -> Estimate:
    """Predicted peak bytes of one optimizer step of ``m`` trained as ``run`` (module docstring)."""
    s, r, w, mixed = _widths(run.precision)
    N, D, V, L = run.tokens, m.d_model, m.vocab_size, m.n_layers
    kind = attention_memory_kind(run.attention, run.batch_mode, m.positions, m.attention_window)
    parts = _block_parts(m, run, kind)
    full_block = sum(parts.values())
    ckpt = set(checkpointed_layers(run.activation_checkpointing, L))
    kept = [N * r * D if i in ckpt else full_block for i in range(L)]  # what each block keeps

    weights = w * m.params
    optimizer = (8 if w == 4 else 2 * w) * m.params
    grads_all = w * m.params
    block_grad = w * (m.block_linear + (4 if m.norm == "layernorm" else 2) * D)
    head_grad = w * V * D
    batch = 24 * N
    shared = _plan_bytes(m, run, kind) + (8 * m.head_dim * N if m.positions == "rope" else 0)
    head_saved = N * (r * D + 8 + s * D) + N * V * s + (2 * V * D if mixed else 0)
    persistent = {"weights": weights, "optimizer state": optimizer}
    if run.accumulate_grad_batches > 1:
        persistent["gradients"] = grads_all

    def moment(extra: dict[str, int]) -> dict[str, int]:
        terms = dict(persistent)
        for k, v in extra.items():  # gradients already held (accumulation) are not made twice
            terms[k] = max(terms.get(k, 0), v) if k == "gradients" else terms.get(k, 0) + v
        return {k: int(v) for k, v in terms.items() if v}

    acts = {"block activations": sum(kept), "batch": batch, "attention plan": shared}
    logits = {"logits (loss)": N * V * s, "head activations": head_saved - N * V * s}
    phases: dict[str, dict[str, int]] = {}
    fwd_extra = {"gradients": grads_all, "backward temporaries": N * r * D if mixed else 0}  # the last step's grads
    phases["forward end"] = moment({**acts, **logits, **fwd_extra})
    phases["loss backward"] = moment({**acts, **logits, "backward temporaries": 4 * N * D + 4 * V * D})
    ffn_tmp = N * (2 * r * D + (4 if m.ffn == "swiglu" else 2) * s * m.ffn_hidden)
    if kind == "scores":
        ffn_tmp = max(ffn_tmp, 2 * parts["attention scores"])
    block_tmp = ffn_tmp + s * m.block_largest_matrix
    grads = head_grad
    for k in range(L - 1, -1, -1):
        current = full_block if k in ckpt else 0  # recomputed, on top of its kept input
        phases[f"block {k} backward"] = moment(
            {
                "block activations": sum(kept[: k + 1]) + current,
                "batch": batch,
                "attention plan": shared,
                "gradients": grads + block_grad,
                "backward temporaries": block_tmp,
            }
        )
        grads += block_grad
    phases["embedding backward"] = moment({"gradients": grads_all, "backward temporaries": 4 * V * D, "batch": batch})
    opt_tmp = 0 if run.fused_optimizer else 4 * m.params
    phases["optimizer step"] = moment({"gradients": grads_all, "optimizer temporaries": opt_tmp})
    totals = {name: sum(t.values()) for name, t in phases.items()}
    phase = max(totals, key=totals.get)
    notes = []
    if run.attention.split(":")[0] == "auto":
        notes.append("attention 'auto' estimated as an O(T) kernel (what it picks on a GPU; run/info names it)")
    return Estimate(
        peak=totals[phase],
        phase=phase,
        terms=phases[phase],
        block_parts=parts,
        phases=totals,
        tokens_per_step=N * run.accumulate_grad_batches,
        kernel_kind=kind,
        shape=run,
        notes=notes,
    )


def largest_batch_size(m: ModelDims, run: RunShape, capacity: int, headroom: float = HEADROOM) -> int:
    """The largest ``batch_size`` whose predicted peak fits in ``headroom · capacity`` (0: none)."""
    budget = headroom * capacity

    def fits(b: int) -> bool:
        return estimate(m, dataclasses.replace(run, batch_size=b)).peak <= budget

    if not fits(1):
        return 0
    hi = 1
    while fits(hi * 2):
        hi *= 2
        if hi > 2**24:
            return hi
    lo, hi = hi, hi * 2  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def table(est: Estimate, capacity: int | None = None, gpu: str | None = None) -> str:
    """The estimate as text: the peak moment's terms, largest first, and whether it fits."""
    lines = [
        f"predicted peak {format_bytes(est.peak)} at the {est.phase} ({est.tokens_per_step} tokens/step, "
        f"attention memory: {est.kernel_kind}); dominant: {est.dominant}",
        "",
    ]
    width = max(len(k) for k in est.terms)
    for name, value in est.largest(len(est.terms)):
        lines.append(f"  {name.ljust(width)}  {format_bytes(value):>11}  {100 * value / est.peak:5.1f}%")
    lines.append("")
    lines.append("one block's saved tensors (not checkpointed):")
    width = max(len(k) for k in est.block_parts)
    for name, value in sorted(est.block_parts.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name.ljust(width)}  {format_bytes(value):>11}")
    if capacity:
        verdict = "fits" if est.peak <= HEADROOM * capacity else "does NOT fit"
        lines.append("")
        lines.append(
            f"{gpu or 'device'}: {format_bytes(capacity)}; {verdict} within {HEADROOM:.0%} of it "
            f"({100 * est.peak / capacity:.0f}% of the card)"
        )
    lines.extend(f"note: {n}" for n in est.notes)
    return "\n".join(lines)


def gpu_capacity(gpu: str) -> int:
    """Bytes of a named GPU (``GPUS``) or of a size such as ``80GiB`` / ``24GB``."""
    key = gpu.lower()
    if key in GPUS:
        return GPUS[key]
    for unit, scale in (("gib", 2**30), ("gb", 10**9)):
        if key.endswith(unit):
            try:
                return int(float(key[: -len(unit)]) * scale)
            except ValueError:
                break
    raise ValueError(f"unknown GPU {gpu!r}; use one of {', '.join(GPUS)} or a size like 80GiB")
