"""``lit-xf bench curves``: TensorBoard runs' per-step memory, step time, throughput and attention
share side by side in one PNG, with each run's medians after its first tenth of steps."""

from __future__ import annotations

import statistics
from pathlib import Path

CURVE_TAGS = ("memory/peak_allocated_mib", "time/step_ms", "throughput/real_tokens_per_s", "time/attention_share")


def read_scalars(logdir: Path, tags=CURVE_TAGS) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TensorBoard event files under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    have = set(acc.Tags().get("scalars", []))
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags if t in have}


def _run_name(logdir: str) -> str:
    """A run's name: its folder, or the folder above a Lightning ``version_N``."""
    path = Path(logdir)
    return path.parent.name if path.name.startswith("version_") else path.name


def bench_curves(args) -> list[dict]:
    """Per-step curves of several runs in one PNG, and each run's medians (after the first steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {_run_name(d): read_scalars(Path(d)) for d in args.logdirs}
    fig, axes = plt.subplots(1, len(CURVE_TAGS), figsize=(5 * len(CURVE_TAGS), 3.6))
    rows = []
    for name, scalars in runs.items():
        row = {"run": name}
        for ax, tag in zip(axes, CURVE_TAGS, strict=True):
            pts = scalars.get(tag, [])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "." if len(pts) < 20 else "-", label=name)
                row[tag] = round(statistics.median(v for _, v in pts[len(pts) // 10 :]), 3)
                if tag.startswith("time/step"):  # keep the first (compiling) steps from flattening the rest
                    ax.set_ylim(0, 3 * max(row[tag] for row in rows + [row] if row.get(tag)))
            ax.set_title(tag)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        rows.append(row)
    axes[0].legend()
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out / f"{args.name or 'curves'}.png", dpi=110)
    plt.close(fig)
    return rows
