"""``lit-xf bench data``: the token store and the streamed loader at scale, on a generated corpus.

Measures, on a deterministic generated text corpus of ``--size-mb`` (and a ``--small-mb`` one):
prepare throughput (MB/s of input) and its peak RSS (each in a fresh process); the loader's token
rate with ``--workers`` DataLoader workers against ``--consumer-tokens-per-s`` (what a 124M model
trains on one H200); the peak RSS of a short ``fit`` (a 2-layer model, 2 rows per batch, 2
loader workers) on each store and the time from ``fit``'s start
to its first batch; and the packing efficiency of the streamed packer against best-fit decreasing
over the whole split (fortunes at 512, the large corpus at ``--seq-len``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lit_xf.bench.output import progress


def generate_corpus(path: Path, size_mb: float, seed: int = 0) -> Path:
    """A text file of ``size_mb`` MB: documents of log-normal length (mean ~2 kB) of words drawn
    (Zipf-like) from 20k seeded pseudo-words, separated by blank lines. Same seed, same bytes."""
    if path.is_file() and path.stat().st_size >= size_mb * 1e6:
        return path
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(2, 10)))) for _ in range(20000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    written, target = 0, int(size_mb * 1e6)
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            n_words = np.maximum(1, rng.lognormal(np.log(330) - 0.5, 1.0, size=512).astype(int))
            words = rng.choice(len(vocab), size=int(n_words.sum()), p=weights)
            docs, start = [], 0
            for n in n_words:
                docs.append(" ".join(vocab[w] for w in words[start : start + n]))
                start += n
            block = "\n\n".join(docs) + "\n\n"
            f.write(block)
            written += len(block)
    os.replace(tmp, path)
    return path


PEAK_RSS = r"""
def peak_rss_mib(field="VmHWM"):
    # this process's own high-water mark (ru_maxrss after exec also counts the forked parent's pages)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from lit_xf.data import TextDataModule
kw = json.loads(sys.argv[1])
dm = TextDataModule(**kw)
dm.prepare_data()
dt = time.perf_counter() - t0
kids_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": dt, "peak_rss_mib": peak_rss_mib(), "worker_peak_rss_mib": kids_kib / 1024,
                  "store": str(dm.store_path)}))
"""

FIT_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import lightning as L, torch
from lit_xf import GPTConfig, LitTinyGPT
from lit_xf.data import TextDataModule
imports_mib = peak_rss_mib("VmRSS")
kw = json.loads(sys.argv[1])
first = {}
class First(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, idx):
        first.setdefault("s", time.perf_counter() - t0)
dm = TextDataModule(**kw)
model = LitTinyGPT(GPTConfig(vocab_size=dm.vocab_size, d_model=64, n_layers=2, n_heads=4,
                             max_seq_len=kw["seq_len"], attention="sdpa"))
params_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
trainer = L.Trainer(accelerator="cpu", max_steps=int(sys.argv[2]), logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    num_sanity_val_steps=0, callbacks=[First()])
trainer.fit(model, dm)
print(json.dumps({"first_batch_s": first.get("s"), "peak_rss_mib": peak_rss_mib(), "imports_rss_mib": imports_mib,
                  "params_mib": params_mib}))
"""


def _child(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2])] + sys.path))
    cmd = [sys.executable, "-c", PEAK_RSS + code, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise RuntimeError(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _loader_rate(data: dict, workers: int, batches: int) -> dict:
    from lit_xf.data import TextDataModule

    dm = TextDataModule(**data, num_workers=workers)
    dm.setup()
    loader = dm.train_dataloader()
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t_first = time.perf_counter() - t0
    tokens, t1 = 0, time.perf_counter()
    for _, batch in zip(range(batches), it, strict=False):
        tokens += batch["input_ids"].numel()
    dt = time.perf_counter() - t1
    return {"workers": workers, "first_batch_s": round(t_first, 2), "tokens_per_s": round(tokens / dt)}


def _efficiency(data: dict) -> dict:
    from lit_xf.data import TextDataModule

    dm = TextDataModule(**data)
    dm.setup()
    streamed = dm.dataset("train", num_replicas=1, rank=0)
    whole = dm.dataset("train", num_replicas=1, rank=0, buffer=10**12, shuffle=False)
    t0 = time.perf_counter()
    eff = streamed.plan(0).efficiency()
    plan_s = time.perf_counter() - t0
    return {
        "streamed": round(eff, 5),
        "whole_split_best_fit": round(whole.plan(0).efficiency(), 5),
        "plan_s": round(plan_s, 2),
        "buffer": dm.shuffle_buffer,
    }


def bench_data(args) -> list[dict]:
    work = Path(args.dir)
    shutil.rmtree(work / "stores", ignore_errors=True)  # the prepare rows time a fresh prepare, never a reused store
    rows = []
    corpora = {"large": args.size_mb, "small": args.small_mb}
    stores = {}
    for name, size in corpora.items():
        path = generate_corpus(work / f"generated_{size:g}mb.txt", size, args.seed)
        mb = path.stat().st_size / 1e6
        for tok in args.tokenizers:
            data = dict(
                corpus=str(path),
                tokenizer=tok,
                store_dir=str(work / "stores"),
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                tokenizer_dir=str(work / f"tok_{name}"),
                val_fraction=0.01,
                test_fraction=0.0,
                prepare_workers=os.cpu_count(),
            )
            res = _child(CHILD, json.dumps(data))
            store_meta = json.loads((Path(res["store"]) / "meta.json").read_text())
            row = dict(
                bench="prepare",
                corpus=name,
                input_mb=round(mb, 1),
                tokenizer=tok,
                seconds=round(res["seconds"], 1),
                mb_per_s=round(mb / res["seconds"], 2),
                mb_per_s_per_core=round(mb / res["seconds"] / (os.cpu_count() or 1), 2),
                peak_rss_mib=round(res["peak_rss_mib"]),
                worker_peak_rss_mib=round(res["worker_peak_rss_mib"]),
                documents=store_meta["n_docs"],
                tokens=store_meta["n_tokens"],
            )
            rows.append(row)
            progress(row)
            stores[(name, tok)] = data
    tok = args.tokenizers[-1]
    for workers in args.workers:
        row = dict(
            bench="loader",
            corpus="large",
            tokenizer=tok,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            **_loader_rate(stores[("large", tok)], workers, args.loader_batches),
        )
        row["x_consumer"] = round(row["tokens_per_s"] / args.consumer_tokens_per_s, 1)
        rows.append(row)
        progress(row)
    for name in corpora:
        res = _child(
            FIT_CHILD, json.dumps(stores[(name, tok)] | {"num_workers": 2, "batch_size": 2}), str(args.fit_steps)
        )
        row = dict(
            bench="fit", corpus=name, tokenizer=tok, steps=args.fit_steps, **{k: round(v, 2) for k, v in res.items()}
        )
        rows.append(row)
        progress(row)
    for label, data in (
        ("fortunes", dict(corpus="fortunes", seq_len=512, batch_size=8, store_dir=str(work / "stores"))),
        ("large", stores[("large", tok)]),
    ):
        row = dict(
            bench="packing",
            corpus=label,
            seq_len=data["seq_len"],
            tokenizer=data.get("tokenizer", "byte"),
            **_efficiency(data),
        )
        rows.append(row)
        progress(row)
    return rows


def machine_meta() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": "shared machine: other work may have been running (see loadavg)",
    }
