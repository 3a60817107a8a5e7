"""What the data tests share: a batch's documents read back from its rows."""

from __future__ import annotations


def batch_documents(batch) -> list[tuple[int, ...]]:
    """Every document of a batch, read back from input_ids with doc_lens."""
    docs = []
    for b, lens in enumerate(batch["doc_lens"]):
        start = 0
        for n in lens:
            docs.append(tuple(batch["input_ids"][b, start : start + n].tolist()))
            start += n
    return docs
