"""Fused IRB branch (LayerNorm + fc1 + GELU + depthwise conv + fc2 + layer scale + drop path + residual): the
kernels vs the float64 reference, forward and backward."""
import importlib

import pytest
import torch

import lrformer_kernels._common as common
from conftest import TOL, devices, dtypes_for, rel_err
from lrformer.factory import VARIANTS
from lrformer_kernels import irb, irb_reference

mod = importlib.import_module("lrformer_kernels.irb")
ENCODER_RATIOS = (8, 8, 4, 4)


def _make(B, H, W, C, HD, device, dtype, ln=True, scale=True, keep=True, shortcut=False, pdtype=None):
    pdtype = pdtype or dtype
    g = lambda *s, dt=pdtype: torch.randn(*s, device=device, dtype=dt)  # noqa: E731
    p = dict(w1=g(HD, C) / C ** 0.5, b1=g(HD), wc=g(HD, 1, 3, 3) / 3, bc=g(HD), w2=g(C, HD) / HD ** 0.5, b2=g(C),
             scale=g(C) if scale else None, norm_weight=1 + 0.1 * g(C) if ln else None,
             norm_bias=g(C) if ln else None)
    keep_t = None
    if keep:  # a dropped sample (0) among kept ones (1 / keep_prob)
        keep_t = torch.full((B,), 1 / 0.8, device=device, dtype=pdtype)
        keep_t[B // 2] = 0.0
    x = 2 + 3 * g(B, H, W, C, dt=dtype)        # a non-zero mean: the LayerNorm's two-pass statistics
    sc = g(B, H, W, C, dt=dtype) if shortcut else None
    return x, p, keep_t, sc


def _check(B, H, W, C, HD, device, dtype, **kw):
    x, p, keep, sc = _make(B, H, W, C, HD, device, dtype, **kw)
    leaves = {"x": x, **{k: v for k, v in p.items() if v is not None}}
    if sc is not None:
        leaves["shortcut"] = sc
    for t in leaves.values():
        t.requires_grad_(True)
    out = irb(x, p["w1"], p["b1"], p["wc"], p["bc"], p["w2"], p["b2"], p["scale"], keep, p["norm_weight"],
              p["norm_bias"], 1e-6, sc)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    gy = torch.randn_like(out)
    got = torch.autograd.grad(out, list(leaves.values()), gy)
    r = {k: v.detach().double().requires_grad_(True) for k, v in leaves.items()}
    ref = irb_reference(r["x"], r["w1"], r["b1"], r["wc"], r["bc"], r["w2"], r["b2"], r.get("scale"),
                        None if keep is None else keep.double(), r.get("norm_weight"), r.get("norm_bias"), 1e-6,
                        r.get("shortcut"))
    want = torch.autograd.grad(ref, list(r.values()), gy.double())
    tol = TOL[dtype]
    assert rel_err(out, ref) < tol, ("out", rel_err(out, ref))
    for name, a, b in zip(leaves, got, want):
        assert a.dtype == leaves[name].dtype and a.shape == leaves[name].shape, name
        assert rel_err(a, b) < (tol if name != "scale" else 10 * tol), (name, rel_err(a, b))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(1, 5, 7), (3, 4, 3), (2, 1, 1), (1, 9, 2)], ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_shapes(device, shape):
    """Odd / non-square maps, a single pixel, batch 1 and 3; drop path + layer scale on."""
    for dtype in dtypes_for(device):
        _check(*shape, 24, 96, device, dtype)


