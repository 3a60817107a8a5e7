"""A callback that finds where a training step waits for the GPU (docs/benchmarks.md §4).

From step ``start`` to ``stop`` it turns on ``torch.cuda.set_sync_debug_mode("warn")`` and counts
each synchronizing call by its Python stack; at the ends of steps ``lead_steps`` it measures how far
the host runs ahead (the wait for the queued GPU work). Writes ``out`` (JSON) at step ``stop``.

Usage: append ``- class_path: sync_watch.SyncWatch`` to a config's ``trainer.callbacks``, then
``PYTHONPATH=scripts lit-xf fit --config that.yaml --trainer.max_steps 31`` on a GPU."""

import collections
import json
import os
import time
import traceback
import warnings

import lightning as L
import torch


class SyncWatch(L.Callback):
    def __init__(self, start: int = 10, stop: int = 30, lead_steps=(15, 20, 25, 29), out: str = "step_syncs.json"):
        self.start, self.stop, self.lead_steps, self.out = start, stop, set(lead_steps), out
        self.hits: collections.Counter = collections.Counter()
        self.lead: dict[int, float] = {}
        self._show_warning = warnings.showwarning

    def _record(self, message, category, filename, lineno, file=None, line=None):
        frames = traceback.extract_stack()[:-1]
        keep = ("lightning", "lit_xf", "torch/", "torchmetrics", "flash_attn")
        stack = [
            f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in frames if any(k in f.filename for k in keep)
        ]
        self.hits[(str(message)[:80], " <- ".join(stack[::-1][:10]))] += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start:
            warnings.simplefilter("always")
            warnings.showwarning = self._record
            torch.cuda.set_sync_debug_mode("warn")
        elif trainer.global_step == self.stop:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = self._show_warning
            syncs = [{"n": n, "msg": m, "stack": s} for (m, s), n in self.hits.most_common()]
            with open(self.out, "w") as f:
                json.dump({"host_lead_ms_at_step_end": self.lead, "syncs": syncs}, f, indent=1)
            print(
                f"{sum(self.hits.values())} synchronizing calls in steps {self.start}-{self.stop - 1}; lead {self.lead}"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        if step in self.lead_steps:
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            t0 = time.perf_counter()
            torch.cuda.synchronize()
            self.lead[step] = round((time.perf_counter() - t0) * 1e3, 2)
            torch.cuda.set_sync_debug_mode(mode)
