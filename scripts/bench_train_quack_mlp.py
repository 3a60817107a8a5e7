"""``lit-xf bench`` with every ``GeluMLP`` on CUDA running quack's fused-epilogue GEMMs
(``quack.mlp.mlp_func``: bias + GELU in the first GEMM's epilogue, dGELU in the second's backward)
instead of torch's. An experiment, not a lit_xf option: the arguments are ``lit-xf bench``'s, e.g.

    python scripts/bench_train_quack_mlp.py train --config configs/gpt2_124m.yaml --steps 100 \
        --warmup-steps 40 --profile-steps 30:34 --variants lit_xf+compile

quack must live in a ``site-packages`` directory (see scripts/gelu_mlp_probe.py).
"""

import sys

from quack.mlp import mlp_func

from lit_xf import bench
from lit_xf.model import GeluMLP

_torch_forward = GeluMLP.forward


def _quack_forward(self: GeluMLP, x):
    if not x.is_cuda:
        return _torch_forward(self, x)
    return mlp_func(x, self.fc1.weight, self.fc2.weight, "gelu_tanh_approx", self.fc1.bias, self.fc2.bias)


if __name__ == "__main__":
    GeluMLP.forward = _quack_forward
    raise SystemExit(bench.main(sys.argv[1:]))