@pytest.mark.parametrize("device", devices())
def test_every_stage_width_and_ratio(device):
    """Every encoder stage width of T/S/B/L with its hidden ratio, and every LRHead width (ratio 4, a
    BatchNorm'd input: no LayerNorm inside, the shortcut given), on a 2x3x2 map."""
    dtype = dtypes_for(device)[0]
    widths = {(c, c * r) for v in ("t", "s", "b", "l") for c, r in zip(VARIANTS[v]["embed_dims"], ENCODER_RATIOS)}
    for C, HD in sorted(widths):
        _check(2, 3, 2, C, HD, device, dtype, scale=C >= 240)
    for C in sorted({VARIANTS[v]["head_channels"] for v in ("t", "s", "b", "l")}):
        _check(1, 2, 3, C, 4 * C, device, dtype, ln=False, shortcut=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("ln,scale,keep,shortcut", [(True, False, False, False), (False, True, False, True),
                                                    (True, True, False, False), (False, False, True, False)])
def test_options(device, ln, scale, keep, shortcut):
    for dtype in dtypes_for(device):
        _check(2, 6, 5, 20, 40, device, dtype, ln=ln, scale=scale, keep=keep, shortcut=shortcut)


@pytest.mark.parametrize("device", devices())
def test_gpu_tiles_and_int64(device, monkeypatch):
    """The CUDA dispatch's tiles (several row, hidden and output tiles, partial ones) and the int64 path."""
    monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    for dtype in dtypes_for(device):
        _check(1, 9, 11, 80, 160, device, dtype)
        monkeypatch.setattr(mod, "needs_int64", lambda *t: True)
        _check(2, 3, 5, 24, 48, device, dtype, ln=False, shortcut=True)
        monkeypatch.setattr(mod, "needs_int64", common.needs_int64)


def test_fp16_twin_and_autocast_dtypes():
    """The half-precision path (bf16's fp16 twin: the interpreter's bf16 dot is wrong): fp16 maps with fp32
    parameters; and fp32 maps with fp16 GEMM operands (what autocast asks for), against float64."""
    _check(2, 5, 4, 16, 64, "cpu", torch.float16, pdtype=torch.float32)
    x, p, keep, _ = _make(1, 4, 5, 16, 32, "cpu", torch.float32)
    args = (x, p["w1"], p["b1"], p["wc"], p["bc"], p["w2"], p["b2"], p["scale"], keep, p["norm_weight"], p["norm_bias"])
    with torch.autocast("cpu", dtype=torch.float16):
        assert mod._hidden_dtype(x) == torch.float16
        out = irb(*args)
    ref = irb_reference(*(a.double() if a is not None else None for a in args))
    assert out.dtype == torch.float32 and rel_err(out, ref) < TOL[torch.float16]


def test_float32_keep_and_scale_with_float64_maps():
    """The model's drop-path factor is float32 whatever the map's dtype (DropPath.keep); a layer scale may be too."""
    x, p, keep, _ = _make(3, 4, 5, 16, 32, "cpu", torch.float64)
    scale = p["scale"].float().requires_grad_(True)
    args = (p["w1"], p["b1"], p["wc"], p["bc"], p["w2"], p["b2"])
    out = irb(x, *args, scale, keep.float(), p["norm_weight"], p["norm_bias"])
    (ds,) = torch.autograd.grad(out.sum(), scale)
    sr = scale.detach().double().requires_grad_(True)
    ref = irb_reference(x, *args, sr, keep, p["norm_weight"], p["norm_bias"])
    (dsr,) = torch.autograd.grad(ref.sum(), sr)
    assert ds.dtype == torch.float32 and rel_err(out, ref) < 1e-6 and rel_err(ds, dsr) < 1e-5


def test_reference_fallback_path(monkeypatch):
    monkeypatch.setattr(mod, "use_kernel", lambda *t: False)
    for dtype in (torch.float64, torch.float32):
        _check(2, 5, 3, 16, 48, "cpu", dtype)
        _check(1, 3, 4, 16, 32, "cpu", dtype, ln=False, shortcut=True)


def test_gradcheck_and_opcheck():
    x, p, keep, _ = _make(1, 3, 2, 4, 8, "cpu", torch.float64)
    ps = [p[k].requires_grad_(True) for k in ("w1", "b1", "wc", "bc", "w2", "b2", "scale", "norm_weight", "norm_bias")]
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *a: irb(a[0], *a[1:7], a[7], keep, a[8], a[9]), (x, *ps), eps=1e-6,
                                    atol=1e-6, fast_mode=True)
    args = (x, *ps[:7], keep, ps[7], ps[8], 1e-6, None, torch.float64)
    torch.library.opcheck(torch.ops.lrformer.irb, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("splits", ["one", "several"])
@pytest.mark.parametrize("scaled", [False, True])
def test_fc2_weight_grad_op(monkeypatch, scaled, splits):
    """fc2's weight and bias gradients with dv = dy * s[b, c] formed as dy is loaded and the input recomputed from
    u, alone, with the layer scale applied to the finished gradient and the layer scale's own gradient (checked
    against sum(dv * v), v = a w2^T + b2 the fc2 output the kernels never form): one split (the programs write
    the gradient in its dtype) and several (the GPU config with an H100's SM count; splits straddling samples;
    fp32 partials summed in a fixed order by the sum kernel), float64 against dv^T [a | 1]; outputs poisoned;
    opcheck."""
    monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    monkeypatch.setattr(common, "DEFAULT_SMS", 132)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    monkeypatch.setattr(common, "PARTIAL_TRAFFIC_SHARE", 0.0 if splits == "one" else 1e9)
    B, H, W, C, HD = 3, 9, 13, 40, 80
    f64 = dict(dtype=torch.float64)
    dy = torch.randn(B * H * W, C, **f64)
    s = torch.randn(B, C, **f64) if scaled else None
    u = torch.randn(B, H, W, HD, **f64)
    wc, bc = torch.randn(HD, 1, 3, 3, **f64), torch.randn(HD, **f64)
    scale, b2, w2 = torch.randn(C, **f64), torch.randn(C, **f64), torch.randn(C, HD, **f64)
    assert (mod._split_m_config("dw2", dy.shape[0], C, HD, u.device)[5] == 1) == (splits == "one")
    a = mod.dwconv3x3_reference(u, wc, bc, gelu=True, residual=True).reshape(-1, HD)
    dv = dy if s is None else (dy.reshape(B, -1, C) * s[:, None]).reshape(-1, C)
    G, g = dv.t() @ a, dv.sum(0)
    dw2, db2, ds = mod.irb_fc2_weight_grad(dy, u, wc, bc, s, None, None, None, torch.float64)
    assert rel_err(dw2, G) < 1e-12 and rel_err(db2, g) < 1e-12 and ds.numel() == 0
    dw2, db2, ds = mod.irb_fc2_weight_grad(dy, u, wc, bc, s, scale, w2, b2, torch.float64)
    assert rel_err(dw2, G * scale[:, None]) < 1e-12 and rel_err(db2, g * scale) < 1e-12
    assert rel_err(ds, (dv * (a @ w2.t() + b2)).sum(0)) < 1e-12
    dw2, _, ds = mod.irb_fc2_weight_grad(dy, u, wc, bc, s, scale, None, None, torch.float32)
    assert dw2.dtype == torch.float32 and rel_err(dw2, G * scale[:, None]) < 1e-6 and ds.numel() == 0
    for args in ((dy, u, wc, bc, s, scale, w2, b2, torch.float64), (dy, u, wc, bc, s, None, None, None, torch.float32)):
        torch.library.opcheck(torch.ops.lrformer.irb_fc2_weight_grad, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("sms", [1, 132])
def test_dgrad_op(monkeypatch, sms):
    """The backward from d(fc2 output) = dy * s[b, c] to d(fc1 output) and the depthwise conv's gradients, dv and
    da never stored, alone on the GPU tiles: maps of several regions (their one-pixel halos crossing tile borders), maps narrower and
    shorter than a region, a single pixel, C wider than a GEMM depth tile, programs walking several tiles
    (1 SM) and several splits (an H100's 132); float64 against the reference's autograd; outputs poisoned."""
    monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    monkeypatch.setattr(common, "DEFAULT_SMS", sms)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    for B, H, W, C, HD in ((2, 13, 19, 40, 48), (1, 20, 37, 16, 32), (3, 4, 3, 8, 16), (2, 1, 1, 16, 32)):
        dy, u = torch.randn(B * H * W, C, dtype=torch.float64), torch.randn(B, H, W, HD, dtype=torch.float64)
        s = torch.randn(B, C, dtype=torch.float64)                 # layer scale x drop-path factor
        dv = (dy.reshape(B, -1, C) * s[:, None]).reshape(-1, C)
        w2, bc = torch.randn(C, HD, dtype=torch.float64), torch.randn(HD, dtype=torch.float64)
        wc = torch.randn(HD, 1, 3, 3, dtype=torch.float64, requires_grad=True)
        cfg = mod._dgrad_config(B, H, W, C, HD, u.device)
        if (B, H) == (2, 13):
            assert cfg[7] > 1 if sms == 1 else cfg[8] > 1, cfg       # iters / splits
        ur, bcr = u.clone().requires_grad_(True), bc.clone().requires_grad_(True)
        a = mod.dwconv3x3_reference(ur, wc, bcr, gelu=True, residual=True)
        want = torch.autograd.grad(a, (ur, wc, bcr), (dv @ w2).reshape(u.shape))
        got = mod.irb_dgrad(dy, u, w2, wc.detach(), bc, s)
        for name, g, r in zip(("du", "dwc", "dbc"), got, want):
            assert g.shape == r.shape and rel_err(g, r) < 1e-12, (name, (B, H, W, C, HD), rel_err(g, r))
    for s in (s, None):
        torch.library.opcheck(torch.ops.lrformer.irb_dgrad, (dy, u, w2, wc.detach(), bc, s),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("splits", ["one", "several"])
def test_hidden_grads_op(monkeypatch, splits):
    """The dgrad pass with fc1's and fc2's weight gradients (the models' backward): du, the depthwise
    conv's, fc2's (the layer scale applied, its own gradient) and fc1's gradients (the normalised input recomputed)
    from one pass, alone on the GPU tiles: 8x8 own tiles whose halos cross tile borders, C wider than a channel
    chunk and not a multiple of it, maps narrower and shorter than a tile, one split and several (the partials
    updated in place over a program's tiles, summed in a fixed order); with and without the LayerNorm, drop path and
    layer scale; float64 against autograd through the branch's math with u an input; fp32 gradients; poisoned
    outputs; opcheck."""
    monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    monkeypatch.setattr(common, "DEFAULT_SMS", 132)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    monkeypatch.setattr(common, "PARTIAL_TRAFFIC_SHARE", 0.0 if splits == "one" else 1e9)
    F = torch.nn.functional
    f64 = dict(dtype=torch.float64)
    for (B, H, W, C, HD), ln, scaled, dropped in (((2, 13, 11, 40, 48), True, True, True),
                                                  ((3, 4, 3, 24, 16), False, False, True),
                                                  ((1, 9, 20, 16, 32), True, False, False)):
        x = 2 + 3 * torch.randn(B, H, W, C, **f64)
        var, mean = torch.var_mean(x, dim=-1, unbiased=False)
        rstd = torch.rsqrt(var + 1e-6)
        nw, nb = (1 + 0.1 * torch.randn(C, **f64), torch.randn(C, **f64)) if ln else (None, None)
        keep = torch.tensor([1.25, 0.0, 1.25][:B], **f64) if dropped else None
        lv = {k: torch.randn(*sh, **f64, requires_grad=True) for k, sh in
              (("u", (B, H, W, HD)), ("wc", (HD, 1, 3, 3)), ("bc", (HD,)), ("w2", (C, HD)), ("b2", (C,)), ("scale", (C,)))}
        dy = torch.randn(B * H * W, C, **f64)
        v = F.linear(mod.dwconv3x3_reference(lv["u"], lv["wc"], lv["bc"], gelu=True, residual=True), lv["w2"], lv["b2"])
        s = (lv["scale"] if scaled else 1) * (keep[:, None, None, None] if dropped else 1)
        want = dict(zip(lv, torch.autograd.grad((v * s).reshape(-1, C), list(lv.values()), dy, allow_unused=True)))
        xn = F.layer_norm(x, (C,), nw, nb, 1e-6) if ln else x
        du = want["u"].reshape(-1, HD)
        want.update(w1=du.t() @ xn.reshape(-1, C), b1=du.sum(0))
        cfg = mod._dgrad_config(B, H, W, C, HD, x.device, True)
        assert cfg[:2] == (min(8, H), min(8, W)) and (cfg[8] == 1) == (splits == "one"), cfg      # own tiles
        p = {k: t.detach() for k, t in lv.items()}
        args = (dy, p["u"], x, mean, rstd, p["w2"], p["wc"], p["bc"], p["b2"], keep, p["scale"] if scaled else None,
                nw, nb, scaled)
        got = mod.irb_hidden_grads(*args, torch.float64)
        for name, g in zip(("u", "wc", "bc", "w1", "b1", "w2", "b2", "scale"), got):
            if name == "scale" and not scaled:
                assert g.numel() == 0
                continue
            r = want[name]
            assert g.shape == r.shape and rel_err(g, r) < 1e-12, (name, (B, H, W, C, HD), rel_err(g, r))
        dw1, dw2 = mod.irb_hidden_grads(*args, torch.float32)[3:6:2]
        assert dw1.dtype == dw2.dtype == torch.float32
        assert rel_err(dw1, want["w1"]) < 1e-6 and rel_err(dw2, want["w2"]) < 1e-6
        torch.library.opcheck(torch.ops.lrformer.irb_hidden_grads, args + (torch.float64,),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("sms", [1, 132])
def test_input_grad_op(monkeypatch, sms):
    """dx = LayerNorm backward(du w1) + dy in one kernel, dxn never stored, alone on the GPU tiles: programs walking
    several row tiles (1 SM, one program) and one each (an H100's 132), a partial last tile, with and without the
    LayerNorm and dy, 16 x 512 row tiles (dy added after the tile is stored), a map wider than the kernel takes (the
    reference path); float64 against autograd through
    F.layer_norm; outputs poisoned; opcheck."""
    monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    monkeypatch.setattr(common, "DEFAULT_SMS", sms)
    monkeypatch.setattr(mod, "PROGRAMS_PER_SM", 1 if sms == 1 else mod.PROGRAMS_PER_SM)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    F = torch.nn.functional
    for (B, H, W, C, HD), ln, add in (((2, 9, 13, 80, 48), True, True), ((1, 7, 5, 24, 96), True, False),
                                      ((3, 4, 3, 40, 16), False, True), ((1, 3, 3, 16, 32), False, False),
                                      ((1, 5, 7, 300, 32), True, True)):    # rows wider than a tile: dy added after
        x = (2 + 3 * torch.randn(B, H, W, C, dtype=torch.float64)).requires_grad_(True)
        du = torch.randn(B * H * W, HD, dtype=torch.float64)
        w1 = torch.randn(HD, C, dtype=torch.float64)
        dy = torch.randn(B, H, W, C, dtype=torch.float64) if add else None
        nw = (1 + 0.1 * torch.randn(C, dtype=torch.float64)).requires_grad_(True) if ln else None
        nb = torch.randn(C, dtype=torch.float64, requires_grad=True) if ln else None
        var, mean = torch.var_mean(x.detach(), dim=-1, unbiased=False)
        rstd = torch.rsqrt(var + 1e-6)
        cfg = mod._dx_config(B * H * W, C, HD, x.device)
        assert cfg[6] == (C == 300)                                           # the wide row tiles
        if sms == 1 and C == 80:
            assert cfg[4] > 1                                                 # several row tiles per program
        xn = F.layer_norm(x, (C,), nw, nb, 1e-6) if ln else x
        want = torch.autograd.grad(xn, [x] + ([nw, nb] if ln else []), (du @ w1).reshape(x.shape))
        dx, dnw, dnb = mod.irb_input_grad(du, w1, x.detach(), mean, rstd, nw, dy)
        assert rel_err(dx, want[0] + (dy if add else 0)) < 1e-12, ((B, H, W, C), rel_err(dx, want[0]))
        if ln:
            assert rel_err(dnw, want[1]) < 1e-12 and rel_err(dnb, want[2]) < 1e-12
        else:
            assert dnw.numel() == dnb.numel() == 0
        monkeypatch.setattr(mod, "DX_MAX_C", C - 1)                          # too wide for the kernel
        got = mod.irb_input_grad(du, w1, x.detach(), mean, rstd, nw, dy)[0]
        monkeypatch.setattr(mod, "DX_MAX_C", 512)
        assert rel_err(got, dx) < 1e-12
        torch.library.opcheck(torch.ops.lrformer.irb_input_grad, (du, w1, x.detach(), mean, rstd, nw, dy),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("splits", ["one", "several"])
@pytest.mark.parametrize("ln", [True, False])
def test_fc1_weight_grad_op(monkeypatch, ln, splits):
    """fc1's weight and bias gradients with the normalised input recomputed from x and the row statistics, alone:
    several hidden, channel and pixel-split tiles, partial ones (the GPU config with an H100's SM count), one
    split (written in the gradient's dtype by the programs) and several (the sum kernel), float64 against
    du^T [xn | 1]; outputs poisoned; opcheck."""
    monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    monkeypatch.setattr(common, "DEFAULT_SMS", 132)
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)
    monkeypatch.setattr(common, "PARTIAL_TRAFFIC_SHARE", 0.0 if splits == "one" else 1e9)
    B, H, W, C, HD = 2, 9, 13, 80, 48
    x = 2 + 3 * torch.randn(B, H, W, C, dtype=torch.float64)
    du = torch.randn(B * H * W, HD, dtype=torch.float64)
    var, mean = torch.var_mean(x, dim=-1, unbiased=False)
    rstd = torch.rsqrt(var + 1e-6)
    nw, nb = (1 + 0.1 * torch.randn(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)) if ln else (None, None)
    assert (mod._split_m_config("dw1", B * H * W, HD, C, x.device)[5] == 1) == (splits == "one")
    xn = torch.nn.functional.layer_norm(x, (C,), nw, nb, 1e-6) if ln else x
    want = du.t() @ xn.reshape(-1, C)
    for dt in (torch.float64, torch.float32):
        dw1, db1 = mod.irb_fc1_weight_grad(du, x, mean, rstd, nw, nb, dt)
        assert dw1.dtype == dt and rel_err(dw1, want) < (1e-12 if dt == torch.float64 else 1e-6)
        assert rel_err(db1, du.sum(0)) < 1e-12
        torch.library.opcheck(torch.ops.lrformer.irb_fc1_weight_grad, (du, x, mean, rstd, nw, nb, dt),
                              test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs():
    x, p, keep, _ = _make(2, 3, 4, 8, 16, "cpu", torch.float32)
    a = (p["w1"], p["b1"], p["wc"], p["bc"], p["w2"], p["b2"])
    with pytest.raises(TypeError, match="x"):
        irb(x.numpy(), *a)
    with pytest.raises(ValueError, match="x"):
        irb(x[0], *a)
    with pytest.raises(ValueError, match="w1"):
        irb(x, p["w1"][:, :4], *a[1:])
    with pytest.raises(ValueError, match="wc"):
        irb(x, a[0], a[1], p["wc"][:8], *a[3:])
    with pytest.raises(ValueError, match="w2"):
        irb(x, *a[:4], p["w2"].t(), a[5])
    with pytest.raises(ValueError, match="b2"):
        irb(x, *a[:5], torch.zeros(3))
    with pytest.raises(ValueError, match="scale"):
        irb(x, *a, scale=torch.ones(3))
    with pytest.raises(ValueError, match="keep"):
        irb(x, *a, keep=torch.ones(5))
    with pytest.raises(ValueError, match="together"):
        irb(x, *a, norm_weight=torch.ones(8))
    with pytest.raises(ValueError, match="eps"):
        irb(x, *a, norm_weight=torch.ones(8), norm_bias=torch.zeros(8), eps=0.0)
    with pytest.raises(ValueError, match="shortcut"):
        irb(x, *a, shortcut=x[:1])
    with pytest.raises(TypeError, match="w1"):
        irb(x, p["w1"].double(), *a[1:])
    with pytest.raises(TypeError, match="x"):
        irb(x.long(), *a)
