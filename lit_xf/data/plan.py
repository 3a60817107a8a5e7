"""Row plans: which pieces of which documents make up each row of an epoch, computed from document
lengths alone (``docs.idx``), so no token is read until a batch is collated.

A *piece* is ``(doc, start, length)``: tokens ``start : start + length`` of document ``doc``.
``packed`` and ``padded`` cut every document longer than ``T = seq_len`` into pieces of at most T
tokens (each then a document of its own: its last token gets no label); ``concat`` joins the
documents of the epoch into one stream and cuts it into rows of T tokens overlapping by one.

- ``padded``: one piece per row.
- ``packed``: best-fit decreasing (``pack_documents``) within a window of ``buffer`` pieces taken
  in epoch order. After each pass the emptiest rows (free room > T/64) go back into the window, at
  most ``buffer // 2`` of their pieces, to be packed with the next pieces; the last pass emits all.
  With ``buffer`` >= the pieces of the split this is whole-split best-fit decreasing.
- ``concat``: row r holds stream[r·(T-1) : r·(T-1) + T] (the last row may be shorter), as segments
  of the documents it spans; the row is one causal sequence.

Memory: 16 bytes per piece for the plan (int32 document, start and length, int32 row bounds;
documents shorter than T are one piece), nothing per token.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BATCH_MODES = ("padded", "packed", "concat")
RETURN_ROOM_DIVISOR = 64  # a packed row with more than T/64 free slots goes back into the window


def pack_documents(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices of ``lengths`` grouped so each bin sums to <= capacity.

    Items go longest first into the open bin with the least room that still fits them (a new bin
    when none does). Deterministic; among bins with equal room the one filled most recently wins.
    """
    lengths = np.asarray([int(n) for n in lengths], dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"every length must be in [1, {capacity}] to pack; got {lengths.min()}..{lengths.max()}")
    order, bin_of = _best_fit_decreasing(lengths, capacity)
    return [g.tolist() for g in _group(order, bin_of)]


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """``order``: item indices longest first (ties: lower index first); ``bin_of[j]``: the bin of
    item ``order[j]``, bins numbered as they open. Items longer than capacity / 2 each open a bin
    (no earlier room can hold them: it is < capacity / 2), done at once; the rest go one by one to
    the smallest room that fits (bisect over the sorted rooms)."""
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # [n] longest first
    sizes = lengths[order]
    n_big = int(np.count_nonzero(2 * sizes > capacity))
    bin_of = np.empty(len(order), dtype=np.int64)
    bin_of[:n_big] = np.arange(n_big)
    # open rooms sorted ascending; equal rooms: the bin filled last first (bisect_left inserts leftmost)
    big_room = capacity - sizes[:n_big]
    has_room = np.flatnonzero(big_room > 0)
    ranked = has_room[np.lexsort((-has_room, big_room[has_room]))]
    room, room_bin = big_room[ranked].tolist(), ranked.tolist()
    n_bins = n_big
    small = sizes[n_big:].tolist()
    out = [0] * len(small)
    bisect_left = bisect.bisect_left
    for j, n in enumerate(small):
        k = bisect_left(room, n)
        if k == len(room):
            b, left = n_bins, capacity - n
            n_bins += 1
        else:
            b, left = room_bin.pop(k), room.pop(k) - n
        out[j] = b
        if left > 0:
            k = bisect_left(room, left)
            room.insert(k, left)
            room_bin.insert(k, b)
    bin_of[n_big:] = out
    return order, bin_of


def _group(items: np.ndarray, bin_of: np.ndarray) -> list[np.ndarray]:
    """``items`` grouped by ``bin_of`` (bins in number order, items in their given order)."""
    by_bin = np.argsort(bin_of, kind="stable")
    counts = np.bincount(bin_of, minlength=int(bin_of.max()) + 1 if len(bin_of) else 0)
    return np.split(items[by_bin], np.cumsum(counts)[:-1]) if len(items) else []


def compact(a: np.ndarray) -> np.ndarray:
    """``a`` as int32 where its values fit (plans hold one entry per piece: half the memory of
    int64 on a corpus of millions of documents), else as it is."""
    a = np.asarray(a)
    if a.dtype == np.int32 or (a.size and (a.min() < -(2**31) or a.max() >= 2**31)):
        return a
    return a.astype(np.int32)


