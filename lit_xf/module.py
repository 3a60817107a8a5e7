"""LitTinyGPT: the LightningModule users import.

Loss = mean cross-entropy over real target tokens (labels ≠ −100: pads and document ends are
ignored); with several processes, over the real tokens of all ranks' batches together (see
``LitTinyGPT.training_step``). AdamW (no decay on norms, biases, embeddings) with linear warm-up and
cosine decay to ``min_lr_ratio``·lr, stepped per optimizer step; LightningCLI's ``--optimizer`` /
``--lr_scheduler`` replace it when given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import SumMetric

from lit_xf.attention.layout import attended_pairs
from lit_xf.checkpoints import (
    checkpoint_errors,
    checkpoint_source,
    refuse_unsafe,
    save_last_checkpoint,
    use_safe_checkpoint_io,
)
from lit_xf.config import GPTConfig
from lit_xf.hardware import precision_dtype
from lit_xf.loss import (
    LossParts,
    compiled_token_cross_entropy,
    linear_cross_entropy,
    token_cross_entropy,
    token_hits,
)
from lit_xf.model import COMPILE_MODES, CompileMode, TinyGPT
from lit_xf.nonfinite import NonFiniteGuard, OnNonFinite, weights_finite
from lit_xf.resume import (
    check_checkpoint_fits,
    flat_arch,  # noqa: F401 (importable from here, as before)
    reapply_optimizer_hparams,
    schedule_change,
)
from lit_xf.tokenizer_state import tokenizer_from_state, tokenizer_state
from lit_xf.weights import load_weights, read_weights


class LitTinyGPT(L.LightningModule):
    """TinyGPT with the architecture ``arch`` (a ``GPTConfig``, see ``lit_xf.config``) plus training.
    In YAML the architecture is one block, ``model: {arch: {d_model: 256, ...}, lr: ...}``; on the
    command line ``--model.arch.d_model 256``.

    Args:
        arch: the architecture, a ``GPTConfig`` (or its fields as a dict, as checkpoints store them).
        lr, weight_decay, betas: AdamW settings (fused on CUDA).
        warmup_steps: linear warm-up from 0; then cosine decay to ``min_lr_ratio``·lr at the last step.
        compile: ``torch.compile`` the model (``TinyGPT.compile_model``): ``true`` or ``"blocks"``
            compiles each block (any batches); ``"model"`` the whole model as one graph and
            ``"cudagraphs"`` that graph as CUDA graphs (batches whose attention bias can't be traced,
            xformers' packed masks, run eagerly there). The attention bias is always built outside,
            once per forward, and the output projection runs outside, fused with the training loss
            (``lit_xf.loss.linear_cross_entropy``); compiling also compiles validation's loss on
            logits (``compiled_token_cross_entropy``).
        on_nonfinite: what a non-finite loss or gradient does (``lit_xf.nonfinite``): ``"stop"``
            ends training with an error naming the steps (read on the logged steps, no extra sync)
            and writes no checkpoint from the broken weights; ``"skip"`` skips those steps (the
            GradScaler's own skipping under ``16-mixed``; otherwise one host sync per step).
        init_weights: start from these weights instead of random ones (``lit_xf.weights``): a
            ``.safetensors`` file (``lit-xf convert``'s ``model.safetensors``), a folder holding one,
            or a lit-xf checkpoint, all read without running code; every key and shape must fit
            ``arch``. Resuming (``ckpt_path``) restores the checkpoint's weights over them.
    """

    def __init__(
        self,
        arch: GPTConfig = GPTConfig(),  # noqa: B008 (frozen, so one shared default is safe)
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        compile: bool | CompileMode = False,
        on_nonfinite: OnNonFinite = "stop",
        init_weights: str | None = None,
    ):
        super().__init__()
        config = GPTConfig.from_dict(arch) if isinstance(arch, Mapping) else arch
        if not isinstance(config, GPTConfig):
            raise TypeError(f"arch must be a GPTConfig or a dict of its fields, got {type(arch).__name__}")
        # save_hyperparameters reads the arguments from this frame: hparams["arch"] holds the plain
        # fields, so checkpoints load without pickled classes. (Under LightningCLI, Lightning stores
        # the parsed config instead: there it is a dict already.)
        arch = arch if isinstance(arch, Mapping) else config.to_dict()
        self.save_hyperparameters()
        if lr <= 0 or warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(
                f"need lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1; got lr={lr}, "
                f"warmup_steps={warmup_steps}, min_lr_ratio={min_lr_ratio}"
            )
        if compile is not False and compile is not True and compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: use false, true (= 'blocks') or one of {', '.join(COMPILE_MODES)}")
        self._guard = NonFiniteGuard(on_nonfinite)
        #: The tokenizer saved with checkpoints (default: the trainer's data module's) and read back
        #: from them (``lit_xf.tokenizer_state``); ``lit-xf generate`` needs nothing else.
        self.tokenizer = None
        self._schedule = None  # (AdamW, LambdaLR, total steps) from configure_optimizers
        self._saved_schedule_steps: int | None = None  # the total steps of a checkpoint's schedule
        self.model = TinyGPT(config)
        if init_weights:
            weights = read_weights(init_weights)
            load_weights(self.model, weights.state_dict, source=f"init_weights {init_weights}")
        # Sums over the real target tokens of all validation batches (all ranks at compute): Σ nll,
        # Σ correct, count. Without torchmetrics' NaN check, which waits for the GPU on every batch
        # (a NaN loss shows as NaN); MeanMetric drops its weights without it (torchmetrics#3434).
        self.val_nll, self.val_correct, self.val_tokens = (SumMetric(nan_strategy="disable") for _ in range(3))
        self._flops_constants: tuple[int, int] | None = None
        self._cross_entropy = token_cross_entropy
        # a logged step's [loss, accuracy] on its way to the host, and the copy's CUDA event
        self._train_metrics: tuple[torch.Tensor, torch.cuda.Event | None] | None = None

    # -- model -------------------------------------------------------------------------------
    @property
    def attention_kernel_name(self) -> str:
        return self.model.attention_kernel_name

    @property
    def mlp_kernel_name(self) -> str:
        """``TinyGPT.mlp_kernel_name`` on this module's device at the trainer's precision."""
        precision = self._trainer.precision if self._trainer is not None else "32-true"
        return self.model.mlp_kernel_name(self.device, precision_dtype(precision))

    def configure_model(self) -> None:
        self._checkpoint_through_fsdp()
        mode = self.hparams.compile
        if not mode or self.model.compile_mode is not None:
            return
        device = self._root_device()
        if mode == "cudagraphs" and device.type != "cuda":
            rank_zero_info(f"compile='cudagraphs' needs a CUDA device; the model runs eagerly on {device.type}")
            return
        self.model.compile_model("blocks" if mode is True else mode)
        self._cross_entropy = compiled_token_cross_entropy

    def _checkpoint_through_fsdp(self) -> None:
        """Under Lightning's ``FSDPStrategy`` the blocks ``activation_checkpointing`` names are
        checkpointed by the strategy (its ``activation_checkpointing_policy``, applied after
        sharding), not by ``TinyGPT``'s own loop, so that each is wrapped once. A policy given to the
        strategy itself wins."""
        if self._trainer is None or not self.model.checkpoint_layers:
            return
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = self.trainer.strategy
        if not isinstance(strategy, FSDPStrategy):
            return
        if not strategy._activation_checkpointing_kwargs:
            chosen = {id(self.model.blocks[i]) for i in self.model.checkpoint_layers}
            strategy._activation_checkpointing_kwargs = {"check_fn": lambda module: id(module) in chosen}
        else:
            rank_zero_info("FSDPStrategy has its own activation_checkpointing_policy: it replaces model.arch's")
        self.model.checkpoint_layers = frozenset()

    def setup(self, stage: str) -> None:
        # The device is known now: refuse a kernel that can't train here before the first step.
        self.model.check_kernel(self._root_device(), training=stage == "fit")
        # Before the trainer restores ckpt_path: load it as weights only (also http(s) URLs).
        use_safe_checkpoint_io(self.trainer.strategy)
        # The loaders are made after this: their batches' layout and xformers bias use this model's window.
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "attention_window"):
            datamodule.attention_window = self.model.attention_window

    def _root_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self._trainer is not None else self.device

    def forward(
        self,
        input_ids,
        position_ids=None,
        doc_lens=None,
        *,
        eager: bool = False,
        hidden: bool = False,
        layout=None,
        attn_bias=None,
    ):
        """``TinyGPT.forward``: logits ``[B, T, V]``, or with ``hidden`` the states ``lm_head`` projects."""
        return self.model(
            input_ids, position_ids, doc_lens, eager=eager, hidden=hidden, layout=layout, attn_bias=attn_bias
        )

    def _batch_forward(self, batch: dict, hidden: bool = False):
        """``forward`` on a batch of the data contract, adopting its ``attn_layout`` / ``attn_bias``."""
        return self(
            batch["input_ids"],
            batch.get("position_ids"),
            batch.get("doc_lens"),
            hidden=hidden,
            layout=batch.get("attn_layout"),
            attn_bias=batch.get("attn_bias"),
        )

    # -- steps -------------------------------------------------------------------------------
    def _loss_parts(self, batch: dict) -> LossParts:
        """Σ nll, hits and real targets of a batch, the loss fused with the output projection."""
        hidden_BTD = self._batch_forward(batch, hidden=True)
        return linear_cross_entropy(hidden_BTD, self.model.lm_head.weight, batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Mean cross-entropy over the real target tokens of the whole step, all ranks together.

        One process: Σ nll / real targets of this batch, no communication. Several (DDP, FSDP):
        ranks' batches hold different numbers of real tokens, so the mean of per-rank means is not
        the mean over tokens. Each rank backpropagates ``Σ nll · world_size / N``, where ``N`` is the
        real-token count summed over ranks (one all-reduce of two numbers per batch); DDP/FSDP average
        the gradients over ranks, which gives the gradient of ``Σ_ranks Σ nll / N``. ``train/loss``
        logs that global mean (the same value on every rank); the returned per-rank loss is not it.
        A batch without real targets has loss 0.

        The loss is ``linear_cross_entropy``: the logits' gradient is written during the forward
        pass over the logits themselves, and the logits are not returned.

        Gradient accumulation: Lightning divides each micro-batch's loss by
        ``accumulate_grad_batches``, so each micro-batch's (global) token mean weighs equally,
        whatever its number of real tokens. Weighting by tokens would need the whole window's count
        before the first backward; packed rows are nearly full, so the counts barely differ there.
        """
        # Metrics only on the steps Lightning writes: ``self.log`` costs about as much host time as
        # this small model's forward.
        parts = self._loss_parts(batch)
        real = parts.real.clamp(min=1)  # no real target: loss 0, not NaN
        if self._trainer is None or self.trainer.world_size == 1:
            loss = global_loss = parts.nll_sum / real
        else:
            loss, global_loss = self._distributed_loss(parts)
        self._guard.add_loss(global_loss)
        if self._logs_this_step():
            bad = self._guard.pending(self._trainer)
            metrics = torch.stack([global_loss.detach().float(), (parts.hits / real).float(), bad.to(real.device)])
            self._train_metrics = _copy_to_host(metrics)
        return loss

    def on_after_backward(self) -> None:
        """Log the step's ``train/loss`` and ``train/acc`` (copied to the host during the forward)
        once its backward is queued, so the one wait for the GPU of a logged step waits for the
        forward only, with the backward's kernels already in the queue. They are logged as CPU
        tensors: Lightning converts progress-bar values to numbers after every step until the epoch
        ends, and from CUDA tensors each conversion would wait for the GPU on every step."""
        if self._train_metrics is None:
            return
        (values, copied), self._train_metrics = self._train_metrics, None
        if copied is not None:
            copied.synchronize()
        loss, accuracy, bad = values.clone()  # the pinned buffer goes back to the allocator
        self._guard.after_read(int(bad), self.global_step + 1, self.trainer, self.hparams.lr)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", accuracy, prog_bar=True)

    def on_train_start(self) -> None:
        self._last_step = self.trainer.estimated_stepping_batches
        self._guard.checked_step = self.global_step
        if self.global_step > 0 and self._schedule is not None:  # resumed: the restored optimizer follows hparams
            optimizer, schedule, total = self._schedule
            hp = self.hparams
            old, new = reapply_optimizer_hparams(optimizer, schedule, hp.lr, hp.betas, [hp.weight_decay, 0.0])
            if warning := schedule_change(self.global_step, old, new, self._saved_schedule_steps, total):
                rank_zero_warn(warning)

    def on_train_end(self) -> None:
        save_last_checkpoint(self.trainer)  # every run ends with last.ckpt (unless checkpointing is off)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Count non-finite gradients (on the device); in skip mode drop the step's gradients if
        they or its loss are not finite, so that ``optimizer.step`` leaves the weights alone."""
        if self._trainer is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self._guard.add_grads(params, scaled=_has_scaler(self.trainer)):
            for p in params:
                p.grad = None

    def _logs_this_step(self) -> bool:
        """Every ``log_every_n_steps`` optimizer steps and on the last one (as Lightning writes logs)."""
        if self._trainer is None:
            return True
        step = self.global_step + 1
        return step % self.trainer.log_every_n_steps == 0 or step >= getattr(self, "_last_step", step)

    def _distributed_loss(self, parts: LossParts) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to backpropagate on this rank, global token mean for ``train/loss``)."""
        # [Σ nll, real tokens] of this rank -> of all ranks, in one collective (fp32 counts are exact
        # up to 2^24 real tokens per global batch)
        totals = torch.stack([parts.nll_sum.detach(), parts.real.to(parts.nll_sum.dtype)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)  # sum
        else:
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        tokens = totals[1].clamp(min=1)  # no real token anywhere: loss 0, not NaN
        return parts.nll_sum * self.trainer.world_size / tokens, totals[0] / tokens  # already global

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def _eval_step(self, batch: dict) -> None:
        logits_BTV = self._batch_forward(batch)
        hits, real = token_hits(logits_BTV, batch["labels"])
        self.val_nll.update(self._cross_entropy(logits_BTV, batch["labels"], reduction="sum"))
        self.val_correct.update(hits)
        self.val_tokens.update(real)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def _log_eval(self, prefix: str) -> None:
        """``<prefix>/loss`` = Σ nll / tokens, ``/ppl`` = exp(loss), ``/acc`` = Σ correct / tokens
        (correct: the label's logit is the row's maximum, ties included, as for ``train/acc``)."""
        sums = [metric.compute() for metric in (self.val_nll, self.val_correct, self.val_tokens)]
        nll, correct, tokens = torch.stack(sums).cpu()  # one wait for the GPU per validation
        loss = nll / tokens
        self.log_dict(
            {f"{prefix}/loss": loss, f"{prefix}/ppl": loss.exp(), f"{prefix}/acc": correct / tokens},
            prog_bar=prefix == "val",
        )
        for metric in (self.val_nll, self.val_correct, self.val_tokens):
            metric.reset()

    # -- optimization --------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        scaled_clipping = (
            self._trainer is not None and bool(self.trainer.gradient_clip_val) and _has_scaler(self.trainer)
        )
        optimizer = adamw(self.model, hp.lr, hp.betas, hp.weight_decay, self.device, scaled_clipping)
        total = max(1, self.trainer.estimated_stepping_batches) if self._trainer else 1
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        self._schedule = (optimizer, schedule, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping, except for a fused optimizer with nothing scaled (bf16, fp32):
        Lightning's mixed-precision plugin refuses fused optimizers even then, so the gradients
        are clipped here directly (norm or value, as configured)."""
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if gradient_clip_val and fused and not _has_scaler(self.trainer):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the tokenizer (``self.tokenizer``, else the data module's) and the schedule's length
        beside the weights, under ``checkpoint["lit_xf"]``. While fitting, refuse to write non-finite
        weights, or after a non-finite step not yet read (on_nonfinite="stop"): the last good
        checkpoint stays."""
        extra = checkpoint.setdefault("lit_xf", {})
        if self._schedule is not None:
            extra["schedule_steps"] = self._schedule[2]
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if state := tokenizer_state(self.tokenizer or getattr(datamodule, "tokenizer", None)):
            extra["tokenizer"] = state
        if self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        bad, finite = int(self._guard.pending(self.trainer)), weights_finite(self.parameters())
        # non-finite weights are never written, whatever on_nonfinite says
        self._guard.after_read(max(bad, not finite), self.global_step, self.trainer, self.hparams.lr, stop=not finite)

    @classmethod
    def load_from_checkpoint(
        cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, weights_only=None, **kwargs
    ) -> LitTinyGPT:
        """Lightning's ``load_from_checkpoint``, reading the file as weights only whatever the path:
        a local file, an ``http(s)://`` or other fsspec URL (fetched first), or a file object
        (see ``lit_xf.checkpoints``). Unreadable files raise ``CheckpointError`` (a ``ValueError``)."""
        refuse_unsafe(weights_only)
        source = checkpoint_source(checkpoint_path) if isinstance(checkpoint_path, str | Path) else checkpoint_path
        load = super().load_from_checkpoint
        kwargs.setdefault("init_weights", None)  # the checkpoint's weights replace them anyway
        with checkpoint_errors(checkpoint_path):
            return load(source, map_location, hparams_file, strict, weights_only=True, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, with the differences named, a checkpoint whose weights don't fit this model.

        Checkpoints saved before ``GPTConfig`` hold the architecture as flat hyperparameters
        (``d_model``, ``n_layers``, ... beside ``lr``). Loaded without ``arch=``, this model has the
        default architecture: unless every field agrees, the error gives the ``arch=GPTConfig(...)``
        to load them with (``lit_xf.resume.check_checkpoint_fits``). Reads the tokenizer and the
        schedule's length stored beside the weights."""
        extra = checkpoint.get("lit_xf", {})
        self._saved_schedule_steps = extra.get("schedule_steps")
        if "tokenizer" in extra:
            self.tokenizer = tokenizer_from_state(extra["tokenizer"])
        check_checkpoint_fits(checkpoint, self.hparams.get("arch") or self.model.config, self.state_dict)

    # -- accounting --------------------------------------------------------------------------
    def flops_per_batch(self, batch: dict) -> int:
        """Training FLOPs (forward + backward ≈ 3 × forward) of the useful work in a batch:
        2·P_matmul per real token, plus per layer 4·H·K per attended (query, key) pair, where pairs
        = Σ over documents L(L+1)/2 — causal and block-diagonal sparsity, not T² per row (with a
        sliding window of W tokens, ``attended_pairs``: Σ_i min(i + 1, W) per document)."""
        if self._flops_constants is None:  # (matmul weights, FLOPs per attended pair) of this model
            m = self.model
            matmul = sum(mod.weight.numel() for mod in m.modules() if isinstance(mod, nn.Linear))
            self._flops_constants = (matmul, 4 * m.config.n_layers * m.config.n_heads * m.config.head_size)
        matmul, per_pair = self._flops_constants
        stats = batch.get("stats") or {}
        window = self.model.attention_window
        if "causal_pairs" in stats and window is None:  # counted by the collate, off the training thread
            real_tokens, pairs = stats["real_tokens"], stats["causal_pairs"]
        else:
            real_tokens = sum(n for row in batch["doc_lens"] for n in row)
            pairs = sum(attended_pairs(n, window) for row in batch["doc_lens"] for n in row)
        return 3 * (2 * matmul * real_tokens + per_pair * pairs)

    # -- sampling ----------------------------------------------------------------------------
    def predict_step(self, batch: dict, batch_idx: int = 0) -> torch.Tensor:
        """``generate`` on a prompt batch (``lit_xf.generate.prompt_batches``): ``prompt_ids [B, T0]``
        with ``max_new_tokens``, ``temperature``, ``top_k``, ``eos_id`` and ``seed`` (of the sampling
        generator); returns ``[B, T0 + n]``."""
        generator = torch.Generator(device=self.device).manual_seed(int(batch["seed"]))
        return self.generate(
            batch["prompt_ids"],
            int(batch["max_new_tokens"]),
            float(batch["temperature"]),
            batch["top_k"],
            batch["eos_id"],
            generator,
        )

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample continuations of ``prompt_ids [B, T0]`` (or ``[T0]``): softmax(logits/temperature)
        restricted to the top-k; temperature 0 is greedy. Stops early once every row emitted
        ``eos_id``. Returns ``[B, T0 + n]``."""
        if temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"need temperature >= 0 and top_k >= 1, got {temperature}, {top_k}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if prompt_ids.shape[-1] == 0:
            raise ValueError("the prompt is empty: generation continues at least one token id")
        ids = prompt_ids[None] if prompt_ids.ndim == 1 else prompt_ids
        ids = ids.to(self.device)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            # eager: a compiled whole-model graph would recompile for every new length
            logits = self(ids[:, -self.model.max_seq_len :], eager=True)[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            if eos_id is not None:
                nxt = torch.where(done[:, None], torch.full_like(nxt, eos_id), nxt)
                done |= nxt[:, 0] == eos_id
            ids = torch.cat([ids, nxt], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return ids if prompt_ids.ndim > 1 else ids[0]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms, biases and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    device: torch.device,
    scaled_clipping: bool = False,
) -> torch.optim.AdamW:
    """AdamW over ``param_groups``, fused on CUDA, except when gradients are clipped under a
    GradScaler ("16-mixed"): the fused kernel unscales inside, after clipping needed them unscaled."""
    return torch.optim.AdamW(
        param_groups(model, weight_decay),
        lr=lr,
        betas=tuple(betas),
        fused=device.type == "cuda" and not scaled_clipping,
    )


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """lr multiplier: step/warmup during warm-up, then min + (1−min)·½(1 + cos(π·progress))."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _has_scaler(trainer) -> bool:
    """Whether the precision plugin scales the loss (a GradScaler: "16-mixed")."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def _copy_to_host(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``values`` on the way to the host: from CUDA a copy into pinned memory that doesn't wait
    (complete once the returned event is), else a host copy made now (no event)."""
    if not values.is_cuda:
        return values.cpu(), None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied
