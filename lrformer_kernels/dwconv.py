"""Fused depthwise 3x3 convolution (padding 1, stride 1) of a tokens-last map, with optional
exact-erf GELU in front and an optional residual:

    g = gelu(x) if gelu else x
    y = g + conv(g) if residual else conv(g)          conv: depthwise 3x3, zero padding 1, + bias

x is ``(B, H, W, C)`` with arbitrary strides (an NCHW tensor passed as ``x.permute(0, 2, 3, 1)``
works without a copy), weight ``(C, 1, 3, 3)`` as ``nn.Conv2d(C, C, 3, padding=1, groups=C)``
stores it, bias ``(C,)`` or None.  The output is a new contiguous ``(B, H, W, C)`` tensor in x's
dtype.  Used by LRFormer's CPE (residual), the IRB (gelu + residual) and the pooled maps.

Design
------
* Forward (``_dwconv_fwd_kernel``): one program = ``BLOCK_P`` consecutive pixels of the flattened
  ``B*H*W`` grid x ``BLOCK_C`` channels (channels are the vectorised axis: contiguous in
  tokens-last).  The 9 taps are 9 masked loads of the same tile shifted by one row/column, so they
  hit L1/L2; x is read from DRAM about once and y written once.  GELU is recomputed per tap.
  Accumulation in fp32 (fp64 for float64 inputs).
* Backward (``_dwconv_bwd_kernel``), one fused pass: each program walks ``iters`` pixel chunks and
  for each computes ``d_x`` (flipped-weight correlation of dy, + dy if residual, times gelu'(x)) and
  accumulates the 9 weight-gradient taps ``dy * g(shifted)`` and the bias gradient in registers.
  At the end it writes one fp32 partial row per tap per channel into a small
  ``(programs, 10, C)`` buffer, summed afterwards by a fixed-order ``torch.sum``.  No atomics:
  the op is always deterministic (bitwise reproducible run to run), so there is no
  ``deterministic`` switch.
* Offsets are computed in int64 only when ``needs_int64`` says an int32 offset could overflow.
* Mixed precision: weight/bias may be float32 parameters with a float16/bfloat16 x (autocast);
  the math then runs in fp32 and the weight/bias gradients come back in the parameters' dtypes.
* Packaging: ``torch.ops.lrformer.dwconv3x3`` / ``torch.ops.lrformer.dwconv3x3_backward`` custom
  ops with fake (meta) implementations and registered autograd, so ``torch.compile(fullgraph=True)``
  treats the op as one opaque node.  Without a GPU (and without ``TRITON_INTERPRET=1``) the ops run
  the PyTorch reference math instead of Triton.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (cdiv, launch_options, HAS_TRITON, acc_dtype, big_interpreter_tiles, check_tensor, device_guard, needs_int64,
                      new_empty, next_pow2, num_sms, partial_programs, tl_acc, use_kernel)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["dwconv3x3", "dwconv3x3_reference"]

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _load_tap(ptrs, pmask, rt, rb, wl, wr, cmask, sh, sw,
                  DH: tl.constexpr, DW: tl.constexpr, GELU: tl.constexpr, ACC: tl.constexpr):
        """Tile at pixel (h + DH, w + DW) (``ptrs`` points at (h, w)), zero off the map, maybe gelu'd.

        rt / rb: a row above / below exists (and the pixel is valid); wl / wr: a column left / right.
        """
        if DH == -1:
            m = rt
        elif DH == 1:
            m = rb
        else:
            m = pmask
        if DW == -1:
            m = m & wl
        elif DW == 1:
            m = m & wr
        v = tl.load(ptrs + (DH * sh + DW * sw), mask=m[:, None] & cmask[None, :], other=0.0).to(ACC)
        if GELU:  # exact GELU; gelu(0) == 0, so the zero padding stays zero
            v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
        return v

    @triton.jit
    def _load_w(w_ptr, cs, cmask, C, K: tl.constexpr, ACC: tl.constexpr):
        """Weight tap K (= ky * 3 + kx) of every channel in the block; weights are (9, C) contiguous."""
        return tl.load(w_ptr + K * C + cs, mask=cmask, other=0.0).to(ACC)[None, :]

    @triton.jit
    def _pixels(idx, N, H, W):
        """Flattened pixel index -> (b, h, w) and the validity masks of the neighbours."""
        HW = H * W
        b = idx // HW
        r = idx - b * HW
        h = r // W
        w = r - h * W
        pmask = idx < N
        rt = pmask & (h > 0)
        rb = pmask & (h < H - 1)
        wl = w > 0
        wr = w < W - 1
        return b, h, w, pmask, rt, rb, wl, wr

    @triton.jit
    def _dwconv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, N, H, W, C,
                           sxb, sxh, sxw, sxc, eps,
                           HAS_BIAS: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr,
                           STATS: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """y's tile; with ``STATS`` (whole rows: BLOCK_C >= C) also the LayerNorm statistics (mean, 1/std) of each
        pixel's row of y as stored (rounded to y's dtype), two passes over the tile in registers."""
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        if INT64:  # also the channel offsets: cs * stride_c alone may pass 2**31 (NCHW views)
            pid_p = pid_p.to(tl.int64)
            pid_c = pid_c.to(tl.int64)
        idx = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        b, h, w, pmask, rt, rb, wl, wr = _pixels(idx, N, H, W)
        xp = x_ptr + (b * sxb + h * sxh + w * sxw)[:, None] + (cs * sxc)[None, :]
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        for ky in tl.static_range(3):
            for kx in tl.static_range(3):
                v = _load_tap(xp, pmask, rt, rb, wl, wr, cmask, sxh, sxw, ky - 1, kx - 1, GELU, ACC)
                acc += v * _load_w(w_ptr, cs, cmask, C, ky * 3 + kx, ACC)
                if RESIDUAL:
                    if ky == 1:
                        if kx == 1:
                            acc += v
        if HAS_BIAS:
            acc += tl.load(b_ptr + cs, mask=cmask, other=0.0).to(ACC)[None, :]
        out = idx[:, None] * C + cs[None, :]
        yv = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + out, yv, mask=pmask[:, None] & cmask[None, :])
        if STATS:
            yv = tl.where(cmask[None, :], yv.to(ACC), 0.0)
            mean = tl.sum(yv, axis=1) / C
            d = tl.where(cmask[None, :], yv - mean[:, None], 0.0)
            tl.store(mean_ptr + idx, mean, mask=pmask)
            tl.store(rstd_ptr + idx, 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps), mask=pmask)

    @triton.jit
    def _dwconv_bwd_kernel(dy_ptr, x_ptr, w_ptr, dx_ptr, part_ptr, N, H, W, C, iters,
                           sdb, sdh, sdw, sdc, sxb, sxh, sxw, sxc,
                           GELU: tl.constexpr, RESIDUAL: tl.constexpr,
                           INT64: tl.constexpr, ACC: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_p = tl.program_id(0)
        pid_c = tl.program_id(1)
        if INT64:  # also the channel offsets: cs * stride_c alone may pass 2**31 (NCHW views)
            pid_p = pid_p.to(tl.int64)
            pid_c = pid_c.to(tl.int64)
        cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < C
        dcoff = (cs * sdc)[None, :]
        xcoff = (cs * sxc)[None, :]
        a00 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a01 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a02 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a10 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a11 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a12 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a20 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a21 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        a22 = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        ab = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
        start = pid_p * iters * BLOCK_P
        for it in range(0, iters):
            idx = start + it * BLOCK_P + tl.arange(0, BLOCK_P)
            b, h, w, pm, rt, rb, wl, wr = _pixels(idx, N, H, W)
            dp = dy_ptr + (b * sdb + h * sdh + w * sdw)[:, None] + dcoff
            xp = x_ptr + (b * sxb + h * sxh + w * sxw)[:, None] + xcoff
            # ---- d_g[h, w] = sum_{ky,kx} dy[h - ky + 1, w - kx + 1] * w[ky, kx]  (+ dy if residual)
            dyc = _load_tap(dp, pm, rt, rb, wl, wr, cmask, sdh, sdw, 0, 0, False, ACC)
            dg = dyc * _load_w(w_ptr, cs, cmask, C, 4, ACC)
            if RESIDUAL:
                dg += dyc
            dg += _load_tap(dp, pm, rt, rb, wl, wr, cmask, sdh, sdw, 1, 1, False, ACC) \
                * _load_w(w_ptr, cs, cmask, C, 0, ACC)
            dg += _load_tap(dp, pm, rt, rb, wl, wr, cmask, sdh, sdw, 1, 0, False, ACC) \
                * _load_w(w_ptr, cs, cmask, C, 1, ACC)
            dg += _load_tap(dp, pm, rt, rb, wl, wr, cmask, sdh, sdw, 1, -1, False, ACC) \
                * _load_w(w_ptr, cs, cmask, C, 2, ACC)
            dg += _load_tap(dp, pm, rt, rb, wl, wr, cmask, sdh, sdw, 0, 1, False, ACC) \
                * _load_w(w_ptr, cs, cmask, C, 3, ACC)
            dg += _load_tap(dp, pm, rt, rb, wl, wr, cmask, sdh, sdw, 0, -1, False, ACC) \
                * _load_w(w_ptr, cs, cmask, C, 5, ACC)
            dg += _load_tap(dp, pm, rt, rb, wl, wr, cmask, sdh, sdw, -1, 1, False, ACC) \
                * _load_w(w_ptr, cs, cmask, C, 6, ACC)
            dg += _load_tap(dp, pm, rt, rb, wl, wr, cmask, sdh, sdw, -1, 0, False, ACC) \
                * _load_w(w_ptr, cs, cmask, C, 7, ACC)
            dg += _load_tap(dp, pm, rt, rb, wl, wr, cmask, sdh, sdw, -1, -1, False, ACC) \
                * _load_w(w_ptr, cs, cmask, C, 8, ACC)
            xc = _load_tap(xp, pm, rt, rb, wl, wr, cmask, sxh, sxw, 0, 0, False, ACC)
            if GELU:
                cdf = 0.5 * (1.0 + tl.math.erf(xc * 0.7071067811865476))
                gc = xc * cdf
                dg = dg * (cdf + xc * tl.exp(-0.5 * xc * xc) * 0.3989422804014327)
            else:
                gc = xc
            tl.store(dx_ptr + (idx[:, None] * C + cs[None, :]), dg.to(dx_ptr.dtype.element_ty),
                     mask=pm[:, None] & cmask[None, :])
            # ---- d_w[ky, kx] += dy[h, w] * g[h + ky - 1, w + kx - 1];  d_b += dy  (dyc is 0 off-map)
            ab += dyc
            a11 += dyc * gc
            a00 += dyc * _load_tap(xp, pm, rt, rb, wl, wr, cmask, sxh, sxw, -1, -1, GELU, ACC)
            a01 += dyc * _load_tap(xp, pm, rt, rb, wl, wr, cmask, sxh, sxw, -1, 0, GELU, ACC)
            a02 += dyc * _load_tap(xp, pm, rt, rb, wl, wr, cmask, sxh, sxw, -1, 1, GELU, ACC)
            a10 += dyc * _load_tap(xp, pm, rt, rb, wl, wr, cmask, sxh, sxw, 0, -1, GELU, ACC)
            a12 += dyc * _load_tap(xp, pm, rt, rb, wl, wr, cmask, sxh, sxw, 0, 1, GELU, ACC)
            a20 += dyc * _load_tap(xp, pm, rt, rb, wl, wr, cmask, sxh, sxw, 1, -1, GELU, ACC)
            a21 += dyc * _load_tap(xp, pm, rt, rb, wl, wr, cmask, sxh, sxw, 1, 0, GELU, ACC)
            a22 += dyc * _load_tap(xp, pm, rt, rb, wl, wr, cmask, sxh, sxw, 1, 1, GELU, ACC)
        # partial buffer (programs, 10, C): rows 0..8 = weight taps (ky * 3 + kx), row 9 = bias
        prow = part_ptr + pid_p * (10 * C) + cs
        tl.store(prow + 0 * C, tl.sum(a00, axis=0), mask=cmask)
        tl.store(prow + 1 * C, tl.sum(a01, axis=0), mask=cmask)
        tl.store(prow + 2 * C, tl.sum(a02, axis=0), mask=cmask)
        tl.store(prow + 3 * C, tl.sum(a10, axis=0), mask=cmask)
        tl.store(prow + 4 * C, tl.sum(a11, axis=0), mask=cmask)
        tl.store(prow + 5 * C, tl.sum(a12, axis=0), mask=cmask)
        tl.store(prow + 6 * C, tl.sum(a20, axis=0), mask=cmask)
        tl.store(prow + 7 * C, tl.sum(a21, axis=0), mask=cmask)
        tl.store(prow + 8 * C, tl.sum(a22, axis=0), mask=cmask)
        tl.store(prow + 9 * C, tl.sum(ab, axis=0), mask=cmask)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
#: Tile sizes in elements (BLOCK_P * BLOCK_C) per (device type, pass) and GPU warps per program.
#: Sized from ptxas register counts on sm_90 (bf16/fp32, channel-contiguous x): forward 1024
#: elements = 8 values per thread at 4 warps (~76 regs, 16-byte loads), or 4 per thread at 8 warps
#: with GELU (the 9 erf evaluations per value push 4 warps to ~168 regs); fused backward 512
#: elements at 4 warps (~150 regs with GELU, no spills; 1024 spills).  The CPU interpreter
#: prefers few, big programs.  Module-level so that tests (and tuning) can change them.
TILE_ELEMS = {("cuda", "fwd"): 1024, ("cuda", "bwd"): 512, ("cpu", "fwd"): 8192, ("cpu", "bwd"): 8192}
MAX_BLOCK_C = {"fwd": 128, "bwd": 64}
#: backward grid: about this many programs per SM in all (~2-3 waves at the backward's occupancy;
#: partial buffer = programs * 10 * BLOCK_C fp32, ~2.7 MB on an H100).  CPU: per "SM" = 1.
PROGRAMS_PER_SM = 8


def _blocks(x: torch.Tensor, kind: str, whole_rows: bool = False):
    C = x.shape[-1]
    block_c = next_pow2(C) if whole_rows else min(next_pow2(C), MAX_BLOCK_C[kind])
    elems = TILE_ELEMS[("cpu" if big_interpreter_tiles() else "cuda", kind)]
    n_pix = x.shape[0] * x.shape[1] * x.shape[2]
    block_p = min(next_pow2(max(1, elems // block_c)), next_pow2(n_pix))
    return block_p, block_c


def _forward_config(x: torch.Tensor, gelu: bool, stats: bool = False):
    """(BLOCK_P, BLOCK_C, num_warps) of the forward kernel (see :data:`TILE_ELEMS`); with the LayerNorm
    statistics, whole rows (BLOCK_C >= C, fewer pixels: the same elements per tile)."""
    return (*_blocks(x, "fwd", stats), 8 if gelu else 4)


def _backward_config(x: torch.Tensor):
    """(BLOCK_P, BLOCK_C, iters, programs, num_warps) of the fused backward: a few programs per SM in
    all, each walking ``iters`` pixel chunks, so the partial-sum buffer stays small: within
    ``PARTIAL_TRAFFIC_SHARE`` of the backward's map traffic (dy and x read, dx written)."""
    block_p, block_c = _blocks(x, "bwd")
    C = x.shape[-1]
    n_cblk = cdiv(C, block_c)
    n_pix = x.shape[0] * x.shape[1] * x.shape[2]
    n_chunks = cdiv(n_pix, block_p)
    target = partial_programs(max(1, (PROGRAMS_PER_SM * num_sms(x.device)) // n_cblk),
                              10 * C * acc_dtype(x.dtype).itemsize, 3 * n_pix * C * x.element_size())
    iters = cdiv(n_chunks, target)
    return block_p, block_c, iters, cdiv(n_chunks, iters), 4


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------
def _forward_triton(x, weight, bias, gelu, residual, stats_eps: Optional[float] = None):
    """y; with ``stats_eps``, (y, mean, 1/std): the LayerNorm statistics of y's pixels (B, H, W) in the math
    dtype, computed in the epilogue from whole rows."""
    B, H, W, C = x.shape
    N = B * H * W
    y = new_empty((B, H, W, C), x.dtype, x.device)
    stats = stats_eps is not None
    mean, rstd = ((new_empty((B, H, W), acc_dtype(x.dtype), x.device) for _ in range(2)) if stats else (y, y))
    w9 = weight.reshape(C, 9).t().contiguous()  # (9, C): channel-contiguous taps
    b = bias.contiguous() if bias is not None else w9  # dummy pointer when no bias
    block_p, block_c, warps = _forward_config(x, gelu, stats)
    grid = (cdiv(N, block_p), cdiv(C, block_c))
    with device_guard(x):
        _dwconv_fwd_kernel[grid](
            x, w9, b, y, mean, rstd, N, H, W, C, *x.stride(), float(stats_eps or 0.0),
            HAS_BIAS=bias is not None, GELU=gelu, RESIDUAL=residual, STATS=stats, INT64=needs_int64(x, y),
            ACC=tl_acc(x.dtype), BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps, **launch_options())
    return (y, mean, rstd) if stats else y


def _backward_triton(dy, x, weight, bias, gelu, residual):
    B, H, W, C = x.shape
    N = B * H * W
    dx = new_empty((B, H, W, C), x.dtype, x.device)
    w9 = weight.reshape(C, 9).t().contiguous()  # (9, C): channel-contiguous taps
    block_p, block_c, iters, n_prog, warps = _backward_config(x)
    part = new_empty((n_prog, 10, C), acc_dtype(x.dtype), x.device)
    with device_guard(x):
        _dwconv_bwd_kernel[(n_prog, cdiv(C, block_c))](
            dy, x, w9, dx, part, N, H, W, C, iters, *dy.stride(), *x.stride(),
            GELU=gelu, RESIDUAL=residual, INT64=needs_int64(x, dy, dx), ACC=tl_acc(x.dtype),
            BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps, **launch_options())
    red = part.sum(dim=0)  # fixed-order reduction over programs: deterministic
    # separate fresh tensors (custom-op outputs may not alias each other)
    dw = red[:9].t().to(weight.dtype, copy=True).contiguous().reshape(C, 1, 3, 3)
    db = red[9].to(bias.dtype if bias is not None else weight.dtype, copy=True)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def dwconv3x3_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        gelu: bool = False, residual: bool = True) -> torch.Tensor:
    """The reference math: depthwise 3x3 convolution (padding 1) of a tokens-last map (B, H, W, C).

    ``g = gelu(x)`` if ``gelu`` else ``x``; returns ``g + conv(g)`` if ``residual`` else ``conv(g)``.
    weight (C, 1, 3, 3) as ``nn.Conv2d(C, C, 3, padding=1, groups=C)`` stores it.
    """
    g = F.gelu(x) if gelu else x
    y = F.conv2d(g.permute(0, 3, 1, 2), weight, bias, padding=1, groups=x.shape[-1])
    y = y.permute(0, 2, 3, 1)
    return g + y if residual else y


