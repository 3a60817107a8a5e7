"""``auto``: the fastest kernel for each case, found by timing the kernels that support it.

On CUDA, the first batch of a case (``AutoCase``: device name, dtype, training or not, the layout
class, window, ALiBi, heads, head size, batch shape rounded up to powers of two, and the caller's
hints) times each candidate (``AUTO_CANDIDATES``: sdpa, xformers, flex, fa4; never naive, the
reference) whose ``support`` and ``dtype_problem`` accept it, on random q/k/v of the batch's shape
under the batch's own layout, and keeps the fastest (an ``AutoChoice``) for every later batch of
the case: in the instance, and on disk for later runs (``auto_cache``). The cost of a candidate is

    without ``layers``:  one call (forward, + backward when training), timed call by call from an
                         idle GPU, so host time counts where it paces the call (the comparison
                         ``lit-xf bench attention`` makes);
    with ``layers=L``:   prepare once + L calls, timed as one unit (the host queues the L calls, as
                         a model's forward does).

Protocol: ``WARMUP`` calls first (flex compiles, fa4 JIT-compiles), then one screening call; the
candidates within ``SCREEN_RATIO`` of the cheapest screened cost are timed ``REPS`` more times in
alternating order, and the median decides (the others keep their screened cost: they can't win).
A candidate that raises (out of memory, a compile error, a batch it refuses) is skipped with its
error as the reason. Off CUDA (``measure_on``), auto is sdpa without measuring.

Each process measures for itself: no collective runs inside a forward (ranks' validation batches
can differ in shape; a collective there could hang). Ranks may therefore choose different kernels
for one case; every kernel computes the same attention.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata

import torch

from lit_xf.attention.auto_cache import ChoiceCache, default_cache_dir
from lit_xf.attention.base import SHORT_DTYPE_NAMES, AttentionKernel
from lit_xf.attention.fa4 import Fa4Attention
from lit_xf.attention.flex import FlexAttention
from lit_xf.attention.layout import DocLayout
from lit_xf.attention.naive import NaiveAttention
from lit_xf.attention.sdpa import SdpaAttention
from lit_xf.attention.xformers import XformersAttention

log = logging.getLogger(__name__)

AUTO_CANDIDATES = ("sdpa", "xformers", "flex", "fa4")
WARMUP = 2
REPS = 5
SCREEN_RATIO = 1.5  # timed further only within 1.5x of the cheapest screened cost
DEFAULT_HEAD_DIM = 64  # timed with where a caller gives no head_dim
NOT_MEASURED = (
    "runs sdpa on {device} without measuring: xformers and fa4 are CUDA-only, flex has no "
    "backward there, naive is the reference"
)
_KERNEL_TYPES = (SdpaAttention, XformersAttention, FlexAttention, Fa4Attention, NaiveAttention)

# (kernel name, the call to time, device) -> ms of one call
Timer = Callable[[str, Callable[[], object], torch.device], float]


def time_ms(name: str, fn: Callable[[], object], device: torch.device) -> float:
    """ms of one ``fn()``: on CUDA, events around it from an idle GPU (the host's time to issue
    the call counts wherever it exceeds the GPU's); the host clock elsewhere."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    stream = torch.cuda.current_stream(device)
    stream.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end)


def shape_class(n: int) -> int:
    """``n`` rounded up to a power of two: batches of a class share a measurement (a generation
    loop's growing rows meet a new class at each doubling, not at every token)."""
    return 1 << (n - 1).bit_length()


def device_name(device: torch.device) -> str:
    """'NVIDIA H200' for a CUDA device, else the device type."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.cache
def versions() -> str:
    """The versions a measurement depends on, for the disk cache's keys."""
    found = []
    for dist in ("torch", "xformers", "flash-attn-4", "lit_xf"):
        try:
            found.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            found.append(f"{dist}=none")
    return ";".join(found)


