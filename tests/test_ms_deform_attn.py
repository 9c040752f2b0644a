"""Fused multi-scale deformable attention (lrformer_kernels.ms_deform_attn) vs its float64 reference
(``ms_deform_attn_reference``: grid_sample per level), forward and backward, under the interpreter on
CPU (compiled kernels on CUDA).  Outputs are poisoned (NaN) by conftest, so an unwritten element fails."""
import importlib

import pytest
import torch

import lrformer_kernels as K
import lrformer_kernels._common as common
from conftest import TOL, devices, dtypes_for, rel_err

msda = importlib.import_module("lrformer_kernels.ms_deform_attn")

# (level shapes, B, M, D, Nq, P)
CASES = [
    ([(5, 7)], 1, 1, 4, 6, 1),                                   # one level, one head, one point
    ([(5, 7), (3, 4), (2, 2)], 2, 3, 5, 9, 4),                   # odd, non-square, D not a power of two
    ([(8, 6), (4, 3), (2, 2), (1, 1)], 1, 2, 8, 17, 6),          # 4 levels (a 1x1 one), many points
    ([(1, 9), (9, 1)], 2, 4, 3, 5, 2),                           # 1-pixel-wide maps
]


def make(shapes, B, M, D, Nq, P, dtype, device, layout="contig", spread=1.4):
    L, S = len(shapes), sum(h * w for h, w in shapes)
    v = torch.randn(B, S, M, D, dtype=torch.float64)
    loc = torch.rand(B, Nq, M, L, P, 2, dtype=torch.float64) * spread - (spread - 1) / 2   # some outside
    w = torch.rand(B, Nq, M, L, P, dtype=torch.float64)
    if layout == "strided":       # value: a head-strided view; locations/weights: slices of bigger tensors
        v = torch.randn(B, S, 2 * M, D + 1, dtype=torch.float64)[:, :, ::2, :D]
        loc = torch.cat([loc, loc], 1)[:, ::2]
        w = torch.rand(B, Nq, M, L, P + 2, dtype=torch.float64)[..., 1:P + 1]
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (v, loc, w)]


def check(shapes, B, M, D, Nq, P, dtype, device, layout="contig", inputs=None):
    v, loc, w = inputs or make(shapes, B, M, D, Nq, P, dtype, device, layout)
    out = K.ms_deform_attn(v, shapes, loc, w)
    r = [t.detach().double().cpu().requires_grad_() for t in (v, loc, w)]
    ref = K.ms_deform_attn_reference(r[0], shapes, r[1], r[2])
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    g = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (v, loc, w), g.to(device=device, dtype=dtype))
    want = torch.autograd.grad(ref, r, g)
    tol = TOL[dtype] if dtype == torch.float64 else 10 * TOL[dtype]
    for name, a, b in zip(("value", "locations", "weights"), got, want):
        assert a.shape == b.shape and rel_err(a, b) < tol, (name, rel_err(a, b))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_reference(device, case, deterministic):
    for dtype in dtypes_for(device):
        torch.use_deterministic_algorithms(deterministic)
        try:
            check(*CASES[case], dtype, device)
        finally:
            torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("device", devices())
def test_strided_inputs(device):
    for dtype in dtypes_for(device):
        check([(5, 7), (3, 4)], 2, 3, 5, 7, 3, dtype, device, layout="strided")


def test_locations_on_pixel_borders_and_edges():
    """Sample points exactly on pixel centres, on borders between pixels, on the last row/column, on
    the map's outer edge and beyond it (zeros): float64, kernel vs reference (grid_sample)."""
    shapes = [(4, 8), (2, 4)]
    B, M, D, P = 1, 2, 3, 6
    xs = torch.tensor([0.0, 0.5 / 8, 1 / 8, 0.5, 7.5 / 8, 1.0, 1.0 + 0.5 / 8, -0.5 / 8], dtype=torch.float64)
    ys = torch.tensor([0.0, 0.5 / 4, 0.25, 0.5, 3.5 / 4, 1.0, 1.0 + 0.5 / 4, -0.125], dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)       # 64 points
    Nq = grid.shape[0] // P + 1
    loc = grid.repeat(2, 1)[: Nq * P].reshape(1, Nq, 1, 1, P, 2).expand(B, Nq, M, 2, P, 2).clone()
    v = torch.randn(B, 40, M, D, dtype=torch.float64)
    w = torch.rand(B, Nq, M, 2, P, dtype=torch.float64)
    check(shapes, B, M, D, Nq, P, torch.float64, "cpu",
          inputs=[t.requires_grad_() for t in (v, loc, w)])


