"""Fused depthwise 3x3 conv (lrformer_kernels.dwconv) vs the float64 reference (lrformer_kernels.dwconv3x3_reference)."""
import itertools

import pytest
import torch

from conftest import TOL, devices, dtypes_for, rel_err

import lrformer_kernels._common as common
import lrformer_kernels.dwconv as dw
from lrformer_kernels import REFERENCE as ref
from lrformer_kernels.dwconv import dwconv3x3

@pytest.fixture(autouse=True)
def _one_thread():
    """The maps here are tiny: intra-op threads only spin (badly so on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


DEV_DT = [(d, t) for d in devices() for t in dtypes_for(d)]
SHAPES = [(1, 1, 1, 3), (2, 2, 2, 24), (1, 5, 7, 40), (2, 9, 4, 72), (1, 16, 3, 3)]


def _inputs(B, H, W, C, device, dtype, nchw, with_bias, param_dtype=None):
    pdt = param_dtype or dtype
    if nchw:  # NCHW storage, passed as a tokens-last view (no copy)
        x = torch.randn(B, C, H, W, device=device, dtype=dtype).permute(0, 2, 3, 1)
    else:
        x = torch.randn(B, H, W, C, device=device, dtype=dtype)
    w = (torch.randn(C, 1, 3, 3, device=device, dtype=pdt) / 3)
    b = torch.randn(C, device=device, dtype=pdt) if with_bias else None
    return x, w, b


def _run(x, w, b, gelu, residual, dy, fn):
    """Forward and (d_x, d_weight, d_bias) via autograd with upstream grad dy."""
    leaves = [t.detach().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = fn(leaves[0], leaves[1], leaves[2] if b is not None else None, gelu, residual)
    grads = torch.autograd.grad(y, leaves, dy)
    return y, grads


def _ref64(x, w, b, gelu, residual, dy):
    d = lambda t: t.detach().double().cpu() if t is not None else None  # noqa: E731
    return _run(d(x), d(w), d(b), gelu, residual, d(dy), ref.dwconv3x3)


def _check(x, w, b, gelu, residual, dtype, nchw_dy=False):
    B, H, W, C = x.shape
    if nchw_dy:
        dy = torch.randn(B, C, H, W, device=x.device, dtype=x.dtype).permute(0, 2, 3, 1)
    else:
        dy = torch.randn(B, H, W, C, device=x.device, dtype=x.dtype)
    y, grads = _run(x, w, b, gelu, residual, dy, dwconv3x3)
    y_ref, grads_ref = _ref64(x, w, b, gelu, residual, dy)
    assert y.shape == (B, H, W, C) and y.dtype == x.dtype and y.is_contiguous()
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol, ("y", rel_err(y, y_ref))
    names = ["d_x", "d_weight", "d_bias"]
    for name, g, g_ref, leaf in zip(names, grads, grads_ref, (x, w, b)):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape, name
        assert rel_err(g, g_ref) < tol, (name, rel_err(g, g_ref))


# Every shape with every (gelu, residual); the (bias, layout) variant rotates so that every shape and
# every flag pair meets all four of bias / bias=None x contiguous x / permuted-NCHW x.
VARIANTS = [(True, False), (False, True), (True, True), (False, False)]  # (with_bias, nchw)
CASES = [(shape, gelu, residual) + VARIANTS[(i + j) % 4]
         for i, shape in enumerate(SHAPES)
         for j, (gelu, residual) in enumerate(itertools.product([False, True], [False, True]))]


def _case_id(case):
    shape, gelu, residual, with_bias, nchw = case
    return "x".join(map(str, shape)) + ("-gelu" if gelu else "") + ("-res" if residual else "") + \
        ("-bias" if with_bias else "-nobias") + ("-nchw" if nchw else "-nhwc")


@pytest.mark.parametrize("device,dtype", DEV_DT)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_backward(device, dtype, case):
    shape, gelu, residual, with_bias, nchw = case
    x, w, b = _inputs(*shape, device, dtype, nchw, with_bias)
    _check(x, w, b, gelu, residual, dtype, nchw_dy=nchw)


@pytest.mark.parametrize("device,dtype", DEV_DT)
@pytest.mark.parametrize("gelu", [False, True])
def test_many_programs_and_chunks(device, dtype, gelu, monkeypatch):
    """Tiny tiles: several channel blocks with a ragged tail, many pixel programs, several chunks
    per backward program (partials reduced across programs) and int64 offsets."""
    for key in list(dw.TILE_ELEMS):
        monkeypatch.setitem(dw.TILE_ELEMS, key, 128)  # BLOCK_C 16 x BLOCK_P 8
    for key in list(dw.MAX_BLOCK_C):
        monkeypatch.setitem(dw.MAX_BLOCK_C, key, 16)
    monkeypatch.setattr(dw, "num_sms", lambda device: 1)
    monkeypatch.setattr(dw, "PROGRAMS_PER_SM", 6)
    monkeypatch.setattr(common, "PARTIAL_TRAFFIC_SHARE", 1e9)     # several programs on a tiny map
    # 24 pixels = 3 chunks, C = 40 = 3 channel blocks (ragged): 2 backward programs x 2 chunks each,
    # the last chunk entirely past the end.
    x, w, b = _inputs(2, 4, 3, 40, device, dtype, nchw=False, with_bias=True)
    _check(x, w, b, gelu, True, dtype)
    monkeypatch.setattr(dw, "needs_int64", lambda *t: True)
    x, w, b = _inputs(1, 3, 4, 24, device, dtype, nchw=True, with_bias=True)
    _check(x, w, b, gelu, False, dtype, nchw_dy=True)


def test_backward_partials_within_their_share(monkeypatch):
    """The backward's grid on an H100 (132 SMs): a big map gets about ``PROGRAMS_PER_SM`` programs per SM; a small,
    wide one (stage 4 at 512) fewer, keeping the fp32 partials (programs, 10, C), written and read, within
    ``PARTIAL_TRAFFIC_SHARE`` of the backward's map traffic (dy, x, dx)."""
    monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    monkeypatch.setattr(common, "DEFAULT_SMS", 132)
    for shape in ((8, 128, 128, 64), (8, 16, 16, 512)):
        x = torch.empty(shape, dtype=torch.bfloat16, device="meta")
        block_p, block_c, iters, programs, _ = dw._backward_config(x)
        n_pix, C = x.numel() // shape[-1], shape[-1]
        assert programs * iters * block_p >= n_pix and (programs - 1) * iters * block_p < n_pix
        assert 2 * programs * 10 * C * 4 <= common.PARTIAL_TRAFFIC_SHARE * 3 * x.numel() * 2
        if shape[1] == 128:
            assert programs * (C // block_c) >= 4 * 132              # occupancy where the map allows
        else:
            assert programs < dw.PROGRAMS_PER_SM * 132 // (C // block_c)   # capped by the partials' share


@pytest.mark.parametrize("device", devices())
def test_gradcheck(device):
    x = torch.randn(1, 2, 3, 2, device=device, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: dwconv3x3(x, w, b, gelu=True, residual=True), (x, w, b),
                                    fast_mode=True)
    x = torch.randn(2, 3, 3, 3, device=device, dtype=torch.float64).permute(0, 2, 3, 1).requires_grad_()
    w = torch.randn(3, 1, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: dwconv3x3(x, w, None, gelu=False, residual=False), (x, w),
                                    fast_mode=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float16])
