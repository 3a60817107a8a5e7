"""CPU smoke runs of every benchmark at tiny sizes: each writes its files and a sane table."""

import json
import statistics

import pytest
import torch

from lit_xf import bench
from lit_xf.attention import DocLayout
from lit_xf.bench import correctness, profile, train


def _rows(out, name):
    return json.loads((out / f"{name}.json").read_text())["rows"]


def _bench_cpu(command: str, flags: str, out) -> int:
    """``lit-xf bench COMMAND --device cpu FLAGS --out OUT`` (flags: one space-separated string)."""
    return bench.main([command, "--device", "cpu", *flags.split(), "--out", str(out)])


def test_attention_bench_writes_table_and_plot(tmp_path, capsys):
    flags = "--seq-lens 32,64 --kernels naive,sdpa,auto --heads 2 --head-dim 8 --reps 2 --warmup 1"
    rc = _bench_cpu("attention", flags, tmp_path)
    assert rc == 0
    rows = _rows(tmp_path, "attention")
    assert [(r["kernel"], r["seq_len"]) for r in rows] == [(k, n) for n in (32, 64) for k in ("naive", "sdpa", "auto")]
    assert all(r["ms"] > 0 for r in rows)
    assert {r["note"] for r in rows if r["kernel"] == "auto"} == {"auto → sdpa"}
    # auto is timed call by call against the fastest single kernel of its case
    for r in (r for r in rows if r["kernel"] == "auto"):
        assert r["best_kernel"] in ("naive", "sdpa") and r["auto_vs_best"] > 0
        assert "auto_vs_best_gpu" not in r  # GPU time alone exists on CUDA only
    assert (tmp_path / "attention.png").stat().st_size > 0 and (tmp_path / "attention.csv").exists()
    assert "| kernel |" in capsys.readouterr().out


def test_auto_vs_best_gpu_compares_gpu_times_alone():
    """The figures of docs/results/auto_final_16x2048.json: auto ran fa4, 1.46x SDPA call by call
    (the host paces FA4) but 1.009x on GPU time; the best single kernel by GPU time is SDPA."""
    rows = [
        dict(kernel="sdpa", ms=1.31, gpu_ms=1.175),
        dict(kernel="fa4", ms=1.986, gpu_ms=1.184),
        dict(kernel="auto", ms=1.944, gpu_ms=1.186),
    ]
    assert bench.gpu_vs_best(rows) == {"best_kernel_gpu": "sdpa", "auto_vs_best_gpu": 1.009}
    rows[0]["gpu_ms"] = None  # sdpa failed: fa4 is the best left
    assert bench.gpu_vs_best(rows) == {"best_kernel_gpu": "fa4", "auto_vs_best_gpu": 1.002}
    assert bench.gpu_vs_best([dict(kernel="sdpa", ms=1.0), dict(kernel="auto", ms=1.0)]) == {}  # CPU: no gpu_ms


def test_correctness_bench_passes_on_cpu_and_reports_unsupported(tmp_path):
    flags = "--dtypes fp32,fp64 --kernels naive,sdpa,flex --seq-len 24 --heads 4 --head-dim 8"
    rc = _bench_cpu("correctness", flags, tmp_path)
    assert rc == 0
    rows = _rows(tmp_path, "correctness")
    assert len(rows) == 3 * 3 * 2 * 2 * 3  # masks × kv heads × alibi × dtypes × kernels
    assert {r["status"] for r in rows if r["kernel"] != "flex"} == {"pass"}
    assert {r["status"] for r in rows if r["kernel"] == "flex"} == {"unsupported"}  # no backward on CPU


def test_correctness_bench_fails_on_a_wrong_kernel(tmp_path, monkeypatch):
    """The matrix can fail: a kernel that drops the softmax scale is reported and the exit code is 1."""
    real = correctness.run_kernel

    def scaled_wrong(name, layout, inputs, dtype, alibi):
        if name == "sdpa":
            inputs = [inputs[0] * 2, *inputs[1:]]
        return real(name, layout, inputs, dtype, alibi)

    monkeypatch.setattr(correctness, "run_kernel", scaled_wrong)
    rc = _bench_cpu("correctness", "--dtypes fp64 --kernels sdpa --seq-len 16 --heads 2 --head-dim 8", tmp_path)
    assert rc == 1
    assert {r["status"] for r in _rows(tmp_path, "correctness")} == {"FAIL"}


