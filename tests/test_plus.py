"""The query-decoder families (released LRFormer+ = Mask2Former head, FASeg's decoder): released names and
shapes for every variant, output structure, small inputs, bad inputs, predict, loss, a short training run.
Numerical agreement with the released code is in test_golden_query.py."""
import json
import os

import pytest
import torch

import lrformer
import lrformer_kernels as K
from lrformer.decoders.faseg import FASegHead

from conftest import SHARED, SHARED_MISSING
TINY_ENC = dict(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1))
TINY_DEC = dict(hidden_dim=32, num_queries=6, enc_layers=1, train_num_points=256)


def tiny(family="plus", num_classes=4, **kw):
    return lrformer.create_model(f"lrformer_t_{family}", num_classes=num_classes, **{**TINY_ENC, **TINY_DEC, **kw})


@pytest.mark.skipif(not os.path.isdir(SHARED), reason=SHARED_MISSING)
@pytest.mark.parametrize("variant", ["t", "s", "b", "l", "xl"])
def test_plus_variants_have_the_released_state_dict(variant):
    """Every LRFormer+ variant: exactly the released keys and shapes (what a strict load checks), the
    released parameter count and drop path."""
    ref = json.load(open(os.path.join(SHARED, "official_plus_state_dict_keys.json")))[f"lrformer_{variant}_plus"]
    with torch.device("meta"):
        model = lrformer.create_model(f"lrformer_{variant}_plus", num_classes=ref["num_classes"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: s for k, s in ref["state_dict"]}
    assert sum(p.numel() for p in model.parameters()) == ref["params"]
    rates = [b.drop_path.drop_prob for s in range(1, 5) for b in getattr(model.backbone, f"block{s}")]
    assert rates[-1] == pytest.approx({"t": 0.2, "s": 0.3, "b": 0.4, "l": 0.6, "xl": 0.4}[variant])


@pytest.mark.parametrize("family,layers", [("plus", 9), ("faseg", 13)])
def test_output_structure(family, layers):
    model = tiny(family).eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        out = model(x)
    assert out["pred_logits"].shape == (2, 6, 5)
    assert out["pred_masks"].shape == (2, 6, 24, 20)
    assert len(out["aux_outputs"]) == layers
    assert model.predict(x).shape == (2, 96, 80)


def test_faseg_small_input_attends_to_no_window():
    """64x64: 4 stride-32 tokens, 4 // 32 = 0 windows: the HRCA layers attend to nothing and their
    attention output is the output projection's bias (as the released code computes)."""
    model = tiny("faseg").eval()
    pred = model.decode_head.predictor
    seen = []
    layer = pred.transformer_cross_attention_layers[3]
    layer.register_forward_hook(lambda m, a, o: seen.append((a, o)))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert pred.last_windows[3].shape == (1, 0)
    (tgt, mem, pos, qpos), (res, w) = seen[0]
    assert mem.shape[1] == 0 and w is None
    expect = layer.norm(tgt + layer.multihead_attn.out_proj.bias)
    torch.testing.assert_close(res, expect)
    assert torch.isfinite(out["pred_masks"]).all()


def test_faseg_hrca_windows_shared_per_image():
    """The windows come from the latest stride-32 layer's attention summed over all queries, n0 // 32
    per image: a 256x256 image has 64 stride-32 tokens -> 2 windows of 8x8 stride-4 pixels."""
    model = tiny("faseg").eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 256, 256))
    wins = model.decode_head.predictor.last_windows
    assert sorted(wins) == [3, 7, 11] and all(w.shape == (2, 2) for w in wins.values())


def test_bad_inputs():
    model = tiny("faseg")
    with pytest.raises(ValueError, match="images must have 3 \\(RGB\\) channels"):
        model(torch.randn(1, 4, 64, 64))
    feats = model.backbone(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="4 feature maps"):
        model.decode_head(feats[1:])
    with pytest.raises(ValueError, match="feature map 2"):
        model.decode_head(feats[:2] + [feats[2][:, :3]] + feats[3:])
    with pytest.raises(ValueError, match="feature map"):
        tiny("plus").decode_head(feats[:3] + [feats[3][:, :5]])


def test_predict_is_eval_and_restores_mode():
    model = tiny("plus").train()
    x = torch.randn(1, 3, 64, 64)
    a, b = model.predict(x, return_labels=False), model.predict(x, return_labels=False)
    torch.testing.assert_close(a, b)
    assert model.training


