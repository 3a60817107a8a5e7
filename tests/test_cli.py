"""The ``lit-xf`` command as users meet it: a real process, its exit status and what it prints."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_xf import cli

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


def cli_env(**extra: str) -> dict:
    """The environment of a ``lit-xf`` child: this checkout's lit_xf first, no LIT_XF_DEBUG."""
    env = {k: v for k, v in os.environ.items() if k != "LIT_XF_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, **extra}


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = cli_env(**(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "lit_xf.cli", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


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
    for name in ("python", "torch", "lightning", "xformers", "quack", "cuda", "device"):
        assert any(line.startswith(name) for line in out.splitlines()), out
    rows = [line.split() for line in out.splitlines() if line.startswith(("causal ", "packed "))]
    assert len(rows) == 8  # (causal, packed) x (MHA, GQA) x (no ALiBi, ALiBi)
    header = next(line.split() for line in out.splitlines() if line.startswith("mask"))
    auto = header.index("auto")
    assert {row[auto + (1 if row[1] == "GQA" else 0)] for row in rows} == {"sdpa"}
    assert "xformers: xformers' attention kernels are CUDA-only" in out
    assert "flex: FlexAttention has no backward on CPU" in out
    assert "mlp_kernel auto runs torch's GELU MLP: it is CUDA-only (device: cpu)" in out


def test_env_report_in_process_lists_every_case():
    report = cli.env_report("cpu", n_heads=8, n_kv_heads=4, seq_len=512)
    assert "GQA 8/4" in report and "GQA = 8q/4kv, seq_len 512" in report
    assert report.count(" sdpa ") >= 8


def test_env_report_cuda_branch_with_a_broken_xformers(monkeypatch):
    """The GPU report, on a pretend GPU whose xformers can't load its CUDA-12 extension: auto times
    the kernels that run each case (a fake clock here, which never runs them) and takes the fastest."""
    import types

    import torch

    import lit_xf.attention.auto as auto
    import lit_xf.attention.probes as probes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda d: types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=141 * 2**30),
    )
    broken = "xformers can't run its CUDA kernels: xFormers wasn't build with CUDA support"
    monkeypatch.setattr(probes, "xformers_problem", lambda: broken)
    monkeypatch.setattr(probes, "fa4_problem", lambda: "flash-attn-4 is not installed")
    ms = {"sdpa": 2.0, "flex": 1.0}
    timed = []

    def fake_timer(name, fn, device):
        timed.append((name, device.type))
        if name == "sdpa" and ms.pop("fail_sdpa", None):
            raise RuntimeError("CUDA out of memory")
        return ms[name]

    monkeypatch.setattr(auto, "time_ms", fake_timer)
    ms["fail_sdpa"] = True  # the first case's sdpa measurement raises
    report = cli.env_report("cuda", seq_len=1024)
    assert "NVIDIA H200, compute capability 9.0" in report
    assert f"xformers: {broken}" in report and "fa4: flash-attn-4 is not installed" in report
    assert {n for n, _ in timed} == {"sdpa", "flex"} and {d for _, d in timed} == {"cuda"}
    lines = [line.split() for line in report.splitlines() if line.startswith(("causal ", "packed "))]
    rows = {tuple(line[:3]): line for line in lines if line[1] == "MHA"}
    header = next(line.split() for line in report.splitlines() if line.startswith("mask"))
    assert len(lines) == 8 and header[3:] == ["auto", "naive", "sdpa", "xformers", "flex", "fa4"]
    causal = rows[("causal", "MHA", "rope/learned")]
    assert causal[3:5] == ["flex", "yes"] and causal[5:7] == ["fail", "[1]"]  # sdpa failed in the first case
    assert "[1] sdpa: RuntimeError: CUDA out of memory" in report
    packed = rows[("packed", "MHA", "alibi")]
    assert packed[3] == "flex" and packed[5] == "2.00" and packed[6:8] == ["no", "[2]"] and packed[8] == "1.00"
    assert "ms per fwd+bwd call, timed as auto times a run's first batch of a case (4 rows, head_dim 64, bf16" in report
    assert "auto times every kernel that runs a case at the first batch of that case" in report
    assert "fa4 on packed causal rows: documents grouped into 128-token sequences when that needs <= 0.7x" in report
    # --no-measure: what runs, nothing timed
    timed.clear()
    quiet = cli.env_report("cuda", seq_len=1024, measure=False)
    assert timed == [] and "auto times them at a run's first batch of each case" in quiet


# -- the console script and the top-level usage ---------------------------------------------------
def test_console_script_is_installed():
    script = Path(sysconfig.get_path("scripts")) / "lit-xf"
    if not script.exists():
        pytest.skip(f"no console script at {script} (lit_xf not installed with pip in this environment)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "lit-xf env" in proc.stdout


@pytest.mark.parametrize("argv", [[], ["--help"]], ids=["no_subcommand", "help"])
def test_usage_imports_neither_torch_nor_lightning(argv):
    """The usage prints without torch or Lightning (seconds of imports): only the subcommands that
    need them import them."""
    code = (
        "import sys; from lit_xf.cli import main; status = main(sys.argv[1:]); "
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'numpy', 'xformers'}); "
        "print('HEAVY', heavy); sys.exit(status)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == (0 if argv else 2), proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
    usage = proc.stdout if argv else proc.stderr
    assert all(name in usage for name in ("fit", "validate", "test", "predict", "env", "bench")), usage


def test_package_names_resolve_on_first_use():
    """``from lit_xf import LitTinyGPT`` still works; ``import lit_xf`` alone imports no torch."""
    code = (
        "import sys, lit_xf; assert 'torch' not in sys.modules; "
        "from lit_xf import GPTConfig, LitTinyGPT, TinyGPT; from lit_xf.cli import LitXfCLI; "
        "assert LitTinyGPT.__module__ == 'lit_xf.module' and 'torch' in sys.modules; "
        "assert {'GPTConfig', 'LitTinyGPT', 'TinyGPT'} <= set(dir(lit_xf)); print('OK')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr


def test_no_subcommand_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: lit-xf" in capsys.readouterr().err


def test_bench_is_routed_to_lit_xf_bench(capsys):
    pytest.importorskip("lit_xf.bench")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    assert "attention" in capsys.readouterr().out


def test_bench_without_bench_module_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lit_xf.bench", None)  # makes the import fail like a missing module
    assert cli.main(["bench", "attention"]) == 2
    assert "no module lit_xf.bench" in capsys.readouterr().err


# -- --print_config ----------------------------------------------------------------------------------
def test_print_config_shows_links_and_round_trips(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lit-xf"])
    assert cli.main(["fit", "--config", str(DEFAULT_CONFIG), "--print_config"]) == 0
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["data"]["corpus"] == "fortunes" and config["data"]["batch_mode"] == "packed"
    assert config["model"]["arch"]["attention"] == "auto" and config["model"]["lr"] == 3e-3
    assert [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]][:3] == [
        "PeakMemoryMonitor",
        "KernelTimer",
        "ThroughputMonitor",
    ]
    # Linked: set from data.seq_len / data.vocab_size, so they are not keys of their own.
    assert "max_seq_len" not in config["model"]["arch"] and "vocab_size" not in config["model"]["arch"]
    (tmp_path / "printed.yaml").write_text(printed)
    assert cli.main(["fit", "--config", "printed.yaml", "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == config


# -- bad input: one clear message, non-zero exit, no traceback -------------------------------------
# case -> (arguments, extra environment, texts the error must name, exit status or None for any non-zero)
BAD_INPUTS = {
    "unknown_key_on_the_command_line": (["fit", "--model.arch.d_modle", "64"], {}, ["--model.arch.d_modle"], 2),
    "unknown_key_in_a_config_file": (["fit", "--config", "bad_key.yaml"], {}, ["model.arch.d_modle"], 2),
    "flat_architecture_key": (["fit", "--config", "flat_key.yaml"], {}, ["model.n_heads", "model.arch.n_heads"], 2),
    "wrong_type": (["fit", "--trainer.max_steps", "ten"], {}, ["trainer.max_steps", "ten"], 2),
    "missing_config_file": (["fit", "--config", "configs/nope.yaml"], {}, ["nope.yaml", "does not exist"], 2),
    "missing_corpus": (["fit", "--data.corpus", "no_such_corpus.txt"], {}, ["lit-xf: error:", "no_such_corpus.txt"], 1),
    "heads_not_dividing_width": (
        ["fit", "--config", str(DEFAULT_CONFIG), "--model.arch.n_heads", "5"],
        {},
        ["lit-xf: error:", "n_heads=5 must divide d_model=192"],
        1,
    ),
    "window_not_positive": (
        ["fit", "--model.arch.attention_window", "0"],
        {},
        ["lit-xf: error:", "attention_window must be a positive number of tokens or None, got 0"],
        1,
    ),
    "kv_heads_not_dividing_heads": (
        ["fit", "--model.arch.n_kv_heads", "3"],
        {},
        ["lit-xf: error:", "n_kv_heads=3 must divide n_heads=8"],
        1,
    ),
}
if not __import__("torch").cuda.is_available():
    BAD_INPUTS["gpu_config_on_a_cpu"] = (
        ["fit", "--config", str(ROOT / "configs" / "gpt2_small.yaml")],
        {},
        ["lit-xf: error:", "--trainer.accelerator cpu"],
        1,
    )


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad-input case (and one with LIT_XF_DEBUG=1), started together: each pays for importing
    torch and Lightning, so they share the cores instead of queueing."""
    cwd = tmp_path_factory.mktemp("bad_input")
    (cwd / "bad_key.yaml").write_text("model:\n  arch:\n    d_modle: 64\n")
    (cwd / "flat_key.yaml").write_text("model:\n  n_heads: 4\n")
    env = cli_env()
    cases = {name: (args, extra) for name, (args, extra, _, _) in BAD_INPUTS.items()}
    cases["debug"] = (["fit", "--data.corpus", "missing.txt"], {"LIT_XF_DEBUG": "1"})
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "lit_xf.cli", *args],
            cwd=cwd,
            env={**env, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (args, extra) in cases.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_with_one_clear_message(case, bad_runs):
    _, _, needles, status = BAD_INPUTS[case]
    proc = bad_runs[case]
    assert_one_clear_error(proc, *needles)
    assert proc.returncode == status, proc.stderr


def test_debug_env_shows_the_traceback(bad_runs):
    proc = bad_runs["debug"]
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "CorpusNotFoundError" in proc.stderr


# -- the README ----------------------------------------------------------------------------------
README = ROOT / "README.md"


def test_readme_commands_name_real_configs():
    text = README.read_text()
    for name in set(__import__("re").findall(r"configs/(\w+\.yaml)", text)):
        assert (ROOT / "configs" / name).is_file(), name
    assert "pip install torch==2.13.0 -e . && lit-xf fit --config configs/default.yaml" in text
    assert 'pip install torch==2.13.0 -e ".[dev]" && pytest' in text


def test_readme_python_example_runs(tmp_path):
    """The "Using LitTinyGPT in your own project" example, as printed, on a folder of small texts."""
    text = README.read_text()
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    corpus = tmp_path / "my_texts"
    corpus.mkdir()
    for i in range(400):  # enough for 20 steps in one epoch (small corpora validate after every epoch)
        (corpus / f"{i}.txt").write_text(f"Document {i}: the quick brown fox jumps over {i} lazy dogs.\n" * (1 + i % 5))
    (tmp_path / "example.py").write_text(example)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


# -- a run's end: the summary, and evaluating its checkpoint -------------------------------------
TINY_RUN = [
    *("--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"),
    *("--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"),
    *("--trainer.enable_model_summary", "false", "--model.arch.n_layers", "1", "--data.seq_len", "64"),
]


def summary_lines(stderr: str) -> list[str]:
    """The lines after ``fit finished`` that lit_xf logged, without the ``[lit_xf]`` prefix."""
    lines = [line.removeprefix("[lit_xf] ") for line in stderr.splitlines() if line.startswith("[lit_xf] ")]
    starts = [i for i, line in enumerate(lines) if line.startswith("fit finished")]
    return lines[starts[-1] :] if starts else []


# The main job's monitors, with KernelTimer's profiler on every step (its CPU console lines are checked)
PROFILED_CALLBACKS = """
trainer:
  callbacks:
    - class_path: lit_xf.callbacks.PeakMemoryMonitor
    - class_path: lit_xf.callbacks.KernelTimer
      init_args: {profile_every_n_steps: 1}
    - class_path: lit_xf.callbacks.ThroughputMonitor
    - class_path: lit_xf.callbacks.LearningRateLogger
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step ``lit-xf fit`` of the main job's config, shrunk and profiled: (its folder, the process)."""
    cwd = tmp_path_factory.mktemp("tiny_run")
    (cwd / "profiled.yaml").write_text(PROFILED_CALLBACKS)
    args = ["fit", "--config", str(DEFAULT_CONFIG), "--config", "profiled.yaml", *TINY_RUN]
    proc = run_cli(*args, "--trainer.log_every_n_steps", "1", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc


def test_tensorboard_opens_on_throughput_or_memory_with_one_lr_curve(tiny_run):
    """TensorBoard's time series show tag groups (the part before the first '/') in sorted order:
    no ``epoch`` card first, no ``lr-AdamW/pg1|pg2`` pair; on CPU, run/info says which tags are missing."""
    cwd, proc = tiny_run
    run_dir = cwd / "runs" / "default" / "version_0"
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "epoch" not in tags and not any(t.startswith("lr-") for t in tags), tags
    assert [t for t in tags if "lr" in t.split("/")[-1]] == ["train/lr"]
    assert {"train/loss", "val/loss", "throughput/tokens_per_s", "time/step_ms", "time/attention_share"} <= tags
    groups = sorted({t.split("/", 1)[0] for t in tags})
    assert groups[0] == ("memory" if __import__("torch").cuda.is_available() else "throughput"), groups
    info = events.Tensors("run/info/text_summary")[0].tensor_proto.string_val[0].decode()
    if not __import__("torch").cuda.is_available():
        assert "| memory/* | not logged: the device is cpu" in info, info
        assert "| throughput/mfu | not logged: no peak FLOP/s known for cpu" in info, info
    assert "USDT" not in proc.stderr and "profiler_stop" not in proc.stderr, proc.stderr[-3000:]


def test_fit_ends_with_a_summary(tiny_run):
    cwd, proc = tiny_run
    summary = summary_lines(proc.stderr)
    assert summary and summary[0].startswith("fit finished: 2 steps in "), proc.stderr[-3000:]
    text = "\n".join(summary)
    for needle in ("train/loss ", "train/acc ", "val/loss ", "val/ppl ", "val/acc "):
        assert needle in text, text
    best = "runs/default/version_0/checkpoints/epoch=0-step=2.ckpt"
    last = "runs/default/version_0/checkpoints/last.ckpt"  # every fit ends with one
    assert f"checkpoint: {best}" in text and (cwd / best).is_file()
    assert f"last checkpoint: {last}" in text and (cwd / last).is_file()
    assert "logs: runs/default/version_0" in text and "TensorBoard: tensorboard --logdir runs" in text
    config = "runs/default/version_0/config.yaml"
    assert f"evaluate: lit-xf validate --config {config} --ckpt_path {last}" in text
    assert f"lit-xf test --config {config} --ckpt_path {last}" in text


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluating_a_checkpoint_writes_nothing_and_warns_nothing(subcommand, tiny_run):
    """The summary's evaluation commands: they print their metrics, create no run folder (the
    checkpoint's own run stays the only one) and no config.yaml, and warn about no checkpoint folder."""
    cwd, fit = tiny_run
    command = next(line for line in summary_lines(fit.stderr) if f"lit-xf {subcommand} " in line)
    args = shlex.split(command.split("lit-xf ", 1)[1])
    before = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
    proc = run_cli(*args, "--trainer.limit_test_batches", "3", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prefix = "val" if subcommand == "validate" else "test"
    assert all(f"{prefix}/{name}" in proc.stdout for name in ("loss", "ppl", "acc")), proc.stdout
    for warning in ("dirpath has changed", "Be aware that when using `ckpt_path`", "PeakMemoryMonitor"):
        assert warning not in proc.stderr, proc.stderr
    assert sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*")) == before


def test_evaluation_logs_where_the_command_line_says(tiny_run):
    cwd, fit = tiny_run
    ckpt = "runs/default/version_0/checkpoints/epoch=0-step=2.ckpt"
    proc = run_cli(
        *("test", "--config", "runs/default/version_0/config.yaml", "--ckpt_path", ckpt),
        *("--trainer.limit_test_batches", "2", "--trainer.logger.name", "default_test"),
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = cwd / "runs" / "default_test" / "version_0"
    assert (run_dir / "config.yaml").is_file()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {"test/loss", "test/ppl", "test/acc"} <= set(events.Tags()["scalars"])


def test_a_failed_evaluation_leaves_nothing(tmp_path):
    proc = run_cli("test", "--config", str(DEFAULT_CONFIG), *TINY_RUN, "--data.test_fraction", "0", cwd=tmp_path)
    assert_one_clear_error(proc, "lit-xf: error:", "test_fraction=0: there is no test split")
    assert [p.name for p in tmp_path.iterdir()] == ["tokenized"]  # the corpus's token store (a cache), no run folder


def test_bf16_on_a_cpu_without_bf16_kernels_says_use_fp32(tmp_path):
    """oneDNN limited to AVX2 (as on CPUs without AVX-512): bf16-mixed is emulated, many times slower."""
    isa = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    args = [
        "fit",
        *TINY_RUN,
        "--trainer.precision",
        "bf16-mixed",
        "--trainer.max_steps",
        "1",
        "--trainer.logger",
        "false",
    ]
    proc = run_cli(*args, "--trainer.enable_checkpointing", "false", cwd=tmp_path, env=isa)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision=bf16-mixed on a CPU without bf16 instructions" in proc.stderr
    assert "--trainer.precision 32-true" in proc.stderr


def test_a_run_without_logger_prints_no_summary(tmp_path):
    proc = run_cli(
        "fit", *TINY_RUN, "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "`max_steps=2` reached" in proc.stderr and "fit finished" not in proc.stderr
