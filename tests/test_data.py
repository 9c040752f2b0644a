"""Datasets and transforms: layouts, reduce_zero_label, bad-data errors, augmentation, sampler."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lrformer.engine.data import (MEAN, STD, DataError, SegDataset, StepBatchSampler, TrainTransform, find_pairs,
                           reduce_zero_label, rescale_size)
from synthetic import COLOURS, make_ade20k, make_cityscapes


@pytest.fixture
def ade(tmp_path):
    return make_ade20k(str(tmp_path / "ade"), n_train=6, n_val=3, size=(40, 48), seed=1)


def test_reduce_zero_label():
    lab = np.array([[0, 1, 2], [150, 255, 7]], np.uint8)
    out = reduce_zero_label(lab)
    assert out.tolist() == [[255, 0, 1], [149, 255, 6]]


def test_rescale_size_keep_ratio():
    assert rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert rescale_size(1024, 2048, (2048, 512)) == (512, 1024)      # short edge bound
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)       # long edge bound
    assert rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)


def test_ade20k_layout(ade):
    pairs = find_pairs(ade, "train", "ade20k")
    assert len(pairs) == 6 and all(os.path.basename(i)[:-4] == os.path.basename(l)[:-4] for i, l in pairs)
    ds = SegDataset(ade, "validation", "ade20k")
    assert len(ds) == 3
    img, label = ds.load(0)
    raw = np.asarray(Image.open(ds.pairs[0][1]))
    assert img.shape == (40, 48, 3) and img.dtype == np.uint8 and label.shape == (40, 48)
    assert (label[:2] == 255).all()                       # the 0 border became ignore
    assert np.array_equal(label[2:], raw[2:] - 1)          # k -> k - 1


def test_cityscapes_layout(tmp_path):
    root = make_cityscapes(str(tmp_path / "cs"), n_train=4, n_val=2)
    ds = SegDataset(root, "train", "cityscapes")
    assert len(ds) == 4 and not ds.reduce_zero_label
    assert all(p[1].endswith("_gtFine_labelTrainIds.png") and "/gtFine/train/" in p[1] for p in ds.pairs)
    img, label = ds.load(1)
    assert np.array_equal(label, np.asarray(Image.open(ds.pairs[1][1])))


def test_missing_label_names_file(ade):
    img = os.path.join(ade, "images", "training", "training_0003.png")
    os.remove(os.path.join(ade, "annotations", "training", "training_0003.png"))
    with pytest.raises(DataError, match="missing label.*training_0003.png"):
        SegDataset(ade, "train", "ade20k")
    with pytest.raises(DataError, match=img):
        find_pairs(ade, "training", "ade20k")


def test_size_mismatch_names_files(ade):
    lab = os.path.join(ade, "annotations", "training", "training_0002.png")
    Image.fromarray(np.ones((20, 20), np.uint8)).save(lab)
    ds = SegDataset(ade, "train", "ade20k", TrainTransform((32, 32), (48, 40)))
    ds[0]  # the others are fine
    with pytest.raises(DataError, match="size mismatch.*training_0002.png.*training_0002.png"):
        ds[2]


def test_unreadable_image_names_file(ade):
    bad = os.path.join(ade, "images", "validation", "validation_0001.png")
    with open(bad, "wb") as f:
        f.write(b"this is not a png")
    ds = SegDataset(ade, "val", "ade20k")
    with pytest.raises(DataError, match="cannot read image .*validation_0001.png"):
        ds.load(1)


def test_missing_split_folder(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        SegDataset(str(tmp_path), "train", "ade20k")


def test_train_transform_shapes_alignment_determinism(ade):
    ds = SegDataset(ade, "train", "ade20k", TrainTransform((32, 32), (48, 40), (0.5, 2.0), photometric=False))
    for i in range(len(ds)):
        s = ds[(i, 1234 + i)]
        img, label = s["img"], s["label"]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32
        assert label.shape == (32, 32) and label.dtype == torch.int64
        assert set(label.unique().tolist()) <= {0, 1, 2, 3, 255}
        # image and label stay aligned through resize / crop / flip: pixels of class k have colour k
        rgb = img.permute(1, 2, 0).numpy() * STD + MEAN
        for k in range(4):
            m = label.numpy() == k
            if m.sum() > 20:
                assert np.median(np.abs(rgb[m] - COLOURS[k]).max(1)) < 40
        again = ds[(i, 1234 + i)]
        assert torch.equal(again["img"], img) and torch.equal(again["label"], label)
    ds.transform.photometric = True
    a, b = ds[(0, 1)], ds[(0, 2)]
    assert not torch.equal(a["img"], b["img"])


def test_photometric_keeps_shape_and_changes_pixels(ade):
    ds = SegDataset(ade, "train", "ade20k", TrainTransform((40, 48), (48, 40), (1.0, 1.0), flip_prob=0.0))
    plain = SegDataset(ade, "train", "ade20k",
                       TrainTransform((40, 48), (48, 40), (1.0, 1.0), flip_prob=0.0, photometric=False))
    changed = sum(not torch.equal(ds[(0, s)]["img"], plain[(0, s)]["img"]) for s in range(8))
    assert changed >= 4
    assert all(torch.equal(ds[(0, s)]["label"], plain[(0, s)]["label"]) for s in range(3))


def test_step_batch_sampler_resume_and_ranks():
    full = list(StepBatchSampler(10, batch=3, num_steps=9, world_size=1, seed=5))
    tail = list(StepBatchSampler(10, batch=3, num_steps=9, start_step=4, world_size=1, seed=5))
    assert tail == full[4:]
    r0 = list(StepBatchSampler(10, batch=2, num_steps=7, rank=0, world_size=2, seed=5))
    r1 = list(StepBatchSampler(10, batch=2, num_steps=7, rank=1, world_size=2, seed=5))
    g = list(StepBatchSampler(10, batch=4, num_steps=7, world_size=1, seed=5))
    for a, b, c in zip(r0, r1, g):
        assert [x[0] for x in a + b] == [x[0] for x in c]
    # every epoch is a permutation of the dataset
    stream = [x[0] for batch in full for x in batch]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    assert len({x[1] for batch in full for x in batch}) == 27  # one augmentation seed per sample


def test_small_images_padded_like_mmseg(ade):
    """Resized below the crop size: padded bottom/right, label with 255, normalised image with 0."""
    ds = SegDataset(ade, "train", "ade20k", TrainTransform((64, 64), (48, 40), (0.5, 0.5), photometric=False))
    s = ds[(0, 0)]
    h, w = rescale_size(40, 48, (24, 20))
    assert s["img"].shape == (3, 64, 64) and s["label"].shape == (64, 64)
    assert (s["label"][h:] == 255).all() and (s["label"][:, w:] == 255).all()
    assert (s["img"][:, h:] == 0).all() and (s["img"][:, :, w:] == 0).all()
    assert (s["label"][2:h, :w] != 255).all()
