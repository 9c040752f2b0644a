"""The traffic model: bytes the eager path and the fused path move, counted as the ops run.

Nothing here is a timing.  Each case runs once on the ``meta`` device (the real op sequence at the
real sizes, no data, no GPU: the same numbers on any machine) under a ``TorchDispatchMode`` that sees
every aten op after autograd, forward and backward, and every fused op (``lrformer::*``) as the one
opaque node it is.  Counting rules, the same for both paths:

* an op reads each tensor argument once and writes each output once: bytes = distinct elements x
  element size (a broadcast, stride-0 dim counts once).  That is the op's compulsory traffic, as if
  each op were one kernel whose own re-reads (tiles shared by programs, L2 hits) cost nothing -- the
  rule favours the eager path, whose ops are mostly library kernels;
* views and other aliasing ops (view, permute, slice, expand, detach, ...) and allocations
  (``empty*``) move nothing; ``zeros``/``ones``/``full`` and their ``*_like`` write their output and
  read nothing; in-place ops read their operands and write the tensor they mutate, and the ones that
  overwrite it (``copy_``, ``fill_``, ``zero_``, random fills) do not read it first;
* a fused op counts the same, plus what its kernels move beyond their arguments and outputs by design:
  tensors read by more than one of its launches and the buffers it keeps between them
  (:data:`FUSED_EXTRA`, one rule per op, each stated in its docstring).

The ratio eager / fused is therefore a bound on the speed-up of a memory-bound step (what the fused
kernels can win when bandwidth is the limit), not a measured or predicted time.  Cases: LRSA (with its
stage's depthwise convs) and one Block of each LRFormer-S stage, forward and forward+backward; the
LRFormer-S encoder forward; the LRFormer-S segmentor forward+backward alone (a gradient on its logits);
a full training step of it (forward, its loss, backward, AdamW step).  The peers beside eager: each case
under ``torch.compile``, the eager model and the fused one (:mod:`.inductor`: inductor scheduled for a
modelled CUDA device, its own count of what every generated kernel and extern call reads and writes, the
same rule; the training step compiles forward, loss and backward as one function and adds the eager AdamW
step).  Beside the bytes, the FLOPs of
matrix products and convolutions (:func:`op_flops`), recomputation in the fused ops included.  bf16 tensors throughout, parameters included (with autocast the per-step
weight casts and fp32 master weights would add the same bytes to both paths).
"""
from __future__ import annotations

import contextlib
import importlib
from collections import Counter
from typing import Callable, Dict, List

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..registry import S_DIMS, S_HEADS
from .common import Case, Config, size_str

VIEW_LIKE = {"_unsafe_view", "_reshape_alias", "alias", "lift_fresh"}   # views whose schema says nothing
ALLOCATE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
FILL = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like", "new_zeros", "new_ones", "new_full",
        "scalar_tensor", "arange", "rand", "randn", "rand_like", "randn_like"}
