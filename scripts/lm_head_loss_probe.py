"""Output projection + cross-entropy, forward and backward, on the GPT-2 124M step's shape: the
compiled loss on materialized logits (``compiled_token_cross_entropy``) against the fused
``linear_cross_entropy`` at several kernel settings. Errors against an fp32 reference.

    python scripts/lm_head_loss_probe.py OUT.json [--tokens 32768 --dim 768 --vocab 50304]
"""

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from lit_xf import loss as L
from lit_xf.bench import environment, measure


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--settings", default="8192:16,8192:8,4096:8,4096:4,16384:16,2048:4")
    args = p.parse_args(argv)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    h32 = torch.randn(args.tokens, args.dim, device=dev, generator=gen)
    w32 = torch.randn(args.vocab, args.dim, device=dev, generator=gen) * 0.05
    labels = torch.randint(0, args.vocab, (args.tokens,), device=dev, generator=gen)
    labels[::17] = L.IGNORE_INDEX

    def grads(loss_of):
        h, w = h32.clone().requires_grad_(), w32.clone().requires_grad_()
        loss = loss_of(h, w)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    ref = grads(lambda h, w: F.cross_entropy(h @ w.t(), labels, ignore_index=L.IGNORE_INDEX))

    def compiled(h, w):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return L.compiled_token_cross_entropy(F.linear(h, w)[None], labels[None])

    def fused(h, w):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            parts = L.linear_cross_entropy(h[None], w, labels[None])
            return parts.nll_sum / parts.real

    def err(got):
        return {
            name: float((g - r).abs().max() / r.abs().max())
            for name, g, r in zip(("loss", "dh", "dw"), got, ref, strict=True)
        }

    h, w = h32.clone().requires_grad_(), w32.clone().requires_grad_()
    rows = []
    for name, fn, settings in [("compiled loss on logits", compiled, [None])] + [
        ("fused", fused, args.settings.split(","))
    ]:
        for setting in settings:
            if setting:
                L.CE_BLOCK, L.CE_WARPS = map(int, setting.split(":"))
            ms, peak = measure(lambda fn=fn: fn(h, w).backward(), dev, warmup=3, reps=20)
            rows.append(dict(variant=name, setting=setting, ms=round(ms, 3), peak_mib=round(peak), err=err(grads(fn))))
            print(rows[-1], flush=True)
    hidden = h32.to(torch.bfloat16) @ w32.to(torch.bfloat16).t()
    z = hidden.clone()
    kernel_ms, _ = measure(lambda: L._nll_and_grad_in_place(z.copy_(hidden), labels), dev, reps=20)
    copy_ms, _ = measure(lambda: z.copy_(hidden), dev, reps=20)
    rows.append(dict(variant="kernel alone (minus a copy of the logits)", ms=round(kernel_ms - copy_ms, 3)))
    print(rows[-1])
    json.dump({"meta": environment() | {"command": " ".join(sys.argv)}, "rows": rows}, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
