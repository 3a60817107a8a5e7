"""``lit-xf bench compare NEW [--against docs/results]``: every figure of a rerun against the
committed results, and a non-zero exit where one regressed beyond its noise band.

Rows of two results files with one name are matched by their identity fields (``IDENTITY``:
kernel, variant, mode, dtype, shape, ...). Each metric present in both (``METRICS``) is compared as
the ratio new / old, with its direction (lower or higher is better) and its band:

    moved      |ratio - 1| > band
    regressed  moved the wrong way, or a correctness row that passed and does not now

The band of a timing is ``--time-band`` (default 5%: ``ms`` medians of one process; the same
case in separate processes on one H200 differs by a few percent), widened to the old row's own
spread where it recorded one (``ms_range``, the runs of ``--repeats``; for the step time and the
rates derived from it): a new median inside the old range is noise. Memory has
``--memory-band`` (default 2%, the allocator's rounding and workspace sizes). Figures of one
deterministic run (``final_loss``, errors) are not compared: correctness rows compare their
``status``.

Files and rows present on one side only are listed, not failed: a new benchmark is not a
regression, and a rerun of part of the figures compares that part.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

IDENTITY = (
    "kernel", "variant", "mode", "dtype", "precision", "mask", "causal", "alibi", "window", "seq_len", "batch",
    "heads", "kv_heads", "head_dim", "docs",
)  # fmt: skip
# metric: (+1 higher is better, -1 lower is better; the band's kind)
METRICS = {
    "ms": (-1, "time"),
    "gpu_ms": (-1, "time"),
    "ms_per_step": (-1, "time"),
    "tflops": (+1, "time"),
    "tokens_per_s": (+1, "time"),
    "real_tokens_per_s": (+1, "time"),
    "mfu": (+1, "time"),
    "auto_vs_best": (-1, "time"),
    "peak_mib": (-1, "memory"),
}
DEFAULT_BANDS = {"time": 0.05, "memory": 0.02}
_FROM_STEP_TIME = ("ms_per_step", "tokens_per_s", "real_tokens_per_s", "mfu")


@dataclass(frozen=True)
class Change:
    file: str
    row: str  # the identity fields, "kernel=fa4 mode=packed ..."
    metric: str
    old: float | str
    new: float | str
    ratio: float | None
    band: float | None
    regressed: bool

    def line(self) -> str:
        verdict = "REGRESSED" if self.regressed else "improved"
        if self.ratio is None:
            return f"{verdict:9}  {self.file}: {self.row}: {self.metric} {self.old} -> {self.new}"
        return (
            f"{verdict:9}  {self.file}: {self.row}: {self.metric} {self.old} -> {self.new} "
            f"({self.ratio:.3f}x, band ±{self.band:.1%})"
        )


def identity(row: dict) -> str:
    return " ".join(f"{k}={row[k]}" for k in IDENTITY if row.get(k) not in (None, ""))


def _range_band(old_row: dict, old: float) -> float:
    """The relative half-width of the old row's run-to-run spread (``ms_range`` "lo-hi"), or 0."""
    lo, sep, hi = str(old_row.get("ms_range") or "").partition("-")
    try:
        return max(float(hi) - old, old - float(lo)) / old if sep else 0.0
    except ValueError:
        return 0.0


def compare_rows(file: str, old_rows: list[dict], new_rows: list[dict], bands: dict) -> tuple[list[Change], list[str]]:
    """(the figures that moved beyond their band, the rows on one side only)."""
    old_by_id = {identity(r): r for r in old_rows}
    new_by_id = {identity(r): r for r in new_rows}
    unmatched = [f"{file}: only in old: {i}" for i in old_by_id if i not in new_by_id]
    unmatched += [f"{file}: only in new: {i}" for i in new_by_id if i not in old_by_id]
    changes = []
    for rid, new in new_by_id.items():
        old = old_by_id.get(rid)
        if old is None:
            continue
        if "status" in old and "status" in new and old["status"] != new["status"]:
            changes.append(
                Change(file, rid, "status", old["status"], new["status"], None, None, old["status"] == "pass")
            )
        for metric, (better, kind) in METRICS.items():
            a, b = old.get(metric), new.get(metric)
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (a, b)):
                continue
            if a <= 0 or b <= 0:
                continue
            band = bands[kind]
            if metric in _FROM_STEP_TIME:  # one run's step time, as a rate too
                band = max(band, _range_band(old, old["ms_per_step"]) if old.get("ms_per_step") else 0.0)
            ratio = b / a
            if abs(ratio - 1) > band:
                changes.append(Change(file, rid, metric, a, b, ratio, band, (ratio - 1) * better < 0))
    return changes, unmatched


def _rows(path: Path) -> list[dict] | None:
    """A results file's rows, or None where it holds none (a file of another shape)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: can't read results file {path}: {e}") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    return rows if isinstance(rows, list) and all(isinstance(r, dict) for r in rows) else None


def compare_dirs(new_dir: Path, old_dir: Path, bands: dict) -> tuple[list[Change], list[str], int]:
    """(changes, notes, files compared) for every ``*.json`` of ``new_dir`` with rows."""
    changes, notes, compared = [], [], 0
    for new_path in sorted(new_dir.rglob("*.json")):
        new_rows = _rows(new_path)
        if new_rows is None:
            continue
        old_path = old_dir / new_path.name
        if not old_path.exists():
            notes.append(f"{new_path.name}: new file, nothing committed to compare with")
            continue
        old_rows = _rows(old_path)
        if old_rows is None:
            notes.append(f"{new_path.name}: the committed file has no rows")
            continue
        found, unmatched = compare_rows(new_path.name, old_rows, new_rows, bands)
        changes += found
        notes += unmatched
        compared += 1
    return changes, notes, compared


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("new", type=Path, help="folder of the rerun's results files (e.g. scripts/gpu_figures.sh's OUTDIR)")
    sp.add_argument(
        "--against", type=Path, default=Path("docs/results"), help="committed results (default: docs/results)"
    )
    sp.add_argument("--time-band", type=float, default=DEFAULT_BANDS["time"], help="default: %(default)s")
    sp.add_argument("--memory-band", type=float, default=DEFAULT_BANDS["memory"], help="default: %(default)s")


def bench_compare(args: argparse.Namespace) -> int:
    """Print the moved figures and one summary line; 1 where any regressed (or nothing compared)."""
    for folder in (args.new, args.against):
        if not folder.is_dir():
            raise SystemExit(f"error: {folder} is not a folder of results files")
    bands = {"time": args.time_band, "memory": args.memory_band}
    changes, notes, compared = compare_dirs(args.new, args.against, bands)
    for note in notes:
        print(f"note       {note}")
    for change in sorted(changes, key=lambda c: not c.regressed):
        print(change.line())
    regressed = sum(c.regressed for c in changes)
    print(
        f"{compared} files compared: {len(changes)} figures moved beyond their band, {regressed} regressed "
        f"(time band ±{bands['time']:.0%}, memory ±{bands['memory']:.0%})"
    )
    if not compared:
        print(f"error: no results file of {args.new} has a committed counterpart in {args.against}")
        return 1
    return 1 if regressed else 0
