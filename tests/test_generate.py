"""Text from a checkpoint: ``lit-xf generate`` needs only the checkpoint (its tokenizer travels in
it as plain data), ``lit-xf predict`` gives the same texts through the trainer, and both take
prompts from the command line or a file and write to stdout or a file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_run import TINY

from lit_xf import cli
from lit_xf.checkpoints import load_checkpoint
from lit_xf.data import BPETokenizer, ByteTokenizer, CountingTokenizer
from lit_xf.tokenizer_state import tokenizer_from_state, tokenizer_state

FIT = [a for a in TINY if not a.startswith(("--trainer.max_steps", "--trainer.enable_checkpointing"))]
TEXTS = [f"Document {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(300)]


@pytest.fixture(scope="module")
def counting_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("counting")
    assert cli.main(["fit", *FIT, f"--trainer.default_root_dir={root}", "--trainer.max_steps=4"]) == 0
    return next(root.rglob("last.ckpt"))


@pytest.fixture(scope="module")
def bpe_ckpt(tmp_path_factory):
    """A checkpoint trained with a BPE tokenizer, whose tokenizer folder is then deleted."""
    root = tmp_path_factory.mktemp("bpe")
    (root / "corpus.txt").write_text("\n\n".join(TEXTS))
    args = [a for a in FIT if not a.startswith(("--data.corpus", "--data.counting"))]
    data = [f"--data.corpus={root / 'corpus.txt'}", "--data.tokenizer=bpe", "--data.bpe_vocab_size=300"]
    tokenizers = root / "tokenizers"
    args += [f"--data.tokenizer_dir={tokenizers}", f"--trainer.default_root_dir={root}", "--trainer.max_steps=2"]
    assert cli.main(["fit", *args, *data, "--data.batch_mode=packed"]) == 0
    shutil.rmtree(tokenizers)
    return next(root.rglob("last.ckpt"))


def test_tokenizers_round_trip_as_plain_data(tmp_path):
    bpe = BPETokenizer.train(TEXTS, 300, tmp_path / "tok.json")
    for tokenizer in (ByteTokenizer(), CountingTokenizer(16), bpe):
        state = tokenizer_state(tokenizer)
        torch.save(state, tmp_path / "state.pt")
        back = tokenizer_from_state(torch.load(tmp_path / "state.pt", weights_only=True))
        text = "3 4 5" if isinstance(tokenizer, CountingTokenizer) else "the quick fox, naïvely"
        assert type(back) is type(tokenizer) and back.encode(text) == tokenizer.encode(text)
        assert back.vocab_size == tokenizer.vocab_size and back.eos_id == tokenizer.eos_id
    assert tokenizer_state(object()) is None
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'"):
        tokenizer_from_state({"kind": "sentencepiece"})


def test_generate_needs_only_the_checkpoint(bpe_ckpt, capsys):
    assert load_checkpoint(bpe_ckpt)["lit_xf"]["tokenizer"]["kind"] == "bpe"
    assert cli.main(["generate", f"--ckpt_path={bpe_ckpt}", "--prompt", "Document 7:", "--max_new_tokens=8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Document 7:") and len(out) > len("Document 7:\n")


def test_generate_is_seeded_and_writes_files(counting_ckpt, tmp_path, capsys):
    args = ["generate", f"--ckpt_path={counting_ckpt}", "--prompt", "1 2 3", "--prompt", "9", "--max_new_tokens=6"]
    assert cli.main(args) == 0 and cli.main(args) == 0
    once, again = capsys.readouterr().out.split("\n", 1)[0], None
    assert cli.main(args) == 0
    again = capsys.readouterr().out
    first = again.split("\n\n")[0]
    assert once == first.split("\n")[0] and first.startswith("1 2 3")  # the same seed, the same text
    (tmp_path / "prompts.txt").write_text("1 2 3\n\n9\n")
    out = tmp_path / "texts.jsonl"
    code = cli.main(["generate", f"--ckpt_path={counting_ckpt}", f"--prompts_file={tmp_path / 'prompts.txt'}"])
    assert code == 0
    from_file = capsys.readouterr().out
    assert cli.main([*args, f"--output={out}"]) == 0 and capsys.readouterr().out == ""
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["1 2 3", "9"] and lines[0]["text"] == first
    assert from_file.split("\n\n")[0].startswith("1 2 3")


def test_greedy_generation_is_deterministic(counting_ckpt, capsys):
    args = ["generate", f"--ckpt_path={counting_ckpt}", "--prompt", "4 5", "--temperature=0", "--max_new_tokens=5"]
    assert cli.main([*args, "--seed=1"]) == 0 and cli.main([*args, "--seed=2"]) == 0
    a, b = capsys.readouterr().out.strip().split("\n")
    assert a == b and len(a.split()) == 7


def test_predict_gives_generates_texts(counting_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    prompts = ["--prompt", "1 2 3", "--prompt", "9", "--max_new_tokens=6"]
    assert cli.main(["generate", f"--ckpt_path={counting_ckpt}", *prompts]) == 0
    generated = capsys.readouterr().out
    tiny = [a for a in TINY if not a.startswith("--trainer.limit_predict_batches")]
    assert cli.main(["predict", *tiny, f"--ckpt_path={counting_ckpt}", *prompts]) == 0
    assert capsys.readouterr().out.endswith(generated)
    # a predict-batch limit below the prompt count would drop prompts silently: refused
    assert cli.main(["predict", *tiny, "--trainer.limit_predict_batches=1", f"--ckpt_path={counting_ckpt}", *prompts])
    err = capsys.readouterr().err
    assert "trainer.limit_predict_batches=1 would skip prompts" in err and "2 here" in err


def test_module_generate_refuses_what_it_cannot_do(counting_ckpt):
    from lit_xf import LitTinyGPT

    model = LitTinyGPT.load_from_checkpoint(counting_ckpt)
    assert isinstance(model.tokenizer, CountingTokenizer)
    with pytest.raises(ValueError, match="the prompt is empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        model.generate(torch.tensor([1, 2]), -1)
    assert model.generate(torch.tensor([1, 2]), 0).tolist() == [1, 2]
