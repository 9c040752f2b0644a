"""LRFormer+ (lrformer.plus / lrformer.query_decoder): shapes, DFPQ and HRCA against direct formulas,
semantic inference, loss/gradients, create_model, and a short synthetic training run."""
import pytest
import torch
import torch.nn.functional as F

import lrformer
from lrformer import functional as LF
from lrformer.plus import LRFormerPlusSegmentor, semantic_inference
from lrformer.query_decoder import (HR, CrossAttentionLayer, MaskedTransformerDecoder, hrca_select_windows,
                                    layer_schedule, resize_distribution)

TINY_ENC = dict(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1))
TINY_DEC = dict(hidden_dim=32, num_queries=6, dec_layers=4, enc_layers=1, dec_heads=2, enc_heads=2,
                enc_points=2, dec_ffn=64, enc_ffn=64, train_num_points=256)


def tiny(num_classes=4, **kw):
    cfg = {**TINY_ENC, **TINY_DEC, **kw}
    return lrformer.create_model("lrformer_t_plus", num_classes=num_classes, **cfg)


# ------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("hw", [(128, 128), (96, 80)])
def test_t_plus_default_decoder_shapes(hw):
    model = lrformer.create_model("lrformer_t_plus", num_classes=150).eval()
    dec = model.decode_head.predictor
    assert (dec.dim, dec.num_queries, dec.num_layers, dec.heads) == (256, 100, 9, 8)
    assert dec.schedule == [0, 1, 2, HR, 0, 1, 2, HR, 0]
    assert len(model.decode_head.pixel_decoder.layers) == 6
    assert model.decode_head.pixel_decoder.layers[0].self_attn.points == 4
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        out = model(x)
    h4, w4 = (hw[0] + 3) // 4, (hw[1] + 3) // 4
    assert out["pred_logits"].shape == (1, 100, 151)
    assert out["pred_masks"].shape == (1, 100, h4, w4)
    assert len(out["aux_outputs"]) == 9
    assert all(a["pred_masks"].shape == (1, 100, h4, w4) for a in out["aux_outputs"])
    assert model.predict(x).shape == (1, *hw) and model.predict(x).dtype == torch.int64


def test_create_model_variants_and_errors():
    assert {f"lrformer_{v}_plus" for v in ("t", "s", "b", "l", "xl")} <= set(lrformer.model_names())
    with torch.device("meta"):
        for v, dims in (("s", 64), ("xl", 128)):
            m = lrformer.create_model(f"lrformer_{v}_plus", num_classes=19)
            assert isinstance(m, LRFormerPlusSegmentor) and m.num_classes == 19
            assert m.backbone.embed_dims[0] == dims
            assert m.decode_head.predictor.class_embed.out_features == 20
    with pytest.raises(ValueError, match="lrformer_xl_plus"):
        lrformer.create_model("lrformer_xl")
    with pytest.raises(TypeError, match="unknown overrides"):
        lrformer.create_model("lrformer_t_plus", head_channels=64)      # LRHead key: not for LRFormer+
    m = tiny(num_queries=3, dec_layers=2, hrca_every=0, dfpq=False)
    assert m.decode_head.predictor.num_queries == 3 and m.decode_head.predictor.schedule == [0, 1]
    assert not hasattr(m.decode_head.predictor, "pos_mlp")


def test_layer_schedule():
    assert layer_schedule(9, 4) == [0, 1, 2, HR, 0, 1, 2, HR, 0]
    assert layer_schedule(9, 0) == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert layer_schedule(5, 2) == [0, HR, 1, HR, 2]


