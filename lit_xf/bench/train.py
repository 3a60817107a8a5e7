"""``lit-xf bench train``: end-to-end training steps, a hand-written loop against Lightning and
lit_xf with its monitors (``bench_train``), and the clocks it needs: ``StepClock`` (timed steps,
their real tokens, FLOPs and losses) and ``MonitorHookTime`` (host µs in the monitors' hooks)."""

from __future__ import annotations

import collections
import itertools
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from lit_xf.bench.output import progress
from lit_xf.bench.profile import ProfileWindow
from lit_xf.bench.timing import GcPauses, sync
from lit_xf.callbacks import precision_dtype


def bench_train(args) -> list[dict]:
    """The same model, data and steps several ways (``--variants``): a hand-written PyTorch loop, a
    bare Lightning Trainer, lit_xf as configured (monitoring callbacks + TensorBoard), each eager or
    compiled. Times steps after ``--warmup-steps`` with synchronized host clocks; ``warmup_s`` is the
    time before them (compilation included) in the first run. With ``--repeats R`` every variant
    runs R times, interleaved, and the median run is reported (``ms_range``: fastest-slowest;
    ``ms_runs``: each run in order; ``time_vs_first``: all its runs' time over the first variant's).
    Odd repeats run the variants in reverse order, so a drift within a repeat, or a run slowed by
    the one before it, weighs on every variant alike; ``ratio_vs_first`` is the median over repeats
    of a run's time over the first variant's run in the same repeat (the overhead measure least
    moved by one slow run).
    MFU counts ``LitTinyGPT.flops_per_batch`` against the device's dense peak. ``--profile-steps
    A:B`` profiles steps A..B-1 (inside the warm-up) of each variant's first run (``ProfileWindow``).
    Per-step losses go to ``<name>_losses.json``; ``loss_diff`` is their mean absolute difference
    from the first variant's (same data, same initialization)."""
    import yaml

    from lit_xf.callbacks import resolve_peak_flops
    from lit_xf.data import TextDataModule

    cfg = yaml.safe_load(Path(args.config).read_text())
    data_kwargs = dict(cfg.get("data") or {})
    if args.batch_size:
        data_kwargs["batch_size"] = args.batch_size
    if args.batch_mode:
        data_kwargs["batch_mode"] = args.batch_mode
    dm = TextDataModule(**data_kwargs)
    dm.setup("fit")
    model_kwargs = dict(cfg.get("model") or {})  # LitTinyGPT's arguments, the architecture under "arch"
    arch = dict(model_kwargs.get("arch") or {}) | dict(vocab_size=dm.vocab_size, max_seq_len=dm.hparams.seq_len)
    if args.attention:
        arch["attention"] = args.attention
    if args.mlp_kernel:
        arch["mlp_kernel"] = args.mlp_kernel
    model_kwargs["arch"] = arch
    trainer_cfg = cfg.get("trainer") or {}
    precision = args.precision or trainer_cfg.get("precision", "32-true")
    device = torch.device(args.device)
    peak = resolve_peak_flops(device, precision)
    parsed = {variant: _parse_variant(variant) for variant in args.variants}  # bad names fail before any run
    if args.profile_steps and args.profile_steps[1] > args.warmup_steps:
        raise ValueError(
            f"--profile-steps {args.profile_steps[0]}:{args.profile_steps[1]} must end by --warmup-steps "
            f"{args.warmup_steps}: the profiled steps are slower, and timed steps must not include them"
        )
    results: dict[str, list[dict]] = {variant: [] for variant in args.variants}
    peaks: dict[str, int | None] = {}
    profiles: dict[str, dict] = {}
    for repeat in range(args.repeats):  # interleaved: drifts in clocks and host load hit every variant alike
        for variant in args.variants if repeat % 2 == 0 else args.variants[::-1]:
            torch.manual_seed(0)
            torch.compiler.reset()  # each run compiles its own model (no stale graphs or CUDA-graph trees)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            base, parts = parsed[variant]
            run = hand_loop if base == "loop" else _lightning_run
            window = ProfileWindow(args.profile_steps if repeat == 0 else None, device)
            with GcPauses() as pauses:
                res = run(base, parts, model_kwargs, dm, precision, args, trainer_cfg, device, window)
            res["gc_ms"], res["gc_full"] = pauses.since(res["t0"])
            results[variant].append(res)
            peaks[variant] = round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None
            if window.result is not None:
                profiles[variant] = window.result
    rows, curves = [], {}
    tokens = dm.hparams.batch_size * dm.hparams.seq_len
    for variant in args.variants:
        runs = sorted(results[variant], key=lambda r: r["timed_s"])
        res = runs[len(runs) // 2]  # the median run (upper median for an even count)
        ms = res["timed_s"] / (args.steps - args.warmup_steps) * 1e3
        row = dict(
            variant=variant,
            precision=precision,
            attention=res["attention"],
            mlp_kernel=res["mlp_kernel"],
            steps=args.steps,
            ms_per_step=round(ms, 3),
            tokens_per_s=round(tokens / ms * 1e3),
            real_tokens_per_s=round(res["real_tokens"] / res["timed_s"]),
            final_loss=round(res["losses"][-1], 4),
            peak_mib=peaks[variant],
            mfu=round(res["flops"] / res["timed_s"] / peak, 4) if peak else None,
            warmup_s=round(results[variant][0]["warmup_s"], 2),
            gc_ms=round(res["gc_ms"], 1),
            gc_full=res["gc_full"],
        )
        if res.get("hook_us") is not None:
            row["hook_us"] = res["hook_us"]
        if args.repeats > 1:
            fastest, slowest = (r["timed_s"] / res["timed_s"] * ms for r in (runs[0], runs[-1]))
            row["ms_range"] = f"{fastest:.3f}-{slowest:.3f}"
            # in run order: repeat i of every variant ran back to back, so ratios pair up per repeat
            row["ms_runs"] = [round(r["timed_s"] / (args.steps - args.warmup_steps) * 1e3, 3) for r in results[variant]]
            # time of all this variant's runs over all the first variant's: the overhead of, e.g.,
            # lit_xf against lightning+tb, steadier than a ratio of medians
            row["time_vs_first"] = round(
                sum(r["timed_s"] for r in results[variant]) / sum(r["timed_s"] for r in results[args.variants[0]]), 4
            )
            pairs = zip(results[variant], results[args.variants[0]], strict=True)
            row["ratio_vs_first"] = round(statistics.median(r["timed_s"] / f["timed_s"] for r, f in pairs), 4)
        curves[variant] = [round(x, 5) for x in res["losses"]]
        first = curves[args.variants[0]]
        row["loss_diff"] = round(statistics.fmean(abs(a - b) for a, b in zip(curves[variant], first, strict=True)), 5)
        rows.append(row)
        progress(row)
    base = next((r["tokens_per_s"] for r in rows if r["variant"] == "loop"), None)
    for r in rows:
        r["vs_loop"] = round(r["tokens_per_s"] / base, 3) if base else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name or 'train'}_losses.json").write_text(json.dumps(curves))
    if profiles:
        for r in rows:
            busy = profiles.get(r["variant"], {}).get("gpu_busy_frac")
            r["profiled_gpu_busy"] = round(busy, 4) if busy is not None else None
        (args.out / f"{args.name or 'train'}_profile.json").write_text(json.dumps(profiles, indent=1))
    return rows


