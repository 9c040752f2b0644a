"""``python -m lrformer_kernels.selftest [--quick]``: do the fused kernels work on this machine?

On a CUDA machine: every op forward and backward at the LRFormer-S stage shapes (``--quick``: stage 1
and 4 only) plus a fused LRSA block, in fp32, bf16 and fp16, against the float64 reference on the same
inputs (relative error of the output and of every input gradient, per-dtype tolerances), then one
timing line per op: fused vs the eager reference vs ``torch.compile`` of it (CUDA events after warm-up,
medians).  Prints a table; exit status 1 if any check fails.

On a CPU with ``TRITON_INTERPRET=1`` it runs the same checks on small shapes in float64 and fp32 (the
kernels in Triton's interpreter) and no timing.  With neither, it says in one line what it needs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

from . import backend
from ._common import HAS_TRITON, interpreting

#: relative-error tolerances against the float64 reference, outputs and gradients
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
#: LRFormer-S per stage: width, heads, MLP ratio; map sizes of a 512x512 image
STAGES = {1: (64, 2, 8, 128), 2: (128, 4, 8, 64), 3: (320, 10, 4, 32), 4: (512, 16, 4, 16)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _cases(stage: int, small: bool) -> List[Tuple[str, Callable, Callable, Callable]]:
    """(name, make_inputs(dtype, device) -> tuple, fused fn, reference fn) at one stage."""
    from . import lrsa_grids
    C, heads, ratio, side = STAGES[stage]
    B = 2 if small else 8
    if small:
        C, side = min(C, 32), min(side, 12)
        heads = max(1, min(heads, C // 8))
    h = w = side
    grids = lrsa_grids(h, w, 4 if small else 16)
    nq, m = grids[0][0] * grids[0][1], sum(a * b for a, b in grids[1:])
    F, R = backend.FUSED, backend.REFERENCE

    def randn(*shape, dt, dev):
        return torch.randn(*shape, device=dev, dtype=torch.float32).to(dt)

    out = [
        ("pyramid_pool", lambda dt, dev: (randn(B, h, w, C, dt=dt, dev=dev),),
         lambda x: F.pyramid_pool(x, grids), lambda x: R.pyramid_pool(x, grids)),
        ("pyramid_pool (norm1)", lambda dt, dev: (randn(B, h, w, C, dt=dt, dev=dev) + 1,
                                                  1 + randn(C, dt=dt, dev=dev) / 10, randn(C, dt=dt, dev=dev)),
         lambda x, nw, nb: F.pyramid_pool(x, grids, nw, nb), lambda x, nw, nb: R.pyramid_pool(x, grids, nw, nb)),
        ("dwconv3x3_pyramid_pool", lambda dt, dev: (randn(B, h, w, C, dt=dt, dev=dev), randn(C, 1, 3, 3, dt=dt, dev=dev) / 3,
                                                    randn(C, dt=dt, dev=dev), 1 + randn(C, dt=dt, dev=dev) / 10,
                                                    randn(C, dt=dt, dev=dev)),
         lambda x, wt, b, nw, nb: _joined(F.dwconv3x3_pyramid_pool(x, wt, b, grids, nw, nb)),
         lambda x, wt, b, nw, nb: _joined(R.dwconv3x3_pyramid_pool(x, wt, b, grids, nw, nb))),
        ("lowres_attention", lambda dt, dev: (randn(B, nq, C, dt=dt, dev=dev), randn(B, m, 2 * C, dt=dt, dev=dev)),
         lambda q, kv: F.lowres_attention(q, kv[..., :C], kv[..., C:], heads),
         lambda q, kv: R.lowres_attention(q, kv[..., :C], kv[..., C:], heads)),
        ("upsample_residual", lambda dt, dev: (randn(B, h, w, C, dt=dt, dev=dev),
                                               randn(B, grids[0][0], grids[0][1], C, dt=dt, dev=dev),
                                               randn(C, dt=torch.float64 if dt == torch.float64 else torch.float32,
                                                     dev=dev)),
         F.upsample_residual, R.upsample_residual),
        ("dwconv3x3 (IRB)", lambda dt, dev: (randn(B, h, w, C * ratio, dt=dt, dev=dev),
                                             randn(C * ratio, 1, 3, 3, dt=dt, dev=dev) / 3,
                                             randn(C * ratio, dt=dt, dev=dev)),
         lambda x, wt, b: F.dwconv3x3(x, wt, b, gelu=True), lambda x, wt, b: R.dwconv3x3(x, wt, b, gelu=True)),
        ("irb (Block IRB)", lambda dt, dev: _irb_inputs(B, h, w, C, C * ratio, dt, dev, randn),
         lambda x, *p: F.irb(x, *p[:7], _KEEP[:B].to(x.device, p[7].dtype), *p[7:]),
         lambda x, *p: R.irb(x, *p[:7], _KEEP[:B].to(x.device, p[7].dtype), *p[7:])),
    ]
    if stage == 1:
        S, M, D, L, P = (16 + 64, 2, 8, 2, 2) if small else (16 * 16 + 32 * 32 + 64 * 64, 8, 32, 3, 4)
        shapes = [(4, 4), (8, 8)] if small else [(16, 16), (32, 32), (64, 64)]
        out.append(("ms_deform_attn", lambda dt, dev: (randn(B, S, M, D, dt=dt, dev=dev),
                                                       torch.rand(B, S, M, L, P, 2, device=dev).to(dt),
                                                       torch.rand(B, S, M, L, P, device=dev).to(dt)),
                    lambda v, loc, wgt: F.ms_deform_attn(v, shapes, loc, wgt),
                    lambda v, loc, wgt: R.ms_deform_attn(v, shapes, loc, wgt)))
        out.append(("LRSA block", *_lrsa_block(B, h, w, C, heads, grids, randn)))
        K, lh = (19, 6) if small else (150, side // 2)      # the loss: stride-8 logits, labels at the image size

        def loss_inputs(dt, dev):
            labels = torch.randint(0, K, (B, 8 * lh, 8 * lh), device=dev)
            labels[torch.rand(labels.shape, device=dev) < 0.05] = 255
            return randn(B, K, lh, lh, dt=dt, dev=dev), labels
        out.append(("upsampled_cross_entropy", loss_inputs, F.upsampled_cross_entropy, R.upsampled_cross_entropy))
    return out


def _joined(outputs) -> torch.Tensor:
    """Several outputs checked as one tensor (one error each for the outputs and the gradients)."""
    return torch.cat([t.flatten(1) for t in outputs], 1)


#: the IRB check's drop-path factors: one dropped sample, the others kept with 1 / 0.8
_KEEP = torch.tensor([1.25, 0.0, 1.25, 1.25, 1.25, 1.25, 1.25, 1.25])


def _irb_inputs(B, h, w, C, HD, dt, dev, randn):
    """x, w1, b1, wc, bc, w2, b2, layer scale, LayerNorm weight and bias of one encoder block's IRB branch."""
    return (randn(B, h, w, C, dt=dt, dev=dev) + 1, randn(HD, C, dt=dt, dev=dev) / C ** 0.5, randn(HD, dt=dt, dev=dev),
            randn(HD, 1, 3, 3, dt=dt, dev=dev) / 3, randn(HD, dt=dt, dev=dev), randn(C, HD, dt=dt, dev=dev) / HD ** 0.5,
            randn(C, dt=dt, dev=dev), randn(C, dt=dt, dev=dev), 1 + randn(C, dt=dt, dev=dev) / 10, randn(C, dt=dt, dev=dev))


