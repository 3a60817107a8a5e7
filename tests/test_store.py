"""The token store and streamed batches: round trips, damaged stores, input formats with their
errors, rank x worker shares of an epoch, and mid-epoch resume with loader workers."""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from batch_cases import batch_documents

from lit_xf.data import (
    ByteTokenizer,
    StoreError,
    TextDataModule,
    build_store,
    iter_documents,
    load_text_corpus,
    open_store,
)


def texts(n: int = 300, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "délta", "ε", "zeta", "eta🙂", "theta"]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 120)))) for _ in range(n)]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))


def test_store_round_trips_every_document_and_parallel_prepare_matches(tmp_path):
    docs = texts()
    eos = ByteTokenizer.eos_id
    one = build_store(tmp_path / "one", iter(docs), "byte", {}, workers=1)
    two = build_store(tmp_path / "two", iter(docs), "byte", {}, workers=2)  # a process pool
    assert one.tokens.dtype == np.uint16 and one.n_docs == len(docs)
    for store in (one, two):
        for d, text in enumerate(docs):
            assert store.doc(d).tolist() == list(text.encode()) + [eos]
    assert np.array_equal(np.asarray(one.tokens), np.asarray(two.tokens))
    meta = json.loads((tmp_path / "one" / "meta.json").read_text())
    assert (meta["n_docs"], meta["n_tokens"], meta["dtype"]) == (len(docs), one.n_tokens, "<u2")
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left


def test_hf_tokenizer_file_and_bpe_round_trip_through_the_store(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    docs = texts(200)
    hf = Tokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>", "<pad>"]))
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, docs)
    dm = TextDataModule(corpus=str(corpus), tokenizer=str(path), store_dir=str(tmp_path / "st"), seq_len=64)
    assert (dm.eos_id, dm.pad_id, dm.vocab_size) == (1, 2, hf.get_vocab_size())
    dm.setup()
    for d, text in enumerate(docs):
        assert dm._docs.doc(d).tolist() == hf.encode(text, add_special_tokens=False).ids + [1]
    with pytest.raises(FileNotFoundError, match="or the path of an existing tokenizer.json"):
        TextDataModule(corpus=str(corpus), tokenizer=str(tmp_path / "missing.json"))
    # tokenizer: file reads <tokenizer_dir>/tokenizer.json; an explicit eos_id wins over the detected
    # one and keys another store (its tokens differ)
    chosen = TextDataModule(
        corpus=str(corpus), tokenizer="file", tokenizer_dir=str(tmp_path), eos_id=0, store_dir=str(tmp_path / "st")
    )
    assert (chosen.eos_id, chosen.pad_id) == (0, 2)
    chosen.setup()
    assert chosen.store_path != dm.store_path
    assert chosen._docs.doc(0).tolist() == hf.encode(docs[0], add_special_tokens=False).ids + [0]


def test_store_is_reused_and_keyed_by_the_corpus_files(tmp_path, caplog):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(texts(50)))
    kwargs = dict(corpus=str(corpus), store_dir=str(tmp_path / "st"), seq_len=64)
    a = TextDataModule(**kwargs)
    a.prepare_data()
    first = a.store_path
    b = TextDataModule(**kwargs)
    b.prepare_data()
    assert b.store_path == first and len(list((tmp_path / "st").iterdir())) == 1
    corpus.write_text("\n\n".join(texts(60)))  # a changed file: a new store
    c = TextDataModule(**kwargs)
    c.setup()
    assert c.store_path != first and c._docs.n_docs == 60


def test_truncated_or_half_written_store_is_named_and_rebuilt(tmp_path, caplog):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(texts(80)))
    kwargs = dict(corpus=str(corpus), store_dir=str(tmp_path / "st"), seq_len=64)
    dm = TextDataModule(**kwargs)
    dm.setup()
    path, good = dm.store_path, np.asarray(dm._docs.tokens).copy()

    with open(path / "tokens.bin", "r+b") as f:  # truncated
        f.truncate((path / "tokens.bin").stat().st_size - 3)
    with pytest.raises(StoreError, match=r"truncated or damaged: tokens.bin holds \d+ bytes, meta.json expects"):
        open_store(path)
    with caplog.at_level(logging.WARNING, logger="lit_xf.data"):
        again = TextDataModule(**kwargs)
        again.setup()
    assert "rebuilding it" in caplog.text
    assert np.array_equal(np.asarray(again._docs.tokens), good)

    (path / "meta.json").unlink()  # a prepare killed before its last write
    with pytest.raises(StoreError, match="incomplete \\(no meta.json: its prepare did not finish\\)"):
        open_store(path)
    TextDataModule(**kwargs).prepare_data()
    assert open_store(path).n_docs == 80


