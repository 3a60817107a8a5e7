"""Corpora, tokenizers, the token store, row plans, padded / packed / concat batches, and ``TextDataModule``.

Data flows one way: ``sources`` (documents as ``str``, streamed) -> ``tokenizers`` (token ids) ->
``store`` (tokenized once into memory-mapped ``tokens.bin`` + ``docs.idx``) -> ``plan`` (rows of an
epoch from document lengths: padded, best-fit packed within a window, or concat) -> ``rows`` (the
split by document; rows read from the store; the one collation into the batch contract of
docs/architecture.md) -> ``samplers`` (each rank's and worker's batches, resumable) ->
``datamodule`` (the LightningDataModule that wires them).
"""

from lit_xf.data.datamodule import TextDataModule
from lit_xf.data.plan import BATCH_MODES, RowPlan, pack_documents, plan_rows
from lit_xf.data.rows import (
    Batch,
    Row,
    batch_xformers_bias,
    build_rows,
    collate_rows,
    make_batch,
    packing_efficiency,
    read_rows,
    split_arrays,
    split_indices,
    split_long_documents,
    train_val_test_indices,
)
from lit_xf.data.samplers import EpochBatches, EpochSampler, ResumableLoader
from lit_xf.data.sources import (
    BUILTIN_CORPORA,
    FORTUNES_PACKAGE,
    FORTUNES_SYSTEM_FILES,
    CorpusNotFoundError,
    corpus_files,
    corpus_fingerprint,
    counting_documents,
    find_fortunes_file,
    iter_documents,
    load_text_corpus,
    read_fortunes,
    read_jsonl,
    read_text,
    split_documents,
)
from lit_xf.data.store import StoreError, TokenDocs, build_store, open_store, prepare_store
from lit_xf.data.tokenizers import (
    TOKENIZERS,
    BPETokenizer,
    ByteTokenizer,
    CountingTokenizer,
    FileTokenizer,
    Tokenizer,
    encode_documents,
    load_tokenizer,
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
    "EpochBatches",
    "EpochSampler",
    "ResumableLoader",
    "Row",
    "RowPlan",
    "StoreError",
    "TextDataModule",
    "TokenDocs",
    "Tokenizer",
    "batch_xformers_bias",
    "build_rows",
    "build_store",
    "collate_rows",
    "corpus_files",
    "corpus_fingerprint",
    "counting_documents",
    "encode_documents",
    "find_fortunes_file",
    "iter_documents",
    "load_text_corpus",
    "load_tokenizer",
    "make_batch",
    "open_store",
    "pack_documents",
    "packing_efficiency",
    "plan_rows",
    "prepare_store",
    "read_fortunes",
    "read_jsonl",
    "read_rows",
    "read_text",
    "split_arrays",
    "split_documents",
    "split_indices",
    "split_long_documents",
    "train_val_test_indices",
]
