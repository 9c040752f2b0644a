"""Fused upsample + layer-scale + drop-path + residual: kernel vs the float64 reference."""
import importlib
import os

import pytest
import torch

import lrformer_kernels._common as common

from conftest import TOL, devices, dtypes_for, rel_err
import lrformer_kernels as ref_F
from lrformer_kernels.upsample_residual import upsample_residual

# the module itself (the package re-exports a function of the same name)
mod = importlib.import_module("lrformer_kernels.upsample_residual")

# (B, (h, w), (H, W), C): up-, down- and identity-sampling, odd / non-square sizes, C not 2^k.
CASES = [
    (1, (4, 6), (13, 17), 5),
    (3, (16, 16), (2, 2), 24),
    (3, (5, 3), (5, 3), 40),
    (1, (3, 7), (20, 9), 24),
    (3, (2, 5), (9, 4), 5),
    (1, (1, 1), (3, 2), 5),
]


def _make(B, hw, HW, C, device, dtype, nchw_x, strided_low):
    h, w = hw
    H, W = HW
    if nchw_x:  # NCHW memory seen tokens-last through a permute (no copy)
        x = torch.randn(B, C, H, W, device=device, dtype=dtype).permute(0, 2, 3, 1)
    else:
        x = torch.randn(B, H, W, C, device=device, dtype=dtype)
    if strided_low:  # non-contiguous: every other column of a wider map, channels sliced
        low = torch.randn(B, h, 2 * w, C + 3, device=device, dtype=dtype)[:, :, ::2, 1:C + 1]
    else:
        low = torch.randn(B, h, w, C, device=device, dtype=dtype)
    return x, low


def _scale_keep(B, C, device, with_scale, keep_mode, pdtype=torch.float32):
    """scale/keep are parameters/buffers: float32 (float64 for float64 runs) whatever x is."""
    scale = torch.randn(C, device=device, dtype=pdtype) if with_scale else None
    keep = None
    if keep_mode == "drop":  # one dropped sample (0) among kept ones (1/keep_prob)
        keep = torch.full((B,), 1.0 / 0.8, device=device, dtype=pdtype)
        keep[B // 2] = 0.0
    elif keep_mode == "rand":
        keep = torch.rand(B, device=device, dtype=pdtype) + 0.5
    return scale, keep


def _run_and_check(case, device, dtype, with_scale, keep_mode, nchw_x, strided_low,
                   pdtype=None):
    B, hw, HW, C = case
    x, low = _make(B, hw, HW, C, device, dtype, nchw_x, strided_low)
    if pdtype is None:
        pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale, keep = _scale_keep(B, C, device, with_scale, keep_mode, pdtype)
    x.requires_grad_(True)
    low.requires_grad_(True)
    if scale is not None:
        scale.requires_grad_(True)

    out = upsample_residual(x, low, scale, keep)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    g = torch.randn_like(out)
    inputs = [x, low] + ([scale] if scale is not None else [])
    grads = torch.autograd.grad(out, inputs, g)

    # float64 reference on the same values
    xr = x.detach().double().requires_grad_(True)
    lr = low.detach().double().requires_grad_(True)
    sr = scale.detach().double().requires_grad_(True) if scale is not None else None
    kr = keep.double() if keep is not None else None
    ref = ref_F.upsample_residual_reference(xr, lr, sr, kr)
    rinputs = [xr, lr] + ([sr] if sr is not None else [])
    rgrads = torch.autograd.grad(ref, rinputs, g.double())

    tol = TOL[dtype]
    assert rel_err(out, ref) < tol, ("out", rel_err(out, ref))
    # d_x is exactly the upstream gradient
    assert grads[0].dtype == dtype and grads[0].shape == x.shape
    assert rel_err(grads[0], rgrads[0]) < tol
    assert grads[1].dtype == low.dtype and grads[1].shape == low.shape
    assert rel_err(grads[1], rgrads[1]) < tol, ("d_low", rel_err(grads[1], rgrads[1]))
    if scale is not None:
        assert grads[2].dtype == scale.dtype and grads[2].shape == scale.shape
        stol = max(tol, TOL[scale.dtype])
        assert rel_err(grads[2], rgrads[2]) < stol, ("d_scale", rel_err(grads[2], rgrads[2]))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"B{c[0]}_{c[1][0]}x{c[1][1]}to{c[2][0]}x{c[2][1]}_C{c[3]}")
