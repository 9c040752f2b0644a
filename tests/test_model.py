"""The reference LRFormer: shapes, checkpoints, golden outputs, params/FLOPs, export paths."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import lrformer
import lrformer_kernels as LF

from conftest import SHARED, SHARED_MISSING
KEYS_FILE = os.path.join(SHARED, "official_state_dict_keys.json")
GOLDEN_DIR = os.path.join(SHARED, "golden")
needs_shared = pytest.mark.skipif(not os.path.exists(KEYS_FILE), reason=SHARED_MISSING)


def official(name):
    with open(KEYS_FILE) as f:
        return json.load(f)[name]


def det_weights(name):
    sys.path.insert(0, GOLDEN_DIR)
    try:
        import detweights
    finally:
        sys.path.pop(0)
    return detweights, detweights.det_state_dict(official(name)["state_dict"])


def tiny(**kw):
    """A small segmentor for the slow paths (compile, export): same code, fewer/narrower blocks."""
    cfg = dict(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1), head_channels=32)
    cfg.update(kw)
    return lrformer.create_model("lrformer_t", num_classes=7, **cfg)


# ----------------------------------------------------------------------------------------- grids
@pytest.mark.parametrize("h,w,p,expect", [
    (128, 128, 16, (16, 16)), (128, 256, 16, (16, 32)), (256, 128, 16, (32, 16)),
    (16, 16, 11, (11, 11)), (2, 2, 16, (16, 16)), (25, 19, 16, (21, 16)), (19, 25, 4, (4, 5)),
    (64, 128, 32, (32, 64)), (13, 7, 8, (15, 8)),
])
def test_pool_grid_rule(h, w, p, expect):
    assert LF.pool_grid(h, w, p) == expect
    if w >= h:
        assert LF.pool_grid(h, w, p) == (p, round(w * p / h + 0.001))


def test_pyramid_sizes():
    assert LF.pyramid_sizes(16) == (11, 8, 6, 4)
    assert LF.pyramid_sizes(32) == (22, 16, 12, 8)


# ---------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name,size", [
    (n, s) for n in ("lrformer_t", "lrformer_s") for s in ((64, 64), (96, 224), (100, 75))
] + [(n, s) for n in ("lrformer_b", "lrformer_l") for s in ((64, 64), (100, 75))])
def test_segmentor_shapes(name, size):
    m = lrformer.create_model(name, num_classes=11).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        feats = m.backbone(x)
        logits = m(x)
    h, w = size
    for f, stride, c in zip(feats, (4, 8, 16, 32), m.backbone.embed_dims):
        expect = (math.ceil(h / stride), math.ceil(w / stride))
        assert f.shape == (1, c, *expect)
    assert logits.shape == (1, 11, math.ceil(h / 8), math.ceil(w / 8))
    assert torch.isfinite(logits).all()
    labels = m.predict(x)
    assert labels.shape == (1, h, w) and labels.dtype == torch.int64


def test_xl_encoder_and_batch():
    m = lrformer.create_model("lrformer_xl_encoder").eval()
    assert m.block3[7].pre_norm is not None and m.block3[15].pre_norm is not None
    assert m.block3[6].pre_norm is None and m.block2[0].pre_norm is None
    with torch.no_grad():
        feats = m(torch.randn(2, 3, 70, 45))
    assert [tuple(f.shape) for f in feats] == [(2, 128, 18, 12), (2, 256, 9, 6), (2, 640, 5, 3), (2, 768, 3, 2)]


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model"):
        lrformer.create_model("lrformer_q")
    with pytest.raises(ValueError, match="lrformer_xl_encoder"):
        lrformer.create_model("lrformer_xl")
    with pytest.raises(TypeError, match="unknown overrides"):
        lrformer.create_model("lrformer_t", depth=3)
    with pytest.raises(ValueError, match="images must be"):
        lrformer.create_model("lrformer_t_encoder")(torch.randn(3, 32, 32))


# ------------------------------------------------------------------------------------ checkpoints
@needs_shared
@pytest.mark.parametrize("name", ["lrformer_t", "lrformer_s", "lrformer_b", "lrformer_l", "lrformer_xl_backbone"])
def test_official_keys_load_strict(name):
    spec = official(name)
    model = lrformer.create_model("lrformer_xl_encoder" if name == "lrformer_xl_backbone" else name)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(s) for k, s in spec["state_dict"]}
    assert own == theirs
    state = {k: torch.randn(s) if s else torch.tensor(0) for k, s in spec["state_dict"]}
    missing, unexpected = lrformer.load_checkpoint(model, {"state_dict": state}, strict=True)
    assert not missing and not unexpected
    k0 = spec["state_dict"][0][0]
    assert torch.equal(model.state_dict()[k0], state[k0])
    assert sum(p.numel() for p in model.parameters()) == spec["params"]


@needs_shared
def test_checkpoint_file_variants(tmp_path):
    seg = lrformer.create_model("lrformer_t")
    state = {k: torch.randn(tuple(s)) if s else torch.tensor(0) for k, s in official("lrformer_t")["state_dict"]}
    path = tmp_path / "seg.pth"
    torch.save({"meta": {"x": 1}, "state_dict": state}, path)
    lrformer.load_checkpoint(seg, str(path))
    # encoder-only ImageNet file into a segmentor: encoder loads, head reported, not an error
    enc_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    seg2 = lrformer.create_model("lrformer_t")
    missing, _ = lrformer.load_checkpoint(seg2, enc_state)
    assert missing and all(k.startswith("decode_head.") for k in missing)
    assert torch.equal(seg2.backbone.block1[0].cpe.weight, state["backbone.block1.0.cpe.weight"])
    # segmentor file into an encoder
    enc = lrformer.create_model("lrformer_t_encoder")
    lrformer.load_checkpoint(enc, {"model": state})
    # a wrong file names the keys
    bad = dict(state)
    bad.pop("backbone.block1.0.cpe.bias")
    bad["backbone.extra.weight"] = torch.zeros(1)
    with pytest.raises(lrformer.CheckpointMismatch, match="block1.0.cpe.bias.*extra.weight"):
        lrformer.load_checkpoint(lrformer.create_model("lrformer_t"), bad)
    bad = dict(state)
    bad["backbone.block1.0.cpe.bias"] = torch.zeros(3)
    with pytest.raises(lrformer.CheckpointMismatch, match="shape"):
        lrformer.load_checkpoint(lrformer.create_model("lrformer_t"), bad)
    with pytest.raises(FileNotFoundError):
        lrformer.load_checkpoint(seg, str(tmp_path / "nope.pth"))


# ----------------------------------------------------------------------------------------- golden
@needs_shared
def test_golden_outputs_and_gradients():
    """The released code's outputs/gradients for LRFormer-S at 1x3x64x64 (fp32): ~1e-5 relative."""
    golden = torch.load(os.path.join(GOLDEN_DIR, "lrformer_s_1x3x64x64.pt"))["lrformer_s_1x3x64x64"]
    detweights, state = det_weights("lrformer_s")
    m = lrformer.create_model("lrformer_s")
    lrformer.load_checkpoint(m, state)
    m.eval()
    x = detweights.det_input(golden["input_shape"]).requires_grad_()
    feats = m.backbone(x)
    logits = m.decode_head(feats)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    for f, g in zip(feats, golden["features"]):
        assert f.shape == g.shape and rel(f, g) < 1e-5
    assert rel(logits, golden["logits"]) < 1e-5
    (logits * detweights.det_input(logits.shape, seed=99)).sum().backward()
    assert rel(x.grad, golden["grad_input"]) < 1e-5
    params = dict(m.named_parameters())
    for k, g in golden["grad_params"].items():
        # gradients pass through more fp32 reductions than the outputs: 2e-5
        assert rel(params[k].grad, g) < 2e-5, k


