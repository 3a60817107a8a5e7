"""``lit-xf bench packing``: the same documents padded to the longest (one per row) vs packed into
one row, per kernel: fwd+bwd time, real tokens per second, and the time to build the mask of a
new batch of the same shape.

Document lengths are log-normal (σ = 1) with the given mean, clipped to [1, max_len].
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from lit_xf.attention import DocLayout, alibi_slopes, make_kernel
from lit_xf.bench.attention import DTYPES, run_case
from lit_xf.bench.output import progress
from lit_xf.bench.timing import sync


def lognormal_doc_lens(n_docs: int, mean: float, max_len: int, seed: int = 0) -> list[int]:
    """Log-normal document lengths (σ = 1, μ = ln(mean) − σ²/2) with the given mean, clipped to [1, max_len]."""
    g = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(mean) - sigma**2 / 2
    lens = torch.exp(mu + sigma * torch.randn(n_docs, generator=g)).round().clamp(1, max_len)
    return [int(n) for n in lens]


def _packing_layout(mode: str, lens: list[int], window: int | None) -> DocLayout:
    """``padded``: one document per row, padded to the longest; ``packed``: all in one row."""
    if mode == "padded":
        return DocLayout([[n] for n in lens], max(lens), window=window)
    return DocLayout([lens], sum(lens), window=window)


def bench_packing(args) -> list[dict]:
    """One row per mode (``--modes``) × kernel on ``--docs`` log-normal documents."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    lens = lognormal_doc_lens(args.docs, args.mean_len, args.max_len, args.seed)
    layouts = {mode: _packing_layout(mode, lens, args.window) for mode in ("padded", "packed")}
    real = sum(lens)
    rows = []
    for mode in args.modes:
        layout = layouts[mode]
        for name in args.kernels:
            row = dict(
                mode=mode,
                kernel=name,
                docs=len(lens),
                real_tokens=real,
                row_tokens=layout.batch_size * layout.seq_len,
                heads=args.heads,
                kv_heads=args.kv_heads,
                alibi=args.alibi,
                window=args.window,
            )
            res = run_case(name, layout, args, dtype, device)
            if res.get("ms"):
                res["real_tokens_per_s"] = round(real / (res["ms"] * 1e-3))
                res["new_batch_prepare_ms"] = _new_batch_prepare_ms(name, lens, mode, args, dtype, device)
            row.update(res)
            rows.append(row)
            progress(row)
    return rows


def _new_batch_prepare_ms(name, lens, mode, args, dtype, device, batches: int = 5) -> float:
    """Median time to build the mask of a *new* batch of the same shape (documents reordered):
    what each training step pays, recompilation included."""
    kernel = make_kernel(name)
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(batches + 1):
        order = [lens[i] for i in torch.randperm(len(lens), generator=g)]
        layout = _packing_layout(mode, order, args.window)
        pos = layout.position_ids(device)
        slopes = alibi_slopes(args.heads).to(device) if args.alibi else None
        sync(device)
        t0 = time.perf_counter()
        kernel.prepare(
            layout, pos, slopes, n_heads=args.heads, n_kv_heads=args.kv_heads or args.heads, dtype=dtype, device=device
        )
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times[1:]), 3)