def test_forward_backward_matrix(case, device):
    """All sizes, with scale+keep(dropped sample), NCHW-view x and strided low."""
    for dtype in dtypes_for(device):
        _run_and_check(case, device, dtype, with_scale=True, keep_mode="drop",
                       nchw_x=True, strided_low=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("with_scale,keep_mode,nchw_x,strided_low", [
    (False, None, False, False),
    (True, None, False, True),
    (False, "rand", True, False),
    (True, "rand", False, False),
])
def test_options(device, with_scale, keep_mode, nchw_x, strided_low):
    """Scale/keep present or not, contiguous or strided layouts."""
    for dtype in dtypes_for(device):
        for case in [CASES[0], CASES[4]]:
            _run_and_check(case, device, dtype, with_scale, keep_mode, nchw_x, strided_low)


@pytest.mark.parametrize("device", devices())
def test_larger_upsample(device):
    """A bigger upsampling factor with C spanning several channel tiles (C=72)."""
    for dtype in dtypes_for(device):
        _run_and_check((2, (4, 8), (31, 62), 72), device, dtype, True, "drop", False, False)


@pytest.mark.parametrize("device", devices())
def test_mixed_param_dtypes(device):
    """float32 scale/keep parameters with a float64 (CPU) or half (CUDA) feature map."""
    for dtype in dtypes_for(device):
        _run_and_check(CASES[3], device, dtype, True, "rand", False, True, pdtype=torch.float32)


@pytest.mark.parametrize("device", devices())
def test_out_like_x_layout(device):
    dtype = dtypes_for(device)[0]
    x = torch.randn(2, 5, 7, 9, device=device, dtype=dtype)  # NCHW
    xt = x.permute(0, 2, 3, 1)
    low = torch.randn(2, 3, 4, 5, device=device, dtype=dtype)
    out = upsample_residual(xt, low, out_like_x=True)
    assert out.stride() == xt.stride()
    ref = ref_F.upsample_residual_reference(xt.double(), low.double())
    assert rel_err(out, ref) < TOL[dtype]
    out2 = upsample_residual(xt, low)
    assert out2.is_contiguous()
    assert rel_err(out2, ref) < TOL[dtype]


def test_gradcheck():
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    low = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(3, dtype=torch.float64, requires_grad=True)
    keep = torch.tensor([1.25, 0.0], dtype=torch.float64)
    # fast_mode: random-projection check (few evaluations; the interpreter is slow per launch)
    assert torch.autograd.gradcheck(lambda a, b, c: upsample_residual(a, b, c, keep),
                                    (x, low, scale), eps=1e-6, atol=1e-7, fast_mode=True)


def _compile_backends(device):
    # inductor compiles C++ on CPU (~40 s cold): opt in with LRFORMER_TEST_INDUCTOR=1; CUDA: always
    if device == "cuda" or os.environ.get("LRFORMER_TEST_INDUCTOR", "0") == "1":
        return ["aot_eager", "inductor"]
    return ["aot_eager"]


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    def f(x, low, scale, keep):
        return upsample_residual(x, low, scale, keep) * 2.0

    dtype = dtypes_for(device)[0]
    x = torch.randn(2, 6, 5, 4, device=device, dtype=dtype, requires_grad=True)
    low = torch.randn(2, 3, 3, 4, device=device, dtype=dtype, requires_grad=True)
    scale = torch.randn(4, device=device, dtype=dtype, requires_grad=True)
    keep = torch.tensor([0.0, 2.0], device=device, dtype=dtype)
    ref = f(x, low, scale, keep)
    g = torch.randn_like(ref)
    gr = torch.autograd.grad(ref, (x, low, scale), g)
    for backend in _compile_backends(device):
        torch._dynamo.reset()
        cf = torch.compile(f, fullgraph=True, backend=backend)
        out = cf(x, low, scale, keep)
        assert rel_err(out, ref) < TOL[dtype]
        gc = torch.autograd.grad(out, (x, low, scale), g)
        for a, b in zip(gc, gr):
            assert rel_err(a, b) < TOL[dtype]


@pytest.mark.parametrize("device", devices())
def test_gpu_tiles_and_int64(device, monkeypatch):
    """The GPU tile sizes (several low-column tiles per row, several channel tiles) and the
    int64-offset code path, run on the interpreter too."""
    monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    for dtype in dtypes_for(device):
        _run_and_check((1, (3, 6), (7, 70), 40), device, dtype, True, "rand", False, True)
        monkeypatch.setattr(mod, "needs_int64", lambda *t: True)
        _run_and_check((2, (5, 6), (3, 13), 5), device, dtype, True, "drop", True, False)
        monkeypatch.setattr(mod, "needs_int64", common.needs_int64)


@pytest.mark.parametrize("device", devices())
def test_partial_grads(device):
    """Only d_scale needed (low frozen) / only d_low needed (no scale grad)."""
    dtype = dtypes_for(device)[0]
    x = torch.randn(2, 9, 7, 6, device=device, dtype=dtype)
    low = torch.randn(2, 4, 3, 6, device=device, dtype=dtype)
    scale = torch.randn(6, device=device, dtype=dtype, requires_grad=True)
    keep = torch.tensor([2.0, 0.5], device=device, dtype=dtype)
    g = torch.randn(2, 9, 7, 6, device=device, dtype=dtype)
    ref = ref_F.upsample_residual_reference(x.double(), low.double(), scale.double(), keep.double())
    (ds,) = torch.autograd.grad(upsample_residual(x, low, scale, keep), (scale,), g)
    (rds,) = torch.autograd.grad(ref, (scale,), g.double())
    assert rel_err(ds, rds) < TOL[dtype]

    low.requires_grad_(True)
    sc = scale.detach()
    (dl,) = torch.autograd.grad(upsample_residual(x, low, sc, keep), (low,), g)
    lr = low.detach().double().requires_grad_(True)
    ref2 = ref_F.upsample_residual_reference(x.double(), lr, sc.double(), keep.double())
    (rdl,) = torch.autograd.grad(ref2, (lr,), g.double())
    assert rel_err(dl, rdl) < TOL[dtype]


def test_bad_inputs():
    x = torch.randn(2, 4, 4, 3)
    low = torch.randn(2, 2, 2, 3)
    with pytest.raises(TypeError, match="x"):
        upsample_residual(x.numpy(), low)
    with pytest.raises(ValueError, match="x"):
        upsample_residual(x[0], low)
    with pytest.raises(ValueError, match="low"):
        upsample_residual(x, low[0])
    with pytest.raises(TypeError, match="low"):
        upsample_residual(x, low.double())
    with pytest.raises(TypeError, match="x"):
        upsample_residual(x.int(), low.int())
    with pytest.raises(ValueError, match="batch"):
        upsample_residual(x, torch.randn(3, 2, 2, 3))
    with pytest.raises(ValueError, match="channels"):
        upsample_residual(x, torch.randn(2, 2, 2, 4))
    with pytest.raises(ValueError, match="scale"):
        upsample_residual(x, low, scale=torch.randn(4))
    with pytest.raises(ValueError, match="scale"):
        upsample_residual(x, low, scale=torch.randn(1, 3))
    with pytest.raises(TypeError, match="scale"):
        upsample_residual(x, low, scale=torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="keep"):
        upsample_residual(x, low, keep=torch.ones(3))
    with pytest.raises(ValueError, match="x"):
        upsample_residual(torch.randn(2, 0, 4, 3), low)
    with pytest.raises(ValueError, match="low"):
        upsample_residual(x, torch.randn(2, 0, 2, 3))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="low"):
            upsample_residual(x, low.cuda())
        with pytest.raises(ValueError, match="scale"):
            upsample_residual(x, low, scale=torch.ones(3, device="cuda"))


