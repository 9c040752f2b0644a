"""Fused ``x + scale[c] * keep[b] * bilinear(low -> x's size)`` (tokens-last), forward and backward.

Reference math: :func:`upsample_residual_reference` (``F.interpolate(mode="bilinear",
align_corners=False)`` to an explicit output size).

Forward: one memory-bound pass.  A program owns one output row ``(b, oh)``, a tile of output
columns and a tile of channels (C is the vectorised axis for tokens-last maps; any strides work,
e.g. an NCHW tensor passed as ``x.permute(0, 2, 3, 1)``).  It reads its ``x`` tile once, gathers
the 4 bilinear taps from ``low`` (tiny, cache resident) and writes ``out`` once.

Backward: ``d_x = grad`` (returned as is).  ``d_low`` is a deterministic *gather*: a program owns
one low-res row ``(b, i)``, a tile of ``BLOCK_J`` low-res columns and a channel tile; it walks
exactly the output rows/columns whose ``i0`` or ``i1`` tap hits its cells (ranges computed in
closed form), sums ``grad`` weighted by the bilinear weights (vertical first, then horizontal) and
scales by ``scale[c] * keep[b]``.  ``d_scale`` comes from the same pass:
``d_scale[c] = sum_{b,i,j} keep[b] * low[b,i,j,c] * (bilinear^T grad)[b,i,j,c]``, written as
per-program partials and reduced by a second (deterministic) sum; no atomics.

Source coordinates are computed exactly in integers:
``src = max(((2*dst + 1) * in - out) / (2 * out), 0)``, ``i0 = floor(src)``, ``lambda = src - i0``,
``i1 = min(i0 + 1, in - 1)``; the math is float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Optional

import torch

import torch.nn.functional as F

from ._common import (cdiv, launch_options, HAS_TRITON, acc_dtype, bilinear_index_int64, big_interpreter_tiles, check_tensor, device_guard, needs_int64,
                      new_empty, next_pow2, use_kernel)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import bilinear_gather_columns, bilinear_lerp, bilinear_support, bilinear_taps, bilinear_weight

__all__ = ["upsample_residual", "upsample_residual_reference", "bilinear_resize", "branch_scale"]

# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _upres_fwd_kernel(
        x_ptr, low_ptr, scale_ptr, keep_ptr, out_ptr,
        NPIX, H, W, h, w, C,
        sxb, sxh, sxw, sxc,
        slb, slh, slw, slc,
        sob, soh, sow, soc,
        s_scale, s_keep,
        HAS_SCALE: tl.constexpr, HAS_KEEP: tl.constexpr, FP64: tl.constexpr,
        INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        if FP64:
            ACC = tl.float64
        else:
            ACC = tl.float32
        pid_p = tl.program_id(0)  # tile of flattened output pixels (b, oh, ow)
        pid_c = tl.program_id(1)
        pp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        if INT64:
            pp = pp.to(tl.int64)
            cc = cc.to(tl.int64)
        pmask = pp < NPIX
        cmask = cc < C
        mask = pmask[:, None] & cmask[None, :]
        ow = pp % W
        t = pp // W
        oh = t % H
        b = t // H

        y0, y1, ly = bilinear_taps(oh, h, H, ACC)
        x0, x1, lx = bilinear_taps(ow, w, W, ACC)
        lx = lx[:, None]
        ly = ly[:, None]

        lbase = low_ptr + b * slb
        coff = cc[None, :] * slc
        r0 = (lbase + y0 * slh)[:, None] + coff
        r1 = (lbase + y1 * slh)[:, None] + coff
        c0 = (x0 * slw)[:, None]
        c1 = (x1 * slw)[:, None]
        v00 = tl.load(r0 + c0, mask=mask, other=0.0).to(ACC)
        v01 = tl.load(r0 + c1, mask=mask, other=0.0).to(ACC)
        v10 = tl.load(r1 + c0, mask=mask, other=0.0).to(ACC)
        v11 = tl.load(r1 + c1, mask=mask, other=0.0).to(ACC)
        up = bilinear_lerp(v00, v01, v10, v11, ly, lx, h == H, w == W)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + cc * s_scale, mask=cmask, other=0.0).to(ACC)
            up = up * sc[None, :]
        if HAS_KEEP:
            kp = tl.load(keep_ptr + b * s_keep, mask=pmask, other=0.0).to(ACC)
            up = up * kp[:, None]

        xv = tl.load(x_ptr + (b * sxb + oh * sxh + ow * sxw)[:, None] + cc[None, :] * sxc,
                     mask=mask, other=0.0).to(ACC)
        res = xv + up
        tl.store(out_ptr + (b * sob + oh * soh + ow * sow)[:, None] + cc[None, :] * soc,
                 res.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _upres_bwd_kernel(
        g_ptr, low_ptr, scale_ptr, keep_ptr, dlow_ptr, part_ptr,
        H, W, h, w, C, NJ,
        sgb, sgh, sgw, sgc,
        slb, slh, slw, slc,
        sdb, sdh, sdw, sdc,
        s_scale, s_keep,
        HAS_SCALE: tl.constexpr, HAS_KEEP: tl.constexpr,
        NEED_DLOW: tl.constexpr, NEED_DSCALE: tl.constexpr, FP64: tl.constexpr,
        INT64: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_OW: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        if FP64:
            ACC = tl.float64
        else:
            ACC = tl.float32
        pid_bi = tl.program_id(0)  # b * h + i
        pid_j = tl.program_id(1)
        pid_c = tl.program_id(2)
        b = pid_bi // h
        i = pid_bi - b * h
        j0 = pid_j * BLOCK_J
        cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        jj = j0 + tl.arange(0, BLOCK_J)
        if INT64:                    # the sizes too: every product below (loop counters included) is 64-bit
            b = b.to(tl.int64)
            i = i.to(tl.int64)
            j0 = j0.to(tl.int64)
            cc = cc.to(tl.int64)
            jj = jj.to(tl.int64)
            H = H.to(tl.int64)
            W = W.to(tl.int64)
            h = h.to(tl.int64)
            w = w.to(tl.int64)
        cmask = cc < C
        jmask = jj < w
        jl = tl.minimum(j0 + BLOCK_J, w) - 1  # last low column of this tile

        oh_lo, oh_hi = bilinear_support(i, i, h, H)      # the output rows / columns these cells feed
        ow_lo, ow_hi = bilinear_support(j0, jl, w, W)

        gbase = g_ptr + b * sgb
        acc = tl.zeros((BLOCK_J, BLOCK_C), dtype=ACC)
        for ows in range(ow_lo, ow_hi, BLOCK_OW):
            ow = ows + tl.arange(0, BLOCK_OW)
            owmask = ow < ow_hi
            gmask = owmask[:, None] & cmask[None, :]
            goff = ow[:, None] * sgw + cc[None, :] * sgc
            # vertical reduction of the grad rows touching low row i
            red = tl.zeros((BLOCK_OW, BLOCK_C), dtype=ACC)
            for oh in range(oh_lo, oh_hi):
                y0, y1, ly = bilinear_taps(oh, h, H, ACC)
                gv = tl.load(gbase + oh * sgh + goff, mask=gmask, other=0.0).to(ACC)
                red += bilinear_weight(i, y0, y1, ly) * gv
            # horizontal weights of these output columns, then reduction per low column
            x0, x1, lx = bilinear_taps(ow, w, W, ACC)
            acc = bilinear_gather_columns(acc, red, x0, x1, lx, owmask, j0, BLOCK_J)

        m2 = jmask[:, None] & cmask[None, :]
        kp = 1.0
        if HAS_KEEP:
            kp = tl.load(keep_ptr + b * s_keep).to(ACC)
        if NEED_DLOW:
            d = acc * kp
            if HAS_SCALE:
                sc = tl.load(scale_ptr + cc * s_scale, mask=cmask, other=0.0).to(ACC)
                d = d * sc[None, :]
            tl.store(dlow_ptr + b * sdb + i * sdh + jj[:, None] * sdw + cc[None, :] * sdc,
                     d.to(dlow_ptr.dtype.element_ty), mask=m2)
        if NEED_DSCALE:
            lv = tl.load(low_ptr + b * slb + i * slh + jj[:, None] * slw + cc[None, :] * slc,
                         mask=m2, other=0.0).to(ACC)
            p = tl.sum(acc * lv, axis=0) * kp
            prow = pid_bi.to(tl.int64) * NJ + pid_j
            tl.store(part_ptr + prow * C + cc, p.to(part_ptr.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
_index_int64 = bilinear_index_int64      # a module attribute: the tests swap it for the old rule


def _forward_config(npix: int, C: int, int64: bool = False):
    """(BLOCK_P, BLOCK_C): ~2048-element tiles on a GPU (1024 with int64 offsets, whose 64-bit index math
    spills at 2048 on sm_90/sm_80), much bigger ones under the interpreter (its cost is per program)."""
    block_c = min(next_pow2(C), 64)
    gpu_tile = 1024 if int64 else 2048
    block_p = min(next_pow2(npix), max(16, (16384 if big_interpreter_tiles() else gpu_tile) // block_c))
    return block_p, block_c


def _backward_config(H: int, W: int, w: int, C: int):
    """(BLOCK_J, BLOCK_OW, BLOCK_C): low-res columns, output columns and channels per program."""
    interp = big_interpreter_tiles()
    block_c = min(next_pow2(C), 64 if interp else 32)
    block_j = min(next_pow2(w), 16 if interp else 4)
    # output columns touched by BLOCK_J low columns: about (BLOCK_J + 1) * W / w + 2
    span = (block_j + 1) * W // w + 2
    block_ow = max(2, min(next_pow2(span), 256 if interp else (64 if block_c <= 16 else 32)))
    return block_j, block_ow, block_c


# ----------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------
def _alloc_like_layout(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """New dense tensor with x's shape and x's dimension order (by stride); NaN-poisonable."""
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    buf = new_empty([x.shape[d] for d in order], dtype, x.device)
    inv = [order.index(d) for d in range(x.dim())]
    return buf.permute(inv)


def _forward_triton(x, low, scale, keep, out):
    B, H, W, C = x.shape
    _, h, w, _ = low.shape
    npix = B * H * W
    int64 = needs_int64(x, low, out) or _index_int64(H, W, h, w)
    BLOCK_P, BLOCK_C = _forward_config(npix, C, int64)
    grid = (cdiv(npix, BLOCK_P), cdiv(C, BLOCK_C))
    dummy = x
    with device_guard(x):
        _upres_fwd_kernel[grid](
            x, low, scale if scale is not None else dummy, keep if keep is not None else dummy, out,
            npix, H, W, h, w, C,
            *x.stride(), *low.stride(), *out.stride(),
            scale.stride(0) if scale is not None else 0, keep.stride(0) if keep is not None else 0,
            HAS_SCALE=scale is not None, HAS_KEEP=keep is not None,
            FP64=x.dtype == torch.float64, INT64=int64,
            BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=4, **launch_options(),
        )


def _backward_triton(grad, low, scale, keep, need_dlow, need_dscale):
    B, H, W, C = grad.shape
    _, h, w, _ = low.shape
    BLOCK_J, BLOCK_OW, BLOCK_C = _backward_config(H, W, w, C)
    NJ = cdiv(w, BLOCK_J)
    acc = acc_dtype(grad.dtype)
    dlow = new_empty(low.shape, low.dtype, low.device) if need_dlow else None
    part = new_empty((B * h * NJ, C), acc, low.device) if need_dscale else None
    grid = (B * h, NJ, cdiv(C, BLOCK_C))
    dummy = low
    with device_guard(grad):
        _upres_bwd_kernel[grid](
            grad, low, scale if scale is not None else dummy, keep if keep is not None else dummy,
            dlow if dlow is not None else dummy, part if part is not None else dummy,
            H, W, h, w, C, NJ,
            *grad.stride(), *low.stride(), *(dlow.stride() if dlow is not None else low.stride()),
            scale.stride(0) if scale is not None else 0, keep.stride(0) if keep is not None else 0,
            HAS_SCALE=scale is not None, HAS_KEEP=keep is not None,
            NEED_DLOW=need_dlow, NEED_DSCALE=need_dscale,
            FP64=grad.dtype == torch.float64,
            INT64=needs_int64(grad, low, *([dlow] if dlow is not None else [])) or _index_int64(H, W, h, w),
            BLOCK_J=BLOCK_J, BLOCK_OW=BLOCK_OW, BLOCK_C=BLOCK_C, num_warps=4, **launch_options(),
        )
    dscale = None
    if need_dscale:
        dscale = part.sum(0).to(scale.dtype)  # deterministic second-stage reduction
    return dlow, dscale


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def bilinear_resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of a tokens-last map: (B, h, w, C) -> (B, H, W, C)."""
    return F.interpolate(x.permute(0, 3, 1, 2), size=tuple(size), mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1)