OVERWRITE = {"copy_", "fill_", "zero_", "bernoulli_", "uniform_", "normal_", "random_", "exponential_"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct elements x element size (stride-0 dims count once)."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(x) -> List[torch.Tensor]:
    return [t for t in tree_leaves(x) if isinstance(t, torch.Tensor)]


def _all_bytes(x) -> int:
    return sum(tensor_bytes(t) for t in _tensors(x))


# ------------------------------------------------------------------------------ fused ops' extras
def _kernels(op: str):
    return importlib.import_module(f"lrformer_kernels.{op}")


def _no_extra(args, out) -> int:
    """One launch that reads its arguments and writes its outputs."""
    return 0


def _ln_pool_forward_extra(args, out) -> int:
    """Two launches: the LayerNorm statistics (x read, mean and 1/std written), then the pooling (x read again,
    each pixel normalised as it is loaded: the statistics read once more; the grids' windows hit L2)."""
    x, (_, mean, rstd) = args[0], out
    return tensor_bytes(x) + tensor_bytes(mean) + tensor_bytes(rstd)


def _ln_pool_backward_extra(args, out) -> int:
    """One launch (the pooled gradient gathered from L1/L2, x and the statistics read once, dx written once)
    writing fp32 partials (programs, 2, C) of the LayerNorm's weight and bias gradients, read by the fixed-order
    sums."""
    pp = _kernels("pyramid_pool")
    x = args[1]
    B, H, W, C = x.shape
    with _gpu_tiles():
        programs = pp._ln_backward_config(C, B * H * W, x.element_size(), x.device)[3]
    return 2 * programs * 2 * C * _acc_size(x)


def _dwconv_pool_forward_extra(args, out) -> int:
    """Two launches: the depthwise conv (x read, y and its LayerNorm statistics written: whole-row tiles), then the
    pooling (y read again, the statistics once more), plus the conv's (9, C) weight copy."""
    y, _, mean, rstd = out
    return tensor_bytes(y) + tensor_bytes(mean) + tensor_bytes(rstd) + _dwconv_forward_extra(args, out)


def _dwconv_pool_backward_extra(args, out) -> int:
    """Two launches: the pooling's LayerNorm backward (as ``layer_norm_pyramid_pool_backward``'s, dy added as y's
    gradient is written), then the depthwise conv's backward (y's gradient read again, x: as
    ``dwconv3x3_backward``'s): y's gradient written and read, both launches' partials, the weight copy."""
    grad_y, grad_pooled, x, y, mean, rstd, conv_weight = args[:7]
    return (2 * tensor_bytes(grad_y) + _ln_pool_backward_extra((grad_pooled, y), None)
            + _dwconv_backward_extra((grad_y, x, conv_weight), None))


def _lowres_attention_backward_extra(args, out) -> int:
    """Two launches: the dQ kernel (reads q, dO, the row max and row sum once, k and v twice: one pass
    over the keys for delta = sum p dP, fp32 B*heads*Nq, written; one for dQ), then the dK/dV kernel
    (reads k, v, q, dO, the row max and row sum, and delta).  Beyond the arguments read once: k, v twice
    more, q, dO, row max and row sum once more, delta written once and read once."""
    grad_out, q, k, v, row_max, row_sum = args[:6]
    delta = tensor_bytes(row_max)
    return (tensor_bytes(grad_out) + tensor_bytes(q) + 2 * tensor_bytes(k) + 2 * tensor_bytes(v)
            + tensor_bytes(row_max) + tensor_bytes(row_sum) + 2 * delta)


def _dwconv_forward_extra(args, out) -> int:
    """One launch, plus the (9, C) channel-contiguous copy of the weight it reads (9C read + written)."""
    return 2 * tensor_bytes(args[1])


def _dwconv_backward_extra(args, out) -> int:
    """One launch that writes fp32 partial sums (programs, 10, C) of the weight and bias gradients, a
    fixed-order sum that reads them, and the (9, C) weight copy (as in the forward)."""
    dw = _kernels("dwconv")
    x = args[1]
    with _gpu_tiles():
        n_prog = dw._backward_config(x)[3]
    return 2 * n_prog * 10 * x.shape[-1] * 4 + 2 * tensor_bytes(args[2])


def _upsample_residual_backward_extra(args, out) -> int:
    """One launch (d_low gathered, grad read through its strides; d_x is grad itself), plus, with a
    layer scale, fp32 partials (B*h*NJ, C) of d_scale written and read by a fixed-order sum."""
    ur = _kernels("upsample_residual")
    grad, low, scale = args[0], args[1], args[2]
    if scale is None:
        return 0
    B, H, W, C = grad.shape
    h, w = low.shape[1], low.shape[2]
    with _gpu_tiles():
        block_j = ur._backward_config(H, W, w, C)[0]
    nj = -(-w // block_j)
    return 2 * B * h * nj * C * 4


def _acc_size(t: torch.Tensor) -> int:
    return 8 if t.dtype == torch.float64 else 4


def _cast_extra(numel: int, t: torch.Tensor) -> int:
    """An fp32 (fp64) buffer of ``numel`` elements cast to ``t``'s dtype at the end: the buffer is written
    by the kernel and read by the cast (nothing when the dtype is the accumulation dtype)."""
    return 0 if t.element_size() == _acc_size(t) else 2 * numel * _acc_size(t)


def _ms_deform_attn_backward_extra(args, out) -> int:
    """One launch.  Default: an fp32 value-gradient buffer zero-filled, accumulated by atomics (inside the
    launch) and cast; deterministic mode instead writes every tap's contribution (B, Nq, M, L, P, 4, D) fp32
    and its int64 row, which ``index_put_`` reads into a zero-filled buffer.  The location and weight
    gradients are fp32 buffers cast to the inputs' dtypes."""
    grad_out, value, _shapes, loc, wgt = args[:5]
    B, S, M, D = value.shape
    _, NQ, _, L, P, _ = loc.shape
    acc = _acc_size(value)
    extra = _cast_extra(loc.numel(), loc) + _cast_extra(wgt.numel(), wgt)
    if torch.are_deterministic_algorithms_enabled():
        taps = B * NQ * M * L * P * 4
        return extra + 2 * taps * D * acc + 2 * taps * 8 + 3 * (B * S * M + 1) * D * acc + B * S * M * D * acc
    return extra + B * S * M * D * acc + (0 if value.element_size() == acc else B * S * M * D * acc)


def _hrca_attention_backward_extra(args, out) -> int:
    """One launch for dq (and, by default, dk/dv by atomics into zero-filled fp32 maps, cast at the end).
    Deterministic mode: the launch stores delta (fp32 per row, read back once); the (query, slot) pairs are
    sorted by window (counted as six passes over them in int64: a model of the sort and the CSR build); a
    second launch per window re-reads q, dO, k, v and the row max and sum, and writes dk/dv once."""
    grad_out, q, k, v, win = args[:5]
    row_stats = tensor_bytes(args[6])
    if torch.are_deterministic_algorithms_enabled():
        return (2 * row_stats + 2 * row_stats + tensor_bytes(q) + tensor_bytes(grad_out) + tensor_bytes(k)
                + tensor_bytes(v) + 6 * win.numel() * 8)
    return 2 * k.numel() * _acc_size(k) + _cast_extra(k.numel(), k) + _cast_extra(v.numel(), v)


def _loss_forward_extra(args, out) -> int:
    """One launch (labels read once, the logits' taps from L2) writing fp32 per-program partials of the
    NLL sum and the count, read by the fixed-order sum."""
    uce = _kernels("upsampled_cross_entropy")
    logits, labels = args[0], args[1]
    with _gpu_tiles():
        block_p = uce._forward_config(labels.numel(), logits.shape[1])[0]
    return 2 * 2 * (-(-labels.numel() // block_p)) * _acc_size(logits)


def _irb_forward_extra(args, out) -> int:
    """Two launches: fc1 (LayerNorm prologue; writes u and the row statistics) and fc2 (reads u once: its 9
    taps and the output tiles of a row tile hit L1/L2; reads the shortcut, x itself again when none is
    given), plus the (9, HD) copy of the depthwise weight."""
    x, wc, shortcut = args[0], args[3], args[12]
    u = out[1]
    return tensor_bytes(u) + (tensor_bytes(x) if shortcut is None else 0) + 2 * tensor_bytes(wc)


def _weight_grad_partials(kind: str, M: int, n: int, k: int, acc: int, dots: bool) -> int:
    """The split-M weight gradient's bytes besides its operands and its gradient: with several splits the fp32
    partials (splits, n, k) written and read once by the fixed-order sum kernel (which writes the gradient; one
    split writes it directly); the bias partials (splits, n) and, with ``dots``, the row dots' partials (column
    tiles, n) written and summed."""
    irb = _kernels("irb")
    with _gpu_tiles():
        bk, splits = irb._split_m_config(kind, M, n, k, torch.device("meta"))[2::3]
        sum_bk = irb._config("sum", 1, n, k)[2]
    col_tiles = -(-k // (bk if splits == 1 else sum_bk))
    return 2 * acc * ((splits * n * k if splits > 1 else 0) + splits * n + (col_tiles * n if dots else 0))


def _fc2_weight_grad_extra(args, out) -> int:
    """One launch (dy read once, times the drop-path factor as it is loaded; u's 9 taps from L1/L2, u read once
    per output-channel tile: the tiles of a pixel chunk run together) and, with several splits, the sum
    kernel; the (9, HD) weight copy."""
    dy, u, wc, w2 = args[0], args[1], args[2], args[6]
    return (_weight_grad_partials("dw2", dy.shape[0], dy.shape[1], u.shape[-1], _acc_size(u), w2 is not None)
            + 2 * tensor_bytes(wc))


def _fc1_weight_grad_extra(args, out) -> int:
    """One launch (du read once: the channel tiles of a chunk are consecutive programs; x and the row
    statistics once, the normalised input recomputed) and, with several splits, the sum kernel."""
    du, x = args[0], args[1]
    return _weight_grad_partials("dw1", du.shape[0], du.shape[1], x.shape[-1], _acc_size(x), False)


def _dgrad_tiles(dv, u, wgrad: bool = False):
    """(tiles, own-tile rows, halo-tile rows, splits, hidden chunks, BLOCK_K) of the dgrad kernel on the GPU tiles."""
    irb = _kernels("irb")
    B, H, W, HD = u.shape
    with _gpu_tiles():
        oh, ow, _, bk, _, tiles_h, tiles_w, _, splits = irb._dgrad_config(B, H, W, dv.shape[1], HD, u.device, wgrad)
    return (B * tiles_h * tiles_w, *irb._dgrad_rows(oh, ow), splits, -(-HD // bk), bk)


def _dgrad_extra(args, out) -> int:
    """One launch.  dy is read from DRAM once, scaled to dv as it is loaded (the hidden-chunk programs of a split
    are consecutive programs walking the same tiles; the regions' halo rows and columns hit L2), u once (its 9 taps from L1/L2), du
    written once; the per-program fp32 partials (splits, 10, HD) written and read by the fixed-order sum;
    each program's da scratch tile is rewritten per tile in L1/L2, charged once (its write-back); the (9, HD)
    weight copy."""
    return _dgrad_launch_extra(args[0], args[1], args[3], False)


def _dgrad_launch_extra(dv, u, wc, wgrad: bool) -> int:
    """The dgrad kernel's bytes beyond its operands and outputs: the per-program fp32 partials (splits, 10, HD) (11
    rows with ``wgrad``: fc1's bias) written and read, one scratch-tile write-back per program, the weight copy."""
    _, _, ph, splits, chunks, bk = _dgrad_tiles(dv, u, wgrad)
    acc = _acc_size(u)
    rows = 11 if wgrad else 10
    return 2 * splits * rows * u.shape[-1] * acc + splits * chunks * ph * bk * acc + 2 * tensor_bytes(wc)


def _hidden_grads_extra(args, out) -> int:
    """One launch of the dgrad kernel with the weight gradients (as :func:`_dgrad_extra`: dy and u from DRAM once,
    du written once, the partials (splits, 11, HD), the da scratch tiles, the weight copy; x and the row statistics
    once, their tiles shared by a split's hidden-chunk programs from L2), plus fc1's and fc2's fp32 partials
    (splits, HD, C) each, updated in place in L1/L2 and charged once written, read by the fixed-order sum kernels,
    fc2's bias partials (splits, C) and, with the layer scale's gradient, the row dots' partials; the (B, C)
    drop-path factor; w2's copy in the hidden dtype when the parameters are wider (autocast)."""
    irb = _kernels("irb")
    dy, u, w2, wc, need_scale = args[0], args[1], args[5], args[6], args[13]
    C, HD = dy.shape[1], u.shape[-1]
    splits = _dgrad_tiles(dy, u, True)[3]
    acc = _acc_size(u)
    with _gpu_tiles():
        sum_bk = irb._config("sum", 1, C, HD)[2]
    extra = _dgrad_launch_extra(dy, u, wc, True)
    extra += 2 * acc * (2 * splits * HD * C + splits * C + (-(-HD // sum_bk) * C if need_scale else 0))
    extra += 2 * u.shape[0] * C * acc if args[9] is not None else 0
    return extra + (2 * w2.numel() * u.element_size() if w2.dtype != u.dtype else 0)


def _input_grad_extra(args, out) -> int:
    """One launch (du read once, w1 from L2 by every program; x, the row statistics and dy once) writing dx and,
    with the LayerNorm, fp32 partials (programs, 2, C) of its weight and bias gradients read by the fixed-order
    sums; row tiles wider than the kernel's element budget add dy after storing the tile, re-reading the program's
    own dx rows from L1/L2 (dx's write-back charged once).  Maps wider than the kernel takes: torch.mm and ATen's
    LayerNorm backward, counted op by op."""
    irb = _kernels("irb")
    du, x, norm_weight = args[0], args[2], args[5]
    C = x.shape[-1]
    if C > irb.DX_MAX_C:
        inner = TrafficCounter()
        with inner:
            irb._input_grad_reference(*args)
        return inner.bytes - _all_bytes(args) - _all_bytes(out)
    with _gpu_tiles():
        programs = irb._dx_config(du.shape[0], C, du.shape[1], du.device)[5]
    return 2 * programs * 2 * C * _acc_size(x) if norm_weight is not None else 0


def _irb_backward_inner(args) -> "TrafficCounter":
    """The IRB backward's own sequence (GEMMs by torch.mm, the depthwise conv's recompute and backward ops,
    the LayerNorm recompute and backward) counted op by op as it runs on the meta device."""
    inner = TrafficCounter()
    with inner:
        _kernels("irb")._backward_impl(*args)
    return inner


def _irb_backward_extra(args, out) -> int:
    """What :func:`_irb_backward_inner` counts beyond the arguments read once and the gradients written once."""
    return _irb_backward_inner(args).bytes - _all_bytes(args) - _all_bytes(out)


#: ``lrformer::<op>`` -> bytes its kernels move beyond reading each argument and writing each output once.
FUSED_EXTRA: Dict[str, Callable] = {
    "lrformer::pyramid_pool": _no_extra,            # one launch; the grids' overlapping windows hit L2
    "lrformer::pyramid_pool_backward": _no_extra,   # one launch, a gather: grad_x written once
    "lrformer::layer_norm_pyramid_pool": _ln_pool_forward_extra,
    "lrformer::layer_norm_pyramid_pool_backward": _ln_pool_backward_extra,
    "lrformer::dwconv3x3_pyramid_pool": _dwconv_pool_forward_extra,
    "lrformer::dwconv3x3_pyramid_pool_backward": _dwconv_pool_backward_extra,
    "lrformer::lowres_attention": _no_extra,        # one launch (online softmax)
    "lrformer::lowres_attention_backward": _lowres_attention_backward_extra,
    "lrformer::upsample_residual": _no_extra,       # one launch
    "lrformer::upsample_residual_backward": _upsample_residual_backward_extra,
    "lrformer::dwconv3x3": _dwconv_forward_extra,
    "lrformer::dwconv3x3_backward": _dwconv_backward_extra,
    "lrformer::hrca_attention": _no_extra,          # one launch (online softmax over the gathered windows)
    "lrformer::hrca_attention_backward": _hrca_attention_backward_extra,
    "lrformer::ms_deform_attn": _no_extra,          # one launch (+ a cached per-shapes level table)
    "lrformer::ms_deform_attn_backward": _ms_deform_attn_backward_extra,
    "lrformer::upsampled_cross_entropy": _loss_forward_extra,
    # one launch: the class tiles of a cell are consecutive programs and the two low rows a label row
    # feeds are resident together, so the labels and lse are read from DRAM once, the logits' taps hit L2
    "lrformer::upsampled_cross_entropy_backward": _no_extra,
    "lrformer::irb": _irb_forward_extra,
    "lrformer::irb_backward": _irb_backward_extra,
    "lrformer::irb_fc2_weight_grad": _fc2_weight_grad_extra,
    "lrformer::irb_dgrad": _dgrad_extra,
    "lrformer::irb_fc1_weight_grad": _fc1_weight_grad_extra,
    "lrformer::irb_input_grad": _input_grad_extra,
    "lrformer::irb_hidden_grads": _hidden_grads_extra,
}


# ------------------------------------------------------------------------------ FLOPs (2 per multiply-add)
# Matrix products and convolutions only (torch.utils.flop_counter's convention, which counts the eager
# path's aten ops): elementwise work, softmax, pooling and interpolation count nothing on either path.  A
# fused op counts the products its kernels compute, recomputation included.
def _attention_flops(B, heads, nq, m, d, products: int) -> int:
    return products * 2 * B * heads * nq * m * d


def _lowres_attention_flops(args, out) -> int:
    """Forward: q k^T and p v.  (The head count is in the output's row statistics: (B, heads, Nq).)"""
    q, k = args[0], args[1]
    B, heads, nq = out[1].shape
    return _attention_flops(B, heads, nq, k.shape[1], q.shape[-1] // heads, 2)


def _lowres_attention_backward_flops(args, out) -> int:
    """The dQ kernel's two key passes (q k^T and dO v^T for delta, then q k^T, dO v^T and dS k) and the
    dK/dV kernel (q k^T, dO v^T, p^T dO, dS^T q): 9 products where an unfused backward needs 4 (+2 saved)."""
    grad_out, q, k, _, row_max = args[:5]
    B, heads, nq = row_max.shape
    return _attention_flops(B, heads, nq, k.shape[1], q.shape[-1] // heads, 9)


def _dwconv_flops(args, out) -> int:
    return 2 * 9 * args[0].numel()


def _dwconv_backward_flops(args, out) -> int:
    return 2 * 2 * 9 * args[1].numel()            # d_input (conv transpose) and d_weight


def _dwconv_pool_backward_flops(args, out) -> int:
    return _dwconv_backward_flops(args[1:], out)   # (x is its second argument, as dwconv3x3_backward's)


def _irb_flops(args, out) -> int:
    """fc1 and fc2 (2 M C HD each) and the depthwise conv, recomputed for every fc2 output tile."""
    irb = _kernels("irb")
    x, w1 = args[0], args[1]
    C, HD = x.shape[-1], w1.shape[0]
    M = x.numel() // C
    with _gpu_tiles():
        bn = irb._config("fc2", M, C, HD)[1]
    return 2 * 2 * M * C * HD + 2 * 9 * M * HD * (-(-C // bn))


def _fc2_weight_grad_flops(args, out) -> int:
    """dv^T a (2 M C HD), the depthwise conv recomputed for every output-channel tile, the layer scale's row dots
    (2 C HD)."""
    irb = _kernels("irb")
    dv, u, w2 = args[0], args[1], args[6]
    M, C, HD = dv.shape[0], dv.shape[1], u.shape[-1]
    with _gpu_tiles():
        bn = irb._split_m_config("dw2", M, C, HD, u.device)[1]
    return 2 * M * C * HD + 2 * 9 * M * HD * (-(-C // bn)) + (2 * C * HD if w2 is not None else 0)


def _fc1_weight_grad_flops(args, out) -> int:
    """du^T [xn | 1]: 2 M HD (C + 1), as the product with a column of ones it replaces."""
    du, x = args[0], args[1]
    return 2 * du.shape[0] * du.shape[1] * (x.shape[-1] + 1)


def _input_grad_flops(args, out) -> int:
    """dxn = du w1: 2 M HD C."""
    du, x = args[0], args[2]
    return 2 * du.shape[0] * du.shape[1] * x.shape[-1]


def _dgrad_flops(args, out) -> int:
    """da = dv w2 on every tile with its halo, the padding rows and the part off the map included (2 PH C HD a
    tile), the transposed depthwise conv and the weight taps on the own tile's rows (2 x 2 x 9 PO HD a tile)."""
    return _dgrad_launch_flops(args[0], args[1], False)


def _dgrad_launch_flops(dv, u, wgrad: bool) -> int:
    """:func:`_dgrad_flops` on the kernel's tiles; with ``wgrad`` also fc1's and fc2's weight-gradient products
    and fc2's depthwise input recomputed on the own tile's rows (2 x 2 PO C HD + 2 x 9 PO HD a tile)."""
    tiles, po, ph, _, _, _ = _dgrad_tiles(dv, u, wgrad)
    C, HD = dv.shape[1], u.shape[-1]
    flops = 2 * tiles * ph * C * HD + 2 * 2 * 9 * tiles * po * HD
    return flops + (2 * 2 * tiles * po * C * HD + 2 * 9 * tiles * po * HD if wgrad else 0)


def _hidden_grads_flops(args, out) -> int:
    """The dgrad kernel's with the weight gradients (:func:`_dgrad_launch_flops`) and the layer scale's row dots
    (2 C HD)."""
    dy, u = args[0], args[1]
    return _dgrad_launch_flops(dy, u, True) + (2 * dy.shape[1] * u.shape[-1] if args[13] else 0)


def _irb_backward_flops(args, out) -> int:
    return _irb_backward_inner(args).flops


def _no_flops(args, out) -> int:
    return 0


#: ``lrformer::<op>`` -> its FLOPs; an op not listed computes no matrix products (pooling, resizing, the
#: loss, the decoders' sampling ops are not in the traffic cases)
FUSED_FLOPS: Dict[str, Callable] = {
    "lrformer::lowres_attention": _lowres_attention_flops,
    "lrformer::lowres_attention_backward": _lowres_attention_backward_flops,
    "lrformer::dwconv3x3": _dwconv_flops,
    "lrformer::dwconv3x3_backward": _dwconv_backward_flops,
    "lrformer::dwconv3x3_pyramid_pool": _dwconv_flops,
    "lrformer::dwconv3x3_pyramid_pool_backward": _dwconv_pool_backward_flops,
    "lrformer::irb": _irb_flops,
    "lrformer::irb_backward": _irb_backward_flops,
    "lrformer::irb_fc2_weight_grad": _fc2_weight_grad_flops,
    "lrformer::irb_dgrad": _dgrad_flops,
    "lrformer::irb_fc1_weight_grad": _fc1_weight_grad_flops,
    "lrformer::irb_input_grad": _input_grad_flops,
    "lrformer::irb_hidden_grads": _hidden_grads_flops,
}


def _convolution_backward_flops(args) -> int:
    """d_input and d_weight (as output_mask asks) each cost the forward's products, groups respected
    (torch.utils.flop_counter's formula ignores groups: it counts a depthwise conv's backward C times)."""
    grad_out, weight, mask = args[0], args[2], args[10]
    one = 2 * grad_out.numel() * weight[0].numel()
    return one * (int(mask[0]) + int(mask[1]))


def op_flops(func, args, kwargs, out) -> int:
    """FLOPs of one dispatched op: torch.utils.flop_counter's formula for aten ops, :data:`FUSED_FLOPS` for ours."""
    if func.namespace == "lrformer":
        return FUSED_FLOPS.get(func.name(), _no_flops)(args, out)
    if func._overloadpacket is torch.ops.aten.convolution_backward:
        return _convolution_backward_flops(args)
    from torch.utils.flop_counter import flop_registry
    formula = flop_registry.get(func._overloadpacket)
    return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


@contextlib.contextmanager
def _gpu_tiles():
    """The CUDA dispatch's tile and grid choices for the modelled device (its SM count sets the split-M and
    per-program partials), even under the interpreter (the fused extras depend on them)."""
    import lrformer_kernels._common as common

    from .inductor import MODEL_SMS
    old = common.INTERPRETER_BIG_TILES, common.DEFAULT_SMS
    common.INTERPRETER_BIG_TILES, common.DEFAULT_SMS = False, MODEL_SMS
    try:
        yield
    finally:
        common.INTERPRETER_BIG_TILES, common.DEFAULT_SMS = old


# ------------------------------------------------------------------------------------- the counter
class TrafficCounter(TorchDispatchMode):
    """Counts the bytes of every op dispatched inside it (rules in the module docstring)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.flops = 0                    # matrix-product and convolution FLOPs (see op_flops)
        self.ops = 0                      # dispatched ops that move bytes (aten ops and fused ops)
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "aten" and func._can_decompose():
            # a composite op (to, reshape, contiguous, ...) reaches the mode undecomposed below autograd (the
            # sequences a fused op's rule runs inside another op): count what it decomposes into (a cast or a
            # copy), not the op, whose schema says it may alias its input
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        n = op_bytes(func, args, kwargs, out)
        self.flops += op_flops(func, args, kwargs, out)
        if n is not None:
            self.bytes += n
            self.ops += 1
            self.by_op[func.name()] += n
        return out


def op_bytes(func, args, kwargs, out):
    """Bytes one dispatched op moves, or None for an op that moves nothing (views, allocations)."""
    schema = func._schema
    if any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns):
        return None                                              # a view / alias of an input
    name = func.overloadpacket.__name__
    if name in ALLOCATE or name in VIEW_LIKE:
        return None
    mutated = set()
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            val = args[i] if i < len(args) else kwargs.get(a.name)
            mutated.update(id(t) for t in _tensors(val))
    outs = _tensors(out)
    if not outs and not mutated:
        return None                                              # sizes, .item(): no kernel
    operands = _tensors((args, kwargs))
    writes = _all_bytes(outs) if outs else sum(tensor_bytes(t) for t in operands if id(t) in mutated)
    if name in FILL:
        return writes
    reads = sum(tensor_bytes(t) for t in operands if id(t) not in mutated or name not in OVERWRITE)
    total = reads + writes
    if func.namespace == "lrformer":
        rule = FUSED_EXTRA.get(func.name())
        if rule is None:
            raise KeyError(f"no traffic rule for the fused op {func.name()} (add one to FUSED_EXTRA)")
        total += rule(args, out)
    return total


# ------------------------------------------------------------------------------------------- cases
def _meta_module(build: Callable, fused: bool) -> nn.Module:
    """The module built on meta in bf16, fused or not."""
    import lrformer_kernels
    with torch.device("meta"):
        module = build()
    module = module.to(torch.bfloat16)
    return lrformer_kernels.fuse(module) if fused else module


def _count(build: Callable, run: Callable, fused: bool) -> TrafficCounter:
    """Count one ``run(module)`` of the module built on meta in bf16 (fused or not)."""
    counter = TrafficCounter()
    module = _meta_module(build, fused)
    with counter:
        run(module)
    return counter


def _stage_module(kind: str, s: int) -> nn.Module:
    from .. import attention_baselines as AB
    from .modules import StageBlock
    return AB.LRSAAttention(S_DIMS[s - 1], S_HEADS[s - 1]) if kind == "LRSA" else StageBlock(s)


def _same(fn):
    return fn


def _module_run(shape, backward: bool):
    def run(m, dev="meta", ic=None):
        m.train(backward)
        x = torch.empty(shape, device=dev, dtype=torch.bfloat16, requires_grad=backward)
        y = (ic.count if ic else _same)(m)(x)
        if backward:
            y.backward(torch.empty_like(y))
    return run


def _encoder_run(img, batch):
    def run(m, dev="meta", ic=None):
        m.eval()
        with torch.no_grad():
            (ic.count if ic else _same)(m)(torch.empty(batch, 3, img[0], img[1], device=dev, dtype=torch.bfloat16))
    return run


def _adamw_step(params):
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _adamw_bytes(params) -> int:
    """The eager AdamW step's bytes on ``params`` (meta copies, with gradients): the part of a training step
    that stays outside the compiled functions (the same in every column)."""
    metas = [torch.empty_like(p, device="meta").requires_grad_() for p in params]
    for p in metas:
        p.grad = torch.empty_like(p)
    with TrafficCounter() as counter:
        _adamw_step(metas)
    return counter.bytes


def _train_run(img, batch):
    """Forward, loss, backward (compiled as one function in the compile columns), then the AdamW step."""
    def run(model, dev="meta", ic=None):
        model.train()
        images = torch.empty(batch, 3, img[0], img[1], device=dev, dtype=torch.bfloat16)
        labels = torch.empty(batch, img[0], img[1], device=dev, dtype=torch.long)
        loss = (ic.count if ic else _same)(lambda im, lb: model.loss(im, lb, model(im)))(images, labels)
        loss.backward()
        if ic:
            ic.bytes += _adamw_bytes(list(model.parameters()))
        else:
            _adamw_step(model.parameters())
    return run


def _model_run(img, batch):
    """The segmentor alone, forward and backward (a gradient on its stride-8 logits): the step without its
    loss and optimizer, whose bytes would dilute the model's ratio."""
    def run(model, dev="meta", ic=None):
        model.train()
        logits = (ic.count if ic else _same)(model)(
            torch.empty(batch, 3, img[0], img[1], device=dev, dtype=torch.bfloat16))
        logits.backward(torch.empty_like(logits))
    return run


def _compile_count(build: Callable, run: Callable, fused: bool) -> int:
    """The bytes ``torch.compile`` moves on ``run`` (the eager or the fused module compiled), modelled for
    CUDA by :class:`~benchmarks.sweeps.inductor.InductorCount` on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .inductor import InductorCount
    module = _meta_module(build, fused)
    ic = InductorCount(FUSED_EXTRA)
    with _gpu_tiles(), ic.device(), FakeTensorMode(allow_non_fake_inputs=True):
        run(module.to_empty(device="cpu"), "cpu", ic)
    return ic.bytes


def traffic_row(build: Callable, run: Callable, compiled: bool = True) -> dict:
    """The row of one case: bytes, GB, dispatched ops of each path, their ratio, the eager path's top ops;
    with ``compiled``, the bytes of both under ``torch.compile`` (modelled CUDA inductor)."""
    eager, fused = _count(build, run, False), _count(build, run, True)
    comp = {}
    if compiled:
        cb, fcb = _compile_count(build, run, False), _compile_count(build, run, True)
        comp = dict(compile_gb=round(cb / 1e9, 4), fused_compile_gb=round(fcb / 1e9, 4),
                    compile_ratio=round(cb / fused.bytes, 3), compile_bytes=cb, fused_compile_bytes=fcb)
    top = ", ".join(f"{op.replace('aten::', '')} {b / 1e9:.2f}"
                    for op, b in eager.by_op.most_common(3))
    return dict(eager_bytes=eager.bytes, fused_bytes=fused.bytes, eager_gb=round(eager.bytes / 1e9, 4),
                fused_gb=round(fused.bytes / 1e9, 4), ratio=round(eager.bytes / fused.bytes, 3),
                eager_ops=eager.ops, fused_ops=fused.ops, eager_top_gb=top,
                fused_op_gb=round(sum(b for op, b in fused.by_op.items() if op.startswith("lrformer::")) / 1e9, 4),
                eager_gflop=round(eager.flops / 1e9, 2), fused_gflop=round(fused.flops / 1e9, 2),
                flop_ratio=round(fused.flops / eager.flops, 3) if eager.flops else None, **comp)


def traffic_cases(cfg: Config) -> List[Case]:
    from lrformer import create_model
    from lrformer.factory import create_encoder

    from ..registry import stage_map_size
    cases: List[Case] = []
    B, tc = cfg.traffic_batch, cfg.traffic_compile
    for img in cfg.traffic_sizes:
        base = dict(section="traffic", image=size_str(img), batch=B, dtype="bf16")
        for kind in ("LRSA", "Block"):
            for s in cfg.stages:
                h, w = stage_map_size(img[0], img[1], s)
                for mode in ("fwd", "fwd+bwd"):
                    key = dict(base, case=kind, stage=s, mode=mode, shape=f"{B}x{h}x{w}x{S_DIMS[s - 1]}")
                    cases.append(Case("traffic", key, lambda kind=kind, s=s, sh=(B, h, w, S_DIMS[s - 1]), m=mode:
                                      traffic_row(lambda: _stage_module(kind, s), _module_run(sh, m != "fwd"), tc),
                                      essential=True))
        key = dict(base, case="LRFormer-S encoder", mode="fwd", shape=f"{B}x3x{img[0]}x{img[1]}")
        cases.append(Case("traffic", key, lambda img=img: traffic_row(
            lambda: create_encoder("s"), _encoder_run(img, B), tc), essential=True))
        key = dict(base, case="LRFormer-S segmentor", mode="fwd+bwd", shape=f"{B}x3x{img[0]}x{img[1]}")
        cases.append(Case("traffic", key, lambda img=img: traffic_row(
            lambda: create_model("lrformer_s", num_classes=150), _model_run(img, B), tc), essential=True))
        key = dict(base, case="LRFormer-S training step", mode="fwd+bwd+AdamW", shape=f"{B}x3x{img[0]}x{img[1]}")
        cases.append(Case("traffic", key, lambda img=img: traffic_row(
            lambda: create_model("lrformer_s", num_classes=150), _train_run(img, B), tc), essential=True))
    return cases
