"""Several processes on the CPU (gloo): sharding of packed rows, the global real-token loss, DDP and
FSDP training with checkpoints that resume.

One ``torch.multiprocessing`` spawn of 2 workers runs, in each worker, four short Trainer fits
(DDP, DDP resumed from its step-2 checkpoint, FSDP, FSDP resumed) and one DDP validation, and
records what each rank saw;
the tests below check those records against single-process computations. Logging from rank zero
only is covered by ``tests/test_callbacks.py::test_two_processes_log_from_rank_zero_once_per_step``.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from datetime import timedelta
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from batch_cases import batch_documents
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

from lit_xf import GPTConfig, LitTinyGPT
from lit_xf.data import EpochBatches, TextDataModule, TokenDocs, collate_rows
from lit_xf.loss import token_cross_entropy

WORLD = 2
# Counting documents of 10..24 tokens packed into rows of 32: an odd number of train rows, so the
# remainder rule leaves one out of each epoch; the ranks' first batches hold different numbers of
# real target tokens.
DATA = dict(
    corpus="counting",
    batch_mode="packed",
    seq_len=32,
    batch_size=2,
    counting_documents=138,
    counting_length=24,
    counting_min_length=10,
    counting_vocab=64,
    val_fraction=0.05,
    seed=3,
)
MODEL = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=32, attention="sdpa")
TRAINER = dict(
    accelerator="cpu",
    devices=WORLD,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    val_check_interval=2,
    limit_val_batches=1,
    log_every_n_steps=1,
)  # train/loss is read after every step
TIMEOUT = timedelta(seconds=120)  # a rank that dies makes the other fail soon, not after gloo's 30 min


def make_model(vocab_size: int) -> LitTinyGPT:
    torch.manual_seed(0)  # the same weights in every process (FSDP does not broadcast them)
    return LitTinyGPT(GPTConfig(vocab_size=vocab_size, **MODEL), warmup_steps=10)


# ---- sharding: pure, no processes ----


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("epoch", [0, 1])
def test_ranks_read_disjoint_equal_shares_of_the_epoch(world, epoch):
    """Training: rank r takes rows r, r + world, … of the epoch's first world·⌊R/world⌋ rows, so the
    ranks have equally many rows, no document is read twice, and fewer than ``world`` rows (their
    documents) are left out of the epoch."""
    dm = TextDataModule(**DATA)
    dm.setup()
    plan = dm.dataset("train", num_replicas=1, rank=0).plan(epoch)
    shares = [dm.dataset("train", num_replicas=world, rank=r).share(epoch) for r in range(world)]
    assert len({s.n_rows for s in shares}) == 1 and shares[0].n_rows == plan.n_rows // world
    docs = [d for s in shares for d in s.doc.tolist()]
    assert len(docs) == len(set(docs))
    left = set(dm._splits["train"].tolist()) - set(docs)
    assert len(left) == len(set(plan.doc.tolist()) - set(docs))
    assert 0 < plan.n_rows % world  # the data leaves some rows out; their documents are exactly those missing
    kept_rows = plan.take(np.arange(plan.n_rows // world * world))
    assert set(kept_rows.doc.tolist()) == set(docs)


@pytest.mark.parametrize("world", [1, 2, 3, 7])
@pytest.mark.parametrize("n_docs", [1, 5, 6])
def test_validation_shares_hold_every_row_once(world, n_docs):
    """Evaluation: rank r takes rows r, r + world, … in order; over the ranks every row appears
    exactly once (no padding repeats), and share sizes differ by at most one."""
    docs = TokenDocs.from_lists([[i + 1] * 3 for i in range(n_docs)])
    kwargs = dict(seq_len=4, batch_mode="padded", batch_size=2, pad_id=0, shuffle=False, num_replicas=world)
    shares = [EpochBatches(docs, np.arange(n_docs), rank=r, **kwargs).share(0).doc.tolist() for r in range(world)]
    assert sorted(d for s in shares for d in s) == list(range(n_docs))
    assert all(s == sorted(s) for s in shares)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


# ---- training in 2 processes ----


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy on the CPU with gloo, for this test only.

    ``Trainer(strategy="fsdp", accelerator="cpu")`` raises "The strategy `fsdp` requires a GPU
    accelerator" (the check matches the type exactly, so a subclass passes), and torch's FSDP raises
    "FSDP needs a non-CPU accelerator device" unless ``device_id`` names the CPU, which Lightning
    leaves ``None`` there. Checkpoints must be sharded: a full state dict (Lightning's default)
    crashes rank 0 with a segmentation fault on the CPU.
    """

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


