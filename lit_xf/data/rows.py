"""Documents to rows and rows to batches: the train/val split by document, chunking, the rows of a
``RowPlan`` read from a ``TokenDocs``, and the one collation that emits the batch contract of
docs/architecture.md (with the batch's attention layout, and its xformers bias where asked)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np
import torch

from lit_xf.attention.layout import DocLayout, attended_pairs
from lit_xf.data.plan import BATCH_MODES, RowPlan, pack_documents, plan_rows
from lit_xf.data.store import TokenDocs
from lit_xf.loss import IGNORE_INDEX  # the label of tokens that predict nothing (pads, document ends)

__all__ = ["BATCH_MODES", "pack_documents"]
Row = list[Sequence[int]]  # one batch row: its documents' token ids (lists or arrays), in order; <= seq_len
Batch = dict[str, Any]


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted train and val document indices: ``round(n * val_fraction)`` (>= 1 when > 0) random ones to val."""
    train, val, _ = train_val_test_indices(n, val_fraction, 0.0, seed)
    return train, val


def train_val_test_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """``split_arrays`` as lists."""
    return tuple(a.tolist() for a in split_arrays(n, val_fraction, test_fraction, seed))


def split_arrays(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Sorted, disjoint train, val and test document indices (``int64`` arrays) from one seeded
    permutation of ``range(n)``.

    Its first ``round(n * val_fraction)`` indices are val, the next ``round(n * test_fraction)`` test
    (each >= 1 when its fraction is > 0), the rest train: the val split does not depend on
    ``test_fraction``, the test documents come out of training's. 8 bytes per document.
    """
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise ValueError(
            f"the corpus has {n} document(s); val_fraction={val_fraction} with test_fraction={test_fraction} "
            f"leaves none for training (use more documents, or set val_fraction / test_fraction to 0)"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return np.sort(perm[n_val + n_test :]), np.sort(perm[:n_val]), np.sort(perm[n_val : n_val + n_test])


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


def read_rows(plan: RowPlan, docs: TokenDocs, r0: int = 0, r1: int | None = None) -> list[Row]:
    """Rows ``r0 : r1`` of ``plan`` with their tokens read from ``docs`` (a ``joined`` row is one sequence)."""
    rows = []
    for pieces in plan.rows(r0, plan.n_rows if r1 is None else r1):
        parts = [docs.piece(d, a, n) for d, a, n in pieces]
        rows.append([np.concatenate(parts)] if plan.joined else parts)
    return rows


def build_rows(docs: Sequence[Sequence[int]], seq_len: int, batch_mode: str) -> list[Row]:
    """Rows of ``docs`` in order, through the same planner the data module streams with, its window
    the whole list: one piece per row (``padded``), whole-list best-fit decreasing (``packed``), or
    for ``concat`` pieces of the documents joined in order, row r holding stream[r·(T-1) : r·(T-1) + T]
    (each row's last token starts the next row; every token after the first is a label once).
    Documents longer than ``seq_len`` are cut into pieces first (not for ``concat``)."""
    store = TokenDocs.from_lists(docs)
    plan = plan_rows(np.arange(store.n_docs), store.lengths(), seq_len, batch_mode, buffer=max(store.n_tokens, 1))
    return [[d.tolist() for d in row] for row in read_rows(plan, store)]


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
    docs = [np.asarray(doc, dtype=np.int64) for row in rows for doc in row]
    tokens_R = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
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


def make_batch(
    rows: Sequence[Row],
    seq_len: int,
    pad_id: int,
    *,
    window: int | None = None,
    xformers_bias: bool = False,
    pin: bool = False,
) -> Batch:
    """``collate_rows`` plus the batch's attention facts, built where the batch is (a loader worker):
    ``attn_layout``, the ``DocLayout`` of its documents (causal, ``window``), which the model adopts
    instead of building its own when its window and shape match; with ``xformers_bias``, also
    ``attn_bias``, that layout's xformers bias (``DocLayout.xformers_bias``; block-diagonal biases
    cover the rows flattened to ``[1, B·T]``), which the xformers kernel adopts. ``pin``: tensors in
    pinned memory (for a loader without workers: the DataLoader's own pinning walks ``doc_lens``)."""
    batch = collate_rows(rows, seq_len, pad_id)
    if pin:
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    layout = DocLayout(batch["doc_lens"], seq_len, window=window)
    batch["attn_layout"] = layout
    if xformers_bias:
        batch["attn_bias"] = layout.xformers_bias(torch.device("cpu"))  # never CUDA in a worker
    return batch


def batch_xformers_bias(batch: Batch) -> Any:
    """The xformers attention bias that matches ``batch`` (via ``lit_xf.attention.DocLayout``)."""
    return DocLayout(batch["doc_lens"], batch["input_ids"].shape[1]).xformers_bias()
