"""What every sweep level shares: the configuration, the case record, implementations, timing glue."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import lrformer_kernels
from ..registry import _gen, _randn  # noqa: F401  (shared with the sweep modules)
from ..timing import Measurement, TimingSettings, measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("t", "s", "b", "l")


def size_str(hw: Tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


def parse_size(s: str) -> Tuple[int, int]:
    s = s.strip().lower()
    if "x" in s:
        h, w = s.split("x")
        return int(h), int(w)
    return int(s), int(s)


# --------------------------------------------------------------------------------------- config
@dataclass
class Config:
    device: torch.device
    quick: bool = False
    dtypes: Tuple[str, ...] = ("fp32",)
    batch: int = 8                      # ops / lrsa / block
    train_batch: int = 8
    infer_batch: int = 1
    flops_variants: Tuple[str, ...] = VARIANTS
    flops_sizes: Tuple[Tuple[int, int], ...] = ()
    attn_sizes: Tuple[Tuple[int, int], ...] = ()
    attn_latency_sizes: Tuple[Tuple[int, int], ...] = ()
    op_images: Tuple[Tuple[int, int], ...] = ()
    stages: Tuple[int, ...] = (1, 2, 3, 4)
    modes: Tuple[str, ...] = ("fwd", "fwd+bwd")
    model_variants: Tuple[str, ...] = VARIANTS
    model_sizes: Tuple[Tuple[int, int], ...] = ()
    train_sizes: Tuple[Tuple[int, int], ...] = ()
    train_variants: Tuple[str, ...] = VARIANTS
    compile: bool = True
    compile_model_variant: str = "s"
    traffic_sizes: Tuple[Tuple[int, int], ...] = ((512, 512), (1024, 1024))   # meta device: any machine
    traffic_batch: int = 8
    traffic_compile: bool = True        # the torch.compile columns (inductor scheduled for a modelled CUDA)
    timing: TimingSettings = field(default_factory=TimingSettings)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def train_dtype(self) -> str:
        """bf16 autocast on CUDA (fp32 if bf16 was not asked for), fp32 on CPU."""
        return "bf16" if self.cuda and "bf16" in self.dtypes else "fp32"

    def settings(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k not in ("device", "timing")}
        for k, v in d.items():
            if isinstance(v, tuple) and v and isinstance(v[0], tuple):
                d[k] = [size_str(x) for x in v]
            elif isinstance(v, tuple):
                d[k] = list(v)
        d["device"] = str(self.device)
        d["timing"] = dict(self.timing.__dict__)
        return d


def default_config(device: torch.device, quick: bool = False) -> Config:
    sq = lambda *s: tuple((x, x) for x in s)  # noqa: E731
    cuda = device.type == "cuda"
    if quick:
        return Config(device=device, quick=True, dtypes=("bf16",) if cuda else ("fp32",), batch=1,
                      train_batch=1, flops_variants=("t",), flops_sizes=sq(256),
                      attn_sizes=sq(128, 256), attn_latency_sizes=sq(256) if cuda else (),
                      op_images=sq(128), model_variants=("t",), model_sizes=sq(96),
                      train_sizes=sq(96), train_variants=("t",), compile=False,
                      traffic_sizes=sq(64), traffic_batch=1, traffic_compile=False,
                      timing=TimingSettings(warmup_ms=5, target_ms=20, min_reps=3, max_reps=20,
                                            cpu_target_s=0.05, cpu_max_reps=2, max_sets=3))
    full_sizes = sq(512, 768, 1024, 1536, 2048) + ((1024, 2048),)
    if cuda:
        return Config(device=device, dtypes=("fp32", "bf16"), batch=8, train_batch=8,
                      timing=TimingSettings(warmup_ms=10, target_ms=60, min_reps=5, max_reps=100),
                      flops_sizes=full_sizes, attn_sizes=full_sizes, attn_latency_sizes=sq(512, 1024, 2048),
                      op_images=sq(512, 1024), model_sizes=sq(512, 1024) + ((1024, 2048),) + sq(2048),
                      train_sizes=sq(512, 1024))
    # CPU: the reference only, small settings (a few minutes on a laptop-class CPU)
    return Config(device=device, dtypes=("fp32",), batch=2, train_batch=2,
                  flops_sizes=full_sizes, attn_sizes=full_sizes, op_images=sq(512, 1024),
                  model_variants=VARIANTS, model_sizes=sq(256, 512, 1024), train_sizes=sq(256, 512),
                  train_variants=("t", "s"), compile=False,
                  timing=TimingSettings(cpu_target_s=1.0, cpu_max_reps=3, max_sets=3))


# ----------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    section: str
    key: Dict                                        # row fields identifying the case
    fn: Optional[Callable[[], Dict]] = None          # returns the measured fields
    status: Optional[str] = None                     # preset status (needs GPU, n/a, ...): not run
    compile: bool = False                            # needs a torch.compile (slow first call)
    min_budget_s: float = 0.0                        # skip if less than this is left overall
    essential: bool = False                          # cheap (meta device): only the overall deadline


def stage_maps(cfg: Config):
    """(image, stage, map h, map w, compile_here) over the op images (largest first: the time budget) and
    stages, the loop the op and module sweeps share; compile only at the largest image's stage 1."""
    from ..registry import stage_map_size
    big = max(cfg.op_images, key=lambda hw: hw[0] * hw[1]) if cfg.op_images else None
    for img in sorted(cfg.op_images, key=lambda hw: -hw[0] * hw[1]):
        for s in cfg.stages:
            h, w = stage_map_size(img[0], img[1], s)
            yield img, s, h, w, img == big and s == 1


