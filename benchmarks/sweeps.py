"""The benchmark sweeps: each section yields :class:`Case` objects that the runner executes.

Sections
--------
- ``flops``: FLOPs and params of every variant T/S/B/L vs image size (meta device).
- ``attention``: FLOPs of ONE attention layer at LRFormer-S stage widths: LRSA vs SegFormer's
  spatial-reduction attention vs global attention vs Swin window attention (counted and closed
  form); on CUDA also their forward latency (bf16 autocast, batch 1).
- ``ops``: each fused op (``lrformer_kernels``) vs its reference (``lrformer.functional``) vs
  ``torch.compile(reference)`` at LRFormer-S stage shapes, forward and forward+backward, with
  achieved GB/s (bytes formulas in :func:`op_bytes`) against the measured copy bandwidth.  On
  CUDA also FASeg's HRCA (``hrca_attention``, windowed cross-attention of 100 queries over the
  stride-4 map = stage-1 resolution; shape in :data:`HRCA`), listed under stage 1.
- ``lrsa`` / ``block``: the reference LRSA (with its stage's depthwise convs) / Block vs the
  fused module (``lrformer_kernels.fuse``) vs ``torch.compile``.
- ``model``: T/S/B/L inference (batch 1) and a training step (forward, backward, AdamW step;
  bf16 autocast on CUDA) vs image size: eager vs fused vs torch.compile.

Implementations are named ``eager`` (the reference, eager PyTorch), ``compile``
(``torch.compile`` of the reference, ``dynamic=False``) and ``fused`` (the Triton path).  On a
CPU-only machine only ``eager`` is timed; ``fused`` and ``compile`` rows say ``needs GPU``.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lrformer import functional as LF

from . import attention_baselines as AB
from .timing import Measurement, TimingSettings, free_memory, measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
S_MLP_RATIOS = (8, 8, 4, 4)
S_LAYER_SCALE = (None, None, 1e-6, 1e-6)
VARIANTS = ("t", "s", "b", "l")
OPS = ("pyramid_pool", "lowres_attention", "upsample_residual", "dwconv_cpe", "dwconv_irb")
#: which ops are memory-bound (GB/s is their figure of merit); attention on a few hundred
#: tokens is latency-bound, reported too.
MEMORY_BOUND = {"pyramid_pool": True, "lowres_attention": False, "upsample_residual": True,
                "dwconv_cpe": True, "dwconv_irb": True, "hrca_attention": False}
#: Op-level cases timed only on CUDA (the CPU sweep stays as it is), at the stage-1 map.
HRCA_OP = "hrca_attention"
#: FASeg's HRCA on the stride-4 map of an image (LRFormer stage-1 resolution): decoder width 256,
#: 8 heads (head dim 32), 100 queries, 8x8 windows, each query attends to 1/32 of the windows
#: (K = 8 of 256 at 512x512: 512 keys per query), distinct windows per query, uniformly random.
HRCA = dict(C=256, heads=8, nq=100, window=8, frac=32)


def hrca_dims(h: int, w: int) -> Tuple[int, int, int]:
    """(windows in the grid, K windows per query, keys per query) of :data:`HRCA` on an h x w map."""
    gh, gw = LF.hrca_window_grid(h, w, HRCA["window"])
    n_win = gh * gw
    k = max(1, n_win // HRCA["frac"])
    return n_win, k, k * HRCA["window"] ** 2


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


def _fused_available() -> Tuple[Optional[Callable], str]:
    """``lrformer_kernels.fuse`` if it exists, else (None, reason)."""
    try:
        import lrformer_kernels
        fuse = getattr(lrformer_kernels, "fuse", None)
        if fuse is not None and not callable(fuse):       # the submodule, not the function
            fuse = getattr(fuse, "fuse", None)
        if fuse is None:
            from lrformer_kernels.fuse import fuse  # noqa: F811
        return fuse, ""
    except Exception as exc:  # noqa: BLE001
        return None, f"n/a (lrformer_kernels.fuse unavailable: {type(exc).__name__})"


def fuse_copy(module: nn.Module) -> Tuple[Optional[nn.Module], str]:
    """A fused deep copy of ``module``, or (None, reason)."""
    fuse, why = _fused_available()
    if fuse is None:
        return None, why
    m = copy.deepcopy(module)
    before = [type(x) for x in m.modules()]
    try:
        res = fuse(m)
    except Exception as exc:  # noqa: BLE001
        return None, f"n/a (fuse failed: {type(exc).__name__}: {exc})"[:200]
    m = res if isinstance(res, nn.Module) else m
    if [type(x) for x in m.modules()] == before:
        return None, "n/a (fuse swapped nothing)"
    return m, ""


def _compiled(fn):
    import torch._dynamo
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _autocast(cfg: Config, dtype: str):
    if dtype == "fp32":
        return torch.autocast(cfg.device.type, enabled=False)
    return torch.autocast(cfg.device.type, dtype=DTYPES[dtype])


def _randn(shape, cfg: Config, dtype=torch.float32, grad=False, gen=None):
    t = torch.randn(shape, device=cfg.device, dtype=torch.float32, generator=gen).to(dtype)
    return t.requires_grad_(grad)


def _gen(cfg: Config, seed: int):
    g = torch.Generator(device=cfg.device)
    g.manual_seed(seed)
    return g


def _impls(cfg: Config, compile_here: bool) -> List[Tuple[str, Optional[str]]]:
    """(impl, preset status or None) for a case."""
    out = [("eager", None)]
    if cfg.cuda:
        out.append(("fused", None))
        if cfg.compile and compile_here:
            out.append(("compile", None))
        elif cfg.compile:
            pass                                      # compile only at the representative cases
        else:
            out.append(("compile", "skipped (--quick)" if cfg.quick else "skipped (--no-compile)"))
    else:
        out += [("fused", "needs GPU"), ("compile", "needs GPU")]
    return out


# ------------------------------------------------------------------------------------ FLOPs
def flops_cases(cfg: Config) -> List[Case]:
    from .flops import REFERENCE_GFLOPS, model_flops
    cases = []
    for v in cfg.flops_variants:
        for hw in cfg.flops_sizes:
            nc = 19 if hw == (1024, 2048) else 150
            name = f"lrformer_{v}"

            def fn(name=name, hw=hw, nc=nc):
                r = model_flops(name, hw[0], hw[1], nc)
                ref = REFERENCE_GFLOPS.get((name, hw[0], hw[1], nc))
                return dict(params=r["params"], params_m=round(r["params"] / 1e6, 3),
                            gflops=round(r["flops"] / 1e9, 3), reference_gflops=ref)
            cases.append(Case("flops", dict(model=name, image=size_str(hw), height=hw[0], width=hw[1],
                                            num_classes=nc), fn, essential=True))
    return cases


def _attention_layers(cfg: Config, images):
    """(image, stage, map h, map w, dim, heads, kind) of one attention layer of each kind at the
    LRFormer-S stage widths, for every image size in ``images``."""
    for hw in images:
        for s in cfg.stages:
            h, w = AB.stage_map_size(hw[0], hw[1], s)
            for kind in AB.KINDS:
                yield hw, s, h, w, AB.S_DIMS[s - 1], AB.S_HEADS[s - 1], kind


def attention_flops_cases(cfg: Config) -> List[Case]:
    cases = []
    for hw, s, h, w, dim, heads, kind in _attention_layers(cfg, cfg.attn_sizes):
        def fn(kind=kind, h=h, w=w, dim=dim, heads=heads, s=s):
            counted = AB.counted_flops(kind, h, w, dim, heads, s)
            closed = AB.closed_form_flops(kind, h, w, dim, heads, s)
            return dict(gflops=counted / 1e9, gflops_closed_form=closed / 1e9,
                        match=counted == closed)
        extra = {"sr_ratio": AB.effective_sr(AB.SR_RATIOS[s - 1], h, w)} if kind == "sra" else {}
        cases.append(Case("attention_flops", dict(
            kind=kind, label=AB.LABELS[kind], stage=s, dim=dim, heads=heads, image=size_str(hw),
            map=f"{h}x{w}", tokens=h * w, note=";".join(f"{k}={v}" for k, v in extra.items())), fn,
            essential=True))
    return cases


def attention_latency_cases(cfg: Config) -> List[Case]:
    """CUDA only: forward latency of one layer of each kind (bf16 autocast, batch 1)."""
    if not cfg.cuda:
        return []
    cases = []
    dtype = "bf16" if "bf16" in cfg.dtypes else cfg.dtypes[0]
    for hw, s, h, w, dim, heads, kind in _attention_layers(cfg, cfg.attn_latency_sizes):
        def fn(kind=kind, h=h, w=w, dim=dim, heads=heads, s=s):
            layer = AB.make_layer(kind, dim, heads, s, map_size=(h, w)).to(cfg.device).eval()

            def run(inp):
                with torch.no_grad(), _autocast(cfg, dtype):
                    return layer(inp[0])
            m = measure(lambda i: (_randn((1, h, w, dim), cfg, gen=_gen(cfg, i)),), run,
                        cfg.device, cfg.timing)
            return _m_fields(m)
        cases.append(Case("attention_latency", dict(
            section="attention", name=kind, stage=s, image=size_str(hw), shape=f"1x{h}x{w}x{dim}",
            batch=1, dtype=dtype, mode="fwd", impl="eager"), fn))
    return cases


# -------------------------------------------------------------------------------------- op level
def _op_shapes(op: str, B: int, h: int, w: int, s: int):
    if op == HRCA_OP:
        return B, h, w, HRCA["C"]
    C = AB.S_DIMS[s - 1]
    if op == "dwconv_irb":
        C = C * S_MLP_RATIOS[s - 1]
    return B, h, w, C


def op_bytes(op: str, B: int, h: int, w: int, s: int, esize: int, mode: str) -> int:
    """Fewest bytes an op must move: each input read once, each output written once.

    pyramid_pool      fwd: read x (B H W C) + write the 5 grids (B N C), N = sum of grid cells;
                      bwd: read dOut (B N C) + write dx (B H W C).
    lowres_attention  fwd: read q (B Nq C), k, v (B M C each) + write o (B Nq C);
                      bwd: read dO, q, o (B Nq C each), k, v (B M C each), lse (B heads Nq fp32) +
                      write dq (B Nq C), dk, dv (B M C each).
    upsample_residual fwd: read x (B H W C), low (B hq wq C), scale (C fp32, stages 3-4), keep (B
                      fp32, fwd+bwd only: drop path in training) + write out (B H W C);
                      bwd: read dOut (B H W C), low (B hq wq C) + write dlow (B hq wq C),
                      dscale (C fp32) (dx is dOut itself: no copy).
    dwconv (C')       fwd: read x (B H W C') + write y (B H W C') (+ weights 10 C');
                      bwd: read dy, x (B H W C' each) + write dx (B H W C') (+ dw, db).
    hrca_attention    (Nq queries, K windows of ws x ws each, n_win windows in the map's grid;
                      U = n_win (1 - (1 - K/n_win)^Nq) = expected number of distinct windows the
                      queries select (random distinct windows per query): only their pixels
                      must be read; maps divisible by ws, as in the sweep)
                      fwd: read q (B Nq C), win_idx (B Nq K int64), k, v (B U ws^2 C each) +
                      write o (B Nq C);
                      bwd: read dO, q, o (B Nq C each), win_idx, k, v (B U ws^2 C each), lse
                      (B heads Nq fp32) + write dq (B Nq C), dk, dv (B H W C each: full maps).
    ``fwd+bwd`` is the sum of both.  ``esize`` is the element size of the activations.
    """
    _, _, _, C = _op_shapes(op, B, h, w, s)
    hw_ = B * h * w * C
    if op == HRCA_OP:
        n_win, k, _ = hrca_dims(h, w)
        nq, ws = HRCA["nq"], HRCA["window"]
        sel = round(B * n_win * (1.0 - (1.0 - k / n_win) ** nq)) * ws * ws * C   # selected pixels x C
        idx = 8 * B * nq * k
        fwd = (2 * B * nq * C + 2 * sel) * esize + idx
        bwd = (4 * B * nq * C + 2 * sel + 2 * hw_) * esize + idx + 4 * B * HRCA["heads"] * nq
        return fwd if mode == "fwd" else fwd + bwd
    grids = LF.lrsa_grids(h, w)
    nq = grids[0][0] * grids[0][1]
    m = sum(a * b for a, b in grids[1:])
    heads = AB.S_HEADS[s - 1]
    if op == "pyramid_pool":
        n = nq + m
        fwd = (hw_ + B * n * C) * esize
        bwd = (B * n * C + hw_) * esize
    elif op == "lowres_attention":
        fwd = (2 * B * nq * C + 2 * B * m * C) * esize
        bwd = (3 * B * nq * C + 2 * B * m * C + B * nq * C + 2 * B * m * C) * esize + B * heads * nq * 4
    elif op == "upsample_residual":   # layer scale in stages 3-4; drop-path keep when training
        low = B * nq * C
        scale = 4 * C if S_LAYER_SCALE[s - 1] is not None else 0
        fwd = (2 * hw_ + low) * esize + scale + (4 * B if mode != "fwd" else 0)
        bwd = (hw_ + 2 * low) * esize + scale
    else:  # dwconv
        fwd = 2 * hw_ * esize + 10 * C * esize
        bwd = 3 * hw_ * esize + 10 * C * esize
    return fwd if mode == "fwd" else fwd + bwd


def op_matmul_flops(op: str, B: int, h: int, w: int, s: int, mode: str) -> Optional[int]:
    """Real FLOPs (2 per multiply-add) of lowres_attention and hrca_attention: 2 products forward
    (q.k, p.v), 4 backward (dO.v, ds.k, ds.q, p.dO; the recomputed q.k not counted).
    hrca_attention: each of the Nq queries against its K * ws^2 keys, ``2 B Nq (K ws^2) C`` per
    product (maps divisible by ws: no cut windows)."""
    if op == HRCA_OP:
        one = 2 * B * HRCA["nq"] * hrca_dims(h, w)[2] * HRCA["C"]
        return one * (2 if mode == "fwd" else 6)
    if op != "lowres_attention":
        return None
    grids = LF.lrsa_grids(h, w)
    nq = grids[0][0] * grids[0][1]
    m = sum(a * b for a, b in grids[1:])
    one = 2 * B * nq * m * AB.S_DIMS[s - 1]
    return one * (2 if mode == "fwd" else 6)


def _op_functions(op: str, s: int, h: int, w: int):
    """(eager fn, fused fn, make_inputs(cfg, dtype, grad, i) -> tuple)."""
    import lrformer_kernels as K
    C = AB.S_DIMS[s - 1]
    heads = AB.S_HEADS[s - 1]
    grids = LF.lrsa_grids(h, w)

    if op == "pyramid_pool":
        def eager(x):
            B = x.shape[0]
            return torch.cat([LF.adaptive_avg_pool(x, g).reshape(B, -1, x.shape[-1]) for g in grids], 1)

        def fused(x):
            return K.pyramid_pool(x, grids)

        def inputs(cfg, B, dt, grad, i):
            return (_randn((B, h, w, C), cfg, dt, grad, _gen(cfg, i)),)
    elif op == "lowres_attention":
        nq = grids[0][0] * grids[0][1]
        m = sum(a * b for a, b in grids[1:])

        def eager(q, kv):
            return LF.lowres_attention(q, kv[..., :C], kv[..., C:], heads)

        def fused(q, kv):
            return K.lowres_attention(q, kv[..., :C], kv[..., C:], heads)

        def inputs(cfg, B, dt, grad, i):
            g = _gen(cfg, i)
            return (_randn((B, nq, C), cfg, dt, grad, g), _randn((B, m, 2 * C), cfg, dt, grad, g))
    elif op == "upsample_residual":
        hq, wq = grids[0]
        has_scale = S_LAYER_SCALE[s - 1] is not None

        def eager(x, low, scale, keep):
            return LF.upsample_residual(x, low, scale, keep)

        def fused(x, low, scale, keep):
            return K.upsample_residual(x, low, scale, keep)

        def inputs(cfg, B, dt, grad, i):
            g = _gen(cfg, i)
            scale = _randn((C,), cfg, torch.float32, grad, g) if has_scale else None
            keep = None
            if grad:  # training: drop path on
                keep = (torch.rand(B, device=cfg.device, generator=g) > 0.1).float() / 0.9
            return (_randn((B, h, w, C), cfg, dt, grad, g), _randn((B, hq, wq, C), cfg, dt, grad, g), scale, keep)
    elif op == HRCA_OP:
        C, heads, nq, ws = HRCA["C"], HRCA["heads"], HRCA["nq"], HRCA["window"]
        n_win, k, _ = hrca_dims(h, w)

        def eager(q, kv, win_idx):
            return LF.hrca_attention(q, kv[..., :C], kv[..., C:], win_idx, ws, heads)

        def fused(q, kv, win_idx):
            return K.hrca_attention(q, kv[..., :C], kv[..., C:], win_idx, ws, heads)

        def inputs(cfg, B, dt, grad, i):
            g = _gen(cfg, i)
            win = torch.rand((B, nq, n_win), device=cfg.device, generator=g).argsort(-1)[..., :k]
            return (_randn((B, nq, C), cfg, dt, grad, g), _randn((B, h, w, 2 * C), cfg, dt, grad, g),
                    win.contiguous())
    elif op in ("dwconv_cpe", "dwconv_irb"):
        gelu = op == "dwconv_irb"
        Cp = C * (S_MLP_RATIOS[s - 1] if gelu else 1)

        def eager(x, wt, b):
            return LF.dwconv3x3(x, wt, b, gelu=gelu, residual=True)

        def fused(x, wt, b):
            return K.dwconv3x3(x, wt, b, gelu=gelu, residual=True)

        def inputs(cfg, B, dt, grad, i):
            g = _gen(cfg, i)
            wt = (_randn((Cp, 1, 3, 3), cfg, dt, False, g) / 3).requires_grad_(grad)
            return (_randn((B, h, w, Cp), cfg, dt, grad, g), wt, _randn((Cp,), cfg, dt, grad, g))
    else:
        raise ValueError(op)
    return eager, fused, inputs


def _leaves(inp) -> List[torch.Tensor]:
    return [t for t in inp if isinstance(t, torch.Tensor) and t.requires_grad]


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
    """Measure ``fn(*inputs)`` (fwd, no grad) or ``fn(*inputs).backward(gout)`` (fwd+bwd).

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
            gout = torch.randn(probe.shape, device=cfg.device, generator=_gen(cfg, 1000 + i)).to(probe.dtype)
            del probe
            return (inp, gout)
        return (inp, None)

    def run(pair):
        inp, gout = pair
        if not grad:
            with torch.no_grad():
                return fn(*inp) if autocast_dtype is None else _run_autocast(cfg, autocast_dtype, fn, inp)
        out = fn(*inp) if autocast_dtype is None else _run_autocast(cfg, autocast_dtype, fn, inp)
        out.backward(gout)
        return None

    prep = (lambda pair: _clear_grads(pair[0], modules)) if grad else None
    return measure(make, run, cfg.device, cfg.timing, prepare=prep)


