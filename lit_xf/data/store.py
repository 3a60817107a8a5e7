"""The token store: a corpus tokenized once into memory-mapped numpy files.

A store is a folder of three files:

- ``tokens.bin``: every document's token ids (text documents end in EOS), one after the other,
  ``uint16`` when the vocabulary has at most 65536 ids, else ``uint32``;
- ``docs.idx``: ``int64`` offsets, ``n_docs + 1`` of them: document d is ``tokens[idx[d]:idx[d + 1]]``;
- ``meta.json``: dtype, counts, tokenizer and corpus fingerprints; written last.

A store is built in a hidden temporary folder beside its destination and renamed into place
whole, so a killed prepare leaves no folder that looks complete; ``open_store`` checks the file
sizes against ``meta.json`` (a truncated or half-copied store is named, never read).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from lit_xf.data.tokenizers import ByteTokenizer, Tokenizer, encode_documents, load_tokenizer

log = logging.getLogger(__name__)

STORE_FORMAT = 1
TOKENS_FILE, INDEX_FILE, META_FILE = "tokens.bin", "docs.idx", "meta.json"
CHUNK_CHARS = 1 << 20  # text per encoding task
POOL_MIN_BYTES = 8 << 20  # smaller corpora are encoded in-process (a pool's start-up costs more)


class StoreError(ValueError):
    """A token store that is missing, incomplete, truncated or of another format."""


@dataclass
class TokenDocs:
    """Documents of token ids: document d is ``tokens[offsets[d]:offsets[d + 1]]`` (memory-mapped
    files of a store, or arrays in memory)."""

    tokens: np.ndarray  # [n_tokens] integer ids
    offsets: np.ndarray  # [n_docs + 1] int64, offsets[0] == 0
    meta: dict[str, Any] | None = None

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        """``[n_docs]`` int64 token count of every document."""
        return np.diff(np.asarray(self.offsets, dtype=np.int64))

    def doc(self, d: int) -> np.ndarray:
        return self.tokens[int(self.offsets[d]) : int(self.offsets[d + 1])]

    def piece(self, d: int, start: int, length: int) -> np.ndarray:
        """Tokens ``start : start + length`` of document d (a view into the store)."""
        base = int(self.offsets[d]) + start
        return self.tokens[base : base + length]

    @classmethod
    def from_lists(cls, docs: Sequence[Sequence[int]]) -> TokenDocs:
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        tokens = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=int(lengths.sum()))
        return cls(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (vocab_size <= 65536), else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def store_key(parts: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of ``parts`` (corpus and tokenizer fingerprints, reading options)."""
    import hashlib

    blob = json.dumps({"format": STORE_FORMAT, **parts}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def open_store(path: str | Path) -> TokenDocs:
    """The store at ``path``, memory-mapped; ``StoreError`` naming what is wrong with it otherwise."""
    path = Path(path)
    rebuild = (
        "delete the folder, or run `lit-xf prepare --config ...` (or the data module's prepare_data) to rebuild it"
    )
    meta_path = path / META_FILE
    if not path.is_dir():
        raise StoreError(f"no token store at {str(path)!r}; run `lit-xf prepare --config ...` to build it")
    if not meta_path.is_file():
        raise StoreError(
            f"token store {str(path)!r} is incomplete (no {META_FILE}: its prepare did not finish); {rebuild}"
        )
    try:
        meta = json.loads(meta_path.read_text())
        n_docs, n_tokens, dtype = int(meta["n_docs"]), int(meta["n_tokens"]), np.dtype(meta["dtype"])
    except (ValueError, KeyError, TypeError) as err:
        raise StoreError(f"token store {str(path)!r} has an unreadable {META_FILE} ({err}); {rebuild}") from None
    if meta.get("format") != STORE_FORMAT:
        raise StoreError(
            f"token store {str(path)!r} is format {meta.get('format')}, this lit_xf reads {STORE_FORMAT}; {rebuild}"
        )
    for name, want in ((TOKENS_FILE, n_tokens * dtype.itemsize), (INDEX_FILE, (n_docs + 1) * 8)):
        f = path / name
        have = f.stat().st_size if f.is_file() else None
        if have != want:
            raise StoreError(
                f"token store {str(path)!r} is truncated or damaged: {name} holds "
                f"{'no file' if have is None else f'{have} bytes'}, {META_FILE} expects {want}; {rebuild}"
            )
    offsets = np.memmap(path / INDEX_FILE, dtype=np.int64, mode="r")
    if offsets[0] != 0 or offsets[-1] != n_tokens:
        raise StoreError(f"token store {str(path)!r}: {INDEX_FILE} does not end at {n_tokens} tokens; {rebuild}")
    tokens = np.memmap(path / TOKENS_FILE, dtype=dtype, mode="r") if n_tokens else np.zeros(0, dtype)
    return TokenDocs(tokens, offsets, meta)


# ---- encoding ----

_WORKER: dict[str, Any] = {}


def encode_chunk(
    tokenizer: Tokenizer, texts: Sequence[str], eos_id: int | None, dtype
) -> tuple[np.ndarray, np.ndarray]:
    """(``tokens`` of the texts one after the other, each followed by ``eos_id`` unless None;
    ``[len(texts)]`` their lengths, EOS included)."""
    if isinstance(tokenizer, ByteTokenizer):
        raw = [t.encode("utf-8") for t in texts]
        body = np.frombuffer(b"".join(raw), dtype=np.uint8)
        lens = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
        if eos_id is None:
            return body.astype(dtype), lens
        lens = lens + 1
        out = np.empty(int(lens.sum()), dtype=dtype)
        eos_at = np.cumsum(lens) - 1
        is_eos = np.zeros(len(out), dtype=bool)
        is_eos[eos_at] = True
        out[is_eos] = eos_id
        out[~is_eos] = body
        return out, lens
    ids = encode_documents(tokenizer, texts, append_eos=False)
    if eos_id is not None:
        for doc in ids:
            doc.append(eos_id)
    lens = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    return np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lens.sum())), lens


