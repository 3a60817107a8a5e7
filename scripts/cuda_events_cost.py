"""Host cost of recording CUDA events between CUDA-graph replays or eager launches (docs/benchmarks.md §5).

Usage: python scripts/cuda_events_cost.py OUT.json  (one CUDA GPU; prints medians of 3 runs)."""

import json
import statistics
import sys
import time

import torch

dev = torch.device("cuda")
s = torch.cuda.Stream()
x = torch.ones(64, device=dev)


def work():
    y = x
    for _ in range(40):
        y = y * 1.0001 + 0.0
    return y


torch.cuda.synchronize()
g = torch.cuda.CUDAGraph()
with torch.cuda.stream(s):
    for _ in range(3):
        work()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        out = work()
torch.cuda.synchronize()
stream = torch.cuda.current_stream()
evs = [torch.cuda.Event(enable_timing=True) for _ in range(4096)]
evs_nt = [torch.cuda.Event(enable_timing=False) for _ in range(4096)]


def run(kind, n_ev, timing=True, eager=False, iters=1500):
    pool = evs if timing else evs_nt
    t_launch = t_rec = 0
    k = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter_ns()
    for i in range(iters):
        a = time.perf_counter_ns()
        if eager:
            work()
        else:
            g.replay()
        b = time.perf_counter_ns()
        t_launch += b - a
        for _ in range(n_ev):
            pool[k % 4096].record(stream)
            k += 1
        t_rec += time.perf_counter_ns() - b
        if i % 200 == 199:
            torch.cuda.synchronize()  # keep the queue short
    torch.cuda.synchronize()
    wall = time.perf_counter_ns() - t0
    return dict(
        kind=kind,
        events=n_ev,
        timing=timing,
        launch_us=round(t_launch / iters / 1e3, 2),
        record_us=round(t_rec / iters / 1e3, 2),
        wall_us=round(wall / iters / 1e3, 2),
    )


rows = []
for _repeat in range(3):
    for eager in (False, True):
        for n_ev, timing in ((0, True), (1, True), (4, True), (4, False)):
            rows.append(run("eager" if eager else "graph", n_ev, timing, eager))
agg = {}
for r in rows:
    agg.setdefault((r["kind"], r["events"], r["timing"]), []).append(r)
res = []
for key, rs in agg.items():
    res.append(
        dict(
            kind=key[0],
            events=key[1],
            timing=key[2],
            **{m: statistics.median(r[m] for r in rs) for m in ("launch_us", "record_us", "wall_us")},
        )
    )
    print(res[-1])
json.dump(res, open(sys.argv[1], "w"), indent=1)