@dataclass(frozen=True)
class AutoCase:
    """What a measurement holds for: every later batch with these fields reuses its choice."""

    device: str  # device_name(): 'NVIDIA H200', 'cpu'
    dtype: str  # 'bf16'
    training: bool  # forward + backward (else forward only)
    block_diagonal: bool  # packed rows (DocLayout.block_diagonal)
    causal: bool
    window: int | None  # the sliding window where it hides keys (DocLayout.windowed), else None
    alibi: bool
    n_heads: int
    n_kv_heads: int
    head_dim: int
    batch_size: int  # rows, rounded up to a power of two (shape_class)
    seq_len: int  # row length, rounded up to a power of two
    layers: int | None  # the caller's depth hint: cost = prepare + layers calls (None: one call)
    qkv_stacked: bool  # the caller runs attend_qkv on the q/k/v stack (else separate q, k, v)

    @classmethod
    def of(
        cls, layout: DocLayout, *, device, dtype, training, alibi, n_heads, n_kv_heads, head_dim, layers, qkv_stacked
    ):
        """The case of a batch; ``device``: a ``torch.device``, or its name (``device_name``)."""
        return cls(
            device=device_name(device) if isinstance(device, torch.device) else str(device),
            dtype=SHORT_DTYPE_NAMES.get(dtype, str(dtype)),
            training=bool(training),
            block_diagonal=layout.block_diagonal,
            causal=layout.causal,
            window=layout.window if layout.windowed else None,
            alibi=bool(alibi),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            batch_size=shape_class(layout.batch_size),
            seq_len=shape_class(layout.seq_len),
            layers=layers,
            qkv_stacked=bool(qkv_stacked),
        )

    def key(self, candidates: Iterable[str] = AUTO_CANDIDATES) -> str:
        """The disk cache's key: every field, the candidates and the versions."""
        fields = ";".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{fields};candidates={','.join(candidates)};{versions()}"

    def describe(self, shape: tuple[int, int] | None = None) -> str:
        """'packed rows 32 × 2048, 12/12 heads × 64, bf16, fwd+bwd on NVIDIA H200'; ``shape``: the
        measured batch's (B, T) (default: the class's)."""
        B, T = shape or (self.batch_size, self.seq_len)
        rows = "packed" if self.block_diagonal else ("causal" if self.causal else "full")
        extra = (f", window {self.window}" if self.window else "") + (" + ALiBi" if self.alibi else "")
        work = "fwd+bwd" if self.training else "fwd"
        if self.layers:
            work = f"prepare + {self.layers} × {work}"
        return (
            f"{rows} rows {B} × {T}{extra}, {self.n_heads}/{self.n_kv_heads} heads × "
            f"{self.head_dim}, {self.dtype}, {work} on {self.device}"
        )


@dataclass(frozen=True)
class AutoChoice:
    """The kernel ``auto`` runs a case with, and why: ``times_ms`` per timed kernel (fastest
    first), ``skipped`` (kernel -> why it can't run the case), ``failed`` (kernel -> the error its
    measurement raised); ``reason`` says it in one line."""

    kernel: str
    reason: str
    times_ms: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, entry: dict) -> AutoChoice | None:
        """The choice an entry of the disk cache holds, or None where it is not one."""
        try:
            choice = cls(**entry)
        except TypeError:
            return None
        texts = isinstance(choice.kernel, str) and isinstance(choice.reason, str)
        tables = all(isinstance(d, dict) for d in (choice.times_ms, choice.skipped, choice.failed))
        return choice if texts and tables else None


