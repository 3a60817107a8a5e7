"""FA4's plans for block-diagonal rows, built on the host: the varlen sequences (one per segment,
or short segments grouped under the CuTe mask) and the block-sparse forward's block lists.

A batch's rows are flattened to N = B·T tokens and cut into its segments (documents, then each
row's padding as one more). FA4 runs varlen sequences bounded by ``cu_seqlens``; a grouped sequence
holds several segments, and FA4 masks it with ``lit_xf.attention.fa4.mask.segment_causal``, which
reads each token's position in its segment (``seg_pos``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from lit_xf.attention.layout import DocLayout

# Plans whose CuTe mask sees whole segments: no sliding window.
FA4_WINDOWLESS_PLANS = ("grouped", "block_sparse")
# Hopper's FA4 backward tile for head dim ≤ 64 is 128×128 (forward: 192 query rows × 128 keys):
# a grouped sequence of up to 128 tokens takes one tile each way.
FA4_GROUP_TOKENS = 128
# Group when that needs at most this fraction of the tiles of one sequence per segment: grouped
# tiles apply the CuTe mask to every score, per-segment tiles only on the diagonal. H200, H=12,
# K=64 (docs/benchmarks.md §4): grouping won at tile ratios 0.19 (2.5x), ~0.4 and 0.54 (1.5-1.7x),
# tied or lost from 1.17 on.
FA4_GROUPED_TILE_RATIO = 0.7


@dataclass(frozen=True)
class Fa4Varlen:
    """Block-diagonal rows for FA4, flattened to N = B·T tokens. ``cu_seqlens`` (int32, bucketed
    by ``bucketed_bounds``) bounds the sequences FA4 runs: each segment alone (``seg_pos`` None;
    FA4's causal mask), or consecutive segments grouped (``seg_pos`` int32 [N]: each token's
    position in its segment, read by the CuTe mask ``lit_xf.attention.fa4.mask.segment_causal``). The
    block-sparse plan adds ``blocks``, the int32 block lists of ``fa4_block_sparse`` for a forward
    over one sequence of N tokens; its backward runs the grouped ``cu_seqlens``."""

    cu_seqlens: torch.Tensor | None
    seg_pos: torch.Tensor | None = None
    blocks: tuple[torch.Tensor, ...] = ()

    def to(self, device) -> Fa4Varlen:
        """The plan on ``device`` in one copy. To CUDA from pinned memory: a copy from pageable
        memory over ~1 MiB waits for the work already queued on the stream (the previous step).
        numpy fills the pinned buffer: torch's CPU copy into it (``pin_memory()``) took 4-5 ms per
        step on a busy 16-core host, spread over its intra-op threads."""
        parts = [t for t in (self.cu_seqlens, self.seg_pos, *self.blocks) if t is not None]
        sizes = [t.numel() for t in parts]
        flat = torch.empty(sum(sizes), dtype=torch.int32, pin_memory=torch.device(device).type == "cuda")
        np.concatenate([t.numpy().reshape(-1) for t in parts], out=flat.numpy())
        moved = iter(flat.to(device, non_blocking=True).split(sizes))
        cu = next(moved) if self.cu_seqlens is not None else None
        seg_pos = next(moved) if self.seg_pos is not None else None
        return Fa4Varlen(cu, seg_pos, tuple(next(moved).view(t.shape) for t in self.blocks))


def fa4_varlen(layout: DocLayout, grouping: str = "auto") -> Fa4Varlen:
    """FA4's plan for a block-diagonal layout, built on the host. Causal rows: "block_sparse", or
    "auto" where ``fa4_grouping_pays``, gives the block-sparse forward with the grouped backward
    (B·T a multiple of ``FA4_BLOCK``; else grouped); "grouped" the grouped sequences both ways.
    Else (and "per_document", and a window that hides keys): one varlen sequence per segment."""
    segments = [n for row in layout.segment_lens() for n in row]
    if layout.windowed and grouping in FA4_WINDOWLESS_PLANS:
        raise ValueError(
            f"fa4:{grouping} has no sliding window (its CuTe mask sees whole segments); "
            "use attention='fa4' or 'fa4:per_document' with attention_window"
        )
    if layout.causal and grouping != "per_document" and not layout.windowed:
        bounds = group_bounds(segments)
        if grouping in ("grouped", "block_sparse") or fa4_grouping_pays(segments, bounds):
            whole_blocks = (layout.batch_size * layout.seq_len) % FA4_BLOCK == 0
            if grouping != "grouped" and whole_blocks:
                return fa4_block_sparse(segments, bounds)
            return Fa4Varlen(bucketed_bounds(bounds), segment_positions(segments))
    return Fa4Varlen(bucketed_bounds([0, *itertools.accumulate(segments)]))


# The plans are built on the host once per forward, in numpy: torch's CPU ops split even 64k-element
# tensors over its intra-op threads, and on a busy host (loader workers, compile workers) each such
# op took 5-10 ms on an H200 machine's 16 cores, long enough to leave the GPU idle.
def segment_positions(segments: list[int]) -> torch.Tensor:
    """int32 [Σ segments]: each token's position in its segment (consecutive segments of ≥ 1 token)."""
    lens = np.asarray(segments, dtype=np.int32)
    starts = np.cumsum(lens, dtype=np.int32) - lens
    return torch.from_numpy(np.arange(lens.sum(), dtype=np.int32) - np.repeat(starts, lens))


# Query and key block of the block-sparse plan: Hopper's FA4 tile for head dims up to 128 (forward
# and backward); FA4 wants the key block equal to its tile and the query block a multiple of it.
FA4_BLOCK = 128


