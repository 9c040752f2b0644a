"""Timing and peak-memory measurement (GPU: CUDA events; CPU: ``time.perf_counter``).

GPU method (see the project's device METHOD notes): one untimed call first (compilation,
autotuning, allocator warm-up), then a time-based warm-up, then ``reps`` calls each bracketed by
its own pair of CUDA events, rotating over several input sets (at least 3, more when a set is
smaller than the L2 cache, so that repeated calls do not run out of a warm cache); the result is
the median (with the 20th/80th percentiles).  Peak memory is ``torch.cuda.max_memory_allocated()``
during one more call, minus what was allocated just before it (activations, outputs, workspaces,
gradients: what the call itself adds).  Inputs are random, never zeros.

CPU method: one untimed call, then a few calls timed with ``time.perf_counter``; median.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch


@dataclass
class TimingSettings:
    warmup_ms: float = 25.0       # GPU: warm-up time after the first call
    target_ms: float = 150.0      # time spent in the timed repetitions (GPU), about
    min_reps: int = 5
    max_reps: int = 100
    cpu_target_s: float = 1.0     # CPU: time spent in the timed repetitions, about
    cpu_max_reps: int = 5
    min_sets: int = 3             # input sets rotated (at least)
    max_sets: int = 16


@dataclass
class Measurement:
    status: str = "ok"                    # ok | OOM | error: ...
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    reps: int = 0
    input_sets: int = 0
    peak_mem_mb: Optional[float] = None
    first_call_s: Optional[float] = None  # includes compilation
    extra: dict = field(default_factory=dict)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or isinstance(
            exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    msg = str(exc)
    return "out of memory" in msg.lower() or "CUDA_ERROR_OUT_OF_MEMORY" in msg


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def l2_bytes(device) -> int:
    try:
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    except Exception:  # pragma: no cover - old torch
        return 50 * 2 ** 20


def tensor_bytes(obj) -> int:
    """Total bytes of the tensors in a (nested) tuple/list/dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o) for o in obj.values())
    return 0


def n_input_sets(set_bytes: int, device, settings: TimingSettings) -> int:
    """At least ``min_sets``; enough sets to cover twice the L2 cache; at most 10% of free memory."""
    n = settings.min_sets
    if device.type == "cuda" and set_bytes > 0:
        n = max(n, math.ceil(2 * l2_bytes(device) / set_bytes))
        free, _ = torch.cuda.mem_get_info(device)
        n = min(n, max(settings.min_sets, int(0.1 * free // max(set_bytes, 1))))
    return max(1, min(n, settings.max_sets))


def _percentile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def measure(make_inputs: Callable[[int], object], run: Callable[[object], object], device: torch.device,
            settings: TimingSettings, prepare: Optional[Callable[[object], None]] = None,
            n_sets: Optional[int] = None, memory: bool = True) -> Measurement:
    """Time ``run(inputs)`` over rotating input sets ``make_inputs(i)``.

    ``prepare(inputs)`` runs before each call outside the timed region (e.g. dropping gradients).
    Returns a :class:`Measurement`; an out-of-memory error gives ``status='OOM'``.
    """
    sets: List[object] = []
    oom = False
    try:
        first = make_inputs(0)
        sets.append(first)
        if n_sets is None:
            n_sets = n_input_sets(tensor_bytes(first), device, settings)
        for i in range(1, n_sets):
            sets.append(make_inputs(i))
        prep = prepare or (lambda s: None)
        if device.type == "cuda":
            return _measure_cuda(sets, run, prep, device, settings, memory)
        return _measure_cpu(sets, run, prep, settings)
    except Exception as exc:  # noqa: BLE001 - one failing case must not end the sweep
        if not is_oom(exc):
            raise
        oom = True
    finally:
        sets.clear()
    # out of the except block: the traceback (and the activations its frames hold) is gone
    if oom:
        free_memory()
    return Measurement(status="OOM")


def _measure_cuda(sets, run, prep, device, settings: TimingSettings, memory: bool) -> Measurement:
    n = len(sets)
    sync = torch.cuda.synchronize
    t0 = time.perf_counter()
    prep(sets[0])
    run(sets[0])
    sync()
    first_call_s = time.perf_counter() - t0
    # estimate one call
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    est = []
    for i in range(min(3 if first_call_s < 0.5 else 1, n)):   # big calls: one estimate is enough
        prep(sets[i % n])
        start.record()
        run(sets[i % n])
        end.record()
        sync()
        est.append(start.elapsed_time(end))
    est_ms = max(min(est), 1e-3)
    warmup = int(min(max(1, settings.warmup_ms / est_ms), 200))
    reps = int(min(max(settings.min_reps, settings.target_ms / est_ms), settings.max_reps))
    for i in range(warmup):
        prep(sets[i % n])
        run(sets[i % n])
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    sync()
    for i in range(reps):
        s = sets[i % n]
        prep(s)
        starts[i].record()
        run(s)
        ends[i].record()
    sync()
    times = [a.elapsed_time(b) for a, b in zip(starts, ends)]
    m = Measurement(median_ms=statistics.median(times), p20_ms=_percentile(times, 0.2),
                    p80_ms=_percentile(times, 0.8), reps=reps, input_sets=n, first_call_s=first_call_s)
    if memory:
        prep(sets[0])
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run(sets[0])
        sync()
        m.peak_mem_mb = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    return m


def _measure_cpu(sets, run, prep, settings: TimingSettings) -> Measurement:
    n = len(sets)
    t0 = time.perf_counter()
    prep(sets[0])
    run(sets[0])
    first = time.perf_counter() - t0
    reps = int(min(max(1, settings.cpu_target_s / max(first, 1e-6)), settings.cpu_max_reps))
    times = []
    for i in range(reps):
        s = sets[(i + 1) % n]
        prep(s)
        t = time.perf_counter()
        run(s)
        times.append((time.perf_counter() - t) * 1e3)
    return Measurement(median_ms=statistics.median(times), p20_ms=_percentile(times, 0.2),
                       p80_ms=_percentile(times, 0.8), reps=reps, input_sets=n, first_call_s=first)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, GB/s (bytes read + bytes written, 1e9), median of 20."""
    if device.type != "cuda":
        return float("nan")
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = int(min(nbytes, free // 4))
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    gbps = 2 * src.numel() * 4 / (statistics.median(times) * 1e-3) / 1e9
    del src, dst
    free_memory()
    return gbps
