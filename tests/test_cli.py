"""The ``lit-xf`` command as users meet it: a real process, its exit status and what it prints."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from lit_xf import cli

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "LIT_XF_DEBUG"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "lit_xf.cli", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=300)


def assert_one_clear_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Non-zero exit, no traceback, and the error is one `error:` line naming what is wrong."""
    assert proc.returncode != 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


# -- lit-xf env ----------------------------------------------------------------------------------
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU report")
def test_env_on_cpu_names_sdpa_and_says_why_not_xformers(tmp_path):
    proc = run_cli("env", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in ("python", "torch", "lightning", "xformers", "cuda", "device"):
        assert any(line.startswith(name) for line in out.splitlines()), out
    rows = [line.split() for line in out.splitlines() if line.startswith(("causal ", "packed "))]
    assert len(rows) == 8  # (causal, packed) x (MHA, GQA) x (no ALiBi, ALiBi)
    header = next(line.split() for line in out.splitlines() if line.startswith("mask"))
    auto = header.index("auto")
    assert {row[auto + (1 if row[1] == "GQA" else 0)] for row in rows} == {"sdpa"}
    assert "xformers: xformers' attention kernels are CUDA-only" in out
    assert "flex: FlexAttention has no backward on CPU" in out


def test_env_report_in_process_lists_every_case():
    report = cli.env_report("cpu", n_heads=8, n_kv_heads=4, seq_len=512)
    assert "GQA 8/4" in report and "GQA = 8q/4kv, seq_len 512" in report
    assert report.count(" sdpa ") >= 8


# -- the console script and the top-level usage ---------------------------------------------------
def test_console_script_is_installed():
    script = Path(sysconfig.get_path("scripts")) / "lit-xf"
    if not script.exists():
        pytest.skip(f"no console script at {script} (lit_xf not installed with pip in this environment)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "lit-xf env" in proc.stdout


def test_no_subcommand_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: lit-xf" in capsys.readouterr().err


def test_bench_without_bench_module_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lit_xf.bench", None)  # makes the import fail like a missing module
    assert cli.main(["bench", "attention"]) == 2
    assert "no module lit_xf.bench" in capsys.readouterr().err


# -- --print_config ----------------------------------------------------------------------------------
def test_print_config_shows_links_and_round_trips(tmp_path):
    proc = run_cli("fit", "--config", str(DEFAULT_CONFIG), "--print_config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    assert config["data"]["corpus"] == "fortunes" and config["data"]["batch_mode"] == "packed"
    assert config["model"]["attention"] == "auto"
    # Linked: set from data.seq_len / data.vocab_size, so they are not keys of their own.
    assert "max_seq_len" not in config["model"] and "vocab_size" not in config["model"]
    printed = tmp_path / "printed.yaml"
    printed.write_text(proc.stdout)
    again = run_cli("fit", "--config", str(printed), "--print_config", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert yaml.safe_load(again.stdout) == config


# -- bad input: one clear message, non-zero exit, no traceback -------------------------------------
def test_unknown_key_on_the_command_line(tmp_path):
    proc = run_cli("fit", "--model.d_modle", "64", cwd=tmp_path)
    assert_one_clear_error(proc, "--model.d_modle")


def test_unknown_key_in_a_config_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  d_modle: 64\n")
    proc = run_cli("fit", "--config", str(config), cwd=tmp_path)
    assert_one_clear_error(proc, "model.d_modle")


def test_wrong_type(tmp_path):
    proc = run_cli("fit", "--trainer.max_steps", "ten", cwd=tmp_path)
    assert_one_clear_error(proc, "trainer.max_steps", "ten")


def test_missing_config_file(tmp_path):
    proc = run_cli("fit", "--config", "configs/nope.yaml", cwd=tmp_path)
    assert_one_clear_error(proc, "nope.yaml", "does not exist")


def test_missing_corpus(tmp_path):
    proc = run_cli("fit", "--data.corpus", str(tmp_path / "no_such_corpus.txt"), cwd=tmp_path)
    assert_one_clear_error(proc, "lit-xf: error:", "no_such_corpus.txt")
    assert proc.returncode == 1


def test_heads_not_dividing_width(tmp_path):
    proc = run_cli("fit", "--config", str(DEFAULT_CONFIG), "--model.n_heads", "5", cwd=tmp_path)
    assert_one_clear_error(proc, "lit-xf: error:", "n_heads=5 must divide d_model=128")


def test_debug_env_shows_the_traceback(tmp_path):
    proc = run_cli("fit", "--data.corpus", str(tmp_path / "missing.txt"), cwd=tmp_path, env={"LIT_XF_DEBUG": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "CorpusNotFoundError" in proc.stderr