# --------------------------------------------------------------------------------------- DFPQ
def test_resize_distribution():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 4, 6, generator=g, dtype=torch.float64)
    a = a / a.sum((-2, -1), keepdim=True)
    r = resize_distribution(a, (2, 3))                    # shrink: 2x2 block sums
    torch.testing.assert_close(r, a.reshape(2, 3, 2, 2, 3, 2).sum((3, 5)))
    up = resize_distribution(a, (8, 12))                  # grow: bilinear, renormalised
    b = F.interpolate(a.flatten(0, 1)[:, None], size=(8, 12), mode="bilinear", align_corners=False)
    b = b.reshape(2, 3, 8, 12)
    torch.testing.assert_close(up, b / b.sum((-2, -1), keepdim=True))
    torch.testing.assert_close(up.sum((-2, -1)), torch.ones(2, 3, dtype=torch.float64))


def test_dfpq_query_pos_direct_formula():
    torch.manual_seed(0)
    dec = MaskedTransformerDecoder(num_classes=3, dim=8, num_queries=3, layers=1, heads=2, ffn_dim=16).double()
    dist = torch.rand(2, 3, 5, dtype=torch.float64)
    dist = dist / dist.sum(-1, keepdim=True)
    pos = torch.randn(2, 5, 8, dtype=torch.float64)
    out = dec.dfpq_query_pos(dist, pos)
    l1, l2 = dec.pos_mlp.layers
    for b in range(2):
        for q in range(3):
            agg = sum(dist[b, q, s] * pos[b, s] for s in range(5))
            x = torch.cat([agg, dec.query_embed.weight[q]])
            expect = l2.weight @ torch.relu(l1.weight @ x + l1.bias) + l2.bias
            torch.testing.assert_close(out[b, q], expect)


class Recorder:
    """Records every cross-attention layer's inputs/outputs and every DFPQ call of a decoder."""

    def __init__(self, dec):
        self.calls, self.dists = {}, []
        for i, layer in enumerate(dec.cross_attn):
            layer.register_forward_hook(self._hook(i), with_kwargs=True)
        fn = dec.dfpq_query_pos
        dec.dfpq_query_pos = lambda dist, pos: self.dists.append((dist, pos)) or fn(dist, pos)

    def _hook(self, i):
        def hook(module, args, kwargs, out):
            self.calls[i] = (args, kwargs, out)
        return hook