def test_benches_run_a_sliding_window(tmp_path, capsys):
    """--window: every kernel against float64 naive with the window (correctness), and windowed
    FLOPs (attention): a 8-token window over 64-token causal rows counts 1 + 2 + … + 8 + 56·8 pairs
    a row (query i sees min(i + 1, 8) keys)."""
    flags = "--dtypes fp64 --kernels sdpa --seq-len 24 --heads 2 --head-dim 8 --window 5"
    rc = _bench_cpu("correctness", flags, tmp_path)
    rows = _rows(tmp_path, "correctness")
    assert rc == 0 and {r["status"] for r in rows} == {"pass"} and {r["window"] for r in rows} == {5}
    flags = "--seq-lens 64 --kernels sdpa --heads 2 --head-dim 8 --reps 2 --warmup 1 --causal"
    assert _bench_cpu("attention", flags + " --window 8", tmp_path / "w") == 0
    assert _bench_cpu("attention", flags, tmp_path / "full") == 0
    (w,), (full,) = _rows(tmp_path / "w", "attention"), _rows(tmp_path / "full", "attention")
    assert w["window"] == 8 and full["window"] is None
    layout = DocLayout.full_rows(2, 64, window=8)
    assert bench.attention_flops(layout, 2, 8) == 3.5 * 4 * 2 * 8 * 2 * (8 * 9 // 2 + 56 * 8)
    with pytest.raises(SystemExit) as exit_:
        _bench_cpu("attention", "--seq-lens 64 --window 8", tmp_path)
    assert exit_.value.code == 2 and "--window is a causal sliding window" in capsys.readouterr().err


def test_correctness_bench_sizes_a_one_token_windows_zero_dq_dk_against_dv(tmp_path):
    """With --window 1 the exact dq and dk are 0 (softmax ≡ 1): fp32 rounding noise in them passes,
    measured against ‖dv‖ rather than divided by a zero norm."""
    rc = _bench_cpu(
        "correctness", "--dtypes fp32 --kernels sdpa --seq-len 16 --heads 2 --head-dim 8 --window 1", tmp_path
    )
    rows = _rows(tmp_path, "correctness")
    assert rc == 0 and {r["status"] for r in rows} == {"pass"}
    assert max(float(r["err_dq"]) for r in rows) < 1e-5


def test_packing_bench_counts_real_tokens(tmp_path):
    flags = "--docs 12 --mean-len 20 --max-len 64 --kernels sdpa --heads 2 --head-dim 8 --reps 2"
    rc = _bench_cpu("packing", flags, tmp_path)
    assert rc == 0
    padded, packed = _rows(tmp_path, "packing")
    lens = bench.lognormal_doc_lens(12, 20, 64)
    assert padded["real_tokens"] == packed["real_tokens"] == sum(lens)
    assert padded["row_tokens"] == 12 * max(lens) and packed["row_tokens"] == sum(lens)


@pytest.mark.slow
def test_train_bench_same_loss_three_ways_and_curves(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: {arch: {d_model: 16, n_layers: 1, n_heads: 2, attention: sdpa}}\n"
        "data: {corpus: counting, batch_mode: padded, seq_len: 8, batch_size: 4, counting_vocab: 16,\n"
        "       counting_length: 8, counting_documents: 20, drop_last: true}\n"
        "trainer: {precision: 32-true}\n"
    )
    # 20 documents, 2% held out: 4 batches an epoch, so 6 steps reach the second (reshuffled) epoch
    variants = "loop,lightning,lit_xf,lit_xf+compile_model,loop+fused"
    rc = _bench_cpu("train", f"--config {config} --steps 6 --warmup-steps 2 --variants {variants}", tmp_path)
    assert rc == 0
    rows = _rows(tmp_path, "train")
    assert [r["variant"] for r in rows] == ["loop", "lightning", "lit_xf", "lit_xf+compile_model", "loop+fused"]
    # the same initialization, data and schedule: the same loss curve, whichever loop ran it, eager or
    # compiled, with the loss on logits (loop) or fused with the output projection (the others)
    curves = json.loads((tmp_path / "train_losses.json").read_text())
    assert [len(c) for c in curves.values()] == [6] * 5
    assert len(set(curves["loop"])) > 1  # real per-step values, not one repeated number
    for r in rows:
        assert r["loss_diff"] < 1e-4, r
        assert r["final_loss"] == pytest.approx(rows[0]["final_loss"], abs=1e-4)
        assert r["warmup_s"] >= 0 and r["tokens_per_s"] > 0
        assert r["gc_ms"] >= 0 and r["gc_full"] >= 0
    with pytest.raises(ValueError, match="unknown train variant"):
        _bench_cpu("train", f"--config {config} --steps 3 --warmup-steps 1 --variants lightning+nonsense", tmp_path)


def test_train_bench_times_the_monitor_hooks(tmp_path):
    """``--hook-us``: µs per timed step in each monitor's per-step hooks, for variants with monitors."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: {arch: {d_model: 16, n_layers: 1, n_heads: 2, attention: sdpa}}\n"
        "data: {corpus: counting, batch_mode: padded, seq_len: 8, batch_size: 4, counting_vocab: 16,\n"
        "       counting_length: 8, counting_documents: 40, drop_last: true}\n"
        "trainer: {precision: 32-true}\n"
    )
    flags = f"--config {config} --steps 6 --warmup-steps 2 --variants lightning,lit_xf,lightning+timer --hook-us"
    assert _bench_cpu("train", flags, tmp_path) == 0
    rows = {r["variant"]: r for r in _rows(tmp_path, "train")}
    assert "hook_us" not in rows["lightning"]
    lit = rows["lit_xf"]["hook_us"]
    for monitor in ("KernelTimer", "ThroughputMonitor", "PeakMemoryMonitor"):
        assert lit[f"{monitor}.on_train_batch_start"] > 0 and lit[f"{monitor}.on_train_batch_end"] > 0
    assert lit["KernelTimer.on_before_backward"] > 0 and lit["KernelTimer.on_after_backward"] > 0
    assert lit["total"] == pytest.approx(sum(v for k, v in lit.items() if k != "total"), abs=0.6)
    assert {k.split(".")[0] for k in rows["lightning+timer"]["hook_us"] if k != "total"} == {"KernelTimer"}


def test_gc_pauses_counts_collections_from_t0_on():
    """The bench's account of garbage-collector pauses in the timed steps: collections before t0
    are left out; full (generation-2) ones are counted."""
    import gc
    import time

    with bench.GcPauses() as pauses:
        gc.collect(0)
        t0 = time.perf_counter()
        gc.collect(2)
        gc.collect(1)
    ms, full = pauses.since(t0)
    assert full == 1 and ms > 0
    assert pauses.since(time.perf_counter()) == (0.0, 0)
    assert pauses.since(0.0)[0] > ms  # the generation-0 collection before t0 counts only from 0 on
    assert pauses._note not in gc.callbacks


def test_train_bench_repeats_interleaved_and_the_rows_loop(tmp_path, monkeypatch):
    """``--repeats`` runs each variant that many times, in reverse order on odd repeats, and reports
    the median with its range and the median ratio to the first variant over repeats;
    ``loop+rows`` (whole rows, no document masking) sees more pairs on packed rows, so its loss and
    FLOPs differ from the document-masked loop's."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: {arch: {d_model: 16, n_layers: 1, n_heads: 2, attention: sdpa}}\n"
        "data: {corpus: counting, batch_mode: packed, seq_len: 16, batch_size: 2, counting_vocab: 16,\n"
        "       counting_length: 5, counting_documents: 400}\n"
        "trainer: {precision: 32-true}\n"
    )
    flags = f"--config {config} --steps 5 --warmup-steps 1 --variants loop,loop+rows --repeats 3"
    order, hand_loop = [], train.hand_loop

    def recorded(base, parts, *args):
        order.append("+".join([base, *sorted(parts)]))
        return hand_loop(base, parts, *args)

    monkeypatch.setattr(train, "hand_loop", recorded)
    rc = _bench_cpu("train", flags, tmp_path)
    assert rc == 0
    rows = {r["variant"]: r for r in _rows(tmp_path, "train")}
    for r in rows.values():
        low, high = map(float, r["ms_range"].split("-"))
        assert low <= r["ms_per_step"] <= high
        assert len(r["ms_runs"]) == 3 and sorted(r["ms_runs"])[1] == r["ms_per_step"]
        assert (min(r["ms_runs"]), max(r["ms_runs"])) == pytest.approx((low, high), abs=2e-3)
    first, other = rows["loop"], rows["loop+rows"]
    assert first["time_vs_first"] == 1.0
    assert other["time_vs_first"] == pytest.approx(sum(other["ms_runs"]) / sum(first["ms_runs"]), rel=1e-3)
    assert first["ratio_vs_first"] == 1.0
    paired = statistics.median(o / f for o, f in zip(other["ms_runs"], first["ms_runs"], strict=True))
    assert other["ratio_vs_first"] == pytest.approx(paired, rel=1e-2)
    assert order == ["loop", "loop+rows", "loop+rows", "loop", "loop", "loop+rows"]  # odd repeats reversed
    assert rows["loop+rows"]["loss_diff"] > 1e-4  # documents see each other: another objective
    with pytest.raises(ValueError, match="unknown train variant"):
        _bench_cpu("train", f"--config {config} --steps 3 --warmup-steps 1 --variants lightning+rows", tmp_path)
    with pytest.raises(SystemExit):
        _bench_cpu("train", f"--config {config} --repeats 0", tmp_path)


