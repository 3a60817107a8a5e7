"""The memory features on one GPU, in one call: estimate vs measured peak, the largest step that
trains with and without checkpointing, a forced OOM through the CLI, the breakdown's TensorBoard tags,
and what the snapshot's recording costs.

    python scripts/memory_gpu_check.py --out /tmp/memory_check           # H200: a few minutes
    python scripts/memory_gpu_check.py --out /tmp/x --device cpu --quick  # the plumbing, on a CPU

Writes ``<out>/memory_gpu_check.json`` (every case, the ratios, versions) and prints a table last;
a second call with other ``--parts`` into the same folder adds its parts to that file.
Measured peaks are ``torch.cuda.max_memory_allocated`` over the steps after ``--warmup`` (statistics
reset after warm-up), training on synthetic batches of the config's shape (``synthetic_batch``):
the estimate depends on shapes only. Each case is a fresh ``Trainer`` in this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lit_xf.config import GPTConfig  # noqa: E402
from lit_xf.estimate_cli import load_config, shapes_from_config  # noqa: E402
from lit_xf.memory_estimate import GPUS, RunShape, estimate, largest_batch_size  # noqa: E402
from lit_xf.memory_facts import model_dims  # noqa: E402

#: Configs that train on one GPU (ddp.yaml needs two devices).
CONFIGS = (
    "gpt2_124m.yaml",
    "gpt2_small.yaml",
    "fortunes_packed.yaml",
    "fortunes_padded.yaml",
    "gqa_alibi.yaml",
    "default.yaml",
    "counting.yaml",
)
#: name -> (d_model, n_layers, n_heads): about 124M, 350M and 1B parameters with a 50304 vocabulary.
SIZES = {"124M": (768, 12, 12), "350M": (1024, 24, 16), "1B": (2048, 18, 16)}


def synthetic_batch(batch_size: int, seq_len: int, mode: str, vocab: int, seed: int) -> dict:
    """A batch in the batch contract (``docs/architecture.md``): packed rows filled with documents
    of random lengths, or padded rows of one document each (lengths in [T/4, T], pads after)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    labels = torch.full_like(ids, -100)
    positions = torch.zeros_like(ids)
    doc_lens = []
    for b in range(batch_size):
        lens, left = [], seq_len
        while left > 0:
            if mode == "packed":
                n = min(left, int(torch.randint(16, max(17, seq_len // 2), (1,), generator=g)))
            else:
                n = int(torch.randint(max(1, seq_len // 4), seq_len + 1, (1,), generator=g))
            lens.append(n)
            left -= n
            if mode != "packed":
                break
        start = 0
        for n in lens:
            positions[b, start : start + n] = torch.arange(n)
            labels[b, start : start + n - 1] = ids[b, start + 1 : start + n]
            start += n
        positions[b, start:] = torch.arange(seq_len - start) + (lens[-1] if lens else 0)
        doc_lens.append(lens)
    real = sum(sum(row) for row in doc_lens)
    stats = {
        "tokens": batch_size * seq_len,
        "real_tokens": real,
        "pad_tokens": batch_size * seq_len - real,
        "documents": sum(len(r) for r in doc_lens),
        "causal_pairs": sum(n * (n + 1) // 2 for r in doc_lens for n in r),
    }
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "doc_lens": doc_lens, "stats": stats}


class _Peak:
    """Lightning callback: max ``max_memory_allocated`` over steps >= ``warmup`` and their times."""

    def __init__(self, warmup: int):
        from lightning.pytorch import Callback

        outer = self

        class Hook(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    if trainer.global_step >= warmup:
                        torch.cuda.reset_peak_memory_stats()
                outer._t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step <= warmup:
                    return
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    outer.peaks.append(torch.cuda.max_memory_allocated())
                outer.step_s.append(time.perf_counter() - outer._t0)

        self.hook, self.peaks, self.step_s = Hook(), [], []


def train_case(
    arch: GPTConfig,
    run: RunShape,
    steps: int,
    warmup: int,
    device: str,
    compile_mode=False,
    extra_callbacks=(),
    logger=False,
    seed: int = 0,
) -> dict:
    """Train ``steps`` synthetic batches of ``run``'s shape; the estimate, the measured peak, the ratio."""
    import lightning as L

    from lit_xf.module import LitTinyGPT

    module = LitTinyGPT(arch=arch, warmup_steps=1, compile=compile_mode)
    est = estimate(model_dims(module.model), run)
    peak = _Peak(warmup)
    batches = [
        synthetic_batch(run.batch_size, run.seq_len, run.batch_mode, arch.vocab_size, seed + i) for i in range(steps)
    ]
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=run.precision,
        max_steps=steps,
        logger=logger,
        callbacks=[peak.hook, *extra_callbacks],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        limit_val_batches=0,
    )
    result = {
        "estimate_bytes": est.peak,
        "estimate_phase": est.phase,
        "dominant": est.dominant,
        "tokens_per_step": run.tokens,
        "shape": dataclasses.asdict(run),
    }
    try:
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        result["kernel"] = module.attention_kernel_name
        if peak.peaks:
            result["measured_bytes"] = max(peak.peaks)
            result["ratio"] = est.peak / result["measured_bytes"]
        if peak.step_s:
            step_s = sorted(peak.step_s)[len(peak.step_s) // 2]
            flops = module.flops_per_batch(batches[-1])
            result["step_s"] = step_s
            result["tokens_per_s"] = run.tokens / step_s
            from lit_xf.hardware import resolve_peak_flops

            peak_flops = resolve_peak_flops(trainer.strategy.root_device, run.precision)
            if peak_flops:
                result["mfu"] = flops / step_s / peak_flops
    except torch.OutOfMemoryError as err:
        result["oom"] = str(err).splitlines()[0][:200]
    finally:
        del trainer, module
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def config_cases(quick: bool) -> list[tuple[str, GPTConfig, RunShape, object]]:
    """(name, arch, run shape, compile) of every shipped single-GPU config, as ``lit-xf fit`` would run it."""
    out = []
    for name in CONFIGS[:1] if quick else CONFIGS:
        config = load_config([str(ROOT / "configs" / name)])
        dims, run = shapes_from_config(config)
        data = config.get("data") or {}
        arch_fields = dict((config.get("model") or {}).get("arch") or {})
        arch_fields.update(max_seq_len=run.seq_len, vocab_size=dims.vocab_size)
        arch = GPTConfig.from_dict(arch_fields)
        compile_mode = (config.get("model") or {}).get("compile", False)
        if quick:
            arch = dataclasses.replace(arch, d_model=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=32)
            run = dataclasses.replace(run, batch_size=2, seq_len=32, precision="32-true")
            compile_mode = False
        del data
        out.append((name, arch, run, compile_mode))
    return out


def size_arch(size: str, seq_len: int, checkpointing: str = "none", attention: str = "auto") -> GPTConfig:
    d, layers, heads = SIZES[size]
    return GPTConfig(
        vocab_size=50304,
        d_model=d,
        n_layers=layers,
        n_heads=heads,
        max_seq_len=seq_len,
        ffn="gelu",
        positions="rope",
        tie_embeddings=True,
        attention=attention,
        activation_checkpointing=checkpointing,
    )


def largest_trainable(size: str, seq_len: int, checkpointing: str, device: str, capacity: int, steps: int) -> dict:
    """Coarse search: the estimate's largest batch_size, then one run there and one 25% above."""
    arch = size_arch(size, seq_len, checkpointing)
    run = RunShape(batch_size=1, seq_len=seq_len, batch_mode="packed", activation_checkpointing=checkpointing)
    from lit_xf.memory_facts import config_dims

    predicted = largest_batch_size(config_dims(arch), run, capacity)
    tried = {}
    for b in sorted({max(1, predicted), max(2, int(predicted * 1.25))}):
        tried[b] = train_case(arch, dataclasses.replace(run, batch_size=b), steps, 1, device)
    ok = [b for b, r in tried.items() if "oom" not in r]
    best = max(ok) if ok else 0
    return {
        "size": size,
        "seq_len": seq_len,
        "checkpointing": checkpointing,
        "predicted_batch_size": predicted,
        "largest_trained_batch_size": best,
        "largest_tokens_per_step": best * seq_len,
        "runs": {str(b): r for b, r in tried.items()},
    }


def forced_oom(out: Path, device: str, quick: bool) -> dict:
    """``lit-xf fit`` far too large for the card, with ``MemorySnapshot``: its files and its one-line error."""
    run_dir = out / "oom_run"
    args = [
        sys.executable,
        "-m",
        "lit_xf.cli",
        "fit",
        "--config",
        str(ROOT / "configs" / "gpt2_small.yaml"),
        "--data.batch_size",
        "2" if quick else "512",
        "--trainer.max_steps",
        "2",
        "--model.compile",
        "false",
        "--model.arch.attention",
        "sdpa",  # auto would time its kernels at the first batch, where the OOM is meant to happen
        "--trainer.callbacks+=lit_xf.callbacks.MemorySnapshot",
        f"--trainer.logger.init_args.save_dir={run_dir}",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.val_check_interval",
        "1",  # the batch is larger than the corpus's one training batch per epoch
    ]
    if device != "cuda":
        args += [
            "--trainer.accelerator",
            "cpu",
            "--trainer.precision",
            "32-true",
            "--data.seq_len",
            "64",
            "--model.arch.n_layers",
            "1",
            "--trainer.max_steps",
            "1",
        ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lit-xf: error:")]
    files = sorted(str(p.relative_to(out)) for p in run_dir.rglob("memory_*")) if run_dir.exists() else []
    return {
        "returncode": proc.returncode,
        "error_lines": errors,
        "files": files,
        "snapshot_pickle": any(f.endswith(".pickle") for f in files),
        "timeline_html": any("memory_timeline_" in f for f in files),
        "viz_html": any("memory_viz_" in f for f in files),
        "stderr_tail": proc.stderr[-2000:] if proc.returncode not in (0, 1) or not errors else "",
    }


def _small_case(mode: str, device: str, quick: bool) -> tuple[GPTConfig, RunShape]:
    """The 124M model at 16 x 2048 (``quick``: a tiny one at 2 x 64) in ``mode``, for the tag and cost checks."""
    seq = 64 if quick else 2048
    if quick:
        arch = GPTConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=seq)
    else:
        arch = size_arch("124M", seq)
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    return arch, RunShape(batch_size=2 if quick else 16, seq_len=seq, batch_mode=mode, precision=precision)


def breakdown_tags(out: Path, device: str, quick: bool) -> dict:
    """A short run with ``MemoryBreakdown`` and TensorBoard: the tags found in its event file."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lit_xf.callbacks import BREAKDOWN_TAGS, MemoryBreakdown, PeakMemoryMonitor

    result = {}
    for mode in ("padded", "packed"):
        logger = TensorBoardLogger(out / "tb", name=mode, default_hp_metric=False)
        arch, run = _small_case(mode, device, quick)
        case = train_case(
            arch, run, 4, 1, device, extra_callbacks=[PeakMemoryMonitor(), MemoryBreakdown()], logger=logger
        )
        events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
        events.Reload()
        tags = set(events.Tags()["scalars"])
        result[mode] = {
            "tags_found": sorted(t for t in BREAKDOWN_TAGS if t in tags),
            "missing": sorted(t for t in BREAKDOWN_TAGS if t not in tags),
            "last": {t: events.Scalars(t)[-1].value for t in BREAKDOWN_TAGS if t in tags},
            "case": case,
        }
    return result


def snapshot_cost(device: str, quick: bool) -> dict:
    """Median step time of the 124M model with the allocator history off, without and with Python stacks."""
    from lit_xf.callbacks import MemorySnapshot

    arch, run = _small_case("packed", device, quick)
    out = {}
    for name, callbacks in (
        ("off", []),
        ("stacks none", [MemorySnapshot(stacks="none")]),
        ("stacks python", [MemorySnapshot(stacks="python")]),
        ("off again", []),
    ):
        case = train_case(arch, run, 8, 2, device, extra_callbacks=callbacks)
        out[name] = case.get("step_s")
    return out


def write_results(out: Path, results: dict) -> None:
    """``<out>/memory_gpu_check.json``, replaced whole (a killed run leaves the previous file)."""
    tmp = out / ".memory_gpu_check.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "memory_gpu_check.json")


def reestimate(results: dict) -> None:
    """Every case's estimate recomputed from its recorded shape by today's ``estimate`` (pure
    arithmetic, no GPU); the measured peaks stay as they were measured."""
    from lit_xf.memory_facts import config_dims

    archs = {name: arch for name, arch, _, _ in config_cases(False)}

    def redo(r: dict, arch: GPTConfig) -> None:
        est = estimate(config_dims(arch), RunShape(**r["shape"]))
        r.update(estimate_bytes=est.peak, estimate_phase=est.phase, dominant=est.dominant)
        if r.get("measured_bytes"):
            r["ratio"] = est.peak / r["measured_bytes"]

    for name, r in (results.get("configs") or {}).items():
        redo(r, archs[name])
    for name, r in (results.get("sizes") or {}).items():
        redo(r, size_arch(name.split()[0], r["shape"]["seq_len"]))
    for big in results.get("largest") or []:
        arch = size_arch(big["size"], big["seq_len"], big["checkpointing"])
        for r in big["runs"].values():
            redo(r, arch)
        run = RunShape(1, big["seq_len"], "packed", activation_checkpointing=big["checkpointing"])
        big["predicted_batch_size"] = largest_batch_size(config_dims(arch), run, results["run"]["total_memory_bytes"])
    results["rows"] = result_rows(results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for memory_gpu_check.json and the runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU plumbing check)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per case (default 4: 2 measured)")
    parser.add_argument("--parts", default="configs,sizes,largest,oom,tags,cost", help="comma-separated parts")
    parser.add_argument(
        "--reestimate",
        action="store_true",
        help="recompute the estimates of <out>/memory_gpu_check.json from its recorded shapes (CPU) and exit",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.reestimate:
        results = json.loads((out / "memory_gpu_check.json").read_text())
        reestimate(results)
        given = sys.argv[1:] if argv is None else argv
        command = " ".join(["python scripts/memory_gpu_check.py", *given])
        results["meta"]["command"] += f" && {command} ({time.strftime('%Y-%m-%d')})"
        write_results(out, results)
        print(summary(results))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    capacity = torch.cuda.get_device_properties(0).total_memory if args.device == "cuda" else GPUS["h200"]
    import lightning

    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{args.device} (no GPU)"
    results: dict = {
        # meta in scripts/results_reference.py's form (MEMORY_SECTION renders this file)
        "meta": {
            "gpu": gpu,
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["python", *sys.argv]),
        },
        "run": {"python": platform.python_version(), "device": args.device, "total_memory_bytes": capacity},
        "rows": [],
    }
    previous = out / "memory_gpu_check.json"
    if previous.exists():  # a run of other --parts into the same folder: keep its parts, name both commands
        old = json.loads(previous.read_text())
        results.update({k: v for k, v in old.items() if k not in ("meta", "run", "rows")})
        results["meta"]["command"] = old.get("meta", {}).get("command", "") + " && " + results["meta"]["command"]
    started = time.perf_counter()

    def save():
        results["run"]["seconds"] = time.perf_counter() - started
        results["rows"] = result_rows(results)
        write_results(out, results)

    if "configs" in parts:
        results["configs"] = {}
        for name, arch, run, compile_mode in config_cases(args.quick):
            if args.device != "cuda" and run.precision.startswith("16"):
                run = dataclasses.replace(run, precision="32-true")
            results["configs"][name] = train_case(arch, run, args.steps, 2, args.device, compile_mode)
            save()
    if "sizes" in parts:
        results["sizes"] = {}
        for size in list(SIZES)[:1] if args.quick else SIZES:
            for mode in ("padded", "packed"):
                seq = 64 if args.quick else 2048
                arch = size_arch(size, seq)
                if args.quick:
                    arch = dataclasses.replace(arch, d_model=32, n_layers=1, n_heads=2, vocab_size=64)
                run = RunShape(
                    batch_size=2 if args.quick else 8,
                    seq_len=seq,
                    batch_mode=mode,
                    precision="bf16-mixed" if args.device == "cuda" else "32-true",
                )
                results["sizes"][f"{size} {mode}"] = train_case(arch, run, args.steps, 2, args.device)
                save()
    if "largest" in parts and not args.quick:
        results["largest"] = [
            largest_trainable("1B", 8192, mode, args.device, capacity, 3) for mode in ("none", "full")
        ]
        save()
    if "oom" in parts:
        results["oom"] = forced_oom(out, args.device, args.quick)
        save()
    if "tags" in parts:
        results["tags"] = breakdown_tags(out, args.device, args.quick)
        save()
    if "cost" in parts:
        results["snapshot_cost_step_s"] = snapshot_cost(args.device, args.quick)
        save()
    print(summary(results))
    return 0


def result_rows(results: dict) -> list[dict]:
    """One row per estimate-vs-measured case, for the results reference's table."""
    rows = []
    for group in ("configs", "sizes"):
        for name, r in (results.get(group) or {}).items():
            measured = r.get("measured_bytes")
            rows.append(
                {
                    "case": name,
                    "group": group,
                    "kernel": r.get("kernel"),
                    "estimate_gib": r["estimate_bytes"] / 2**30,
                    "measured_gib": measured / 2**30 if measured else None,
                    "ratio": r.get("ratio"),
                    "dominant": r.get("dominant"),
                    "oom": r.get("oom"),
                }
            )
    return rows


def summary(results: dict) -> str:
    """The table printed last: estimate / measured per case."""
    lines = [f"{'case':<28} {'kernel':<10} {'estimate GiB':>12} {'measured GiB':>12} {'ratio':>6}  dominant"]
    for group in ("configs", "sizes"):
        for name, r in (results.get(group) or {}).items():
            measured = r.get("measured_bytes")
            lines.append(
                f"{name:<28} {str(r.get('kernel', '-')):<10} {r['estimate_bytes'] / 2**30:>12.2f} "
                f"{(measured or 0) / 2**30:>12.2f} {r.get('ratio', float('nan')):>6.3f}  {r.get('dominant')}"
                + (f"  OOM: {r['oom']}" if "oom" in r else "")
            )
    for r in results.get("largest") or []:
        lines.append(
            f"largest {r['size']} T={r['seq_len']} ckpt={r['checkpointing']}: predicted B={r['predicted_batch_size']}, "
            f"trained B={r['largest_trained_batch_size']} ({r['largest_tokens_per_step']} tokens/step)"
        )
    if "oom" in results:
        o = results["oom"]
        lines.append(
            f"forced OOM: rc={o['returncode']} one error line={len(o['error_lines']) == 1} "
            f"pickle={o['snapshot_pickle']} timeline={o['timeline_html']} viz={o['viz_html']}"
        )
    for mode, t in (results.get("tags") or {}).items():
        lines.append(f"breakdown tags ({mode}): {len(t['tags_found'])} found, missing {t['missing']}")
    if "snapshot_cost_step_s" in results:
        lines.append(
            "snapshot recording, median step s: "
            + ", ".join(f"{k} {v:.4f}" if v else f"{k} -" for k, v in results["snapshot_cost_step_s"].items())
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