def test_reference_fallback_path(monkeypatch):
    """The PyTorch path the op takes when no kernel can run (CPU without the interpreter)."""
    monkeypatch.setattr(mod, "use_kernel", lambda *t: False)
    for case in [CASES[0], CASES[1]]:
        _run_and_check(case, "cpu", torch.float64, True, "drop", True, True)
        _run_and_check(case, "cpu", torch.float32, True, "rand", False, False)
    _run_and_check(CASES[3], "cpu", torch.float64, False, None, False, False)


def test_index_products_past_int32(monkeypatch):
    """Regression: (2 * out_col + 1) * low_cols past 2**31 with small tensors (65536 output columns from
    16384 low columns: the exact source coordinates wrapped in int32), forward and backward; with the
    64-bit decision looking only at tensor sizes (as before) the results are wrong."""
    x = torch.randn(1, 1, 65536, 1, dtype=torch.float64, requires_grad=True)
    low = torch.randn(1, 1, 16384, 1, dtype=torch.float64, requires_grad=True)
    xr, lr = x.detach().requires_grad_(), low.detach().requires_grad_()
    ref = ref_F.upsample_residual_reference(xr, lr)
    g = torch.randn_like(ref)
    want = torch.autograd.grad(ref, lr, g)[0]

    def run():
        out = upsample_residual(x, low)
        return out, torch.autograd.grad(out, low, g)[0]
    out, got = run()
    assert rel_err(out, ref) < 1e-12 and rel_err(got, want) < 1e-12
    monkeypatch.setattr(mod, "_index_int64", lambda *a: False)      # the old rule: sizes only
    out, got = run()
    assert rel_err(out, ref) > 1e-3 or rel_err(got, want) > 1e-3


