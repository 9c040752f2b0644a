"""Fused low-resolution multi-head attention vs the float64 PyTorch reference."""
import importlib
import math

import pytest
import torch

from conftest import TOL, assert_as_accurate_as_native, devices, dtypes_for, integer_logit_qk, rel_err
import lrformer_kernels as ref_F
import lrformer_kernels._common as common
from lrformer_kernels.lowres_attention import lowres_attention

CASES = [
    # (B, Nq, M, heads, head_dim, scale)
    (1, 1, 5, 1, 24, None),
    (2, 7, 33, 2, 40, None),
    (2, 37, 70, 3, 80, None),
    (1, 37, 33, 2, 32, 0.37),   # power-of-two head dim, explicit scale
    (2, 37, 5, 3, 24, None),
    (1, 7, 70, 1, 64, None),
]

# Realistic LRFormer shapes; only on CUDA (too slow for the interpreter).
CUDA_CASES = [
    (2, 512, 600, 2, 48, None),     # encoder stage
    (2, 256, 300, 5, 64, None),
    (1, 2048, 1900, 4, 80, None),   # decoder head
    (1, 512, 600, 1, 24, None),
]


def _inputs(B, Nq, M, heads, d, dtype, device, q_strided=False):
    """q (optionally a strided slice), and k/v as non-contiguous halves of one kv tensor."""
    C = heads * d
    if q_strided:
        q = torch.randn(B, Nq, 3 * C, dtype=dtype, device=device)[..., C:2 * C]
    else:
        q = torch.randn(B, Nq, C, dtype=dtype, device=device)
    kv = torch.randn(B, M, 2 * C, dtype=dtype, device=device)
    return q.requires_grad_(), kv.requires_grad_()


def _reference(q, kv, heads, scale):
    """Reference forward + grads in float64 on the upcast inputs."""
    C = q.shape[-1]
    q64 = q.detach().double().requires_grad_()
    kv64 = kv.detach().double().requires_grad_()
    out = ref_F.lowres_attention_reference(q64, kv64[..., :C], kv64[..., C:], heads, scale)
    return out, q64, kv64


def _check(case, dtype, device, q_strided=False):
    B, Nq, M, heads, d, scale = case
    q, kv = _inputs(B, Nq, M, heads, d, dtype, device, q_strided)
    C = heads * d
    k, v = kv[..., :C], kv[..., C:]
    assert not k.is_contiguous() and not v.is_contiguous()
    out = lowres_attention(q, k, v, heads, scale)
    assert out.shape == (B, Nq, C) and out.dtype == dtype and out.device == q.device
    g = torch.randn_like(out)
    dq, dkv = torch.autograd.grad(out, (q, kv), g)
    assert dq.dtype == dtype and dkv.dtype == dtype

    ref, q64, kv64 = _reference(q, kv, heads, scale)
    dq_ref, dkv_ref = torch.autograd.grad(ref, (q64, kv64), g.double())
    tol = TOL[dtype]
    assert rel_err(out, ref) < tol, ("out", rel_err(out, ref))
    assert rel_err(dq, dq_ref) < tol, ("dq", rel_err(dq, dq_ref))
    assert rel_err(dkv[..., :C], dkv_ref[..., :C]) < tol, ("dk", rel_err(dkv[..., :C], dkv_ref[..., :C]))
    assert rel_err(dkv[..., C:], dkv_ref[..., C:]) < tol, ("dv", rel_err(dkv[..., C:], dkv_ref[..., C:]))

    if device == "cuda":
        # Cross-check with torch SDPA (its own error adds to ours: 2x the tolerance; fp32 SDPA
        # kernels may round through (3x)TF32, hence a looser bound there).
        s = d ** -0.5 if scale is None else scale
        qs = q.detach().reshape(B, Nq, heads, d).transpose(1, 2).requires_grad_()
        ks = k.detach().reshape(B, M, heads, d).transpose(1, 2).requires_grad_()
        vs = v.detach().reshape(B, M, heads, d).transpose(1, 2).requires_grad_()
        o_sdpa = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=s)
        o_sdpa = o_sdpa.transpose(1, 2).reshape(B, Nq, C)
        dqs, dks, dvs = torch.autograd.grad(o_sdpa, (qs, ks, vs), g)
        stol = 1e-4 if dtype == torch.float32 else 2 * tol
        assert rel_err(out, o_sdpa) < stol
        assert rel_err(dq, dqs.transpose(1, 2).reshape(B, Nq, C)) < stol
        assert rel_err(dkv[..., :C], dks.transpose(1, 2).reshape(B, M, C)) < stol
        assert rel_err(dkv[..., C:], dvs.transpose(1, 2).reshape(B, M, C)) < stol


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_Nq{}_M{}_h{}_d{}_s{}".format(*c))
def test_forward_backward(case, device):
    for dtype in dtypes_for(device):
        _check(case, dtype, device, q_strided=case[0] == 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes only on CUDA")
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "B{}_Nq{}_M{}_h{}_d{}".format(*c[:5]))
def test_forward_backward_large_cuda(case):
    for dtype in dtypes_for("cuda"):
        _check(case, dtype, "cuda")


