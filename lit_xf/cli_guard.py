"""How ``lit-xf`` fails: one ``lit-xf: error:`` line, a non-zero exit, and nothing left behind.

- :func:`one_line` turns jsonargparse's multi-line parse errors (a union's subtypes, one
  "Expected ..." per member) into ``key=value: expected one of a, b, c``.
- :func:`error_message` words the exceptions ``main`` reports: filesystem errors name the path and
  the reason, Lightning's "no GPU backend" gets the flag that runs the config on a CPU.
- :func:`check_training_kernel` refuses, before anything is built, an attention kernel that can't
  train on the device ``fit`` will use (the model alone checks inference only when it is built,
  so ``attention=xformers`` on a CPU would otherwise be told that ``flex`` can run it, which
  can't train there).
- :func:`removed_if_failed` removes the run folder (``runs/<name>/version_N/`` and the parents it
  created) of a run that fails before its first optimizer step and without a checkpoint.
"""

from __future__ import annotations

import contextlib
import errno
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

_TYPE_WORDS = {"NoneType": "null", "bool": "true, false", "int": "an integer", "float": "a number", "str": "a string"}


def one_line(message: str) -> str:
    """A jsonargparse error message on one line: ``key=value: expected ...`` where it names a key."""
    found = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if not found:
        return " ".join(message.split())
    key, rest = found.groups()
    given = re.search(r"(?:Given|Got) value: (.*)", rest)
    value = given.group(1).strip() if given else None
    if "Unrecognized" in rest or "not accepted" in rest or not re.search(r"Expected a", rest):
        return f"{key}: {' '.join(rest.split())}"
    expected: list[str] = []
    for literal in re.findall(r"Literal\[(.*?)\]", rest):
        expected += [choice.strip().strip("'\"") for choice in literal.split(",")]
    subtypes = re.sub(r"Given value type: .*", "", rest)  # the given value's type is not an expected one
    expected += [_TYPE_WORDS.get(t, t) for t in re.findall(r"<class '(\w+)'>", subtypes)]
    expected = list(dict.fromkeys(expected))
    what = f"one of {', '.join(expected)}" if len(expected) > 1 or re.search(r"Literal", rest) else expected[0]
    return f"{key}={value}: expected {what}"


def error_message(err: BaseException) -> str:
    """The text after ``lit-xf: error:`` for an exception ``main`` reports."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError | ValueError) and err.strerror:
        where = f"{err.filename}: " if err.filename else ""
        hint = ""
        if err.errno in (errno.ENOTDIR, errno.EEXIST, errno.EACCES, errno.EROFS, errno.EPERM):
            hint = " (trainer.default_root_dir and the logger's save_dir must be writable folders)"
        return f"{where}{err.strerror}{hint}"
    text = " ".join(str(err).split())
    if isinstance(err, MisconfigurationException) and "gpu backend" in text.lower():
        text += " (the config asks for a GPU; --trainer.accelerator cpu runs it on the CPU)"
    return text


def _device(accelerator) -> torch.device | None:
    if not isinstance(accelerator, str):
        return None
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"cpu": torch.device("cpu"), "gpu": torch.device("cuda"), "cuda": torch.device("cuda")}.get(accelerator)


def check_training_kernel(config) -> None:
    """Refuse (``ValueError``) a ``model.arch.attention`` that can't train on ``trainer.accelerator``'s
    device; ``config`` is the ``fit`` subcommand's namespace. Values that aren't valid yet are left
    for ``GPTConfig`` to refuse."""
    from lit_xf.attention import ATTENTION_CHOICES, make_kernel

    arch, device = config.model.arch, _device(config.trainer.accelerator)
    heads, kv_heads = (
        getattr(arch, "n_heads", None),
        getattr(arch, "n_kv_heads", None) or getattr(arch, "n_heads", None),
    )
    if device is None or arch.attention not in ATTENTION_CHOICES or not isinstance(heads, int):
        return
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads < 1 or heads % kv_heads:
        return
    make_kernel(arch.attention).check(
        device=device,
        n_heads=heads,
        n_kv_heads=kv_heads,
        alibi=arch.positions == "alibi",
        training=True,
        seq_len=arch.max_seq_len,
    )


def _run_folders(trainer) -> list[Path]:
    """The log folders of the trainer's TensorBoard / CSV loggers (computing them creates nothing)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from lit_xf.checkpoints import is_remote

    try:
        folders = [str(lg.log_dir) for lg in trainer.loggers if isinstance(lg, TensorBoardLogger | CSVLogger)]
    except OSError:
        return []
    return [Path(folder) for folder in folders if not is_remote(folder)]


def _first_missing(path: Path) -> Path | None:
    """The highest folder of ``path`` (itself included) that does not exist yet."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


@contextlib.contextmanager
def removed_if_failed(trainer) -> Iterator[None]:
    """Remove the run folders this run creates if it fails before its first optimizer step and
    with no checkpoint or memory snapshot in them."""
    created = [top for top in map(_first_missing, _run_folders(trainer)) if top is not None]
    try:
        yield
    except BaseException:
        if trainer.global_step == 0:
            for top in created:
                # a checkpoint, or an out-of-memory snapshot (lit_xf.callbacks.MemorySnapshot), keeps it
                if top.is_dir() and not any(top.rglob("*.ckpt")) and not any(top.rglob("memory_snapshot_*")):
                    shutil.rmtree(top, ignore_errors=True)
        raise