# ---------------------------------------------------- LRSA against a direct float64 computation
def _direct_pool(x, gh, gw):
    """Adaptive average pooling written from its definition (x: C, H, W)."""
    C, H, W = x.shape
    out = torch.empty(C, gh, gw, dtype=x.dtype)
    for i in range(gh):
        h0, h1 = (i * H) // gh, -((-(i + 1) * H) // gh)
        for j in range(gw):
            w0, w1 = (j * W) // gw, -((-(j + 1) * W) // gw)
            out[:, i, j] = x[:, h0:h1, w0:w1].mean(dim=(1, 2))
    return out


def _direct_dw(x, w, b):
    C, H, W = x.shape
    xp = torch.zeros(C, H + 2, W + 2, dtype=x.dtype)
    xp[:, 1:-1, 1:-1] = x
    out = b.view(C, 1, 1).expand(C, H, W).clone()
    for dy in range(3):
        for dx in range(3):
            out += w[:, 0, dy, dx].view(C, 1, 1) * xp[:, dy:dy + H, dx:dx + W]
    return out


def _direct_bilinear(x, H, W):
    C, h, w = x.shape

    def axis(n_out, n_in):
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp(min=0)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        return i0, i1, src - i0
    y0, y1, ly = axis(H, h)
    x0, x1, lx = axis(W, w)
    top = x[:, y0][:, :, x0] * (1 - lx) + x[:, y0][:, :, x1] * lx
    bot = x[:, y1][:, :, x0] * (1 - lx) + x[:, y1][:, :, x1] * lx
    return top * (1 - ly)[:, None] + bot * ly[:, None]


