"""Fused segmentation loss: cross-entropy (mean over the labelled pixels, one ignore index) of logits
bilinearly upsampled to the labels' size, forward and backward, without the upsampled logits:

    loss = cross_entropy(interpolate(logits, size=labels.shape[-2:], mode="bilinear",
                                     align_corners=False), labels, ignore_index=ignore_index)

logits ``(B, K, h, w)`` (NCHW, as a ``conv_seg`` produces them; any strides), labels ``(B, H, W)``
integers in ``[0, K)`` or ``ignore_index``.  The upsampled ``(B, K, H, W)`` map (150 classes at 8x the
logits' size for ADE20K: 1.3 GB in float32 per 8 images of 512x512, written, read and its gradient
written and read again by the eager path) is never formed.

Design
------
* Forward (``_uce_fwd_kernel``): one program = ``BLOCK_P`` label pixels (flattened ``B*H*W``).  Their
  bilinear taps are computed once (exact integer source coordinates, as ``upsample_residual``); the
  classes are walked ``BLOCK_K`` at a time: 4 tap loads, the blend, an online log-sum-exp and the target
  logit picked on the fly.  It writes the per-pixel log-sum-exp (fp32, fp64 for fp64 logits: the
  backward's softmax) and one partial (sum of the NLL, labelled pixels) per program; a fixed-order
  ``torch.sum`` of the partials gives the mean.  0 / 0 = NaN when every pixel is ignored, as
  ``F.cross_entropy``.
* Backward (``_uce_bwd_kernel``), a deterministic *gather* (no atomics, no full-size gradient): a
  program owns one low-res row ``(b, i)``, ``BLOCK_J`` low-res columns and ``BLOCK_K`` classes, walks
  exactly the label pixels whose taps reach its cells (closed-form ranges), recomputes there the
  upsampled logits of its classes and ``p = exp(z - lse)``, forms ``(p - onehot) * grad / n_valid`` at
  labelled pixels and sums it with the bilinear weights (vertical first, then horizontal), as the
  ``upsample_residual`` backward does.  The class tiles of one cell are consecutive programs (the
  fastest grid axis), so the labels and lse they share are read from DRAM about once.
* The math is float32 (float64 for float64 logits) whatever the logits' dtype: the interpolation
  included (mmseg casts the logits to float32 before resizing them, too).  The loss is float32 (float64);
  the gradient comes back in the logits' dtype.
* Packaging: ``torch.ops.lrformer.upsampled_cross_entropy`` (-> loss, lse, n_valid) and
  ``..._backward`` custom ops with fake implementations and registered autograd.  Without a GPU (and
  without ``TRITON_INTERPRET=1``) the ops run the reference math instead of Triton.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (HAS_TRITON, acc_dtype, big_interpreter_tiles, bilinear_index_int64, cdiv, check_tensor, device_guard, launch_options,
                      needs_int64, new_empty, next_pow2, tl_acc, use_kernel)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import bilinear_gather_columns, bilinear_lerp, bilinear_support, bilinear_taps, bilinear_weight

__all__ = ["upsampled_cross_entropy", "upsampled_cross_entropy_reference"]

LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _upsampled_logits(zb, y0, y1, x0, x1, ly, lx, koff, mask, szh, szw, same_h, same_w, ACC: tl.constexpr):
        """The upsampled logits (pixels, classes) of one tile: the 4 taps of every pixel, blended."""
        v00 = tl.load(zb + (y0 * szh + x0 * szw)[:, None] + koff, mask=mask, other=0.0).to(ACC)
        v01 = tl.load(zb + (y0 * szh + x1 * szw)[:, None] + koff, mask=mask, other=0.0).to(ACC)
        v10 = tl.load(zb + (y1 * szh + x0 * szw)[:, None] + koff, mask=mask, other=0.0).to(ACC)
        v11 = tl.load(zb + (y1 * szh + x1 * szw)[:, None] + koff, mask=mask, other=0.0).to(ACC)
        return bilinear_lerp(v00, v01, v10, v11, ly, lx, same_h, same_w)

    @triton.jit
    def _uce_fwd_kernel(z_ptr, y_ptr, lse_ptr, part_ptr, NPIX, H, W, h, w, K, IGNORE,
                        szb, szk, szh, szw, syb, syh, syw,
                        INT64: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        pp = pid * BLOCK_P + tl.arange(0, BLOCK_P)
        if INT64:
            pp = pp.to(tl.int64)
        pmask = pp < NPIX
        ow = pp % W
        t = pp // W
        oh = t % H
        b = t // H
        y0, y1, ly = bilinear_taps(oh, h, H, ACC)
        x0, x1, lx = bilinear_taps(ow, w, W, ACC)
        ly = ly[:, None]
        lx = lx[:, None]
        lab = tl.load(y_ptr + b * syb + oh * syh + ow * syw, mask=pmask, other=IGNORE).to(tl.int32)
        valid = pmask & (lab != IGNORE)
        zb = z_ptr + (b * szb)[:, None]
        m = tl.full([BLOCK_P], float("-inf"), ACC)
        s = tl.zeros([BLOCK_P], ACC)
        zt = tl.zeros([BLOCK_P], ACC)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            z = _upsampled_logits(zb, y0, y1, x0, x1, ly, lx, (kk * szk)[None, :],
                                  pmask[:, None] & kmask[None, :], szh, szw, h == H, w == W, ACC)
            z = tl.where(kmask[None, :], z, float("-inf"))
            mn = tl.maximum(m, tl.max(z, axis=1))
            s = s * tl.exp(m - mn) + tl.sum(tl.exp(z - mn[:, None]), axis=1)
            m = mn
            zt += tl.sum(tl.where(kk[None, :] == lab[:, None], z, 0.0), axis=1)
        lse = m + tl.log(s)
        tl.store(lse_ptr + pp, lse, mask=pmask)
        nll = tl.where(valid, lse - zt, 0.0)
        tl.store(part_ptr + pid * 2, tl.sum(nll, axis=0))
        tl.store(part_ptr + pid * 2 + 1, tl.sum(valid.to(ACC), axis=0))

    @triton.jit
    def _uce_bwd_kernel(z_ptr, y_ptr, lse_ptr, coef_ptr, dz_ptr, H, W, h, w, K, NK, NJ, IGNORE,
                        szb, szk, szh, szw, syb, syh, syw, sdb, sdk, sdh, sdw,
                        INT64: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_J: tl.constexpr, BLOCK_OW: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)           # ((b * h + i) * NJ + j-tile) * NK + k-tile: class tiles innermost
        pid_k = pid % NK
        t = pid // NK
        pid_j = t % NJ
        pid_bi = t // NJ
        b = pid_bi // h
        i = pid_bi - b * h
        j0 = pid_j * BLOCK_J
        kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        jj = j0 + tl.arange(0, BLOCK_J)
        if INT64:                        # the sizes too: every product below (loop counters included) is 64-bit
            b = b.to(tl.int64)
            i = i.to(tl.int64)
            j0 = j0.to(tl.int64)
            kk = kk.to(tl.int64)
            jj = jj.to(tl.int64)
            H = H.to(tl.int64)
            W = W.to(tl.int64)
            h = h.to(tl.int64)
            w = w.to(tl.int64)
        kmask = kk < K
        jl = tl.minimum(j0 + BLOCK_J, w) - 1
        oh_lo, oh_hi = bilinear_support(i, i, h, H)      # the label rows / columns these cells feed
        ow_lo, ow_hi = bilinear_support(j0, jl, w, W)
        coef = tl.load(coef_ptr).to(ACC)                  # grad / n_valid
        zb = z_ptr + b * szb
        koff = (kk * szk)[None, :]
        onehot_k = kk[None, :]
        acc = tl.zeros((BLOCK_J, BLOCK_K), dtype=ACC)
        for ows in range(ow_lo, ow_hi, BLOCK_OW):
            ow = ows + tl.arange(0, BLOCK_OW)
            owmask = ow < ow_hi
            x0, x1, lx = bilinear_taps(ow, w, W, ACC)
            mask = owmask[:, None] & kmask[None, :]
            red = tl.zeros((BLOCK_OW, BLOCK_K), dtype=ACC)
            for oh in range(oh_lo, oh_hi):
                y0, y1, ly = bilinear_taps(oh, h, H, ACC)
                wy = bilinear_weight(i, y0, y1, ly)
                lab = tl.load(y_ptr + b * syb + oh * syh + ow * syw, mask=owmask, other=IGNORE).to(tl.int32)
                lse = tl.load(lse_ptr + (b * H + oh) * W + ow, mask=owmask, other=0.0)
                z = _upsampled_logits(zb, y0 + 0 * ow, y1 + 0 * ow, x0, x1, ly, lx[:, None], koff, mask,
                                      szh, szw, h == H, w == W, ACC)
                g = tl.exp(z - lse[:, None]) - tl.where(onehot_k == lab[:, None], 1.0, 0.0)
                keep = mask & (lab != IGNORE)[:, None]
                red += tl.where(keep, g * (wy * coef), 0.0)
            acc = bilinear_gather_columns(acc, red, x0, x1, lx, owmask, j0, BLOCK_J)
        m2 = (jj < w)[:, None] & kmask[None, :]
        tl.store(dz_ptr + b * sdb + i * sdh + jj[:, None] * sdw + kk[None, :] * sdk,
                 acc.to(dz_ptr.dtype.element_ty), mask=m2)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
#: GPU tiles in elements (pixels x classes) and warps per pass, sized from ptxas on sm_90 / sm_80 (the
#: compile gate): every element keeps 4 tap values and their 64-bit addresses live, so 2048-element tiles
#: at 4 warps spill; the interpreter takes all classes and many pixels per program (its cost is per program).
GPU_TILE = {"fwd": (1024, 4), "bwd": (1024, 8)}


def _forward_config(npix: int, K: int):
    """(BLOCK_P, BLOCK_K, num_warps): 32 classes at a time on a GPU (150 classes: 5 tiles, 6% masked
    lanes)."""
    interp = big_interpreter_tiles()
    tile, warps = GPU_TILE["fwd"]
    block_k = min(next_pow2(K), 256 if interp else 32)
    block_p = min(next_pow2(npix), max(16, (32768 if interp else tile) // block_k))
    return block_p, block_k, warps


def _backward_config(H: int, W: int, w: int, K: int):
    """(BLOCK_J, BLOCK_OW, BLOCK_K, num_warps): low-res columns, label columns and classes per program
    (a ``BLOCK_OW x BLOCK_K`` tile of label-pixel gradients is live at once, plus its 4 taps)."""
    interp = big_interpreter_tiles()
    tile, warps = GPU_TILE["bwd"]
    block_k = min(next_pow2(K), 128 if interp else 32)
    block_j = min(next_pow2(w), 16 if interp else 4)
    span = (block_j + 1) * W // w + 2          # label columns that BLOCK_J low columns feed
    block_ow = max(2, min(next_pow2(span), 256 if interp else tile // block_k))
    return block_j, block_ow, block_k, warps


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------
def _forward_triton(logits, labels, ignore_index):
    B, K, h, w = logits.shape
    H, W = labels.shape[1:]
    npix = B * H * W
    block_p, block_k, warps = _forward_config(npix, K)
    n_prog = cdiv(npix, block_p)
    acc = acc_dtype(logits.dtype)
    lse = new_empty((B, H, W), acc, logits.device)
    part = new_empty((n_prog, 2), acc, logits.device)
    with device_guard(logits):
        _uce_fwd_kernel[(n_prog,)](
            logits, labels, lse, part, npix, H, W, h, w, K, ignore_index, *logits.stride(), *labels.stride(),
            INT64=needs_int64(logits, labels, lse) or bilinear_index_int64(H, W, h, w), ACC=tl_acc(logits.dtype),
            BLOCK_P=block_p, BLOCK_K=block_k, num_warps=warps, **launch_options())
    loss, n_valid = _mean(part[:, 0], part[:, 1], acc)
    return loss, lse, n_valid


def _mean(nll, valid, acc):
    """(mean NLL, number of labelled pixels) from per-element or per-program sums, in a fixed order; the
    count is summed in float64 (exact)."""
    n = valid.to(torch.float64).sum()
    return (nll.sum() / n).to(acc), n.to(acc)


def _coefficient(grad, n_valid, acc):
    """``grad / n_valid`` on the device (no host sync); 0 when every pixel is ignored (no labelled pixel
    takes it: the gradient is zero, as F.cross_entropy's)."""
    return torch.where(n_valid > 0, grad.to(acc) / n_valid.clamp_min(1), 0.0)


def _backward_triton(grad, logits, labels, lse, n_valid, ignore_index):
    B, K, h, w = logits.shape
    H, W = labels.shape[1:]
    block_j, block_ow, block_k, warps = _backward_config(H, W, w, K)
    nj, nk = cdiv(w, block_j), cdiv(K, block_k)
    acc = acc_dtype(logits.dtype)
    coef = _coefficient(grad, n_valid, acc).reshape(1)
    dz = new_empty(logits.shape, logits.dtype, logits.device)
    with device_guard(logits):
        _uce_bwd_kernel[(B * h * nj * nk,)](
            logits, labels, lse, coef, dz, H, W, h, w, K, nk, nj, ignore_index,
            *logits.stride(), *labels.stride(), *dz.stride(),
            INT64=needs_int64(logits, labels, lse, dz) or bilinear_index_int64(H, W, h, w), ACC=tl_acc(logits.dtype),
            BLOCK_J=block_j, BLOCK_OW=block_ow, BLOCK_K=block_k, num_warps=warps, **launch_options())
    return dz


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def upsampled_cross_entropy_reference(logits: torch.Tensor, labels: torch.Tensor,
                                      ignore_index: int = 255) -> torch.Tensor:
    """The reference math: ``F.cross_entropy`` (mean over the labelled pixels) of the logits (B, K, h, w)
    bilinearly resized (align_corners=False) to the labels' size (B, H, W), in float32 (float64 for
    float64 logits; the resize too, as mmseg's loss does)."""
    return F.cross_entropy(_upsampled(logits, labels), labels.long(), ignore_index=ignore_index)


def _upsampled(logits, labels):
    """The logits in the math dtype, bilinearly resized to the labels' size."""
    ct = acc_dtype(logits.dtype)
    return F.interpolate(logits.to(ct), size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)


def _forward_reference(logits, labels, ignore_index):
    """(loss, lse, n_valid) on CPU without the interpreter (materialises the upsampled logits)."""
    up = _upsampled(logits, labels)
    lse = torch.logsumexp(up, dim=1)
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0).long().unsqueeze(1)
    nll = torch.where(valid, lse - up.gather(1, target).squeeze(1), 0.0)
    loss, n_valid = _mean(nll, valid, up.dtype)
    return loss, lse.contiguous(), n_valid


