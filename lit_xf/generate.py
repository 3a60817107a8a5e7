"""Text from a checkpoint: ``lit-xf generate`` and the prompts of ``lit-xf predict``.

    lit-xf generate --ckpt_path runs/default/version_0/checkpoints/last.ckpt --prompt "Q: "
    lit-xf generate --ckpt_path last.ckpt --prompts_file prompts.txt --max_new_tokens 100 --output out.jsonl
    lit-xf predict --config configs/default.yaml --ckpt_path last.ckpt --prompt "Q: " --prompt "A: "

Prompts come from ``--prompt`` (repeatable) and ``--prompts_file`` (one prompt per line, ``-`` for
stdin). Each prompt is continued by ``LitTinyGPT.predict_step`` on a batch of its own:
softmax(logits / temperature) over the ``top_k`` most likely tokens (0: all; temperature 0:
greedy), at most ``max_new_tokens`` tokens, stopping at the tokenizer's end of text; prompt ``i``
samples with the seed ``seed + i``, so a prompt's text does not depend on the others. Each text
(prompt and continuation) is printed, one blank line between texts, or written to ``--output``
(``.jsonl``: one ``{"prompt", "text"}`` object per line).

``generate`` needs only the checkpoint: the tokenizer travels in it (``lit_xf.tokenizer_state``),
and the weights are read as weights only (``lit_xf.checkpoints``). ``predict`` is LightningCLI's
subcommand (``--config`` etc.), with the same prompt and sampling options.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """Prompts, sampling settings and where the texts go (see the module docstring)."""

    prompt: tuple[str, ...] = ()
    prompts_file: str | None = None
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 50
    seed: int = 0
    output: str | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: every token), got {self.top_k}")

    @classmethod
    def from_args(cls, args: Any) -> GenerateOptions:
        """From parsed arguments (an argparse or jsonargparse namespace) holding the fields."""
        values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
        values["prompt"] = tuple(values["prompt"] or ())
        return cls(**{k: v for k, v in values.items() if v is not None})

    def prompts(self) -> list[str]:
        """The prompts in order: ``--prompt`` values, then the file's non-blank lines."""
        prompts = list(self.prompt)
        if self.prompts_file is not None:
            if self.prompts_file == "-":
                text = sys.stdin.read()
            else:
                path = Path(self.prompts_file)
                if not path.is_file():
                    raise FileNotFoundError(f"prompts file {self.prompts_file} does not exist")
                text = path.read_text(encoding="utf-8")
            prompts += [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValueError("no prompt: give --prompt TEXT (repeatable) or --prompts_file FILE")
        for i, prompt in enumerate(prompts, 1):
            if not prompt:
                raise ValueError(f"prompt {i} is empty: the model continues text, give it at least one character")
        return prompts


def add_generate_arguments(parser) -> None:
    """The prompt and sampling options, on an argparse or jsonargparse parser."""
    defaults = GenerateOptions()
    parser.add_argument("--prompt", action="append", default=None, help="text to continue (repeatable)")
    parser.add_argument("--prompts_file", default=None, help="one prompt per line ('-': stdin)")
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens, help="tokens to add")
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=defaults.top_k, help="sample among the k likeliest (0: all)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="prompt i samples with seed + i")
    parser.add_argument("--output", default=None, help="write the texts there (.jsonl: JSON lines), not stdout")


def prompt_batches(tokenizer, prompts: Sequence[str], options: GenerateOptions) -> list[dict[str, Any]]:
    """One ``LitTinyGPT.predict_step`` batch per prompt: ``prompt_ids [1, T0]`` and its sampling settings."""
    batches = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ValueError(f"prompt {i + 1} {prompt!r} encodes to no tokens")
        batches.append(
            {
                "prompt_ids": torch.tensor([ids], dtype=torch.long),
                "max_new_tokens": options.max_new_tokens,
                "temperature": options.temperature,
                "top_k": options.top_k or None,
                "eos_id": tokenizer.eos_id,
                "seed": options.seed + i,
            }
        )
    return batches


def write_texts(tokenizer, prompts: Sequence[str], outputs: Sequence[torch.Tensor], output: str | None) -> list[str]:
    """Decode ``outputs`` (``[1, T]`` ids per prompt) and print them, or write them to ``output``;
    returns the texts."""
    texts = [tokenizer.decode(ids[0].tolist()) for ids in outputs]
    if output is None:
        print("\n\n".join(texts))
        return texts
    path = Path(output)
    if path.suffix == ".jsonl":
        body = "".join(
            json.dumps({"prompt": p, "text": t}, ensure_ascii=False) + "\n" for p, t in zip(prompts, texts, strict=True)
        )
    else:
        body = "\n\n".join(texts) + "\n"
    try:
        path.write_text(body, encoding="utf-8")
    except OSError as err:
        raise ValueError(f"could not write {path}: {err.strerror or err}") from err
    log.info("wrote %d text(s) to %s", len(texts), path)
    return texts


def load_for_generation(ckpt_path: str, device: torch.device):
    """(model in eval mode on ``device``, the checkpoint's tokenizer). A kernel that can't run here
    for inference is replaced by ``auto``."""
    from lit_xf.module import LitTinyGPT

    model = LitTinyGPT.load_from_checkpoint(ckpt_path, map_location=device)
    if model.tokenizer is None:
        raise ValueError(
            f"checkpoint {ckpt_path} holds no tokenizer (saved before lit_xf stored it there, or trained without "
            "a TextDataModule); run lit-xf predict with the config it was trained with instead"
        )
    try:
        model.model.check_kernel(device, training=False)
    except ValueError as err:
        log.info("%s; generating with attention=auto", err)
        arch = {**model.hparams["arch"], "attention": "auto"}
        model = LitTinyGPT.load_from_checkpoint(ckpt_path, map_location=device, arch=arch)
    return model.to(device).eval(), model.tokenizer


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"lit-xf: error: {message} (lit-xf generate --help lists the options)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Sequence[str]) -> int:
    """``lit-xf generate``: prints (or writes) the continuations of the prompts. Returns the exit status."""
    parser = _Parser(prog="lit-xf generate", description="Continue prompts with a trained checkpoint.")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of lit-xf fit (local path or URL)")
    add_generate_arguments(parser)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exit_:  # --help, or an argument error (already printed)
        return int(exit_.code or 0)
    try:
        options = GenerateOptions.from_args(args)
        prompts = options.prompts()  # bad prompts are refused before anything is loaded
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, tokenizer = load_for_generation(args.ckpt_path, device)
        batches = prompt_batches(tokenizer, prompts, options)
        write_texts(
            tokenizer, prompts, [model.predict_step(batch, i) for i, batch in enumerate(batches)], options.output
        )
    except (ValueError, OSError, RuntimeError) as err:
        if os.environ.get("LIT_XF_DEBUG", "") not in ("", "0"):
            raise
        print(f"lit-xf: error: {err}", file=sys.stderr)
        return 1
    return 0
