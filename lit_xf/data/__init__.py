"""Corpora, tokenizers, padded / packed / concat rows and their collation, and ``TextDataModule``.

Data flows one way: ``sources`` (documents as ``str``) -> ``tokenizers`` (token ids) -> ``rows``
(split by document, chunked, packed, collated into the batch contract of docs/architecture.md) ->
``samplers`` (seeded, resumable, rank-sharded row order) -> ``datamodule`` (the LightningDataModule
that wires them).
"""

from lit_xf.data.datamodule import TextDataModule
from lit_xf.data.rows import (
    BATCH_MODES,
    Batch,
    Row,
    batch_xformers_bias,
    build_rows,
    collate_rows,
    pack_documents,
    packing_efficiency,
    split_indices,
    split_long_documents,
    train_val_test_indices,
)
from lit_xf.data.samplers import ResumableLoader, ResumableSampler, RowDataset, ShardSampler
from lit_xf.data.sources import (
    BUILTIN_CORPORA,
    FORTUNES_PACKAGE,
    FORTUNES_SYSTEM_FILES,
    CorpusNotFoundError,
    corpus_files,
    counting_documents,
    find_fortunes_file,
    load_text_corpus,
    read_fortunes,
    read_jsonl,
    read_text,
    split_documents,
)
from lit_xf.data.tokenizers import (
    TOKENIZERS,
    BPETokenizer,
    ByteTokenizer,
    CountingTokenizer,
    FileTokenizer,
    Tokenizer,
    encode_documents,
)

__all__ = [
    "BATCH_MODES",
    "BUILTIN_CORPORA",
    "FORTUNES_PACKAGE",
    "FORTUNES_SYSTEM_FILES",
    "TOKENIZERS",
    "BPETokenizer",
    "Batch",
    "ByteTokenizer",
    "CorpusNotFoundError",
    "CountingTokenizer",
    "FileTokenizer",
    "ResumableLoader",
    "ResumableSampler",
    "Row",
    "RowDataset",
    "ShardSampler",
    "TextDataModule",
    "Tokenizer",
    "batch_xformers_bias",
    "build_rows",
    "collate_rows",
    "corpus_files",
    "counting_documents",
    "encode_documents",
    "find_fortunes_file",
    "load_text_corpus",
    "pack_documents",
    "packing_efficiency",
    "read_fortunes",
    "read_jsonl",
    "read_text",
    "split_documents",
    "split_indices",
    "split_long_documents",
    "train_val_test_indices",
]
