"""The compile gate: every kernel launch the ops' dispatch makes for the models' shapes, compiled ahead of
time for sm_90 and sm_80 (no GPU needed: ``triton.compile`` + the cubin's resource usage), must compile,
fit the target's shared memory and use no local memory / stack (no register spill).

The launches are recorded (:mod:`launch_recorder`) by calling each op's launchers on ``meta`` tensors with
the GPU tile configurations: the encoder stages and the LRHead of LRFormer-T/S/L at 512 and 1024 (batch 8),
the query decoders' deformable attention and windowed cross-attention, the segmentation loss, fp32/bf16/fp16, forward and
backward, every mode (atomic and deterministic, GELU and residual, with the log-sum-exp gradient, int64
offsets).  CI runs a quick subset (LRFormer-T and -S at 512); ``LRFORMER_COMPILE_FULL=1`` runs all of it.
"""
import importlib
import os

import pytest
import torch

pytest.importorskip("triton")
from gpu_compile import SHARED_LIMIT, compile_reports, ptxas_path  # noqa: E402
from launch_recorder import Recorder  # noqa: E402

import lrformer_kernels._common as common  # noqa: E402
from benchmarks import registry as R  # noqa: E402
from lrformer.factory import VARIANTS, create_encoder  # noqa: E402

#: 32-bit registers of one SM (sm_80, sm_90): one block's registers x threads must fit
REGISTER_FILE = 65536
pytestmark = pytest.mark.skipif(not os.path.exists(ptxas_path()), reason="the Triton wheel has no ptxas")
FULL = os.environ.get("LRFORMER_COMPILE_FULL", "0") not in ("", "0")
M = {n: importlib.import_module(f"lrformer_kernels.{n}") for n in
     ("pyramid_pool", "lowres_attention", "upsample_residual", "dwconv", "hrca", "ms_deform_attn",
      "upsampled_cross_entropy", "irb", "dwconv_pyramid_pool")}


def meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _lrsa_stage(B, h, w, C, heads, q_size, kv_sizes, hidden, dt, scale_on, pooled_convs):
    """All launches of one block: CPE (with norm1 and the pooling in an encoder block), pyramid pooling, pooled-map
    convs, attention, upsample, IRB."""
    pp, la, ur, dw = M["pyramid_pool"], M["lowres_attention"], M["upsample_residual"], M["dwconv"]
    x = meta(B, h, w, C, dtype=dt)
    grids = pp.lrsa_grids(h, w, q_size, kv_sizes)
    pairs = [tuple(g) for g in grids]
    pooled = pp._forward_triton(x, pairs)
    pp._backward_triton(pooled, pairs, h, w)
    if pooled_convs:                     # an encoder block: norm1 (LayerNorm) inside the pooling
        mean, rstd = pp._stats_triton(x, 1e-6)
        ln_w = meta(C, dtype=dt)
        pp._forward_triton(x, pairs, (mean, rstd, ln_w, ln_w))
        pp._ln_backward_triton(pooled, x, mean, rstd, ln_w, pairs)
    wc, bc = meta(C, 1, 3, 3, dtype=dt), meta(C, dtype=dt)
    if pooled_convs:                     # an encoder block's CPE, norm1 and pooling as one op
        dpp = M["dwconv_pyramid_pool"]
        y, pooled, mean, rstd = dpp._forward_triton(x, wc, bc, pairs, ln_w, ln_w, 1e-6)
        dpp._backward_triton(y, pooled, x, y, mean, rstd, wc, bc, ln_w, pairs)
    for gelu, xx, w_, b_ in ((False, x, wc, bc), (True, meta(B, h, w, hidden, dtype=dt), meta(hidden, 1, 3, 3, dtype=dt),
                                                  meta(hidden, dtype=dt))):
        dw._forward_triton(xx, w_, b_, gelu, True)
        dw._backward_triton(xx, xx, w_, b_, gelu, True)
    if pooled_convs:
        for gh, gw in pairs[1:]:
            m = meta(B, gh, gw, C, dtype=dt)
            dw._forward_triton(m, wc, bc, False, True)
            dw._backward_triton(m, m, wc, bc, False, True)
    irb = M["irb"]                       # the IRB branch: LayerNorm'd (encoder) or BatchNorm'd (head) input
    w1, b1, wd, bd = meta(hidden, C, dtype=dt), meta(hidden, dtype=dt), meta(hidden, 1, 3, 3, dtype=dt), meta(hidden, dtype=dt)
    w2, b2 = meta(C, hidden, dtype=dt), meta(C, dtype=dt)
    ls = meta(C, dtype=torch.float32) if scale_on else None
    for ln in ((meta(C, dtype=dt), meta(C, dtype=dt)), (None, None)):
        for keep in (None, meta(B, dtype=torch.float32)):
            irb._forward_triton(x, w1, b1, wd, bd, w2, b2, ls, keep, *ln, 1e-6, None if ln[0] is not None else x, dt)
    dv, u = meta(B * h * w, C, dtype=dt), meta(B, h, w, hidden, dtype=dt)
    # the weight gradients in the parameters' dtype: the maps' or, under autocast, fp32 parameters'
    pdts = (dt,) if dt in (torch.float32, torch.float64) else (dt, torch.float32)
    for s in (None, meta(B, C, dtype=torch.float32 if dt != torch.float64 else dt)):   # layer scale x drop path
        irb._dgrad_triton(dv, u, w2, wd, s)
        for pdt in pdts:                 # fc2's: the layer scale and its gradient (row dots with w2) too
            irb._fc2_weight_grad_triton(dv, u, wd, bd, s, ls, meta(C, hidden, dtype=pdt) if scale_on else None, pdt)
    stat = meta(B, h, w, dtype=torch.float32 if dt != torch.float64 else dt)
    for ln in ((meta(C, dtype=dt), meta(C, dtype=dt)), (None, None)):
        for keep in (None, meta(B, dtype=torch.float32)):    # the models' backward: weight gradients in the dgrad pass
            for pdt in pdts:
                irb._hidden_grads_triton(dv, u, x, stat, stat, meta(C, hidden, dtype=pdt), wd, bd, b2, keep, ls, *ln,
                                         scale_on, pdt)
        du = meta(B * h * w, hidden, dtype=dt)
        for pdt in pdts:
            irb._fc1_weight_grad_triton(du, x, stat, stat, *ln, pdt)
        if C <= irb.DX_MAX_C:            # wider maps take torch.mm and ATen's LayerNorm backward
            for dy in (x, None):
                irb._input_grad_triton(du, w1, x, stat, stat, ln[0], dy)
    nq = pairs[0][0] * pairs[0][1]
    mk = sum(a * b for a, b in pairs[1:])
    q, kv = meta(B, nq, C, dtype=dt), meta(B, mk, 2 * C, dtype=dt)
    k, v = kv[..., :C], kv[..., C:]
    out, lse, row_max, row_sum = la._forward_triton(q, k, v, heads, (C // heads) ** -0.5)
    for dlse in (None, lse):
        la._backward_triton(out, q, k, v, row_max, row_sum, dlse, heads, (C // heads) ** -0.5)
    low = meta(B, pairs[0][0], pairs[0][1], C, dtype=dt)
    scale = meta(C, dtype=torch.float32) if scale_on else None
    for keep in (None, meta(B, dtype=torch.float32)):
        ur._forward_triton(x, low, scale, keep, x)
        ur._backward_triton(x, low, scale, keep, True, scale is not None)


def _record_model(variant, image, dt, B=8):
    with torch.device("meta"):
        enc = create_encoder(variant)
    for s in range(1, 5):
        h, w = R.stage_map_size(image, image, s)
        has_ls = getattr(enc, f"block{s}")[0].layer_scale_1 is not None
        C = enc.embed_dims[s - 1]
        _lrsa_stage(B, h, w, C, enc.num_heads[s - 1], 16, None, int(C * enc.mlp_ratios[s - 1]), dt, has_ls, True)
    ch = VARIANTS[variant]["head_channels"]
    if ch:
        h, w = R.stage_map_size(image, image, 2)
        _lrsa_stage(B, h, w, ch, 8, 32, (22, 16, 12, 8), 4 * ch, dt, True, False)


def _record_decoders(image, dt, B=8):
    msda, hrca = M["ms_deform_attn"], M["hrca"]
    h4, w4 = R.stage_map_size(image, image, 1)
    shapes = R.msda_shapes(h4, w4)
    S = sum(a * b for a, b in shapes)
    v, loc, wgt = meta(B, S, 8, 32, dtype=dt), meta(B, S, 8, 3, 4, 2, dtype=dt), meta(B, S, 8, 3, 4, dtype=dt)
    out = msda._forward_triton(v, shapes, loc, wgt)
    for det in (False, True):
        msda._backward_triton(out, v, shapes, loc, wgt, det)
    nq, C, ws = 100, 256, 8
    _, kk, _ = R.hrca_dims(h4, w4)
    q, kmap = meta(B, nq, C, dtype=dt), meta(B, h4, w4, 2 * C, dtype=dt)
    win = meta(B, nq, kk, dtype=torch.int64)
    o, _, row_max, row_sum = hrca._forward_triton(q, kmap[..., :C], kmap[..., C:], win, ws, 8, C ** -0.5 * 8 ** 0.5)
    for det in (False, True):
        hrca._backward_triton(o, q, kmap[..., :C], kmap[..., C:], win, o, row_max, row_sum, None, ws, 8, 0.177, det)


def _record_loss(image, dt, B=8, classes=150):
    """The segmentor's loss: stride-8 logits (NCHW and channels-last) against int64 labels at the image size."""
    uce = M["upsampled_cross_entropy"]
    h, w = R.stage_map_size(image, image, 2)
    labels = meta(B, image, image, dtype=torch.int64)
    for logits in (meta(B, classes, h, w, dtype=dt), meta(B, h, w, classes, dtype=dt).permute(0, 3, 1, 2)):
        _, lse, n = uce._forward_triton(logits, labels, 255)
        uce._backward_triton(meta(dtype=torch.float32), logits, labels, lse, n, 255)


def _specs(monkeypatch, variants, images, dtypes):
    with Recorder(monkeypatch) as rec:
        for dt in dtypes:
            for image in images:
                for v in variants:
                    _record_model(v, image, dt)
                _record_decoders(image, dt)
                _record_loss(image, dt)
        # the int64 offset path (decided from the sizes): every op once more with it forced on
        for mod in M.values():
            if hasattr(mod, "needs_int64"):          # (an op composed of other ops' launchers has none)
                monkeypatch.setattr(mod, "needs_int64", lambda *t: True)
        for dt in dtypes:
            _record_model(variants[0], images[0], dt)
            _record_decoders(images[0], dt)
            _record_loss(images[0], dt)
    return rec.specs


def test_every_dispatched_kernel_compiles_without_spills(monkeypatch):
    variants, images = (("t", "s", "l"), (512, 1024)) if FULL else (("t", "s"), (512,))
    specs = _specs(monkeypatch, variants, images, (torch.float32, torch.bfloat16, torch.float16))
    kernels = {s["kernel"] for s in specs}
    assert len(kernels) == 25, sorted(kernels)      # every kernel of the ops is launched
    reports = compile_reports([dict(s, cc=cc) for s in specs for cc in (90, 80)])
    # a block's registers must fit the SM's register file (64K on sm_80 / sm_90): maxnreg=255 lets ptxas give a
    # 16-warp kernel more than 128 registers a thread, which compiles but cannot launch
    bad = [(r["kernel"], r["cc"], r["signature"].get("X") or next(iter(r["signature"].values())), r["constexprs"],
            r["num_warps"], r["registers"], r["stack"], r["local"]) for r in reports
           if r["stack"] or r["local"] or r["shared"] > SHARED_LIMIT[r["cc"]]
           or r["registers"] * r["num_warps"] * 32 > REGISTER_FILE]
    print(f"{len(specs)} distinct launches, {len(reports)} compiles, {len(bad)} with spills, too much shared memory "
          f"or too many registers for one block")
    assert not bad, "\n".join(map(str, bad))