@pytest.mark.parametrize("device", devices())
def test_lse_output(device):
    """The op's second output is the natural-log log-sum-exp per (b, head, query); the third and fourth
    are the row maximum and the row sum of exp(s - row max) that the backward uses."""
    B, Nq, M, heads, d = 2, 37, 33, 3, 24
    dtype = dtypes_for(device)[0]
    q = torch.randn(B, Nq, heads * d, dtype=dtype, device=device)
    k = torch.randn(B, M, heads * d, dtype=dtype, device=device)
    v = torch.randn(B, M, heads * d, dtype=dtype, device=device)
    scale = 0.3
    out, lse, row_max, row_sum = torch.ops.lrformer.lowres_attention(q, k, v, heads, scale)
    s = (q.double().reshape(B, Nq, heads, d).transpose(1, 2)
         @ k.double().reshape(B, M, heads, d).transpose(1, 2).transpose(-2, -1)) * scale
    assert lse.shape == row_max.shape == row_sum.shape == (B, heads, Nq)
    assert rel_err(lse, torch.logsumexp(s, -1)) < max(TOL[dtype], 1e-6)
    assert rel_err(row_max, s.amax(-1)) < max(TOL[dtype], 1e-6)
    assert rel_err(row_sum, torch.exp(s - s.amax(-1, keepdim=True)).sum(-1)) < max(TOL[dtype], 1e-6)
    assert rel_err(out, ref_F.lowres_attention_reference(q.double(), k.double(), v.double(), heads, scale)) < TOL[dtype]