def _run_autocast(cfg, dtype, fn, inp):
    with _autocast(cfg, dtype):
        return fn(*inp)


def op_cases(cfg: Config) -> List[Case]:
    cases: List[Case] = []
    compile_cases: List[Case] = []
    big = max(cfg.op_images, key=lambda hw: hw[0] * hw[1]) if cfg.op_images else None
    for img in sorted(cfg.op_images, key=lambda hw: -hw[0] * hw[1]):   # largest first (budget)
        for s in cfg.stages:
            h, w = AB.stage_map_size(img[0], img[1], s)
            for op in OPS + ((HRCA_OP,) if cfg.cuda and s == 1 else ()):
                B, _, _, C = _op_shapes(op, cfg.batch, h, w, s)
                for dtype in cfg.dtypes:
                    for mode in cfg.modes:
                        compile_here = img == big and s == 1
                        for impl, preset in _impls(cfg, compile_here):
                            key = dict(section="ops", name=op, stage=s, image=size_str(img),
                                       shape=f"{B}x{h}x{w}x{C}", batch=B, dtype=dtype, mode=mode, impl=impl)
                            if op == HRCA_OP:
                                key["shape"] += "_Nq{}_K{}_ws{}".format(HRCA["nq"], hrca_dims(h, w)[1],
                                                                        HRCA["window"])
                            esize = torch.tensor([], dtype=DTYPES[dtype]).element_size()
                            key["bytes"] = op_bytes(op, cfg.batch, h, w, s, esize, mode)
                            fl = op_matmul_flops(op, cfg.batch, h, w, s, mode)
                            if fl is not None:
                                key["flop"] = fl
                            if preset:
                                (compile_cases if impl == "compile" else cases).append(
                                    Case("ops", key, status=preset))
                                continue

                            def fn(op=op, s=s, h=h, w=w, dtype=dtype, mode=mode, impl=impl):
                                eager, fused, inputs = _op_functions(op, s, h, w)
                                f = {"eager": eager, "fused": fused}.get(impl) or _compiled(eager)
                                mk = lambda i: inputs(cfg, cfg.batch, DTYPES[dtype], mode != "fwd", i)  # noqa: E731
                                return _m_fields(_time_callable(cfg, f, mk, mode, probe_fn=eager))
                            c = Case("ops", key, fn, compile=impl == "compile", min_budget_s=20 if impl == "compile" else 0)
                            (compile_cases if impl == "compile" else cases).append(c)
    return cases + compile_cases


