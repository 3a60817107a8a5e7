"""lit_xf.checkpoints. Loads are weights only, whatever the path: a pickle served on loopback whose
``__reduce__`` writes a marker file never runs, through any ``lit-xf`` subcommand or
``LitTinyGPT.load_from_checkpoint``; a good checkpoint served the same way loads. Saves are atomic:
a write that fails (a full disk, faked) leaves the previous file and no temporary one."""

from __future__ import annotations

import errno
import functools
import http.server
import os
import random
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from tiny_run import TINY
from torch.utils.data import DataLoader

from lit_xf import GPTConfig, LitTinyGPT, checkpoints, cli
from lit_xf.checkpoints import (
    CheckpointError,
    CheckpointWriteError,
    SafeCheckpointIO,
    checkpoint_errors,
    load_checkpoint,
    save_checkpoint,
    use_safe_checkpoint_io,
)


class _Payload:
    """Unpickling this runs ``exec``, which writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path, monkeypatch):
    """(folder, base URL): a loopback HTTP server of ``folder`` in a thread, shut down after the test."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("lit_xf.checkpoints.FETCH_TIMEOUT_S", 10.0)
    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _tiny_model() -> LitTinyGPT:
    return LitTinyGPT(GPTConfig(vocab_size=17, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, attention="sdpa"))


@pytest.fixture
def evil(served, tmp_path):
    """(URL of a malicious checkpoint, marker path): a real checkpoint's dict plus a payload."""
    folder, base = served
    marker = tmp_path / "MARKER"
    model = _tiny_model()
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": L.__version__,
        "payload": _Payload(marker),
    }
    torch.save(checkpoint, folder / "evil.ckpt")
    return f"{base}/evil.ckpt", marker


def test_the_payload_runs_when_loaded_unsafely(evil, tmp_path, monkeypatch):
    """What the tests below guard against: Lightning's own loader runs the served payload."""
    from lightning.fabric.utilities.cloud_io import _load

    url, marker = evil
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # torch.hub caches the download there
    _load(url, map_location="cpu")
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict", "generate"])
def test_cli_never_runs_a_served_payload(subcommand, evil, tmp_path, monkeypatch, capsys):
    url, marker = evil
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    if subcommand == "generate":
        args = ["generate", f"--ckpt_path={url}", "--prompt=1 2"]
    else:
        args = [subcommand, *TINY, f"--ckpt_path={url}", *(["--prompt=1 2"] if subcommand == "predict" else [])]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert not marker.exists(), err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == [
        f"lit-xf: error: checkpoint {url} holds a pickled object that is not plain data (GLOBAL exec); "
        "lit_xf loads checkpoints as weights only and does not run code from them"
    ], err


def test_load_from_checkpoint_never_runs_a_served_payload(evil):
    url, marker = evil
    with pytest.raises(CheckpointError, match=r"not plain data \(GLOBAL exec\)"):
        LitTinyGPT.load_from_checkpoint(url)
    with pytest.raises(CheckpointError, match="not plain data"):
        load_checkpoint(url)
    with pytest.raises(CheckpointError, match="weights_only=True only"):
        LitTinyGPT.load_from_checkpoint(url, weights_only=False)
    assert not marker.exists()


def test_a_served_good_checkpoint_loads(served, tmp_path):
    folder, base = served
    model = _tiny_model()
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    ids = torch.randint(0, 17, (2, 16))
    trainer.fit(model, DataLoader([{"input_ids": ids, "labels": ids}], batch_size=None, collate_fn=lambda b: b))
    trainer.save_checkpoint(folder / "good.ckpt")
    loaded = LitTinyGPT.load_from_checkpoint(f"{base}/good.ckpt")
    model.eval(), loaded.eval()
    assert torch.equal(model(ids), loaded(ids))
    with pytest.raises(CheckpointError, match=rf"checkpoint {base}/missing.ckpt could not be fetched: HTTP Error 404"):
        LitTinyGPT.load_from_checkpoint(f"{base}/missing.ckpt")