def fuse_copy(module: nn.Module) -> Tuple[Optional[nn.Module], str]:
    """A fused deep copy of ``module``, or (None, reason)."""
    m = copy.deepcopy(module)
    try:
        lrformer_kernels.fuse(m)
    except Exception as exc:  # noqa: BLE001
        return None, f"n/a (fuse failed: {type(exc).__name__}: {exc})"[:200]
    if not m.fuse_report:
        return None, "n/a (fuse switched nothing)"
    return m, ""


def _compiled(fn):
    import torch._dynamo
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _autocast(cfg: Config, dtype: str):
    if dtype == "fp32":
        return torch.autocast(cfg.device.type, enabled=False)
    return torch.autocast(cfg.device.type, dtype=DTYPES[dtype])


#: the implementations a case is timed with; "fused+compile" is ``torch.compile(lrformer_kernels.fuse(m))``
#: (the custom ops stay opaque, inductor fuses what is left around them)
COMPILED_IMPLS = ("compile", "fused+compile")


def _impls(cfg: Config, compile_here: bool, fused_compile: bool = True) -> List[Tuple[str, Optional[str]]]:
    """(impl, preset status or None) for a case; ``fused_compile``: also fused + compile (modules and
    models; a single op compiled alone is still one opaque node)."""
    compiled = COMPILED_IMPLS if fused_compile else COMPILED_IMPLS[:1]
    out = [("eager", None)]
    if cfg.cuda:
        out.append(("fused", None))
        for impl in compiled:
            if not cfg.compile:
                out.append((impl, "skipped (--quick)" if cfg.quick else "skipped (--no-compile)"))
            elif compile_here:                        # compile only at the representative cases
                out.append((impl, None))
    else:
        out += [("fused", "needs GPU")] + [(impl, "needs GPU") for impl in compiled]
    return out


def _clear_grads(inp, modules=()):
    for t in inp:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = None
    for m in modules:
        for p in m.parameters():
            p.grad = None


def _m_fields(m: Measurement) -> Dict:
    return dict(status=m.status, median_ms=m.median_ms, p20_ms=m.p20_ms, p80_ms=m.p80_ms, reps=m.reps,
                input_sets=m.input_sets, peak_mem_mb=m.peak_mem_mb, first_call_s=m.first_call_s)


def _time_callable(cfg: Config, fn, make_inputs, mode: str, modules=(), autocast_dtype: Optional[str] = None,
                   probe_fn=None):
    """Measure ``fn(*inputs)`` (fwd, no grad) or ``fn(*inputs).backward(gout)`` (fwd+bwd; an op with several
    outputs gets a random gradient on each).

    ``probe_fn`` (default ``fn``) gives the output's shape for the random output gradient: pass the
    eager reference for a compiled ``fn`` (a no-grad call would compile a second graph).
    ``modules``: whose parameter gradients are dropped before each call.
    """
    grad = mode != "fwd"
    probe_fn = probe_fn or fn

    def make(i):
        inp = make_inputs(i)
        if grad:
            with torch.no_grad():
                probe = (probe_fn(*inp) if autocast_dtype is None
                         else _run_autocast(cfg, autocast_dtype, probe_fn, inp))
            gout = tuple(torch.randn(p.shape, device=cfg.device, generator=_gen(cfg, 1000 + i)).to(p.dtype)
                         for p in (probe if isinstance(probe, tuple) else (probe,)))
            del probe
            return (inp, gout)
        return (inp, None)

    def run(pair):
        inp, gout = pair
        if not grad:
            with torch.no_grad():
                return fn(*inp) if autocast_dtype is None else _run_autocast(cfg, autocast_dtype, fn, inp)
        out = fn(*inp) if autocast_dtype is None else _run_autocast(cfg, autocast_dtype, fn, inp)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), gout)
        return None

    prep = (lambda pair: _clear_grads(pair[0], modules)) if grad else None
    return measure(make, run, cfg.device, cfg.timing, prepare=prep)


def _run_autocast(cfg, dtype, fn, inp):
    with _autocast(cfg, dtype):
        return fn(*inp)


