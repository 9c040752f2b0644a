"""A tiny synthetic segmentation dataset written to disk (ADE20K or Cityscapes layout) for the
training / evaluation tests.

Each image is a noisy grey background (class 0) with 1-3 large shapes (rectangles and discs), one
solid high-contrast colour per class, so that a tiny model learns it in a few dozen steps.  ADE20K
labels are written as class + 1 with 0 = 'other' (a 2-pixel top border), as in ADE20K, so that
``reduce_zero_label`` gives back the class ids with 255 on the border.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

#: class 0 background, then red, green, blue, yellow.
COLOURS = np.array([(128, 128, 128), (220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 40)],
                   dtype=np.float32)


def make_sample(rng: np.random.Generator, size=(64, 64), num_classes: int = 4):
    """(image uint8 (H, W, 3), class map uint8 (H, W) with values 0..num_classes-1)."""
    h, w = size
    label = np.zeros((h, w), np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(1, num_classes))
        sh, sw = int(rng.integers(h // 4, h // 2 + 1)), int(rng.integers(w // 4, w // 2 + 1))
        y0, x0 = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
        if rng.random() < 0.5:
            label[y0:y0 + sh, x0:x0 + sw] = k
        else:
            cy, cx, r = y0 + sh / 2, x0 + sw / 2, min(sh, sw) / 2
            label[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = k
    img = COLOURS[label] + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8), label


def make_ade20k(root: str, n_train: int = 16, n_val: int = 8, size=(64, 64), num_classes: int = 4,
                seed: int = 0) -> str:
    """Write ``root/images/{training,validation}/*.png`` + ``root/annotations/...``; returns root."""
    rng = np.random.default_rng(seed)
    for split, n in (("training", n_train), ("validation", n_val)):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
        for i in range(n):
            img, label = make_sample(rng, size, num_classes)
            ann = label + 1
            ann[:2] = 0  # ADE20K's 'other' -> ignored after reduce_zero_label
            name = f"{split}_{i:04d}"
            Image.fromarray(img).save(os.path.join(root, "images", split, name + ".png"))
            Image.fromarray(ann).save(os.path.join(root, "annotations", split, name + ".png"))
    return root


def make_cityscapes(root: str, n_train: int = 4, n_val: int = 2, size=(32, 64), num_classes: int = 4,
                    seed: int = 0, cities=("aachen", "bonn")) -> str:
    """Write ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelTrainIds.png``."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            city = cities[i % len(cities)]
            os.makedirs(os.path.join(root, "leftImg8bit", split, city), exist_ok=True)
            os.makedirs(os.path.join(root, "gtFine", split, city), exist_ok=True)
            img, label = make_sample(rng, size, num_classes)
            stem = f"{city}_{i:06d}_000019"
            Image.fromarray(img).save(os.path.join(root, "leftImg8bit", split, city, stem + "_leftImg8bit.png"))
            Image.fromarray(label).save(os.path.join(root, "gtFine", split, city, stem + "_gtFine_labelTrainIds.png"))
    return root


def make_coco_stuff(root: str, n_train: int = 6, n_val: int = 3, size=(40, 56), num_classes: int = 4,
                    seed: int = 0) -> str:
    """Write ``images/{train2017,val2017}/*.jpg`` + ``annotations/<split>/*_labelTrainIds.png`` (ids 0..n-1)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        os.makedirs(os.path.join(root, "annotations", split), exist_ok=True)
        for i in range(n):
            img, label = make_sample(rng, size, num_classes)
            stem = f"{i:012d}"
            Image.fromarray(img).save(os.path.join(root, "images", split, stem + ".jpg"), quality=95)
            Image.fromarray(label).save(os.path.join(root, "annotations", split, stem + "_labelTrainIds.png"))
    return root