@pytest.mark.parametrize("hw,HW", [((3, 3), (3, 3)), ((3, 4), (3, 9)), ((5, 3), (11, 3)), ((3, 3), (6, 6)),
                                   ((6, 6), (3, 2)), ((4, 5), (7, 3))])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_low_stays_where_the_reference_puts_it(hw, HW, bad):
    """A NaN/inf in ``low`` lands in exactly the output pixels where F.interpolate puts it: along a side
    whose size is unchanged the resize is the identity (one tap; the old kernel weighted the neighbour
    by 0 and spread 0 * NaN to 4 pixels of a same-size 3x3 map), elsewhere every tap F.interpolate
    multiplies, zero weights included.  Every position of the bad value, float64, kernel path:
    the same non-finite pixels, NaN exactly where the reference has NaN."""
    (h, w), (H, W) = hw, HW
    x = torch.randn(1, H, W, 2, dtype=torch.float64)
    for pos in range(h * w):
        low = torch.arange(h * w * 2, dtype=torch.float64).reshape(1, h, w, 2)
        low.view(-1, 2)[pos, 0] = bad
        out = upsample_residual(x, low)
        ref = ref_F.upsample_residual_reference(x, low)
        ok = ref.isfinite()
        assert torch.equal(out.isfinite(), ok), pos
        if bad != bad:      # NaN: NaN exactly there (an inf may come out as inf or, by F.interpolate's
            assert torch.equal(out.isnan(), ref.isnan()), pos   # lerp form inf + 0 * (v - inf), as NaN)
        assert rel_err(out[ok], ref[ok]) < 1e-12
