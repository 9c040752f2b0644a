"""Segmentation datasets (ADE20K and Cityscapes folder layouts) and the mmseg training transforms.

PIL + numpy + torch only.  Images are RGB ``uint8`` (H, W, 3) arrays, labels ``uint8`` (H, W) arrays
with 255 = ignore, until :func:`to_tensor` normalises them.  Every random transform takes a
``numpy.random.Generator`` so that a sample's augmentation depends only on the seed it is given
(see :class:`SegDataset`): the data pipeline is reproducible whatever the number of workers and
across resumes.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255
#: ImageNet mean / std on RGB 0-255 (mmseg's img_norm_cfg).
MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class DataError(RuntimeError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file(s)."""


# ----------------------------------------------------------------------------------------------
# Dataset metadata: class names and palettes
# ----------------------------------------------------------------------------------------------

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
    "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair",
    "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole",
    "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
#: The standard Cityscapes train-id colours.
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)


def generated_palette(n: int) -> List[Tuple[int, int, int]]:
    """``n`` distinct colours, deterministic: the bit-interleaved colour map used by PASCAL VOC,
    starting at index 1 (index 0 would be black)."""
    out = []
    for i in range(1, n + 1):
        r = g = b = 0
        c, j = i, 0
        while c:
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
            j += 1
        out.append((r, g, b))
    return out


def palette_for(dataset: Optional[str], num_classes: int) -> List[Tuple[int, int, int]]:
    """Colours for classes 0..num_classes-1 (Cityscapes' own, otherwise :func:`generated_palette`)."""
    if dataset == "cityscapes" and num_classes <= len(CITYSCAPES_PALETTE):
        return list(CITYSCAPES_PALETTE[:num_classes])
    return generated_palette(num_classes)


def class_names_for(dataset: Optional[str], num_classes: int) -> List[str]:
    names = {"ade20k": ADE20K_CLASSES, "cityscapes": CITYSCAPES_CLASSES}.get(dataset or "", ())
    if len(names) == num_classes:
        return list(names)
    return [f"class_{i}" for i in range(num_classes)]


#: Per-dataset defaults (the paper's recipe: mmseg configs of LRFormer).
DATASET_DEFAULTS = {
    "ade20k": dict(num_classes=150, scale=(2048, 512), reduce_zero_label=True, train_split="training",
                   val_split="validation", test_mode="whole", test_crop=(512, 512), test_stride=(341, 341)),
    "cityscapes": dict(num_classes=19, scale=(2048, 1024), reduce_zero_label=False, train_split="train",
                       val_split="val", test_mode="slide", test_crop=(1024, 1024), test_stride=(768, 768)),
    # COCO-Stuff-164k: mmseg's coco-stuff164k config (random resize 0.5-2.0 of 2048x512, crop 512, whole
    # inference at 2048x512); labels 0..170 (171 classes), 255 ignored
    "coco_stuff164k": dict(num_classes=171, scale=(2048, 512), reduce_zero_label=False, train_split="train2017",
                           val_split="val2017", test_mode="whole", test_crop=(512, 512), test_stride=(341, 341)),
}


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def _split_name(layout: str, split: str) -> str:
    """Accept 'train'/'val' for every layout ('training'/'validation' in ADE20K, 'train2017'/'val2017'
    in COCO-Stuff)."""
    if layout == "ade20k":
        return {"train": "training", "val": "validation"}.get(split, split)
    if layout == "coco_stuff164k":
        return {"train": "train2017", "training": "train2017", "val": "val2017", "validation": "val2017"}.get(split, split)
    return {"training": "train", "validation": "val"}.get(split, split)


