"""dwconv3x3_pyramid_pool: an encoder block's CPE (depthwise conv + residual) and its LRSA's pooling of norm1 of
the result, one op.  Float64 under the interpreter against the two ops' references composed by autograd: both
outputs, the gradients of x and of the four parameters, from random gradients on both outputs; outputs poisoned,
the kernels taken (every reference path raises)."""
import importlib

import pytest
import torch

import lrformer_kernels as F
import lrformer_kernels._common as common
from conftest import TOL, devices, dtypes_for, rel_err
from lrformer_kernels import dwconv3x3_pyramid_pool
from test_pyramid_pool import grids_for, make_input

dw, dpp, pp = (importlib.import_module(f"lrformer_kernels.{m}") for m in ("dwconv", "dwconv_pyramid_pool", "pyramid_pool"))

#: encoder widths of LRFormer-T/S/B/L/XL, one per whole-row tile width (64 .. 1024), all ragged but 128 and 512
WIDTHS = (48, 128, 240, 512, 768)


@pytest.fixture
def kernel_only(monkeypatch):
    """Fail if any part of the op falls back to the PyTorch reference instead of running the kernels."""
    def boom(*a, **k):
        raise AssertionError("reference path taken instead of the Triton kernels")
    for mod, names in ((dpp, ("_forward_reference", "_backward_reference")),
                       (dw, ("_forward_reference", "_backward_reference")),
                       (pp, ("_ln_forward_reference", "_ln_backward_reference"))):
        for name in names:
            monkeypatch.setattr(mod, name, boom)


def _check(B, H, W, C, kind, layout, device, dtype, pdtype=None, bias=True):
    grids = grids_for(kind, H, W)
    x = (1 + 2 * make_input(B, H, W, C, layout, dtype, device)).detach().requires_grad_()
    pdtype = pdtype or dtype

    def param(*shape, scale=1.0, shift=0.0):
        return (shift + scale * torch.randn(*shape, device=device)).to(pdtype).requires_grad_()
    params = [param(C, 1, 3, 3, scale=1 / 3), param(C) if bias else None, param(C, scale=0.1, shift=1.0), param(C)]
    y, pooled = dwconv3x3_pyramid_pool(x, params[0], params[1], grids, params[2], params[3], 1e-6)
    assert y.shape == (B, H, W, C) and y.dtype == dtype and y.is_contiguous()
    assert pooled.shape == (B, sum(a * b for a, b in grids), C) and pooled.dtype == dtype
    leaves = [x] + [p for p in params if p is not None]
    r = [t.detach().double().requires_grad_() for t in leaves]
    rp = list(r[1:])
    if not bias:
        rp.insert(1, None)
    ry, rpooled = F.dwconv3x3_pyramid_pool_reference(r[0], rp[0], rp[1], grids, rp[2], rp[3], 1e-6)
    gy, gp = torch.randn_like(y), torch.randn_like(pooled)
    got = torch.autograd.grad((y, pooled), leaves, (gy, gp))
    want = torch.autograd.grad((ry, rpooled), r, (gy.double(), gp.double()))
    tol = 1e-12 if dtype == torch.float64 else TOL[dtype]
    assert rel_err(y, ry) < tol and rel_err(pooled, rpooled) < tol, (rel_err(y, ry), rel_err(pooled, rpooled))
    for k, (a, e, t) in enumerate(zip(got, want, leaves)):
        assert a.dtype == t.dtype and a.shape == t.shape and rel_err(a, e) < tol, (k, (B, H, W, C), rel_err(a, e))