def test_issue_example_pixel_centre_gradient():
    """One 3x5 level, value = arange(15), a point exactly on a pixel centre (x = 3.5/5 + 1/5, y = 0.5/3):
    the kernel must pick grid_sample's corners (ix lands an ulp below 4 there), so its location
    gradient is the reference's [5, 12] (the old ((2x - 1 + 1) W - 1) / 2 gave [-20, 12])."""
    v = torch.arange(15, dtype=torch.float64).reshape(1, 15, 1, 1).requires_grad_()
    loc = torch.tensor([3.5 / 5 + 1 / 5, 0.5 / 3], dtype=torch.float64).reshape(1, 1, 1, 1, 1, 2).requires_grad_()
    w = torch.ones(1, 1, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    for fn in (K.ms_deform_attn, K.ms_deform_attn_reference):
        out = fn(v, [(3, 5)], loc, w)
        dloc, = torch.autograd.grad(out.sum(), loc)
        torch.testing.assert_close(dloc.flatten(), torch.tensor([5.0, 12.0], dtype=torch.float64), rtol=1e-12, atol=1e-12,
                                   msg=fn.__name__)


@pytest.mark.parametrize("points", ["float32", "float64"])
def test_on_lattice_locations_non_power_of_two(points):
    """Deformable DETR's initialisation: every point a whole number of pixels from a pixel centre, at
    levels whose sides are not powers of two (3, 5, 7, 12, 14, 24), reference points built in float32
    as the released decoders do (then promoted) or in float64: kernel == reference, float64, forward
    and every gradient (a corner picked differently changes dlocations by O(1))."""
    shapes = [(3, 5), (7, 12), (14, 24)]
    M, D, P = 2, 3, 4
    dt = torch.float32 if points == "float32" else torch.float64
    centres = []
    for h, w in shapes:     # every pixel centre of every level
        ys = (torch.arange(h, dtype=dt) + 0.5) / h
        xs = (torch.arange(w, dtype=dt) + 0.5) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        centres.append(torch.stack([xx.flatten(), yy.flatten()], -1))
    ref = torch.cat(centres).double()                                          # (Nq, 2)
    Nq = ref.shape[0]
    # per head, level and point: an offset of k pixels of that level along a ray, as the released init
    k = torch.tensor([[1, 0], [0, -1], [-2, 1], [3, 2]], dtype=torch.float64)  # (P, 2) in pixels
    norm = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)      # (L, 2)
    off = torch.stack([k, -k.flip(1)])[:, None] / norm[None, :, None]           # (M, L, P, 2)
    loc = (ref[:, None, None, None, :] + off[None]).unsqueeze(0).contiguous()  # (1, Nq, M, L, P, 2)
    v = torch.randn(1, sum(h * w for h, w in shapes), M, D, dtype=torch.float64)
    wgt = torch.rand(1, Nq, M, len(shapes), P, dtype=torch.float64)
    check(shapes, 1, M, D, Nq, P, torch.float64, "cpu", inputs=[t.requires_grad_() for t in (v, loc, wgt)])


def test_gpu_tiles_and_int64_offsets(monkeypatch):
    """The tile configuration the CUDA dispatch picks (not the interpreter's big blocks), with several
    query blocks, and the int64 offset path."""
    monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    bq, bd, _ = msda._forward_config(5)
    assert (bq, bd) == (128, 8) and msda._backward_config(5)[0] == 64
    check([(5, 7), (3, 4)], 1, 2, 5, 150, 2, torch.float64, "cpu")
    monkeypatch.setattr(msda, "needs_int64", lambda *t: True)
    check([(5, 7), (3, 4)], 1, 2, 5, 70, 2, torch.float64, "cpu")