def fa4_block_sparse(segments: list[int], bounds: list[int] | None = None, block: int = FA4_BLOCK) -> Fa4Varlen:
    """The block-sparse plan for one causal sequence of consecutive ``segments`` (N = Σ tokens, a
    multiple of ``block``): each token's position in its segment (``seg_pos``, for the CuTe mask)
    and FA4's block lists for the forward; for the backward, ``cu_seqlens`` of the grouped
    sequences (``bounds`` from ``group_bounds``, computed when not given).
    Query block i and key block j (``block`` tokens each) hold some visible pair (j ≤ i in a
    shared segment) or none (skipped); all pairs are visible when j < i and one segment spans both
    blocks (run unmasked), else the mask decides per pair. ``blocks``: per query block, the count
    and the ascending indices of masked key blocks, then of unmasked ones (int32 ``[1, 1, n]``,
    ``[1, 1, n, width]``, see ``_block_lists``).

    Segments are contiguous, so each row's lists are ranges, found by binary search in O(n log n)
    for n = N / block blocks (a dense [n, n] map took 0.38 s at n = 4096 on one CPU core): with
    first_i / last_i the first and last segment in block i, the visible key blocks are
    [lo_i, i], lo_i the first block whose last segment reaches first_i; the unmasked ones are
    [a_i, i) when block i lies inside one segment (first_i = last_i), a_i that segment's first
    block, else none; the masked ones are the rest, [lo_i, a_i) and i itself."""
    seg_pos = segment_positions(segments)
    seg = np.cumsum(seg_pos.numpy() == 0) - 1  # each token's segment: a segment starts at position 0
    first, last = seg.reshape(-1, block)[:, 0], seg.reshape(-1, block)[:, -1]  # both ascending
    i = np.arange(len(first))
    lo = np.searchsorted(last, first, side="left")
    a = np.where(first == last, np.searchsorted(first, last, side="left"), i)
    cu_seqlens = bucketed_bounds(group_bounds(segments) if bounds is None else bounds)
    masked = _block_lists(np.stack([lo, i], -1), np.stack([a - lo, np.ones_like(i)], -1), len(i))
    full = _block_lists(a[:, None], (i - a)[:, None], len(i))
    return Fa4Varlen(cu_seqlens, seg_pos, (*masked, *full))


def _block_lists(starts: np.ndarray, lengths: np.ndarray, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row r, the concatenated ranges [starts[r, p], starts[r, p] + lengths[r, p]) (ascending,
    disjoint) as the count and the column indices, then zeros (FA4 reads a row's first ``count``):
    int32 [1, 1, rows] and [1, 1, rows, width], FA4's block-sparse layout with compact rows.
    ``width`` is the largest count rounded up to a power of two (at least 4, at most ``cols``):
    short documents list 1–3 blocks per row, so the lists stay a few KiB instead of rows × cols,
    and their shape takes few values (few recompiles)."""
    count = lengths.sum(-1).astype(np.int32)
    width = min(cols, max(4, 1 << (int(count.max(initial=0)) - 1).bit_length()))
    slot = np.arange(width)[None, :]
    index = np.zeros((len(count), width), dtype=np.int32)
    before = np.zeros(len(count), dtype=lengths.dtype)  # slots taken by the row's earlier ranges
    for p in range(starts.shape[1]):
        k = slot - before[:, None]
        inside = (k >= 0) & (k < lengths[:, p, None])
        index[inside] = (starts[:, p, None] + k)[inside]
        before = before + lengths[:, p]
    return torch.from_numpy(count)[None, None], torch.from_numpy(index)[None, None]


def group_bounds(segments: list[int], group_tokens: int = FA4_GROUP_TOKENS) -> list[int]:
    """Token boundaries ``[0, …, N]`` of consecutive segments grouped greedily into sequences of at
    most ``group_tokens`` tokens; a longer segment is a sequence of its own. Never splits one."""
    bounds, start, prev = [0], 0, 0
    for end in itertools.accumulate(segments):
        if end - start > group_tokens and prev > start:  # the open group is full: close it
            bounds.append(prev)
            start = prev
        prev = end
    bounds.append(prev)
    return bounds


def fa4_grouping_pays(
    segments: list[int], bounds: list[int] | None = None, group_tokens: int = FA4_GROUP_TOKENS
) -> bool:
    """Whether grouped sequences (``bounds`` from ``group_bounds``) need at most
    ``FA4_GROUPED_TILE_RATIO`` × the 128×128 tiles of one causal sequence per segment (m(m+1)/2
    tiles for m = ⌈n/128⌉). A grouped sequence skips no tile above its diagonal (m² tiles), so
    grouping a long document alone costs up to 2×."""
    g = group_tokens
    bounds = group_bounds(segments, g) if bounds is None else bounds
    long_blocks = [(n + g - 1) // g for n in segments if n > g]  # segments of one tile count 1 each
    alone = len(segments) + sum(m * (m + 1) // 2 - 1 for m in long_blocks)
    grouped = sum(((b - a + g - 1) // g) ** 2 for a, b in itertools.pairwise(bounds))
    return grouped <= FA4_GROUPED_TILE_RATIO * alone


def bucketed_bounds(bounds: list[int]) -> torch.Tensor:
    """int32 ``bounds``, then repeats of the total (zero-length sequences) up to the next power of
    two entries (at least 4), so the tensor's length takes few values."""
    out = np.full(max(4, 1 << (len(bounds) - 1).bit_length()), bounds[-1], dtype=np.int32)
    out[: len(bounds)] = bounds
    return torch.from_numpy(out)
