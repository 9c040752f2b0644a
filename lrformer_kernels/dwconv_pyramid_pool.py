"""An LRFormer block's conditional position encoding and its attention's pooling as one op: a depthwise 3x3
conv with its residual, and the pyramid pooling of that map's LayerNorm (the block's norm1):

    y      = x + dwconv3x3(x) + bias                     the CPE (``dwconv3x3(x, w, b, residual=True)``)
    pooled = pyramid_pool(layer_norm(y), grids)          norm1 + every grid of the LRSA, (B, sum(gh*gw), C)

Returns ``(y, pooled)``: y goes on to the block's residual, pooled to the attention.  Reference math:
:func:`dwconv3x3_pyramid_pool_reference` (the two ops' references, one after the other).

Why one op: y has two uses, the residual and the pooling, so separately their gradients meet in an add of two
full maps (read twice, written once) before the CPE's backward.  One op owns both uses: its backward adds the
residual's gradient as the pooling's LayerNorm backward writes y's gradient.

Design (no kernels of its own: the two ops' kernels, each with one option)
--------------------------------------------------------------------------
* Forward: ``dwconv3x3``'s forward kernel with ``STATS``: its tiles hold whole rows (BLOCK_C >= C, fewer pixels
  a tile), and the epilogue writes each pixel's LayerNorm mean and 1/std (fp32, of y as stored) beside y; then
  ``pyramid_pool``'s kernel pools layer_norm(y) from those statistics.  y is written once and read once: the
  separate statistics pass over y is gone.
* Backward: ``pyramid_pool``'s LayerNorm backward kernel with ``GRAD_IN``: y's gradient from the pooling plus
  the residual's gradient, written once (and the LayerNorm's weight and bias gradients); then ``dwconv3x3``'s
  backward reads it.  Deterministic (both kernels' fixed-order partial sums).
* Bytes (maps of B*H*W*C): forward 3 (x read, y written, y read by the pooling), backward 6 (y, dy read, y's
  gradient written; it and x read, dx written); the two ops apart move 4 and 8 (a statistics pass; the add).
"""
from __future__ import annotations

import importlib
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ._common import FLOAT_DTYPES, acc_dtype, check_tensor, use_kernel
from .dwconv import dwconv3x3_reference
from .pyramid_pool import pyramid_pool_reference

# the two ops' modules (the package's ``pyramid_pool`` attribute is the function)
_dw = importlib.import_module(".dwconv", __package__)
_pp = importlib.import_module(".pyramid_pool", __package__)

__all__ = ["dwconv3x3_pyramid_pool", "dwconv3x3_pyramid_pool_reference"]

# ----------------------------------------------------------------------------------------------
# Kernels: dwconv's ``_dwconv_fwd_kernel`` (STATS) and ``_dwconv_bwd_kernel``; pyramid_pool's
# ``_pyramid_pool_fwd_kernel`` (LAYER_NORM) and ``_pyramid_pool_ln_bwd_kernel`` (GRAD_IN).
# Config: theirs (``dwconv._forward_config(..., stats=True)`` holds whole rows).
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------
def _forward_triton(x, conv_weight, conv_bias, pairs, norm_weight, norm_bias, eps):
    y, mean, rstd = _dw._forward_triton(x, conv_weight, conv_bias, False, True, eps)
    return y, _pp._forward_triton(y, pairs, (mean, rstd, norm_weight, norm_bias)), mean, rstd


def _backward_triton(grad_y, grad_pooled, x, y, mean, rstd, conv_weight, conv_bias, norm_weight, pairs):
    gy, dnw, dnb = _pp._ln_backward_triton(grad_pooled, y, mean, rstd, norm_weight, pairs, grad_in=grad_y)
    return (*_dw._backward_triton(gy, x, conv_weight, conv_bias, False, True), dnw, dnb)


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def dwconv3x3_pyramid_pool_reference(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                                     grids: Sequence[Sequence[int]], norm_weight: Tensor, norm_bias: Tensor,
                                     eps: float = 1e-6):
    """The reference math: ``y = dwconv3x3_reference(x, conv_weight, conv_bias, residual=True)`` and
    ``pyramid_pool_reference(y, grids, norm_weight, norm_bias, eps)``; returns ``(y, pooled)``."""
    y = dwconv3x3_reference(x, conv_weight, conv_bias, residual=True)
    return y, pyramid_pool_reference(y, grids, norm_weight, norm_bias, eps)


def _forward_reference(x, conv_weight, conv_bias, pairs, norm_weight, norm_bias, eps):
    y = _dw._forward_reference(x, conv_weight, conv_bias, False, True)
    return (y, *_pp._ln_forward_reference(y, pairs, norm_weight, norm_bias, eps))