def test_gradcheck():
    shapes = [(3, 4), (2, 2)]
    v, loc, w = make(shapes, 1, 2, 3, 3, 2, torch.float64, "cpu", spread=0.8)
    # keep points away from pixel borders, where bilinear sampling is not differentiable
    assert torch.autograd.gradcheck(lambda a, b, c: K.ms_deform_attn(a, shapes, b, c), (v, loc, w),
                                    eps=1e-6, atol=1e-6)


def test_reference_path_without_interpreter(monkeypatch):
    monkeypatch.setattr(msda, "use_kernel", lambda *t: False)
    check([(5, 7), (3, 4)], 2, 2, 4, 5, 3, torch.float64, "cpu")


def test_opcheck_compile_and_export():
    shapes = [(3, 4), (2, 2)]
    v, loc, w = make(shapes, 1, 2, 4, 5, 2, torch.float64, "cpu")
    torch.library.opcheck(torch.ops.lrformer.ms_deform_attn.default, (v, [3, 4, 2, 2], loc, w),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    from torch import _dynamo
    _dynamo.reset()
    f = torch.compile(lambda a, b, c: K.ms_deform_attn(a, shapes, b, c) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(v, loc, w), 2 * K.ms_deform_attn_reference(v, shapes, loc, w))

    class M(torch.nn.Module):
        def forward(self, a, b, c):
            return K.ms_deform_attn(a, shapes, b, c)
    ep = torch.export.export(M(), (v.detach(), loc.detach(), w.detach()))
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.lrformer.ms_deform_attn.default in ops and len(ops) == 1


@pytest.mark.parametrize("bad,match", [
    (lambda v, l, w: (v[0], [(5, 7)], l, w), "value must have 4 dimensions"),
    (lambda v, l, w: (v, [(5, 6)], l, w), "value has 35 tokens"),
    (lambda v, l, w: (v, [(5, 7, 1)], l, w), "shapes\\[0\\]"),
    (lambda v, l, w: (v, [(5, -7)], l, w), "positive"),
    (lambda v, l, w: (v, "57", l, w), "shapes must be"),
    (lambda v, l, w: (v, [(5, 7)], l[..., :1], w), "locations must be"),
    (lambda v, l, w: (v, [(5, 7)], l, w[..., :1]), "weights must be"),
    (lambda v, l, w: (v, [(5, 7)], l.float(), w), "locations has dtype"),
    (lambda v, l, w: (v.int(), [(5, 7)], l, w), "value has dtype"),
    (lambda v, l, w: (v, [(5, 7)], l[:, :, :1], w[:, :, :1]), "locations must be"),
])
def test_bad_input(bad, match):
    v = torch.randn(1, 35, 2, 3, dtype=torch.float64)
    loc = torch.rand(1, 4, 2, 1, 2, 2, dtype=torch.float64)
    w = torch.rand(1, 4, 2, 1, 2, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=match):
        K.ms_deform_attn(*bad(v, loc, w))


def test_fused_pixel_decoders_match_reference():
    """Both families' pixel decoders through the fused op (fuse) == reference (float64)."""
    from lrformer.decoders.faseg import FASegPixelDecoder
    from lrformer.decoders.mask2former import PixelDecoder
    torch.manual_seed(0)
    chans = (8, 12, 16, 20)
    feats = [torch.randn(1, c, h, w, dtype=torch.float64) for c, (h, w) in zip(chans, [(19, 13), (10, 7), (5, 4), (3, 2)])]
    for dec in (PixelDecoder(chans, dim=16, layers=2, heads=2, points=2, ffn_dim=16),
                FASegPixelDecoder(chans, dim=16, layers=2, heads=2, points=2, ffn_dim=16)):
        dec = dec.double()
        with torch.no_grad():
            for layer in dec.modules():
                if hasattr(layer, "sampling_offsets"):
                    layer.sampling_offsets.weight.normal_(0, 0.5)
                    layer.attention_weights.weight.normal_(0, 0.5)
        ref = dec(feats)
        K.fuse(dec)
        assert dec.fuse_report.get("MSDeformAttn") == 2
        out = dec(feats)
        torch.testing.assert_close(out[0], ref[0], rtol=1e-10, atol=1e-10)
        for a, b in zip(out[1], ref[1]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