# ------------------------------------------------------------------------------ LRSA / block level
class StageBlock(nn.Module):
    """One encoder block with its stage's shared depthwise convs."""

    def __init__(self, s: int, drop_path: float = 0.1):
        super().__init__()
        from lrformer.layers import Block
        dim = AB.S_DIMS[s - 1]
        self.blk = Block(dim, AB.S_HEADS[s - 1], S_MLP_RATIOS[s - 1], drop_path, S_LAYER_SCALE[s - 1])
        self.d_convs = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in range(4))

    def forward(self, x):
        return self.blk(x, self.d_convs)


def module_cases(cfg: Config, level: str) -> List[Case]:
    cases: List[Case] = []
    compile_cases: List[Case] = []
    big = max(cfg.op_images, key=lambda hw: hw[0] * hw[1]) if cfg.op_images else None
    for img in sorted(cfg.op_images, key=lambda hw: -hw[0] * hw[1]):   # largest first (budget)
        for s in cfg.stages:
            h, w = AB.stage_map_size(img[0], img[1], s)
            C = AB.S_DIMS[s - 1]
            for dtype in cfg.dtypes:
                for mode in cfg.modes:
                    compile_here = img == big and s == 1
                    for impl, preset in _impls(cfg, compile_here):
                        key = dict(section=level, name="LRSA" if level == "lrsa" else "Block", stage=s,
                                   image=size_str(img), shape=f"{cfg.batch}x{h}x{w}x{C}", batch=cfg.batch,
                                   dtype=dtype, mode=mode, impl=impl)
                        if preset:
                            (compile_cases if impl == "compile" else cases).append(Case(level, key, status=preset))
                            continue

                        def fn(s=s, h=h, w=w, C=C, dtype=dtype, mode=mode, impl=impl):
                            torch.manual_seed(s)
                            ref = (AB.LRSAAttention(C, AB.S_HEADS[s - 1]) if level == "lrsa" else StageBlock(s))
                            ref = ref.to(cfg.device).train(mode != "fwd")
                            if impl == "fused":
                                mod, why = fuse_copy(ref)
                                if mod is None:
                                    return dict(status=why)
                            elif impl == "compile":
                                mod = _compiled(ref)
                            else:
                                mod = ref
                            mk = lambda i: (_randn((cfg.batch, h, w, C), cfg, torch.float32, mode != "fwd",  # noqa: E731
                                                   _gen(cfg, i)),)
                            ac = None if dtype == "fp32" else dtype
                            own = mod if impl == "fused" else ref     # the compiled module shares ref's params
                            return _m_fields(_time_callable(cfg, mod, mk, mode, modules=(own,),
                                                            autocast_dtype=ac, probe_fn=ref))
                        c = Case(level, key, fn, compile=impl == "compile", min_budget_s=30 if impl == "compile" else 0)
                        (compile_cases if impl == "compile" else cases).append(c)
    return cases + compile_cases