def find_pairs(root: str, split: str, layout: str = "ade20k") -> List[Tuple[str, str]]:
    """(image, label) paths of one split, sorted.  Raises :class:`DataError` naming the folder when
    it is missing or empty and naming the image when its label file is missing.

    ADE20K: ``root/images/<split>/X.jpg`` with ``root/annotations/<split>/X.png``.
    COCO-Stuff-164k: ``root/images/{train2017,val2017}/X.jpg`` with ``root/annotations/<split>/X_labelTrainIds.png``
    (mmseg's converted label ids 0..170, 255 ignored) or ``X.png`` holding the same ids.
    Cityscapes: ``root/leftImg8bit/<split>/<city>/X_leftImg8bit.png`` with
    ``root/gtFine/<split>/<city>/X_gtFine_labelTrainIds.png``.
    """
    split = _split_name(layout, split)
    pairs = []
    if layout in ("ade20k", "coco_stuff164k"):
        img_dir, ann_dir = os.path.join(root, "images", split), os.path.join(root, "annotations", split)
        if not os.path.isdir(img_dir):
            splits = "training,validation" if layout == "ade20k" else "train2017,val2017"
            raise DataError(f"image folder not found: {img_dir} (expected the {layout} layout "
                            f"images/{{{splits}}} + annotations/{{{splits}}})")
        suffixes = ("_labelTrainIds.png", ".png") if layout == "coco_stuff164k" else (".png",)
        for name in sorted(os.listdir(img_dir)):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTS:
                continue
            label = next((os.path.join(ann_dir, stem + sfx) for sfx in suffixes
                          if os.path.isfile(os.path.join(ann_dir, stem + sfx))), None)
            if label is None:
                raise DataError(f"missing label for image {os.path.join(img_dir, name)}: expected "
                                f"{os.path.join(ann_dir, stem + suffixes[0])}")
            pairs.append((os.path.join(img_dir, name), label))
    elif layout == "cityscapes":
        img_dir, ann_dir = os.path.join(root, "leftImg8bit", split), os.path.join(root, "gtFine", split)
        if not os.path.isdir(img_dir):
            raise DataError(f"image folder not found: {img_dir} (expected the Cityscapes layout "
                            f"leftImg8bit/{{train,val}}/<city> + gtFine/{{train,val}}/<city>)")
        suffix = "_leftImg8bit.png"
        for city in sorted(os.listdir(img_dir)):
            cdir = os.path.join(img_dir, city)
            if not os.path.isdir(cdir):
                continue
            for name in sorted(os.listdir(cdir)):
                if not name.endswith(suffix):
                    continue
                label = os.path.join(ann_dir, city, name[: -len(suffix)] + "_gtFine_labelTrainIds.png")
                if not os.path.isfile(label):
                    raise DataError(f"missing label for image {os.path.join(cdir, name)}: expected {label}")
                pairs.append((os.path.join(cdir, name), label))
    else:
        raise ValueError(f"unknown dataset layout {layout!r}; choose from {', '.join(DATASET_DEFAULTS)}")
    if not pairs:
        raise DataError(f"no images found in {img_dir}")
    return pairs


def read_image(path: str) -> np.ndarray:
    """RGB uint8 (H, W, 3); :class:`DataError` naming the file if it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, ...)
        raise DataError(f"cannot read image {path}: {e}") from e


def read_label(path: str) -> np.ndarray:
    """Label map uint8 (H, W) (palette PNGs give their indices); :class:`DataError` naming the file."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"label images must be single-channel (L or P mode), got mode {im.mode}")
            arr = np.asarray(im)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read label {path}: {e}") from e
    if arr.max(initial=0) > 255:
        raise DataError(f"label {path} has values above 255")
    return arr.astype(np.uint8)


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's reduce_zero_label: 0 (ADE20K 'other') -> 255 (ignore), k -> k - 1, 255 stays 255."""
    out = label.astype(np.int16) - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out.astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Transforms (numpy, mmseg semantics)
# ----------------------------------------------------------------------------------------------

def rescale_size(h: int, w: int, scale: Sequence[int]) -> Tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long edge <= max(scale) and short edge
    <= min(scale).  Returns (new_h, new_w)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1)