def _backward_reference(grad, logits, labels, lse, n_valid, ignore_index):
    up = _upsampled(logits, labels)
    valid = labels != ignore_index
    g = torch.exp(up - lse.unsqueeze(1))
    g.scatter_add_(1, torch.where(valid, labels, 0).long().unsqueeze(1),
                   -torch.ones_like(lse).unsqueeze(1))
    g = torch.where(valid.unsqueeze(1), g * _coefficient(grad, n_valid, up.dtype), 0.0)
    d = torch.ops.aten.upsample_bilinear2d_backward(g, list(labels.shape[-2:]), list(logits.shape), False)
    return d.to(logits.dtype)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lrformer::upsampled_cross_entropy", mutates_args=())
def _uce_op(logits: torch.Tensor, labels: torch.Tensor,
            ignore_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-pixel log-sum-exp (B, H, W), number of labelled pixels), the last two in the math dtype."""
    if use_kernel(logits):
        return _forward_triton(logits, labels, ignore_index)
    return _forward_reference(logits, labels, ignore_index)


@_uce_op.register_fake
def _(logits, labels, ignore_index):
    acc = acc_dtype(logits.dtype)
    B, H, W = labels.shape
    return logits.new_empty((), dtype=acc), logits.new_empty((B, H, W), dtype=acc), logits.new_empty((), dtype=acc)


@torch.library.custom_op("lrformer::upsampled_cross_entropy_backward", mutates_args=())
def _uce_backward_op(grad: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lse: torch.Tensor,
                     n_valid: torch.Tensor, ignore_index: int) -> torch.Tensor:
    if use_kernel(logits):
        return _backward_triton(grad, logits, labels, lse, n_valid, ignore_index)
    return _backward_reference(grad, logits, labels, lse, n_valid, ignore_index)


@_uce_backward_op.register_fake
def _(grad, logits, labels, lse, n_valid, ignore_index):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, labels, ignore_index = inputs
    _, lse, n_valid = output
    ctx.save_for_backward(logits, labels, lse, n_valid)
    ctx.mark_non_differentiable(lse, n_valid)
    ctx.ignore_index = ignore_index


def _backward(ctx, grad, _grad_lse, _grad_n):
    logits, labels, lse, n_valid = ctx.saved_tensors
    return _uce_backward_op(grad, logits, labels, lse, n_valid, ctx.ignore_index), None, None


_uce_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def _tracing(t: torch.Tensor) -> bool:
    """Under torch.compile / FakeTensorMode, where the labels' values are unknown."""
    from torch._subclasses.fake_tensor import is_fake
    return torch.compiler.is_compiling() or is_fake(t)


