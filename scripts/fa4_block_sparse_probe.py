"""Short packed documents through FlashAttention-4 two ways, per call (docs/benchmarks.md §4):
lit_xf's grouped varlen plan, and the batch flattened to one sequence with FA4's block sparsity
(partial blocks masked by ``lit_xf.fa4_mask.segment_causal``, full blocks unmasked).

Usage: python scripts/fa4_block_sparse_probe.py OUT.json  (one Hopper GPU, flash-attn-4 installed)."""

import json
import math
import statistics
import sys
import time

import torch

from lit_xf.attention import DocLayout, fa4_backward, fa4_forward, fa4_varlen


def block_classes(seg_ids: torch.Tensor, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-decreasing segment ids [S] of one sequence -> (partial, full) bool [S/m, S/n]: blocks of
    query rows × key columns where some / every pair is visible (key ≤ query, same segment)."""
    n_q, n_k = seg_ids.numel() // m, seg_ids.numel() // n
    q, k = seg_ids.view(n_q, m), seg_ids.view(n_k, n)
    qf, ql, kf, kl = q[:, 0], q[:, -1], k[:, 0], k[:, -1]
    i = torch.arange(n_q, device=seg_ids.device)[:, None]
    j = torch.arange(n_k, device=seg_ids.device)[None, :]
    visible = (j * n <= (i + 1) * m - 1) & (kf[None, :] <= ql[:, None]) & (qf[:, None] <= kl[None, :])
    one_segment = (qf == ql)[:, None] & (kf == kl)[None, :] & (qf[:, None] == kf[None, :])
    full = ((j + 1) * n - 1 <= i * m) & one_segment
    return visible & ~full, full


def _packed(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] bool -> counts [1, 1, R] and indices [1, 1, R, C] (selected columns first, ascending)."""
    idx = torch.argsort((~dense).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return dense.sum(-1).to(torch.int32)[None, None].contiguous(), idx[None, None].contiguous()


def sparse_tensors(partial, full, block, transpose=False):
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    if transpose:  # the backward walks query blocks per key block
        partial, full = partial.T, full.T
    return BlockSparseTensorsTorch(*_packed(partial), *_packed(full), block_size=block)


def median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


def main(out_path: str) -> None:
    from flash_attn.cute import flash_attn_func
    from flash_attn.cute.interface import _flash_attn_bwd

    from lit_xf.fa4_mask import segment_causal

    B, T, H, K = 16, 2048, 12, 64
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(B):  # log-normal lengths like the corpus' BPE documents (mean ~34, longest 273)
        row, left = [], T
        while left > 0:
            n = min(left, int(min(273, max(1, math.exp(3.1 + 0.9 * torch.randn(1, generator=g).item())))))
            row.append(n)
            left -= n
        rows.append(row)
    layout = DocLayout(rows, T)
    lens = [n for r in rows for n in r]
    workload = dict(B=B, T=T, H=H, K=K, docs=len(lens), mean=round(sum(lens) / len(lens), 1), longest=max(lens))
    res = {"workload": workload}
    dev = torch.device("cuda")
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(B, T, H, K, device=dev, dtype=torch.bfloat16) for _ in range(4))

    mask = layout.dense_mask(dev)[:, None]
    qr, kr, vr = (t.float().transpose(1, 2).requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask)
    ref.backward(dout.float().transpose(1, 2))
    ref_out, ref_grads = ref.detach().transpose(1, 2), [t.grad.transpose(1, 2) for t in (qr, kr, vr)]

    def errors(out, grads):
        pairs = zip(("dq", "dk", "dv"), grads, ref_grads, strict=True)
        return dict(out=round((out.float() - ref_out).abs().max().item(), 4)) | {
            name: round((grad.view(B, T, H, K).float() - r).abs().max().item(), 4) for name, grad, r in pairs
        }

    varlen = fa4_varlen(layout, "grouped").to(dev)
    qn, kn, vn, dn = (t.reshape(B * T, H, K) for t in (q, k, v, dout))
    fwd = lambda: fa4_forward(qn, kn, vn, varlen.cu_seqlens, varlen.seg_pos, T, True, [])  # noqa: E731
    out, lse = fwd()
    bwd = lambda: fa4_backward(dn, qn, kn, vn, out, lse, varlen.cu_seqlens, varlen.seg_pos, T, True, [])  # noqa: E731
    res["grouped_varlen"] = dict(
        errors=errors(out.view(B, T, H, K), bwd()), fwd_ms=median_ms(fwd), bwd_ms=median_ms(bwd),
        fwd_bwd_ms=median_ms(lambda: (fwd(), bwd())),
    )

    seg = (layout.segment_ids() + torch.arange(B)[:, None] * T).reshape(-1).to(dev)  # ids unique per row
    pos = layout.position_ids().reshape(-1).to(torch.int32).to(dev)
    q1, k1, v1, d1 = (t.reshape(1, B * T, H, K) for t in (q, k, v, dout))
    for block in ((128, 128), (256, 128)):
        t0 = time.perf_counter()
        partial, full = block_classes(seg, *block)
        fwd_t, bwd_t = sparse_tensors(partial, full, block), sparse_tensors(partial, full, block, transpose=True)
        torch.cuda.synchronize()
        build_ms = (time.perf_counter() - t0) * 1e3
        kw = dict(causal=False, mask_mod=segment_causal, aux_tensors=[pos])
        fwd = lambda: flash_attn_func(q1, k1, v1, block_sparse_tensors=fwd_t, return_lse=True, **kw)[:2]  # noqa: E731,B023
        out, lse = fwd()
        bwd = lambda: _flash_attn_bwd(q1, k1, v1, out, d1, lse, block_sparse_tensors=bwd_t, **kw)[:3]  # noqa: E731,B023
        res[f"flat_block_sparse_{block[0]}x{block[1]}"] = dict(
            build_ms=round(build_ms, 2), partial_blocks=int(partial.sum()), full_blocks=int(full.sum()),
            errors=errors(out.view(B, T, H, K), bwd()), fwd_ms=median_ms(fwd), bwd_ms=median_ms(bwd),
            fwd_bwd_ms=median_ms(lambda: (fwd(), bwd())),  # noqa: B023
        )
    print(json.dumps(res, indent=1))
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