@dataclass(frozen=True)
class RowPlan:
    """Rows as runs of pieces: row r is pieces ``row_start[r] : row_start[r + 1]``. ``joined``: the
    pieces of a row form one sequence (``concat``), else each is a document of its own."""

    doc: np.ndarray  # [P] document index of each piece (int32 where it fits: ``compact``)
    start: np.ndarray  # [P] first token of the piece within its document
    length: np.ndarray  # [P] tokens in the piece
    row_start: np.ndarray  # [R + 1]
    seq_len: int
    joined: bool = False

    @property
    def n_rows(self) -> int:
        return len(self.row_start) - 1

    def efficiency(self) -> float:
        """Fraction of the ``n_rows · T`` token slots that hold real tokens."""
        return int(self.length.sum()) / (self.n_rows * self.seq_len) if self.n_rows else 0.0

    def take(self, rows: np.ndarray) -> RowPlan:
        """The plan of rows ``rows`` (in that order); the plan itself where that is all its rows."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == self.n_rows and np.array_equal(rows, np.arange(self.n_rows)):
            return self  # one rank: no copy
        counts = self.row_start[rows + 1] - self.row_start[rows]
        idx = _runs(self.row_start[rows], counts)
        return RowPlan(
            self.doc[idx],
            self.start[idx],
            self.length[idx],
            compact(np.concatenate([[0], np.cumsum(counts)])),
            self.seq_len,
            self.joined,
        )

    def rows(self, r0: int, r1: int) -> list[list[tuple[int, int, int]]]:
        """Rows ``r0 : r1`` as lists of ``(doc, start, length)`` pieces."""
        out = []
        for r in range(r0, min(r1, self.n_rows)):
            a, b = int(self.row_start[r]), int(self.row_start[r + 1])
            out.append(
                list(zip(self.doc[a:b].tolist(), self.start[a:b].tolist(), self.length[a:b].tolist(), strict=True))
            )
        return out


def _runs(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each (s, c)."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return np.arange(total, dtype=np.int64) + offsets


def _pieces(order: np.ndarray, lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Documents ``order`` (lengths ``lengths``) cut into pieces of at most ``seq_len`` tokens:
    ``(doc, start, length)`` per piece. Temporaries of the split's size are int32; only the
    documents longer than ``seq_len`` get per-piece arithmetic."""
    long = np.flatnonzero(lengths > seq_len)
    if not len(long):  # one piece per document
        return compact(order), np.zeros(len(order), dtype=np.int32), compact(lengths)
    chunks = (lengths[long].astype(np.int64) + seq_len - 1) // seq_len  # pieces of each long document
    n_chunks = np.ones(len(order), dtype=np.int32)
    n_chunks[long] = chunks
    doc, length = np.repeat(compact(order), n_chunks), np.repeat(compact(lengths), n_chunks)
    del n_chunks
    start = np.zeros(len(doc), dtype=length.dtype)
    first = long + np.cumsum(chunks - 1) - (chunks - 1)  # each long document's first piece
    k = _runs(np.zeros_like(chunks), chunks)  # piece number within its document
    at = np.repeat(first, chunks) + k
    start[at] = k * seq_len
    length[at] = np.minimum(seq_len, length[at] - start[at])
    return doc, start, length


