"""The batch's xformers bias on a GPU, end to end: built in the loader workers, moved with the batch,
taken by the model instead of rebuilt, and usable as is by a user's own xformers call.

    python scripts/data_bias_gpu_check.py --out data_bias_gpu.json      # a CUDA GPU with xformers

Per run (fortunes, packed rows of 512 tokens, 8 rows, 2 workers, xformers attention, bf16, no
window and a 64-token window): the bias type the training step received and its device, how often
the training process built a bias itself (``DocLayout.xformers_bias`` calls there; the workers'
calls happen in their own processes), and the first and last training losses. Then one batch
through ``xformers.ops.memory_efficient_attention(..., attn_bias=batch["attn_bias"])`` on random
q, k, v flattened to ``[1, B·T, H, K]`` against the float64 reference of its documents: the largest
error over the largest output, bf16. Exits 1 if the process built a bias, a loss is not finite,
or that error exceeds 16·2⁻⁸ (a few bf16 roundings).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import lightning as L
import torch

from lit_xf import GPTConfig, LitTinyGPT
from lit_xf.attention.layout import DocLayout
from lit_xf.attention.probes import import_xformers_ops
from lit_xf.attention.reference import reference_attention
from lit_xf.bench.output import environment
from lit_xf.data import TextDataModule

DATA = dict(corpus="fortunes", batch_mode="packed", seq_len=512, batch_size=8, num_workers=2, xformers_bias=True)
USER_CALL_BOUND = 16 * 2**-8


class _Losses(L.Callback):
    """Every training loss, and the first batch's bias type and device."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.first: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        if not self.first:
            bias = batch["attn_bias"]
            self.first = {"bias": type(bias).__name__, "bias_device": str(bias.q_seqinfo.seqstart.device)}


def train_run(window: int | None, steps: int) -> dict:
    built = []
    original = DocLayout.xformers_bias

    def counted(self, device=None):
        built.append(1)
        return original(self, device)

    DocLayout.xformers_bias = counted  # this process's calls only: each worker has its own copy
    try:
        L.seed_everything(0)
        dm = TextDataModule(**DATA)
        arch = GPTConfig(
            vocab_size=dm.vocab_size,
            d_model=256,
            n_layers=4,
            n_heads=8,
            max_seq_len=512,
            attention="xformers",
            positions="rope",
            ffn="swiglu",
            attention_window=window,
        )
        record = _Losses()
        trainer = L.Trainer(
            accelerator="gpu",
            devices=1,
            precision="bf16-mixed",
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=4,
            val_check_interval=steps // 2,
            callbacks=[record],
        )
        trainer.fit(LitTinyGPT(arch=arch, lr=2e-3, warmup_steps=10), dm)
    finally:
        DocLayout.xformers_bias = original
    losses = record.losses
    return {
        "window": window,
        **record.first,
        "built_in_training_process": len(built),
        "steps": len(losses),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "finite": all(math.isfinite(x) for x in losses),
    }


def user_call() -> dict:
    """``memory_efficient_attention`` with the batch's bias as is, against the float64 reference."""
    dm = TextDataModule(**DATA)
    dm.setup("fit")
    batch = dm.transfer_batch_to_device(next(iter(dm.train_dataloader())), torch.device("cuda"), 0)
    B, T = batch["input_ids"].shape
    H, K = 8, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, K, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flat = (t.reshape(1, B * T, H, K) for t in (q, k, v))  # block-diagonal biases take batch size 1
    got = import_xformers_ops().memory_efficient_attention(*flat, attn_bias=batch["attn_bias"]).view(B, T, H, K)
    want = reference_attention(q, k, v, batch["doc_lens"])
    real = torch.zeros(B, T, dtype=torch.bool, device="cuda")
    for b, row in enumerate(batch["doc_lens"]):
        real[b, : sum(row)] = True
    err = ((got.double() - want)[real].abs().max() / want[real].abs().max()).item()
    return {
        "bias": type(batch["attn_bias"]).__name__,
        "documents": sum(map(len, batch["doc_lens"])),
        "max_rel_err": err,
        "bound": USER_CALL_BOUND,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the results file (JSON)")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU with xformers", file=sys.stderr)
        return 2
    rows = [train_run(window, args.steps) for window in (None, 64)]
    call = user_call()
    meta = environment() | {"command": " ".join(["python", *sys.argv])}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "user_call": call}, indent=1))
    ok = all(r["built_in_training_process"] == 0 and r["finite"] for r in rows) and call["max_rel_err"] <= call["bound"]
    for r in rows:
        print(r)
    print(call)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
