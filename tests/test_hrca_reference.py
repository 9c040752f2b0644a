"""The HRCA reference (lrformer_kernels.hrca_attention_reference) against a direct per-query loop."""
import pytest
import torch

import lrformer_kernels as LF


@pytest.mark.parametrize("H,W,ws", [(13, 10, 4), (8, 8, 4), (9, 5, 3), (4, 7, 8)])
def test_window_grid_and_pixels(H, W, ws):
    gh, gw = LF.hrca_window_grid(H, W, ws)
    assert (gh - 1) * ws < H <= gh * ws and (gw - 1) * ws < W <= gw * ws
    idx = torch.arange(gh * gw)
    flat, valid = LF.hrca_window_pixels(idx[:, None], H, W, ws)  # (windows, ws*ws)
    # every pixel of the map lies in exactly one window, once
    seen = torch.zeros(H * W, dtype=torch.long)
    seen.index_add_(0, flat[valid], torch.ones_like(flat[valid]))
    assert torch.equal(seen, torch.ones(H * W, dtype=torch.long))
    for w_ in range(gh * gw):
        r, c = divmod(w_, gw)
        expect = sorted(y * W + x for y in range(r * ws, min(r * ws + ws, H))
                        for x in range(c * ws, min(c * ws + ws, W)))
        assert sorted(flat[w_][valid[w_]].tolist()) == expect


def _direct(q, k, v, idx, ws, heads):
    B, Nq, C = q.shape
    _, H, W, _ = k.shape
    gw = -(-W // ws)
    d = C // heads
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(Nq):
            pix = [(y, x) for w_ in idx[b, i].tolist()
                   for y in range((w_ // gw) * ws, min((w_ // gw) * ws + ws, H))
                   for x in range((w_ % gw) * ws, min((w_ % gw) * ws + ws, W))]
            K = torch.stack([k[b, y, x] for y, x in pix])
            V = torch.stack([v[b, y, x] for y, x in pix])
            for h in range(heads):
                s = slice(h * d, h * d + d)
                a = torch.softmax(K[:, s] @ q[b, i, s] * d ** -0.5, 0)
                out[b, i, s] = a @ V[:, s]
    return out


@pytest.mark.parametrize("B,Nq,C,heads,H,W,ws,K", [(2, 5, 12, 3, 13, 10, 4, 3), (1, 3, 8, 1, 9, 9, 3, 1),
                                                   (1, 4, 10, 2, 7, 12, 5, 2)])
def test_hrca_attention_direct(B, Nq, C, heads, H, W, ws, K):
    g = torch.Generator().manual_seed(B * 100 + H)
    q = torch.randn(B, Nq, C, dtype=torch.float64, generator=g)
    k = torch.randn(B, H, W, C, dtype=torch.float64, generator=g)
    v = torch.randn(B, H, W, C, dtype=torch.float64, generator=g)
    gh, gw = LF.hrca_window_grid(H, W, ws)
    idx = torch.stack([torch.stack([torch.randperm(gh * gw, generator=g)[:K] for _ in range(Nq)])
                       for _ in range(B)])
    out = LF.hrca_attention_reference(q, k, v, idx, ws, heads)
    torch.testing.assert_close(out, _direct(q, k, v, idx, ws, heads), rtol=1e-12, atol=1e-12)
    # all windows selected == plain global cross-attention over the map
    full = torch.arange(gh * gw).expand(B, Nq, gh * gw)
    torch.testing.assert_close(LF.hrca_attention_reference(q, k, v, full, ws, heads),
                               LF.lowres_attention_reference(q, k.reshape(B, H * W, C), v.reshape(B, H * W, C), heads),
                               rtol=1e-12, atol=1e-12)


def test_hrca_attention_bad_index():
    q, k = torch.randn(1, 2, 4), torch.randn(1, 5, 5, 4)
    with pytest.raises(ValueError, match="win_idx"):
        LF.hrca_attention_reference(q, k, k, torch.tensor([[[0], [4]]]), 4, 1)
    with pytest.raises(ValueError, match="positive"):
        LF.hrca_window_grid(5, 5, 0)
