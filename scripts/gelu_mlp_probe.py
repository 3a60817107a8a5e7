"""GPT-2's GELU MLP, forward and backward, on the 124M step's shape (32768 tokens, 768 → 3072 →
768, bf16 autocast): torch (eager, compiled) against quack's GEMMs with the GELU fused into their
epilogues (``quack.mlp.mlp_func``: bias + GELU after the first GEMM, dGELU after the second's
input-gradient GEMM). GPU time per call (``queued_gpu_ms``), host time per call, and errors
against a float64 reference.

    python scripts/gelu_mlp_probe.py OUT.json

quack (``quack-kernels``, installed with flash-attn-4) must live in a ``site-packages`` directory:
its epilogue keying treats code elsewhere (e.g. ``pip install --target /tmp/x``) as user code and
fails on cutlass-dsl's module globals with a TypeError.
"""

import argparse
import functools
import json
import time
import traceback

import torch
import torch.nn.functional as F

from lit_xf.bench import environment, queued_gpu_ms, rel_err
from lit_xf.model import GeluMLP


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--dim", type=int, default=768)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    mlp = GeluMLP(args.dim).cuda()
    with torch.no_grad():
        for b in (mlp.fc1.bias, mlp.fc2.bias):
            b.normal_(0, 0.02)
    x = torch.randn(args.tokens, args.dim, device="cuda", requires_grad=True)
    dy = torch.randn(args.tokens, args.dim, device="cuda")

    def quack_mlp(x, tuned=True):
        from quack.mlp import mlp_func

        return mlp_func(x, mlp.fc1.weight, mlp.fc2.weight, "gelu_tanh_approx", mlp.fc1.bias, mlp.fc2.bias, tuned=tuned)

    variants = {
        "torch_eager": mlp,
        "torch_compiled": torch.compile(mlp),
        "quack_tuned": quack_mlp,
        "quack_untuned": lambda x: quack_mlp(x, tuned=False),
        "quack_compiled": torch.compile(quack_mlp, fullgraph=True),
    }
    y64, grads64 = _reference(mlp, x, dy)

    def step(fn):
        for t in (x, *mlp.parameters()):
            t.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            y = fn(x)
        y.backward(dy)
        return y

    rows = {}
    for name, fn in variants.items():
        try:
            t0 = time.perf_counter()
            y = step(fn)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0  # compilation / autotuning included
            got = {"y": y, "dx": x.grad, **{k: mlp.get_parameter(k).grad for k in grads64 if k != "dx"}}
            errs = {k: float(f"{rel_err(got[k], ref):.2e}") for k, ref in {"y": y64, **grads64}.items()}
            for _ in range(3):
                step(fn)
            runs = [queued_gpu_ms(functools.partial(step, fn), calls=10) for _ in range(2)]
            gpu_ms, host_ms = (min(r[i] for r in runs) for i in (0, 1))  # best of two, each
            rows[name] = dict(first_s=round(first_s, 2), gpu_ms=round(gpu_ms, 4), host_ms=round(host_ms, 4))
            rows[name]["rel_err"] = errs
        except Exception:
            rows[name] = dict(error=traceback.format_exc()[-1500:])
        print(name, rows[name], flush=True)
    meta = environment() | dict(tokens=args.tokens, dim=args.dim, hidden=4 * args.dim)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


def _reference(mlp, x, dy):
    """float64 outputs and gradients (dx and every parameter's)."""
    params = {k: v.detach().double().requires_grad_() for k, v in mlp.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    h = F.linear(x64, params["fc1.weight"], params["fc1.bias"])
    y = F.linear(F.gelu(h, approximate="tanh"), params["fc2.weight"], params["fc2.bias"])
    y.backward(dy.double())
    return y, {"dx": x64.grad, **{k: v.grad for k, v in params.items()}}


if __name__ == "__main__":
    raise SystemExit(main())
