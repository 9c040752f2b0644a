"""Fused HRCA (cross-attention over selected high-resolution windows) vs the float64 reference."""
import contextlib
import importlib
import math

import pytest
import torch

from conftest import TOL, assert_as_accurate_as_native, devices, dtypes_for, integer_logit_qk, rel_err
import lrformer_kernels as ref_F
from lrformer_kernels.hrca import _window_csr, hrca_attention

MODES = ("atomic", "deterministic")

CASES = [
    # (B, Nq, H, W, heads, head_dim, window, K, scale, shared, idx_dtype, layout)
    # shared: queries 0 and 1 select the same windows and query 0 lists one window twice.
    # layout: "kv" = k/v halves of one (B, H, W, 2C) tensor, q a strided slice;
    #         "nchw" = k/v (B, C, H, W) tensors permuted to (B, H, W, C), q contiguous.
    (1, 3, 9, 9, 1, 12, 3, 1, None, False, torch.int64, "kv"),       # K=1, no cut windows
    (2, 5, 11, 13, 2, 12, 4, 3, None, True, torch.int32, "kv"),      # odd non-square: cut edges
    (2, 4, 10, 7, 3, 8, 2, 4, 0.37, True, torch.int64, "nchw"),      # 3 heads, explicit scale
    (1, 5, 13, 9, 2, 24, 4, 2, None, True, torch.int32, "nchw"),     # head dim 24
    (2, 3, 12, 11, 2, 16, 5, 2, None, False, torch.int64, "kv"),     # window 5 (not a power of 2)
    (1, 3, 3, 5, 2, 8, 4, 2, None, False, torch.int64, "nchw"),       # map smaller than one window
]

# Realistic FASeg shapes (stride-4 map of a 512 image, 100 queries); only on CUDA.
CUDA_CASES = [
    (2, 100, 128, 128, 8, 32, 8, 8, None, True, torch.int64, "kv"),
    (1, 100, 127, 97, 10, 24, 16, 4, None, True, torch.int32, "nchw"),
    (2, 50, 64, 64, 2, 128, 4, 64, None, True, torch.int64, "kv"),
    (4, 100, 128, 128, 4, 48, 2, 16, None, False, torch.int32, "nchw"),
]


def _case_id(c):
    return "B{}_Nq{}_{}x{}_h{}_d{}_ws{}_K{}_s{}_sh{}_{}_{}".format(
        *c[:10], str(c[10]).split(".")[-1], c[11])


@contextlib.contextmanager
def deterministic(on: bool):
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def _win_idx(B, Nq, H, W, ws, K, shared, idx_dtype, device):
    gh, gw = ref_F.hrca_window_grid(H, W, ws)
    win = torch.randint(0, gh * gw, (B, Nq, K), device=device)
    # always include the bottom-right (cut) window somewhere, to exercise the edge masks
    win[:, -1, 0] = gh * gw - 1
    if shared and Nq >= 2:
        win[:, 1] = win[:, 0]
        if K >= 2:
            win[:, 0, 1] = win[:, 0, 0]
    return win.to(idx_dtype)


def _inputs(case, dtype, device):
    B, Nq, H, W, heads, d, ws, K, scale, shared, idx_dtype, layout = case
    C = heads * d
    if layout == "kv":
        q = torch.randn(B, Nq, 3 * C, dtype=dtype, device=device)[..., C:2 * C].requires_grad_()
        kv = torch.randn(B, H, W, 2 * C, dtype=dtype, device=device, requires_grad=True)
        leaves = (q, kv)

        def kv_of(kv=kv):
            return kv[..., :C], kv[..., C:]
    else:
        q = torch.randn(B, Nq, C, dtype=dtype, device=device, requires_grad=True)
        k4 = torch.randn(B, C, H, W, dtype=dtype, device=device, requires_grad=True)
        v4 = torch.randn(B, C, H, W, dtype=dtype, device=device, requires_grad=True)
        leaves = (q, k4, v4)

        def kv_of(k4=k4, v4=v4):
            return k4.permute(0, 2, 3, 1), v4.permute(0, 2, 3, 1)
    win = _win_idx(B, Nq, H, W, ws, K, shared, idx_dtype, device)
    return leaves, win