def test_fp32_params_with_half_input(device, xdtype):
    """Autocast-style mix: fp32 weight/bias with a half-precision x; grads in the params' dtypes."""
    x, w, b = _inputs(2, 5, 4, 24, device, xdtype, nchw=True, with_bias=True, param_dtype=torch.float32)
    _check(x, w, b, True, True, xdtype)


@pytest.mark.parametrize("device", devices())
def test_backward_deterministic(device):
    x, w, b = _inputs(2, 9, 7, 40, device, torch.float32, nchw=False, with_bias=True)
    dy = torch.randn_like(x)
    runs = [_run(x, w, b, True, True, dy, dwconv3x3)[1] for _ in range(2)]
    for g0, g1 in zip(*runs):
        assert torch.equal(g0, g1)


def test_reference_path(monkeypatch):
    """CPU without Triton: the custom ops fall back to the PyTorch math (closed-form backward)."""
    monkeypatch.setattr(dw, "use_kernel", lambda *t: False)
    for gelu, residual in itertools.product([False, True], [False, True]):
        x, w, b = _inputs(2, 5, 7, 6, "cpu", torch.float64, nchw=True, with_bias=True)
        _check(x, w, b, gelu, residual, torch.float64)
    x, w, b = _inputs(1, 4, 3, 5, "cpu", torch.bfloat16, nchw=False, with_bias=True, param_dtype=torch.float32)
    _check(x, w, b, True, True, torch.bfloat16)