def test_train_bench_records_the_mlp_kernel_and_keeps_the_plain_loop_on_torch(tmp_path):
    """Each row names the MLP kernel its run took on the run's device: ``auto`` falls back to torch
    on the CPU and says why; ``loop+rows`` (the plain loop) always runs torch's; ``--mlp-kernel``
    overrides the config's."""
    config = tmp_path / "gelu.yaml"
    config.write_text(
        "model: {arch: {d_model: 16, n_layers: 1, n_heads: 2, attention: sdpa, ffn: gelu, mlp_kernel: auto}}\n"
        "data: {corpus: counting, batch_mode: packed, seq_len: 16, batch_size: 2, counting_vocab: 16,\n"
        "       counting_length: 5, counting_documents: 400}\n"
        "trainer: {precision: bf16-mixed}\n"
    )
    assert (
        _bench_cpu(
            "train", f"--config {config} --steps 3 --warmup-steps 1 --variants loop,loop+rows,lightning", tmp_path
        )
        == 0
    )
    kernels = {r["variant"]: r["mlp_kernel"] for r in _rows(tmp_path, "train")}
    fallback = "torch (quack: it is CUDA-only (device: cpu))"
    assert kernels == {"loop": fallback, "loop+rows": "torch", "lightning": fallback}
    flags = f"--config {config} --steps 3 --warmup-steps 1 --variants loop --mlp-kernel torch"
    assert _bench_cpu("train", flags, tmp_path) == 0
    assert [r["mlp_kernel"] for r in _rows(tmp_path, "train")] == ["torch"]