class AutoAttention(AttentionKernel):
    """Runs each batch on the kernel measured fastest for its case (module docstring). ``last_choice``
    and ``last_reason``: the kernel the latest ``prepare`` chose and why; ``explain()``: every case
    chosen so far, one line each; ``choices``: the ``AutoChoice`` per ``AutoCase``.

    ``candidates``: kernel names to time (naive only if asked for); ``cache_dir``: the disk cache's
    folder (None: ``default_cache_dir()``, ``$LIT_XF_CACHE_DIR``; False: none); ``timer``: times
    one call (``time_ms``; tests pass a fake); ``measure_on``: device types that measure (others
    run sdpa)."""

    name = "auto"

    def __init__(
        self,
        *,
        candidates: Iterable[str] = AUTO_CANDIDATES,
        cache_dir=None,
        timer: Timer | None = None,
        measure_on: Iterable[str] = ("cuda",),
    ):
        kernels = {k.name: k for k in (t() for t in _KERNEL_TYPES)}
        self._kernels: dict[str, AttentionKernel] = {n: kernels[n] for n in candidates}
        self.cache = ChoiceCache(default_cache_dir() if cache_dir is None else (cache_dir or None))
        self.timer = timer
        self.measure_on = tuple(measure_on)
        self.choices: dict[AutoCase, AutoChoice] = {}
        self.last_choice: str | None = None
        self.last_reason: str | None = None
        self._unmeasured: dict[str, AutoChoice] = {}  # device type -> sdpa
        self._device_names: dict[torch.device, str] = {}

    def explain(self) -> str:
        """Why ``auto`` runs what it runs: one line per case chosen so far."""
        chosen = [*self._unmeasured.values(), *self.choices.values()]
        if not chosen:
            return "attention=auto: no batch yet (it chooses at the first batch of each case)"
        return "\n".join(f"attention=auto {c.reason}" for c in chosen)

    def _why_not(self, name: str, config: dict, dtype: torch.dtype | None) -> str | None:
        kernel = self._kernels[name]
        return (dtype is not None and kernel.dtype_problem(dtype)) or kernel.support(**config)

    def prepare(
        self,
        layout,
        position_ids,
        slopes,
        *,
        n_heads,
        n_kv_heads,
        dtype,
        device,
        head_dim=None,
        layers=None,
        qkv_stacked=False,
        bias=None,
    ):
        """The chosen kernel's context: ``ctx.kernel`` is that kernel, ``ctx.plan`` its own plan
        (``bias``: the batch's prebuilt xformers bias, passed on to the chosen kernel)."""
        choice = self.choose(
            layout,
            position_ids,
            slopes,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            dtype=dtype,
            device=device,
            head_dim=head_dim,
            layers=layers,
            qkv_stacked=qkv_stacked,
        )
        self.last_choice, self.last_reason = choice.kernel, choice.reason
        return self._kernels[choice.kernel].prepare(
            layout, position_ids, slopes, n_heads=n_heads, n_kv_heads=n_kv_heads, dtype=dtype, device=device, bias=bias
        )

    def choose(
        self,
        layout: DocLayout,
        position_ids: torch.Tensor | None = None,
        slopes: torch.Tensor | None = None,
        *,
        n_heads: int,
        n_kv_heads: int,
        dtype: torch.dtype,
        device,
        head_dim: int | None = None,
        layers: int | None = None,
        qkv_stacked: bool = False,
        training: bool | None = None,
    ) -> AutoChoice:
        """The choice for this batch's case: remembered, cached on disk, or measured now (and
        logged once). ``training`` defaults to ``torch.is_grad_enabled()``."""
        device = torch.device(device)
        training = torch.is_grad_enabled() if training is None else training
        if device.type not in self.measure_on:
            return self._not_measured(device)
        head_dim = head_dim or DEFAULT_HEAD_DIM
        alibi = slopes is not None
        if device not in self._device_names:
            self._device_names[device] = device_name(device)
        case = AutoCase.of(
            layout,
            device=self._device_names[device],
            dtype=dtype,
            training=training,
            alibi=alibi,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            layers=layers,
            qkv_stacked=qkv_stacked,
        )
        choice = self.choices.get(case)
        if choice is not None:
            return choice
        config = dict(
            device=device,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            alibi=alibi,
            training=training,
            seq_len=layout.seq_len,
        )
        skipped = {n: why for n in self._kernels if (why := self._why_not(n, config, dtype))}
        runnable = [n for n in self._kernels if n not in skipped]
        choice = self._from_disk(case, runnable)
        if choice is None:
            choice = self._measure(case, _Trial(case, layout, position_ids, slopes, dtype, device), runnable, skipped)
        self.choices[case] = choice
        log.info("attention=auto %s", choice.reason)
        return choice

    def _not_measured(self, device: torch.device) -> AutoChoice:
        choice = self._unmeasured.get(device.type)
        if choice is None:
            choice = self._unmeasured[device.type] = AutoChoice("sdpa", NOT_MEASURED.format(device=device.type))
            log.info("attention=auto %s", choice.reason)
        return choice

    def _from_disk(self, case: AutoCase, runnable: list[str]) -> AutoChoice | None:
        entry = self.cache.get(case.key(self._kernels))
        choice = AutoChoice.from_json(entry) if entry is not None else None
        if choice is None or choice.kernel not in runnable:  # e.g. a kernel that ran then and can't now
            return None
        return dataclasses.replace(choice, reason=f"{choice.reason} (cached)")

    def _measure(self, case: AutoCase, trial: _Trial, runnable: list[str], skipped: dict[str, str]) -> AutoChoice:
        described = case.describe((trial.layout.batch_size, trial.layout.seq_len))
        not_run = "".join(f"; {n} can't run it: {why}" for n, why in skipped.items())
        if len(runnable) <= 1:
            name = runnable[0] if runnable else "sdpa"
            why = "the only candidate that runs it" if runnable else "no candidate runs it"
            return AutoChoice(name, f"chose {name} for {described}: {why}{not_run}", skipped=skipped)
        with torch.set_grad_enabled(case.training):
            times, screened, failed = self._time(trial, runnable)
        trial.release()
        failed_text = "".join(f"; {n} failed: {why}" for n, why in failed.items())
        if not times:
            name = "sdpa" if "sdpa" in runnable else runnable[0]
            reason = f"measured {described}: every candidate failed -> {name}{failed_text}{not_run}"
            return AutoChoice(name, reason, skipped=skipped, failed=failed)
        times = {n: round(ms, 4) for n, ms in sorted(times.items(), key=lambda kv: kv[1])}
        name = next(iter(times))
        timed = ", ".join(f"{n} {ms:.2f} ms{' (1 call)' if n in screened else ''}" for n, ms in times.items())
        choice = AutoChoice(
            name, f"measured {described}: {timed} -> {name}{failed_text}{not_run}", times, skipped, failed
        )
        self.cache.put(case.key(self._kernels), choice.to_json())
        return choice

    def _time(self, trial: _Trial, names: list[str]) -> tuple[dict[str, float], set[str], dict[str, str]]:
        """(ms per candidate, those timed by their screening call only, candidate -> its error)."""
        timer = self.timer or time_ms
        device, layers = trial.device, trial.layers
        screened: dict[str, float] = {}
        failed: dict[str, str] = {}
        for name in names:
            kernel = self._kernels[name]
            try:
                for _ in range(WARMUP):
                    timer(name, lambda k=kernel: trial.call(k), device)
                prep = timer(name, lambda k=kernel: trial.prepare(k), device) if layers else 0.0
                screened[name] = prep + (layers or 1) * timer(name, lambda k=kernel: trial.call(k), device)
            except Exception as e:  # out of memory, a compile error, a batch the kernel refuses
                failed[name] = _error_text(e)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            trial.drop(kernel)
        if not screened:
            return {}, set(), failed
        best = min(screened.values())
        finalists = [n for n, ms in screened.items() if ms <= SCREEN_RATIO * best]
        if len(finalists) == 1:
            return screened, set(screened) - set(finalists), failed
        unit = trial.forward if layers else trial.call
        samples: dict[str, list[float]] = {n: [] for n in finalists}
        for name in finalists:  # their contexts back (dropped after screening), untimed
            try:
                timer(name, lambda k=self._kernels[name]: trial.prepare(k), device)
            except Exception as e:
                failed[name] = _error_text(e)
        for rep in range(REPS):
            for name in finalists if rep % 2 == 0 else finalists[::-1]:
                if name in failed:
                    continue
                try:
                    samples[name].append(timer(name, lambda k=self._kernels[name]: unit(k), device))
                except Exception as e:
                    failed[name] = _error_text(e)
        times = {n: statistics.median(s) for n, s in samples.items() if n not in failed}
        rest = {n: ms for n, ms in screened.items() if n not in finalists and n not in failed}
        return times | rest, set(rest), failed