def _direct_lrsa(attn, d_convs, x):
    """SPEC formulas, one image at a time, float64. x: (H, W, C) normalised map."""
    H, W, C = x.shape
    xc = x.permute(2, 0, 1)
    if W >= H:
        grid = lambda p: (p, round(W * p / H + 0.001))  # noqa: E731
    else:
        grid = lambda p: (round(H * p / W + 0.001), p)  # noqa: E731
    hq, wq = grid(attn.q_size)
    qm = _direct_pool(xc, hq, wq)
    if attn.head:
        q = torch.einsum("oc,cn->no", attn.q.weight[:, :, 0, 0], qm.reshape(C, -1)) + attn.q.bias
    else:
        q = qm.reshape(C, -1).T @ attn.q[0].weight.T + attn.q[0].bias
    toks = []
    for lvl, p in enumerate(attn.kv_sizes):
        m = _direct_pool(xc, *grid(p))
        if d_convs is not None:
            m = m + _direct_dw(m, d_convs[lvl].weight, d_convs[lvl].bias)
        toks.append(m.reshape(C, -1).T)
    t = torch.cat(toks)
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + attn.norm.eps)
    t = t * attn.norm.weight + attn.norm.bias
    kvl = attn.kv if attn.head else attn.kv[0]
    kv = t @ kvl.weight.T + kvl.bias
    k, v = kv[:, :C], kv[:, C:]
    d = C // attn.num_heads
    outs = []
    for hd in range(attn.num_heads):
        sl = slice(hd * d, (hd + 1) * d)
        s = (q[:, sl] @ k[:, sl].T) / math.sqrt(d)
        a = torch.exp(s - s.max(-1, keepdim=True).values)
        outs.append((a / a.sum(-1, keepdim=True)) @ v[:, sl])
    o = torch.cat(outs, -1) @ attn.proj.weight.T + attn.proj.bias
    return _direct_bilinear(o.T.reshape(C, hq, wq), H, W).permute(1, 2, 0)


