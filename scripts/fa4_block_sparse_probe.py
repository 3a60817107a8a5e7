"""Short packed documents through FlashAttention-4, per call (docs/benchmarks.md §4): lit_xf's
grouped varlen plan against its block-sparse plan (the batch as one sequence under FA4's block
sparsity, ``fa4_block_sparse``), both through lit_xf's custom ops, with errors against fp32 sdpa.

Usage: python scripts/fa4_block_sparse_probe.py OUT.json  (one Hopper GPU, flash-attn-4 installed)."""

import json
import math
import statistics
import sys

import torch

from lit_xf.attention import DocLayout, fa4_backward, fa4_forward, fa4_varlen
from lit_xf.bench import queued_gpu_ms, time_call


def timings_ms(fn, calls: int = 20) -> dict:
    """Per call: ``gpu`` (the calls queued behind a GPU sleep, so the host never paces them),
    ``host`` (the host's time to issue one) and ``paced`` (median of calls timed one by one, which
    the host paces when it is the slower)."""
    for _ in range(3):
        fn()
    paced = [time_call(fn, torch.device("cuda")) for _ in range(calls)]
    gpu, host = queued_gpu_ms(fn, calls)
    return dict(gpu=round(gpu, 3), host=round(host, 3), paced=round(statistics.median(paced), 3))


def main(out_path: str) -> None:
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

    qkv = torch.cat((q, k, v), dim=2)  # the projection's stack, [B, T, 3H, K]
    stacks = (
        ("grouped", qkv.reshape(B * T, 3 * H, K), dout.reshape(B * T, H, K)),  # [N] tokens
        ("block_sparse", qkv.reshape(1, B * T, 3 * H, K), dout.reshape(1, B * T, H, K)),
    )  # one sequence
    for name, qkvx, dx in stacks:
        plan = fa4_varlen(layout, name).to(dev)
        fwd = lambda: fa4_forward(qkvx, H, plan.cu_seqlens, plan.seg_pos, T, True, list(plan.blocks), 0)  # noqa: E731,B023
        out, lse = fwd()
        bwd_inputs = (dx, qkvx, out, lse)
        if plan.blocks:  # as lit_xf's autograd does: the backward over the grouped [N] tokens
            bwd_inputs = tuple(t[0] for t in bwd_inputs)
        dout_, qkv_, out_, lse_ = bwd_inputs
        bwd = lambda: fa4_backward(dout_, qkv_, H, out_, lse_, plan.cu_seqlens, plan.seg_pos, T, True, 0)  # noqa: E731,B023
        res[name] = dict(
            errors=errors(out.view(B, T, H, K), bwd().split(H, dim=-2)),
            fwd_ms=timings_ms(fwd),
            bwd_ms=timings_ms(bwd),
            fwd_bwd_ms=timings_ms(lambda: (fwd(), bwd())),  # noqa: B023
        )
        if plan.blocks:
            res[name] |= dict(masked_blocks=int(plan.blocks[0].sum()), unmasked_blocks=int(plan.blocks[2].sum()))
    print(json.dumps(res, indent=1))
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
