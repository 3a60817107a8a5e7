"""What a benchmark run leaves: a progress line per row, the Markdown table printed last,
``<name>.json`` (rows and run metadata) and ``<name>.csv`` under ``--out``, the attention plot,
and the software environment the run recorded."""

from __future__ import annotations

import csv
import datetime
import json
import sys
from pathlib import Path

import torch


def progress(row: dict) -> None:
    """Print one result row as ``key=value`` pairs, leaving out empty values."""
    print("  " + " ".join(f"{k}={v}" for k, v in row.items() if v not in (None, "")), flush=True)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table, one column per key in first-seen order."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_outputs(rows: list[dict], out: Path, name: str, meta: dict) -> None:
    """``<out>/<name>.json`` ({"meta", "rows"}) and ``<out>/<name>.csv``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)


def plot_attention(rows: list[dict], path: Path, title: str) -> None:
    """fwd+bwd ms and peak MiB against sequence length, one line per kernel (log-log), to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ms, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        pts = [r for r in rows if r["kernel"] == kernel and r.get("ms")]
        if pts:
            ax_ms.plot([r["seq_len"] for r in pts], [r["ms"] for r in pts], "o-", label=kernel)
            mem = [r for r in pts if r.get("peak_mib")]
            if mem:
                ax_mem.plot([r["seq_len"] for r in mem], [r["peak_mib"] for r in mem], "o-", label=kernel)
    for ax, ylabel in ((ax_ms, "fwd+bwd ms"), (ax_mem, "peak MiB (CUDA only)")):
        ax.set_xscale("log", base=2)
        if ax.lines:
            ax.set_yscale("log")
            ax.legend()
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    """The run's date (UTC), versions of torch, CUDA, Python and xformers, and the GPU's name when there is one."""
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name()
    try:
        import xformers

        meta["xformers"] = xformers.__version__
    except Exception:
        pass
    return meta