@pytest.mark.parametrize("size", [(13, 13), (20, 9), (7, 30), (3, 5), (40, 40)])
@pytest.mark.parametrize("head", [False, True])
def test_lrsa_matches_direct_formulas(size, head):
    C, heads = (24, 3) if not head else (32, 4)
    kv_sizes = None if not head else (22, 16, 12, 8)
    attn = lrformer.LRSA(C, heads, 16 if not head else 32, kv_sizes, head=head).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    d_convs = None
    if not head:
        d_convs = torch.nn.ModuleList(torch.nn.Conv2d(C, C, 3, padding=1, groups=C) for _ in range(4)).double()
    x = torch.randn(2, *size, C, dtype=torch.float64)
    out = attn(x, d_convs)
    for b in range(2):
        ref = _direct_lrsa(attn, d_convs, x[b])
        assert torch.allclose(out[b], ref, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------- params, FLOPs
def test_params_and_flops_match_spec():
    from benchmarks.flops import REFERENCE_GFLOPS, REFERENCE_PARAMS, model_flops
    for (name, h, w, nc), gflops in REFERENCE_GFLOPS.items():
        r = model_flops(name, h, w, nc)
        assert abs(r["flops"] / 1e9 - gflops) / gflops < 0.01, (name, h, w, r["flops"] / 1e9, gflops)
        if nc == 150:
            assert r["params"] == REFERENCE_PARAMS[name]


# ------------------------------------------------------------------- training, layouts, export
def test_loss_and_backward_train_mode():
    m = tiny(drop_path_rate=0.3).train()
    x = torch.randn(2, 3, 45, 61)
    labels = torch.randint(0, 7, (2, 45, 61))
    labels[0, :5] = 255
    loss = m.loss(x, labels)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # ignore index: a batch of only-ignored labels must not produce a gradient signal from labels
    with pytest.raises(ValueError, match="labels must be"):
        m.loss(x, labels[0])


def test_channels_last_and_autocast():
    m = tiny().eval()
    x = torch.randn(1, 3, 50, 70)
    with torch.no_grad():
        ref = m(x)
        out_cl = m.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        assert torch.allclose(out_cl, ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf = m(x)
    assert torch.isfinite(out_bf).all()
    assert ((out_bf.float() - ref).norm() / ref.norm()).item() < 5e-2


def test_torch_compile_jit_trace_export():
    m = tiny().eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        ref = m(x)
        traced = torch.jit.trace(m, x, check_trace=False)
        assert torch.allclose(traced(x), ref, rtol=1e-5, atol=1e-5)
        ep = torch.export.export(m, (x,))
        assert torch.allclose(ep.module()(x), ref, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(m, fullgraph=True, dynamic=False)
        assert torch.allclose(compiled(x), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- newcomer's errors
def test_pretrained_by_url_with_sha256_and_garbage_files(tmp_path, monkeypatch):
    """create_model(pretrained=URL): a file:// URL read in place (no cached copy), the SHA-256 checked;
    a garbage or foreign file is a one-line CheckpointError naming it."""
    import hashlib
    kw = dict(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1), head_channels=16)
    src = lrformer.create_model("lrformer_t", num_classes=5, **kw)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    m = lrformer.create_model("lrformer_t", num_classes=5, pretrained=path.as_uri(), pretrained_sha256=digest[:12], **kw)
    assert not (tmp_path / "hub" / "checkpoints").exists()          # read in place, not copied
    for (k, a), b in zip(m.state_dict().items(), src.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(lrformer.CheckpointError, match="SHA-256"):
        lrformer.create_model("lrformer_t", num_classes=5, pretrained=str(path), pretrained_sha256="deadbeef", **kw)
    # the file rewritten behind the same file:// URL: the new weights (an old cache by name served the old)
    src2 = lrformer.create_model("lrformer_t", num_classes=5, **kw)
    torch.save({"state_dict": src2.state_dict()}, path)
    m2 = lrformer.create_model("lrformer_t", num_classes=5, pretrained=path.as_uri(), **kw)
    assert all(torch.equal(a, b) for a, b in zip(m2.state_dict().values(), src2.state_dict().values()))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(lrformer.CheckpointError, match="garbage.pth: not a readable PyTorch checkpoint"):
        lrformer.create_model("lrformer_t", num_classes=5, pretrained=str(garbage), **kw)
    foreign = tmp_path / "foreign.pth"
    torch.save({"epoch": 3, "note": "hello"}, foreign)
    with pytest.raises(lrformer.CheckpointError, match="foreign.pth: entry 'epoch'"):
        lrformer.create_model("lrformer_t", num_classes=5, pretrained=str(foreign), **kw)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        lrformer.create_model("lrformer_t", num_classes=5, pretrained=str(tmp_path / "nope.pth"), **kw)


def test_bad_images_and_labels_are_one_line_errors():
    import numpy as np
    m = lrformer.create_model("lrformer_t", num_classes=5, embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1),
                              head_channels=16)
    with pytest.raises(ValueError, match="channels last"):
        m(torch.zeros(1, 32, 32, 3))
    with pytest.raises(TypeError, match="preprocess"):
        m(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        m(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="labels hold 200"):
        m.loss(torch.zeros(1, 3, 32, 32), torch.full((1, 32, 32), 200))
    x = lrformer.preprocess(np.full((32, 40, 3), 124, np.uint8))
    assert x.shape == (1, 3, 32, 40) and x.dtype == torch.float32 and abs(x[0, 0].mean().item()) < 0.01
    m.train()
    a, b = m.predict(x), m.predict(x)                  # eval mode inside predict: same labels twice
    assert torch.equal(a, b) and m.training


def test_pretrained_urls_with_the_same_file_name_do_not_share_the_cache(tmp_path, monkeypatch):
    """Two http URLs ending in the same file name (``.../a/model.pth``, ``.../b/model.pth``) are two
    cached files (keyed by a hash of the URL): each loads its own weights, each is downloaded once,
    and the SHA-256 check still applies to the cached file."""
    import hashlib
    kw = dict(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1), head_channels=16)
    served, downloads = {}, []
    for name in ("a", "b"):
        m = lrformer.create_model("lrformer_t", num_classes=5, **kw)
        f = tmp_path / f"{name}.pth"
        torch.save({"state_dict": m.state_dict()}, f)
        served[f"https://example.org/{name}/model.pth"] = (f, m)

    def download(url, dst, progress=True):
        downloads.append(url)
        import shutil
        shutil.copyfile(served[url][0], dst)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    for _ in range(2):
        for url, (f, src) in served.items():
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            got = lrformer.create_model("lrformer_t", num_classes=5, pretrained=url, pretrained_sha256=digest[:10], **kw)
            assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), src.state_dict().values())), url
    assert sorted(downloads) == sorted(served)                      # once each
    assert len(list((tmp_path / "hub" / "checkpoints").iterdir())) == 2
    with pytest.raises(lrformer.CheckpointError, match="SHA-256"):
        lrformer.create_model("lrformer_t", num_classes=5, pretrained="https://example.org/a/model.pth",
                              pretrained_sha256="deadbeef", **kw)


