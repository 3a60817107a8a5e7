"""Which (query, key) pairs attend, and how many: the one place that answers it.

A batch is B rows of T tokens; row b holds documents of lengths ``doc_lens[b]``, then padding. Query
token i may see key token j (offsets within the row) iff

    both lie in one block (a document, or the row's padding as one more block),
    j ≤ i (causal; always, unless ``causal=False``), and
    i − j < W with a sliding window of W tokens (the W most recent keys, i's own included).

Masks (``DocLayout.dense_mask``, xformers' bias objects, flex's ``mask_mod``, the fa4 plans), the
collate's pair count and the FLOP count all follow this rule. Cheap to import: torch and numpy only
(the data loader's workers import it); xformers is imported only when ``xformers_bias`` is called.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def check_window(window, causal: bool = True) -> None:
    """Raise ``ValueError`` unless ``window`` is None or a positive int (with causal attention)."""
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"attention_window must be a positive number of tokens or None, got {window!r}")
    if not causal:
        raise ValueError("attention_window is a causal sliding window; it needs causal attention")


def causal_window(q_idx, kv_idx, window: int | None):
    """Key visible to query: 0 ≤ q − kv (< window). The one rule for dense masks and flex's mask_mod
    (works on tensors and on flex's index scalars)."""
    visible = q_idx >= kv_idx
    return visible if window is None else visible & (q_idx - kv_idx < window)


def attended_pairs(n, window: int | None = None, causal: bool = True):
    """(query, key) pairs attention computes within one n-token document: n² without causality;
    causal, Σ_i min(i + 1, W) = n(n+1)/2 without a window (W ≥ n), else W(W+1)/2 + (n − W)·W.
    ``n`` an int (returns an int) or an integer numpy array (elementwise)."""
    if not causal:
        return n * n
    if window is None:
        return n * (n + 1) // 2
    w = np.minimum(n, window)
    pairs = w * (w + 1) // 2 + (n - w) * w
    return int(pairs) if isinstance(n, int) else pairs


class DocLayout:
    """Documents of each row: ``doc_lens[b]`` lists row b's document lengths in order; tokens past
    ``sum(doc_lens[b])`` are padding. Tokens attend within their document, causally unless
    ``causal=False``. A causal row with one document needs only a plain causal mask (padding follows
    every real token, so no real token sees it); otherwise each row is block-diagonal, padding
    being one more block. ``window`` (causal only): each query sees at most the ``window`` most
    recent keys of its block, itself included (sliding-window attention); None: all of them."""

    # Immutable, compared and hashed by its four facts. Not a dataclass: a batch carries its layout,
    # and Lightning's apply_to_collection (e.g. FSDP's input casting) refuses frozen dataclasses.
    doc_lens: tuple[tuple[int, ...], ...]
    seq_len: int
    causal: bool
    window: int | None

    def __setattr__(self, name, value):
        raise AttributeError(f"DocLayout is immutable (tried to set {name!r})")

    def _key(self) -> tuple:
        return (self.doc_lens, self.seq_len, self.causal, self.window)

    def __eq__(self, other) -> bool:
        return isinstance(other, DocLayout) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"DocLayout(doc_lens={self.doc_lens}, seq_len={self.seq_len}, causal={self.causal}, window={self.window})"
        )

    def __reduce__(self):
        return (DocLayout, self._key())

    def __init__(self, doc_lens, seq_len: int, causal: bool = True, window: int | None = None):
        check_window(window, causal)
        rows = tuple(tuple(map(int, row)) for row in doc_lens)
        for b, row in enumerate(rows):
            if not row or min(row) < 1 or sum(row) > seq_len:
                raise ValueError(
                    f"doc_lens row {b} = {list(row)}: need at least one document, lengths >= 1, summing to at most "
                    f"seq_len={seq_len}"
                )
        object.__setattr__(self, "doc_lens", rows)
        object.__setattr__(self, "seq_len", int(seq_len))
        object.__setattr__(self, "causal", bool(causal))
        object.__setattr__(self, "window", window)

    @classmethod
    def full_rows(cls, batch_size: int, seq_len: int, causal: bool = True, window: int | None = None) -> DocLayout:
        """One document filling each row."""
        return cls([[seq_len]] * batch_size, seq_len, causal, window)

    def fits(self, batch_size: int, seq_len: int, window: int | None, causal: bool = True) -> bool:
        """This layout is the one a ``[batch_size, seq_len]`` call with ``window`` needs."""
        return (self.batch_size, self.seq_len, self.window, self.causal) == (batch_size, seq_len, window, causal)

    @functools.cached_property
    def windowed(self) -> bool:
        """The window hides some key from some real query: a document is longer than it (what
        padding queries see is never used)."""
        return self.window is not None and any(n > self.window for row in self.doc_lens for n in row)

    @property
    def batch_size(self) -> int:
        return len(self.doc_lens)

    @functools.cached_property
    def packed(self) -> bool:
        """Some row holds several documents."""
        return any(len(row) > 1 for row in self.doc_lens)

    @functools.cached_property
    def block_diagonal(self) -> bool:
        """The mask needs blocks: packed rows, or padding that non-causal attention would see."""
        return self.packed or (not self.causal and any(sum(row) < self.seq_len for row in self.doc_lens))

    def attended_pairs(self) -> int:
        """(query, key) pairs the batch's real tokens attend: ``attended_pairs`` summed over its
        documents (padding excluded)."""
        return sum(attended_pairs(n, self.window, self.causal) for row in self.doc_lens for n in row)

    def segment_lens(self) -> list[list[int]]:
        """Per row, the blocks attention is confined to: the documents, then the padding (if any)
        as one more block. Each row sums to ``seq_len``."""
        out = []
        for row in self.doc_lens:
            pad = self.seq_len - sum(row)
            out.append(list(row) + ([pad] if pad else []))
        return out

    def segment_ids(self, device=None) -> torch.Tensor:
        """``[B, T]`` index of each token's block within its row (all zeros without blocks)."""
        if not self.block_diagonal:
            return torch.zeros(self.batch_size, self.seq_len, dtype=torch.long, device=device)
        ids = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in self.segment_lens()]
        return torch.stack(ids).to(device)

    def position_ids(self, device=None) -> torch.Tensor:
        """``[B, T]`` position of each token inside its document; padding continues counting."""
        rows = []
        for row in self.doc_lens:
            tail = self.seq_len - sum(row[:-1])  # the last document and the padding after it
            rows.append(torch.cat([torch.arange(n) for n in row[:-1]] + [torch.arange(tail)]))
        return torch.stack(rows).to(device)

    def dense_mask(self, device=None) -> torch.Tensor:
        """``[B, T, T]`` bool, True where query i may attend key j."""
        seg = self.segment_ids(device)
        same_block = seg[:, :, None] == seg[:, None, :]
        if not self.causal:
            return same_block
        t = torch.arange(self.seq_len, device=device)
        return causal_window(t[:, None], t[None, :], self.window)[None] & same_block

    def xformers_bias(self, device=None):
        """The matching xformers bias: ``LowerTriangularMask`` (or None when not causal) without
        blocks, else a ``BlockDiagonal[Causal]Mask`` over all rows flattened to ``[1, B·T]``
        (xformers' block-diagonal biases need batch size 1); their local-attention forms with a
        window."""
        from lit_xf.attention.probes import import_xformers_ops

        bias = import_xformers_ops().fmha.attn_bias
        if not self.block_diagonal:
            if not self.causal:
                return None
            if self.window is None:
                return bias.LowerTriangularMask()
            return bias.LowerTriangularFromBottomRightLocalAttentionMask(self.window)  # T×T: bottom right = top left
        flat = [n for row in self.segment_lens() for n in row]
        if not self.causal:
            return bias.BlockDiagonalMask.from_seqlens(flat, device=device)
        mask = bias.BlockDiagonalCausalMask.from_seqlens(flat, device=device)
        return mask if self.window is None else mask.make_local_attention(self.window)


def bias_on_device(bias, device) -> bool:
    """The index tensors of an xformers bias (block-diagonal ones hold some) are on ``device``."""
    device = torch.device(device)
    for info in (getattr(bias, "q_seqinfo", None), getattr(bias, "k_seqinfo", None)):
        seqstart = getattr(info, "seqstart", None)
        if isinstance(seqstart, torch.Tensor) and seqstart.device.type != device.type:
            return False
    return True
