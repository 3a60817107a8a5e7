"""Tokenizers: bytes (258 ids), the counting task's, a byte-level BPE trained with HF ``tokenizers``,
and any local HF ``tokenizer.json``."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)

TOKENIZERS = ("byte", "bpe", "file")


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
        return [enc.ids for enc in _encode_fast(self.hf, list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


class FileTokenizer:
    """Any HF ``tokenizers`` ``tokenizer.json`` (a user's, or one that came with a converted model:
    ``lit-xf convert``), used as it is. ``eos_id``: the id appended after each document; default the
    first of ``EOS_TOKENS`` in its vocabulary (none there: documents get no EOS). ``pad_id`` fills
    rows past their documents; default the first of ``PAD_TOKENS``, else the EOS id, else 0 (pads
    never get a label, so any id serves)."""

    EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
    PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")

    def __init__(self, path: str | Path, eos_id: int | None = None, pad_id: int | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(
                f"no tokenizer file at {str(path)!r}: tokenizer takes 'byte', 'bpe', 'file' (with tokenizer_dir) "
                "or the path of an existing tokenizer.json"
            )
        try:
            self.hf = HFTokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises its own Exception type
            raise ValueError(f"{str(self.path)!r} is not a HF tokenizers file ({err})") from None
        self.vocab_size = self.hf.get_vocab_size()
        for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is not an id of {str(self.path)!r} (0..{self.vocab_size - 1})")
        ids = {tok: self.hf.token_to_id(tok) for tok in self.EOS_TOKENS + self.PAD_TOKENS}
        found_eos = next((ids[t] for t in self.EOS_TOKENS if ids[t] is not None), None)
        found_pad = next((ids[t] for t in self.PAD_TOKENS if ids[t] is not None), None)
        self.eos_id = eos_id if eos_id is not None else found_eos
        if pad_id is None:
            pad_id = found_pad if found_pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.pad_id = pad_id

    @classmethod
    def from_json(cls, text: str, eos_id: int | None = None, pad_id: int | None = None) -> FileTokenizer:
        """The tokenizer whose ``tokenizer.json`` text is ``text``."""
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "tokenizer.json"
            path.write_text(text, encoding="utf-8")
            return cls(path, eos_id, pad_id)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [enc.ids for enc in _encode_fast(self.hf, list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


def _encode_fast(hf, texts: list[str], **kwargs):
    """``encode_batch`` without the character offsets (``encode_batch_fast``, tokenizers >= 0.20:
    the same ids, faster; docs/benchmarks-data-memory.md has the prepare rates), else ``encode_batch``."""
    fast = getattr(hf, "encode_batch_fast", None)
    return (fast or hf.encode_batch)(texts, **kwargs)


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


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """What fixes the token ids: ``byte`` for the byte tokenizer, else the sha256 of its json file."""
    if isinstance(tokenizer, ByteTokenizer):
        return "byte"
    path = getattr(tokenizer, "path", None)
    if path is None:
        raise TypeError(f"no fingerprint for tokenizer {type(tokenizer).__name__} (it has no file)")
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` or a tokenizer json path (a trained ``bpe`` file, or any HF ``tokenizer.json``)."""
    if spec == "byte":
        return ByteTokenizer()
    if not Path(spec).expanduser().is_file():
        return FileTokenizer(spec)  # raises, naming what would work
    try:
        return BPETokenizer(Path(spec).expanduser())
    except ValueError:  # not made by BPETokenizer.train: special ids elsewhere
        return FileTokenizer(spec)