def _backward_reference(grad_y, grad_pooled, x, y, mean, rstd, conv_weight, conv_bias, norm_weight, pairs):
    acc = acc_dtype(y.dtype)
    gy, dnw, dnb = _pp._ln_backward_reference(grad_pooled, y.to(acc), mean, rstd, norm_weight, pairs)
    gy = (gy + grad_y.to(acc)).to(y.dtype)              # one rounding, as the kernel
    return (*_dw._backward_reference(gy, x, conv_weight, conv_bias, False, True), dnw, dnb)


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lrformer::dwconv3x3_pyramid_pool", mutates_args=())
def _op(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor], grids: List[int], norm_weight: Tensor,
        norm_bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, pooled, y's LayerNorm mean and 1/std (B, H, W) in the math dtype)."""
    pairs = _pp._pairs(grids)
    run = _forward_triton if use_kernel(x) else _forward_reference
    return run(x, conv_weight, conv_bias, pairs, norm_weight, norm_bias, eps)


@_op.register_fake
def _(x, conv_weight, conv_bias, grids, norm_weight, norm_bias, eps):
    B, H, W, C = x.shape
    acc = acc_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty((B, _pp.pyramid_total(grids), C)),
            x.new_empty((B, H, W), dtype=acc), x.new_empty((B, H, W), dtype=acc))


@torch.library.custom_op("lrformer::dwconv3x3_pyramid_pool_backward", mutates_args=())
def _backward_op(grad_y: Tensor, grad_pooled: Tensor, x: Tensor, y: Tensor, mean: Tensor, rstd: Tensor,
                 conv_weight: Tensor, conv_bias: Optional[Tensor], norm_weight: Tensor,
                 grids: List[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx in x's dtype, the conv's weight and bias gradients in their dtypes (the bias's: the weight's when
    there is none), the LayerNorm's weight and bias gradients in the math dtype)."""
    pairs = _pp._pairs(grids)
    run = _backward_triton if use_kernel(x) else _backward_reference
    return run(grad_y, grad_pooled, x, y, mean, rstd, conv_weight, conv_bias, norm_weight, pairs)


@_backward_op.register_fake
def _(grad_y, grad_pooled, x, y, mean, rstd, conv_weight, conv_bias, norm_weight, grids):
    C = x.shape[-1]
    acc = acc_dtype(x.dtype)
    return (x.new_empty(x.shape), conv_weight.new_empty(conv_weight.shape),
            conv_weight.new_empty((C,), dtype=conv_bias.dtype if conv_bias is not None else conv_weight.dtype),
            x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc))


def _setup_context(ctx, inputs, output):
    x, conv_weight, conv_bias, grids, norm_weight, norm_bias, _eps = inputs
    y, _, mean, rstd = output
    ctx.save_for_backward(x, y, mean, rstd, conv_weight, conv_bias, norm_weight)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)                    # (no zero-filled gradients of the statistics)
    ctx.grids = list(grids)
    ctx.norm_dtypes = (norm_weight.dtype, norm_bias.dtype)


def _backward(ctx, grad_y, grad_pooled, _dmean, _drstd):
    x, y, mean, rstd, conv_weight, conv_bias, norm_weight = ctx.saved_tensors
    if grad_y is None and grad_pooled is None:
        return None, None, None, None, None, None, None
    if grad_y is None:
        grad_y = torch.zeros_like(y)
    if grad_pooled is None:
        grad_pooled = torch.zeros((y.shape[0], _pp.pyramid_total(ctx.grids), y.shape[-1]), dtype=y.dtype,
                                  device=y.device)
    dx, dw, db, dnw, dnb = _backward_op(grad_y, grad_pooled, x, y, mean, rstd, conv_weight, conv_bias, norm_weight,
                                        ctx.grids)
    return (dx, dw, db if conv_bias is not None else None, None, dnw.to(ctx.norm_dtypes[0]),
            dnb.to(ctx.norm_dtypes[1]), None)


_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def dwconv3x3_pyramid_pool(x: Tensor, conv_weight: Tensor, conv_bias: Optional[Tensor],
                           grids: Sequence[Sequence[int]], norm_weight: Tensor, norm_bias: Tensor,
                           eps: float = 1e-6):
    """``y = x + dwconv3x3(x) + conv_bias`` and the pyramid pooling of ``layer_norm(y)``, as one op.

    x: ``(B, H, W, C)``, any strides; conv_weight ``(C, 1, 3, 3)`` and conv_bias ``(C,)`` or None (x's dtype, or
    float32 with a float16/bfloat16 x); grids: 1 to 8 ``(gh, gw)`` pairs; norm_weight/norm_bias ``(C,)``, eps > 0.
    Returns ``(y, pooled)``: y a contiguous ``(B, H, W, C)`` in x's dtype, pooled ``(B, sum(gh*gw), C)`` as
    :func:`~lrformer_kernels.pyramid_pool` lays it out.  Differentiable in x and the four parameters; the
    normalised map is never materialised, and y's gradients from its two uses are summed inside the backward.
    """
    check_tensor(x, "x", ndim=4, dtypes=FLOAT_DTYPES)
    _dw.check_conv_parameters(x, conv_weight, conv_bias, ("conv_weight", "conv_bias"))
    flat = _pp._check_grids(grids)
    if norm_weight is None or norm_bias is None:
        raise ValueError("norm_weight and norm_bias are required (the LayerNorm whose output is pooled)")
    _pp.check_layer_norm(x, norm_weight, norm_bias, eps)
    y, pooled, _, _ = _op(x, conv_weight, conv_bias, flat, norm_weight, norm_bias, float(eps))
    return y, pooled