# (B, H, W, C, grids, layout)
CASES = [
    (1, 7, 13, 5, "lrsa", "contig"),      # odd, non-square; the query grid larger than the map
    (3, 13, 7, 24, "lrsa", "nchw"),       # batch 3, transposed aspect, an NCHW view
    (2, 3, 5, 40, "lrsa", "sliced"),      # a map smaller than every grid; odd strides
    (1, 20, 24, 16, "lrsa", "contig"),    # grids smaller than the map (overlapping windows)
    (2, 9, 11, 24, "mixed8", "bexpand"),  # 8 grids; batch stride 0
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_backward(case, device, kernel_only):
    for dtype in dtypes_for(device):
        _check(*case, device, dtype)


@pytest.mark.parametrize("device", devices())
def test_gpu_tiles(device, kernel_only, monkeypatch):
    """The CUDA dispatch's tiles: whole rows in the conv's forward with several pixels a tile (and one, at the
    widest), the backward's programs on 1 SM and 132, an encoder width of T/S/B/L/XL per tile width, no bias,
    int64."""
    monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    x = torch.empty(2, 5, 6, 70)
    bp, bc, _ = dw._forward_config(x, False, True)
    assert bc >= 70 and 1 < bp < 60, (bp, bc)
    for sms in (1, 132):                 # one program walking every pixel block, or many programs
        monkeypatch.setattr(common, "DEFAULT_SMS", sms)
        monkeypatch.setattr(common, "PARTIAL_TRAFFIC_SHARE", 1e9 if sms > 1 else 0.125)
        monkeypatch.setattr(pp, "LN_MIN_ITERS", 1 if sms > 1 else pp.LN_MIN_ITERS)
        ln_programs = pp._ln_backward_config(70, 60, 8, torch.device(device))[3]
        conv_programs = dw._backward_config(x.double())[3]
        assert (ln_programs > 1 and conv_programs > 1) if sms > 1 else ln_programs == 1, (ln_programs, conv_programs)
        for dtype in dtypes_for(device):
            _check(2, 5, 6, 70, [(4, 4), (3, 5), (1, 1), (5, 2)], "sliced", device, dtype)
    for dtype in dtypes_for(device):
        for C in WIDTHS:
            _check(1, 2, 3, C, [(2, 3), (1, 1), (3, 2)], "contig", device, dtype)
        _check(2, 4, 5, 24, [(3, 3), (1, 2)], "nchw", device, dtype, bias=False)
        for mod in (dw, pp):
            monkeypatch.setattr(mod, "needs_int64", lambda *t: True)
        _check(1, 6, 7, 24, [(4, 4), (2, 3)], "contig", device, dtype)


@pytest.mark.parametrize("used", ["y", "pooled"])
def test_one_output_used(used, kernel_only):
    """A loss on one output only: the other's gradient arrives as None and counts as zero."""
    grids = [(3, 2), (1, 1)]
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(6, 1, 3, 3, dtype=torch.float64) / 3, torch.randn(6, dtype=torch.float64)
    nw, nb = 1 + 0.1 * torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    outs = dict(zip(("y", "pooled"), dwconv3x3_pyramid_pool(x, w, b, grids, nw, nb)))
    xr = x.detach().requires_grad_()
    refs = dict(zip(("y", "pooled"), F.dwconv3x3_pyramid_pool_reference(xr, w, b, grids, nw, nb)))
    g = torch.randn_like(outs[used])
    got, = torch.autograd.grad(outs[used], x, g)
    want, = torch.autograd.grad(refs[used], xr, g)
    assert rel_err(got, want) < 1e-12


def test_half_twin_autocast_parameters(kernel_only):
    """bf16's fp16 twin with fp32 parameters (autocast): fp32 statistics, the gradients in the parameters' dtype."""
    _check(2, 6, 5, 16, "lrsa", "contig", "cpu", torch.float16, pdtype=torch.float32)


def test_reference_paths_agree():
    """Off the interpreter's kernels (the op's own reference, as on a CPU without TRITON_INTERPRET) the op matches
    the public reference too, in float64."""
    use = common.use_kernel
    try:
        dpp.use_kernel = lambda *t: False
        _check(2, 5, 7, 12, "lrsa", "contig", "cpu", torch.float64)
    finally:
        dpp.use_kernel = use


def test_opcheck_and_gradcheck(kernel_only):
    grids = F.lrsa_grids(3, 4, 2)
    flat = pp._check_grids(grids)
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    ps = [torch.randn(8, 1, 3, 3, dtype=torch.float64) / 3, torch.randn(8, dtype=torch.float64),
          1 + 0.1 * torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)]
    ps = [p.requires_grad_() for p in ps]
    assert torch.autograd.gradcheck(lambda *a: dwconv3x3_pyramid_pool(a[0], a[1], a[2], grids, a[3], a[4]),
                                    (x, *ps), fast_mode=True)
    torch.library.opcheck(torch.ops.lrformer.dwconv3x3_pyramid_pool, (x, ps[0], ps[1], flat, ps[2], ps[3], 1e-6),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    y, pooled, mean, rstd = torch.ops.lrformer.dwconv3x3_pyramid_pool(x.detach(), *(p.detach() for p in ps[:2]), flat,
                                                                       *(p.detach() for p in ps[2:]), 1e-6)
    torch.library.opcheck(torch.ops.lrformer.dwconv3x3_pyramid_pool_backward,
                          (torch.randn_like(y), torch.randn_like(pooled), x.detach(), y, mean, rstd, ps[0].detach(),
                           ps[1].detach(), ps[2].detach(), flat), test_utils=("test_schema", "test_faketensor"))


def test_bad_input():
    x = torch.randn(1, 4, 4, 8)
    g = F.lrsa_grids(4, 4, 2)
    w, b, nw, nb = torch.randn(8, 1, 3, 3), torch.randn(8), torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="conv_weight must have shape"):
        dwconv3x3_pyramid_pool(x, torch.randn(8, 3, 3), b, g, nw, nb)
    with pytest.raises(ValueError, match="conv_bias must have shape"):
        dwconv3x3_pyramid_pool(x, w, torch.randn(4), g, nw, nb)
    with pytest.raises(ValueError, match="required"):
        dwconv3x3_pyramid_pool(x, w, b, g, None, None)
    with pytest.raises(ValueError, match=r"\(8,\)"):
        dwconv3x3_pyramid_pool(x, w, b, g, torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="eps"):
        dwconv3x3_pyramid_pool(x, w, b, g, nw, nb, eps=0.0)
    with pytest.raises(ValueError, match="grids"):
        dwconv3x3_pyramid_pool(x, w, b, [], nw, nb)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        dwconv3x3_pyramid_pool(x[0], w, b, g, nw, nb)
    with pytest.raises(TypeError, match="x has dtype"):
        dwconv3x3_pyramid_pool(x.int(), w, b, g, nw, nb)