@needs_shared
def test_checkpoint_mismatch_is_one_line_naming_keys():
    """A checkpoint that does not match: one line with the counts and the first keys of each kind (the
    CLIs print only the first line; the old message put every key on lines of their own)."""
    spec = official("lrformer_t")
    state = {k: torch.zeros(tuple(s)) if s else torch.tensor(0) for k, s in spec["state_dict"]}
    keys = list(state)
    for k in keys[:5]:
        state.pop(k)
    state["backbone.extra.weight"] = torch.zeros(1)
    state[keys[10]] = torch.zeros(7)
    with pytest.raises(lrformer.CheckpointMismatch) as e:
        lrformer.load_checkpoint(lrformer.create_model("lrformer_t"), state)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("checkpoint does not match the model: 1 mis-shaped (" + keys[10])
    assert "5 missing (" + sorted(keys[:5])[0] in msg and "... 2 more" in msg and "1 unexpected (backbone.extra.weight)" in msg
    assert e.value.missing == sorted(keys[:5]) and e.value.unexpected == ["backbone.extra.weight"]


def test_golden_tests_say_why_they_skip_without_shared(tmp_path):
    """In a clone without ../shared the golden tests skip with a reason naming the missing folder, and the
    run's summary says how many skipped and why (they used to skip with only '../shared not present')."""
    import subprocess
    env = dict(os.environ, LRFORMER_SHARED=str(tmp_path / "no-shared"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        os.path.join(os.path.dirname(__file__), "test_golden_query.py")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "golden/released-code test(s) skipped" in r.stdout and str(tmp_path / "no-shared") in r.stdout
    assert " passed" not in r.stdout
