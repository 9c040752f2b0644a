"""Metrics against direct loops; whole / slide inference; flip and multi-scale TTA."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrformer
from lrformer.engine.data import normalize, resize_image
from lrformer.engine.evaluate import (confusion_matrix, format_table, metrics_from_confusion, predict_image,
                               slide_inference, whole_inference)

TINY = dict(embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), head_channels=32, num_heads=(1, 2, 3, 4),
            num_heads_head=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class PointwiseModel(nn.Module):
    """A 1x1-conv 'segmentor': pixel-wise, hence translation- and flip-equivariant."""

    def __init__(self, k=3):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)
        self.num_classes = k

    @torch.no_grad()
    def predict(self, images, return_labels=True):
        s = self.conv(images)
        return s.argmax(1) if return_labels else s


class ColumnModel(nn.Module):
    """Scores = the mean of channel 0 over the whole input (a window-dependent constant) in class 0,
    plus the column index in class 1 (not flip-equivariant)."""
    num_classes = 2

    def predict(self, images, return_labels=False):
        B, _, H, W = images.shape
        c0 = images[:, :1].mean((2, 3), keepdim=True).expand(B, 1, H, W)
        c1 = torch.arange(W, dtype=images.dtype).view(1, 1, 1, W).expand(B, 1, H, W)
        return torch.cat([c0, c1], 1)


def test_confusion_and_metrics_against_loops():
    rng = np.random.default_rng(0)
    K = 5
    gt = rng.integers(0, 4, (7, 9))           # class 4 never in the ground truth
    pred = rng.integers(0, 5, (7, 9))
    pred[pred == 3] = 0                         # class 3 never predicted
    gt[0, :4] = 255                             # ignored pixels
    gt[6, 8] = 255
    cm = confusion_matrix(torch.as_tensor(pred), torch.as_tensor(gt), K).numpy()
    ref = np.zeros((K, K), np.int64)
    for y in range(7):
        for x in range(9):
            if gt[y, x] != 255:
                ref[gt[y, x], pred[y, x]] += 1
    assert np.array_equal(cm, ref) and cm.sum() == 63 - 5
    res = metrics_from_confusion(cm)
    ious, accs = [], []
    for k in range(K):
        tp = sum(1 for y in range(7) for x in range(9) if gt[y, x] == k and pred[y, x] == k)
        fn = sum(1 for y in range(7) for x in range(9) if gt[y, x] == k and pred[y, x] != k)
        fp = sum(1 for y in range(7) for x in range(9) if gt[y, x] != 255 and gt[y, x] != k and pred[y, x] == k)
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
        accs.append(tp / (tp + fn) if tp + fn else math.nan)
    assert ious[4] == 0.0 and math.isnan(accs[4])  # predicted but absent: IoU 0, Acc undefined
    assert ious[3] == 0.0
    np.testing.assert_allclose(res["IoU"], ious, equal_nan=True)
    np.testing.assert_allclose(res["Acc"], accs, equal_nan=True)
    assert res["mIoU"] == pytest.approx(np.mean(ious))
    assert res["mAcc"] == pytest.approx(np.nanmean(accs))
    labelled = [(y, x) for y in range(7) for x in range(9) if gt[y, x] != 255]
    assert res["aAcc"] == pytest.approx(sum(gt[p] == pred[p] for p in labelled) / len(labelled))
    table = format_table(res, [f"c{k}" for k in range(K)])
    assert "c4" in table and "mIoU" in table


def test_class_absent_everywhere_is_nan_and_skipped():
    gt = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    res = metrics_from_confusion(confusion_matrix(pred, gt, 3))
    assert math.isnan(res["IoU"][2])
    assert res["mIoU"] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_slide_equals_whole_when_crop_covers_image():
    torch.manual_seed(0)
    model = lrformer.create_model("lrformer_t", num_classes=4, **TINY).eval()
    x = torch.randn(2, 3, 40, 56)
    whole = whole_inference(model, x)
    assert whole.shape == (2, 4, 40, 56)
    torch.testing.assert_close(slide_inference(model, x, (64, 64), (48, 48)), whole, rtol=0, atol=0)
    torch.testing.assert_close(slide_inference(model, x, (40, 56), (10, 10)), whole, rtol=0, atol=0)
    # smaller windows give a different (but full-size, finite) result on a real model
    s = slide_inference(model, x, (24, 24), (16, 16))
    assert s.shape == whole.shape and torch.isfinite(s).all() and not torch.allclose(s, whole)


def test_slide_pointwise_model_and_window_average():
    m = PointwiseModel()
    x = torch.randn(1, 3, 37, 50)
    torch.testing.assert_close(slide_inference(m, x, (16, 20), (7, 9)), m.predict(x, False))
    # windows (4x4, stride 2) over 4x6 at columns [0,4) and [2,6): channel 0 = column index
    img = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 3, 4, 6).contiguous()
    s = slide_inference(ColumnModel(), img, (4, 4), (2, 2))
    assert s[0, 0, 0].tolist() == [1.5, 1.5, 2.5, 2.5, 3.5, 3.5]     # averaged where windows overlap
    assert s[0, 1, 0].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 3.0]     # local columns, (2+0)/2, (3+1)/2 on the overlap


def test_flip_tta_equivariant_and_direct():
    img = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    m = PointwiseModel()
    plain = predict_image(m, img)
    flipped = predict_image(m, img, flip=True)
    torch.testing.assert_close(flipped, plain.softmax(0), rtol=1e-5, atol=1e-6)
    # not flip-equivariant: the mean of softmax(s(x)) and softmax(flip(s(flip(x))))
    cm = ColumnModel()
    x = normalize(img)[None]
    direct = (cm.predict(x)[0].softmax(0) + cm.predict(x.flip(-1))[0].flip(-1).softmax(0)) / 2
    torch.testing.assert_close(predict_image(cm, img, flip=True), direct)


def test_multiscale_tta_direct():
    torch.manual_seed(0)
    model = lrformer.create_model("lrformer_t", num_classes=4, **TINY).eval()
    img = (np.random.default_rng(1).random((32, 48, 3)) * 255).astype(np.uint8)
    out = predict_image(model, img, scale=(48, 32), ratios=(0.5, 1.0, 1.5), flip=True)
    ref = []
    for size in ((16, 24), (32, 48), (48, 72)):
        x = normalize(resize_image(img, size))[None]
        for f in (False, True):
            s = model.predict(x.flip(-1) if f else x, return_labels=False)
            s = s.flip(-1) if f else s
            ref.append(F.interpolate(s, size=(32, 48), mode="bilinear", align_corners=False)[0].softmax(0))
    torch.testing.assert_close(out, torch.stack(ref).mean(0), rtol=1e-5, atol=1e-6)
    assert out.shape == (4, 32, 48)
    # a single augmentation returns the logits (same argmax as the scores)
    single = predict_image(model, img, scale=(48, 32))
    torch.testing.assert_close(single, model.predict(normalize(img)[None], return_labels=False)[0])
