"""FLOPs and parameter counts in the paper's convention (one multiply-add = 1 FLOP).

The counter follows fvcore's default rules (the convention of the paper's table and of the
released code): matrix products and convolutions count their multiply-adds (biases not
counted), LayerNorm 5 per element, BatchNorm 2 per element in eval, adaptive average pooling
1 per input element, bilinear upsampling 4 per output element; activations, softmax and
element-wise additions count nothing.  It runs on the ``meta`` device, so even 2048x2048 inputs
cost no memory and no time.

``python -m benchmarks.flops`` prints the table for every variant and resolution.
"""
from __future__ import annotations

import argparse
import sys
import math
from collections import Counter
from typing import Callable, Dict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def _mm(args, kwargs, out):
    a, b = args[0], args[1]
    return a.shape[0] * a.shape[1] * b.shape[1]


def _addmm(args, kwargs, out):
    return _mm(args[1:], kwargs, out)


def _bmm(args, kwargs, out):
    a, b = args[0], args[1]
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _conv(args, kwargs, out):
    w = args[1]
    transposed = args[6] if len(args) > 6 else False
    if transposed:  # each input element meets every (out/groups) x k weight
        return _numel(args[0].shape) * _numel(w.shape[1:])
    return out.numel() * _numel(w.shape[1:])


def _layer_norm(args, kwargs, out):
    weight = args[2] if len(args) > 2 else None
    return args[0].numel() * (5 if weight is not None else 4)


def _bn_eval(args, kwargs, out):
    return args[0].numel() * (2 if args[1] is not None else 1)


def _bn_train(args, kwargs, out):
    return args[0].numel() * (5 if args[1] is not None else 4)


def _native_bn(args, kwargs, out):
    training = args[5]
    return (_bn_train if training else _bn_eval)(args, kwargs, out)


def _pool(args, kwargs, out):
    return args[0].numel()


def _upsample(args, kwargs, out):
    return out.numel() * 4


def _sdpa(args, kwargs, out):
    """Fused scaled-dot-product attention: q (..., Nq, d), k (..., M, d), v (..., M, dv).

    Two matrix products, ``q k^T`` (Nq*M*d multiply-adds per batch*head) and ``attn v``
    (Nq*M*dv); the scale, mask and softmax count nothing (fvcore convention).
    """
    q, k, v = args[0], args[1], args[2]
    batch_heads = _numel(q.shape[:-2])
    nq, d = q.shape[-2], q.shape[-1]
    m, dv = k.shape[-2], v.shape[-1]
    return batch_heads * nq * m * (d + dv)


HANDLERS: Dict[object, Callable] = {
    aten.mm: _mm, aten.addmm: _addmm, aten.bmm: _bmm, aten.convolution: _conv,
    aten.native_layer_norm: _layer_norm,
    aten._native_batch_norm_legit_no_training: _bn_eval,
    aten._native_batch_norm_legit: _bn_train,
    aten.native_batch_norm: _native_bn,
    aten._adaptive_avg_pool2d: _pool,
    aten.upsample_bilinear2d: _upsample,
}
#: SDPA backends that run as one aten op (on meta the math path decomposes into two bmm instead).
SDPA_OPS = tuple(getattr(aten, n) for n in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable") if hasattr(aten, n))
HANDLERS.update({op: _sdpa for op in SDPA_OPS})
NAMES = {aten.mm: "matmul", aten.addmm: "matmul", aten.bmm: "matmul", aten.convolution: "conv",
         aten.native_layer_norm: "layer_norm", aten._native_batch_norm_legit_no_training: "batch_norm",
         aten._native_batch_norm_legit: "batch_norm", aten.native_batch_norm: "batch_norm",
         aten._adaptive_avg_pool2d: "adaptive_avg_pool2d", aten.upsample_bilinear2d: "upsample_bilinear2d"}
NAMES.update({op: "matmul" for op in SDPA_OPS})


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs (multiply-adds) of the aten ops run inside it, by op family."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        handler = HANDLERS.get(packet)
        if handler is not None:
            result = out[0] if isinstance(out, (tuple, list)) else out
            self.by_op[NAMES[packet]] += int(handler(args, kwargs, result))
        return out

    @property
    def total(self) -> int:
        return sum(self.by_op.values())


def count_flops(fn: Callable, *inputs) -> FlopCounter:
    """Run ``fn(*inputs)`` under the counter (no grad) and return it (``.total``, ``.by_op``)."""
    with torch.no_grad(), FlopCounter() as counter:
        fn(*inputs)
    return counter


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_flops(name: str, height: int, width: int, num_classes: int = 150, batch: int = 1) -> Dict:
    """FLOPs (eval mode) and params of ``lrformer.create_model(name)`` at one input size, on meta."""
    import lrformer
    with torch.device("meta"):
        model = lrformer.create_model(name, num_classes=num_classes).eval()
        images = torch.empty(batch, 3, height, width)
    counter = count_flops(model, images)
    return dict(model=name, height=height, width=width, num_classes=num_classes,
                params=count_params(model), flops=counter.total, by_op=dict(counter.by_op))


#: What the SPEC (paper + released code) reports, GFLOPs: (model, H, W, classes) -> G.
REFERENCE_GFLOPS = {
    ("lrformer_t", 512, 512, 150): 16.7, ("lrformer_s", 512, 512, 150): 40.0,
    ("lrformer_b", 512, 512, 150): 74.8, ("lrformer_l", 512, 512, 150): 121.9,
    ("lrformer_l", 640, 640, 150): 181.9,
    ("lrformer_t", 1024, 2048, 19): 119.1, ("lrformer_s", 1024, 2048, 19): 290.0,
}
REFERENCE_PARAMS = {"lrformer_t": 13_264_894, "lrformer_s": 32_223_670, "lrformer_b": 67_505_406,
                    "lrformer_l": 110_979_750}


def _size(text: str):
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (int(parts[0]), int(parts[0]))
    except ValueError:
        h = w = 0
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size like 512 or 1024x2048")
    return h, w


def run(argv=None):
    p = argparse.ArgumentParser(prog="lrformer-flops", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["lrformer_t", "lrformer_s", "lrformer_b", "lrformer_l"],
                   help="model names (lrformer.model_names())")
    p.add_argument("--sizes", nargs="+", type=_size, default=["512x512", "640x640", "1024x1024", "1024x2048",
                                                              "2048x2048"],
                   help="image sizes, HxW or S")
    p.add_argument("--num-classes", type=int, default=None,
                   help="default: 19 at 1024x2048 (Cityscapes), 150 otherwise (ADE20K)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = p.parse_args(argv)
    args.sizes = [_size(s) if isinstance(s, str) else s for s in args.sizes]
    print(f"{'model':<12} {'size':>10} {'classes':>7} {'params (M)':>11} {'GFLOPs':>9} {'reference':>10}")
    for name in args.models:
        for h, w in args.sizes:
            size = f"{h}x{w}"
            nc = args.num_classes or (19 if (h, w) == (1024, 2048) else 150)
            r = model_flops(name, h, w, nc)
            ref = REFERENCE_GFLOPS.get((name, h, w, nc))
            ref_s = f"{ref:.1f}" if ref else "-"
            print(f"{name:<12} {size:>10} {nc:>7} {r['params'] / 1e6:>11.2f} {r['flops'] / 1e9:>9.1f} {ref_s:>10}")


def main(argv=None):
    """Console-script entry point (``lrformer-flops``): one-line errors (``--debug`` for the traceback)."""
    from lrformer.engine.cli import run_cli
    return run_cli(run, "lrformer-flops", argv)


if __name__ == "__main__":
    sys.exit(main())