def _apply(fn, case, leaves, win):
    """fn(q, k, v, win, ws, heads, scale) on the leaves laid out as the case says."""
    B, Nq, H, W, heads, d, ws, K, scale, shared, idx_dtype, layout = case
    C = heads * d
    if layout == "kv":
        q, kv = leaves
        k, v = kv[..., :C], kv[..., C:]
    else:
        q, k4, v4 = leaves
        k, v = k4.permute(0, 2, 3, 1), v4.permute(0, 2, 3, 1)
    assert not k.is_contiguous() and not v.is_contiguous()
    return fn(q, k, v, win, ws, heads, scale)


def _check(case, dtype, device, mode):
    leaves, win = _inputs(case, dtype, device)
    B, Nq, C = case[0], case[1], case[4] * case[5]
    with deterministic(mode == "deterministic"):
        out = _apply(hrca_attention, case, leaves, win)
        assert out.shape == (B, Nq, C) and out.dtype == dtype and out.device == leaves[0].device
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, g)
    assert all(gr.dtype == dtype for gr in grads)

    leaves64 = tuple(t.detach().double().requires_grad_() for t in leaves)
    ref = _apply(ref_F.hrca_attention, case, leaves64, win)
    grads_ref = torch.autograd.grad(ref, leaves64, g.double())
    tol = TOL[dtype]
    assert rel_err(out, ref) < tol, ("out", rel_err(out, ref))
    for name, gr, gr_ref in zip(("dq", "dkv/dk", "dv"), grads, grads_ref):
        assert rel_err(gr, gr_ref) < tol, (name, rel_err(gr, gr_ref))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_backward(case, device, mode):
    for dtype in dtypes_for(device):
        _check(case, dtype, device, mode)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes only on CUDA")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CUDA_CASES, ids=_case_id)
def test_forward_backward_large_cuda(case, mode):
    for dtype in dtypes_for("cuda"):
        _check(case, dtype, "cuda", mode)


@pytest.mark.parametrize("device", devices())
def test_lse_output(device):
    """The op's second output is the natural-log log-sum-exp over each query's window pixels; the third
    and fourth are the row maximum and the row sum of exp(s - row max) that the backward uses."""
    B, Nq, H, W, heads, d, ws, K = 2, 4, 11, 10, 2, 12, 4, 3
    dtype = dtypes_for(device)[0]
    C = heads * d
    q = torch.randn(B, Nq, C, dtype=dtype, device=device)
    k = torch.randn(B, H, W, C, dtype=dtype, device=device)
    v = torch.randn(B, H, W, C, dtype=dtype, device=device)
    win = _win_idx(B, Nq, H, W, ws, K, True, torch.int64, device)
    scale = 0.3
    out, lse, row_max, row_sum = torch.ops.lrformer.hrca_attention(q, k, v, win, ws, heads, scale)
    flat, valid = ref_F.hrca_window_pixels(win, H, W, ws)
    kg = k.double().reshape(B, H * W, heads, d)[torch.arange(B, device=device)[:, None, None], flat]
    s = torch.einsum("bqhd,bqlhd->bhql", q.double().reshape(B, Nq, heads, d), kg) * scale
    s = s.masked_fill(~valid[:, None], float("-inf"))
    assert lse.shape == row_max.shape == row_sum.shape == (B, heads, Nq)
    assert rel_err(lse, torch.logsumexp(s, -1)) < max(TOL[dtype], 1e-6)
    assert rel_err(row_max, s.amax(-1)) < max(TOL[dtype], 1e-6)
    assert rel_err(row_sum, torch.exp(s - s.amax(-1, keepdim=True)).sum(-1)) < max(TOL[dtype], 1e-6)
    ref = ref_F.hrca_attention_reference(q.double(), k.double(), v.double(), win, ws, heads, scale)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", devices())
