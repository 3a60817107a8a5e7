"""The ``lit-xf`` command.

    lit-xf fit --config configs/default.yaml        # also validate / test / predict (LightningCLI)
    lit-xf fit --config configs/default.yaml --print_config
    lit-xf prepare --config configs/default.yaml    # tokenize the config's corpus into its token store
    lit-xf env                                      # versions, device, attention kernels that run here
    lit-xf generate --ckpt_path last.ckpt --prompt "Q: "   # text from a checkpoint (lit_xf.generate)
    lit-xf bench ...                                # benchmarks (lit_xf.bench)
    lit-xf convert from-hf HF_DIR OUT_DIR           # Hugging Face <-> lit_xf (lit_xf.convert)
    lit-xf estimate --config configs/gpt2_124m.yaml --gpu h200   # predicted peak memory (lit_xf.memory_estimate)

``LitXfCLI`` (``lit_xf.lightning_cli``) is a plain ``LightningCLI`` over ``LitTinyGPT`` and
``TextDataModule`` with two links: ``data.seq_len`` sets ``model.arch.max_seq_len`` when the config
is parsed, and the data module's ``vocab_size`` sets ``model.arch.vocab_size`` when the classes are
instantiated (so neither is given twice). The architecture is ``model.arch``
(``lit_xf.config.GPTConfig``), e.g. ``--model.arch.d_model 256``.

Errors raised while building or running (``ValueError``, ``OSError``: an impossible model, a
missing corpus or checkpoint, an unwritable folder; Lightning's ``MisconfigurationException``: e.g.
fp16 AMP on a CPU) print as one ``lit-xf: error: ...`` line and exit with 1; argument and
config-file errors as one line too, exit 2 (``lit_xf.cli_guard``). A run that fails before its
first optimizer step leaves no run folder behind. ``LIT_XF_DEBUG=1`` shows the traceback instead.

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
    device: str | None = None,
    n_heads: int = 8,
    n_kv_heads: int = 2,
    seq_len: int = 2048,
    training: bool = True,
    batch_size: int = 4,
    head_dim: int = 64,
    measure: bool = True,
) -> str:
    """Versions, the device, and for every mask case which attention kernels run (with the reason
    each other can't) and what ``auto`` runs: on CUDA it times the kernels on each case as ``auto``
    does at a run's first batch (``batch_size`` rows of ``seq_len`` tokens, bf16; ``measure=False``
    skips that) and prints the times; elsewhere, that auto runs sdpa and why."""
    from lit_xf.attention import (
        FA4_GROUP_TOKENS,
        FA4_GROUPED_TILE_RATIO,
        KERNEL_NAMES,
        AutoAttention,
        alibi_slopes,
        default_cache_dir,
        kernel_report,
    )
    from lit_xf.attention.auto_cache import CACHE_FILE, CACHE_SWITCH_ENV
    from lit_xf.attention.probes import xformers_problem

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    timed = dev.type == "cuda" and measure
    problem = xformers_problem() if dev.type == "cuda" else "xformers' attention kernels are CUDA-only"
    work = "fwd+bwd" if training else "fwd"
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
        (
            f"Times: ms per {work} call, timed as auto times a run's first batch of a case ({batch_size} rows, "
            f"head_dim {head_dim}, bf16; packed rows of {min(8, seq_len)} documents); 'no [n]' can't run, "
            "'fail [n]' raised (reasons below); auto takes the fastest."
            if timed
            else "'yes' runs, 'no [n]' can't (reason below); "
            + ("auto times them at a run's first batch of each case." if dev.type == "cuda" else "auto: see below.")
        ),
        "",
    ]
    kernels = KERNEL_NAMES[1:]
    header = ["mask", "heads", "positions", "auto"] + list(kernels)
    rows, reasons, choice = [], {}, None
    auto = AutoAttention(cache_dir=False)  # measure afresh

    def footnote(kind: str, name: str, reason: str) -> str:
        number = reasons.setdefault((name, reason), len(reasons) + 1)
        return f"{kind} [{number}]"

    for packed in (False, True):
        for gqa in (False, True):
            for alibi in (False, True):
                kv = n_kv_heads if gqa else n_heads
                report = kernel_report(
                    dev, n_heads=n_heads, n_kv_heads=kv, alibi=alibi, training=training, seq_len=seq_len
                )
                choice = None
                if timed or dev.type != "cuda":
                    choice = auto.choose(
                        _env_layout(packed, batch_size, seq_len),
                        None,
                        alibi_slopes(n_heads) if alibi else None,
                        n_heads=n_heads,
                        n_kv_heads=kv,
                        dtype=torch.bfloat16,
                        device=dev,
                        head_dim=head_dim,
                        training=training,
                    )
                cells = []
                for name in kernels:
                    if choice is not None and name in choice.times_ms:
                        cells.append(f"{choice.times_ms[name]:.2f}")
                    elif choice is not None and name in choice.failed:
                        cells.append(footnote("fail", name, choice.failed[name]))
                    elif report[name] is not None:
                        cells.append(footnote("no", name, report[name]))
                    else:
                        cells.append("yes")
                rows.append(
                    [
                        "packed" if packed else "causal",
                        f"GQA {n_heads}/{n_kv_heads}" if gqa else "MHA",
                        "alibi" if alibi else "rope/learned",
                        choice.kernel if choice is not None else "-",
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
    if dev.type != "cuda":
        lines.append(f"auto {choice.reason}.")
    else:
        cache = default_cache_dir()
        where = f"in {cache / CACHE_FILE}" if cache else f"for one process only ({CACHE_SWITCH_ENV}=0)"
        lines.append(
            "auto times every kernel that runs a case at the first batch of that case (prepare once + one call "
            "per layer in a model) and keeps the fastest for the case's later batches; a run's choices are kept "
            f"{where} and logged with their times."
        )
        lines.append(
            f"fa4 on packed causal rows: documents grouped into {FA4_GROUP_TOKENS}-token sequences when that needs "
            f"<= {FA4_GROUPED_TILE_RATIO}x the tiles of one sequence each (short documents)"
        )
    return "\n".join(lines)


def _env_layout(packed: bool, batch_size: int, seq_len: int):
    """Rows of one document, or packed rows of 8 documents of about equal length."""
    from lit_xf.attention import DocLayout

    if not packed:
        return DocLayout.full_rows(batch_size, seq_len)
    n = min(8, seq_len)
    docs = [seq_len // n] * (n - 1) + [seq_len - (n - 1) * (seq_len // n)]
    return DocLayout([docs] * batch_size, seq_len)


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
    parser.add_argument("--batch_size", type=int, default=4, help="rows of the timed cases (default 4)")
    parser.add_argument("--head_dim", type=int, default=64, help="head size of the timed cases (default 64)")
    parser.add_argument("--no-measure", dest="measure", action="store_false", help="don't time the kernels (CUDA)")
    args = parser.parse_args(list(argv))
    if args.n_kv_heads < 1 or args.n_heads % args.n_kv_heads:
        parser.error(f"--n_kv_heads={args.n_kv_heads} must divide --n_heads={args.n_heads}")
    report = env_report(
        args.device,
        args.n_heads,
        args.n_kv_heads,
        args.seq_len,
        training=not args.inference,
        batch_size=args.batch_size,
        head_dim=args.head_dim,
        measure=args.measure,
    )
    print(report)
    return 0


# ------------------------------------------------------------------------------------------------
# lit-xf prepare
# ------------------------------------------------------------------------------------------------
def _prepare_main(argv: Sequence[str]) -> int:
    """Build (or check) the token store of a config's ``data`` section; ``--data.KEY VALUE`` overrides."""
    import yaml

    parser = argparse.ArgumentParser(
        prog=f"{PROG} prepare",
        description="Tokenize the corpus of a config's data section into its token store (reused when present).",
    )
    parser.add_argument("--config", action="append", default=[], help="a lit-xf fit config (repeatable)")
    args, rest = parser.parse_known_args(list(argv))
    data: dict[str, Any] = {}
    for path in args.config:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
        data.update((cfg.get("data") or {}).get("init_args", cfg.get("data") or {}))
    it = iter(rest)
    for key in it:
        name, _, value = key.partition("=")
        if not name.startswith("--data."):
            parser.error(f"unrecognized argument {key!r}: only --config and --data.KEY VALUE apply")
        data[name[len("--data.") :]] = yaml.safe_load(value if value else next(it, ""))
    setup_logging()
    from lit_xf.data import TextDataModule

    dm = TextDataModule(**data)
    if dm.corpus == "counting":
        print("corpus=counting is generated in memory: nothing to prepare")
        return 0
    dm.prepare_data()
    meta = dm._prepare().meta
    print(f"{dm.store_path}: {meta['n_docs']} documents, {meta['n_tokens']} tokens ({meta['dtype']})")
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
       {PROG} prepare --config FILE [--data.KEY VALUE ...]
       {PROG} env [--device DEVICE]
       {PROG} generate --ckpt_path CKPT --prompt TEXT [...]
       {PROG} estimate --config FILE [--gpu h200] [--json] [--KEY VALUE ...]
       {PROG} bench COMMAND [...]
       {PROG} convert {{from-hf,to-hf}} SRC DEST

  fit, validate, test, predict   LightningCLI over LitTinyGPT and TextDataModule
                                 (`{PROG} fit --help` lists every key; `--print_config` shows the result)
  prepare                        tokenize a config's corpus once into its token store (lit_xf/data/store.py)
  env                            versions, device, and which attention kernels run here
  generate                       continue prompts with a checkpoint (`{PROG} generate --help`)
  estimate                       predicted peak memory of a config's training step (`{PROG} estimate --help`)
  bench                          benchmarks (`{PROG} bench --help`)
  convert                        Hugging Face folders <-> lit_xf weights (`{PROG} convert --help`)

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
    if args and args[0] == "convert":
        from lit_xf.convert.cli import main as convert_main  # imports torch only once it has parsed

        return convert_main(args[1:])
    if args and args[0] == "estimate":
        return importlib.import_module("lit_xf.estimate_cli").main(args[1:])
    if args and args[0] == "prepare":
        try:
            return _prepare_main(args[1:])
        except (ValueError, OSError, TypeError) as err:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            from lit_xf.cli_guard import error_message

            print(f"{PROG}: error: {error_message(err)}", file=sys.stderr)
            return 1
    if args and args[0] == "generate":
        setup_logging()
        return importlib.import_module("lit_xf.generate").main(args[1:])
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from lit_xf.cli_guard import error_message
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
    except (ValueError, OSError, MisconfigurationException) as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"{PROG}: error: {error_message(err)}", file=sys.stderr)
        return 1
    except sys.modules["torch"].OutOfMemoryError as err:  # explained by LitXfCLI (lit_xf.memory_report)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        report = getattr(err, "lit_xf_report", None) or " ".join(str(err).split())
        print(f"{PROG}: error: {report}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
