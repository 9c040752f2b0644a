"""mIoU / aAcc evaluation: metrics, whole and sliding-window inference, flip / multi-scale TTA.

``python -m lrformer.engine.evaluate --data DIR --dataset ade20k --model lrformer_t --checkpoint ckpt.pth``
(also under ``torchrun``: every rank evaluates a shard and the confusion matrices are summed).

Inference follows mmseg's test pipeline: each image is resized (keep ratio) to the test ``scale``
(times each ``ratio`` for multi-scale), run whole or with mmseg's 'slide' mode (crops of ``crop``
every ``stride``; logits of overlapping crops averaged), the logits are resized back to the original
image size, and softmax scores are averaged over the augmentations (scales x flip).  Labels are
compared at their original resolution.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cli import run_cli
from .data import (DATASET_DEFAULTS, IGNORE_INDEX, SegDataset, class_names_for, normalize, rescale_size,
                   resize_image)

# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def confusion_matrix(pred: torch.Tensor, gt: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; pixels whose ground truth is
    ``ignore_index`` (or outside 0..K-1) are skipped."""
    pred, gt = pred.reshape(-1).long(), gt.reshape(-1).long()
    keep = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
    idx = gt[keep] * num_classes + pred[keep].clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm) -> Dict[str, object]:
    """mmseg's metrics: per-class IoU = TP / (TP + FP + FN) and Acc = TP / (TP + FN) (NaN where the
    denominator is 0); mIoU / mAcc = their NaN-mean; aAcc = sum(TP) / labelled pixels."""
    cm = torch.as_tensor(cm).double().cpu()
    tp = cm.diag()
    gt_area, pred_area = cm.sum(1), cm.sum(0)
    union = gt_area + pred_area - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt_area > 0, tp / gt_area.clamp(min=1), torch.full_like(tp, float("nan")))
    total = cm.sum()
    return {"aAcc": (tp.sum() / total).item() if total > 0 else float("nan"),
            "mIoU": float(np.nanmean(iou.numpy())) if (union > 0).any() else float("nan"),
            "mAcc": float(np.nanmean(acc.numpy())) if (gt_area > 0).any() else float("nan"),
            "IoU": iou.tolist(), "Acc": acc.tolist()}


def format_table(results: Dict[str, object], class_names: Sequence[str]) -> str:
    """Per-class IoU/Acc table (percent) followed by the summary line."""
    width = max([len(n) for n in class_names] + [5])
    lines = [f"| {'class':<{width}} | IoU   | Acc   |", f"|{'-' * (width + 2)}|-------|-------|"]
    for name, iou, acc in zip(class_names, results["IoU"], results["Acc"]):
        f = (lambda v: "  nan" if v is None or math.isnan(v) else f"{100 * v:5.2f}")
        lines.append(f"| {name:<{width}} | {f(iou)} | {f(acc)} |")
    lines.append(f"aAcc {100 * results['aAcc']:.2f}  mIoU {100 * results['mIoU']:.2f}  "
                 f"mAcc {100 * results['mAcc']:.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------


def whole_inference(model, images: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) scores at the image size."""
    return model.predict(images, return_labels=False)


def slide_inference(model, images: torch.Tensor, crop: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """mmseg's 'slide' mode: windows of ``crop`` (h, w) every ``stride`` (the last row/column of
    windows is shifted back to end at the border; windows are clipped to images smaller than the
    crop), each run through ``model.predict``; overlapping logits are averaged."""
    B, _, H, W = images.shape
    ch, cw = crop
    sh, sw = stride
    rows = max(H - ch + sh - 1, 0) // sh + 1
    cols = max(W - cw + sw - 1, 0) // sw + 1
    out, count = None, images.new_zeros((1, 1, H, W))
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, H), min(c * sw + cw, W)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            logits = model.predict(images[:, :, y1:y2, x1:x2], return_labels=False).float()
            if out is None:
                out = logits.new_zeros((B, logits.shape[1], H, W))
            out[:, :, y1:y2, x1:x2] += logits
            count[:, :, y1:y2, x1:x2] += 1
    return out / count


def infer_scores(model, images: torch.Tensor, mode: str = "whole", crop=(512, 512), stride=(341, 341)):
    if mode == "whole":
        return whole_inference(model, images).float()
    if mode == "slide":
        return slide_inference(model, images, crop, stride)
    raise ValueError(f"unknown inference mode {mode!r}; choose 'whole' or 'slide'")


@torch.no_grad()
def predict_image(model, img: np.ndarray, scale: Optional[Sequence[int]] = None, ratios: Sequence[float] = (1.0,),
                  flip: bool = False, mode: str = "whole", crop=(512, 512), stride=(341, 341),
                  device="cpu", amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Class scores (K, H, W) for one uint8 RGB image at its own size.

    For each ratio the image is keep-ratio resized to ``scale * ratio`` (``scale=None``: the
    original size times the ratio), inferred (and mirrored if ``flip``), the logits resized back and
    soft-maxed; the result is the mean over augmentations.  A single augmentation returns the
    logits themselves (same argmax).
    """
    H, W = img.shape[:2]
    device = torch.device(device)
    outs = []
    for r in ratios:
        if scale is None:
            size = (max(int(H * r + 0.5), 1), max(int(W * r + 0.5), 1))
        else:
            size = rescale_size(H, W, (int(scale[0] * r), int(scale[1] * r)))
        x = normalize(resize_image(img, size))[None].to(device)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                s = infer_scores(model, xi, mode, crop, stride)
            s = s.float()
            if flipped:
                s = s.flip(-1)
            if tuple(s.shape[-2:]) != (H, W):
                s = F.interpolate(s, size=(H, W), mode="bilinear", align_corners=False)
            outs.append(s[0])
    if len(outs) == 1:
        return outs[0]
    return torch.stack([o.softmax(0) for o in outs]).mean(0)