def _decoder_inputs(dec, B=1, hw4=(16, 16), seed=0):
    g = torch.Generator().manual_seed(seed)
    H4, W4 = hw4
    mf = torch.randn(B, dec.dim, H4, W4, generator=g)
    sizes = [(-(-H4 // 8), -(-W4 // 8)), (-(-H4 // 4), -(-W4 // 4)), (-(-H4 // 2), -(-W4 // 2))]
    return mf, [torch.randn(B, dec.dim, h, w, generator=g) for h, w in sizes]


def test_dfpq_inside_the_decoder():
    """Layer 0's DFPQ distribution = sigmoid of the initial mask prediction (bilinear to stride 32),
    normalised; layer 1's = layer 0's head-averaged cross-attention, enlarged to stride 16, normalised;
    the positional query is fed to both the cross- and the self-attention."""
    torch.manual_seed(0)
    dec = MaskedTransformerDecoder(num_classes=3, dim=16, num_queries=4, layers=3, heads=2, ffn_dim=32,
                                   hrca_every=0).eval()
    rec = Recorder(dec)
    mf, ms = _decoder_inputs(dec, B=2)
    with torch.no_grad():
        out = dec(mf, ms)
    init_masks = out["aux_outputs"][0]["pred_masks"]
    s0 = F.interpolate(init_masks, size=ms[0].shape[-2:], mode="bilinear", align_corners=False).sigmoid()
    d0 = s0.flatten(2) / s0.flatten(2).sum(-1, keepdim=True)
    torch.testing.assert_close(rec.dists[0][0], d0)
    pos0 = lrformer.msdeform.sine_position_encoding(2, *ms[0].shape[-2:], 16).flatten(2).transpose(1, 2)
    torch.testing.assert_close(rec.dists[0][1], pos0)
    # layer 0's probabilities, computed directly from its inputs
    (tgt, mem, pos, qpos, mask), _, (_, probs) = rec.calls[0]
    layer = dec.cross_attn[0]
    q = layer.q_proj(tgt + qpos).reshape(2, 4, 2, 8).transpose(1, 2)
    k = layer.k_proj(mem + pos).reshape(2, -1, 2, 8).transpose(1, 2)
    att = (q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(mask[:, None], float("-inf")).softmax(-1).mean(1)
    torch.testing.assert_close(probs, att)
    torch.testing.assert_close(qpos, dec.dfpq_query_pos(d0, pos0))
    a = F.interpolate(att.reshape(2, 4, *ms[0].shape[-2:]), size=ms[1].shape[-2:], mode="bilinear",
                      align_corners=False).flatten(2)
    torch.testing.assert_close(rec.dists[1][0], a / a.sum(-1, keepdim=True))


# --------------------------------------------------------------------------------------- HRCA
def test_hrca_select_windows_direct():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, 4, 5, generator=g)
    idx = hrca_select_windows(scores, (32, 40), 8, 1 / 32)             # grid 4x5 -> K = round(0.625) = 1
    assert idx.shape == (2, 3, 1)
    assert (idx[..., 0] == scores.flatten(2).argmax(-1)).all()
    idx = hrca_select_windows(scores, (30, 33), 8, 0.25)               # grid ceil -> 4x5, K = 5
    order = scores.flatten(2).argsort(-1, descending=True)[..., :5]
    assert torch.equal(idx, order)
    # a different window grid (stride-4 map 40x40 -> grid 5x5): bilinear resize before the top-k
    idx = hrca_select_windows(scores, (40, 40), 8, 0.2)
    r = F.interpolate(scores.flatten(0, 1)[:, None], size=(5, 5), mode="bilinear", align_corners=False)
    assert torch.equal(idx, r.reshape(2, 3, 25).argsort(-1, descending=True)[..., :5])


def assert_topk(win_idx, scores, k):
    """win_idx (B, Q, k) holds k distinct windows whose scores (B, Q, N) are the k largest (ties, e.g.
    windows the masked attention gave 0, may be broken either way)."""
    assert win_idx.shape == scores.shape[:2] + (k,)
    assert all(len(set(r)) == k for r in win_idx.flatten(0, 1).tolist())
    torch.testing.assert_close(scores.gather(-1, win_idx), scores.sort(-1, descending=True).values[..., :k],
                               rtol=0, atol=0)


class RecordingOps:
    """Stand-in for ``CrossAttentionLayer.ops``: calls the reference and records the arguments."""

    def __init__(self):
        self.calls = []

    def hrca_attention(self, q, k, v, win_idx, window, num_heads, scale=None):
        self.calls.append(dict(q=q, k=k, v=v, win_idx=win_idx, window=window, num_heads=num_heads))
        return LF.hrca_attention(q, k, v, win_idx, window, num_heads, scale)


def test_hrca_layers_use_accumulated_stride32_attention(monkeypatch):
    """Layers 3 and 7 (of 8) attend to the stride-4 map through ``CrossAttentionLayer.ops``, in
    8x8 windows ranked by the summed stride-32 attention of layers {0} and {0, 4}."""
    torch.manual_seed(0)
    dec = MaskedTransformerDecoder(num_classes=3, dim=16, num_queries=5, layers=8, heads=2, ffn_dim=32,
                                   hrca_every=4, hrca_keep_ratio=0.25).eval()
    assert dec.schedule == [0, 1, 2, HR, 0, 1, 2, HR]
    ops = RecordingOps()
    monkeypatch.setattr(CrossAttentionLayer, "ops", ops)
    rec = Recorder(dec)
    mf, ms = _decoder_inputs(dec, B=2, hw4=(32, 32))                    # window grid 4x4 = stride-32 map
    with torch.no_grad():
        dec(mf, ms)
    assert len(ops.calls) == 2 and all(c["window"] == 8 and c["num_heads"] == 2 for c in ops.calls)
    p0, p4 = rec.calls[0][2][1], rec.calls[4][2][1]                    # (B, Q, 16) head-averaged
    for call, acc in zip(ops.calls, (p0, p0 + p4)):
        assert_topk(call["win_idx"], acc, 4)                            # K = 16 * 0.25
    # the HRCA layer's output = LN(tgt + out_proj(hrca_attention(q, k, v))) with its projections
    (tgt, mem, pos, qpos), kw, (out, probs) = rec.calls[3]
    layer = dec.cross_attn[3]
    assert probs is None and kw["window"] == 8 and mem.shape == (2, 32, 32, 16)
    att = LF.hrca_attention(layer.q_proj(tgt + qpos), layer.k_proj(mem + pos), layer.v_proj(mem),
                            kw["win_idx"], 8, 2)
    torch.testing.assert_close(out, layer.norm(tgt + layer.out_proj(att)))
    torch.testing.assert_close(mem, mf.permute(0, 2, 3, 1) + dec.level_embed.weight[3])


def test_hrca_odd_size_resizes_scores():
    """96x80 image -> stride-4 map 24x20 -> window grid 3x3; stride-32 map 3x3 here, but with a
    60x44 stride-4 map (grid 8x6) the 8x6 scores come from a bilinear resize of the stride-32 map."""
    torch.manual_seed(0)
    dec = MaskedTransformerDecoder(num_classes=3, dim=16, num_queries=5, layers=4, heads=2, ffn_dim=32).eval()
    ops = RecordingOps()
    dec.cross_attn[3].ops = ops                                         # per-instance swap works too
    rec = Recorder(dec)
    g = torch.Generator().manual_seed(1)
    mf = torch.randn(1, 16, 60, 44, generator=g)
    ms = [torch.randn(1, 16, h, w, generator=g) for h, w in ((7, 5), (15, 11), (30, 22))]
    with torch.no_grad():
        dec(mf, ms)
    (call,) = ops.calls
    p0 = rec.calls[0][2][1].reshape(1, 5, 7, 5)
    r = F.interpolate(p0.flatten(0, 1)[:, None], size=(8, 6), mode="bilinear", align_corners=False)
    k = max(1, round(48 / 32))
    assert k == 2
    assert_topk(call["win_idx"], r.reshape(1, 5, 48), k)


def test_fused_hrca_op_swaps_in(monkeypatch):
    """``use_fused_hrca`` routes the HRCA layers through ``lrformer_kernels.hrca_attention`` (the
    Triton interpreter on CPU): same outputs and gradients as the reference, float64."""
    import lrformer_kernels
    from lrformer.query_decoder import use_fused_hrca
    if not hasattr(lrformer_kernels, "hrca_attention"):
        pytest.skip("lrformer_kernels.hrca_attention not built")
    torch.manual_seed(0)
    dec = MaskedTransformerDecoder(num_classes=3, dim=16, num_queries=3, layers=4, heads=2, ffn_dim=32,
                                   hrca_keep_ratio=0.25).double()
    mf, ms = _decoder_inputs(dec, B=1, hw4=(16, 16))
    mf, ms = mf.double().requires_grad_(), [m.double() for m in ms]
    results = []
    for fused in (False, True):
        assert use_fused_hrca(dec, fused) == 4
        out = dec(mf, ms)
        grad = torch.autograd.grad(out["pred_masks"].square().mean(), [mf, dec.cross_attn[3].k_proj.weight])
        results.append((out["pred_masks"], grad))
    assert dec.cross_attn[3].ops is lrformer_kernels
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-9, atol=1e-9)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


# -------------------------------------------------------------------------- inference / loss
def test_semantic_inference_formula_and_predict():
    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 4, 6, generator=g)
    s = semantic_inference(logits, masks)
    assert s.shape == (2, 4, 4, 6)
    for b in range(2):
        for k in range(4):
            expect = sum(logits[b, q].softmax(-1)[k] * masks[b, q].sigmoid() for q in range(3))
            torch.testing.assert_close(s[b, k], expect)
    model = tiny().eval()
    x = torch.randn(1, 3, 48, 40)
    with torch.no_grad():
        out = model(x)
    up = F.interpolate(out["pred_masks"], size=(48, 40), mode="bilinear", align_corners=False)
    scores = model.predict(x, return_labels=False)
    torch.testing.assert_close(scores, semantic_inference(out["pred_logits"], up))
    assert torch.equal(model.predict(x), scores.argmax(1))


def test_loss_finite_and_gradients_reach_all_parameters():
    torch.manual_seed(0)
    model = tiny(dec_layers=4)                             # schedule [32, 16, 8, HR]
    x = torch.randn(2, 3, 64, 64)
    lab = torch.randint(0, 4, (2, 64, 64))
    lab[0, :20] = 255
    d = model.loss_dict(x, lab)
    assert len(d) == 3 * 5 + 1 and all(torch.isfinite(v) for v in d.values())
    loss = model.loss(x, lab)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    zero = [n for n, p in model.decode_head.named_parameters() if p.grad.abs().sum() == 0]
    # only the deformable level embedding (behind zero-initialised projections) may be exactly zero
    assert set(zero) <= {"pixel_decoder.level_embed"}, zero
    with pytest.raises(ValueError, match="labels must be"):
        model.loss(x, lab[0])


# -------------------------------------------------------------------------------- training
def shapes_dataset(n=2, size=48, seed=0):
    """Images with a red rectangle (class 1) and a green disc (class 2) on a grey background (class 0),
    small noise; a band of ignored pixels (255) in the first image."""
    g = torch.Generator().manual_seed(seed)
    imgs, labs = [], []
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        lab = torch.zeros(size, size, dtype=torch.int64)
        y0, x0 = torch.randint(4, size // 2, (2,), generator=g).tolist()
        lab[y0:y0 + 20, x0:x0 + 24] = 1
        cy, cx = torch.randint(14, size - 14, (2,), generator=g).tolist()
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = 2
        colours = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.1, 0.1], [0.1, 0.9, 0.2]])
        img = colours[lab].permute(2, 0, 1) + 0.05 * torch.randn(3, size, size, generator=g)
        if i == 0:
            lab[:, :3] = 255
        imgs.append(img)
        labs.append(lab)
    return torch.stack(imgs), torch.stack(labs)


