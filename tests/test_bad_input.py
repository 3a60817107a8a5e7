"""Bad input through ``lit-xf``: every case ends with exactly one ``lit-xf: error:`` line naming the
problem, a non-zero exit, no traceback, and nothing left behind (a failed start leaves no run
folder; a run stopped mid-way leaves no checkpoint from bad weights and no temporary file).

The cases run ``cli.main`` in-process, in a fresh folder each (``tests/test_cli.py`` runs a few as
real processes).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_run import TINY

from lit_xf import cli

ROOT = Path(__file__).resolve().parents[1]
#: TINY with TensorBoard logging into ./lightning_logs, so that a failed start has a folder to leave
LOGGED = [a for a in TINY if not a.startswith("--trainer.logger")]
TEXT = [a for a in LOGGED if not a.startswith("--data.counting")]
TB = "--trainer.logger=lightning.pytorch.loggers.TensorBoardLogger"


@dataclasses.dataclass(frozen=True)
class Case:
    args: list[str]  # "{ckpt:NAME}" is replaced by the path of a checkpoint of the ``ckpts`` fixture
    needles: tuple[str, ...]  # texts the error line holds
    code: int = 1
    #: "start": nothing may be left; "trained": the run stopped after steps: logs may stay, no
    #: checkpoint and no temporary file
    leaves: str = "start"
    fault: Callable | None = None  # (monkeypatch, folder) -> None, a fault to fake


def _read_only(monkeypatch, folder: Path) -> None:
    """Folders under ./ro can't be created, as on a read-only mount (root ignores permission bits)."""
    from fsspec.implementations.local import LocalFileSystem

    real_makedirs, real_mkdir = LocalFileSystem.makedirs, os.makedirs
    ro = str(folder / "ro")

    def refuse(path):
        if str(path).startswith(ro):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def fs_makedirs(self, path, exist_ok=False):
        refuse(path)
        return real_makedirs(self, path, exist_ok=exist_ok)

    def os_makedirs(name, mode=0o777, exist_ok=False):
        refuse(os.path.abspath(name))
        return real_mkdir(name, mode, exist_ok)

    monkeypatch.setattr(LocalFileSystem, "makedirs", fs_makedirs)
    monkeypatch.setattr(os, "makedirs", os_makedirs)


def _full_disk(monkeypatch, folder: Path) -> None:
    """Every checkpoint write fails half-way with ENOSPC."""
    from lit_xf import checkpoints

    def save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + bytes(4096))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoints.torch, "save", save)


def _gen(*args: str) -> list[str]:
    return ["generate", "--ckpt_path={ckpt:good}", *args]