# Variant = base ("loop", "lightning", "lit_xf") + optional parts. "lit_xf" is every monitor + TensorBoard;
# "lightning+memory+tb" only the ones named; compile modes apply to the loop too (TinyGPT.compile_model).
_MONITOR_PARTS = {"tb", "atb", "memory", "timer", "throughput", "noprofile"}
# "loop+rows": the usual hand-written GPT loop (nanoGPT's): each row is one causal sequence through
# sdpa and torch's MLP, documents attending across their boundaries, positions 0..T-1; same weights and data.
# Loops compute logits and then the loss, as written by hand; "+fused" takes lit_xf's loss instead
# (``linear_cross_entropy``, fused with the output projection).
_LOOP_PARTS = {"rows", "fused"}
_COMPILE_PARTS = {"compile": "blocks", "compile_model": "model", "cudagraphs": "cudagraphs"}


def _parse_variant(variant: str) -> tuple[str, set[str]]:
    base, *extra = variant.split("+")
    parts = set(extra)
    allowed = set(_COMPILE_PARTS) | (_MONITOR_PARTS if base != "loop" else _LOOP_PARTS)
    if base not in ("loop", "lightning", "lit_xf") or parts - allowed or len(parts & set(_COMPILE_PARTS)) > 1:
        raise ValueError(
            f"unknown train variant {variant!r}: use loop, lightning or lit_xf, optionally with one of "
            "+compile +compile_model +cudagraphs; loop also with +rows (no document masking, sdpa) and "
            "+fused (lit_xf's fused loss); "
            "Lightning ones also with +tb +atb +memory +timer +throughput +noprofile"
        )
    if base == "lit_xf":
        parts |= {"tb", "memory", "timer", "throughput"}
    return base, parts