def _lrsa_block(B, h, w, C, heads, grids, randn):
    """A whole LRSA step composed from the ops (CPE, norm1 and pooling, pooled-map convs, attention,
    upsample-residual)."""
    from .lrsa import lrsa_pooled
    torch.manual_seed(0)
    mods = nn.ModuleDict(dict(cpe=nn.Conv2d(C, C, 3, padding=1, groups=C), norm1=nn.LayerNorm(C, eps=1e-6),
                              norm=nn.LayerNorm(C), kv=nn.Linear(C, 2 * C),
                              proj=nn.Linear(C, C), q=nn.Linear(C, C),
                              d_convs=nn.ModuleList(nn.Conv2d(C, C, 3, padding=1, groups=C) for _ in grids[1:])))

    copies = {}

    def run(ops, x):
        key = (x.device, x.dtype)
        if key not in copies:                   # one copy of the weights per dtype (same values)
            import copy
            copies[key] = copy.deepcopy(mods).to(device=x.device, dtype=x.dtype)
        m = copies[key]
        y, pooled = ops.dwconv3x3_pyramid_pool(x, m.cpe.weight, m.cpe.bias, grids, m.norm1.weight, m.norm1.bias,
                                               m.norm1.eps)
        low = lrsa_pooled(ops, pooled, grids, m.q.weight, m.q.bias, m.norm, m.kv, m.proj, heads, (C // heads) ** -0.5,
                          m.d_convs)
        return ops.upsample_residual(y, low)
    return (lambda dt, dev: (randn(B, h, w, C, dt=dt, dev=dev),),
            lambda x: run(backend.FUSED, x), lambda x: run(backend.REFERENCE, x))


def check(fused, reference, inputs, dtype) -> Tuple[float, float]:
    """(output error, worst gradient error) of ``fused`` in ``dtype`` vs ``reference`` in float64."""
    xs = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    ref_xs = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out, ref = fused(*xs), reference(*ref_xs)
    g = torch.randn(ref.shape, dtype=torch.float64, device=ref.device)
    leaves = [t for t in xs if t.requires_grad]
    ref_leaves = [t for t in ref_xs if t.requires_grad]
    got = torch.autograd.grad(out, leaves, g.to(out.dtype), allow_unused=True)
    want = torch.autograd.grad(ref, ref_leaves, g, allow_unused=True)
    gerr = max((_rel(a, b) if a is not None and b is not None else 0.0) for a, b in zip(got, want))
    return _rel(out, ref), gerr


def _time_ms(fn, inputs, reps: int = 20) -> float:
    for _ in range(3):
        fn(*inputs)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*inputs)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


