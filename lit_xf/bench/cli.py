"""``lit-xf bench COMMAND`` (or ``python -m lit_xf.bench COMMAND``): the argument parser and the
entry point that runs one benchmark, writes its files and prints its table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lit_xf.attention import ATTENTION_CHOICES
from lit_xf.bench import compare
from lit_xf.bench.attention import DTYPES, bench_attention
from lit_xf.bench.correctness import bench_correctness
from lit_xf.bench.curves import bench_curves
from lit_xf.bench.data import bench_data, machine_meta
from lit_xf.bench.output import environment, markdown_table, plot_attention, write_outputs
from lit_xf.bench.packing import bench_packing
from lit_xf.bench.train import bench_train
from lit_xf.data import BATCH_MODES
from lit_xf.model import MLP_KERNELS

DESCRIPTION = """\
Benchmarks of lit_xf's attention kernels and training steps.

Each run prints a Markdown table last and writes NAME.json (rows and the run's
environment) and NAME.csv under --out; attention also writes NAME.png. Times
are medians after warm-up: CUDA events on a GPU, the host clock on a CPU.
Memory (attention, packing) is the peak allocated during forward+backward
above what was allocated before it (CUDA only)."""

# command: (one line for the command list, the description its --help shows)
COMMANDS = {
    "attention": (
        "fwd+bwd time, TFLOP/s and peak memory per kernel and length",
        "Forward+backward time, TFLOP/s and peak memory per kernel across sequence\n"
        "lengths on full rows, and auto against the fastest single kernel of each\n"
        "case (auto_vs_best, timed call by call; on CUDA also on GPU time alone).\n"
        "TFLOP/s counts 3.5 x 4*H*K per attended (query, key) pair: the forward\n"
        "4*H*K, the backward 2.5 times that.",
    ),
    "correctness": (
        "every kernel against the float64 reference, forward and grads",
        "Every kernel x dtype x mask (causal, padded, packed) x GQA x ALiBi, the\n"
        "output and the q/k/v gradients, against the float64 reference attention.\n"
        "Error: |x - ref| / |ref| (norms), with a tolerance per dtype. Exits with 1\n"
        "if any case fails.",
    ),
    "packing": (
        "the same documents padded vs packed, per kernel",
        "The same log-normal documents padded to the longest (one per row) vs packed\n"
        "into one row, per kernel: fwd+bwd time, real tokens per second, and the time\n"
        "to build the mask of a new batch of the same shape.",
    ),
    "train": (
        "training steps: a hand-written loop vs Lightning vs lit_xf",
        "The same model, data and steps run several ways (--variants): a hand-written\n"
        "PyTorch loop, a bare Lightning Trainer, lit_xf with its monitors and\n"
        "TensorBoard, each eager or compiled. Steps after --warmup-steps are timed;\n"
        "per-step losses go to NAME_losses.json.\n\n"
        "Variants: loop, lightning or lit_xf, optionally with one of +compile,\n"
        "+compile_model, +cudagraphs; loop also with +rows (whole rows through sdpa,\n"
        "no document masking) and +fused (lit_xf's fused loss); lightning and lit_xf\n"
        "also with +tb (TensorBoardLogger), +atb (lit_xf's AsyncTensorBoardLogger),\n"
        "+memory +timer +throughput +noprofile.",
    ),
    "data": (
        "token store prepare, loader token rate, fit memory, packing",
        "On a generated text corpus (--size-mb, and --small-mb): prepare throughput\n"
        "and peak RSS, the loader's tokens/s with N workers against what a 124M model\n"
        "consumes on one H200, a short fit's peak RSS and time to its first batch on\n"
        "both stores, and the streamed packer's efficiency against whole-split\n"
        "best-fit decreasing (fortunes at 512, the large corpus at --seq-len).",
    ),
    "curves": (
        "TensorBoard runs' memory, time and throughput curves in a PNG",
        "Per-step peak memory, step time, throughput and attention share of several\n"
        "TensorBoard runs side by side in NAME.png, and each run's medians.",
    ),
    "compare": (
        "a rerun's results against the committed ones; exit 1 on a regression",
        "Every figure of the results files in NEW against the file of the same name\n"
        "in --against (rows matched by kernel, variant, mode, dtype and shape): prints\n"
        "each figure that moved beyond its noise band and exits with 1 where one got\n"
        "worse (slower, more memory, a correctness case that no longer passes).\n"
        "Writes no files.",
    ),
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _step_range(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    try:
        if sep and 0 <= int(start) < int(stop):
            return int(start), int(stop)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected START:STOP with 0 <= START < STOP, got {text!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _names(text: str) -> list[str]:
    names = text.split(",")
    bad = [n for n in names if n not in ATTENTION_CHOICES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown kernel(s) {bad}; choose from {', '.join(ATTENTION_CHOICES)}")
    return names


def _packing_modes(text: str) -> list[str]:
    modes = text.split(",")
    if any(m not in ("padded", "packed") for m in modes):
        raise argparse.ArgumentTypeError(f"modes {text!r}: padded, packed or padded,packed")
    return modes


def _csv(values) -> str:
    return ",".join(map(str, values))


def build_parser() -> argparse.ArgumentParser:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    def raw(prog: str) -> argparse.HelpFormatter:  # descriptions as written, helps from column 27
        return argparse.RawDescriptionHelpFormatter(prog, max_help_position=27)

    commands = "commands:\n" + "\n".join(f"  {name:<13}{line}" for name, (line, _) in COMMANDS.items())
    commands += "\n\nRun 'lit-xf bench COMMAND --help' for a command's options."
    p = argparse.ArgumentParser(
        prog="lit-xf bench",
        usage="%(prog)s [-h] COMMAND [options]",
        description=DESCRIPTION,
        epilog=commands,
        formatter_class=raw,
    )
    # the commands are listed in the epilog: argparse's own list wraps their names
    sub = p.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS, prog="lit-xf bench"
    )

    def command(name: str, run) -> argparse.ArgumentParser:
        line, description = COMMANDS[name]
        sp = sub.add_parser(name, help=line, description=description, formatter_class=raw)
        sp.set_defaults(run=run)
        return sp

    def outputs(sp, name: str) -> None:
        sp.add_argument(
            "--out", type=Path, default=Path("bench_results"), help="output folder (default: bench_results)"
        )
        sp.add_argument("--name", default=None, help=f"output file stem (default: {name})")

    choices = ", ".join(ATTENTION_CHOICES)

    def common(sp, name, kernels, dtype):
        sp.add_argument("--device", default=default_device, help=f"device to run on (default: {default_device})")
        sp.add_argument(
            "--kernels",
            type=_names,
            default=kernels,
            metavar="K1,K2",
            help=f"attention kernels, comma-separated (default: {_csv(kernels)}; any of {choices})",
        )
        outputs(sp, name)
        sp.add_argument("--heads", type=int, default=8, help="query heads H (default: 8)")
        sp.add_argument("--kv-heads", type=int, default=None, help="key/value heads for GQA (default: --heads)")
        sp.add_argument("--head-dim", type=int, default=64, help="head dimension K (default: 64)")
        sp.add_argument("--alibi", action="store_true", help="add ALiBi biases")
        sp.add_argument(
            "--window",
            type=_positive_int,
            default=None,
            metavar="W",
            help="causal sliding window: each query sees its W most recent keys (default: all)",
        )
        sp.add_argument("--warmup", type=int, default=5, help="untimed calls before timing (default: 5)")
        sp.add_argument("--reps", type=int, default=30, help="timed calls; the median is reported (default: 30)")
        sp.add_argument("--dtype", choices=DTYPES, default=dtype, help=f"tensor dtype (default: {dtype})")

    gpu = default_device == "cuda"
    a = command("attention", bench_attention)
    common(a, "attention", ["naive", "sdpa", "xformers", "flex", "auto"], "fp16" if gpu else "fp32")
    a.add_argument(
        "--seq-lens",
        type=_ints,
        default=[512, 1024, 2048, 4096],
        metavar="T1,T2",
        help="sequence lengths T, comma-separated (default: 512,1024,2048,4096)",
    )
    a.add_argument("--batch", type=int, default=2, help="rows B (default: 2)")
    a.add_argument(
        "--causal", action=argparse.BooleanOptionalAction, default=False, help="causal attention (default: off)"
    )

    c = command("correctness", bench_correctness)
    common(c, "correctness", ["naive", "sdpa", "xformers", "flex"], "fp32")
    c.add_argument(
        "--dtypes",
        type=lambda s: s.split(","),
        default=["fp16", "bf16"],
        metavar="D1,D2",
        help="dtypes to check, comma-separated (default: fp16,bf16)",
    )
    c.add_argument("--seq-len", type=int, default=256, help="tokens per row T (default: 256)")
    c.add_argument("--batch", type=int, default=2, help="rows B (default: 2)")

    k = command("packing", bench_packing)
    common(k, "packing", ["sdpa", "xformers", "flex", "auto"], "bf16" if gpu else "fp32")
    k.add_argument("--docs", type=int, default=256, help="documents (default: 256)")
    k.add_argument("--mean-len", type=float, default=422, help="mean document length in tokens (default: 422)")
    k.add_argument("--max-len", type=int, default=2048, help="longest document (default: 2048)")
    k.add_argument("--seed", type=int, default=0, help="seed of the document lengths (default: 0)")
    k.add_argument(
        "--modes", type=_packing_modes, default=["padded", "packed"], help="padded, packed or padded,packed (default)"
    )

    t = command("train", bench_train)
    t.add_argument("--config", default="configs/counting.yaml", help="lit-xf fit config (default: %(default)s)")
    t.add_argument("--device", default=default_device, help=f"device to run on (default: {default_device})")
    t.add_argument("--steps", type=int, default=400, help="steps per run (default: 400)")
    t.add_argument("--warmup-steps", type=int, default=50, help="untimed steps at the start (default: 50)")
    t.add_argument("--precision", default=None, help="default: the config's trainer.precision")
    t.add_argument("--attention", default=None, help="override the config's model.arch.attention")
    t.add_argument("--mlp-kernel", choices=MLP_KERNELS, default=None, help="override model.arch.mlp_kernel")
    t.add_argument("--batch-size", type=int, default=None, help="override the config's data.batch_size")
    t.add_argument("--batch-mode", choices=BATCH_MODES, default=None, help="override the config's data.batch_mode")
    t.add_argument(
        "--variants",
        type=lambda s: s.split(","),
        default=["loop", "lightning", "lit_xf"],
        metavar="V1,V2",
        help="the ways to run, comma-separated (default: loop,lightning,lit_xf)",
    )
    t.add_argument(
        "--repeats", type=_positive_int, default=1, help="runs per variant, interleaved; median reported (default: 1)"
    )
    t.add_argument(
        "--profile-steps",
        type=_step_range,
        default=None,
        metavar="A:B",
        help="torch.profiler over steps A..B-1 of each variant's first run (within the warm-up): GPU busy "
        "fraction, kernel time by group -> NAME_profile.json",
    )
    t.add_argument(
        "--hook-us",
        action="store_true",
        help="time the monitors' per-step hooks on the host (µs per step and hook -> hook_us)",
    )
    outputs(t, "train")

    d = command("data", bench_data)
    d.add_argument("--size-mb", type=float, default=2000, help="large generated corpus in MB (default: 2000)")
    d.add_argument("--small-mb", type=float, default=100, help="small generated corpus in MB (default: 100)")
    d.add_argument("--dir", default="bench_data", help="where corpora and stores go (default: bench_data)")
    d.add_argument("--tokenizers", type=lambda t: t.split(","), default=["byte", "bpe"], help="default: byte,bpe")
    d.add_argument("--workers", type=_ints, default=[0, 2], help="loader workers to time (default: 0,2)")
    d.add_argument("--seq-len", type=int, default=2048, help="row length (default: 2048)")
    d.add_argument("--batch-size", type=int, default=16, help="rows per batch (default: 16)")
    d.add_argument("--loader-batches", type=int, default=200, help="batches timed per loader (default: 200)")
    d.add_argument("--fit-steps", type=int, default=20, help="steps of each fit (default: 20)")
    d.add_argument("--consumer-tokens-per-s", type=float, default=550e3, help="124M on one H200 (default: 550e3)")
    d.add_argument("--seed", type=int, default=0, help="corpus generator seed (default: 0)")
    outputs(d, "data")

    cv = command("curves", bench_curves)
    cv.add_argument("logdirs", nargs="+", help="TensorBoard run folders (e.g. runs/fortunes_packed/version_0)")
    outputs(cv, "curves")

    compare.add_arguments(command("compare", compare.bench_compare))
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark; 1 if any row failed (status FAIL or error), else 0."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        return args.run(args)
    if getattr(args, "window", None) and args.command == "attention" and not args.causal:
        parser.error("--window is a causal sliding window: add --causal")
    meta = environment() | {"command": "lit-xf bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"# {meta}", flush=True)
    rows = args.run(args)
    if args.command == "data":
        meta |= machine_meta()
    name = args.name or args.command
    write_outputs(rows, args.out, name, meta)
    if args.command == "attention":
        plot_attention(
            rows,
            args.out / f"{name}.png",
            f"B={args.batch} H={args.heads} K={args.head_dim} {args.dtype} "
            f"{'causal' if args.causal else 'non-causal'} fwd+bwd",
        )
    print(markdown_table(rows))
    failed = [r for r in rows if r.get("status") in ("FAIL", "error")]
    return 1 if failed else 0