def resize_image(img: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == tuple(size_hw):
        return img
    return np.asarray(Image.fromarray(img).resize((size_hw[1], size_hw[0]), Image.BILINEAR))


def resize_label(label: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
    if label.shape[:2] == tuple(size_hw):
        return label
    return np.asarray(Image.fromarray(label).resize((size_hw[1], size_hw[0]), Image.NEAREST))


def random_resize(img, label, rng: np.random.Generator, scale=(2048, 512), ratio_range=(0.5, 2.0)):
    """Scale ``scale`` by a ratio drawn uniformly from ``ratio_range``, then keep-ratio resize."""
    r = rng.uniform(*ratio_range)
    size = rescale_size(img.shape[0], img.shape[1], (int(scale[0] * r), int(scale[1] * r)))
    return resize_image(img, size), resize_label(label, size)


def random_short_edge_resize(img, label, rng: np.random.Generator, short_edges, max_long=2048):
    """The query-decoder recipes' resize: shortest edge drawn uniformly from ``short_edges``, the long
    edge at most ``max_long`` (mmseg ``RandomChoiceResize`` / detectron2 ``ResizeShortestEdge``)."""
    short = int(short_edges[int(rng.integers(0, len(short_edges)))])
    h, w = img.shape[:2]
    s = min(short / min(h, w), max_long / max(h, w))
    size = (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
    return resize_image(img, size), resize_label(label, size)


def random_crop(img, label, rng: np.random.Generator, crop_size=(512, 512), cat_max_ratio=0.75,
                ignore_index=IGNORE_INDEX):
    """Random (h, w) crop; like mmseg, retries up to 10 times while one class covers more than
    ``cat_max_ratio`` of the crop's labelled pixels."""
    ch, cw = crop_size
    h, w = label.shape

    def draw():
        y = int(rng.integers(0, max(h - ch, 0) + 1))
        x = int(rng.integers(0, max(w - cw, 0) + 1))
        return y, x

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            crop = label[y:y + ch, x:x + cw]
            _, cnt = np.unique(crop[crop != ignore_index], return_counts=True)
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            y, x = draw()
    return img[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]


def random_flip(img, label, rng: np.random.Generator, prob=0.5):
    if rng.random() < prob:
        return img[:, ::-1], label[:, ::-1]
    return img, label


def _rgb_to_hsv(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img, "RGB").convert("HSV"))


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def photometric_distortion(img: np.ndarray, rng: np.random.Generator, brightness_delta=32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta=18):
    """mmseg's PhotoMetricDistortion: each with probability 1/2 — brightness shift, contrast
    (before or after the HSV steps, at random), saturation, hue (``hue_delta`` in OpenCV's 0-180
    hue units)."""
    x = img.astype(np.float32)
    if rng.integers(2):
        x = x + rng.uniform(-brightness_delta, brightness_delta)
    contrast_first = bool(rng.integers(2))

    def contrast(x):
        if rng.integers(2):
            x = x * rng.uniform(*contrast_range)
        return x

    if contrast_first:
        x = contrast(x)
    do_sat, do_hue = bool(rng.integers(2)), bool(rng.integers(2))
    if do_sat or do_hue:
        hsv = _rgb_to_hsv(np.clip(x, 0, 255).astype(np.uint8)).astype(np.float32)
        if do_sat:
            hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation_range), 0, 255)
        if do_hue:  # PIL's hue is 0-255 for 360 degrees; OpenCV's 0-180
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue_delta, hue_delta) * 256.0 / 180.0) % 256.0
        x = _hsv_to_rgb(hsv.astype(np.uint8)).astype(np.float32)
    if not contrast_first:
        x = contrast(x)
    return np.clip(x, 0, 255).astype(np.uint8)