#: op names of the last :func:`run` whose checks failed (read by the benchmark sweep)
LAST_FAILED: List[str] = []


def run(quick: bool = False, stream=sys.stdout) -> int:
    cuda = torch.cuda.is_available()
    if not HAS_TRITON:
        print("lrformer_kernels.selftest needs triton, which is not installed: pip install 'triton>=3.6' "
              "(CUDA builds of torch bring it; on a CPU-only machine set TRITON_INTERPRET=1 as well)", file=stream)
        return 2
    if not (cuda or interpreting()):
        print("lrformer_kernels.selftest needs a CUDA GPU, or TRITON_INTERPRET=1 to run the kernels "
              "in Triton's interpreter on the CPU", file=stream)
        return 2
    dev = torch.device("cuda" if cuda else "cpu")
    small = not cuda
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if cuda else [torch.float64, torch.float32]
    stages = ([1, 4] if quick else [1, 2, 3, 4]) if cuda else [1]
    torch.manual_seed(0)
    rows, failed = [], 0
    print(f"lrformer_kernels self-test on {torch.cuda.get_device_name(dev) if cuda else 'CPU (Triton interpreter)'}"
          f", torch {torch.__version__}", file=stream)
    print(f"{'op':<23} {'stage':>5} {'dtype':<9} {'out err':>9} {'grad err':>9} {'tol':>7}  result", file=stream)
    timing: Dict[str, Tuple] = {}
    for s in stages:
        for name, make, fused, ref in _cases(s, small):
            for dt in dtypes:
                inputs = make(dt, dev)
                try:
                    oerr, gerr = check(fused, ref, inputs, dt)
                    ok = oerr <= TOL[dt] and gerr <= 10 * TOL[dt]
                    note = "ok" if ok else "FAIL"
                except Exception as e:  # noqa: BLE001 - a crash is a failure of this check, reported
                    oerr = gerr = float("nan")
                    ok, note = False, f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:60]})"
                failed += not ok
                rows.append((name, s, dt, oerr, gerr, ok))
                print(f"{name:<23} {s:>5} {str(dt).replace('torch.', ''):<9} {oerr:>9.2e} {gerr:>9.2e} "
                      f"{TOL[dt]:>7.0e}  {note}", file=stream)
                if cuda and ok and dt == torch.bfloat16 and s == stages[0]:
                    timing[name] = (fused, ref, inputs)
    if cuda and timing:
        print(f"\n{'op (bf16, forward)':<22} {'fused ms':>9} {'eager ms':>9} {'compile ms':>11}", file=stream)
        for name, (fused, ref, inputs) in timing.items():
            with torch.no_grad():
                tf, te = _time_ms(fused, inputs), _time_ms(ref, inputs)
                try:
                    tc = f"{_time_ms(torch.compile(ref, dynamic=False), inputs):>11.3f}"
                except Exception as e:  # noqa: BLE001
                    tc = f"{'n/a (' + type(e).__name__ + ')':>11}"
            print(f"{name:<22} {tf:>9.3f} {te:>9.3f} {tc}", file=stream)
    LAST_FAILED[:] = sorted({r[0] for r in rows if not r[5]})
    print(f"\n{len(rows) - failed}/{len(rows)} checks passed" + ("" if not failed else f"; {failed} FAILED"),
          file=stream)
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lrformer_kernels.selftest", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="stages 1 and 4 only on a GPU")
    args = p.parse_args(argv)
    t0 = time.time()
    rc = run(args.quick)
    if rc != 2:
        print(f"({time.time() - t0:.0f} s)")
    return rc


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
