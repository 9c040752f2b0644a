"""The op registry: one entry per fused op, read by the op sweep, the byte/FLOP formulas, the plots and
the tests.  Each :class:`OpEntry` says at which shapes the op runs in LRFormer-S (read from
:mod:`lrformer`), how to make its inputs, its reference and fused calls, and the fewest bytes it must
move and the matrix FLOPs it does.  Adding an op to the benchmarks = adding one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

import lrformer_kernels as K
from lrformer.factory import create_encoder

# ------------------------------------------------------------------------ LRFormer-S stage constants
with torch.device("meta"):
    _S = create_encoder("s")
#: LRFormer-S per stage, from the model itself: widths, heads, MLP ratios, layer scale (None: off)
S_DIMS: Tuple[int, ...] = tuple(_S.embed_dims)
S_HEADS: Tuple[int, ...] = tuple(_S.num_heads)
S_MLP_RATIOS: Tuple[float, ...] = tuple(_S.mlp_ratios)
S_LAYER_SCALE = tuple(None if getattr(_S, f"block{s}")[0].layer_scale_1 is None else 1e-6 for s in range(1, 5))
del _S

#: FASeg's HRCA on the stride-4 map of an image (LRFormer stage-1 resolution): decoder width 256,
#: 8 heads (head dim 32), 100 queries, 8x8 windows, each query attends to 1/32 of the windows
#: (K = 8 of 256 at 512x512: 512 keys per query), distinct windows per query, uniformly random.
HRCA = dict(C=256, heads=8, nq=100, window=8, frac=32)


def stage_map_size(height: int, width: int, stage: int) -> Tuple[int, int]:
    """Map size of stage ``stage`` (1..4) for an image: stride 4, 8, 16, 32 (each stride-2 conv
    with padding 1 rounds up)."""
    h, w = int(height), int(width)
    for _ in range(stage + 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def hrca_dims(h: int, w: int) -> Tuple[int, int, int]:
    """(windows in the grid, K windows per query, keys per query) of :data:`HRCA` on an h x w map."""
    gh, gw = K.hrca_window_grid(h, w, HRCA["window"])
    n_win = gh * gw
    k = max(1, n_win // HRCA["frac"])
    return n_win, k, k * HRCA["window"] ** 2


def _randn(shape, cfg, dtype=torch.float32, grad=False, gen=None):
    t = torch.randn(shape, device=cfg.device, dtype=torch.float32, generator=gen).to(dtype)
    return t.requires_grad_(grad)


def _gen(cfg, seed: int):
    g = torch.Generator(device=cfg.device)
    g.manual_seed(seed)
    return g


def _grid_counts(h: int, w: int):
    grids = K.lrsa_grids(h, w)
    return grids, grids[0][0] * grids[0][1], sum(a * b for a, b in grids[1:])


@dataclass(frozen=True)
class OpEntry:
    """One fused op in the benchmarks.

    ``channels(stage)``: its channel count; ``functions(stage, h, w)`` -> ``(reference, fused,
    inputs(cfg, B, dtype, grad, i))``; ``bytes(B, h, w, stage, esize, mode)``: the fewest bytes it must
    move (each input read once, each output written once; ``fwd+bwd`` = both); ``flops``: its matrix
    FLOPs (2 per multiply-add) or None; ``cuda_stage1_only``: timed only on CUDA at stage 1;
    ``shape_note(h, w)``: extra shape text for the result rows."""
    name: str
    channels: Callable[[int], int]
    functions: Callable
    bytes: Callable[..., int]
    flops: Optional[Callable[..., int]] = None
    cuda_stage1_only: bool = False
    shape_note: Callable[[int, int], str] = lambda h, w: ""


# ------------------------------------------------------------------------------------ the ops
def _pyramid_pool(s, h, w):
    C = S_DIMS[s - 1]
    grids = K.lrsa_grids(h, w)

    def inputs(cfg, B, dt, grad, i):
        return (_randn((B, h, w, C), cfg, dt, grad, _gen(cfg, i)),)
    return (lambda x: K.pyramid_pool_reference(x, grids)), (lambda x: K.pyramid_pool(x, grids)), inputs


def _pyramid_pool_bytes(B, h, w, s, esize, mode):
    """fwd: read x (B H W C) + write the 5 grids (B N C), N = sum of grid cells;
    bwd: read dOut (B N C) + write dx (B H W C)."""
    C = S_DIMS[s - 1]
    _, nq, m = _grid_counts(h, w)
    n, hw_ = nq + m, B * h * w * C
    fwd = (hw_ + B * n * C) * esize
    return fwd if mode == "fwd" else fwd + (B * n * C + hw_) * esize


def _lowres_attention(s, h, w):
    C, heads = S_DIMS[s - 1], S_HEADS[s - 1]
    _, nq, m = _grid_counts(h, w)

    def inputs(cfg, B, dt, grad, i):
        g = _gen(cfg, i)
        return (_randn((B, nq, C), cfg, dt, grad, g), _randn((B, m, 2 * C), cfg, dt, grad, g))
    return (lambda q, kv: K.lowres_attention_reference(q, kv[..., :C], kv[..., C:], heads),
            lambda q, kv: K.lowres_attention(q, kv[..., :C], kv[..., C:], heads), inputs)


def _lowres_attention_bytes(B, h, w, s, esize, mode):
    """fwd: read q (B Nq C), k, v (B M C each) + write o (B Nq C); bwd: read dO, q (B Nq C each),
    k, v (B M C each), the forward's row max and row sum (B heads Nq fp32 each) + write dq (B Nq C), dk,
    dv (B M C each)."""
    C, heads = S_DIMS[s - 1], S_HEADS[s - 1]
    _, nq, m = _grid_counts(h, w)
    fwd = (2 * B * nq * C + 2 * B * m * C) * esize
    bwd = (2 * B * nq * C + 2 * B * m * C + B * nq * C + 2 * B * m * C) * esize + 2 * B * heads * nq * 4
    return fwd if mode == "fwd" else fwd + bwd


def _lowres_attention_flops(B, h, w, s, mode):
    """2 products forward (q.k, p.v), 4 backward (dO.v, ds.k, ds.q, p.dO; the recomputed q.k and the dQ
    kernel's delta pass not counted: this is the useful work)."""
    _, nq, m = _grid_counts(h, w)
    one = 2 * B * nq * m * S_DIMS[s - 1]
    return one * (2 if mode == "fwd" else 6)


def _upsample_residual(s, h, w):
    C = S_DIMS[s - 1]
    hq, wq = K.lrsa_grids(h, w)[0]
    has_scale = S_LAYER_SCALE[s - 1] is not None

    def inputs(cfg, B, dt, grad, i):
        g = _gen(cfg, i)
        scale = _randn((C,), cfg, torch.float32, grad, g) if has_scale else None
        keep = None
        if grad:  # training: drop path on
            keep = (torch.rand(B, device=cfg.device, generator=g) > 0.1).float() / 0.9
        return (_randn((B, h, w, C), cfg, dt, grad, g), _randn((B, hq, wq, C), cfg, dt, grad, g), scale, keep)
    return K.upsample_residual_reference, K.upsample_residual, inputs


def _upsample_residual_bytes(B, h, w, s, esize, mode):
    """fwd: read x (B H W C), low (B hq wq C), scale (C fp32, stages 3-4), keep (B fp32, fwd+bwd only:
    drop path in training) + write out (B H W C); bwd: read dOut (B H W C), low (B hq wq C) + write
    dlow (B hq wq C), dscale (C fp32) (dx is dOut itself: no copy)."""
    C = S_DIMS[s - 1]
    _, nq, _ = _grid_counts(h, w)
    hw_, low = B * h * w * C, B * nq * C
    scale = 4 * C if S_LAYER_SCALE[s - 1] is not None else 0
    fwd = (2 * hw_ + low) * esize + scale + (4 * B if mode != "fwd" else 0)
    return fwd if mode == "fwd" else fwd + (hw_ + 2 * low) * esize + scale


def _dwconv(gelu: bool):
    def functions(s, h, w):
        Cp = _dwconv_channels(gelu)(s)

        def inputs(cfg, B, dt, grad, i):
            g = _gen(cfg, i)
            wt = (_randn((Cp, 1, 3, 3), cfg, dt, False, g) / 3).requires_grad_(grad)
            return (_randn((B, h, w, Cp), cfg, dt, grad, g), wt, _randn((Cp,), cfg, dt, grad, g))
        return (lambda x, wt, b: K.dwconv3x3_reference(x, wt, b, gelu=gelu, residual=True),
                lambda x, wt, b: K.dwconv3x3(x, wt, b, gelu=gelu, residual=True), inputs)
    return functions


def _dwconv_channels(gelu: bool):
    return lambda s: S_DIMS[s - 1] * (int(S_MLP_RATIOS[s - 1]) if gelu else 1)


def _dwconv_bytes(gelu: bool):
    def nbytes(B, h, w, s, esize, mode):
        """fwd: read x (B H W C') + write y (B H W C') (+ weights 10 C'); bwd: read dy, x (B H W C' each)
        + write dx (B H W C') (+ dw, db)."""
        C = _dwconv_channels(gelu)(s)
        hw_ = B * h * w * C
        fwd = 2 * hw_ * esize + 10 * C * esize
        return fwd if mode == "fwd" else fwd + 3 * hw_ * esize + 10 * C * esize
    return nbytes


def _dwconv_pool(s, h, w):
    """An encoder block's CPE + norm1 + LRSA pooling (``dwconv3x3_pyramid_pool``): outputs (y, pooled)."""
    C = S_DIMS[s - 1]
    grids = K.lrsa_grids(h, w)

    def inputs(cfg, B, dt, grad, i):
        g = _gen(cfg, i)
        wt = (_randn((C, 1, 3, 3), cfg, dt, False, g) / 3).requires_grad_(grad)
        nw = (1 + _randn((C,), cfg, dt, False, g) / 10).requires_grad_(grad)
        return (_randn((B, h, w, C), cfg, dt, grad, g), wt, _randn((C,), cfg, dt, grad, g), nw,
                _randn((C,), cfg, dt, grad, g))
    return (lambda x, wt, b, nw, nb: K.dwconv3x3_pyramid_pool_reference(x, wt, b, grids, nw, nb),
            lambda x, wt, b, nw, nb: K.dwconv3x3_pyramid_pool(x, wt, b, grids, nw, nb), inputs)


def _dwconv_pool_bytes(B, h, w, s, esize, mode):
    """fwd: read x (B H W C) and the parameters (12 C), write y (B H W C) and the grids (B N C); bwd: read dy,
    dpooled and x, write dx and the parameters' gradients."""
    C = S_DIMS[s - 1]
    _, nq, m = _grid_counts(h, w)
    hw_, pooled = B * h * w * C, B * (nq + m) * C
    fwd = (2 * hw_ + pooled + 12 * C) * esize
    return fwd if mode == "fwd" else fwd + (3 * hw_ + pooled + 12 * C) * esize


def _hrca(s, h, w):
    C, heads, nq, ws = HRCA["C"], HRCA["heads"], HRCA["nq"], HRCA["window"]
    n_win, k, _ = hrca_dims(h, w)

    def inputs(cfg, B, dt, grad, i):
        g = _gen(cfg, i)
        win = torch.rand((B, nq, n_win), device=cfg.device, generator=g).argsort(-1)[..., :k]
        return (_randn((B, nq, C), cfg, dt, grad, g), _randn((B, h, w, 2 * C), cfg, dt, grad, g), win.contiguous())
    return (lambda q, kv, win: K.hrca_attention_reference(q, kv[..., :C], kv[..., C:], win, ws, heads),
            lambda q, kv, win: K.hrca_attention(q, kv[..., :C], kv[..., C:], win, ws, heads), inputs)


def _hrca_bytes(B, h, w, s, esize, mode):
    """Nq queries, K windows of ws x ws each, n_win windows in the map's grid; U = n_win (1 - (1 -
    K/n_win)^Nq) = expected number of distinct windows the queries select (random distinct windows per
    query): only their pixels must be read; maps divisible by ws, as in the sweep.
    fwd: read q (B Nq C), win_idx (B Nq K int64), k, v (B U ws^2 C each) + write o (B Nq C);
    bwd: read dO, q, o (B Nq C each), win_idx, k, v (B U ws^2 C each), the forward's row max and row sum
    (B heads Nq fp32 each) + write dq (B Nq C), dk, dv (B H W C each: full maps)."""
    C, nq, ws = HRCA["C"], HRCA["nq"], HRCA["window"]
    n_win, k, _ = hrca_dims(h, w)
    hw_ = B * h * w * C
    sel = round(B * n_win * (1.0 - (1.0 - k / n_win) ** nq)) * ws * ws * C
    idx = 8 * B * nq * k
    fwd = (2 * B * nq * C + 2 * sel) * esize + idx
    bwd = (4 * B * nq * C + 2 * sel + 2 * hw_) * esize + idx + 2 * 4 * B * HRCA["heads"] * nq
    return fwd if mode == "fwd" else fwd + bwd


def _hrca_flops(B, h, w, s, mode):
    """Each of the Nq queries against its K ws^2 keys, ``2 B Nq (K ws^2) C`` per product."""
    one = 2 * B * HRCA["nq"] * hrca_dims(h, w)[2] * HRCA["C"]
    return one * (2 if mode == "fwd" else 6)


#: FASeg's HRCA branch at LRFormer-S+ (res2 width 64) on an image's stride-4 map: 256-wide decoder, 8 heads,
#: 100 queries, one set of n0 // 32 windows of 8x8 per image (n0 = stride-32 tokens).
HRCA_BRANCH = dict(C=256, heads=8, nq=100, window=8, omega=32, cin=64)


def hrca_branch_windows(h: int, w: int) -> Tuple[int, int]:
    """(stride-32 tokens n0 = windows in the grid, windows kept K) of an h x w stride-4 map."""
    n0 = (-(-h // HRCA_BRANCH["window"])) * (-(-w // HRCA_BRANCH["window"]))
    return n0, n0 // HRCA_BRANCH["omega"]


def _hrca_branch(s, h, w):
    """Reference: the res2 projection (1x1 conv + GN) and its depthwise PE over the whole stride-4 map,
    then the selected windows gathered, attention with nn.MultiheadAttention.  Fused: the PE only on
    the windows + halo (:class:`lrformer.decoders.faseg.WindowedPE`), attention through
    ``lowres_attention``."""
    import torch.nn as nn

    from lrformer.decoders.common import fused_mha, mha
    from lrformer.decoders.faseg import WindowedPE, gather_windows
    from lrformer.decoders.msdeform import group_norm
    C, cin, ws, nq = HRCA_BRANCH["C"], HRCA_BRANCH["cin"], HRCA_BRANCH["window"], HRCA_BRANCH["nq"]
    n0, k = hrca_branch_windows(h, w)
    gw = -(-w // ws)
    mods = {}

    def modules(device, dtype):
        key = (device, dtype)
        if key not in mods:
            torch.manual_seed(0)
            proj = nn.Sequential(nn.Conv2d(cin, C, 1), group_norm(C))
            pos = nn.Conv2d(C, C, 3, padding=1, groups=C)
            attn = nn.MultiheadAttention(C, HRCA_BRANCH["heads"])
            mods[key] = [m.to(device=device, dtype=dtype) for m in (proj, pos, attn)]
        return mods[key]

    def reference(res2, fg_src, query, E, win):
        proj, pos, attn = modules(res2.device, res2.dtype)
        pe = pos(proj(res2))
        keys, kpos = gather_windows(fg_src, win, ws, gw), gather_windows(pe, win, ws, gw)
        return mha(attn, query + E, keys + kpos, keys)[0]

    def fused(res2, fg_src, query, E, win):
        proj, pos, attn = modules(res2.device, res2.dtype)
        keys, kpos = gather_windows(fg_src, win, ws, gw), WindowedPE(res2, proj, pos).gather(win, ws, gw)
        return fused_mha(attn, query + E, keys + kpos, keys, K.FUSED)

    def inputs(cfg, B, dt, grad, i):
        g = _gen(cfg, i)
        win = torch.rand((B, n0), device=cfg.device, generator=g).argsort(-1)[:, :k].contiguous()
        return (_randn((B, cin, h, w), cfg, dt, grad, g), _randn((B, C, h, w), cfg, dt, grad, g),
                _randn((B, nq, C), cfg, dt, grad, g), _randn((B, nq, C), cfg, dt, False, g), win)
    return reference, fused, inputs


def _hrca_branch_bytes(B, h, w, s, esize, mode):
    """The fused design's fewest bytes (forward): read res2 once for its moments (B H W Cin), then the
    windows' res2 pixels with a one-pixel halo (B K (ws+2)^2 Cin), the windows of the FPN map
    (B K ws^2 C), the queries and E (2 B Nq C) + write the output (B Nq C).  (The reference also writes
    and re-reads the full projected map and its PE, 4 B H W C more.)  fwd+bwd: twice the forward."""
    C, cin, ws, nq = HRCA_BRANCH["C"], HRCA_BRANCH["cin"], HRCA_BRANCH["window"], HRCA_BRANCH["nq"]
    _, k = hrca_branch_windows(h, w)
    fwd = (B * h * w * cin + B * k * (ws + 2) ** 2 * cin + B * k * ws * ws * C + 3 * B * nq * C) * esize
    return fwd if mode == "fwd" else 2 * fwd


def _hrca_branch_flops(B, h, w, s, mode):
    """Attention products of Nq queries against K ws^2 keys (2 per multiply-add)."""
    _, k = hrca_branch_windows(h, w)
    one = 2 * B * HRCA_BRANCH["nq"] * k * HRCA_BRANCH["window"] ** 2 * HRCA_BRANCH["C"]
    return one * (2 if mode == "fwd" else 6)


#: the pixel decoders' deformable encoder at LRFormer-S+ (both families): 256 channels = 8 heads x 32,
#: 3 levels (strides 32, 16, 8), 4 points, every token a query.
MSDA = dict(heads=8, head_dim=32, levels=3, points=4)


def msda_shapes(h: int, w: int):
    """Level shapes (strides 32, 16, 8) of an image whose stride-4 map is h x w."""
    out = []
    for k in (3, 2, 1):
        hh, ww = h, w
        for _ in range(k):
            hh, ww = (hh + 1) // 2, (ww + 1) // 2
        out.append((hh, ww))
    return out


def _msda(s, h, w):
    shapes = msda_shapes(h, w)
    S, M, D, L, P = sum(a * b for a, b in shapes), MSDA["heads"], MSDA["head_dim"], MSDA["levels"], MSDA["points"]

    def inputs(cfg, B, dt, grad, i):
        g = _gen(cfg, i)
        loc = torch.rand((B, S, M, L, P, 2), device=cfg.device, generator=g).to(dt).requires_grad_(grad)
        wgt = torch.rand((B, S, M, L, P), device=cfg.device, generator=g).softmax(-1).to(dt).requires_grad_(grad)
        return (_randn((B, S, M, D), cfg, dt, grad, g), loc, wgt)
    return (lambda v, loc, wgt: K.ms_deform_attn_reference(v, shapes, loc, wgt),
            lambda v, loc, wgt: K.ms_deform_attn(v, shapes, loc, wgt), inputs)


def _msda_bytes(B, h, w, s, esize, mode):
    """fwd: read value (B S M D), locations (B Nq M L P 2), weights (B Nq M L P) + write out (B Nq M D);
    bwd: read dOut (B Nq M D), value, locations, weights + write dvalue (B S M D), dlocations, dweights.
    Nq = S (the encoder's self-attention)."""
    S = sum(a * b for a, b in msda_shapes(h, w))
    M, D, L, P = MSDA["heads"], MSDA["head_dim"], MSDA["levels"], MSDA["points"]
    vals, locw = B * S * M * D, B * S * M * L * P * 3
    fwd = (2 * vals + locw) * esize
    return fwd if mode == "fwd" else fwd + (3 * vals + 2 * locw) * esize


def _msda_flops(B, h, w, s, mode):
    """2 per multiply-add: forward 4 taps x D per (query, head, level, point); backward twice that
    more (the <dO, v_tap> products and the value-gradient contributions)."""
    S = sum(a * b for a, b in msda_shapes(h, w))
    one = 2 * B * S * MSDA["heads"] * MSDA["levels"] * MSDA["points"] * 4 * MSDA["head_dim"]
    return one if mode == "fwd" else 3 * one


#: the segmentation loss at a stage-1 (stride-4) map h x w: ADE20K's 150 classes, logits at stride 8
#: (the LRHead's output), labels at the image size, 5% of the pixels unlabelled (255)
LOSS = dict(classes=150, ignored=0.05)


def _loss_sizes(h: int, w: int):
    return (h + 1) // 2, (w + 1) // 2, 4 * h, 4 * w


def _loss(s, h, w):
    lh, lw, H, W = _loss_sizes(h, w)
    K_ = LOSS["classes"]

    def inputs(cfg, B, dt, grad, i):
        g = _gen(cfg, i)
        labels = torch.randint(0, K_, (B, H, W), device=cfg.device, generator=g)
        labels[torch.rand(B, H, W, device=cfg.device, generator=g) < LOSS["ignored"]] = 255
        return (_randn((B, K_, lh, lw), cfg, dt, grad, g), labels)
    return K.upsampled_cross_entropy_reference, K.upsampled_cross_entropy, inputs


def _loss_bytes(B, h, w, s, esize, mode):
    """fwd: read the logits (B K h/2 w/2) and the int64 labels (B 4h 4w) + write the loss; bwd: read the
    logits and labels again + write d_logits (the per-pixel log-sum-exp the fused op keeps is not
    compulsory: a pass over the classes could recompute it)."""
    lh, lw, H, W = _loss_sizes(h, w)
    logits, labels = B * LOSS["classes"] * lh * lw * esize, B * H * W * 8
    fwd = logits + labels + 4
    return fwd if mode == "fwd" else fwd + 2 * logits + labels


def _irb(s, h, w):
    C = S_DIMS[s - 1]
    HD = int(C * S_MLP_RATIOS[s - 1])
    has_scale = S_LAYER_SCALE[s - 1] is not None

    def inputs(cfg, B, dt, grad, i):
        g = _gen(cfg, i)
        r = lambda *shape, dtype=dt: _randn(shape, cfg, dtype, grad, g)  # noqa: E731
        keep = (torch.rand(B, device=cfg.device, generator=g) > 0.1).float() / 0.9 if grad else None
        return (_randn((B, h, w, C), cfg, dt, grad, g), r(HD, C), r(HD), r(HD, 1, 3, 3), r(HD), r(C, HD), r(C),
                r(C, dtype=torch.float32) if has_scale else None, keep, r(C), r(C))
    return K.irb_reference, K.irb, inputs


def _irb_bytes(B, h, w, s, esize, mode):
    """fwd: read x (B H W C), the weights (2 C HD + 11 HD + 3 C), the layer scale (C fp32, stages 3-4) and the
    drop-path factor (B fp32, fwd+bwd only), write the block output; bwd: read dOut and x, write dx and the
    weight gradients.  The hidden map (HD = ratio x C wide) is not compulsory."""
    C = S_DIMS[s - 1]
    HD = int(C * S_MLP_RATIOS[s - 1])
    hw_, wts = B * h * w * C, 2 * C * HD + 11 * HD + 3 * C
    scale = 4 * C if S_LAYER_SCALE[s - 1] is not None else 0
    fwd = (2 * hw_ + wts) * esize + scale + (4 * B if mode != "fwd" else 0)
    return fwd if mode == "fwd" else fwd + (3 * hw_ + wts) * esize + scale


def _irb_flops(B, h, w, s, mode):
    """fc1 and fc2 (2 M C HD each) and the depthwise conv (2 * 9 M HD); the backward twice that."""
    C = S_DIMS[s - 1]
    HD = int(C * S_MLP_RATIOS[s - 1])
    M = B * h * w
    one = 4 * M * C * HD + 18 * M * HD
    return one if mode == "fwd" else 3 * one


OPS: Dict[str, OpEntry] = {e.name: e for e in (
    OpEntry("pyramid_pool", lambda s: S_DIMS[s - 1], _pyramid_pool, _pyramid_pool_bytes),
    OpEntry("lowres_attention", lambda s: S_DIMS[s - 1], _lowres_attention, _lowres_attention_bytes,
            _lowres_attention_flops),
    OpEntry("upsample_residual", lambda s: S_DIMS[s - 1], _upsample_residual, _upsample_residual_bytes),
    OpEntry("dwconv_cpe", _dwconv_channels(False), _dwconv(False), _dwconv_bytes(False)),
    OpEntry("dwconv_irb", _dwconv_channels(True), _dwconv(True), _dwconv_bytes(True)),
    OpEntry("dwconv_pyramid_pool", lambda s: S_DIMS[s - 1], _dwconv_pool, _dwconv_pool_bytes),
    OpEntry("irb", lambda s: S_DIMS[s - 1], _irb, _irb_bytes, _irb_flops),
    OpEntry("hrca_attention", lambda s: HRCA["C"], _hrca, _hrca_bytes, _hrca_flops, cuda_stage1_only=True,
            shape_note=lambda h, w: "_Nq{}_K{}_ws{}".format(HRCA["nq"], hrca_dims(h, w)[1], HRCA["window"])),
    OpEntry("faseg_hrca_branch", lambda s: HRCA_BRANCH["C"], _hrca_branch, _hrca_branch_bytes, _hrca_branch_flops,
            cuda_stage1_only=True, shape_note=lambda h, w: "_res2x{}_Nq{}_K{}_ws{}".format(
                HRCA_BRANCH["cin"], HRCA_BRANCH["nq"], hrca_branch_windows(h, w)[1], HRCA_BRANCH["window"])),
    OpEntry("ms_deform_attn", lambda s: MSDA["heads"] * MSDA["head_dim"], _msda, _msda_bytes, _msda_flops,
            cuda_stage1_only=True, shape_note=lambda h, w: "_levels{}_M{}_P{}".format(
                "+".join(f"{a}x{b}" for a, b in msda_shapes(h, w)), MSDA["heads"], MSDA["points"])),
    OpEntry("upsampled_cross_entropy", lambda s: LOSS["classes"], _loss, _loss_bytes, cuda_stage1_only=True,
            shape_note=lambda h, w: "_logits{}x{}_labels{}x{}".format(*_loss_sizes(h, w))),
)}
