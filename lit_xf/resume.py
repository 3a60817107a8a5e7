"""Resuming from a checkpoint without losing what the command line asked for.

Lightning's ``LightningCLI`` loads a checkpoint's hyperparameters over the parsed config, so
``fit --ckpt_path X --model.arch.d_model 128`` silently trains X's architecture, and even
``--model.lr`` is then overwritten by the optimizer state Lightning restores. Here the model keys
given on the command line or in a config file are compared with the checkpoint's
(:func:`merge_resume_hparams`):

- keys that fix the weights (``GPTConfig``'s ``WEIGHT_FIELDS``, and ``max_seq_len`` under learned
  positions, whose table has one row per position) are refused by name when they differ;
- every other key (the optimizer's and the schedule's settings, the attention kernel, ``compile``,
  ``dropout``, ``on_nonfinite`` ...) is applied and named in one log line; once the trainer has
  restored the optimizer and the schedule, :func:`reapply_optimizer_hparams` sets their learning
  rate, betas and weight decay from the hyperparameters again, and warns when the learning rate
  jumps (a new ``max_steps`` stretches the cosine schedule: :func:`schedule_change`).

Keys the user did not give keep the checkpoint's values, as in Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lit_xf.config import FIELD_NAMES, WEIGHT_FIELDS


def _plain(value: Any) -> Any:
    """Comparable plain data: namespaces and mappings as dicts, tuples as lists."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _flat(model: Mapping) -> dict[str, Any]:
    """``{"lr": .., "arch.d_model": ..}``: model keys, the architecture's one level down."""
    flat = {}
    for key, value in model.items():
        if key == "arch" and isinstance(value, Mapping):
            flat.update({f"arch.{k}": v for k, v in value.items()})
        elif not key.startswith("_"):
            flat[key] = value
    return flat


def _with_arch(hparams: Mapping) -> dict[str, Any]:
    """Hyperparameters with the architecture under ``arch`` (checkpoints saved before GPTConfig
    keep its fields flat, beside ``lr``)."""
    hparams = {k: v for k, v in _plain(hparams).items() if k != "_instantiator"}
    if "arch" not in hparams and any(k in hparams for k in FIELD_NAMES):
        hparams["arch"] = {k: hparams.pop(k) for k in FIELD_NAMES if k in hparams}
    return hparams


def _same(key: str, given: Any, saved: Any, arch: Mapping) -> bool:
    if key == "arch.n_kv_heads":  # null means n_heads
        given = given if given is not None else arch.get("n_heads")
        saved = saved if saved is not None else arch.get("n_heads")
    return given == saved


def merge_resume_hparams(path: str, saved: Mapping, given: Mapping) -> tuple[dict[str, Any], list[str]]:
    """(hyperparameters to resume with, ``"model.key=new (checkpoint: old)"`` for each key applied).

    ``saved``: the checkpoint's ``hyper_parameters``; ``given``: the model keys set on the command
    line or in a config file. Raises ``ValueError`` naming every weight-shaping key that differs."""
    saved = _with_arch(saved)
    arch = saved.get("arch") or {}
    weight_keys = {f"arch.{k}" for k in WEIGHT_FIELDS}
    if arch.get("positions", "learned") == "learned":
        weight_keys.add("arch.max_seq_len")  # one learned embedding per position
    old, new = _flat(saved), _flat(_plain(given))
    changed = {k: v for k, v in new.items() if k not in old or not _same(k, v, old[k], arch)}
    refused = sorted(k for k in changed if k in weight_keys and k in old)
    if refused:
        held = ", ".join(f"model.{k}={old[k]!r}" for k in refused)
        asked = ", ".join(f"model.{k}={changed[k]!r}" for k in refused)
        raise ValueError(
            f"checkpoint {path} holds a model with {held}, but the command line or config asks for {asked}: "
            "a checkpoint's architecture can't change (drop those keys to resume it, or leave out --ckpt_path "
            "to train a new model)"
        )
    merged = {**saved, "arch": dict(arch)}
    for key, value in changed.items():
        if key.startswith("arch."):
            merged["arch"][key[5:]] = value
        else:
            merged[key] = value
    if not merged["arch"]:
        del merged["arch"]
    applied = [
        f"model.{k}={v!r} ({f'checkpoint: {old[k]!r}' if k in old else 'not in the checkpoint'})"
        for k, v in sorted(changed.items())
    ]
    return merged, applied


def schedule_change(step: int, old_lr: float, new_lr: float, old_steps: int | None, new_steps: int) -> str | None:
    """The warning for a resumed schedule whose learning rate at ``step`` moves, or whose end moved."""
    moved = not math.isclose(old_lr, new_lr, rel_tol=1e-6, abs_tol=1e-12)
    if old_steps is not None and old_steps != new_steps:
        return (
            f"resumed at step {step} with trainer.max_steps={new_steps}, but the checkpoint's schedule ends at step "
            f"{old_steps}: the cosine decay is recomputed for the new end, so the learning rate goes from "
            f"{old_lr:.2e} to {new_lr:.2e} here (resume with --trainer.max_steps {old_steps} to finish the old "
            "schedule)"
        )
    if moved:
        return (
            f"resumed at step {step} with another learning-rate schedule (model.lr, warmup_steps or min_lr_ratio): "
            f"the learning rate goes from {old_lr:.2e} to {new_lr:.2e} here"
        )
    return None


def reapply_optimizer_hparams(
    optimizer, scheduler, lr: float, betas, weight_decays: list[float]
) -> tuple[float, float]:
    """Set AdamW's groups and the LambdaLR schedule, restored from a checkpoint, from the model's
    hyperparameters again: group ``i`` gets ``weight_decays[i]``; the schedule's base rate becomes
    ``lr`` and the current rate ``lr · λ(step)``. Returns (the restored learning rate, the new one)."""
    old_lr = scheduler.get_last_lr()[0]
    for group, decay in zip(optimizer.param_groups, weight_decays, strict=True):
        group.update(betas=tuple(betas), weight_decay=decay, initial_lr=lr)
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    rates = [lr * factor(scheduler.last_epoch) for factor in scheduler.lr_lambdas]
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports until the next step
    return old_lr, rates[0]
