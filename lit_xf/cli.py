"""The ``lit-xf`` command.

    lit-xf fit --config configs/default.yaml        # also validate / test / predict (LightningCLI)
    lit-xf fit --config configs/default.yaml --print_config
    lit-xf env                                      # versions, device, attention kernels that run here
    lit-xf bench ...                                # benchmarks (lit_xf.bench)

``LitXfCLI`` (``lit_xf.lightning_cli``) is a plain ``LightningCLI`` over ``LitTinyGPT`` and
``TextDataModule`` with two links: ``data.seq_len`` sets ``model.arch.max_seq_len`` when the config is
parsed, and the data module's ``vocab_size`` sets ``model.arch.vocab_size`` when the classes are
instantiated (so neither is given twice). The architecture is ``model.arch``
(``lit_xf.config.GPTConfig``), e.g. ``--model.arch.d_model 256``.

Errors raised while building or setting up the run (``ValueError``, ``FileNotFoundError``: an
impossible model, a missing corpus; Lightning's ``MisconfigurationException``: e.g. fp16 AMP on a
CPU) print as one ``lit-xf: error: ...`` message and exit with 1;
``LIT_XF_DEBUG=1`` shows the traceback instead. Argument and config-file errors are jsonargparse's
(one message, exit 2).

Importing this module imports neither torch nor Lightning (the usage prints at once): ``LitXfCLI``,
Lightning and torch are imported by the subcommands that use them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import sys
import warnings
from collections.abc import Sequence
from importlib import metadata
from typing import Any

DEBUG_ENV = "LIT_XF_DEBUG"
PROG = "lit-xf"


class _LazyModule:
    """A module imported when one of its attributes is first read; it then replaces this stand-in in
    ``lit_xf.cli``'s globals. ``lit-xf --help`` and the usage never import torch; ``env`` does."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self._name)
        globals()[self._name] = module
        return getattr(module, attr)


torch = _LazyModule("torch")


def __getattr__(name: str) -> Any:
    """``LitXfCLI`` (``lit_xf.lightning_cli``, which imports torch and Lightning) on first use."""
    if name == "LitXfCLI":
        from lit_xf.lightning_cli import LitXfCLI

        return LitXfCLI
    raise AttributeError(f"module 'lit_xf.cli' has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------
# lit-xf env
# ------------------------------------------------------------------------------------------------
def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _device_line(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (
            f"cuda:{device.index or 0} {props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB ({torch.cuda.device_count()} visible)"
        )
    return f"cpu ({os.cpu_count()} cores; no CUDA device visible)"


def env_report(
    device: str | None = None, n_heads: int = 8, n_kv_heads: int = 2, seq_len: int = 2048, training: bool = True
) -> str:
    """Versions, the device, and for every mask case which attention kernels run and which one
    ``auto`` picks, with the reason each other kernel can't run."""
    from lit_xf.attention import (
        AUTO_FA4_MIN_ROW_LEN,
        AUTO_FA4_SMALL_HEADS,
        AUTO_PREFERENCE,
        FA4_GROUP_TOKENS,
        FA4_GROUPED_TILE_RATIO,
        KERNEL_NAMES,
        AutoAttention,
        kernel_report,
        make_kernel,
    )
    from lit_xf.attention.probes import xformers_problem

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    problem = xformers_problem() if dev.type == "cuda" else "xformers' attention kernels are CUDA-only"
    lines = [
        f"lit_xf      {_version('lit_xf')}",
        f"python      {platform.python_version()} ({sys.executable})",
        f"torch       {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        f"lightning   {_version('lightning')}",
        f"xformers    {_version('xformers')} ({problem or 'its attention runs here'})",
        f"quack       {_version('quack-kernels')} ({_quack_line(dev)})",
        f"cuda        {_cuda_line()}",
        f"device      {_device_line(dev)}",
        "",
        f"Attention kernels for {'training' if training else 'inference'} on {dev.type}: {n_heads} query heads, "
        f"GQA = {n_heads}q/{n_kv_heads}kv, seq_len {seq_len}.",
        "'yes' runs, 'no [n]' can't (reason below); auto picks the fastest that runs"
        + (" (sdpa on CPU)." if dev.type != "cuda" else " (order measured on an H200)."),
        "",
    ]
    kernels = KERNEL_NAMES[1:]
    header = ["mask", "heads", "positions", "auto"] + list(kernels)
    rows, reasons = [], {}
    auto = AutoAttention()
    for packed in (False, True):
        for gqa in (False, True):
            for alibi in (False, True):
                kv = n_kv_heads if gqa else n_heads
                report = kernel_report(dev, n_heads=n_heads, n_kv_heads=kv, alibi=alibi, training=training)
                # xformers' ALiBi limit depends on seq_len, which kernel_report doesn't take.
                report["xformers"] = make_kernel("xformers").support(
                    device=dev, n_heads=n_heads, n_kv_heads=kv, alibi=alibi, training=training, seq_len=seq_len
                )
                choice = auto.choose(
                    device=dev,
                    n_heads=n_heads,
                    n_kv_heads=kv,
                    alibi=alibi,
                    training=training,
                    packed=packed,
                    seq_len=seq_len,
                )
                cells = []
                for name in kernels:
                    reason = report[name]
                    if reason is None:
                        cells.append("yes")
                    else:
                        key = (name, reason)
                        reasons.setdefault(key, len(reasons) + 1)
                        cells.append(f"no [{reasons[key]}]")
                rows.append(
                    [
                        "packed" if packed else "causal",
                        f"GQA {n_heads}/{n_kv_heads}" if gqa else "MHA",
                        "alibi" if alibi else "rope/learned",
                        choice,
                    ]
                    + cells
                )
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    lines.append("")
    for (name, reason), number in reasons.items():
        lines.append(f"[{number}] {name}: {reason}")
    lines.append("naive is the reference (it materializes the T×T scores); auto never picks it.")
    if dev.type == "cuda":
        lines.append("auto's order on CUDA (the first kernel that runs the case wins):")
        for (packed, alibi, gqa), order in AUTO_PREFERENCE.items():
            case = f"{'packed' if packed else 'causal'}{' GQA' if gqa else ''}{' ALiBi' if alibi else ''}"
            lines.append(f"  {case:20s} {' > '.join(order)}")
        small = AUTO_FA4_SMALL_HEADS
        lines.append(
            f"  causal rows of {AUTO_FA4_MIN_ROW_LEN}+ tokens, or of {small['row_len']}+ in batches of "
            f"{small['batch_tokens']}+ tokens with head_dim <= {small['head_dim']} (MHA, no ALiBi): fa4 first"
        )
        lines.append(
            f"  fa4 on packed causal rows: documents grouped into {FA4_GROUP_TOKENS}-token sequences when that needs "
            f"<= {FA4_GROUPED_TILE_RATIO}x the tiles of one sequence each (short documents)"
        )
    return "\n".join(lines)


def _quack_line(dev: torch.device) -> str:
    from lit_xf.model import quack_mlp_problem

    problem = quack_mlp_problem(dev, torch.bfloat16)
    return f"mlp_kernel auto runs torch's GELU MLP: {problem}" if problem else "its GELU MLP runs here in bf16/fp16"


def _cuda_line() -> str:
    if not torch.cuda.is_available():
        return "not available"
    return f"available, runtime {torch.version.cuda}, driver reports {torch.cuda.device_count()} device(s)"


def _env_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"{PROG} env", description="Versions, device and attention kernels.")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--n_heads", type=int, default=8, help="query heads of the cases shown (default 8)")
    parser.add_argument("--n_kv_heads", type=int, default=2, help="kv heads of the GQA cases (default 2)")
    parser.add_argument("--seq_len", type=int, default=2048, help="row length (xformers' ALiBi bias grows with T²)")
    parser.add_argument("--inference", action="store_true", help="report inference (no backward) instead")
    args = parser.parse_args(list(argv))
    if args.n_kv_heads < 1 or args.n_heads % args.n_kv_heads:
        parser.error(f"--n_kv_heads={args.n_kv_heads} must divide --n_heads={args.n_heads}")
    print(env_report(args.device, args.n_heads, args.n_kv_heads, args.seq_len, training=not args.inference))
    return 0


# ------------------------------------------------------------------------------------------------
# lit-xf bench
# ------------------------------------------------------------------------------------------------
def _bench_main(argv: Sequence[str]) -> int:
    try:
        bench = importlib.import_module("lit_xf.bench")
    except ModuleNotFoundError as err:
        if err.name != "lit_xf.bench":
            raise
        print(
            f"{PROG}: error: benchmarks are not part of this lit_xf installation (no module lit_xf.bench)",
            file=sys.stderr,
        )
        return 2
    return int(bench.main(list(argv)) or 0)


# ------------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------------
class _DropAdverts(logging.Filter):
    """Lightning's "Tip: try installing <cloud service>" lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.msg)


def setup_logging(level: int = logging.INFO) -> None:
    """Show lit_xf's INFO messages (e.g. the kernel ``auto`` chose) on stderr, once; quiet Lightning's
    advertisements and a deprecation warning Lightning triggers in torch that users can't act on."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    for handler in logging.getLogger("lightning.pytorch").handlers:
        if not any(isinstance(f, _DropAdverts) for f in handler.filters):
            handler.addFilter(_DropAdverts())
    logger = logging.getLogger("lit_xf")
    logger.setLevel(level)
    if not any(getattr(h, "_lit_xf", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[lit_xf] %(message)s"))
        handler._lit_xf = True
        logger.addHandler(handler)
        logger.propagate = False


USAGE = f"""usage: {PROG} {{fit,validate,test,predict}} [--config FILE] [--KEY VALUE ...]
       {PROG} env [--device DEVICE]
       {PROG} bench COMMAND [...]

  fit, validate, test, predict   LightningCLI over LitTinyGPT and TextDataModule
                                 (`{PROG} fit --help` lists every key; `--print_config` shows the result)
  env                            versions, device, and which attention kernels run here
  bench                          benchmarks (`{PROG} bench --help`)

Set {DEBUG_ENV}=1 to see the traceback behind a `{PROG}: error:` message.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """``lit-xf``: ``env``, ``bench`` or a LightningCLI subcommand. Returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    if args and args[0] == "env":
        return _env_main(args[1:])
    if args and args[0] == "bench":
        return _bench_main(args[1:])
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lit_xf.lightning_cli import LitXfCLI

    setup_logging()  # after Lightning's import, which makes the handlers it filters
    try:
        LitXfCLI(args=None if argv is None else args)
    except SystemExit as exit_:  # --help, --print_config, parse errors
        code = exit_.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, MisconfigurationException) as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        hint = ""
        if isinstance(err, MisconfigurationException) and "gpu backend" in str(err).lower():
            hint = " (the config asks for a GPU; --trainer.accelerator cpu runs it on the CPU)"
        print(f"{PROG}: error: {err}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