# ------------------------------------------------------------------------------------ model level
def seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The segmentor's loss: cross-entropy (ignore 255) on logits upsampled to the labels."""
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits.float(), labels, ignore_index=255)


_MODEL_CACHE: Dict = {}


def _cached_model(cfg: Config, variant: str, impl: str, train: bool):
    """Eager/fused models are reused by consecutive cases (one kept at a time); compiled ones not."""
    key = (variant, impl)
    if impl != "compile" and key in _MODEL_CACHE:
        model = _MODEL_CACHE[key].train(train)
        return model, model, ""
    _MODEL_CACHE.clear()
    free_memory()
    model, fwd, why = _make_model(cfg, variant, impl, train)
    if model is not None and impl != "compile":
        _MODEL_CACHE[key] = model
    return model, fwd, why


def release_models():
    _MODEL_CACHE.clear()
    free_memory()


def _make_model(cfg: Config, variant: str, impl: str, train: bool):
    import lrformer
    name = f"lrformer_{variant}"
    torch.manual_seed(0)
    if impl == "fused":
        try:
            model = lrformer.create_model(name, fused=True)
        except Exception as exc:  # noqa: BLE001
            return None, None, f"n/a (create_model(fused=True) failed: {type(exc).__name__})"
        if not getattr(model, "fuse_report", True):
            return None, None, "n/a (fuse swapped nothing)"
    else:
        model = lrformer.create_model(name)
    model = model.to(cfg.device).train(train)
    fwd = _compiled(model) if impl == "compile" else model
    return model, fwd, ""