class Recorder(Callback):
    """Per step on this rank: the batch, the backpropagated and the logged loss; the gradients
    (after the ranks' all-reduce) of step 0; the train sampler's sharding. Saved at the end of fit."""

    def __init__(self, path: Path, grads: bool = False) -> None:
        self.path, self.grads = path, grads
        self.steps: dict[int, dict] = {}

    def on_train_start(self, trainer, pl_module):
        sampler = trainer.train_dataloader.sampler
        self.sampler = (type(sampler).__name__, sampler.num_replicas, sampler.rank)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        keep = ("input_ids", "labels", "position_ids", "doc_lens")
        self.step = trainer.global_step
        self.steps[self.step] = {k: batch[k] for k in keep}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads and trainer.global_step == 0:
            self.steps[0]["grads"] = {n: p.grad.clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = self.steps[self.step]
        step["loss"] = outputs["loss"].item()
        step["logged"] = trainer.callback_metrics["train/loss"].item()

    def on_train_end(self, trainer, pl_module):
        torch.save({"sampler": self.sampler, "steps": self.steps, "global_step": trainer.global_step}, self.path)


class ValidationRecorder(Callback):
    """This rank's validation sampler and the rows of its batches."""

    def __init__(self) -> None:
        self.record: dict = {"input_ids": []}

    def on_validation_start(self, trainer, pl_module):
        sampler = trainer.val_dataloaders.sampler
        self.record["sampler"] = (type(sampler).__name__, sampler.num_replicas, sampler.rank)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.record["input_ids"] += list(batch["input_ids"])


def _worker(local_rank: int, out: str, port: int) -> None:
    # What Lightning's own launcher sets for each process; with LOCAL_RANK set, the Trainer uses
    # these processes instead of starting its own.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(local_rank), WORLD_SIZE=str(WORLD)
    )
    torch.set_num_threads(1)
    out = Path(out)
    strategies = {
        "ddp": lambda: DDPStrategy(timeout=TIMEOUT),
        "fsdp": lambda: CPUFSDPStrategy(timeout=TIMEOUT, state_dict_type="sharded"),
    }
    for name, strategy in strategies.items():
        every_2 = ModelCheckpoint(dirpath=out / name, every_n_train_steps=2, save_top_k=-1)
        dm = TextDataModule(**DATA)
        recorder = Recorder(out / f"{name}_rank{local_rank}.pt", grads=name == "ddp")
        trainer = L.Trainer(strategy=strategy(), max_steps=3, callbacks=[every_2, recorder], **TRAINER)
        trainer.fit(make_model(dm.vocab_size), dm)

        dm = TextDataModule(**DATA)
        recorder = Recorder(out / f"{name}_resumed_rank{local_rank}.pt")
        trainer = L.Trainer(
            strategy=strategy(), max_steps=4, callbacks=[recorder], enable_checkpointing=False, **TRAINER
        )
        try:
            trainer.fit(make_model(dm.vocab_size), dm, ckpt_path=out / name / "epoch=0-step=2.ckpt")
        except ValueError as err:  # raised alike on every rank, after the collective loading
            if name != "fsdp" or "another configuration" not in str(err):
                raise
            torch.save({"error": str(err)}, recorder.path)

    # every validation row: the initial weights, both ranks' shards
    dm = TextDataModule(**DATA)
    seen = ValidationRecorder()
    every_row = TRAINER | {"limit_val_batches": 1.0}
    trainer = L.Trainer(strategy=strategies["ddp"](), callbacks=[seen], enable_checkpointing=False, **every_row)
    metrics = trainer.validate(make_model(dm.vocab_size), dm, verbose=False)[0]
    torch.save({"metrics": metrics, **seen.record}, out / f"validate_rank{local_rank}.pt")

    # one training epoch with 2 loader workers per rank (ranks from the process group), gathered over gloo
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", rank=local_rank, world_size=WORLD, timeout=TIMEOUT)
    dm = TextDataModule(**DATA, num_workers=2)
    dm.setup()
    loader = dm.train_dataloader()
    mine = [doc for batch in loader for doc in batch_documents(batch)]
    gathered = [None] * WORLD
    torch.distributed.all_gather_object(gathered, (loader.sampler.rank, loader.sampler.num_replicas, mine))
    torch.save(gathered, out / f"epoch_rank{local_rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """Records of the four fits and the validation, ``runs[name][rank]``, names ``ddp``, ``ddp_resumed``,
    ``fsdp``, ``fsdp_resumed``, ``validate``;
    ``runs["fsdp_checkpoint"]``: the FSDP run's step-2 checkpoint."""
    out = tmp_path_factory.mktemp("distributed")
    mp.start_processes(_worker, args=(str(out), _free_port()), nprocs=WORLD, start_method="spawn")
    names = ("ddp", "ddp_resumed", "fsdp", "fsdp_resumed", "validate", "epoch")
    runs = {n: [torch.load(out / f"{n}_rank{r}.pt", weights_only=False) for r in range(WORLD)] for n in names}
    # the DDP run's step-2 checkpoint resumed by one process
    dm = TextDataModule(**DATA)
    recorder = Recorder(out / "one_process_resumed.pt")
    one = TRAINER | {"devices": 1}
    trainer = L.Trainer(max_steps=4, callbacks=[recorder], enable_checkpointing=False, **one)
    trainer.fit(make_model(dm.vocab_size), dm, ckpt_path=out / "ddp" / "epoch=0-step=2.ckpt")
    runs["one_process_resumed"] = torch.load(recorder.path, weights_only=False)
    return {**runs, "fsdp_checkpoint": out / "fsdp" / "epoch=0-step=2.ckpt"}


@pytest.fixture(scope="module")
def expected_batches() -> list[list[dict]]:
    """``[rank][k]``: the k-th batch of epoch 0 that rank ``rank`` of 2 must read."""
    dm = TextDataModule(**DATA)
    dm.setup()
    out = []
    for rank in range(WORLD):
        ds = dm.dataset("train", num_replicas=WORLD, rank=rank)
        out.append([ds[(0, k)] for k in range(ds.n_batches(0))])
    return out


@pytest.mark.slow
def test_ddp_trains_packed_rows_of_its_own_and_resumes(runs, expected_batches):
    """Each rank keeps its ``EpochSampler`` share (Lightning does not replace it); the run resumed
    from the step-2 checkpoint reads batches 2 and 3 of each rank's shard and repeats step 2 exactly."""
    for rank in range(WORLD):
        full, resumed = runs["ddp"][rank], runs["ddp_resumed"][rank]
        assert full["sampler"] == resumed["sampler"] == ("EpochSampler", WORLD, rank)
        assert (full["global_step"], resumed["global_step"]) == (3, 4)
        assert sorted(full["steps"]) == [0, 1, 2] and sorted(resumed["steps"]) == [2, 3]
        for record in (full, resumed):
            for step, seen in record["steps"].items():
                assert torch.equal(seen["input_ids"], expected_batches[rank][step]["input_ids"]), (rank, step)
        # same weights, optimizer state and batch at step 2: the same loss
        assert resumed["steps"][2]["logged"] == pytest.approx(full["steps"][2]["logged"], abs=1e-6)
    for run in ("ddp", "ddp_resumed"):
        for step in runs[run][0]["steps"]:  # train/loss is global: the same on both ranks
            assert runs[run][0]["steps"][step]["logged"] == runs[run][1]["steps"][step]["logged"]


@pytest.mark.slow
def test_one_process_resumes_a_two_rank_checkpoint_where_the_ranks_left_off(runs):
    """2 ranks x 2 batches took the epoch's first 2·2·b rows; one process resumed from their
    step-2 checkpoint goes on with its own batch 4 (and 5), not with rows the ranks trained on."""
    dm = TextDataModule(**DATA)
    dm.setup()
    ds = dm.dataset("train", num_replicas=1, rank=0)
    resumed = runs["one_process_resumed"]
    assert resumed["sampler"] == ("EpochSampler", 1, 0) and resumed["global_step"] == 4
    assert sorted(resumed["steps"]) == [2, 3]
    for step, k in ((2, 4), (3, 5)):
        assert torch.equal(resumed["steps"][step]["input_ids"], ds[(0, k)]["input_ids"])
        assert np.isfinite(resumed["steps"][step]["loss"])


@pytest.mark.slow
def test_ddp_loss_and_gradient_are_the_real_token_mean_over_both_ranks(runs):
    """Step 0: the ranks hold different numbers of real tokens; the all-reduced gradient and the logged
    loss equal one process's on the union of both batches (fp32, 1e-6), and differ from the mean of
    the per-rank means."""
    seen = [runs["ddp"][rank]["steps"][0] for rank in range(WORLD)]
    counts = [int((s["labels"] != -100).sum()) for s in seen]
    assert counts[0] != counts[1], counts

    model = make_model(TextDataModule(**DATA).vocab_size)

    def grads_of(batches: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        union = {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "labels", "position_ids")}
        union["doc_lens"] = [row for b in batches for row in b["doc_lens"]]
        logits = model(union["input_ids"], union["position_ids"], union["doc_lens"])
        loss = token_cross_entropy(logits, union["labels"])  # one process, on logits
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, reference = grads_of(seen)
    for s in seen:
        assert s["logged"] == pytest.approx(loss, abs=1e-6)
        assert reference.keys() == s["grads"].keys()
        for name, grad in reference.items():
            torch.testing.assert_close(s["grads"][name], grad, rtol=0, atol=1e-6, msg=name)
    # the backpropagated loss of rank r is its Σ nll · world / N: the ranks' values average to the loss
    assert sum(s["loss"] for s in seen) / WORLD == pytest.approx(loss, abs=1e-6)

    # what averaging per-rank means (the plain DDP default) would give instead
    per_rank = [grads_of([s])[1] for s in seen]
    naive_error = max((sum(g[n] for g in per_rank) / WORLD - reference[n]).abs().max().item() for n in reference)
    assert naive_error > 1e-4, naive_error


@pytest.mark.slow
def test_fsdp_on_cpu_gives_the_ddp_losses(runs):
    """FSDP (full sharding, gloo) from the same weights on the same shards: the same losses as DDP at
    every step, so the same gradients and updates; its step-2 checkpoint is sharded (one file per rank)."""
    for rank in range(WORLD):
        fsdp, ddp = runs["fsdp"][rank], runs["ddp"][rank]
        assert fsdp["global_step"] == 3
        assert fsdp["sampler"] == ("EpochSampler", WORLD, rank)
        assert fsdp["steps"].keys() == ddp["steps"].keys()
        for step in fsdp["steps"]:
            assert torch.equal(fsdp["steps"][step]["input_ids"], ddp["steps"][step]["input_ids"])
            assert fsdp["steps"][step]["logged"] == pytest.approx(ddp["steps"][step]["logged"], abs=1e-5)
    ckpt = runs["fsdp_checkpoint"]
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in ckpt.iterdir()}