def branch_scale(scale: Optional[torch.Tensor], keep: Optional[torch.Tensor], batch: int,
                 channels: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The per-(sample, channel) factor ``layer_scale[c] * keep[b]`` as (B, 1, 1, C), or None."""
    s = None
    if scale is not None:
        s = scale.reshape(1, 1, 1, channels).to(like.dtype)
    if keep is not None:
        kb = keep.reshape(batch, 1, 1, 1).to(like.dtype)
        s = kb if s is None else s * kb
    return s


def upsample_residual_reference(x: torch.Tensor, low: torch.Tensor, scale: Optional[torch.Tensor] = None,
                                keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference math: ``x + scale[c] * keep[b] * bilinear(low -> x's size)``, tokens-last.

    x (B, H, W, C) residual; low (B, h, w, C) low-resolution branch; scale (C,) layer scale or None;
    keep (B,) drop-path factor (0 or 1/keep_prob per sample) or None.
    """
    B, H, W, C = x.shape
    up = bilinear_resize(low, (H, W))
    s = branch_scale(scale, keep, B, C, up)
    return x + (up if s is None else up * s)


def _forward_reference(x, low, scale, keep, out):
    acc = acc_dtype(x.dtype)
    res = upsample_residual_reference(x.to(acc), low.to(acc), None if scale is None else scale.to(acc),
                                      None if keep is None else keep.to(acc))
    out.copy_(res)


def _backward_reference(grad, low, scale, keep, need_dlow, need_dscale):
    B, H, W, C = grad.shape
    _, h, w, _ = low.shape
    acc = acc_dtype(grad.dtype)
    g = grad.to(acc)
    lo = low.to(acc)
    dlow = dscale = None
    if need_dlow:
        s = branch_scale(None if scale is None else scale.to(acc),
                         None if keep is None else keep.to(acc), B, C, g)
        gs = g if s is None else g * s
        d = torch.ops.aten.upsample_bilinear2d_backward(
            gs.permute(0, 3, 1, 2), [H, W], [B, C, h, w], False)
        dlow = new_empty(low.shape, low.dtype, low.device)
        dlow.copy_(d.permute(0, 2, 3, 1))
    if need_dscale:
        up = bilinear_resize(lo, (H, W))
        if keep is not None:
            up = up * keep.to(acc).reshape(B, 1, 1, 1)
        dscale = new_empty((C,), scale.dtype, scale.device)
        dscale.copy_((g * up).sum((0, 1, 2)))
    return dlow, dscale


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lrformer::upsample_residual", mutates_args=())
def _upsample_residual_op(x: torch.Tensor, low: torch.Tensor, scale: Optional[torch.Tensor],
                          keep: Optional[torch.Tensor], out_like_x: bool = False) -> torch.Tensor:
    if out_like_x:
        out = _alloc_like_layout(x, x.dtype)
    else:
        out = new_empty(x.shape, x.dtype, x.device)
    if use_kernel(x):
        _forward_triton(x, low, scale, keep, out)
    else:
        _forward_reference(x, low, scale, keep, out)
    return out


@_upsample_residual_op.register_fake
def _(x, low, scale, keep, out_like_x=False):
    if out_like_x:
        order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
        buf = x.new_empty([x.shape[d] for d in order])
        return buf.permute([order.index(d) for d in range(x.dim())])
    return x.new_empty(x.shape)


@torch.library.custom_op("lrformer::upsample_residual_backward", mutates_args=())
def _upsample_residual_backward_op(grad: torch.Tensor, low: torch.Tensor,
                                   scale: Optional[torch.Tensor], keep: Optional[torch.Tensor],
                                   need_dlow: bool, need_dscale: bool
                                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (d_low, d_scale); an output that is not needed is an empty (0,) tensor."""
    need_dscale = need_dscale and scale is not None
    if need_dlow or need_dscale:
        if use_kernel(grad):
            dlow, dscale = _backward_triton(grad, low, scale, keep, need_dlow, need_dscale)
        else:
            dlow, dscale = _backward_reference(grad, low, scale, keep, need_dlow, need_dscale)
    else:
        dlow = dscale = None
    if dlow is None:
        dlow = low.new_empty((0,))
    if dscale is None:
        dscale = low.new_empty((0,)) if scale is None else scale.new_empty((0,))
    return dlow, dscale


@_upsample_residual_backward_op.register_fake
def _(grad, low, scale, keep, need_dlow, need_dscale):
    need_dscale = need_dscale and scale is not None
    dlow = low.new_empty(low.shape) if need_dlow else low.new_empty((0,))
    if scale is None:
        dscale = low.new_empty((0,))
    else:
        dscale = scale.new_empty(scale.shape if need_dscale else (0,))
    return dlow, dscale


def _setup_context(ctx, inputs, output):
    x, low, scale, keep, _ = inputs
    ctx.save_for_backward(low, scale, keep)
    ctx.has_scale = scale is not None


def _backward(ctx, grad):
    low, scale, keep = ctx.saved_tensors
    need_dlow = ctx.needs_input_grad[1]
    need_dscale = ctx.has_scale and ctx.needs_input_grad[2]
    d_low = d_scale = None
    if need_dlow or need_dscale:
        d_low, d_scale = _upsample_residual_backward_op(grad, low, scale, keep,
                                                        need_dlow, need_dscale)
        if not need_dlow:
            d_low = None
        if not need_dscale:
            d_scale = None
    d_x = grad if ctx.needs_input_grad[0] else None
    return d_x, d_low, d_scale, None, None


_upsample_residual_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def upsample_residual(x: torch.Tensor, low: torch.Tensor, scale: Optional[torch.Tensor] = None,
                      keep: Optional[torch.Tensor] = None, *, out_like_x: bool = False
                      ) -> torch.Tensor:
    """``x + scale[c] * keep[b] * bilinear(low -> (H, W))`` (align_corners=False), tokens-last.

    x: (B, H, W, C) residual, any strides (e.g. ``nchw.permute(0, 2, 3, 1)``).
    low: (B, h, w, C) low-resolution branch, same dtype/device as x, any strides, any size
    (up- or down-sampling).  scale: optional (C,) layer scale (floating, any float dtype; gets a
    gradient).  keep: optional (B,) per-sample drop-path factor (floating; no gradient).
    Returns a new (B, H, W, C) tensor in x's dtype: contiguous, or with x's dimension order
    (e.g. NCHW memory for a permuted NCHW x) when ``out_like_x=True``.  Math is float32
    (float64 for float64 inputs).
    """
    check_tensor(x, "x", ndim=4)
    check_tensor(low, "low", ndim=4, device=x.device, dtype=x.dtype)
    B, H, W, C = x.shape
    if low.shape[0] != B:
        raise ValueError(f"low has batch size {low.shape[0]} but x has {B} "
                         f"(x {tuple(x.shape)}, low {tuple(low.shape)})")
    if low.shape[3] != C:
        raise ValueError(f"low has {low.shape[3]} channels but x has {C} "
                         f"(x {tuple(x.shape)}, low {tuple(low.shape)})")
    if scale is not None:
        check_tensor(scale, "scale", ndim=1, device=x.device)
        if scale.shape[0] != C:
            raise ValueError(f"scale must have shape ({C},), got {tuple(scale.shape)}")
    if keep is not None:
        check_tensor(keep, "keep", ndim=1, device=x.device)
        if keep.shape[0] != B:
            raise ValueError(f"keep must have shape ({B},), got {tuple(keep.shape)}")
    if not isinstance(out_like_x, bool):
        raise TypeError(f"out_like_x must be a bool, got {type(out_like_x).__name__}")
    return _upsample_residual_op(x, low, scale, keep, out_like_x)