def model_cases(cfg: Config) -> List[Case]:
    cases: List[Case] = []
    compile_cases: List[Case] = []
    tasks = [("inference", hw, dt) for hw in cfg.model_sizes for dt in cfg.dtypes]

    def compile_here(variant, task, hw, dtype):
        if variant != cfg.compile_model_variant:
            return False
        if task == "inference":   # compile at one representative size: 1024x1024 if swept
            big = max(cfg.model_sizes, key=lambda x: x[0] * x[1])
            rep = (1024, 1024) if (1024, 1024) in cfg.model_sizes else big
            return hw == rep and dtype == ("bf16" if "bf16" in cfg.dtypes else cfg.dtypes[0])
        return hw == min(cfg.train_sizes, key=lambda x: x[0] * x[1])

    order = []   # (variant, impl, preset, task, hw, dtype): one model per (variant, impl) run
    for variant in cfg.model_variants:
        vt = tasks + ([("training", hw, cfg.train_dtype) for hw in cfg.train_sizes]
                      if variant in cfg.train_variants else [])
        impls = list(dict.fromkeys(i for t, hw, dt in vt for i, _ in _impls(cfg, compile_here(variant, t, hw, dt))))
        for impl_name in impls:
            for task, hw, dtype in vt:
                for impl, preset in _impls(cfg, compile_here(variant, task, hw, dtype)):
                    if impl == impl_name:
                        order.append((variant, impl, preset, task, hw, dtype))
    for variant, impl, preset, task, hw, dtype in order:
        B = cfg.infer_batch if task == "inference" else cfg.train_batch
        key = dict(section="model", name=f"lrformer_{variant}", variant=variant, task=task,
                   image=size_str(hw), shape=f"{B}x3x{hw[0]}x{hw[1]}", batch=B, dtype=dtype,
                   mode="fwd" if task == "inference" else "train step", impl=impl)
        if task == "training" and dtype != "fp32":
            key["note"] = f"{dtype} autocast, AdamW"
        elif task == "training":
            key["note"] = "fp32, AdamW"
        elif dtype != "fp32":
            key["note"] = f"{dtype} autocast"
        if preset:
            (compile_cases if impl == "compile" else cases).append(Case("model", key, status=preset))
            continue

        def fn(variant=variant, task=task, hw=hw, dtype=dtype, impl=impl, B=B):
            model = fwd = opt = None
            try:
                model, fwd, why = _cached_model(cfg, variant, impl, task == "training")
                if model is None:
                    return dict(status=why)
                ac = None if dtype == "fp32" else dtype
                model_timing = dataclasses.replace(cfg.timing, min_reps=min(3, cfg.timing.min_reps))

                def images(i):
                    g = _gen(cfg, i)
                    x = torch.randn(B, 3, hw[0], hw[1], device=cfg.device, generator=g)
                    if task == "inference":
                        return (x,)
                    y = torch.randint(0, 150, (B, hw[0], hw[1]), device=cfg.device, generator=g)
                    return (x, y)
                if task == "inference":
                    def run(inp):
                        with torch.no_grad(), (_autocast(cfg, ac) if ac else _autocast(cfg, "fp32")):
                            return fwd(inp[0])
                    m = measure(images, run, cfg.device, model_timing, n_sets=cfg.timing.min_sets)
                else:
                    fused_ok = cfg.cuda
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True if fused_ok else None)

                    def run(inp):
                        with (_autocast(cfg, ac) if ac else _autocast(cfg, "fp32")):
                            loss = seg_loss(fwd(inp[0]), inp[1])
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    m = measure(images, run, cfg.device, model_timing, n_sets=cfg.timing.min_sets)
                return _m_fields(m)
            finally:
                del model, fwd, opt
                if impl == "compile":
                    release_models()
        c = Case("model", key, fn, compile=impl == "compile",
                 min_budget_s=(150 if task == "training" else 90) if impl == "compile" else 0)
        (compile_cases if impl == "compile" else cases).append(c)
    return cases + compile_cases


SECTIONS = ("flops", "attention", "ops", "lrsa", "block", "model")
#: share of the time budget per section (unused time rolls over to the later sections).
SHARES = {"flops": 0.07, "attention": 0.1, "ops": 0.25, "lrsa": 0.08, "block": 0.1, "model": 0.4}


def build_cases(cfg: Config, section: str) -> List[Case]:
    if section == "flops":
        return flops_cases(cfg)
    if section == "attention":
        return attention_flops_cases(cfg) + attention_latency_cases(cfg)
    if section == "ops":
        return op_cases(cfg)
    if section in ("lrsa", "block"):
        return module_cases(cfg, section)
    if section == "model":
        return model_cases(cfg)
    raise ValueError(f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")