def test_rows_loop_counts_the_flops_of_whole_rows():
    """``loop+rows`` attends across whole rows: its FLOPs count T(T+1)/2 pairs per row, not the
    documents' pairs that the batch's stats carry."""
    from lit_xf.config import GPTConfig
    from lit_xf.data import collate_rows
    from lit_xf.module import LitTinyGPT

    model = LitTinyGPT(GPTConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, attention="sdpa"))
    batch = collate_rows([[[1] * 5, [2] * 6], [[3] * 16]], seq_len=16, pad_id=0)
    whole = model.flops_per_batch({"input_ids": batch["input_ids"], "doc_lens": [[16], [16]]})
    assert model.flops_per_batch(bench.as_full_rows(batch)) == whole > model.flops_per_batch(batch)


def test_train_bench_profiles_a_window_inside_the_warmup(tmp_path):
    """``--profile-steps A:B`` profiles steps A..B-1 of each variant's first run and writes the
    window's per-step figures (a CPU has no device kernels: wall time only); a window past the
    warm-up or a malformed one is refused."""
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model: {arch: {d_model: 16, n_layers: 1, n_heads: 2, attention: sdpa}}\n"
        "data: {corpus: counting, batch_mode: padded, seq_len: 8, batch_size: 4, counting_vocab: 16,\n"
        "       counting_length: 8, counting_documents: 400}\n"
        "trainer: {precision: 32-true}\n"
    )
    flags = f"--config {config} --steps 6 --warmup-steps 4 --profile-steps 1:3 --variants loop,lit_xf"
    assert _bench_cpu("train", flags, tmp_path) == 0
    profiles = json.loads((tmp_path / "train_profile.json").read_text())
    assert set(profiles) == {"loop", "lit_xf"}
    for window in profiles.values():
        assert window["steps"] == [1, 3] and window["wall_ms_per_step"] > 0
        assert "gpu_busy_frac" not in window  # no CUDA kernels on a CPU
    with pytest.raises(ValueError, match="must end by --warmup-steps 4"):
        _bench_cpu("train", f"--config {config} --steps 6 --warmup-steps 4 --profile-steps 2:5", tmp_path)
    for bad in ("3:3", "x:4", "5"):
        with pytest.raises(SystemExit):
            _bench_cpu("train", f"--config {config} --profile-steps {bad}", tmp_path)