@torch.no_grad()
def evaluate(model, dataset: SegDataset, num_classes: int, rank: int = 0, world_size: int = 1,
             progress: bool = True, workers: int = 2, **infer_kw) -> Dict[str, object]:
    """Confusion matrix over ``dataset`` (raw images, no transform) and its metrics.

    Under a process group each rank takes every ``world_size``-th image and the matrices are summed,
    so every rank returns the full result.  ``infer_kw`` go to :func:`predict_image`.
    """
    from .distributed import all_reduce_sum
    was_training = model.training
    model.eval()
    device = infer_kw.get("device", "cpu")
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    indices = list(range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(_Raw(dataset), sampler=indices, batch_size=None, num_workers=workers,
                                         collate_fn=_identity)
    it = loader
    if progress and rank == 0:
        from tqdm import tqdm
        it = tqdm(loader, total=len(indices), desc="eval", dynamic_ncols=True, file=sys.stderr)
    for img, label in it:
        scores = predict_image(model, img, **infer_kw)
        cm += confusion_matrix(scores.argmax(0), torch.as_tensor(label).to(scores.device), num_classes)
    all_reduce_sum(cm)
    model.train(was_training)
    res = metrics_from_confusion(cm)
    res["num_images"] = len(dataset)
    return res


def _identity(x):
    return x


class _Raw(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds.load(i)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_inference_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("inference")
    g.add_argument("--mode", choices=("whole", "slide"), default=None,
                   help="whole-image or sliding-window inference (default: whole for ADE20K, slide for Cityscapes)")
    g.add_argument("--crop", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="slide window (default 512 512 ADE20K, 1024 1024 Cityscapes)")
    g.add_argument("--stride", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="slide stride (default 341 341 ADE20K, 768 768 Cityscapes)")
    g.add_argument("--test-scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="keep-ratio test resize (default 2048 512 ADE20K, 2048 1024 Cityscapes); "
                        "'--test-scale 0 0' keeps the original size")
    g.add_argument("--ratios", type=float, nargs="+", default=[1.0],
                   help="multi-scale test ratios, e.g. 0.5 0.75 1.0 1.25 1.5 1.75")
    g.add_argument("--flip", action="store_true", help="add horizontally flipped inference (TTA)")


def inference_kwargs(args, device, amp_dtype) -> dict:
    d = DATASET_DEFAULTS.get(args.dataset, DATASET_DEFAULTS["ade20k"])
    scale = tuple(args.test_scale) if args.test_scale is not None else d["scale"]
    if scale == (0, 0):
        scale = None
    return dict(scale=scale, ratios=tuple(args.ratios), flip=args.flip, mode=args.mode or d["test_mode"],
                crop=tuple(args.crop or d["test_crop"]), stride=tuple(args.stride or d["test_stride"]),
                device=device, amp_dtype=amp_dtype)


def build_parser() -> argparse.ArgumentParser:
    from .cli import HelpFormatter, add_model_args
    p = argparse.ArgumentParser(prog="lrformer-evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="dataset root (ADE20K or Cityscapes layout)")
    p.add_argument("--dataset", choices=tuple(DATASET_DEFAULTS), default=None,
                   help="folder layout (default: the checkpoint's, else ade20k)")
    p.add_argument("--split", default=None, help="split folder (default: validation / val)")
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (ours or a released mmseg file)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="auto",
                   help="autocast dtype (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--out", default=None, help="write the metrics as JSON here")
    add_model_args(p)
    add_inference_args(p)
    return p


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    from .distributed import cleanup, init_distributed
    from .cli import amp_dtype_from, load_trained
    args = build_parser().parse_args(argv)
    info = init_distributed(args.device)
    model = load_trained(args, args.checkpoint)
    model.to(info.device).eval()
    split = args.split or DATASET_DEFAULTS[args.dataset]["val_split"]
    ds = SegDataset(args.data, split, args.dataset)
    t0 = time.time()
    res = evaluate(model, ds, args.num_classes, info.rank, info.world_size, workers=args.workers,
                   **inference_kwargs(args, info.device, amp_dtype_from(args.amp, info.device)))
    res["seconds"] = time.time() - t0
    if info.is_main:
        print(format_table(res, class_names_for(args.dataset, args.num_classes)))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
    cleanup()
    return res


def cli():
    """Console-script entry point (``lrformer-evaluate``): one-line errors (``--debug`` for the traceback)."""
    sys.exit(run_cli(main, "lrformer-evaluate"))


if __name__ == "__main__":
    cli()