@pytest.mark.parametrize("family", ["plus", "faseg"])
def test_fuse_keeps_state_dict_and_outputs(family):
    """fuse flips every fusable layer (encoder and decoder); same keys, same outputs (float64)."""
    torch.manual_seed(0)
    model = tiny(family).double().eval()
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    keys = list(model.state_dict())
    ref = model.predict(x, return_labels=False)
    K.fuse(model)
    assert model.fuse_report.get("Block", 0) == 4
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model.predict(x, return_labels=False), ref, rtol=1e-9, atol=1e-9)
    K.unfuse(model)
    assert not any(getattr(m, "fused", False) for m in model.modules())


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


@pytest.mark.parametrize("family", ["plus", "faseg"])
def test_synthetic_training_loss_falls(family):
    torch.manual_seed(0)
    model = tiny(family, num_classes=3, dec_layers=4)
    x, lab = shapes_dataset()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    losses = []
    for _ in range(40):
        loss = model.loss(x, lab)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print("loss", [round(v, 2) for v in losses])
    assert last < 0.6 * first, (first, last)
    pred = model.eval().predict(x)
    ious = [(((pred == c) & (lab == c)).sum() / ((pred == c) | (lab == c)).sum()).item() for c in range(3)]
    print("IoU", ious)
    assert sum(ious) / 3 > 0.5, ious


def test_windowed_pe_equals_full_map_pe():
    """The fused HRCA branch's res2 PE on windows (GroupNorm statistics from the input moments, 1-pixel
    halo, zero padding at the map's edge) equals the full-map PE gathered, for every window (float64)."""
    from lrformer.decoders.faseg import FASegPixelDecoder, WindowedPE, gather_windows
    torch.manual_seed(0)
    dec = FASegPixelDecoder((12, 16, 20, 24), dim=32, layers=1, heads=2, points=2, ffn_dim=32).double()
    with torch.no_grad():
        for p in dec.parameters():
            p.add_(0.1 * torch.randn_like(p))
    res2 = 0.5 + torch.randn(2, 12, 24, 40, dtype=torch.float64)        # offset: GN mean matters
    full = dec.pos_linear[3](dec.input_proj[3](res2))                 # (2, 32, 24, 40)
    lazy = WindowedPE(res2, dec.input_proj[3], dec.pos_linear[3])
    win = torch.stack([torch.randperm(15), torch.randperm(15)])       # a 3x5 grid of 8x8 windows, all of them
    torch.testing.assert_close(lazy.gather(win, 8, 5), gather_windows(full, win, 8, 5), rtol=1e-10, atol=1e-10)


def test_fused_faseg_head_equals_reference():
    """fuse(FASeg head): WindowedPE + lowres_attention (interpreter) == the reference (float64), with windows."""
    torch.manual_seed(0)
    head = FASegHead((16, 32, 40, 48), 4, dim=32, num_queries=5, layers=4, enc_layers=1).double().eval()
    feats = [torch.randn(2, c, 128 // s, 256 // s, dtype=torch.float64) for c, s in zip((16, 32, 40, 48), (4, 8, 16, 32))]
    ref = head(feats)
    assert head.predictor.last_windows[3].shape == (2, 1)                 # 32 stride-32 tokens -> 1 window
    K.fuse(head)
    out = head(feats)
    torch.testing.assert_close(out["pred_masks"], ref["pred_masks"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out["pred_logits"], ref["pred_logits"], rtol=1e-9, atol=1e-9)


def test_predict_pads_to_32_and_crops_back():
    """The released test pipeline: pad to a multiple of 32 (zeros), upsample the mask logits to the padded
    size, crop back to the image."""
    from lrformer.decoders.common import semantic_inference
    torch.manual_seed(0)
    model = tiny("plus").eval()
    x = torch.randn(1, 3, 70, 50)
    with torch.no_grad():
        out = model(torch.nn.functional.pad(x, (0, 14, 0, 26)))          # 96 x 64
    masks = torch.nn.functional.interpolate(out["pred_masks"], size=(96, 64), mode="bilinear", align_corners=False)
    expect = semantic_inference(out["pred_logits"], masks)[..., :70, :50]
    torch.testing.assert_close(model.predict(x, return_labels=False), expect)
