"""The CPU-side parts of scripts/memory_gpu_check.py: its batches, its cases and its table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lit_xf.data.rows import IGNORE_INDEX

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "memory_gpu_check.py"
spec = importlib.util.spec_from_file_location("memory_gpu_check", SCRIPT)
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_synthetic_batches_follow_the_batch_contract(mode):
    batch = check.synthetic_batch(3, 64, mode, vocab=50, seed=1)
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    assert ids.shape == labels.shape == pos.shape == (3, 64)
    for b, lens in enumerate(batch["doc_lens"]):
        assert sum(lens) <= 64 and (mode == "packed" or len(lens) == 1)
        assert mode == "padded" or sum(lens) == 64  # packed rows are full
        start = 0
        for n in lens:
            assert torch.equal(pos[b, start : start + n], torch.arange(n))  # positions restart per document
            assert torch.equal(labels[b, start : start + n - 1], ids[b, start + 1 : start + n])
            assert labels[b, start + n - 1] == IGNORE_INDEX  # no label across a document's end
            start += n
        assert (labels[b, start:] == IGNORE_INDEX).all()
    assert batch["stats"]["real_tokens"] + batch["stats"]["pad_tokens"] == 3 * 64
    assert batch["stats"]["causal_pairs"] == sum(n * (n + 1) // 2 for r in batch["doc_lens"] for n in r)


def test_every_single_gpu_config_becomes_a_case():
    cases = check.config_cases(quick=False)
    assert [c[0] for c in cases] == list(check.CONFIGS)
    by_name = {name: (arch, run, compile_mode) for name, arch, run, compile_mode in cases}
    arch, run, compile_mode = by_name["gpt2_124m.yaml"]
    assert (arch.d_model, arch.vocab_size, run.batch_size, run.seq_len, run.batch_mode) == (
        768,
        50304,
        32,
        2048,
        "packed",
    )
    assert compile_mode == "blocks" and run.precision == "bf16-mixed"


def test_summary_prints_ratios_and_ooms():
    results = {
        "sizes": {
            "1B packed": {
                "kernel": "fa4",
                "estimate_bytes": 2 * 2**30,
                "measured_bytes": 2**31 - 2**26,
                "ratio": 1.03,
                "dominant": "block activations",
            },
            "1B padded": {"estimate_bytes": 2**30, "dominant": "logits (loss)", "oom": "CUDA out of memory"},
        }
    }
    table = check.summary(results).splitlines()
    assert table[1].split()[:6] == ["1B", "packed", "fa4", "2.00", "1.94", "1.030"]
    assert "OOM: CUDA out of memory" in table[2]


def test_its_results_file_renders_as_a_results_reference_section(tmp_path):
    spec_rr = importlib.util.spec_from_file_location("results_reference", SCRIPT.parent / "results_reference.py")
    rr = importlib.util.module_from_spec(spec_rr)
    spec_rr.loader.exec_module(rr)
    results = {
        "meta": {"gpu": "cpu (no GPU)", "torch": torch.__version__, "date": "2026-12-03", "command": "python x"},
        "sizes": {
            "124M packed": {
                "kernel": "sdpa",
                "estimate_bytes": 3 * 2**30,
                "measured_bytes": 3 * 2**30,
                "ratio": 1.0,
                "dominant": "block activations",
            }
        },
        "largest": [
            {
                "size": "1B",
                "seq_len": 8192,
                "checkpointing": "full",
                "predicted_batch_size": 5,
                "largest_trained_batch_size": 5,
                "largest_tokens_per_step": 40960,
                "runs": {
                    "5": {"tokens_per_s": 20000.0, "mfu": 0.41, "ratio": 0.97},
                    "6": {"oom": "CUDA out of memory"},
                },
            }
        ],
    }
    results["rows"] = check.result_rows(results)
    (tmp_path / "memory_gpu_check.json").write_text(json.dumps(results))
    text = "\n\n".join(rr.render_section(rr.Results(tmp_path), rr.MEMORY_SECTION, set()))
    assert "| 124M packed | sdpa | 3.00 | 3.00 | 1.000 | block activations |" in text
    assert "checkpointing `full`: 40960 tokens" in text and "python x" in text
    assert "out of memory at 6), 20.0k tokens/s, MFU 41.0% at lit_xf's count, estimate / measured 0.970" in text


def test_reestimate_recomputes_the_estimates_and_keeps_the_measured_peaks(tmp_path):
    """``--reestimate``: today's estimate of every recorded shape (configs, sizes, largest runs), the
    measured bytes untouched, the ratio their quotient, and the command appended to the file's."""
    from lit_xf.memory_estimate import RunShape, estimate
    from lit_xf.memory_facts import config_dims

    shape = {"batch_size": 2, "seq_len": 2048, "batch_mode": "packed", "precision": "bf16-mixed"}
    results = {
        "meta": {"command": "python first"},
        "run": {"total_memory_bytes": 80 * 2**30},
        "sizes": {"124M packed": {"shape": shape, "estimate_bytes": 1, "measured_bytes": 5 * 2**30}},
        "largest": [
            {
                "size": "124M",
                "seq_len": 2048,
                "checkpointing": "full",
                "predicted_batch_size": 1,
                "largest_trained_batch_size": 2,
                "largest_tokens_per_step": 4096,
                "runs": {"2": {"shape": shape | {"activation_checkpointing": "full"}, "estimate_bytes": 1}},
            }
        ],
    }
    (tmp_path / "memory_gpu_check.json").write_text(json.dumps(results))
    assert check.main(["--out", str(tmp_path), "--reestimate"]) == 0
    new = json.loads((tmp_path / "memory_gpu_check.json").read_text())
    want = estimate(config_dims(check.size_arch("124M", 2048)), RunShape(**shape)).peak
    size = new["sizes"]["124M packed"]
    assert size["estimate_bytes"] == want and size["measured_bytes"] == 5 * 2**30
    assert size["ratio"] == want / (5 * 2**30) and new["rows"][0]["ratio"] == size["ratio"]
    assert new["largest"][0]["runs"]["2"]["estimate_bytes"] > 1 and new["largest"][0]["predicted_batch_size"] > 1
    assert new["meta"]["command"].startswith("python first && python ") and "--reestimate" in new["meta"]["command"]