def _pack_window(
    length: np.ndarray, capacity: int, buffer: int, rng: np.random.Generator | None
) -> tuple[np.ndarray, np.ndarray]:
    """Packed rows from a window of ``buffer`` pieces in order (see module): ``(idx, counts)``, the
    piece indices of all rows one after the other and the pieces in each row."""
    n = len(length)
    index_t = np.int32 if n < 2**31 else np.int64
    out_idx = np.empty(n, dtype=index_t)  # every piece is emitted once: rows fill it in order
    filled = 0
    out_counts: list[np.ndarray] = []
    pending = np.zeros(0, dtype=index_t)
    pos = 0
    min_fill = capacity - capacity // RETURN_ROOM_DIVISOR
    while True:
        take = max(buffer - len(pending), 1)
        pending = np.concatenate([pending, np.arange(pos, min(n, pos + take), dtype=index_t)])
        pos = min(n, pos + take)
        last = pos >= n
        order, bin_of = _best_fit_decreasing(length[pending], capacity)
        n_bins = int(bin_of.max()) + 1 if len(bin_of) else 0
        by_bin = np.argsort(bin_of, kind="stable")
        items = pending[order[by_bin]]  # pieces bin by bin, each bin's in the order they went in
        counts = np.bincount(bin_of, minlength=n_bins)
        first = np.cumsum(counts) - counts
        keep = np.zeros(n_bins, dtype=bool)
        if not last:
            fills = np.bincount(bin_of, weights=length[pending[order]], minlength=n_bins)
            ranked = np.lexsort((np.arange(n_bins), fills))  # emptiest first, ties by bin number
            fits = (fills[ranked] < min_fill) & (np.cumsum(counts[ranked]) <= buffer // 2)
            n_keep = int(np.argmin(fits)) if not fits.all() else n_bins
            keep[ranked[:n_keep]] = True
        emit = np.flatnonzero(~keep)
        if rng is not None:
            emit = emit[rng.permutation(len(emit))]
        emitted = items[_runs(first[emit], counts[emit])]
        out_idx[filled : filled + len(emitted)] = emitted
        filled += len(emitted)
        out_counts.append(counts[emit])
        kept = np.flatnonzero(keep)
        pending = items[_runs(first[kept], counts[kept])]
        if last:
            return out_idx, np.concatenate(out_counts)


def plan_rows(
    order: np.ndarray,
    lengths: np.ndarray,
    seq_len: int,
    batch_mode: str,
    buffer: int,
    rng: np.random.Generator | None = None,
) -> RowPlan:
    """The rows of documents ``order`` (their token counts ``lengths``) in ``batch_mode``; ``rng``
    shuffles the rows each packing pass emits (``packed``) or all rows (``concat``)."""
    if batch_mode not in BATCH_MODES:
        raise ValueError(f"batch_mode={batch_mode!r} is not one of {BATCH_MODES}")
    order, lengths = compact(order), compact(lengths)
    if batch_mode == "concat":
        return _concat_rows(order, lengths, seq_len, rng)
    doc, start, length = _pieces(order, lengths, seq_len)
    if batch_mode == "padded":
        return RowPlan(doc, start, length, compact(np.arange(len(doc) + 1)), seq_len)
    idx, counts = _pack_window(length, seq_len, max(int(buffer), 1), rng)
    row_start = compact(np.concatenate([[0], np.cumsum(counts)]))
    doc = doc[idx]  # one at a time: each piece array is freed as its reordered copy is made
    start = start[idx]
    length = length[idx]
    return RowPlan(doc, start, length, row_start, seq_len)


def _concat_rows(order: np.ndarray, lengths: np.ndarray, seq_len: int, rng) -> RowPlan:
    if seq_len < 2:
        raise ValueError(f"batch_mode='concat' needs seq_len >= 2 (rows overlap by one token); got {seq_len}")
    keep = lengths > 0
    order, lengths = order[keep], lengths[keep]
    cum = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    total = int(cum[-1])
    row_lo = np.arange(0, max(total - 1, 1), seq_len - 1, dtype=np.int64) if total else np.zeros(0, np.int64)
    if rng is not None:
        row_lo = row_lo[rng.permutation(len(row_lo))]
    row_hi = np.minimum(row_lo + seq_len, total)
    first = np.searchsorted(cum, row_lo, side="right") - 1  # document holding each row's first token
    last = np.searchsorted(cum, row_hi, side="left") - 1  # ... and its last
    counts = last - first + 1
    j = _runs(first, counts)  # document (position in order) of each segment
    lo = np.repeat(row_lo, counts)
    hi = np.repeat(row_hi, counts)
    seg_start = np.maximum(lo, cum[j]) - cum[j]
    seg_len = np.minimum(hi, cum[j + 1]) - cum[j] - seg_start
    row_start = compact(np.concatenate([[0], np.cumsum(counts)]))
    return RowPlan(order[j], compact(seg_start), compact(seg_len), row_start, seq_len, joined=True)
