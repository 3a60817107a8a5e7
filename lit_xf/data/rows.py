"""Documents to rows and rows to batches: the train/val split by document, chunking, best-fit packing,
the ``concat`` stream, and the collation that emits the batch contract of docs/architecture.md."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
import torch

from lit_xf.attention.layout import attended_pairs
from lit_xf.loss import IGNORE_INDEX  # the label of tokens that predict nothing (pads, document ends)

BATCH_MODES = ("padded", "packed", "concat")
Row = list[list[int]]  # one batch row: its documents' token ids, in order; total length <= seq_len
Batch = dict[str, Any]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted train and val document indices: ``round(n * val_fraction)`` (>= 1 when > 0) random ones to val."""
    train, val, _ = train_val_test_indices(n, val_fraction, 0.0, seed)
    return train, val


def train_val_test_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Sorted, disjoint train, val and test document indices from one seeded permutation of ``range(n)``.

    Its first ``round(n * val_fraction)`` indices are val, the next ``round(n * test_fraction)`` test
    (each >= 1 when its fraction is > 0), the rest train: the val split does not depend on
    ``test_fraction`` (it is ``split_indices``'s), the test documents come out of training's.
    """
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise ValueError(
            f"the corpus has {n} document(s); val_fraction={val_fraction} with test_fraction={test_fraction} "
            f"leaves none for training (use more documents, or set val_fraction / test_fraction to 0)"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val + n_test :]), sorted(perm[:n_val]), sorted(perm[n_val : n_val + n_test])


def split_long_documents(docs: Sequence[list[int]], seq_len: int) -> tuple[list[list[int]], int]:
    """Documents cut into chunks of at most ``seq_len`` tokens; also returns how many were cut.

    Each chunk is a document of its own afterwards (its last token gets no label).
    """
    chunks: list[list[int]] = []
    n_split = 0
    for doc in docs:
        if len(doc) <= seq_len:
            chunks.append(doc)
        else:
            n_split += 1
            chunks.extend(doc[i : i + seq_len] for i in range(0, len(doc), seq_len))
    return chunks, n_split


def pack_documents(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: indices of ``lengths`` grouped so each bin sums to <= capacity.

    Items go longest first into the open bin with the least room that still fits them (a new bin
    when none does). Deterministic; ties go to the earliest-opened bin.
    """
    if any(n > capacity or n < 1 for n in lengths):
        raise ValueError(f"every length must be in [1, {capacity}] to pack; got {min(lengths)}..{max(lengths)}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []  # sorted free space of the bins that still have some
    room_bin: list[int] = []  # bin index of each room entry
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(room, n)
        if j == len(room):
            b, left = len(bins), capacity - n
            bins.append([i])
        else:
            b, left = room_bin.pop(j), room.pop(j) - n
            bins[b].append(i)
        if left > 0:
            k = bisect.bisect_left(room, left)
            room.insert(k, left)
            room_bin.insert(k, b)
    return bins


def build_rows(docs: Sequence[list[int]], seq_len: int, batch_mode: str) -> list[Row]:
    """Rows of documents (each <= seq_len tokens): one per row (``padded``), bin-packed (``packed``),
    or, for ``concat``, pieces of the documents joined in order, one piece per row: row r holds
    stream[r·(T-1) : r·(T-1) + T], so each row's last token starts the next row and every token
    after the first is a label exactly once (the last piece may be shorter)."""
    if batch_mode == "padded":
        return [[doc] for doc in docs]
    if batch_mode == "packed":
        bins = pack_documents([len(doc) for doc in docs], seq_len)
        return [[docs[i] for i in b] for b in bins]
    if batch_mode == "concat":
        if seq_len < 2:
            raise ValueError(f"batch_mode='concat' needs seq_len >= 2 (rows overlap by one token); got {seq_len}")
        stream = list(chain.from_iterable(docs))
        starts = range(0, max(len(stream) - 1, 1), seq_len - 1) if stream else range(0)
        return [[stream[i : i + seq_len]] for i in starts]
    raise ValueError(f"batch_mode={batch_mode!r} is not one of {BATCH_MODES}")


def packing_efficiency(rows: Sequence[Row], seq_len: int) -> float:
    """Fraction of the ``len(rows) * seq_len`` token slots that hold real (non-pad) tokens."""
    if not rows:
        return 0.0
    real = sum(len(doc) for row in rows for doc in row)
    return real / (len(rows) * seq_len)


def collate_rows(rows: Sequence[Row], seq_len: int, pad_id: int) -> Batch:
    """The batch contract of ``docs/architecture.md`` for ``B = len(rows)`` rows, ``T = seq_len``.

    Per document ``d`` of a row: ``input_ids`` = d, ``labels`` = d[1:] + [-100] (never crossing into
    the next document), ``position_ids`` = 0..len(d)-1. Pads: ``pad_id``, -100, and positions that
    continue from the row's last document.
    """
    doc_lens = [[len(doc) for doc in row] for row in rows]
    used = [sum(lens) for lens in doc_lens]
    if any(n > seq_len for n in used):
        raise ValueError(f"a row of {max(used)} tokens does not fit seq_len={seq_len}")
    B, T = len(rows), seq_len
    # index arithmetic in numpy: single-threaded, so tiny batches don't wait on a busy thread pool
    tokens_R = np.fromiter(chain.from_iterable(chain.from_iterable(rows)), dtype=np.int64)
    lens_D = np.fromiter(chain.from_iterable(doc_lens), dtype=np.int64)
    ends_D = np.cumsum(lens_D)  # one past each document's last token in tokens_R
    starts_R = np.repeat(ends_D - lens_D, lens_D)

    labels_R = np.full_like(tokens_R, IGNORE_INDEX)
    labels_R[:-1] = tokens_R[1:]
    labels_R[ends_D - 1] = IGNORE_INDEX  # a document's last token predicts nothing
    positions_R = np.arange(len(tokens_R)) - starts_R

    used_B = np.array(used, dtype=np.int64)
    last_B = np.array([lens[-1] if lens else 0 for lens in doc_lens], dtype=np.int64)
    real_BT = np.arange(T)[None, :] < used_B[:, None]  # real tokens fill each row's front, row-major
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    positions = np.arange(T)[None, :] - (used_B - last_B)[:, None]  # pads continue the last document
    input_ids[real_BT] = tokens_R
    labels[real_BT] = labels_R
    positions[real_BT] = positions_R
    real = int(sum(used))
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "doc_lens": doc_lens,
        "stats": {
            "tokens": B * T,
            "real_tokens": real,
            "pad_tokens": B * T - real,
            "documents": len(lens_D),
            "causal_pairs": int(attended_pairs(lens_D).sum()),
        },
    }


def _collate_pinned(rows: Sequence[Row], seq_len: int, pad_id: int) -> Batch:
    """``collate_rows`` with the tensors in pinned host memory (for non-blocking copies)."""
    batch = collate_rows(rows, seq_len, pad_id)
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_xformers_bias(batch: Batch) -> Any:
    """The xformers attention bias that matches ``batch`` (via ``lit_xf.attention.DocLayout``)."""
    from lit_xf.attention import DocLayout

    return DocLayout(batch["doc_lens"], batch["input_ids"].shape[1]).xformers_bias()