def _compute_dtype(x, weight, bias):
    t = torch.promote_types(x.dtype, weight.dtype)
    if bias is not None:
        t = torch.promote_types(t, bias.dtype)
    return t


def _forward_reference(x, weight, bias, gelu, residual):
    ct = _compute_dtype(x, weight, bias)
    y = dwconv3x3_reference(x.to(ct), weight.to(ct), bias.to(ct) if bias is not None else None, gelu, residual)
    return y.to(x.dtype).contiguous()


def _backward_reference(dy, x, weight, bias, gelu, residual):
    """Closed-form backward in the compute dtype (no autograd needed inside the op)."""
    ct = _compute_dtype(x, weight, bias)
    B, H, W, C = x.shape
    xc, dyc, wc = x.to(ct), dy.to(ct), weight.to(ct).reshape(C, 3, 3)
    g = F.gelu(xc) if gelu else xc
    gp = F.pad(g, (0, 0, 1, 1, 1, 1))
    dyp = F.pad(dyc, (0, 0, 1, 1, 1, 1))
    dg = dyc.clone() if residual else torch.zeros_like(dyc)
    dw = torch.empty(C, 3, 3, dtype=ct, device=x.device)
    for ky in range(3):
        for kx in range(3):
            dg += dyp[:, 2 - ky:2 - ky + H, 2 - kx:2 - kx + W, :] * wc[:, ky, kx]
            dw[:, ky, kx] = (dyc * gp[:, ky:ky + H, kx:kx + W, :]).sum(dim=(0, 1, 2))
    if gelu:
        cdf = 0.5 * (1.0 + torch.erf(xc * _INV_SQRT2))
        dg = dg * (cdf + xc * torch.exp(-0.5 * xc * xc) * _INV_SQRT_2PI)
    db = dyc.sum(dim=(0, 1, 2))
    return (dg.to(x.dtype).contiguous(), dw.reshape(C, 1, 3, 3).to(weight.dtype),
            db.to(bias.dtype if bias is not None else weight.dtype))


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lrformer::dwconv3x3", mutates_args=())
def _dwconv3x3_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  gelu: bool, residual: bool) -> torch.Tensor:
    if use_kernel(x):
        return _forward_triton(x, weight, bias, gelu, residual)
    return _forward_reference(x, weight, bias, gelu, residual)


