"""Non-finite losses and gradients, found without waiting for the device on unlogged steps.

Every training step adds, on the device, ``1 − isfinite(loss)`` to a counter, and (without a
GradScaler) ``1 − isfinite(Σ_p ‖∇p‖)`` once its gradients are complete: a few scalar kernels, no
host sync. The counter is read where the host waits anyway: on the logged steps, in the same copy
as ``train/loss``, and before a checkpoint is written (which also checks the weights). Several
processes sum their counters on those steps, so they all stop together.

``on_nonfinite``:

- ``stop`` (the default): the first read that finds a non-finite step raises
  :class:`NonFiniteError`, naming the steps and the likely causes; no checkpoint is written from
  the broken weights, so the last good one stays.
- ``skip``: a step whose loss or gradients are not finite does not update the weights (its
  gradients are dropped before ``optimizer.step``: AdamW skips parameters without gradients). That
  decision reads a flag on every step, one host sync each. Under a GradScaler (``16-mixed``) the
  scaler itself skips steps with non-finite gradients, as it always does, and lowers its scale;
  the skipped steps are counted and reported on the logged steps either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import torch
from lightning.pytorch.utilities import rank_zero_warn

OnNonFinite = Literal["stop", "skip"]
ON_NONFINITE: tuple[str, ...] = get_args(OnNonFinite)


class NonFiniteError(ValueError):
    """Training met a non-finite loss or gradient and stopped (``on_nonfinite='stop'``)."""


def grads_finite(params) -> torch.Tensor | None:
    """``isfinite(Σ_p ‖∇p‖₂)`` as a device bool (any inf or NaN element makes the sum non-finite);
    None where no parameter has a gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.stack(torch._foreach_norm(grads)).sum().isfinite()


def weights_finite(params) -> bool:
    """Whether every weight is finite (one host read)."""
    tensors = [p.detach() for p in params]
    return not tensors or bool(torch.stack(torch._foreach_norm(tensors)).sum().isfinite())


class NonFiniteGuard:
    """The device-side count of non-finite steps since the last read, and what the reads found."""

    def __init__(self, mode: OnNonFinite = "stop"):
        if mode not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite={mode!r}: choose one of {', '.join(ON_NONFINITE)}")
        self.mode = mode
        self.count: torch.Tensor | None = None  # int32 on the device
        self.step_ok: torch.Tensor | None = None  # this step's loss finite (skip mode)
        self.checked_step = 0  # steps 1..checked_step were read as finite
        self.skipped = 0  # steps skipped since the last report

    def _add(self, bad: torch.Tensor) -> None:
        if self.count is None:
            self.count = torch.zeros((), dtype=torch.int32, device=bad.device)
        self.count.add_(bad)

    def add_loss(self, loss: torch.Tensor) -> None:
        ok = loss.detach().isfinite()
        self._add(~ok)
        if self.mode == "skip":
            self.step_ok = ok if self.step_ok is None else self.step_ok & ok

    def add_grads(self, params, scaled: bool) -> bool:
        """Count the step's gradients (not under a GradScaler, which handles them). In skip mode,
        returns whether this step must be skipped (reading the flag: a host sync)."""
        ok = None if scaled else grads_finite(params)
        if ok is not None:
            self._add(~ok)
        if self.mode != "skip" or scaled:
            self.step_ok = None
            return False
        step_ok = ok if self.step_ok is None else (self.step_ok if ok is None else self.step_ok & ok)
        self.step_ok = None
        skip = step_ok is not None and not bool(step_ok)
        self.skipped += skip
        return skip

    def pending(self, trainer=None) -> torch.Tensor:
        """The count since the last read, summed over the trainer's ranks, as a float32 scalar (to
        copy to the host beside ``train/loss``); the device count restarts."""
        if self.count is None:
            return torch.zeros(())
        pending = self.count.float()
        self.count.zero_()  # after the copy above, in stream order
        if trainer is not None and trainer.world_size > 1:
            pending = trainer.strategy.reduce(pending, reduce_op="sum")
        return pending

    def after_read(self, bad: int, step: int, trainer, lr: float, stop: bool = False) -> None:
        """After a read at ``step`` that found ``bad`` non-finite values: raise
        :class:`NonFiniteError` (on_nonfinite="stop", or ``stop``) or warn that steps were skipped."""
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        if bad and (self.mode == "stop" or stop):
            raise NonFiniteError(self.message(step, lr, str(trainer.precision), _newest_checkpoint(trainer), scaled))
        if bad:
            rank_zero_warn(
                f"skipped step(s) with a non-finite loss or gradients between steps {self.checked_step + 1} and "
                f"{step} (model.on_nonfinite=skip{', by the GradScaler' if scaled else ''})"
            )
        self.checked_step = step

    def message(self, found_at: int, lr: float, precision: str, last_checkpoint: str | None, scaled: bool) -> str:
        """The one-line account of a non-finite step found by the read at step ``found_at``."""
        first = self.checked_step + 1
        where = f"at step {found_at}" if first >= found_at else f"in steps {first}..{found_at} (read on logged steps)"
        causes = [f"the learning rate is too high (model.lr={lr:g})"]
        if precision.startswith("16") or precision == "transformer-engine-float16":
            if scaled:
                causes.append(
                    f"fp16 overflow in the forward (trainer.precision={precision}; bf16-mixed has fp32's range)"
                )
            else:
                causes.append(f"fp16 overflow without a GradScaler (trainer.precision={precision}: use 16-mixed)")
        causes.append("bad data (a batch with out-of-range ids or labels)")
        kept = f"the last good checkpoint stays ({last_checkpoint})" if last_checkpoint else "no checkpoint was written"
        return (
            f"non-finite loss or gradients {where}; likely causes: {', '.join(causes)}; training stopped and "
            f"{kept}; model.on_nonfinite=skip skips such steps instead"
        )


def _newest_checkpoint(trainer) -> str | None:
    """The newest checkpoint in the trainer's checkpoint folder (ModelCheckpoint names its next file
    before writing it, so its own paths may not exist yet)."""
    folder = getattr(trainer.checkpoint_callback, "dirpath", None)
    saved = sorted(Path(folder).glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if folder else []
    return str(saved[-1]) if saved else None