def test_served_checkpoint_resumes_through_the_cli(served, tmp_path, monkeypatch):
    folder, base = served
    monkeypatch.chdir(tmp_path)
    assert cli.main(["fit", *TINY, "--trainer.enable_checkpointing=true", "--trainer.default_root_dir=out"]) == 0
    (saved,) = (tmp_path / "out").rglob("last.ckpt")
    (folder / "run.ckpt").write_bytes(saved.read_bytes())
    assert cli.main(["validate", *TINY, f"--ckpt_path={base}/run.ckpt"]) == 0


def test_the_module_installs_the_safe_loader_only_over_lightnings_default():
    trainer = L.Trainer(accelerator="cpu", logger=False)
    assert use_safe_checkpoint_io(trainer.strategy) and isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)

    class Mine(SafeCheckpointIO.__mro__[1]):  # a user's own TorchCheckpointIO subclass stays
        pass

    trainer.strategy.checkpoint_io = mine = Mine()
    assert not use_safe_checkpoint_io(trainer.strategy) and trainer.strategy.checkpoint_io is mine


# -- atomic writes --------------------------------------------------------------------------------
def _full_disk_after(n_saves: int):
    """A stand-in for torch.save that writes the first ``n_saves`` calls and then, like a full disk,
    writes part of the file and raises ENOSPC."""
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= n_saves:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04" + bytes(1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


def test_save_is_atomic_and_keeps_the_usual_file_mode(tmp_path):
    path = tmp_path / "deep" / "er" / "model.ckpt"
    save_checkpoint({"w": torch.arange(4.0)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["model.ckpt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_full_disk_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save_checkpoint({"w": torch.zeros(1000)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoints.torch, "save", _full_disk_after(0))
    with pytest.raises(CheckpointWriteError) as raised:
        save_checkpoint({"w": torch.ones(2**18)}, path)
    message = str(raised.value)
    assert message.startswith(f"could not write checkpoint {path} (No space left on device: ")
    assert f"MiB free in {tmp_path}, the checkpoint needs about 1.0 MiB)" in message
    assert isinstance(raised.value.__cause__, OSError) and raised.value.__cause__.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_full_disk_during_training_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    monkeypatch.setattr(checkpoints.torch, "save", _full_disk_after(1))
    folder = tmp_path / "checkpoints"
    saver = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, callbacks=[saver], enable_progress_bar=False)
    ids = torch.randint(0, 17, (2, 16))
    loader = DataLoader([{"input_ids": ids, "labels": ids}] * 4, batch_size=None, collate_fn=lambda b: b)
    with pytest.raises(CheckpointWriteError, match=r"epoch=0-step=4.ckpt \(No space left on device"):
        trainer.fit(_tiny_model(), loader)
    assert [p.name for p in folder.iterdir()] == ["epoch=0-step=2.ckpt"]
    assert load_checkpoint(folder / "epoch=0-step=2.ckpt")["global_step"] == 2


def test_a_checkpoint_folder_that_is_a_file_is_named(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*runs/x.ckpt \(File exists|Not a dir"):
        save_checkpoint({}, tmp_path / "runs" / "x.ckpt")


def test_random_bytes_are_named_as_not_a_checkpoint(tmp_path):
    """Whatever the legacy unpickler trips over first in bytes that are neither a zip archive nor a
    pickle (an index, a key, a value, a struct), the error is one ``CheckpointError`` naming the file."""
    rng = random.Random(0)
    for i in range(40):
        path = tmp_path / f"noise{i}.ckpt"
        path.write_bytes(rng.randbytes(rng.choice([16, 256, 4096])))
        with pytest.raises(CheckpointError, match=f"noise{i}.ckpt is (corrupted or not a|empty or truncated)"):
            load_checkpoint(path)
    with pytest.raises(ValueError, match="not about the bytes") as raised, checkpoint_errors("some.ckpt"):
        raise ValueError("not about the bytes")  # raised outside torch.load: passed through as it is
    assert type(raised.value) is ValueError