@pytest.mark.slow
def test_fsdp_resumes_from_its_sharded_checkpoint(runs):
    """Resumed from the sharded step-2 checkpoint: batches 2 and 3, with the DDP run's losses."""
    for rank in range(WORLD):
        resumed, ddp_resumed = runs["fsdp_resumed"][rank], runs["ddp_resumed"][rank]
        assert "error" not in resumed, resumed.get("error")
        assert resumed["global_step"] == 4
        assert resumed["steps"].keys() == ddp_resumed["steps"].keys()
        for step in resumed["steps"]:
            assert torch.equal(resumed["steps"][step]["input_ids"], ddp_resumed["steps"][step]["input_ids"])
            assert resumed["steps"][step]["logged"] == pytest.approx(ddp_resumed["steps"][step]["logged"], abs=1e-5)


@pytest.mark.slow
def test_ddp_validation_sees_every_row_once_and_reports_the_one_process_loss(runs):
    """5 validation rows on 2 ranks: rank 0 evaluates rows 0, 2, 4 and rank 1 rows 1, 3 (no row
    repeated to even out the ranks), and val/loss is Σ nll / Σ tokens over the 5 rows, as one process
    computes it. With the first row repeated, as ``DistributedSampler`` pads, the loss differs."""
    dm = TextDataModule(**DATA)
    dm.setup()
    val_rows = dm.rows("val")
    n_rows = len(val_rows)
    assert n_rows % WORLD  # the data is chosen so that a padding sampler would repeat a row
    batch = collate_rows(val_rows, dm.seq_len, dm.pad_id)
    for rank, record in enumerate(runs["validate"]):
        assert record["sampler"] == ("EpochSampler", WORLD, rank)
        expected = batch["input_ids"][rank::WORLD]
        assert torch.equal(torch.stack(record["input_ids"]), expected), rank

    model = make_model(dm.vocab_size).eval()

    def loss_over(rows: list[int]) -> float:
        sub = collate_rows([val_rows[i] for i in rows], dm.seq_len, dm.pad_id)
        with torch.no_grad():
            logits = model(sub["input_ids"], sub["position_ids"], sub["doc_lens"])
        return token_cross_entropy(logits, sub["labels"]).item()

    once = loss_over(list(range(n_rows)))
    for record in runs["validate"]:
        assert record["metrics"]["val/loss"] == pytest.approx(once, abs=1e-6)
    padded = loss_over([*range(n_rows), *range(WORLD - n_rows % WORLD)])
    assert abs(padded - once) > 1e-4, (padded, once)


@pytest.mark.slow
def test_an_epoch_over_2_ranks_x_2_workers_reads_each_training_document_once(runs):
    """2 gloo processes, 2 DataLoader workers each: together they read every training document
    once but those of the one row the remainder rule leaves out, and no validation document."""
    gathered = runs["epoch"][0]
    assert [(rank, world) for rank, world, _ in gathered] == [(0, WORLD), (1, WORLD)]
    dm = TextDataModule(**DATA)
    dm.setup()
    tokens = [tuple(dm._docs.doc(i).tolist()) for i in range(dm._docs.n_docs)]
    train = Counter(tokens[i] for i in dm._splits["train"])
    plan = dm.dataset("train", num_replicas=1, rank=0).plan(0)
    left_rows = plan.take(np.arange(plan.n_rows // WORLD * WORLD, plan.n_rows))
    left = Counter(tokens[d] for d in left_rows.doc.tolist())
    seen = Counter(doc for _, _, docs in gathered for doc in docs)
    assert left_rows.n_rows == 1 and seen == train - left
    assert not set(gathered[0][2]) & set(gathered[1][2]) - {d for d, c in train.items() if c > 1}