def test_profile_window_kernel_time_busy_union_and_groups(monkeypatch):
    """Busy time is the union of kernel intervals (overlaps count once); groups by name."""
    kernels = [
        ("flash_fwd_kernel", 0.0, 100.0),
        ("nvjet_sm90_gemm", 50.0, 90.0),  # overlaps the first: busy 0-140
        ("triton_red_fused_layer_norm", 300.0, 50.0),  # idle 140-300
        ("Memcpy HtoD (Pinned -> Device)", 400.0, 10.0),
    ]
    monkeypatch.setattr(profile, "kernel_intervals", lambda profiler: kernels)
    window = bench.ProfileWindow((0, 2), torch.device("cpu"))
    window.at_step(0)
    window.at_step(1)
    window.at_step(2)
    r = window.result
    assert r["steps"] == [0, 2]
    assert r["gpu_kernel_ms_per_step"] == pytest.approx(250 / 1e3 / 2)
    assert r["gpu_busy_ms_per_step"] == pytest.approx(200 / 1e3 / 2)
    assert r["kernel_ms_per_step"] == {"attention": 0.05, "gemm": 0.045, "norm": 0.025, "memcpy/memset": 0.005}
    assert r["gpu_busy_frac"] > 0 and r["top_kernels_ms_per_step"][0] == ("flash_fwd_kernel", 0.05)
    # idle: 140-300 (160 µs) and 350-400 (50 µs), over 2 steps
    assert r["gpu_idle_ms_per_step"] == {
        "<5us": {"count": 0.0, "ms": 0.0},
        "5-100us": {"count": 0.5, "ms": 0.025},
        ">=100us": {"count": 0.5, "ms": 0.08},
    }
    assert bench.idle_by_gap_size([1.0, 4.9, 5.0], 1)["<5us"] == {"count": 2.0, "ms": 0.006}


def test_curves_render_tensorboard_runs(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for name, mib in (("padded", 800.0), ("packed", 300.0)):
        writer = SummaryWriter(str(tmp_path / "runs" / name / "version_0"))
        for step in range(20):
            writer.add_scalar("memory/peak_allocated_mib", mib + step % 2, step)
            writer.add_scalar("time/step_ms", 10.0, step)
        writer.close()
    rc = bench.main(
        [
            "curves",
            str(tmp_path / "runs/padded/version_0"),
            str(tmp_path / "runs/packed/version_0"),
            "--out",
            str(tmp_path),
            "--name",
            "pair",
        ]
    )
    assert rc == 0
    rows = _rows(tmp_path, "pair")
    assert [r["run"] for r in rows] == ["padded", "packed"]
    assert rows[0]["memory/peak_allocated_mib"] == pytest.approx(800.5, abs=0.5)
    assert rows[1]["memory/peak_allocated_mib"] == pytest.approx(300.5, abs=0.5)
    assert (tmp_path / "pair.png").stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_queued_gpu_ms_times_the_gpu_not_the_host():
    """A 2 ms GPU sleep issued from a host that dawdles 1 ms per call: the GPU time is the sleep's."""
    import time

    cycles = int(2.0 * bench.sleep_cycles_per_ms())

    def call():
        torch.cuda._sleep(cycles)
        time.sleep(1e-3)

    gpu_ms, host_ms = bench.queued_gpu_ms(call, calls=10, sleep_ms=100)
    assert gpu_ms == pytest.approx(2.0, rel=0.1) and host_ms >= 1.0
    with pytest.raises(RuntimeError, match="past the 20 ms GPU sleep"):
        bench.queued_gpu_ms(call, calls=30, sleep_ms=20)


def test_help_lists_every_command_in_plain_text(capsys):
    """``lit-xf bench --help`` names every command, one line each, without RST markup."""
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "`" not in out
    listed = [line.split()[0] for line in out.split("commands:\n")[1].split("\n\n")[0].splitlines()]
    assert listed == ["attention", "correctness", "packing", "train", "data", "curves", "compare"]


def test_the_data_benchmark_corpus_is_deterministic(tmp_path):
    from lit_xf.bench.data import generate_corpus

    a = generate_corpus(tmp_path / "a.txt", 0.05, seed=3).read_bytes()
    b = generate_corpus(tmp_path / "b.txt", 0.05, seed=3).read_bytes()
    assert a == b and len(a) >= 50_000 and a.count(b"\n\n") > 5
    assert generate_corpus(tmp_path / "c.txt", 0.05, seed=4).read_bytes() != a
