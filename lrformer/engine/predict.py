"""Segment images and write colour-coded masks.

``python -m lrformer.engine.predict img1.jpg img2.jpg --checkpoint ckpt.pth --out-dir preds [--overlay 0.5]``

For each image writes ``<out-dir>/<stem>.png``: a palette PNG whose pixel values are the class ids
and whose palette holds the class colours (Cityscapes' standard colours, otherwise a deterministic
generated palette), so it opens as a colour image and still reads back as labels.  ``--overlay A``
also writes ``<stem>_overlay.png``: the image blended with the colours (mask weight A).
Inference options (``--mode slide``, ``--flip``, ``--ratios``, ``--test-scale``) as in
``lrformer.engine.evaluate``; by default the image is inferred at its own size.
"""
from __future__ import annotations

import argparse
import sys
import os
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from .cli import run_cli
from .data import DATASET_DEFAULTS, palette_for, read_image


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """(H, W) class ids -> 'P' mode image with ``palette`` (ids >= len(palette), e.g. 255, are black)."""
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [c for rgb in palette for c in rgb][: 256 * 3]
    im.putpalette(flat + [0] * (256 * 3 - len(flat)))
    return im


def overlay(img: np.ndarray, mask: Image.Image, alpha: float = 0.5) -> Image.Image:
    colours = np.asarray(mask.convert("RGB"), dtype=np.float32)
    return Image.fromarray(np.clip((1 - alpha) * img + alpha * colours, 0, 255).astype(np.uint8))


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import add_inference_args
    from .cli import HelpFormatter, add_model_args
    p = argparse.ArgumentParser(prog="lrformer-predict", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (ours or a released mmseg file)")
    p.add_argument("--out-dir", default="predictions")
    p.add_argument("--dataset", choices=tuple(DATASET_DEFAULTS), default=None,
                   help="palette / class count (default: the checkpoint's, else ade20k)")
    p.add_argument("--overlay", type=float, default=None, metavar="ALPHA",
                   help="also write <stem>_overlay.png blending the mask over the image")
    p.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto")
    add_model_args(p)
    add_inference_args(p)
    p.set_defaults(test_scale=(0, 0))  # images at their own size unless --test-scale is given
    return p


def main(argv: Optional[List[str]] = None) -> List[str]:
    """Returns the written mask paths."""
    import torch

    from .evaluate import inference_kwargs, predict_image
    from .cli import amp_dtype_from, load_trained
    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available())
                          or args.device == "cuda" else "cpu")
    model = load_trained(args, args.checkpoint).to(device).eval()
    palette = palette_for(args.dataset, args.num_classes)
    kw = inference_kwargs(args, device, amp_dtype_from(args.amp, device))
    os.makedirs(args.out_dir, exist_ok=True)
    written = []
    for path in args.images:
        img = read_image(path)
        labels = predict_image(model, img, **kw).argmax(0).cpu().numpy()
        mask = colorize(labels, palette)
        stem = os.path.splitext(os.path.basename(path))[0]
        out = os.path.join(args.out_dir, stem + ".png")
        mask.save(out)
        written.append(out)
        if args.overlay is not None:
            overlay(img, mask, args.overlay).save(os.path.join(args.out_dir, stem + "_overlay.png"))
        print(out)
    return written


def cli():
    """Console-script entry point (``lrformer-predict``): one-line errors (``--debug`` for the traceback)."""
    sys.exit(run_cli(main, "lrformer-predict"))


if __name__ == "__main__":
    cli()