@_dwconv3x3_op.register_fake
def _(x, weight, bias, gelu, residual):
    return x.new_empty(x.shape)


@torch.library.custom_op("lrformer::dwconv3x3_backward", mutates_args=())
def _dwconv3x3_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor], gelu: bool,
                           residual: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_kernel(x):
        return _backward_triton(dy, x, weight, bias, gelu, residual)
    return _backward_reference(dy, x, weight, bias, gelu, residual)


@_dwconv3x3_backward_op.register_fake
def _(dy, x, weight, bias, gelu, residual):
    C = x.shape[-1]
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            weight.new_empty((C,), dtype=bias.dtype if bias is not None else weight.dtype))


def _setup_context(ctx, inputs, output):
    x, weight, bias, gelu, residual = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.gelu = gelu
    ctx.residual = residual


def _backward(ctx, dy):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = torch.ops.lrformer.dwconv3x3_backward(dy, x, weight, bias, ctx.gelu, ctx.residual)
    return dx, dw, (db if bias is not None else None), None, None


_dwconv3x3_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def check_conv_parameters(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          names=("weight", "bias")) -> None:
    """Raise a one-line error unless ``weight`` (C, 1, 3, 3) and ``bias`` (C,) or None fit x (B, H, W, C): x's dtype,
    or float32 with a float16/bfloat16 x (autocast), on x's device."""
    C = x.shape[-1]
    param_dtypes = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    check_tensor(weight, names[0], dtypes=param_dtypes, device=x.device)
    if tuple(weight.shape) != (C, 1, 3, 3):
        raise ValueError(f"{names[0]} must have shape (C, 1, 3, 3) = {(C, 1, 3, 3)} for x of shape "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(bias, names[1], dtypes=param_dtypes, device=x.device)
        if tuple(bias.shape) != (C,):
            raise ValueError(f"{names[1]} must have shape (C,) = {(C,)}, got {tuple(bias.shape)}")


def dwconv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
              gelu: bool = False, residual: bool = True) -> torch.Tensor:
    """Depthwise 3x3 conv (padding 1) + bias of a tokens-last map, fused with GELU / residual.

    Args:
        x: ``(B, H, W, C)`` float tensor, any strides (e.g. ``nchw.permute(0, 2, 3, 1)``).
        weight: ``(C, 1, 3, 3)``, x's dtype, or float32 when x is float16/bfloat16 (autocast).
        bias: ``(C,)`` (same dtype rule) or None.
        gelu: apply exact (erf) GELU to x first: ``g = gelu(x)``, else ``g = x``.
        residual: return ``g + conv(g)`` (default) instead of ``conv(g)``.

    Returns a new contiguous ``(B, H, W, C)`` tensor in x's dtype.  Differentiable in x, weight and
    bias; the backward is always deterministic (per-program partial sums + fixed-order reduction).
    """
    check_tensor(x, "x", ndim=4)
    check_conv_parameters(x, weight, bias)
    if not isinstance(gelu, bool):
        raise TypeError(f"gelu must be a bool, got {type(gelu).__name__}")
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
    return torch.ops.lrformer.dwconv3x3(x, weight, bias, gelu, residual)
