"""A tokenizer as plain data, so that it travels inside a checkpoint (loaded weights only).

    {"kind": "byte"}                        ByteTokenizer
    {"kind": "counting", "vocab": 64}       CountingTokenizer(64)
    {"kind": "bpe", "json": "<tokenizer.json text>"}   BPETokenizer: HF tokenizers' whole file
    {"kind": "file", "json": "...", "eos_id": 2, "pad_id": 2}   FileTokenizer (any tokenizer.json)

``LitTinyGPT`` stores ``tokenizer_state(...)`` under ``checkpoint["lit_xf"]["tokenizer"]`` and
rebuilds it with :func:`tokenizer_from_state` when the checkpoint is loaded, so that generating
text needs the checkpoint only, not the data module it was trained with.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from lit_xf.data import BPETokenizer, ByteTokenizer, CountingTokenizer, FileTokenizer, Tokenizer


def tokenizer_state(tokenizer: Tokenizer | None) -> dict[str, Any] | None:
    """The plain-data form of ``tokenizer`` (None for a tokenizer of another kind)."""
    if isinstance(tokenizer, ByteTokenizer):
        return {"kind": "byte"}
    if isinstance(tokenizer, CountingTokenizer):
        return {"kind": "counting", "vocab": tokenizer.vocab}
    if isinstance(tokenizer, BPETokenizer):
        return {"kind": "bpe", "json": tokenizer.hf.to_str()}
    if isinstance(tokenizer, FileTokenizer):
        return {"kind": "file", "json": tokenizer.hf.to_str(), "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
    return None


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """The tokenizer ``tokenizer_state`` described; ``ValueError`` for an unknown kind."""
    kind = state.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "counting":
        return CountingTokenizer(int(state["vocab"]))
    if kind == "bpe":
        # it reads (and checks) a file: hand it the stored one
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "tokenizer.json"
            path.write_text(state["json"], encoding="utf-8")
            return BPETokenizer(path)
    if kind == "file":
        return FileTokenizer.from_json(state["json"], state.get("eos_id"), state.get("pad_id"))
    raise ValueError(f"unknown tokenizer kind {kind!r} in the checkpoint (known: byte, counting, bpe, file)")