def test_synthetic_training_loss_falls():
    torch.manual_seed(0)
    model = tiny(num_classes=3, dec_layers=4, train_num_points=256)
    x, lab = shapes_dataset()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    losses = []
    for _ in range(20):
        loss = model.loss(x, lab)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print("loss", [round(v, 2) for v in losses])
    assert last < 0.6 * first, (first, last)
    # and the trained model segments its training images (mean IoU ~0.75 after these 20 steps)
    pred = model.eval().predict(x)
    ious = [(((pred == c) & (lab == c)).sum() / ((pred == c) | (lab == c)).sum()).item() for c in range(3)]
    print("IoU", ious)
    assert sum(ious) / 3 > 0.5, ious


def test_fuse_plus_model_routes_hrca_and_unfuse_restores():
    """``lrformer_kernels.fuse`` on an LRFormer+ model swaps the encoder blocks AND the decoder's HRCA op;
    ``unfuse`` puts both back; state dict unchanged; float64 outputs equal the reference."""
    import lrformer_kernels
    from lrformer.query_decoder import CrossAttentionLayer
    torch.manual_seed(0)
    model = tiny(hrca_keep_ratio=0.25).double().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    keys = list(model.state_dict())
    ref = model.predict(x, return_labels=False)
    lrformer_kernels.fuse(model)
    layers = [m for m in model.modules() if isinstance(m, CrossAttentionLayer)]
    assert model.fuse_report["CrossAttentionLayer -> fused hrca_attention"] == len(layers) > 0
    assert all(m.ops is lrformer_kernels for m in layers)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model.predict(x, return_labels=False), ref, rtol=1e-9, atol=1e-9)
    lrformer_kernels.unfuse(model)
    assert all(m.ops is lrformer.functional for m in layers)
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())