@pytest.mark.parametrize("device", devices())
def test_gradcheck(device):
    B, Nq, M, heads, d = 1, 3, 5, 2, 6
    q = torch.randn(B, Nq, heads * d, dtype=torch.float64, device=device, requires_grad=True)
    kv = torch.randn(B, M, 2 * heads * d, dtype=torch.float64, device=device, requires_grad=True)
    C = heads * d

    def f(q, kv):
        return lowres_attention(q, kv[..., :C], kv[..., C:], heads)

    def f_both(q, kv):  # both outputs of the op: exercises the gradient through lse too
        return torch.ops.lrformer.lowres_attention(q, kv[..., :C], kv[..., C:], heads, 0.5)[:2]

    # fast_mode (random projections) keeps the interpreter time low; the full Jacobian of the
    # main output is checked against the reference in test_forward_backward.
    assert torch.autograd.gradcheck(f, (q, kv), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    assert torch.autograd.gradcheck(f_both, (q, kv), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("device", devices())
def test_deterministic(device):
    B, Nq, M, heads, d = 2, 37, 70, 2, 40
    dtype = dtypes_for(device)[-1]
    q, kv = _inputs(B, Nq, M, heads, d, dtype, device)
    C = heads * d
    res = []
    for _ in range(2):
        out = lowres_attention(q, kv[..., :C], kv[..., C:], heads)
        res.append((out, *torch.autograd.grad(out, (q, kv), torch.ones_like(out))))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_reference_path_without_interpreter(monkeypatch):
    """On CPU without TRITON_INTERPRET the op falls back to the PyTorch math (fwd and bwd)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    from lrformer_kernels._common import use_kernel
    q, kv = _inputs(2, 7, 33, 2, 40, torch.float64, "cpu")
    assert not use_kernel(q)
    C = 80
    out = lowres_attention(q, kv[..., :C], kv[..., C:], 2)
    g = torch.randn_like(out)
    dq, dkv = torch.autograd.grad(out, (q, kv), g)
    ref, q64, kv64 = _reference(q, kv, 2, None)
    dq_ref, dkv_ref = torch.autograd.grad(ref, (q64, kv64), g)
    assert rel_err(out, ref) < 1e-12
    assert rel_err(dq, dq_ref) < 1e-12
    assert rel_err(dkv, dkv_ref) < 1e-12


@pytest.mark.parametrize("device", devices())
def test_torch_compile_fullgraph(device):
    heads, d = 2, 24
    C = heads * d
    dtype = dtypes_for(device)[0]

    def f(q, kv):
        return lowres_attention(q * 2.0, kv[..., :C], kv[..., C:], heads).sum(-1) * 3.0

    # Inductor would need a C++ toolchain on CPU; the custom op is opaque either way.
    backend = "inductor" if device == "cuda" else "aot_eager"
    fc = torch.compile(f, fullgraph=True, backend=backend)
    q, kv = _inputs(2, 7, 33, heads, d, dtype, device)
    out = fc(q, kv)
    dq, dkv = torch.autograd.grad(out.sum(), (q, kv))
    out_e = f(q, kv)
    dq_e, dkv_e = torch.autograd.grad(out_e.sum(), (q, kv))
    tol = TOL[dtype]
    assert rel_err(out, out_e) < tol
    assert rel_err(dq, dq_e) < tol
    assert rel_err(dkv, dkv_e) < tol


def test_opcheck():
    """torch.library consistency checks (schema, fake tensor, autograd registration)."""
    q = torch.randn(1, 5, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 7, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 7, 16, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.lrformer.lowres_attention.default, (q, k, v, 2, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse, row_max, row_sum = (t.detach() for t in torch.ops.lrformer.lowres_attention(q, k, v, 2, 0.25))
    g = torch.randn_like(out)
    for glse in (None, torch.randn_like(lse)):
        torch.library.opcheck(torch.ops.lrformer.lowres_attention_backward.default,
                              (g, q.detach(), k.detach(), v.detach(), row_max, row_sum, glse, 2, 0.25),
                              test_utils=("test_schema", "test_faketensor"))


def _bad_cases():
    f64 = torch.float64
    q = torch.randn(2, 5, 16, dtype=f64)
    k = torch.randn(2, 7, 16, dtype=f64)
    v = torch.randn(2, 7, 16, dtype=f64)
    return [
        ((q.numpy(), k, v, 2), TypeError, "q must be a torch.Tensor"),
        ((q[0], k, v, 2), ValueError, "q must have 3 dimensions"),
        ((q, k[0], v, 2), ValueError, "k must have 3 dimensions"),
        ((q, k, v[None], 2), ValueError, "v must have 3 dimensions"),
        ((q, k.float(), v, 2), TypeError, "k has dtype"),
        ((q, k, v.float(), 2), TypeError, "v has dtype"),
        ((q.int(), k.int(), v.int(), 2), TypeError, "q has dtype"),
        ((q, k.to("meta"), v, 2), ValueError, "k is on meta"),
        ((q, k[:1], v[:1], 2), ValueError, "batch mismatch"),
        ((q, k[..., :8], v[..., :8], 2), ValueError, "channel mismatch"),
        ((q, k, v[:, :3], 2), ValueError, "same number of tokens"),
        ((q, k, v, 3), ValueError, "not divisible by num_heads"),
        ((q, k, v, 0), ValueError, "num_heads must be positive"),
        ((q, k, v, -2), ValueError, "num_heads must be positive"),
        ((q, k, v, 2.0), TypeError, "num_heads must be an int"),
        ((q, k, v, 2, "x"), TypeError, "scale must be a float"),
        ((q, k, v, 2, math.inf), ValueError, "scale must be finite"),
        ((q[:, :0], k, v, 2), ValueError, "q is empty"),
        ((q, k[:, :0], v[:, :0], 2), ValueError, "k is empty"),
        ((torch.randn(1, 2, 300, dtype=f64), torch.randn(1, 2, 300, dtype=f64),
          torch.randn(1, 2, 300, dtype=f64), 1), ValueError, "head dim 300"),
    ]


@pytest.mark.parametrize("idx", range(len(_bad_cases())))
def test_bad_input(idx):
    args, exc, match = _bad_cases()[idx]
    with pytest.raises(exc, match=match):
        lowres_attention(*args)


@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interpreter-tiles", "gpu-tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_interpreter_low_precision(dtype, gpu_tiles, monkeypatch):
    """The fp32-accumulation path (exp2, fp32 lse) also runs on CPU under the interpreter, with the
    interpreter's tiles and with the exact tile configuration the CUDA dispatch picks (several query and
    key blocks, ragged tails).  fp16 is the twin of the bf16 path: the interpreter's bf16 tl.dot is not
    reliable, and the kernels treat the two 16-bit types alike (same tiles, fp32 accumulation)."""
    if torch.cuda.is_available():
        pytest.skip("covered by the CUDA cases of test_forward_backward")
    if gpu_tiles:
        import lrformer_kernels._common as common
        monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    _check((2, 37, 70, 3, 40, None), dtype, "cpu", q_strided=True)


@pytest.mark.parametrize("head_dim", [40, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_interpreter_many_programs_tiles(dtype, head_dim, monkeypatch):
    """The forward's tiles for a launch with many programs (128 queries per block; 128x32 at head dim 80,
    128x64 below), as the CUDA dispatch picks them for big batches: forced here on small shapes by
    reporting one SM, with two query blocks (the second ragged) and a ragged last key block."""
    if torch.cuda.is_available():
        pytest.skip("covered by the CUDA cases of test_forward_backward")
    import lrformer_kernels._common as common
    la = importlib.import_module("lrformer_kernels.lowres_attention")
    monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    monkeypatch.setattr(la, "num_sms", lambda device: 1)
    bm, bn, _, _ = la._forward_config(dtype, la._block_d(head_dim), 150, 2, torch.device("cpu"))
    if dtype == torch.float16:
        assert (bm, bn) == ((128, 32) if head_dim == 80 else (128, 64))
    _check((1, 150, 70, 2, head_dim, None), dtype, "cpu")


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("shift", [2 ** 12, 10 ** 6, 2 ** 24], ids=lambda s: f"logits~{s:.0e}")
def test_huge_logits_fp32(shift, path, monkeypatch):
    """fp32 forward and backward at huge logits are as accurate as PyTorch's own fp32 attention
    (softmax + autograd).  Logits ``shift + {0, -1, -2}`` are exact in fp32 with tied maxima:
    recomputing ``p = exp(s - lse)`` from a float32 lse loses log(row_sum) there (at 2**24 every
    tied p became 1 instead of 1/count); the op keeps the row max and row sum apart.  ``path``:
    the Triton kernels (interpreter on CPU) and the op's PyTorch fallback (CPU without the
    interpreter) both carry the fix."""
    la = importlib.import_module("lrformer_kernels.lowres_attention")
    if path == "reference":
        monkeypatch.setattr(la, "use_kernel", lambda *t: False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, Nq, M, heads, d = 2, 19, 37, 2, 8
    q, k = integer_logit_qk(B, Nq, M, heads, d, shift, device=device)
    v = torch.randn(B, M, heads * d, device=device)
    g = torch.rand(B, Nq, heads * d, device=device)   # positive: dV has no cancellation

    def run(fn, *xs, heads=heads, g=g):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*xs, heads, 1.0)
        return (out, *torch.autograd.grad(out, xs, g.to(out.dtype)))

    ours = run(lowres_attention, q, k, v)
    native = run(ref_F.lowres_attention_reference, q, k, v)
    exact = run(ref_F.lowres_attention_reference, q.double(), k.double(), v.double())
    assert_as_accurate_as_native(ours, native, exact, ("out", "dq", "dk", "dv"))
    # the clearest symptom: with all M logits tied, dV = (sum of dO over the queries) / M exactly
    q1, k1 = integer_logit_qk(1, 4, 13, 1, 8, shift, device=device)
    k1[..., 1] = 0.0
    g1 = torch.rand(1, 4, 8, device=device)
    dv = run(lowres_attention, q1, k1, torch.randn(1, 13, 8, device=device), heads=1, g=g1)[3]
    assert torch.allclose(dv, g1.sum(1, keepdim=True).expand(1, 13, 8) / 13, rtol=1e-6, atol=0)


@pytest.mark.parametrize("logit", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interp_tiles", "gpu_tiles"])
def test_random_logits_fp32(logit, gpu_tiles, monkeypatch):
    """fp32 at random logits of size ~1e2..1e6 (rows saturate to one-hot from ~1e3 on): every output and
    gradient as close to float64 as PyTorch's own fp32 attention.  At 1e4 an ulp of a logit is 1e-3, so
    a backward that recomputes s in another order than the forward (the old dK/dV kernel's transposed
    product) turns p = 1 into exp(-1e-3) and dV's error into ~5e-4 against native fp32's ~3e-9."""
    if gpu_tiles:
        monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, Nq, M, heads, d = 2, 37, 45, 2, 16
    q = torch.randn(B, Nq, heads * d, device=device)
    k = torch.randn(B, M, heads * d, device=device)
    v = torch.randn(B, M, heads * d, device=device)
    g = torch.randn(B, Nq, heads * d, device=device)
    scale = logit / math.sqrt(d)

    def run(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        out = fn(*xs, heads, scale)
        return (out, *torch.autograd.grad(out, xs, g.to(out.dtype)))

    ours = run(lowres_attention, q, k, v)
    native = run(ref_F.lowres_attention_reference, q, k, v)
    exact = run(ref_F.lowres_attention_reference, q.double(), k.double(), v.double())
    assert_as_accurate_as_native(ours, native, exact, ("out", "dq", "dk", "dv"))


def test_reference_in_query_blocks_past_the_score_budget(monkeypatch):
    """The reference attention never holds more than REFERENCE_MAX_SCORES scores: past it (a 1x3x2000x100
    image's LRHead has ~20k x 19k tokens, which was killed by the OS at 21 GB; now 1.2 GB peak) query rows
    go in blocks, recomputed in the backward.  Same forward and gradients as the one-matrix math (float64),
    with and without autograd."""
    la = importlib.import_module("lrformer_kernels.lowres_attention")
    q, k, v = (torch.randn(2, n, 12, dtype=torch.float64, requires_grad=True) for n in (23, 17, 17))
    g = torch.randn(2, 23, 12, dtype=torch.float64)
    full = ref_F.lowres_attention_reference(q, k, v, 3)
    want = torch.autograd.grad(full, (q, k, v), g)
    monkeypatch.setattr(la, "REFERENCE_MAX_SCORES", 2 * 3 * 17 * 5)     # blocks of 5 query rows
    seen = []
    monkeypatch.setattr(la, "_attend", lambda qh, *a, f=la._attend: (seen.append(qh.shape[2]), f(qh, *a))[1])
    out = ref_F.lowres_attention_reference(q, k, v, 3)
    assert seen and max(seen) == 5
    torch.testing.assert_close(out, full, rtol=1e-13, atol=1e-13)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        torch.testing.assert_close(ref_F.lowres_attention_reference(q, k, v, 3), full, rtol=1e-13, atol=1e-13)