def test_gradcheck(device, mode):
    B, Nq, H, W, heads, d, ws, K = 1, 3, 5, 4, 2, 3, 2, 2
    C = heads * d
    q = torch.randn(B, Nq, C, dtype=torch.float64, device=device, requires_grad=True)
    kv = torch.randn(B, H, W, 2 * C, dtype=torch.float64, device=device, requires_grad=True)
    win = _win_idx(B, Nq, H, W, ws, K, True, torch.int64, device)

    def f(q, kv):
        return hrca_attention(q, kv[..., :C], kv[..., C:], win, ws, heads)

    def f_both(q, kv):  # both outputs of the op: exercises the gradient through lse too
        return torch.ops.lrformer.hrca_attention(q, kv[..., :C], kv[..., C:], win, ws, heads, 0.5)[:2]

    # fast_mode keeps the interpreter time low; full Jacobians are compared to the reference in
    # test_forward_backward.
    with deterministic(mode == "deterministic"):
        assert torch.autograd.gradcheck(f, (q, kv), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
        assert torch.autograd.gradcheck(f_both, (q, kv), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("device", devices())
def test_deterministic_mode(device, monkeypatch):
    """Deterministic mode takes the sort-based path (and the default mode does not); bit-identical
    gradients run to run; same values as the atomic path."""
    import lrformer_kernels.hrca as H
    calls = []
    real_csr = H._window_csr
    monkeypatch.setattr(H, "_window_csr", lambda *a: calls.append(1) or real_csr(*a))
    case = (2, 5, 11, 13, 2, 12, 4, 3, None, True, torch.int64, "kv")
    dtype = dtypes_for(device)[-1]
    leaves, win = _inputs(case, dtype, device)
    res = []
    for mode in ("deterministic", "deterministic", "atomic"):
        with deterministic(mode == "deterministic"):
            out = _apply(hrca_attention, case, leaves, win)
            res.append((out, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
    assert len(calls) == 2
    for a, b in zip(res[0], res[1]):
        assert torch.equal(a, b)
    for a, b in zip(res[0], res[2]):
        assert rel_err(a, b) < TOL[dtype]


def test_window_csr():
    """The deterministic backward's (batch, window) -> queries lists."""
    win = torch.tensor([[[2, 0], [2, 2], [1, 0]], [[3, 3], [0, 3], [0, 1]]])
    offs, entry = _window_csr(win, 4)
    assert offs.tolist() == [0, 2, 3, 6, 6, 8, 9, 9, 12]
    # batch 0: window 0 <- queries 0, 2; window 1 <- 2; window 2 <- 0, 1, 1; window 3 <- none
    # batch 1: window 0 <- 1, 2; window 1 <- 2; window 2 <- none; window 3 <- 0, 0, 1
    assert entry.tolist() == [0, 2, 2, 0, 1, 1, 1, 2, 2, 0, 0, 1]
    assert offs.dtype == torch.int32 and entry.dtype == torch.int32


def test_reference_path_without_interpreter(monkeypatch):
    """On CPU without TRITON_INTERPRET the op falls back to the PyTorch math (fwd and bwd)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from lrformer_kernels._common import use_kernel
    case = (2, 5, 11, 13, 2, 12, 4, 3, None, True, torch.int32, "kv")
    leaves, win = _inputs(case, torch.float64, "cpu")
    assert not use_kernel(leaves[0])
    out = _apply(hrca_attention, case, leaves, win)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    leaves64 = tuple(t.detach().requires_grad_() for t in leaves)
    ref = _apply(ref_F.hrca_attention, case, leaves64, win)
    grads_ref = torch.autograd.grad(ref, leaves64, g)
    assert rel_err(out, ref) < 1e-12
    for gr, gr_ref in zip(grads, grads_ref):
        assert rel_err(gr, gr_ref) < 1e-12


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    case = (2, 4, 10, 7, 3, 8, 2, 4, None, True, torch.int64, "nchw")
    dtype = dtypes_for(device)[0]

    def f(q, k4, v4, win):
        k, v = k4.permute(0, 2, 3, 1), v4.permute(0, 2, 3, 1)
        return hrca_attention(q * 2.0, k, v, win, 2, 3).sum(-1) * 3.0

    # Inductor would need a C++ toolchain on CPU; the custom op is opaque either way.
    backend = "inductor" if device == "cuda" else "aot_eager"
    fc = torch.compile(f, fullgraph=True, backend=backend)
    leaves, win = _inputs(case, dtype, device)
    out = fc(*leaves, win)
    grads = torch.autograd.grad(out.sum(), leaves)
    out_e = f(*leaves, win)
    grads_e = torch.autograd.grad(out_e.sum(), leaves)
    tol = TOL[dtype]
    assert rel_err(out, out_e) < tol
    for gr, gr_e in zip(grads, grads_e):
        assert rel_err(gr, gr_e) < tol


def test_opcheck():
    """torch.library consistency checks (schema, fake tensor, autograd registration)."""
    B, Nq, H, W, heads, d, ws, K = 1, 3, 5, 6, 2, 4, 2, 2
    C = heads * d
    q = torch.randn(B, Nq, C, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, W, C, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, W, C, dtype=torch.float64, requires_grad=True)
    for idx_dtype in (torch.int64, torch.int32):
        win = _win_idx(B, Nq, H, W, ws, K, True, idx_dtype, "cpu")
        torch.library.opcheck(torch.ops.lrformer.hrca_attention.default, (q, k, v, win, ws, heads, 0.25),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse, row_max, row_sum = (t.detach() for t in torch.ops.lrformer.hrca_attention(q, k, v, win, ws, heads, 0.25))
    g = torch.randn_like(out)
    for glse in (None, torch.randn_like(lse)):
        torch.library.opcheck(torch.ops.lrformer.hrca_attention_backward.default,
                              (g, q.detach(), k.detach(), v.detach(), win, out, row_max, row_sum,
                               glse, ws, heads, 0.25),
                              test_utils=("test_schema", "test_faketensor"))


def _bad_cases():
    f64 = torch.float64
    q = torch.randn(2, 3, 8, dtype=f64)
    k = torch.randn(2, 5, 6, 8, dtype=f64)
    v = torch.randn(2, 5, 6, 8, dtype=f64)
    win = torch.zeros(2, 3, 2, dtype=torch.int64)   # window 2: 3x3 grid -> indices 0..8
    return [
        ((q.numpy(), k, v, win, 2, 2), TypeError, "q must be a torch.Tensor"),
        ((q[0], k, v, win, 2, 2), ValueError, "q must have 3 dimensions"),
        ((q, k[0], v, win, 2, 2), ValueError, "k must have 4 dimensions"),
        ((q, k, v[None], win, 2, 2), ValueError, "v must have 4 dimensions"),
        ((q, k.float(), v, win, 2, 2), TypeError, "k has dtype"),
        ((q, k, v.float(), win, 2, 2), TypeError, "v has dtype"),
        ((q.int(), k.int(), v.int(), win, 2, 2), TypeError, "q has dtype"),
        ((q, k.to("meta"), v, win, 2, 2), ValueError, "k is on meta"),
        ((q, k, v, win.to("meta"), 2, 2), ValueError, "win_idx is on meta"),
        ((q, k, v, win.double(), 2, 2), TypeError, "win_idx has dtype"),
        ((q, k, v, win.short(), 2, 2), TypeError, "win_idx has dtype"),
        ((q, k, v, win.tolist(), 2, 2), TypeError, "win_idx must be a torch.Tensor"),
        ((q, k, v, win[0], 2, 2), ValueError, "win_idx must have 3 dimensions"),
        ((q, k, v, win[:1], 2, 2), ValueError, r"win_idx must be \(B, Nq, K\)"),
        ((q, k, v, win[:, :2], 2, 2), ValueError, r"win_idx must be \(B, Nq, K\)"),
        ((q, k, v, win[..., :0], 2, 2), ValueError, "win_idx is empty"),
        ((q, k, v, win - 1, 2, 2), ValueError, r"win_idx must lie in \[0, 9\)"),
        ((q, k, v, win + 9, 2, 2), ValueError, r"win_idx must lie in \[0, 9\)"),
        ((q, k, v, win + 4, 3, 2), ValueError, r"win_idx must lie in \[0, 4\)"),
        ((q, k, v, win, 0, 2), ValueError, "window must be positive"),
        ((q, k, v, win, -2, 2), ValueError, "window must be positive"),
        ((q, k, v, win, 2.0, 2), TypeError, "window must be an int"),
        ((q, k, v, win, 65, 2), ValueError, "window=65 is unsupported"),
        ((q, k[:1], v[:1], win, 2, 2), ValueError, "batch mismatch"),
        ((q, k[..., :4], v[..., :4], win, 2, 2), ValueError, "channel mismatch"),
        ((q, k, v[:, :3], win, 2, 2), ValueError, "k and v must have the same shape"),
        ((q, k, v, win, 2, 3), ValueError, "not divisible by num_heads"),
        ((q, k, v, win, 2, 0), ValueError, "num_heads must be positive"),
        ((q, k, v, win, 2, 2.0), TypeError, "num_heads must be an int"),
        ((q, k, v, win, 2, 2, "x"), TypeError, "scale must be a float"),
        ((q, k, v, win, 2, 2, math.nan), ValueError, "scale must be finite"),
        ((q[:, :0], k, v, win[:, :0], 2, 2), ValueError, "q is empty"),
        ((q, k[:, :0], v[:, :0], win, 2, 2), ValueError, "k is empty"),
        ((torch.randn(1, 2, 300, dtype=f64), torch.randn(1, 2, 2, 300, dtype=f64),
          torch.randn(1, 2, 2, 300, dtype=f64), win[:1, :2], 2, 1), ValueError, "head dim 300"),
    ]


@pytest.mark.parametrize("idx", range(len(_bad_cases())))
def test_bad_input(idx):
    args, exc, match = _bad_cases()[idx]  # (q, k, v, win_idx, window, num_heads[, scale])
    with pytest.raises(exc, match=match):
        hrca_attention(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_interpreter_low_precision(dtype):
    """The fp32-accumulation path (exp2, fp32 lse, fp32 atomics + cast) also runs on CPU under
    the interpreter (bf16 is left to CUDA)."""
    if torch.cuda.is_available():
        pytest.skip("covered by the CUDA cases of test_forward_backward")
    for mode in MODES:
        _check((2, 5, 11, 13, 2, 12, 4, 3, None, True, torch.int32, "kv"), dtype, "cpu", mode)


def test_gpu_style_tiling(monkeypatch):
    """The interpreter normally takes whole windows and all heads per program; the GPU configs
    split heads into blocks (the last one partly masked with 3 heads) and windows into row chunks
    (some fully outside the map or the window).  Run such a tiling here too: 2 heads of 3 per
    program, 2 of the 5 rows of a window per step."""
    import lrformer_kernels.hrca as H
    block_hb, block_r = 2, 2
    real = H._tiles

    def config(dtype, num_heads, head_dim, window, backward=False):
        _, bd, _, bw, warps = real(dtype, num_heads, head_dim, window, backward)
        return block_hb, bd, block_r, bw, warps

    monkeypatch.setattr(H, "_tiles", config)
    for mode in MODES:
        _check((1, 3, 12, 11, 3, 4, 5, 2, None, True, torch.int32, "nchw"), torch.float64, "cpu", mode)


def test_benchmark_case():
    """The op-level benchmark's HRCA entry (CUDA-only in the sweep): its eager and fused functions
    agree (one window of a 16x16 map here), its byte/FLOP formulas, and it is listed only on CUDA."""
    from benchmarks import registry as R
    from benchmarks import sweeps as SW
    entry = R.OPS["hrca_attention"]
    h = w = 16
    eager, fused, inputs = entry.functions(1, h, w)
    cfg = SW.Config(device=torch.device("cpu"))
    q, kv, win = inputs(cfg, 1, torch.float64, False, 0)
    n_win, k, keys = R.hrca_dims(h, w)
    assert (n_win, k, keys) == (4, 1, 64) and win.shape == (1, R.HRCA["nq"], k)
    assert rel_err(fused(q, kv, win), eager(q, kv, win)) < TOL[torch.float64]   # (forward: time)
    # 128x128 map (512 image): 256 windows, 8 per query, 512 keys; 100 queries select nearly all
    n_win, k, keys = R.hrca_dims(128, 128)
    assert (n_win, k, keys) == (256, 8, 512)
    C, nq = R.HRCA["C"], R.HRCA["nq"]
    fwd = entry.bytes(2, 128, 128, 1, 2, "fwd")
    u = round(2 * 256 * (1 - (1 - 8 / 256) ** 100))
    assert fwd == (2 * 2 * nq * C + 2 * u * 64 * C) * 2 + 8 * 2 * nq * 8
    assert entry.bytes(2, 128, 128, 1, 2, "fwd+bwd") > 2 * fwd
    assert entry.flops(2, 128, 128, 1, "fwd") == 2 * (2 * 2 * nq * 512 * C)
    names = lambda dev: {c.key["name"] for c in SW.op_cases(SW.default_config(torch.device(dev), quick=True))}  # noqa: E731
    assert "hrca_attention" in names("cuda") and "hrca_attention" not in names("cpu")


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("shift", [2 ** 12, 10 ** 6, 2 ** 24], ids=lambda s: f"logits~{s:.0e}")
def test_huge_logits_fp32(shift, path, monkeypatch):
    """fp32 forward and backward at huge logits (``shift + {0, -1, -2}``, exact in fp32, tied maxima)
    are as accurate as PyTorch's own fp32 math on the gathered windows; a float32 lse loses
    log(row_sum) there, the op keeps the row max and row sum apart (both modes, both paths)."""
    H_ = importlib.import_module("lrformer_kernels.hrca")
    if path == "reference":
        monkeypatch.setattr(H_, "use_kernel", lambda *t: False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, Nq, H, W, heads, d, ws, K = 2, 5, 9, 7, 2, 8, 4, 2
    q, kflat = integer_logit_qk(B, Nq, H * W, heads, d, shift, device=device)
    k = kflat.reshape(B, H, W, heads * d)
    v = torch.randn(B, H, W, heads * d, device=device)
    win = _win_idx(B, Nq, H, W, ws, K, False, torch.int64, device)
    g = torch.rand(B, Nq, heads * d, device=device)
    _check_as_accurate_as_native(q, k, v, win, ws, heads, 1.0, g)


def _check_as_accurate_as_native(q, k, v, win, ws, heads, scale, g):
    """The op (both modes) against PyTorch's own fp32 math and float64, outputs and gradients."""
    def run(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(xs[0], xs[1], xs[2], win, ws, heads, scale)
        return (out, *torch.autograd.grad(out, xs, g.to(out.dtype)))

    native = run(ref_F.hrca_attention_reference, q, k, v)
    exact = run(ref_F.hrca_attention_reference, q.double(), k.double(), v.double())
    for mode in MODES:
        with deterministic(mode == "deterministic"):
            ours = run(hrca_attention, q, k, v)
        assert_as_accurate_as_native(ours, native, exact, (f"out ({mode})", "dq", "dk", "dv"))


@pytest.mark.parametrize("logit", [1e2, 1e4, 1e6])
def test_random_logits_fp32(logit):
    """fp32 at random logits ~1e2..1e6 (saturated one-hot rows): outputs and gradients as close to
    float64 as PyTorch's own fp32 math on the gathered windows, atomic and deterministic modes (the
    backward kernels recompute the logits with the forward's own expression)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, Nq, H, W, heads, d, ws, K = 2, 6, 9, 7, 2, 16, 4, 2
    q = torch.randn(B, Nq, heads * d, device=device)
    k = torch.randn(B, H, W, heads * d, device=device)
    v = torch.randn(B, H, W, heads * d, device=device)
    win = _win_idx(B, Nq, H, W, ws, K, False, torch.int64, device)
    g = torch.randn(B, Nq, heads * d, device=device)
    _check_as_accurate_as_native(q, k, v, win, ws, heads, logit / math.sqrt(d), g)