@pytest.mark.parametrize("device", devices())
def test_torch_compile(device):
    dtype = dtypes_for(device)[0]
    x, w, b = _inputs(2, 5, 6, 24, device, dtype, nchw=True, with_bias=True)

    def f(x, w, b):
        return dwconv3x3(x * 2.0, w, b, gelu=True, residual=True).sum(dim=-1)

    torch._dynamo.reset()
    # CPU: aot_eager (inductor also works under TRITON_INTERPRET but spends ~20 s compiling C++).
    fc = torch.compile(f, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    xs = [t.detach().requires_grad_() for t in (x, w, b)]
    xe = [t.detach().requires_grad_() for t in (x, w, b)]
    yc, ye = fc(*xs), f(*xe)
    dy = torch.randn_like(ye)
    gc = torch.autograd.grad(yc, xs, dy)
    ge = torch.autograd.grad(ye, xe, dy)
    tol = TOL[dtype]
    assert rel_err(yc, ye) < tol
    for a, e in zip(gc, ge):
        assert rel_err(a, e) < tol


def test_opcheck():
    """torch.library consistency checks (schema, fake impl, autograd registration)."""
    x, w, b = _inputs(1, 3, 4, 5, "cpu", torch.float64, nchw=True, with_bias=True)
    torch.library.opcheck(torch.ops.lrformer.dwconv3x3.default, (x, w, b, True, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    dy = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.lrformer.dwconv3x3_backward.default, (dy, x, w, None, False, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_input():
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    w = torch.randn(8, 1, 3, 3, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    with pytest.raises(TypeError, match="x"):
        dwconv3x3(x.numpy(), w, b)
    with pytest.raises(ValueError, match="x must have 4"):
        dwconv3x3(x[0], w, b)
    with pytest.raises(TypeError, match="x has dtype"):
        dwconv3x3(x.long(), w, b)
    with pytest.raises(ValueError, match="x is empty"):
        dwconv3x3(x[:0], w, b)
    with pytest.raises(ValueError, match="weight must have shape"):
        dwconv3x3(x, w[:4], b)
    with pytest.raises(ValueError, match="weight must have shape"):
        dwconv3x3(x, w.reshape(8, 9), b)
    with pytest.raises(TypeError, match="weight has dtype"):
        dwconv3x3(x, w.float(), b)
    with pytest.raises(TypeError, match="weight has dtype"):
        dwconv3x3(x.float(), w.bfloat16(), b.float())
    with pytest.raises(ValueError, match="weight is on"):
        dwconv3x3(x, w.to("meta"), b)
    with pytest.raises(ValueError, match="bias must have shape"):
        dwconv3x3(x, w, b[:3])
    with pytest.raises(TypeError, match="bias has dtype"):
        dwconv3x3(x, w, b.half())
    with pytest.raises(ValueError, match="bias is on"):
        dwconv3x3(x, w, b.to("meta"))
    with pytest.raises(TypeError, match="gelu"):
        dwconv3x3(x, w, b, gelu=1)
    with pytest.raises(TypeError, match="residual"):
        dwconv3x3(x, w, b, residual=None)
