"""A tokenizer as plain data, so that it travels inside a checkpoint (loaded weights only).

    {"kind": "byte"}                        ByteTokenizer
    {"kind": "counting", "vocab": 64}       CountingTokenizer(64)
    {"kind": "bpe", "json": "<tokenizer.json text>"}   BPETokenizer: HF tokenizers' whole file
    {"kind": "hf", "json": "<tokenizer.json text>"}    HFTokenizerFile: a user's tokenizer.json

``LitTinyGPT`` stores ``tokenizer_state(...)`` under ``checkpoint["lit_xf"]["tokenizer"]`` and
rebuilds it with :func:`tokenizer_from_state` when the checkpoint is loaded, so that generating
text needs the checkpoint only, not the data module it was trained with.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from lit_xf.data import BPETokenizer, ByteTokenizer, CountingTokenizer, HFTokenizerFile, Tokenizer


def tokenizer_state(tokenizer: Tokenizer | None) -> dict[str, Any] | None:
    """The plain-data form of ``tokenizer`` (None for a tokenizer of another kind)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte"}
    if isinstance(tokenizer, CountingTokenizer):
        return {"kind": "counting", "vocab": tokenizer.vocab}
    if isinstance(tokenizer, BPETokenizer):
        return {"kind": "bpe", "json": tokenizer.hf.to_str()}
    if isinstance(tokenizer, HFTokenizerFile):
        return {"kind": "hf", "json": tokenizer.hf.to_str()}
    return None


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """The tokenizer ``tokenizer_state`` described; ``ValueError`` for an unknown kind."""
    kind = state.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "counting":
        return CountingTokenizer(int(state["vocab"]))
    if kind in ("bpe", "hf"):
        # both read (and check) a file: hand them the stored one
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "tokenizer.json"
            path.write_text(state["json"], encoding="utf-8")
            return BPETokenizer(path) if kind == "bpe" else HFTokenizerFile(path)
    raise ValueError(f"unknown tokenizer kind {kind!r} in the checkpoint (known: byte, counting, bpe, hf)")
