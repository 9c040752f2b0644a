"""A tiny synthetic segmentation dataset written to disk (ADE20K, Cityscapes or COCO-Stuff layout) for the
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


def _write(root: str, splits, size, num_classes: int, seed: int, paths, annotate=lambda label: label) -> str:
    """Write ``n`` samples per ``(split, n)``: ``paths(split, i)`` gives the image's and the annotation's
    paths under ``root`` (``.jpg`` images at quality 95), ``annotate`` the stored annotation of a class map."""
    rng = np.random.default_rng(seed)
    for split, n in splits:
        for i in range(n):
            img, label = make_sample(rng, size, num_classes)
            img_path, ann_path = (os.path.join(root, p) for p in paths(split, i))
            for path in (img_path, ann_path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(img).save(img_path, **({"quality": 95} if img_path.endswith(".jpg") else {}))
            Image.fromarray(annotate(label)).save(ann_path)
    return root


def _ade20k_annotation(label):
    ann = label + 1
    ann[:2] = 0  # ADE20K's 'other' -> ignored after reduce_zero_label
    return ann


def make_ade20k(root: str, n_train: int = 16, n_val: int = 8, size=(64, 64), num_classes: int = 4,
                seed: int = 0) -> str:
    """Write ``root/images/{training,validation}/*.png`` + ``root/annotations/...``; returns root."""
    def paths(split, i):
        name = f"{split}_{i:04d}.png"
        return os.path.join("images", split, name), os.path.join("annotations", split, name)
    return _write(root, (("training", n_train), ("validation", n_val)), size, num_classes, seed, paths,
                  _ade20k_annotation)


def make_cityscapes(root: str, n_train: int = 4, n_val: int = 2, size=(32, 64), num_classes: int = 4,
                    seed: int = 0, cities=("aachen", "bonn")) -> str:
    """Write ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelTrainIds.png``."""
    def paths(split, i):
        city = cities[i % len(cities)]
        stem = f"{city}_{i:06d}_000019"
        return (os.path.join("leftImg8bit", split, city, stem + "_leftImg8bit.png"),
                os.path.join("gtFine", split, city, stem + "_gtFine_labelTrainIds.png"))
    return _write(root, (("train", n_train), ("val", n_val)), size, num_classes, seed, paths)


def make_coco_stuff(root: str, n_train: int = 6, n_val: int = 3, size=(40, 56), num_classes: int = 4,
                    seed: int = 0) -> str:
    """Write ``images/{train2017,val2017}/*.jpg`` + ``annotations/<split>/*_labelTrainIds.png`` (ids 0..n-1)."""
    def paths(split, i):
        stem = f"{i:012d}"
        return (os.path.join("images", split, stem + ".jpg"),
                os.path.join("annotations", split, stem + "_labelTrainIds.png"))
    return _write(root, (("train2017", n_train), ("val2017", n_val)), size, num_classes, seed, paths)