def normalize(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) normalised with :data:`MEAN` / :data:`STD`."""
    x = (img.astype(np.float32) - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def preprocess(image) -> torch.Tensor:
    """What the models take, from an RGB image: a file path, a PIL image, or a uint8 array/tensor
    (H, W, 3) -> float32 (1, 3, H, W) normalised with the ImageNet mean/std on the 0-255 scale."""
    if isinstance(image, (str, os.PathLike)):
        image = read_image(str(image))
    elif isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"preprocess takes an RGB image (H, W, 3), a PIL image or a path, got {shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"preprocess takes uint8 pixels (0-255), got {image.dtype}")
    return normalize(image)[None]


def to_tensor(img: np.ndarray, label: np.ndarray):
    return normalize(img), torch.from_numpy(np.array(label, dtype=np.int64))


class TrainTransform:
    """The released training pipelines: random resize (``resize="ratio"``: ratio 0.5-2.0 of ``scale``,
    keep ratio; ``"short_edge"``: shortest edge from ``short_edges``, long edge <= ``max_long``) ->
    random crop (``cat_max_ratio``) -> flip -> photometric distortion -> normalise -> pad to the crop
    size (label 255; image 0 after normalisation for ``pad_value="mean"``, or a raw pixel value such as
    FASeg's 128)."""

    def __init__(self, crop_size=(512, 512), scale=(2048, 512), ratio_range=(0.5, 2.0),
                 cat_max_ratio=0.75, flip_prob=0.5, photometric=True, resize="ratio",
                 short_edges=(512,), max_long=2048, pad_value="mean"):
        if resize not in ("ratio", "short_edge"):
            raise ValueError(f"resize must be 'ratio' or 'short_edge', got {resize!r}")
        self.crop_size, self.scale, self.ratio_range = tuple(crop_size), tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric
        self.resize, self.short_edges, self.max_long, self.pad_value = resize, tuple(short_edges), max_long, pad_value

    def __call__(self, img, label, rng: np.random.Generator):
        if self.resize == "ratio":
            img, label = random_resize(img, label, rng, self.scale, self.ratio_range)
        else:
            img, label = random_short_edge_resize(img, label, rng, self.short_edges, self.max_long)
        img, label = random_crop(img, label, rng, self.crop_size, self.cat_max_ratio)
        img, label = random_flip(img, label, rng, self.flip_prob)
        if self.photometric:
            img = photometric_distortion(np.ascontiguousarray(img), rng)
        img, label = to_tensor(img, label)
        # like mmseg, pad the *normalised* image with 0 (the mean colour) and the label with ignore
        ph, pw = max(self.crop_size[0] - label.shape[0], 0), max(self.crop_size[1] - label.shape[1], 0)
        if ph or pw:
            img = torch.nn.functional.pad(img, (0, pw, 0, ph), value=0.0)
            if self.pad_value != "mean":      # a raw pixel value: its normalised value per channel
                fill = torch.from_numpy((float(self.pad_value) - MEAN) / STD)
                img[:, label.shape[0]:, :] = fill[:, None, None]
                img[:, :, label.shape[1]:] = fill[:, None, None]
            label = torch.nn.functional.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
        return img, label


class SegDataset(torch.utils.data.Dataset):
    """A split of an ADE20K- or Cityscapes-layout folder.

    ``dataset[i]`` -> dict(img, label, path): with a ``transform`` (e.g. :class:`TrainTransform`),
    ``img`` is the normalised float tensor and ``label`` int64; without, the raw uint8 arrays
    (the evaluator resizes those itself).  ``dataset[(i, seed)]`` draws the random transforms from
    ``numpy.random.default_rng(seed)`` (the trainer's sampler passes one seed per sample).
    ``reduce_zero_label`` defaults to True for ADE20K.  Raises :class:`DataError` naming the file for a
    missing label, an unreadable image/label, or an image/label size mismatch.
    """

    def __init__(self, root: str, split: str = "train", layout: str = "ade20k", transform=None,
                 reduce_zero_label: Optional[bool] = None):
        self.root, self.layout, self.transform = root, layout, transform
        self.split = _split_name(layout, split)
        self.reduce_zero_label = (DATASET_DEFAULTS[layout]["reduce_zero_label"]
                                  if reduce_zero_label is None else reduce_zero_label)
        self.pairs = find_pairs(root, split, layout)

    def __len__(self):
        return len(self.pairs)

    def load(self, index: int):
        """Raw (image uint8 (H, W, 3), label uint8 (H, W) after reduce_zero_label)."""
        img_path, label_path = self.pairs[index]
        img, label = read_image(img_path), read_label(label_path)
        if img.shape[:2] != label.shape:
            raise DataError(f"size mismatch: image {img_path} is {img.shape[1]}x{img.shape[0]} but label "
                            f"{label_path} is {label.shape[1]}x{label.shape[0]} (WxH)")
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        return img, label

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        img, label = self.load(index)
        if self.transform is not None:
            img, label = self.transform(img, label, np.random.default_rng(seed))
        return {"img": img, "label": label, "path": self.pairs[index][0]}


def collate(batch):
    """Stack ``img``/``label`` tensors; keep ``path`` as a list."""
    return {"img": torch.stack([b["img"] for b in batch]), "label": torch.stack([b["label"] for b in batch]),
            "path": [b["path"] for b in batch]}


class StepBatchSampler(torch.utils.data.Sampler):
    """Deterministic, resumable, distributed batches for iteration-based training.

    The sample stream is the concatenation of per-epoch permutations (epoch e shuffled with
    ``seed + e``); global step s takes stream positions ``[s*B, (s+1)*B)`` with ``B = batch *
    world_size`` and rank r its ``batch`` positions ``[s*B + r*batch, ...)``.  Each sample also gets its
    own augmentation seed derived from (seed, position), so starting at ``start_step`` reproduces
    exactly the batches an uninterrupted run would have seen.  Yields lists of ``(index, seed)``.
    """

    def __init__(self, num_samples: int, batch: int, num_steps: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.n, self.batch, self.num_steps, self.start = num_samples, batch, num_steps, start_step
        self.rank, self.world, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self._perm_epoch, self._perm = None, None

    def _index(self, pos: int) -> int:
        epoch, off = divmod(pos, self.n)
        if not self.shuffle:
            return off
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._perm[off]

    def __len__(self):
        return max(self.num_steps - self.start, 0)

    def __iter__(self):
        B = self.batch * self.world
        for step in range(self.start, self.num_steps):
            base = step * B + self.rank * self.batch
            # A 63-bit sample seed from (seed, stream position): independent of workers and resumes.
            yield [(self._index(p), (self.seed * 1_000_003 + p) % (2 ** 63)) for p in range(base, base + self.batch)]


def worker_init(_worker_id: int):
    """DataLoader workers: one intra-op thread each (the main process owns the cores)."""
    torch.set_num_threads(1)


__all__ = ["DataError", "SegDataset", "TrainTransform", "StepBatchSampler", "collate", "find_pairs",
           "read_image", "read_label", "reduce_zero_label", "rescale_size", "resize_image", "normalize",
           "palette_for", "class_names_for", "generated_palette", "DATASET_DEFAULTS", "MEAN", "STD",
           "IGNORE_INDEX", "ADE20K_CLASSES", "CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE"]

assert len(ADE20K_CLASSES) == 150 and len(CITYSCAPES_CLASSES) == 19 == len(CITYSCAPES_PALETTE)