CASES = {
    # -- config ------------------------------------------------------------------------------------
    "unknown_key": Case(["fit", "--model.arch.d_modle", "64"], ("unrecognized arguments: --model.arch.d_modle",), 2),
    "unknown_key_in_file": Case(["fit", "--config", "{file:bad_key.yaml}"], ("d_modle",), 2),
    "flat_architecture_key": Case(["fit", "--config", "{file:flat_key.yaml}"], ("model.arch.n_heads",), 2),
    "wrong_type": Case(["fit", "--trainer.max_steps", "ten"], ("trainer.max_steps=ten: expected an integer",), 2),
    "missing_config": Case(["fit", "--config", "nope.yaml"], ("nope.yaml", "does not exist"), 2),
    "unknown_subcommand": Case(["fitt"], ("invalid choice: 'fitt'",), 2),
    "unknown_precision": Case(
        ["fit", *LOGGED, "--trainer.precision=13"],
        ("trainer.precision=13: expected one of 64, 32, 16,", "bf16-mixed"),
        2,
    ),
    "unknown_kernel": Case(
        ["fit", "--model.arch.attention=nope"], ("model.arch.attention=nope: expected one of auto",), 2
    ),
    "bad_compile": Case(["fit", "--model.compile=fast"], ("model.compile=fast: expected one of blocks, model",), 2),
    "bad_on_nonfinite": Case(["fit", "--model.on_nonfinite=ignore"], ("expected one of stop, skip",), 2),
    "heads_not_dividing_width": Case(["fit", *LOGGED, "--model.arch.n_heads=3"], ("n_heads=3 must divide d_model=16",)),
    "kv_heads_not_dividing": Case(
        ["fit", *LOGGED, "--model.arch.n_kv_heads=3"], ("n_kv_heads=3 must divide n_heads=2",)
    ),
    "window_not_positive": Case(["fit", *LOGGED, "--model.arch.attention_window=0"], ("attention_window must be",)),
    "lr_not_positive": Case(["fit", *LOGGED, "--model.lr=0"], ("need lr > 0",)),
    "xformers_training_on_cpu": Case(
        ["fit", *LOGGED, "--model.arch.attention=xformers"],
        ("attention='xformers' can't run MHA training on cpu", "Kernels that can: naive, sdpa."),
    ),
    "flex_training_on_cpu": Case(
        ["fit", *LOGGED, "--model.arch.attention=flex"], ("FlexAttention has no backward on CPU", "naive, sdpa.")
    ),
    "gpu_config_on_cpu": Case(
        ["fit", "--config", str(ROOT / "configs" / "gpt2_small.yaml")], ("--trainer.accelerator cpu runs it",)
    ),
    # -- data --------------------------------------------------------------------------------------
    "missing_corpus": Case(["fit", *TEXT, "--data.corpus=no_such.txt"], ("no_such.txt",)),
    "empty_corpus": Case(["fit", *TEXT, "--data.corpus={file:empty.txt}"], ("empty.txt' is empty",)),
    "seq_len_too_short": Case(["fit", *LOGGED, "--data.seq_len=1"], ("seq_len=1 must be >= 2",)),
    "batch_size_zero": Case(["fit", *LOGGED, "--data.batch_size=0"], ("batch_size=0 must be >= 1",)),
    "unknown_batch_mode": Case(["fit", "--data.batch_mode=stacked"], ("data.batch_mode=stacked: expected one of",), 2),
    "bpe_on_counting": Case(["fit", *LOGGED, "--data.tokenizer=bpe"], ("has its own number tokenizer",)),
    "validation_interval_past_the_epoch": Case(
        ["fit", *LOGGED, "--trainer.val_check_interval=100"], ("`val_check_interval` (100) must be less",)
    ),
    # -- checkpoints -------------------------------------------------------------------------------
    "missing_checkpoint": Case(["fit", *LOGGED, "--ckpt_path=nope.ckpt"], ("checkpoint nope.ckpt does not exist",)),
    "checkpoint_is_a_folder": Case(
        ["validate", *LOGGED, "--ckpt_path={file:a_folder}"], ("a_folder is a folder, not a checkpoint file",)
    ),
    "truncated_checkpoint": Case(
        ["fit", *LOGGED, "--ckpt_path={ckpt:truncated}"], ("truncated.ckpt is truncated or corrupted",)
    ),
    "random_bytes_checkpoint": Case(
        ["validate", *LOGGED, "--ckpt_path={ckpt:random}"], ("random.ckpt is corrupted or not a checkpoint",)
    ),
    "empty_checkpoint": Case(["test", *LOGGED, "--ckpt_path={ckpt:empty}"], ("empty.ckpt is empty or truncated",)),
    "code_in_a_checkpoint": Case(
        ["fit", *LOGGED, "--ckpt_path={ckpt:evil}"], ("not plain data (GLOBAL exec)", "does not run code")
    ),
    "not_a_checkpoint_dict": Case(["fit", *LOGGED, "--ckpt_path={ckpt:list}"], ("holds a list, not a checkpoint",)),
    "resume_with_another_architecture": Case(
        ["fit", *LOGGED, "--ckpt_path={ckpt:good}", "--model.arch.d_model=32"],
        ("holds a model with model.arch.d_model=16", "asks for model.arch.d_model=32"),
    ),
    "checkpoint_of_another_vocabulary": Case(
        ["validate", *LOGGED, "--ckpt_path={ckpt:good}", "--data.counting_vocab=32"],
        ("another configuration (vocab_size: checkpoint 17 vs model 33",),
    ),
    "generate_missing_checkpoint": Case(["generate", "--ckpt_path=nope.ckpt", "--prompt=1"], ("nope.ckpt does not",)),
    "generate_truncated_checkpoint": Case(
        ["generate", "--ckpt_path={ckpt:truncated}", "--prompt=1"], ("is truncated or corrupted",)
    ),
    "generate_without_a_tokenizer": Case(
        ["generate", "--ckpt_path={ckpt:no_tokenizer}", "--prompt=1"], ("holds no tokenizer",)
    ),
    # -- filesystem --------------------------------------------------------------------------------
    "save_dir_is_a_file": Case(
        ["fit", *LOGGED, TB, "--trainer.logger.init_args.save_dir={file:a_file}"],
        ("a_file/lightning_logs: Not a directory", "must be writable folders"),
    ),
    "root_dir_is_a_file": Case(["fit", *LOGGED, "--trainer.default_root_dir={file:a_file}"], ("Not a directory",)),
    "read_only_save_dir": Case(
        ["fit", *LOGGED, TB, "--trainer.logger.init_args.save_dir=ro/runs"],
        ("Read-only file system", "must be writable folders"),
        fault=_read_only,
    ),
    "full_disk_at_the_first_checkpoint": Case(
        ["fit", *[a for a in LOGGED if "checkpointing" not in a], "--trainer.max_steps=3"],
        ("could not write checkpoint", ".ckpt (No space left on device:", "MiB free in", "needs about"),
        leaves="trained",
        fault=_full_disk,
    ),
    "generate_output_in_a_missing_folder": Case(
        _gen("--prompt=1 2", "--max_new_tokens=2", "--output=no/such/folder/out.txt"), ("could not write no/such",)
    ),
    "missing_prompts_file": Case(_gen("--prompts_file=prompts.txt"), ("prompts file prompts.txt does not exist",)),
    # -- numerics and sampling ---------------------------------------------------------------------
    "learning_rate_far_too_high": Case(
        ["fit", *LOGGED, "--model.lr=1e4", "--trainer.max_steps=12", "--trainer.log_every_n_steps=4"],
        ("non-finite loss or gradients in steps", "model.lr=10000", "no checkpoint was written"),
        leaves="trained",
    ),
    "fp16_without_a_scaler": Case(
        ["fit", *LOGGED, "--trainer.precision=16-true", "--model.lr=1e4", "--trainer.log_every_n_steps=2"],
        ("fp16 overflow without a GradScaler (trainer.precision=16-true: use 16-mixed)",),
        leaves="trained",
    ),
    "empty_prompt": Case(_gen("--prompt="), ("prompt 1 is empty",)),
    "no_prompt": Case(_gen(), ("no prompt: give --prompt TEXT",)),
    "negative_max_new_tokens": Case(
        _gen("--prompt=1", "--max_new_tokens=-1"), ("max_new_tokens must be >= 0, got -1",)
    ),
    "negative_temperature": Case(_gen("--prompt=1", "--temperature=-1"), ("temperature must be >= 0",)),
    "negative_top_k": Case(_gen("--prompt=1", "--top_k=-2"), ("top_k must be >= 0",)),
    "generate_option_of_the_wrong_type": Case(_gen("--prompt=1", "--top_k=many"), ("--top_k: invalid int value",), 2),
    "predict_with_an_empty_prompt": Case(["predict", *LOGGED, "--ckpt_path={ckpt:good}", "--prompt="], ("is empty",)),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """A good checkpoint of the TINY model and broken ones."""
    folder = tmp_path_factory.mktemp("ckpts")
    assert (
        cli.main(["fit", *TINY, f"--trainer.default_root_dir={folder / 'run'}", "--trainer.enable_checkpointing=true"])
        == 0
    )
    good = folder / "good.ckpt"
    shutil.copyfile(next((folder / "run").rglob("last.ckpt")), good)
    data = good.read_bytes()
    paths = {name: folder / f"{name}.ckpt" for name in ("truncated", "random", "empty", "evil", "list", "no_tokenizer")}
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["random"].write_bytes(random.Random(0).randbytes(4096))
    paths["empty"].write_bytes(b"")
    torch.save({"state_dict": {}, "payload": _Payload(folder / "MARKER")}, paths["evil"])
    torch.save([1, 2, 3], paths["list"])
    checkpoint = torch.load(good, weights_only=True)
    del checkpoint["lit_xf"]
    torch.save(checkpoint, paths["no_tokenizer"])
    return {"good": good, **paths}


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def _files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*")}


def _prepare(folder: Path) -> None:
    (folder / "bad_key.yaml").write_text("model:\n  arch:\n    d_modle: 64\n")
    (folder / "flat_key.yaml").write_text("model:\n  n_heads: 4\n")
    (folder / "empty.txt").write_text("")
    (folder / "a_file").write_text("not a folder")
    (folder / "a_folder").mkdir()


def _resolve(args: list[str], folder: Path, ckpts: dict[str, Path]) -> list[str]:
    out = []
    for arg in args:
        for kind, table in (("ckpt", ckpts), ("file", None)):
            while "{" + kind + ":" in arg:
                start = arg.index("{" + kind + ":")
                end = arg.index("}", start)
                name = arg[start + len(kind) + 2 : end]
                path = table[name] if table is not None else folder / name
                arg = arg[:start] + str(path) + arg[end + 1 :]
        out.append(arg)
    return out


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name, ckpts, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    _prepare(tmp_path)
    if case.fault is not None:
        case.fault(monkeypatch, tmp_path)
    before = _files(tmp_path)
    code = cli.main(_resolve(case.args, tmp_path, ckpts))
    captured = capsys.readouterr()
    err = captured.err
    assert code == case.code, err
    assert "Traceback" not in err + captured.out
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("lit-xf: error: "), err
    for needle in case.needles:
        assert needle in errors[0], errors[0]
    left = _files(tmp_path) - before
    if case.leaves == "start":
        assert not left, sorted(map(str, left))
    else:
        assert not [p for p in left if p.suffix in (".ckpt", ".tmp")], sorted(map(str, left))
    assert not (ckpts["good"].parent / "MARKER").exists()


def test_the_table_covers_every_kind_of_bad_input():
    assert len(CASES) >= 30
