"""Host time of FA4's block-sparse plan (``lit_xf.attention.fa4_block_sparse``) per packed batch:
lognormal documents (mean 33 tokens, as in the 124M config's corpus) filled into B rows of T
tokens, the best of 5 builds. CPU only, no GPU needed.

    python scripts/fa4_plan_host_time.py [--shapes 16x2048,64x2048,64x8192,128x8192]
"""

import argparse
import time

from lit_xf.attention import fa4_block_sparse
from lit_xf.bench import lognormal_doc_lens


def packed_segments(rows: int, seq_len: int, mean: float = 33.0) -> list[int]:
    """Document lengths filled greedily into ``rows`` rows of ``seq_len``; a row's tail is one more segment."""
    out, row = [], []
    for n in lognormal_doc_lens(rows * seq_len // 10, mean, seq_len, seed=0):
        if sum(row) + n > seq_len:
            out.append(row + ([seq_len - sum(row)] if sum(row) < seq_len else []))
            row = []
            if len(out) == rows:
                break
        row.append(n)
    return [n for r in out for n in r]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="16x2048,64x2048,64x8192,128x8192")
    args = p.parse_args(argv)
    print("| rows × T | tokens | segments | key blocks | plan ms |\n|---|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        rows, seq_len = map(int, shape.split("x"))
        segments = packed_segments(rows, seq_len)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            plan = fa4_block_sparse(segments)
            times.append(time.perf_counter() - start)
        blocks = plan.blocks[0].shape[-1]
        print(f"| {rows} × {seq_len} | {sum(segments)} | {len(segments)} | {blocks} | {min(times) * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
