"""``LitXfCLI``: the ``LightningCLI`` behind ``lit-xf fit / validate / test / predict``.

Kept apart from ``lit_xf.cli`` (the entry point and its usage), which imports this module only for
those subcommands: torch and Lightning take seconds to import, ``lit-xf --help`` should not wait.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_xf.callbacks import LearningRateLogger, StepMonitor
from lit_xf.checkpoints import checkpoint_source, is_remote, load_checkpoint
from lit_xf.cli import DEBUG_ENV, PROG
from lit_xf.cli_guard import check_training_kernel, one_line, removed_if_failed
from lit_xf.config import FIELD_NAMES
from lit_xf.data import TextDataModule
from lit_xf.generate import GenerateOptions, add_generate_arguments, prompt_batches, write_texts
from lit_xf.module import LitTinyGPT
from lit_xf.resume import merge_resume_hparams
from lit_xf.tokenizer_state import tokenizer_from_state

__all__ = ["LitXfCLI", "fit_summary"]

log = logging.getLogger(__name__)
# ckpt_path values the trainer resolves itself (Lightning's)
_CKPT_KEYWORDS = ("best", "last", "hpc")

#: Subcommands that evaluate a model: they write no run folder unless the command line names a logger.
EVALUATION_SUBCOMMANDS = ("validate", "test", "predict")
#: Callbacks that only act on training steps, left out of evaluation runs.
_TRAINING_ONLY = (StepMonitor, LearningRateLogger, LearningRateMonitor, Checkpoint)


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
        if not self.exit_on_error or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        print(f"{PROG}: error: {one_line(message)} (see `{prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


class LitXfCLI(LightningCLI):
    """``LightningCLI`` for ``LitTinyGPT`` on a ``TextDataModule``, with sequence length and
    vocabulary size taken from the data.

    After ``fit`` (rank zero, runs with a logger) it logs :func:`fit_summary`: how the run ended,
    the last metrics, the checkpoint, the log directory and the commands that evaluate it.

    ``validate``, ``test`` and ``predict`` print their results and write nothing: no logger (the
    configs' loggers are for ``fit``; a ``--trainer.logger...`` argument on the command line keeps
    one, and the run's config.yaml with it), and without the callbacks that act on training steps
    only: the monitors and the checkpoint callback (restored from ``--ckpt_path``, it would only warn
    that its folder has changed). A failed evaluation then leaves nothing behind either."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("model_class", LitTinyGPT)
        kwargs.setdefault("datamodule_class", TextDataModule)
        kwargs.setdefault("seed_everything_default", 0)
        # Each run logs to a new versioned folder; overwriting only matters for loggerless runs
        # (fast_dev_run), which all write config.yaml to the same default_root_dir.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"prog": PROG})
        kwargs.setdefault("parser_class", _Parser)
        argv = sys.argv[1:] if kwargs.get("args") is None else kwargs["args"]
        self._argv = [str(a) for a in argv] if isinstance(argv, (list, tuple)) else []
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.seq_len", "model.arch.max_seq_len")
        parser.link_arguments("data.vocab_size", "model.arch.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        self._args = args  # _parse_ckpt_path parses them again, without defaults
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """Resume from ``--ckpt_path`` without dropping what was asked for: Lightning loads the
        checkpoint's hyperparameters over the whole config; here the model keys given on the
        command line or in a config file are refused by name where they would change the weights'
        shapes and applied otherwise (``lit_xf.resume``). The file is read as weights only, and a
        missing one is named before anything is built."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or path in _CKPT_KEYWORDS or str(path).startswith("registry") or is_remote(str(path)):
            return  # the trainer resolves and loads these (remote ones as weights only, without hparams)
        if Path(path).is_dir():
            return  # a sharded checkpoint: the strategy reads it
        checkpoint_source(path)  # CheckpointError where it does not exist
        checkpoint = load_checkpoint(path, map_location="cpu")
        self._ckpt_tokenizer = checkpoint.get("lit_xf", {}).get("tokenizer")
        saved = checkpoint.get("hyper_parameters") or {}
        if not saved:
            return
        given = self.parser.parse_args(self._args, defaults=False)[subcommand].get("model") or {}
        merged, applied = merge_resume_hparams(str(path), saved, given)
        self.config = self.parser.parse_object({subcommand: {"model": merged}}, self.config)
        if applied:
            log.info(f"{subcommand} from {path} with {', '.join(applied)}")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":  # prompts and sampling (lit_xf.generate)
            add_generate_arguments(parser)
        return parser

    def predict(self, model: LitTinyGPT, datamodule=None, ckpt_path=None, **kwargs) -> list[str]:
        """``lit-xf predict``: continue the ``--prompt`` / ``--prompts_file`` prompts with the
        trainer (``LitTinyGPT.predict_step``), encoded with the checkpoint's tokenizer (else the data
        module's), printed or written to ``--output``."""
        options = GenerateOptions.from_args(self.config[self.subcommand])
        prompts = options.prompts()
        state = getattr(self, "_ckpt_tokenizer", None)
        tokenizer = tokenizer_from_state(state) if state else datamodule.tokenizer
        loader = torch.utils.data.DataLoader(prompt_batches(tokenizer, prompts, options), batch_size=None)
        outputs = self.trainer.predict(model, dataloaders=loader, ckpt_path=ckpt_path, return_predictions=True)
        return write_texts(tokenizer, prompts, outputs, options.output)

    def _run_subcommand(self, subcommand: str) -> None:
        with removed_if_failed(self.trainer):  # a failed start leaves no empty run folder
            super()._run_subcommand(subcommand)

    def before_instantiate_classes(self) -> None:
        # TF32 matmuls for 32-true runs on GPUs that have them; no effect on CPU.
        if torch.cuda.is_available():
            torch.set_float32_matmul_precision("high")
        if self.subcommand == "fit":  # before the model checks inference only
            check_training_kernel(self.config["fit"])
        if self.subcommand in EVALUATION_SUBCOMMANDS:
            if not self._names_a_logger():
                self.config[self.subcommand].trainer.logger = False
                self.save_config_callback = None  # it would write config.yaml into the working directory

    def after_instantiate_classes(self) -> None:
        if self.subcommand in EVALUATION_SUBCOMMANDS:
            self.trainer.callbacks = [cb for cb in self.trainer.callbacks if not isinstance(cb, _TRAINING_ONLY)]
            # ... whose states in the checkpoint Lightning would otherwise ask for
            warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`")

    def _names_a_logger(self) -> bool:
        """Whether the command line sets ``--trainer.logger`` or one of its arguments."""
        return any(
            a == "--trainer.logger" or a.startswith(("--trainer.logger=", "--trainer.logger.")) for a in self._argv
        )

    def before_fit(self) -> None:
        self._fit_start = time.perf_counter()
        if slow_bf16_on_cpu(self.trainer):
            log.warning(
                "precision=%s on a CPU without bf16 instructions (x86: AVX-512 BF16 / AMX) is emulated: steps are "
                "many times slower than in fp32 (configs/gqa_alibi.yaml: 26x); --trainer.precision 32-true",
                self.trainer.precision,
            )

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.is_global_zero and trainer.loggers:
            seconds = time.perf_counter() - getattr(self, "_fit_start", time.perf_counter())
            for line in fit_summary(trainer, seconds, config_files=self.config["fit"].get("config") or ()):
                log.info(line)


def slow_bf16_on_cpu(trainer: Trainer) -> bool:
    """Whether ``trainer`` computes in bf16 on a CPU whose oneDNN has no bf16 kernels (AVX2-only x86)."""
    if trainer.strategy.root_device.type != "cpu" or "bf16" not in str(trainer.precision):
        return False
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a build without oneDNN: nothing known
        return False


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{seconds:.1f} s"


def fit_summary(trainer: Trainer, seconds: float, config_files: Sequence[str] = ()) -> list[str]:
    """Lines that close a ``fit``: how it ended, the last logged metrics (``train/*`` from the last
    logged step, ``val/*`` from the last validation), the checkpoint(s), the log directory with the
    ``tensorboard`` command, and the ``validate`` / ``test`` commands for the checkpoint.

    The evaluation commands name the run's own ``config.yaml`` (the resolved fit config, command-line
    overrides included) when the run saved one, else the config files the fit was given."""
    step = trainer.global_step
    ended = (
        f"fit interrupted at step {step}" if trainer.interrupted else f"fit finished: {step} step{'s' * (step != 1)}"
    )
    lines = [f"{ended} in {_duration(seconds)}"]
    metrics = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if "/" in k and v.numel() == 1}
    for prefix in dict.fromkeys(k.split("/", 1)[0] for k in metrics):
        values = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith(prefix + "/"))
        lines.append(f"  {values}")
    ckpt = None
    for callback in trainer.checkpoint_callbacks:
        if callback.monitor and callback.best_model_path:
            lines.append(
                f"  best checkpoint ({callback.monitor} {float(callback.best_model_score):.4g}): "
                f"{callback.best_model_path}"
            )
        elif callback.best_model_path:
            lines.append(f"  checkpoint: {callback.best_model_path}")
        if callback.last_model_path and callback.last_model_path != callback.best_model_path:
            lines.append(f"  last checkpoint: {callback.last_model_path}")
        ckpt = ckpt or callback.last_model_path or callback.best_model_path
    if trainer.checkpoint_callbacks and not ckpt:
        lines.append(
            "  checkpoint: none saved (no validation ran; with val_check_interval set, it is saved after validations)"
        )
    if trainer.log_dir:
        lines.append(f"  logs: {trainer.log_dir}")
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            lines.append(f"  TensorBoard: tensorboard --logdir {shlex.quote(str(logger.save_dir))}")
            break
    if ckpt:
        saved = os.path.join(trainer.log_dir, "config.yaml") if trainer.log_dir else None
        configs = [saved] if saved and os.path.isfile(saved) else [str(c) for c in config_files]
        args = "".join(f" --config {shlex.quote(c)}" for c in configs) + f" --ckpt_path {shlex.quote(ckpt)}"
        lines.append(f"  evaluate: {PROG} validate{args}")
        lines.append(f"            {PROG} test{args}")
    return lines