class _Trial:
    """One batch's measurement inputs, built at the first call (a timer that never calls leaves
    the device untouched): random q, k, v ``[B, T, H|G, K]`` or their stack ``[B, T, H + 2G, K]``
    (``qkv_stacked``), an output gradient ``[B, T, H, K]`` (training), the batch's positions and
    slopes on the device; and each kernel's prepared context."""

    def __init__(self, case: AutoCase, layout: DocLayout, position_ids, slopes, dtype, device: torch.device):
        self.layout, self.position_ids, self.slopes, self.dtype, self.device = (
            layout,
            position_ids,
            slopes,
            dtype,
            device,
        )
        self.n_heads, self.n_kv_heads, self.head_dim = case.n_heads, case.n_kv_heads, case.head_dim
        self.training, self.layers, self.qkv_stacked = case.training, case.layers, case.qkv_stacked
        self._inputs: tuple | None = None
        self._ctx: dict[str, object] = {}

    def inputs(self) -> tuple:
        if self._inputs is None:
            B, T, H, G, K = self.layout.batch_size, self.layout.seq_len, self.n_heads, self.n_kv_heads, self.head_dim
            g = torch.Generator(device=self.device).manual_seed(0)  # the global RNG stays untouched

            def rand(*shape):
                x = torch.randn(*shape, generator=g, device=self.device, dtype=self.dtype)
                return x.requires_grad_(self.training)

            if self.qkv_stacked:
                qkv = (rand(B, T, H + 2 * G, K),)
            else:
                qkv = (rand(B, T, H, K), rand(B, T, G, K), rand(B, T, G, K))
            do = torch.randn(B, T, H, K, generator=g, device=self.device, dtype=self.dtype) if self.training else None
            pos = self.position_ids
            pos = self.layout.position_ids(self.device) if pos is None else pos.to(self.device)
            slopes = None if self.slopes is None else self.slopes.to(self.device)
            self._inputs = (qkv, do, pos, slopes)
        return self._inputs

    def prepare(self, kernel: AttentionKernel) -> None:
        _, _, pos, slopes = self.inputs()
        self._ctx[kernel.name] = kernel.prepare(
            self.layout,
            pos,
            slopes,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            dtype=self.dtype,
            device=self.device,
            head_dim=self.head_dim,
        )

    def call(self, kernel: AttentionKernel) -> None:
        """One attention call (forward, + backward when training) on the prepared context."""
        if kernel.name not in self._ctx:
            self.prepare(kernel)
        qkv, do, _, _ = self.inputs()
        ctx = self._ctx[kernel.name]
        out = kernel.attend_qkv(qkv[0], self.n_kv_heads, ctx) if self.qkv_stacked else kernel(*qkv, ctx)
        if self.training:
            torch.autograd.grad(out, qkv, do.to(out.dtype))  # out in another dtype under autocast

    def forward(self, kernel: AttentionKernel) -> None:
        """What a forward of ``layers`` layers spends on attention: prepare once, then a call per layer."""
        self.prepare(kernel)
        for _ in range(self.layers or 1):
            self.call(kernel)

    def drop(self, kernel: AttentionKernel) -> None:
        self._ctx.pop(kernel.name, None)

    def release(self) -> None:
        self._inputs, self._ctx = None, {}


def _error_text(e: Exception) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}" if first else type(e).__name__