def upsampled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy (mean over labelled pixels) of ``logits`` bilinearly upsampled to ``labels``' size.

    Args:
        logits: ``(B, K, h, w)`` float tensor (NCHW, any strides), the stride-8 logits of a segmentor.
        labels: ``(B, H, W)`` integer tensor (uint8 ... int64), values in ``[0, K)`` or ``ignore_index``
            (checked on CPU tensors; on a GPU a check would cost a host sync per step).
        ignore_index: the label of unlabelled pixels (255), which add nothing to the loss or the count.

    Returns the 0-dim loss, float32 (float64 for float64 logits); NaN when every pixel is ignored (as
    ``F.cross_entropy``), with a zero gradient.  Differentiable in ``logits`` (the gradient comes back
    in their dtype); the backward is deterministic.  Equals
    :func:`upsampled_cross_entropy_reference` without forming the upsampled logits.
    """
    check_tensor(logits, "logits", ndim=4)
    check_tensor(labels, "labels", ndim=3, dtypes=LABEL_DTYPES, device=logits.device)
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels has batch size {labels.shape[0]} but logits has {logits.shape[0]} "
                         f"(logits {tuple(logits.shape)}, labels {tuple(labels.shape)})")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    K = logits.shape[1]
    if 0 <= ignore_index < K:
        raise ValueError(f"ignore_index={ignore_index} is one of the {K} classes")
    if labels.device.type == "cpu" and not _tracing(labels):
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= K))
        if bool(bad.any()):
            raise ValueError(f"labels hold {int(labels[bad][0])}, outside [0, {K}) and not the ignore index "
                             f"{ignore_index}")
    return _uce_op(logits, labels, ignore_index)[0]
