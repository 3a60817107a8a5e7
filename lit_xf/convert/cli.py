"""``lit-xf convert from-hf SRC DEST`` and ``lit-xf convert to-hf SRC DEST``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DTYPES = ("float32", "bfloat16", "float16", "float64")


def parser(prog: str = "lit-xf convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Hugging Face model folders <-> lit_xf weights.")
    sub = p.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("from-hf", help="an HF folder (config.json + safetensors) -> lit_xf weights + fit config")
    a.add_argument("src", help="Hugging Face model folder (local)")
    a.add_argument("dest", help="new folder: model.safetensors, config.yaml, tokenizer.json")
    a.add_argument("--seq_len", type=int, default=None, help="fine-tune row length (default: context, <= 1024)")
    a.add_argument("--batch_size", type=int, default=8, help="rows per batch in config.yaml (default 8)")
    a.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    b = sub.add_parser("to-hf", help="lit_xf weights (a lit-xf checkpoint or model.safetensors) -> an HF folder")
    b.add_argument("src", help="a lit-xf fit checkpoint (.ckpt), model.safetensors, or the folder holding it")
    b.add_argument("dest", help="new folder that transformers' from_pretrained loads")
    b.add_argument("--family", choices=("gpt2", "llama", "mpt"), default=None, help="default: the one that fits")
    b.add_argument("--dtype", choices=DTYPES, default=None, help="the weights' dtype (default: as stored)")
    b.add_argument("--shard_gb", type=float, default=5.0, help="safetensors shard size in GB (default 5)")
    b.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    return p


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    import torch

    from lit_xf.checkpoints import CheckpointError
    from lit_xf.convert import ConversionError, from_hf, to_hf

    try:
        if args.direction == "from-hf":
            done = from_hf(
                args.src, args.dest, seq_len=args.seq_len, batch_size=args.batch_size, overwrite=args.overwrite
            )
        else:
            dtype = getattr(torch, args.dtype) if args.dtype else None
            done = to_hf(
                args.src,
                args.dest,
                family=args.family,
                dtype=dtype,
                shard_bytes=int(args.shard_gb * 1e9),
                overwrite=args.overwrite,
            )
    except (ConversionError, CheckpointError, OSError) as err:
        print(f"lit-xf: error: {err}", file=sys.stderr)
        return 1
    what = "with tokenizer.json" if done.tokenizer else "without a tokenizer"
    print(f"{done.model_type} ({done.family} family, {done.parameters:,} parameters) -> {done.folder} {what}")
    for note in done.notes:
        print(f"  {note}")
    if args.direction == "from-hf":
        print(f"  fine-tune: lit-xf fit --config {done.folder / 'config.yaml'} --data.corpus my_text.txt")
    return 0
