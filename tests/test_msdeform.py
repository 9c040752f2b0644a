"""Multi-scale deformable attention and the pixel decoder (lrformer.decoders.msdeform) against direct formulas."""
import math

import pytest
import torch

from lrformer.decoders.faseg import FASegPixelDecoder
from lrformer.decoders.mask2former import PixelDecoder
from lrformer.decoders.msdeform import MSDeformAttn, encoder_reference_points, sine_position_encoding
from lrformer_kernels import ms_deform_attn_reference as ms_deform_attn


def bilinear_direct(v, x, y):
    """v (D, H, W) float64; (x, y) normalised in [0, 1] (grid_sample align_corners=False convention),
    zero outside -> (D,)."""
    D, H, W = v.shape
    px, py = x * W - 0.5, y * H - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(D, dtype=torch.float64)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < H and 0 <= xx < W:
                out += wy * wx * v[:, yy, xx]
    return out


def test_ms_deform_attn_vs_direct_float64():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 3), (5, 2)]
    B, M, D, Nq, L, P = 2, 2, 3, 4, len(shapes), 3
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=torch.float64)
    loc = torch.rand(B, Nq, M, L, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2   # some outside
    w = torch.rand(B, Nq, M, L, P, generator=g, dtype=torch.float64)
    out = ms_deform_attn(value, shapes, loc, w)
    assert out.shape == (B, Nq, M * D)
    ref = torch.zeros(B, Nq, M, D, dtype=torch.float64)
    starts = [0]
    for h, wd in shapes:
        starts.append(starts[-1] + h * wd)
    for b in range(B):
        for q in range(Nq):
            for m in range(M):
                for lvl, (h, wd) in enumerate(shapes):
                    v = value[b, starts[lvl]:starts[lvl + 1], m].T.reshape(D, h, wd)
                    for p in range(P):
                        x, y = loc[b, q, m, lvl, p].tolist()
                        ref[b, q, m] += w[b, q, m, lvl, p] * bilinear_direct(v, x, y)
    torch.testing.assert_close(out, ref.reshape(B, Nq, M * D), rtol=1e-10, atol=1e-12)
    # points well outside every map read zeros
    far = torch.full_like(loc, 3.0)
    assert ms_deform_attn(value, shapes, far, w).abs().max() == 0


def test_msdeform_module_offsets_in_level_pixels():
    """An offset of (+1, 0) from a pixel centre must read the right-hand neighbour on every level:
    offsets are divided by (W_l, H_l). Value/output projections set to identity, all weight on
    level ``lvl`` via the attention-weight bias."""
    torch.manual_seed(0)
    dim, L, M, P = 4, 2, 1, 1
    shapes = [(3, 5), (2, 4)]
    mod = MSDeformAttn(dim, L, M, P).double()
    with torch.no_grad():
        for lin in (mod.value_proj, mod.output_proj):
            lin.weight.copy_(torch.eye(dim))
            lin.bias.zero_()
        mod.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0] * L))
        mod.attention_weights.bias.copy_(torch.tensor([0.0, 50.0]))     # all weight on level 1
    S = sum(h * w for h, w in shapes)
    value = torch.randn(1, S, dim, dtype=torch.float64)
    ref = encoder_reference_points(shapes, 1)                            # (1, S, L, 2) float32
    q = torch.zeros(1, S, dim, dtype=torch.float64)
    out = mod(q, ref, value, shapes)
    lvl1 = value[0, 15:].reshape(2, 4, dim)
    # query 15 + i*4 + j sits at level-1 pixel (i, j): it reads pixel (i, j + 1), zero past the edge
    for i in range(2):
        for j in range(4):
            expect = lvl1[i, j + 1] if j + 1 < 4 else torch.zeros(dim, dtype=torch.float64)
            torch.testing.assert_close(out[0, 15 + i * 4 + j], expect, rtol=1e-9, atol=1e-9)
    # a level-0 query (pixel (1, 2) of the 3x5 map, centre (0.5, 0.5)) reads level 1 at
    # x = 0.5 + 1/4 -> level-1 pixel column 2.5, row 0.5: the mean of pixels (0..1, 2..3)
    torch.testing.assert_close(out[0, 1 * 5 + 2], lvl1[:, 2:4].mean((0, 1)), rtol=1e-9, atol=1e-9)


def test_sine_position_encoding_formula():
    pos = sine_position_encoding(2, 3, 5, 8, dtype=torch.float64)
    assert pos.shape == (2, 8, 3, 5)
    i, j = 2, 4
    y, x = (i + 1) / (3 + 1e-6) * 2 * math.pi, (j + 1) / (5 + 1e-6) * 2 * math.pi   # mmdet: offset 0
    expect = []
    for t in (y, x):
        for k in range(2):      # pairs (sin, cos) at frequency 10000 ** (2k / 4)
            f = 10000 ** (2 * k / 4)
            expect += [math.sin(t / f), math.cos(t / f)]
    torch.testing.assert_close(pos[1, :, i, j], torch.tensor(expect, dtype=torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["mmdet", "faseg"])
def test_pixel_decoder_shapes_and_grads(kind):
    torch.manual_seed(0)
    chans = (8, 12, 16, 20)
    if kind == "mmdet":
        dec = PixelDecoder(chans, dim=32, layers=2, heads=2, points=2, ffn_dim=32)
    else:
        dec = FASegPixelDecoder(chans, dim=32, layers=2, heads=2, points=2, ffn_dim=32)
    sizes = [(19, 13), (10, 7), (5, 4), (3, 2)]       # odd sizes as an odd image gives
    feats = [torch.randn(2, c, h, w) for c, (h, w) in zip(chans, sizes)]
    out = dec(feats)
    mask_features, ms = out[0], out[1]
    assert mask_features.shape == (2, 32, 19, 13)
    expect = [(2, 32, 3, 2), (2, 32, 5, 4), (2, 32, 10, 7)] + ([(2, 32, 19, 13)] if kind == "faseg" else [])
    assert [tuple(m.shape) for m in ms] == expect
    loss = mask_features.square().mean() + sum(m.square().mean() for m in ms)
    if kind == "faseg":                              # the 4 positional encodings (res2's: only for HRCA)
        assert [tuple(p.shape) for p in out[2]] == [(2, 32, 3, 2), (2, 32, 5, 4), (2, 32, 10, 7), (2, 32, 19, 13)]
        loss = loss + sum(p.square().mean() for p in out[2])
    loss.backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None]
    assert not missing, missing