def _compile_mode(parts: set[str]) -> str | bool:
    return next((mode for part, mode in _COMPILE_PARTS.items() if part in parts), False)


def hand_loop(base, parts, model_kwargs, dm, precision, args, trainer_cfg, device, window) -> dict:
    """What a user writes by hand: autocast (+ GradScaler for fp16), fused AdamW, same schedule."""
    from lit_xf.loss import compiled_token_cross_entropy, linear_cross_entropy, token_cross_entropy
    from lit_xf.module import LitTinyGPT, adamw, warmup_cosine

    rows, fused = "rows" in parts, "fused" in parts
    plain = {"attention": "sdpa", "mlp_kernel": "torch"} if rows else {}  # nanoGPT's loop: torch's kernels only
    lit = LitTinyGPT(**(model_kwargs | {"arch": model_kwargs["arch"] | plain}))  # the Lightning runs' initialization
    hp, model = lit.hparams, lit.model.to(device)
    loss_fn = token_cross_entropy
    if _compile_mode(parts):  # the loss compiled too, as in nanoGPT (whose compiled model returns it)
        model.compile_model(_compile_mode(parts))
        loss_fn = compiled_token_cross_entropy
    clip = trainer_cfg.get("gradient_clip_val")  # as the Lightning runs do: norm clipping
    opt = adamw(model, hp.lr, hp.betas, hp.weight_decay, device, scaled_clipping=bool(clip) and precision == "16-mixed")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, hp.warmup_steps, args.steps, hp.min_lr_ratio)
    )
    amp_dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(enabled=precision == "16-mixed")
    batches = _cycle(dm.train_dataloader())
    real = flops = 0
    t0, losses, start = None, [], time.perf_counter()
    for step in range(args.steps):
        window.at_step(step)
        if step == args.warmup_steps:
            sync(device)
            t0 = time.perf_counter()
        batch = next(batches)
        ids, labels = batch["input_ids"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True)
        pos = None if rows else batch["position_ids"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(ids, pos, None if rows else batch["doc_lens"], hidden=fused)
            if fused:  # lit_xf's loss: fused with the output projection
                nll_sum, _, n_real = linear_cross_entropy(out, model.lm_head.weight, labels)
                loss = nll_sum / n_real.clamp(min=1)
        if not fused:
            loss = loss_fn(out, labels)
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.detach())
        if t0 is not None:
            real += batch["stats"]["real_tokens"]
            flops += lit.flops_per_batch(batch if not rows else as_full_rows(batch))
    window.finish()
    sync(device)
    timed = time.perf_counter() - t0
    return dict(
        t0=t0,
        timed_s=timed,
        real_tokens=real,
        flops=flops,
        warmup_s=t0 - start,
        losses=torch.stack(losses).tolist(),
        attention=model.attention_kernel_name,
        mlp_kernel=model.mlp_kernel_name(device, amp_dtype or next(model.parameters()).dtype),  # its compute dtype
    )


def as_full_rows(batch: dict) -> dict:
    """The batch as ``loop+rows`` computes it, for its FLOPs: one document per row, and without the
    collate's ``stats`` (they count the real documents' pairs)."""
    B, T = batch["input_ids"].shape
    return {k: v for k, v in batch.items() if k != "stats"} | {"doc_lens": [[T]] * B}


