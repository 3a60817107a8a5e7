"""``LitXfCLI``: the ``LightningCLI`` behind ``lit-xf fit / validate / test / predict``.

Kept apart from ``lit_xf.cli`` (the entry point and its usage), which imports this module only for
those subcommands: torch and Lightning take seconds to import, ``lit-xf --help`` should not wait.
"""

from __future__ import annotations

import re

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_xf.cli import PROG
from lit_xf.config import FIELD_NAMES
from lit_xf.data import TextDataModule
from lit_xf.module import LitTinyGPT

__all__ = ["LitXfCLI"]


class _Parser(LightningArgumentParser):
    def print_usage(self, file=None) -> None:
        # argparse prints the whole usage before an error; with a few hundred options that buries the
        # error line. jsonargparse's error already adds "run --help for the accepted options".
        return None

    def error(self, message: str, ex: Exception | None = None):
        # Configs written before GPTConfig set the architecture flat under model: say where it went.
        moved = sorted(set(re.findall(r"\bmodel\.(\w+)", message)) & set(FIELD_NAMES))
        if moved:
            message += f" (the architecture's fields are under model.arch: model.arch.{moved[0]})"
        return super().error(message, ex)


class LitXfCLI(LightningCLI):
    """``LightningCLI`` for ``LitTinyGPT`` on a ``TextDataModule``, with sequence length and
    vocabulary size taken from the data."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("model_class", LitTinyGPT)
        kwargs.setdefault("datamodule_class", TextDataModule)
        kwargs.setdefault("seed_everything_default", 0)
        # Each run logs to a new versioned folder; overwriting only matters for loggerless runs
        # (fast_dev_run), which all write config.yaml to the same default_root_dir.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"prog": PROG})
        kwargs.setdefault("parser_class", _Parser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.seq_len", "model.arch.max_seq_len")
        parser.link_arguments("data.vocab_size", "model.arch.vocab_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        # TF32 matmuls for 32-true runs on GPUs that have them; no effect on CPU.
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")