def _init_worker(spec: str, eos_id: int | None, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER.update(tokenizer=load_tokenizer(spec), eos_id=eos_id, dtype=np.dtype(dtype))


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_chunk(_WORKER["tokenizer"], texts, _WORKER["eos_id"], _WORKER["dtype"])


def _chunks(documents: Iterable[str]) -> Iterator[list[str]]:
    chunk, chars = [], 0
    for doc in documents:
        chunk.append(doc)
        chars += len(doc)
        if chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encoded(documents, spec, tokenizer, eos_id, dtype, workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded chunks in corpus order; with ``workers`` > 1 a process pool, at most 2 chunks per
    worker in flight (memory stays bounded whatever the corpus size)."""
    if workers <= 1:
        for chunk in _chunks(documents):
            yield encode_chunk(tokenizer, chunk, eos_id, dtype)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (spec, eos_id, dtype.str)) as pool:
        pending: deque = deque()
        for chunk in _chunks(documents):
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


TOKENIZER_EOS = object()  # build_store's default eos_id: the tokenizer's


def build_store(
    dest: str | Path,
    documents: Iterable[str],
    tokenizer_spec: str,
    meta: dict[str, Any],
    *,
    eos_id: int | None | object = TOKENIZER_EOS,
    workers: int | None = None,
    total_bytes: int | None = None,
) -> TokenDocs:
    """Tokenize ``documents`` with ``tokenizer_spec`` (``load_tokenizer``) into a store at ``dest``,
    atomically (a temporary folder renamed into place). ``workers``: encoding processes (default:
    every core; corpora under 8 MB are encoded in-process). If another process finished the same
    store first, its store is kept. ``eos_id``: the id appended after each document (default the
    tokenizer's own; None: none). Returns the opened store."""
    dest = Path(dest)
    tokenizer = load_tokenizer(tokenizer_spec)
    if eos_id is TOKENIZER_EOS:
        eos_id = tokenizer.eos_id
    dtype = token_dtype(tokenizer.vocab_size)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if total_bytes is not None and total_bytes < POOL_MIN_BYTES:
        workers = 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        n_docs = n_tokens = 0
        with open(tmp / TOKENS_FILE, "wb") as f_tok, open(tmp / INDEX_FILE, "wb") as f_idx:
            np.zeros(1, dtype=np.int64).tofile(f_idx)
            for tokens, lens in _encoded(documents, tokenizer_spec, tokenizer, eos_id, dtype, workers):
                tokens.tofile(f_tok)
                (n_tokens + np.cumsum(lens)).astype(np.int64).tofile(f_idx)
                n_docs += len(lens)
                n_tokens += int(lens.sum())
        if n_docs == 0:
            raise ValueError(f"corpus={meta.get('corpus')!r} has no non-empty documents (all were empty or whitespace)")
        info = {
            "format": STORE_FORMAT,
            "dtype": dtype.str,
            "n_docs": n_docs,
            "n_tokens": n_tokens,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": eos_id,
            "pad_id": tokenizer.pad_id,
            "seconds": round(time.perf_counter() - t0, 2),
            "workers": workers,
            **meta,
        }
        (tmp / (META_FILE + ".tmp")).write_text(json.dumps(info, indent=1))
        os.replace(tmp / (META_FILE + ".tmp"), tmp / META_FILE)  # last: the completeness mark
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / META_FILE).is_file():
                raise
            log.info("token store %s was finished by another process; using it", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_store(dest)


def prepare_store(dest: str | Path, build: Callable[[], TokenDocs]) -> TokenDocs:
    """The store at ``dest`` if it is complete, else ``build()`` (a damaged one is set aside first, with a warning)."""
    dest = Path(dest)
    if dest.exists():
        try:
            return open_store(dest)
        except StoreError as err:
            log.warning("%s; rebuilding it", err)
            broken = dest.parent / f".{dest.name}.broken-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(dest, broken)
            shutil.rmtree(broken, ignore_errors=True)
    return build()