def _lightning_run(base, parts, model_kwargs, dm, precision, args, trainer_cfg, device, window) -> dict:
    import tempfile

    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_xf.callbacks import KernelTimer, PeakMemoryMonitor, ThroughputMonitor
    from lit_xf.loggers import AsyncTensorBoardLogger
    from lit_xf.module import LitTinyGPT

    clock = StepClock(args.warmup_steps, device, window)
    monitors = [m() for key, m in (("memory", PeakMemoryMonitor), ("throughput", ThroughputMonitor)) if key in parts]
    if "timer" in parts:
        monitors.append(KernelTimer(profile_every_n_steps=0) if "noprofile" in parts else KernelTimer())
    hook_time = MonitorHookTime(clock, monitors) if args.hook_us and monitors else None
    logger = False
    if parts & {"tb", "atb"}:  # +atb: the scalars written by a child process (lit_xf.loggers)
        logger_cls = AsyncTensorBoardLogger if "atb" in parts else TensorBoardLogger
        logger = logger_cls(tempfile.mkdtemp(prefix="lit_xf_bench_"))
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        max_steps=args.steps,
        gradient_clip_val=trainer_cfg.get("gradient_clip_val"),
        logger=logger,
        callbacks=[clock, *monitors],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=trainer_cfg.get("log_every_n_steps", 50),
    )
    model = LitTinyGPT(**(model_kwargs | {"compile": _compile_mode(parts)}))
    trainer.fit(model, dm)
    return dict(
        t0=clock.t0,
        timed_s=clock.seconds,
        real_tokens=clock.real_tokens,
        flops=clock.flops,
        warmup_s=clock.t0 - clock.start,
        losses=torch.stack(clock.losses).tolist(),
        attention=model.attention_kernel_name,
        # on the run's device: the module is back on the CPU after fit
        mlp_kernel=model.model.mlp_kernel_name(device, precision_dtype(precision)),
        hook_us=hook_time.per_step(args.steps - args.warmup_steps) if hook_time else None,
    )


class MonitorHookTime:
    """Host time of the monitors' per-step hooks in the timed steps, µs per step and hook
    (``--hook-us``): each hook of each monitor instance is wrapped in ``perf_counter_ns``.
    Lightning's dispatch of the hooks (~6 µs per callback and hook on the H200's host, see
    docs/benchmarks.md §5) is not included; nested calls are not split out."""

    HOOKS = (
        "on_train_batch_start",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_train_batch_end",
    )

    def __init__(self, clock: StepClock, monitors: list[L.Callback]) -> None:
        self.clock, self.ns = clock, collections.Counter()
        for monitor in monitors:
            for hook in self.HOOKS:
                if getattr(type(monitor), hook) is not getattr(L.Callback, hook):  # overridden
                    setattr(monitor, hook, self._timed(getattr(monitor, hook), f"{type(monitor).__name__}.{hook}"))

    def _timed(self, hook, key: str):
        def timed(*args, **kwargs):
            if self.clock.t0 is None:  # warm-up
                return hook(*args, **kwargs)
            start = time.perf_counter_ns()
            try:
                return hook(*args, **kwargs)
            finally:
                self.ns[key] += time.perf_counter_ns() - start

        return timed

    def per_step(self, steps: int) -> dict[str, float]:
        """{"total": µs, "<Monitor>.<hook>": µs, ...} per timed step, largest first."""
        us = {key: ns / 1e3 / steps for key, ns in self.ns.most_common()}
        return {"total": round(sum(us.values()), 1)} | {key: round(v, 1) for key, v in us.items()}


class StepClock(L.Callback):
    """Synchronized host time from the start of step ``warmup`` to the end of training, the real
    tokens and FLOPs of the timed steps, and every step's loss (kept on the device until the end)."""

    def __init__(self, warmup: int, device: torch.device, window: ProfileWindow):
        self.warmup, self.device, self.window, self.t0, self.seconds = warmup, device, window, None, 0.0
        self.real_tokens = self.flops = 0
        self.losses: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.window.at_step(trainer.global_step)
        if trainer.global_step == self.warmup and self.t0 is None:
            sync(self.device)
            self.t0 = time.perf_counter()
        if self.t0 is not None:
            self.real_tokens += batch["stats"]["real_tokens"]
            self.flops += pl_module.flops_per_batch(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())

    def on_train_end(self, trainer, pl_module):
        self.window.finish()
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0


def _cycle(loader):
    """The loader's batches epoch after epoch, its samplers told each epoch as Lightning tells them
    (so a hand loop sees Lightning's data order past the first epoch)."""
    for epoch in itertools.count():
        for sampler in (loader.sampler, loader.batch_sampler):
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch)
        yield from loader