def test_input_formats_and_a_corrupt_line_names_its_file_and_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = texts(40)
    gz = tmp_path / "part.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs)
    assert load_text_corpus(str(gz), text_field="body") == docs
    pq.write_table(pa.table({"content": docs, "n": list(range(40))}), tmp_path / "part.parquet", row_group_size=7)
    assert load_text_corpus(str(tmp_path / "part.parquet"), text_field="content") == docs
    # a datasets.save_to_disk folder, as pyarrow writes it (datasets itself need not be installed)
    ds = tmp_path / "ds"
    ds.mkdir()
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as writer:
            writer.write_table(pa.table({"text": docs}), max_chunksize=9)
    (ds / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    assert load_text_corpus(str(ds)) == docs
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", docs[:3])
    (folder / "b.txt").write_text("one whole file")
    assert list(iter_documents(str(folder))) == docs[:3] + ["one whole file"]

    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "fine"}) + "\n" + '{"body": "cut off\n')
    with pytest.raises(ValueError, match=r"part.jsonl.gz:2 is not valid JSON"):
        TextDataModule(corpus=str(gz), text_field="body", store_dir=str(tmp_path / "st")).prepare_data()
    assert not (tmp_path / "st").exists() or not any((tmp_path / "st").iterdir())  # nothing half-written kept
    pq.write_table(pa.table({"content": ["a", None]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet row 1 column 'content' is NoneType"):
        load_text_corpus(str(tmp_path / "bad.parquet"), text_field="content")
    with pytest.raises(ValueError, match=r"part.parquet has no column 'text' \(found \['content', 'n'\]\)"):
        load_text_corpus(str(tmp_path / "part.parquet"))


def test_a_real_datasets_folder_is_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = texts(30)
    datasets.Dataset.from_dict({"text": docs, "k": list(range(30))}).save_to_disk(str(tmp_path / "ds"))
    assert load_text_corpus(str(tmp_path / "ds")) == docs
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:5]})}).save_to_disk(str(tmp_path / "dd"))
    assert load_text_corpus(str(tmp_path / "dd")) == docs[:5]


@pytest.fixture(scope="module")
def DATA(tmp_path_factory) -> dict:
    """500 distinct documents of 3..60 tokens (every document identifiable by its tokens)."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(4)
    docs = [f"{i}:" + "x" * int(rng.integers(1, 56)) for i in range(500)]
    write_jsonl(folder / "docs.jsonl", docs)
    return dict(
        corpus=str(folder / "docs.jsonl"),
        store_dir=str(folder / "st"),
        seq_len=64,
        batch_size=4,
        val_fraction=0.1,
        test_fraction=0.0,
        seed=4,
    )


@pytest.mark.parametrize("mode", ["packed", "padded", "concat"])
def test_one_epoch_over_2_ranks_x_2_workers_yields_each_train_document_once(mode, DATA):
    dm = TextDataModule(**DATA, batch_mode=mode, num_workers=2)
    dm.setup()
    docs = dm._docs
    train = Counter(tuple(docs.doc(i).tolist()) for i in dm._splits["train"])
    val = {tuple(docs.doc(i).tolist()) for i in dm._splits["val"]}
    seen: Counter = Counter()
    n_batches = []
    for rank in range(2):
        loader = dm._loader(dm.dataset("train", num_replicas=2, rank=rank))
        batches = list(loader)
        n_batches.append(len(batches))
        for batch in batches:
            seen.update(batch_documents(batch))
    assert n_batches[0] == n_batches[1]  # ranks step together
    plan = dm.dataset("train", num_replicas=1, rank=0).plan(0)
    left_out = plan.n_rows % 2  # the remainder rule: fewer rows than ranks are left out of the epoch
    if mode == "concat":  # rows are pieces of the joined stream: each row of the epoch once
        every_row = Counter(tuple(row[0]) for row in dm.rows("train"))
        assert sum(seen.values()) == plan.n_rows - left_out and not seen - every_row
        return
    if left_out == 0:
        assert seen == train
    else:
        assert not seen - train and 0 < sum((train - seen).values()) <= 64  # one row's documents left out
    assert not set(seen) & val


def test_resume_mid_epoch_with_workers_gives_the_same_next_batches(DATA):
    kwargs = DATA | dict(batch_mode="packed", num_workers=2)
    reference = [b["input_ids"] for b in _setup(kwargs).train_dataloader()]
    dm = _setup(kwargs)
    dm.load_state_dict({"epoch": 0, "batches_consumed": 7})
    rest = [b["input_ids"] for b in dm.train_dataloader()]
    assert len(rest) == len(reference) - 7
    assert all(torch.equal(x, y) for x, y in zip(rest, reference[7:], strict=True))
    no_workers = _setup(DATA | dict(batch_mode="packed", num_workers=0))
    assert all(torch.equal(x, b["input_ids"]) for x, b in zip(reference, no_workers.train_dataloader(), strict=True))


def _setup(kwargs) -> TextDataModule:
    dm = TextDataModule(**kwargs)
    dm.setup()
    return dm
