"""Export a segmentor to ONNX at a fixed image size and check it in onnxruntime.

``python -m lrformer.engine.export --model lrformer_t --checkpoint ckpt.pth --size 512 512 --out lrformer_t.onnx``

Writes the graph (normalised images (B, 3, H, W) -> semantic scores (B, K, H, W)), then runs it in
onnxruntime on a random image and prints the largest difference from PyTorch (relative to the largest
score).  Needs the optional extra ``[export]`` (onnx, onnxscript, onnxruntime).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .cli import HelpFormatter, add_model_args, build_model, load_trained, resolve_defaults, run_cli


def build_parser() -> argparse.ArgumentParser:
    from ..export import DEFAULT_OPSET
    p = argparse.ArgumentParser(prog="lrformer-export", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="trained checkpoint (ours or a released mmseg file); without it the model is exported "
                        "with its initial weights (e.g. to try a deployment pipeline)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), required=True,
                   help="the fixed image size of the graph (any size >= 32; not only multiples of 32)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (>= 16)")
    p.add_argument("--batch", type=int, default=1, help="the fixed batch size of the graph")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the onnxruntime comparison")
    add_model_args(p)
    return p


def main(argv: Optional[List[str]] = None) -> dict:
    """Returns ``{"path", "max_rel_diff"}`` (the difference is None with ``--no-check``)."""
    from ..export import check_onnx, export_onnx
    args = build_parser().parse_args(argv)
    args.device = "cpu" if args.device == "auto" else args.device
    if args.checkpoint:
        model = load_trained(args, args.checkpoint)
    else:
        resolve_defaults(args)
        model = build_model(args)
    path = export_onnx(model, args.out, image_size=tuple(args.size), opset=args.opset, batch=args.batch)
    diff = None
    if args.check:
        diff = check_onnx(model, path)
        print(f"{path}: onnxruntime vs PyTorch, largest difference {diff:.2e} of the largest score "
              f"({args.model}, {args.batch}x3x{args.size[0]}x{args.size[1]}, opset {args.opset})")
    else:
        print(f"wrote {path}")
    return {"path": path, "max_rel_diff": diff}


def cli():
    """Console-script entry point (``lrformer-export``)."""
    sys.exit(run_cli(main, "lrformer-export"))


if __name__ == "__main__":
    cli()
