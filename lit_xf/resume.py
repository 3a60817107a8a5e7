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

Keys the user did not give keep the checkpoint's values, as in Lightning. Whatever the route, a
checkpoint whose weights don't fit the model is refused with the differences named
(:func:`check_checkpoint_fits`, called by ``LitTinyGPT.on_load_checkpoint``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lit_xf.config import FIELD_NAMES, WEIGHT_FIELDS, GPTConfig


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


def check_checkpoint_fits(checkpoint: Mapping, arch: Mapping | GPTConfig, state_dict) -> None:
    """Refuse, with the differences named, a checkpoint whose weights don't fit a model of ``arch``
    (``state_dict``: the model's, called only when the checkpoint holds weights). Checkpoints saved
    before ``GPTConfig`` hold the architecture flat: unless every field agrees, the error gives the
    ``arch=GPTConfig(...)`` that loads them."""
    saved_hp = checkpoint.get("hyper_parameters", {})
    # load_from_checkpoint(path, arch=...) has replaced the saved "arch" with the one given
    mine = _resolved(arch)
    flat = flat_arch(saved_hp)
    if flat is not None and "arch" not in saved_hp:
        if differ := _differences(flat, mine, FIELD_NAMES):  # all: a window or a kernel changes results too
            raise ValueError(
                f"checkpoint keeps its architecture as flat hyperparameters (saved before GPTConfig) and it "
                f"differs from this model's ({'; '.join(differ)}); load it with LitTinyGPT.load_from_checkpoint("
                f"path, arch={_config_call(flat)}), or resume training with a model of that arch"
            )
    hp_diff = _differences(flat or saved_hp.get("arch") or {}, mine, WEIGHT_FIELDS)
    # A sharded (FSDP) checkpoint has no "state_dict": the strategy loads the shards itself.
    saved = checkpoint.get("state_dict")
    mine = state_dict() if saved is not None else {}
    saved = saved or {}
    shape_diff = [
        f"{k}: checkpoint {list(v.shape)} vs model {list(mine[k].shape)}"
        for k, v in saved.items()
        if k in mine and v.shape != mine[k].shape
    ]
    missing, unexpected = mine.keys() - saved.keys(), saved.keys() - mine.keys()
    if hp_diff or shape_diff or missing or unexpected:
        what = (
            hp_diff
            + shape_diff[:3]
            + [f"{len(s)} {name} weights" for s, name in ((missing, "missing"), (unexpected, "unexpected")) if s]
        )
        raise ValueError(
            f"checkpoint was saved by a model of another configuration ({'; '.join(what)}); "
            "LitTinyGPT.load_from_checkpoint(path) without overrides rebuilds its own model"
        )


def _norm(value):
    return value if isinstance(value, str | int | float | bool | type(None)) else repr(value)


def flat_arch(hparams: Mapping) -> dict | None:
    """The architecture fields that hyperparameters saved before ``GPTConfig`` hold flat (beside
    ``lr``), or None where there are none."""
    found = {k: hparams[k] for k in FIELD_NAMES if k in hparams}
    return found or None


def _resolved(fields: Mapping | GPTConfig) -> dict:
    """The fields (of a config or a dict of them) with ``n_kv_heads`` null resolved to ``n_heads``."""
    fields = fields.to_dict() if isinstance(fields, GPTConfig) else dict(fields)
    if fields.get("n_kv_heads") is None and "n_heads" in fields:
        fields["n_kv_heads"] = fields["n_heads"]
    return fields


def _differences(saved: Mapping | GPTConfig, mine: dict, keys: tuple[str, ...]) -> list[str]:
    """``"key: checkpoint a vs model b"`` for each of ``keys`` that ``saved`` holds with another value."""
    saved = _resolved(saved)
    return [
        f"{k}: checkpoint {saved[k]!r} vs model {mine[k]!r}"
        for k in keys
        if k in saved and k in mine and _norm(saved[k]) != _norm(mine[k])
    ]


def _config_call(fields: Mapping) -> str:
    """``GPTConfig(...)`` source for ``fields``, listing only the values that differ from the defaults."""
    default = GPTConfig().to_dict()
    args = ", ".join(f"{k}={v!r}" for k, v in fields.items() if k in default and v != default[k])
    return f"GPTConfig({args})"
