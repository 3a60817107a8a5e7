"""A self-contained HTML page of a CUDA memory snapshot: no script, no network, any browser.

PyTorch's own view (``torch.cuda._memory_viz.trace_plot``) embeds the snapshot but loads its
viewer (``MemoryViz.js``) from a CDN, so it needs a network connection when opened. This page
draws what matters for an out-of-memory error with inline SVG and tables only: allocated bytes
over the recorded allocator events (the peak and any OOM event marked) and the largest live
allocations at the peak with the Python frames that made them.

Input: the dict of ``torch.cuda.memory._snapshot()`` (``segments`` with their ``blocks``,
``device_traces`` with ``alloc`` / ``free_completed`` / ``oom`` events), pure data; this module
imports nothing from torch.
"""

from __future__ import annotations

import html

__all__ = ["timeline", "timeline_html"]

_POINTS = 1500  # polyline points at most


def _live_at_end(snapshot: dict) -> int:
    return sum(
        b.get("size", 0)
        for seg in snapshot.get("segments", [])
        for b in seg.get("blocks", [])
        if str(b.get("state", "")).startswith("active")
    )


def _events(snapshot: dict, device: int | None) -> list[dict]:
    traces = snapshot.get("device_traces", [])
    if device is not None:
        return list(traces[device]) if device < len(traces) else []
    return max(traces, key=len, default=[])


def timeline(snapshot: dict, device: int | None = None) -> dict:
    """Allocated bytes after each event, the peak's index, OOM events and the live set at the peak.

    The bytes live before recording began are inferred: live at the end − the trace's net change.
    Returns ``{"bytes": [...], "peak_index", "peak_bytes", "ooms": [(index, event)], "live_at_peak":
    [(size, frames)] largest first}``."""
    events = _events(snapshot, device)
    net = sum(
        e["size"] if e["action"] == "alloc" else -e["size"]
        for e in events
        if e["action"] in ("alloc", "free_completed")
    )
    level = max(_live_at_end(snapshot) - net, 0)
    series, ooms = [], []
    peak_index, peak = -1, level
    for i, e in enumerate(events):
        action = e.get("action")
        if action == "alloc":
            level += e["size"]
        elif action == "free_completed":
            level -= e["size"]
        elif action == "oom":
            ooms.append((i, e))
        series.append(level)
        if level > peak:
            peak, peak_index = level, i
    live: dict[int, tuple[int, list]] = {}
    for e in events[: peak_index + 1]:
        if e.get("action") == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
        elif e.get("action") == "free_completed":
            live.pop(e["addr"], None)
    return {
        "bytes": series,
        "peak_index": peak_index,
        "peak_bytes": peak,
        "ooms": ooms,
        "live_at_peak": sorted(live.values(), key=lambda sf: -sf[0]),
    }


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def _frames(frames: list, n: int = 4) -> str:
    """The innermost ``n`` frames outside torch's own files, 'file:line name' each."""
    own = [f for f in frames if "/torch/" not in str(f.get("filename", ""))] or frames
    return "<br>".join(
        html.escape(f"{f.get('filename', '?')}:{f.get('line', '?')} {f.get('name', '')}") for f in own[:n]
    )


def timeline_html(snapshot: dict, title: str = "CUDA memory", top: int = 25, device: int | None = None) -> str:
    """The page (a string): the timeline as SVG, then the ``top`` largest allocations live at the peak."""
    t = timeline(snapshot, device)
    series = t["bytes"] or [0]
    step = max(1, -(-len(series) // _POINTS))
    buckets = [max(series[i : i + step]) for i in range(0, len(series), step)]
    hi = max(max(buckets), 1)
    width, height = 1000, 300
    xs = [width * i / max(len(buckets) - 1, 1) for i in range(len(buckets))]
    points = " ".join(f"{x:.1f},{height - height * b / hi:.1f}" for x, b in zip(xs, buckets, strict=True))
    marks = []
    for index, event in t["ooms"]:
        x = width * (index // step) / max(len(buckets) - 1, 1)
        marks.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height}" stroke="red" stroke-width="2"/>')
        marks.append(f'<text x="{x + 4:.1f}" y="14" fill="red">OOM ({_gib(event.get("size", 0))} asked)</text>')
    if t["peak_index"] >= 0:
        x = width * (t["peak_index"] // step) / max(len(buckets) - 1, 1)
        marks.append(f'<circle cx="{x:.1f}" cy="{height - height * t["peak_bytes"] / hi:.1f}" r="4" fill="orange"/>')
    rows = "".join(
        f"<tr><td>{_gib(size)}</td><td>{_frames(frames)}</td></tr>" for size, frames in t["live_at_peak"][:top]
    )
    oom_text = f"{len(t['ooms'])} OOM event(s) marked in red. " if t["ooms"] else ""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1em}} td{{vertical-align:top;padding:2px 8px;border-bottom:1px solid #ddd;
font-family:monospace;font-size:12px}} svg{{border:1px solid #999;background:#fafafa}}</style></head><body>
<h2>{html.escape(title)}</h2>
<p>Allocated bytes over {len(series)} recorded allocator events (y: 0 to {_gib(hi)}); peak {_gib(t["peak_bytes"])}
(orange). {oom_text}Stacks are recorded only when the snapshot was taken with them.</p>
<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">
<polyline fill="none" stroke="steelblue" stroke-width="1.5" points="{points}"/>{"".join(marks)}</svg>
<h3>Largest allocations live at the peak</h3>
<table><tr><th>size</th><th>made by (innermost frames outside torch)</th></tr>{rows}</table>
</body></html>
"""
