"""Checkpoint files: loaded as weights only whatever the path, written atomically.

Loading. A checkpoint is a pickle, and unpickling can run code. ``torch.load(weights_only=True)``
(torch's default for local files since 2.6) accepts only tensors and plain data; Lightning, though,
loads ``http(s)://`` paths through ``torch.hub`` with ``weights_only=False``, so a served checkpoint
could run anything. :func:`load_checkpoint` reads every path the same way: local files directly,
``http(s)://`` URLs fetched into memory (``urllib``), other fsspec URLs (``s3://``, ``gs://``,
``memory://`` ...) through fsspec, and all of them unpickled with ``weights_only=True``. Remote
checkpoints are fetched rather than refused because Lightning writes and resumes checkpoints on
fsspec filesystems (``default_root_dir: s3://...``), and the weights-only unpickler protects a
fetched file exactly as it protects a local one. ``weights_only=False`` is refused: every
checkpoint lit_xf writes is plain data. Failures raise :class:`CheckpointError` with one line
naming the file and what is wrong with it.

Writing. :func:`save_checkpoint` writes a local checkpoint to a temporary file in the same folder,
fsyncs it, then renames it over the final name (``os.replace``, atomic on POSIX), so a reader sees
the old file or the new one, never a part: a failed write (a full disk) leaves nothing under the
final name and no temporary file, and raises :class:`CheckpointWriteError` naming the path and the
free space. (Lightning's own save serializes to memory first but then writes the final name
directly, so a full disk leaves a truncated file there.) Remote paths are written by Lightning.

``SafeCheckpointIO`` is the Lightning ``CheckpointIO`` that does both for the Trainer (``fit`` /
``validate`` / ``test`` / ``predict`` with ``ckpt_path``, ``ModelCheckpoint``'s saves);
``LitTinyGPT.setup`` installs it where the strategy has Lightning's default ``TorchCheckpointIO``
(:func:`use_safe_checkpoint_io`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import re
import shutil
import struct
import traceback
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec.utils
import torch
from lightning.fabric.plugins import TorchCheckpointIO

#: Seconds a remote checkpoint may take to answer (each blocking read of ``urllib``).
FETCH_TIMEOUT_S = 60.0


class CheckpointError(ValueError):
    """A checkpoint that can't be read, or that holds more than weights and plain data."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (its ``__cause__`` is the ``OSError``)."""


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` is a URL (``http(s)://``, ``s3://``, ...) rather than a local file."""
    return isinstance(path, str) and fsspec.utils.get_protocol(path) not in ("file", "local")


def _fetch(url: str) -> bytes:
    """The bytes at ``url``: ``http(s)`` through urllib, other protocols through fsspec."""
    try:
        if fsspec.utils.get_protocol(url) in ("http", "https"):
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 (http(s) only)
                return response.read()
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {url} does not exist") from None
    except (OSError, ValueError, ImportError) as err:  # URLError and HTTPError are OSErrors
        raise CheckpointError(f"checkpoint {url} could not be fetched: {err}") from err


def checkpoint_source(path: str | Path) -> str | Path | io.BytesIO:
    """What ``torch.load`` should read for ``path``: the local path itself (checked to exist), or
    the fetched bytes of a remote one."""
    if is_remote(path):
        return io.BytesIO(_fetch(str(path)))
    if not Path(path).is_file():
        what = "is a folder, not a checkpoint file" if Path(path).is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {path} {what}")
    return path


def _unpickler_reason(message: str) -> str:
    """The one informative line of torch's weights-only error (which also advises weights_only=False)."""
    found = re.search(r"WeightsUnpickler error: (.*)", message)
    reason = (found.group(1) if found else message.strip().splitlines()[0]).strip()
    return reason.split(" was not an allowed global")[0].removeprefix("Unsupported global: ")


@contextlib.contextmanager
def checkpoint_errors(path: str | Path) -> Iterator[None]:
    """Turn ``torch.load``'s errors about ``path`` into one-line :class:`CheckpointError` messages."""
    try:
        yield
    except pickle.UnpicklingError as err:
        reason = _unpickler_reason(str(err))
        if reason.startswith("GLOBAL "):
            raise CheckpointError(
                f"checkpoint {path} holds a pickled object that is not plain data ({reason}); lit_xf loads "
                "checkpoints as weights only and does not run code from them"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupted or not a checkpoint ({reason})") from None
    except EOFError:
        raise CheckpointError(f"checkpoint {path} is empty or truncated") from None
    except (IndexError, KeyError, ValueError, OverflowError, UnicodeDecodeError, struct.error) as err:
        # bytes that are neither a zip archive nor a pickle: torch.load's legacy unpickler fails on
        # whatever it read first; the same errors raised anywhere else are not about the file's bytes
        if isinstance(err, CheckpointError) or not _raised_in_torch_load(err):
            raise
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a checkpoint ({type(err).__name__}: {err})"
        ) from None
    except OSError as err:  # torch's zip reader on a cut file: EINVAL
        if err.errno == errno.EINVAL:
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupted (its zip archive can't be read)"
            ) from None
        raise CheckpointError(f"checkpoint {path} could not be read ({err.strerror or err})") from err
    except RuntimeError as err:
        text = str(err)
        if "PytorchStreamReader" not in text and "zip archive" not in text:
            raise
        reason = text.split(". ")[0].removeprefix("PytorchStreamReader failed reading zip archive: ")
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted ({reason})") from None


def _raised_in_torch_load(err: BaseException) -> bool:
    return any(
        frame.f_code.co_filename.endswith(_TORCH_SERIALIZATION) for frame, _ in traceback.walk_tb(err.__traceback__)
    )


_TORCH_SERIALIZATION = os.path.join("torch", "serialization.py")


def refuse_unsafe(weights_only: bool | None) -> None:
    """Refuse ``weights_only=False``."""
    if weights_only is False:
        raise CheckpointError(
            "lit_xf loads checkpoints with weights_only=True only (its own checkpoints hold tensors and plain "
            "data); load a trusted file of another kind with torch.load yourself"
        )


def load_checkpoint(path: str | Path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
    """The checkpoint at ``path`` (local or remote), unpickled with ``weights_only=True``."""
    refuse_unsafe(weights_only)
    source = checkpoint_source(path)
    with checkpoint_errors(path):
        checkpoint = torch.load(source, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def _tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages in a checkpoint (what ``torch.save`` writes, pickles aside)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _write_error(path: Path, err: OSError, checkpoint: dict) -> CheckpointWriteError:
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = _mib(shutil.disk_usage(path.parent).free)
        except OSError:
            free = "unknown"
        reason += f": {free} free in {path.parent}, the checkpoint needs about {_mib(_tensor_bytes(checkpoint))}"
    return CheckpointWriteError(f"could not write checkpoint {path} ({reason})")


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """``torch.save(checkpoint, path)``, atomically: into a temporary file beside ``path``, fsynced,
    then renamed over it (see the module docstring). Raises :class:`CheckpointWriteError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666: the file gets the umask's usual mode (mkstemp would make it 0600)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _write_error(path, err, checkpoint) from err
    with contextlib.suppress(OSError):  # make the rename itself durable (not every filesystem can)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _keep_storage(storage, location):
    return storage


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose loads go through :func:`load_checkpoint` and whose
    local saves through :func:`save_checkpoint`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or is_remote(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_checkpoint(checkpoint, path)

    def load_checkpoint(
        self, path, map_location: Callable | None = _keep_storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def save_last_checkpoint(trainer) -> Path | None:
    """End a run with ``<checkpoint dir>/last.ckpt`` holding its final step (``ModelCheckpoint``
    saves on validation or at epoch ends only, so a run whose ``max_steps`` comes before either
    would end with no checkpoint). Where ModelCheckpoint already saved the final step, ``last.ckpt``
    is a hard link to that file (a copy where links don't work); otherwise the trainer saves it.
    Nothing without a ModelCheckpoint (checkpointing disabled) or with a remote folder."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    saver = trainer.checkpoint_callback
    if not isinstance(saver, ModelCheckpoint) or not saver.dirpath or is_remote(str(saver.dirpath)):
        return None
    last = Path(saver.dirpath) / f"{saver.CHECKPOINT_NAME_LAST}{saver.FILE_EXTENSION}"
    at_end = getattr(saver, "_last_global_step_saved", None) == trainer.global_step
    saved = Path(getattr(saver, "_last_checkpoint_saved", "") or last) if at_end else None
    if saved is not None and saved == last:
        return last  # save_last already wrote it
    if saved is not None and saved.is_file():
        if trainer.is_global_zero:
            tmp = last.with_name(f".{last.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
            try:
                os.link(saved, tmp)
            except OSError:
                shutil.copyfile(saved, tmp)
            os.replace(tmp, last)
        trainer.strategy.barrier()
    else:
        trainer.save_checkpoint(last, weights_only=saver.save_weights_only)
    saver.last_model_path = str(last)
    return last


def use_safe_checkpoint_io(strategy) -> bool:
    """Give ``strategy`` a :class:`SafeCheckpointIO` where it has Lightning's default (a checkpoint IO
    chosen by the user is left alone). Returns whether the strategy's IO is lit_xf's now."""
    current = strategy.checkpoint_io  # Lightning creates its TorchCheckpointIO on first use
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = current = SafeCheckpointIO()
    return isinstance(current, SafeCheckpointIO)
