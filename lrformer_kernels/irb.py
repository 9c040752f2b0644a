"""Fused IRB branch of an LRFormer block (the inverted-residual FFN with its norm, layer scale, drop path
and block residual), forward and backward:

    xn  = layer_norm(x) (norm2 of an encoder block) or x (already normalised, e.g. by a BatchNorm)
    u   = xn @ w1^T + b1                              fc1 (1x1 conv)            (M, HD), HD = ratio * C
    a   = gelu(u) + dwconv3x3(gelu(u)) + bc           the IRB's depthwise conv with its residual
    out = shortcut + scale[c] * keep[b] * (a @ w2^T + b2)      fc2 (1x1 conv), layer scale, drop path

x ``(B, H, W, C)`` tokens-last; ``shortcut`` is x itself unless given (the pre-BatchNorm map of an LRHead
block).  Reference math: :func:`irb_reference` (what the model's Block computes step by step).

Design (two kernels forward; the hidden map written once and read once)
-----------------------------------------------------------------------
* ``_irb_fc1_kernel``: a GEMM tile (``BLOCK_M`` pixels x ``BLOCK_N`` hidden channels) whose prologue is
  the LayerNorm: per-row mean and variance in two passes over the row tile (from L2: the hidden tiles of
  a row tile are consecutive programs), the normalised tile cast to the hidden dtype for ``tl.dot``; the
  epilogue adds b1 and writes the pre-activation ``u`` (the only hidden map stored: the backward's
  GELU derivative needs it) and, once per row, the LayerNorm mean and 1/std (fp32) for the backward.
* ``_irb_fc2_kernel``: a GEMM tile (``BLOCK_M`` pixels x ``BLOCK_N`` output channels) whose A operand
  is computed on the fly, ``BLOCK_K`` hidden channels at a time: the 9 taps of ``u`` (shifted masked
  loads, L1/L2 hits, GELU per tap, as ``dwconv3x3``) + the depthwise weights, residual and bias; the
  epilogue adds b2, scales by ``scale[c] * keep[b]`` and adds the shortcut: only the block output is
  written (the layer scale's gradient comes from fc2's weight gradient, below).  With C wider than a tile the
  A tile is recomputed per output tile (depthwise FLOPs only, counted in the FLOPs model).
* Backward (:func:`_backward_impl`): dv = dy * scale[c] * keep[b] is formed by the kernels that read it as
  they load dy (never stored).  dx by ``_irb_dx_kernel`` (maps up to ``DX_MAX_C`` wide; wider ones: torch.mm
  and ATen's LayerNorm backward): the GEMM dxn = du w1 over whole rows with the LayerNorm backward and the
  block residual's dy in its epilogue (dxn never stored); fc1's weight and bias
  gradients du^T [xn | 1] as ``_irb_dw1_kernel`` (xn recomputed from x and the saved statistics, never
  stored); fc2's weight and bias gradients dv^T [a | 1] as ``_irb_dw2_kernel`` (a recomputed from u's taps,
  never stored; dv without the layer scale, G, which scales the finished gradient, and the layer scale's
  gradient is ``sum_k w2[c, k] G[c, k] + b2[c] g[c]``: the fc2 output is never stored); the weight gradients'
  split-M partials summed in a fixed order and written in the parameters' dtype by ``_weight_grad_sum_kernel``,
  or, where partials would cost a sizeable share of the GEMM's own traffic (weights as large as the map: the
  last stages), one split whose programs write the gradient directly; and ``_irb_dgrad_kernel`` from dv
  to du: per tile of the map with a one-pixel halo it computes da = dv w2 (a GEMM over C, the halo
  recomputed: ~1.5x that GEMM's FLOPs on 6x14 tiles), writes it to the program's own scratch tile (L1/L2;
  a register tile cannot be shifted across pixels in Triton 3.6-3.9, and ``tl.gather`` spills) and reads it
  back shifted for the transposed depthwise conv, times gelu'(u), plus the depthwise weight and bias
  partials: da never goes to DRAM.  Deterministic (fixed-order partial sums).
* The model's backward (fc1 and fc2 weights of one dtype) takes fc1's and fc2's weight gradients in that same
  pass (:func:`irb_hidden_grads`, ``WGRAD``): per tile, du^T [xn | 1] right after du (xn recomputed from x),
  then fc2's input a from the u taps the depthwise weight gradient loads anyway and (dy keep)^T [a | 1]; the
  products go 16 channels at a time into the program's own slices of the split's fp32 partials, updated in
  place (L1/L2; register accumulators as wide as the map spill, as do larger tiles: 8x8 own pixels, da on their
  10x10 halo tile padded to 128 rows, the two products on exactly the 64 own pixels).  Three passes over the
  hidden map remain (u read, du written, du read by dx) where the separate weight-gradient kernels make five,
  for ~0.5 GEMM of FLOPs more a pixel (da's padded halo tile: 2x its GEMM where 6x14 tiles take 1.52x).
  Keeping du out of DRAM too needs dxn's reduction over the hidden chunks inside one program (shared memory
  Triton does not expose).
* The GEMM operands are in the hidden dtype (x's dtype; the autocast dtype under autocast, as
  ``F.linear`` would cast them); accumulation in fp32 (fp64 for float64); ``input_precision="ieee"``
  for fp32 (no TF32, as PyTorch's default matmul).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import (HAS_TRITON, acc_dtype, big_interpreter_tiles, cdiv, check_tensor, device_guard,
                      launch_options, layer_norm_backward_reference, layer_norm_from_statistics, layer_norm_statistics,
                      needs_int64, new_empty, next_pow2, num_sms, partial_programs, tl_acc, use_kernel)
from .dwconv import dwconv3x3_reference
from .upsample_residual import branch_scale

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import layer_norm_backward_rows, layer_norm_statistics_rows
    from .dwconv import _load_tap, _load_w, _pixels

__all__ = ["irb", "irb_reference"]

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _fc2_input(u_ptr, wc_ptr, bc_ptr, idx, cs, pmask, rt, rb, wl, wr, cmask, W, HD,
                   ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """fc2's input ``a = g + dwconv3x3(g) + bc``, ``g = gelu(u)``, for pixels ``idx`` x hidden channels ``cs``:
        the 9 taps of u are shifted masked loads (L1/L2 hits), GELU'd per tap as ``dwconv3x3`` does."""
        up = u_ptr + idx[:, None] * HD + cs[None, :]
        a = tl.zeros([BLOCK_M, BLOCK_K], ACC)
        for ky in tl.static_range(3):
            for kx in tl.static_range(3):
                v = _load_tap(up, pmask, rt, rb, wl, wr, cmask, W * HD, HD, ky - 1, kx - 1, True, ACC)
                a += v * _load_w(wc_ptr, cs, cmask, HD, ky * 3 + kx, ACC)
                if ky == 1:
                    if kx == 1:
                        a += v
        return a + tl.load(bc_ptr + cs, mask=cmask, other=0.0).to(ACC)[None, :]

    @triton.jit
    def _split_m_program(BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, iters,
                         INT64: tl.constexpr):
        """A split-M weight-gradient program (grid: axis-0 tiles, axis-1 tiles, pixel splits): the indices of its
        two tile axes and its first pixel (it walks ``iters`` chunks of ``BLOCK_M`` pixels from there)."""
        ra = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
        rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        start = tl.program_id(2) * iters * BLOCK_M
        if INT64:
            ra = ra.to(tl.int64)
            rb = rb.to(tl.int64)
            start = start.to(tl.int64)
        return ra, rb, start

    @triton.jit
    def _irb_fc1_kernel(x_ptr, lnw_ptr, lnb_ptr, w_ptr, b_ptr, u_ptr, mean_ptr, rstd_ptr, M, C, HD, eps,
                        LAYER_NORM: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)        # hidden tiles fastest: the programs of one row tile run together
        pid_m = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if INT64:
            rm = rm.to(tl.int64)
            rn = rn.to(tl.int64)
        mmask = rm < M
        nmask = rn < HD
        xrow = x_ptr + rm[:, None] * C
        DT = u_ptr.dtype.element_ty
        if LAYER_NORM:
            mean, rstd = layer_norm_statistics_rows(xrow, mmask, C, 1, eps, ACC, BLOCK_M, BLOCK_K)
            if pid_n == 0:
                tl.store(mean_ptr + rm, mean, mask=mmask)
                tl.store(rstd_ptr + rm, rstd, mask=mmask)
        acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for k0 in range(0, C, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            kmask = rk < C
            xk = tl.load(xrow + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0).to(ACC)
            if LAYER_NORM:
                g = tl.load(lnw_ptr + rk, mask=kmask, other=0.0).to(ACC)
                bb = tl.load(lnb_ptr + rk, mask=kmask, other=0.0).to(ACC)
                xk = (xk - mean[:, None]) * rstd[:, None] * g[None, :] + bb[None, :]
            wk = tl.load(w_ptr + rn[None, :] * C + rk[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc += tl.dot(xk.to(DT), wk.to(DT), input_precision=DOT_PREC).to(ACC)
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(ACC)[None, :]
        tl.store(u_ptr + rm[:, None] * HD + rn[None, :], acc.to(DT), mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _irb_fc2_kernel(u_ptr, wc_ptr, bc_ptr, w_ptr, b_ptr, scale_ptr, keep_ptr, res_ptr, out_ptr,
                        M, H, W, HD, C, HAS_SCALE: tl.constexpr, HAS_KEEP: tl.constexpr,
                        INT64: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)        # output tiles fastest: they share the u tile (from L2)
        pid_m = tl.program_id(1)
        idx = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if INT64:
            idx = idx.to(tl.int64)
            rn = rn.to(tl.int64)
        b, h, w, pmask, rt, rb, wl, wr = _pixels(idx, M, H, W)
        nmask = rn < C
        DT = u_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for k0 in range(0, HD, BLOCK_K):
            cs = k0 + tl.arange(0, BLOCK_K)
            if INT64:
                cs = cs.to(tl.int64)
            cmask = cs < HD
            a = _fc2_input(u_ptr, wc_ptr, bc_ptr, idx, cs, pmask, rt, rb, wl, wr, cmask, W, HD, ACC, BLOCK_M, BLOCK_K)
            wk = tl.load(w_ptr + rn[None, :] * HD + cs[:, None], mask=cmask[:, None] & nmask[None, :], other=0.0)
            acc += tl.dot(a.to(DT), wk.to(DT), input_precision=DOT_PREC).to(ACC)
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(ACC)[None, :]
        m2 = pmask[:, None] & nmask[None, :]
        offs = idx[:, None] * C + rn[None, :]
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + rn, mask=nmask, other=0.0).to(ACC)[None, :]
        if HAS_KEEP:
            acc *= tl.load(keep_ptr + b, mask=pmask, other=0.0).to(ACC)[:, None]
        acc += tl.load(res_ptr + offs, mask=m2, other=0.0).to(ACC)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m2)


    @triton.jit
    def _weight_grad_store(acc, rn, cs, nmask, cmask, out_ptr, rs_ptr, w_ptr, dot_ptr, col_tile, N, K,
                           HAS_RS: tl.constexpr, HAS_DOT: tl.constexpr, ACC: tl.constexpr):
        """Write a finished (rows ``rn`` x columns ``cs``) tile of an (N, K) weight gradient in the output's dtype:
        with ``HAS_RS`` its rows scaled by ``rs[n]`` (the layer scale), with ``HAS_DOT`` first the row dots
        ``sum_k w[n, k] * acc[n, k]`` of the unscaled tile stored as column tile ``col_tile``'s partial (the layer
        scale's gradient, summed over the column tiles afterwards in a fixed order)."""
        m2 = nmask[:, None] & cmask[None, :]
        offs = rn[:, None] * K + cs[None, :]
        if HAS_DOT:
            w = tl.load(w_ptr + offs, mask=m2, other=0.0).to(ACC)
            tl.store(dot_ptr + col_tile * N + rn, tl.sum(acc * w, axis=1), mask=nmask)
        if HAS_RS:
            acc = acc * tl.load(rs_ptr + rn, mask=nmask, other=0.0).to(ACC)[:, None]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _weight_grad_sum_kernel(part_ptr, out_ptr, rs_ptr, w_ptr, dot_ptr, splits, N, K,
                                HAS_RS: tl.constexpr, HAS_DOT: tl.constexpr, ACC: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The split-M partials (splits, N, K) of a weight gradient summed in a fixed order (deterministic) and
        written once in the output's dtype by :func:`_weight_grad_store`."""
        cs = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < N
        cmask = cs < K
        ptrs = part_ptr + rn[:, None] * K + cs[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_K], ACC)
        for _ in range(0, splits):
            acc += tl.load(ptrs, mask=nmask[:, None] & cmask[None, :], other=0.0).to(ACC)
            ptrs += N * K
        _weight_grad_store(acc, rn, cs, nmask, cmask, out_ptr, rs_ptr, w_ptr, dot_ptr, tl.program_id(0), N, K,
                           HAS_RS, HAS_DOT, ACC)

    @triton.jit
    def _irb_dw2_kernel(dy_ptr, s_ptr, u_ptr, wc_ptr, bc_ptr, part_ptr, partb_ptr, rs_ptr, w_ptr, dot_ptr,
                        M, H, W, HD, C, iters, HAS_S: tl.constexpr, FINAL: tl.constexpr, HAS_RS: tl.constexpr,
                        HAS_DOT: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """fc2's weight and bias gradients before the layer scale, G = dv^T [a | 1], dv = dy * s[b, c] formed as dy
        is loaded (never stored), a recomputed from u (never stored): a program owns a (BLOCK_N output channels x
        BLOCK_K hidden channels) tile and ``iters`` pixel chunks; it writes one fp32 partial tile (and, for the first
        hidden tile, the partial column sums of dv), summed over the programs afterwards in a fixed order; with
        ``FINAL`` (one split: the tile is the whole gradient) it writes the gradient itself by
        :func:`_weight_grad_store` (the layer scale applied, its gradient's row dots)."""
        cs, rn, start = _split_m_program(BLOCK_K, BLOCK_N, BLOCK_M, iters, INT64)
        cmask = cs < HD
        nmask = rn < C
        DT = u_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK_N, BLOCK_K], ACC)
        accb = tl.zeros([BLOCK_N], ACC)
        first = tl.program_id(0) == 0
        for it in range(0, iters):
            idx = start + it * BLOCK_M + tl.arange(0, BLOCK_M)
            b, h, w, pmask, rt, rb, wl, wr = _pixels(idx, M, H, W)
            a = _fc2_input(u_ptr, wc_ptr, bc_ptr, idx, cs, pmask, rt, rb, wl, wr, cmask, W, HD, ACC, BLOCK_M, BLOCK_K)
            m2 = nmask[:, None] & pmask[None, :]
            dvt = tl.load(dy_ptr + idx[None, :] * C + rn[:, None], mask=m2, other=0.0).to(ACC)
            if HAS_S:
                dvt *= tl.load(s_ptr + b[None, :] * C + rn[:, None], mask=m2, other=0.0).to(ACC)
            dvt = dvt.to(DT)                # the GEMM operand in the hidden dtype, as F.linear's backward has it
            acc += tl.dot(dvt, a.to(DT), input_precision=DOT_PREC).to(ACC)
            if first:                       # d_b2: summed by the first hidden tile's programs only
                accb += tl.sum(dvt.to(ACC), axis=1)
        if FINAL:
            _weight_grad_store(acc, rn, cs, nmask, cmask, part_ptr, rs_ptr, w_ptr, dot_ptr, tl.program_id(0), C, HD,
                               HAS_RS, HAS_DOT, ACC)
        else:
            tl.store(part_ptr + tl.program_id(2) * C * HD + rn[:, None] * HD + cs[None, :], acc,
                     mask=nmask[:, None] & cmask[None, :])
        if first:
            tl.store(partb_ptr + tl.program_id(2) * C + rn, accb, mask=nmask)

    @triton.jit
    def _irb_dw1_kernel(du_ptr, x_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, part_ptr, partb_ptr, M, C, HD, iters,
                        LAYER_NORM: tl.constexpr, FINAL: tl.constexpr, INT64: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """fc1's weight and bias gradients du^T [xn | 1], xn = layer_norm(x) recomputed from the saved row
        statistics (never stored): a program owns a (BLOCK_N hidden x BLOCK_K input channels) tile and
        ``iters`` pixel chunks; it writes one fp32 partial tile (and, for the first channel tile, the
        partial column sums of du: d_b1), summed over the programs afterwards in a fixed order; with ``FINAL`` (one
        split) the gradient itself, in its dtype."""
        # input-channel tiles fastest: they read the same du chunk (from L2)
        rk, rn, start = _split_m_program(BLOCK_K, BLOCK_N, BLOCK_M, iters, INT64)
        pid_s = tl.program_id(2)
        nmask = rn < HD
        kmask = rk < C
        DT = du_ptr.dtype.element_ty
        if LAYER_NORM:
            g = tl.load(lnw_ptr + rk, mask=kmask, other=0.0).to(ACC)
            bb = tl.load(lnb_ptr + rk, mask=kmask, other=0.0).to(ACC)
        acc = tl.zeros([BLOCK_N, BLOCK_K], ACC)
        accb = tl.zeros([BLOCK_N], ACC)
        first = tl.program_id(0) == 0
        for it in range(0, iters):
            rm = start + it * BLOCK_M + tl.arange(0, BLOCK_M)
            mmask = rm < M
            dut = tl.load(du_ptr + rm[None, :] * HD + rn[:, None], mask=nmask[:, None] & mmask[None, :], other=0.0)
            m2 = mmask[:, None] & kmask[None, :]
            xk = tl.load(x_ptr + rm[:, None] * C + rk[None, :], mask=m2, other=0.0).to(ACC)
            if LAYER_NORM:
                mean = tl.load(mean_ptr + rm, mask=mmask, other=0.0)
                rstd = tl.load(rstd_ptr + rm, mask=mmask, other=0.0)
                xk = tl.where(m2, (xk - mean[:, None]) * rstd[:, None] * g[None, :] + bb[None, :], 0.0)
            acc += tl.dot(dut.to(DT), xk.to(DT), input_precision=DOT_PREC).to(ACC)
            if first:                       # d_b1: summed by the first channel tile's programs only
                accb += tl.sum(dut.to(ACC), axis=1)
        if FINAL:
            _weight_grad_store(acc, rn, rk, nmask, kmask, part_ptr, part_ptr, part_ptr, part_ptr, 0, HD, C,
                               False, False, ACC)
        else:
            tl.store(part_ptr + pid_s * HD * C + rn[:, None] * C + rk[None, :], acc,
                     mask=nmask[:, None] & kmask[None, :])
        if first:
            tl.store(partb_ptr + pid_s * HD + rn, accb, mask=nmask)

    @triton.jit
    def _irb_dx_kernel(du_ptr, w1_ptr, x_ptr, mean_ptr, rstd_ptr, lnw_ptr, dy_ptr, dx_ptr, part_ptr, M, C, HD, iters,
                       LAYER_NORM: tl.constexpr, ADD_DY: tl.constexpr, DY_AFTER: tl.constexpr, INT64: tl.constexpr,
                       ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        """dx from du: the GEMM dxn = du w1 over whole rows (BLOCK_C >= C), the LayerNorm backward in its epilogue
        (xhat recomputed from x and the saved statistics; the row reductions over C in registers) plus dy (the
        block residual's gradient), written once; dxn never stored.  ``DY_AFTER`` (row tiles too wide to hold dy
        in registers too): dy is added once all the program's rows are stored, 64 channels at a time, the program
        re-reading its own dx rows from L1/L2 behind a block barrier (which makes the block's global writes visible
        to all its threads).  A program walks ``iters`` row chunks and writes one fp32 partial row pair of the LayerNorm's
        weight and bias gradients (sum dxn * xhat, sum dxn), summed over the programs afterwards in a fixed
        order."""
        pid = tl.program_id(0)
        rc = tl.arange(0, BLOCK_C)
        cmask = rc < C
        DT = du_ptr.dtype.element_ty
        if LAYER_NORM:
            g = tl.load(lnw_ptr + rc, mask=cmask, other=0.0).to(ACC)
            acc_w = tl.zeros([BLOCK_C], ACC)
            acc_b = tl.zeros([BLOCK_C], ACC)
        for it in range(0, iters):
            rm = (pid * iters + it) * BLOCK_M + tl.arange(0, BLOCK_M)
            if INT64:
                rm = rm.to(tl.int64)
            mmask = rm < M
            acc = tl.zeros([BLOCK_M, BLOCK_C], ACC)
            for k0 in range(0, HD, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                kmask = rk < HD
                a = tl.load(du_ptr + rm[:, None] * HD + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
                wt = tl.load(w1_ptr + rk[:, None] * C + rc[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
                acc = tl.dot(a.to(DT), wt.to(DT), acc, input_precision=DOT_PREC)    # in place: no second row tile
            m2 = mmask[:, None] & cmask[None, :]
            offs = rm[:, None] * C + rc[None, :]
            if LAYER_NORM:
                mean = tl.load(mean_ptr + rm, mask=mmask, other=0.0).to(ACC)
                rstd = tl.load(rstd_ptr + rm, mask=mmask, other=0.0).to(ACC)
                xhat = tl.where(m2, (tl.load(x_ptr + offs, mask=m2, other=0.0).to(ACC) - mean[:, None]) * rstd[:, None],
                                0.0)
                acc_w += tl.sum(acc * xhat, axis=0)          # acc is 0 on rows past M
                acc_b += tl.sum(acc, axis=0)
                acc = layer_norm_backward_rows(acc, xhat, rstd, g, C)
            if ADD_DY:
                if not DY_AFTER:
                    acc += tl.load(dy_ptr + offs, mask=m2, other=0.0).to(ACC)
            tl.store(dx_ptr + offs, acc.to(dx_ptr.dtype.element_ty), mask=m2)
        if LAYER_NORM:
            tl.store(part_ptr + pid * 2 * C + rc, acc_w, mask=cmask)
            tl.store(part_ptr + pid * 2 * C + C + rc, acc_b, mask=cmask)
        if ADD_DY:
            if DY_AFTER:                                 # the program's own dx rows, from L1/L2
                tl.debug_barrier()
                for it in range(0, iters):
                    rm = (pid * iters + it) * BLOCK_M + tl.arange(0, BLOCK_M)
                    if INT64:
                        rm = rm.to(tl.int64)
                    for c0 in range(0, C, 64):
                        c2 = c0 + tl.arange(0, 64)
                        m3 = (rm < M)[:, None] & (c2 < C)[None, :]
                        o3 = rm[:, None] * C + c2[None, :]
                        v = tl.load(dx_ptr + o3, mask=m3, other=0.0).to(ACC) + tl.load(dy_ptr + o3, mask=m3,
                                                                                       other=0.0).to(ACC)
                        tl.store(dx_ptr + o3, v.to(dx_ptr.dtype.element_ty), mask=m3)

    @triton.jit
    def _irb_dgrad_kernel(dy_ptr, s_ptr, ls_ptr, u_ptr, w2_ptr, wc_ptr, bc_ptr, du_ptr, part_ptr, scratch_ptr,
                          x_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr, part1_ptr, part2_ptr, partb2_ptr,
                          B, H, W, HD, C, tiles_h, tiles_w, iters,
                          HAS_S: tl.constexpr, HAS_LS: tl.constexpr, WGRAD: tl.constexpr, LAYER_NORM: tl.constexpr,
                          INT64: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                          OH: tl.constexpr, OW: tl.constexpr, PO: tl.constexpr, PH: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        """The IRB backward from dv = d(fc2 output) = dy * s[b, c] (formed as dy is loaded) to du = d(fc1 output)
        and the depthwise conv's weight and bias gradients, da = dv w2 never stored: a program owns ``BLOCK_K``
        hidden channels and ``iters`` consecutive tiles of the map; a tile is ``OH x OW`` own pixels (``PO`` rows,
        a power of two) and its one-pixel halo, ``(OH + 2) x (OW + 2)`` pixels (``PH`` rows).  The program computes
        da (a GEMM over C) on the halo tile, writes it to its own scratch tile (L1/L2: a register tile cannot be
        shifted across pixels) and reads it back at the own pixels' 9 neighbours for the transposed depthwise
        conv; everything after da runs on the own pixels only.  Per-program fp32 partials (9 taps + bias), summed
        in a fixed order.  With ``WGRAD`` also fc1's bias (partial row 10) and weight gradient (x, the row
        statistics and the LayerNorm's parameters for xn) and fc2's before the layer scale (dy * s, s the
        drop-path factor; da's dv takes the layer scale ``ls`` too), into the program's slices of ``part1``
        (splits, HD, C), ``part2`` (splits, C, HD) and, for the first hidden chunk, ``partb2`` (splits, C)."""
        pid_k = tl.program_id(0)        # hidden chunks fastest: the programs of a split read the same dv tiles
        pid_s = tl.program_id(1)
        cs = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        cmask = cs < HD
        rq = tl.arange(0, PH)           # halo tile rows: (OH + 2) x (OW + 2) pixels, row-major
        qy = rq // (OW + 2)
        qx = rq - qy * (OW + 2)
        ro = tl.arange(0, PO)           # own tile rows: OH x OW pixels, row-major
        oy = ro // OW
        ox = ro - oy * OW
        rows = tl.arange(0, 16)
        kk = tl.arange(0, BLOCK_K)[None, :]
        sb = scratch_ptr + (pid_s * tl.num_programs(0) + pid_k) * (PH * BLOCK_K)
        DT = u_ptr.dtype.element_ty
        acc_w = tl.zeros([16, BLOCK_K], ACC)            # rows 0..8: d_wc taps (ky * 3 + kx), row 9: d_bc, 10: d_b1
        if WGRAD:
            # fc1's and fc2's weight gradients: this program's slices of the split's fp32 partials, (BLOCK_K hidden
            # rows x C) of (splits, HD, C) and (C x BLOCK_K hidden columns) of (splits, C, HD), accumulated in
            # place BLOCK_C channels at a time (L1/L2 hits; a register accumulator as wide as the map spills)
            p1 = part1_ptr + pid_s * HD * C + cs[:, None] * C
            p2 = part2_ptr + pid_s * C * HD + cs[None, :]
            pb2 = partb2_ptr + pid_s * C
            for c0 in range(0, C, BLOCK_C):
                ck = c0 + tl.arange(0, BLOCK_C)
                ckm = ck < C
                tl.store(p1 + ck[None, :], tl.zeros([BLOCK_K, BLOCK_C], ACC), mask=cmask[:, None] & ckm[None, :])
                tl.store(p2 + ck[:, None] * HD, tl.zeros([BLOCK_C, BLOCK_K], ACC), mask=ckm[:, None] & cmask[None, :])
                if pid_k == 0:
                    tl.store(pb2 + ck, tl.zeros([BLOCK_C], ACC), mask=ckm)
        for it in range(0, iters):
            t = pid_s * iters + it
            b = t // (tiles_h * tiles_w)
            rem = t - b * (tiles_h * tiles_w)
            ty = rem // tiles_w
            y0 = ty * OH
            x0 = (rem - ty * tiles_w) * OW
            hq = y0 - 1 + qy
            wq = x0 - 1 + qx
            iq = (b * H + hq) * W + wq
            h = y0 + oy
            w = x0 + ox
            idx = (b * H + h) * W + w
            if INT64:
                iq = iq.to(tl.int64)
                idx = idx.to(tl.int64)
            # b == B past the last tile, where no pixel is valid (its indices are past the map's)
            valid = (rq < (OH + 2) * (OW + 2)) & (hq >= 0) & (hq < H) & (wq >= 0) & (wq < W) & (iq < B * H * W)
            own = (ro < OH * OW) & (h < H) & (w < W) & (idx < B * H * W)
            # ---- da = dv w2 on the halo tile (0 off the map: the transposed conv's zero padding)
            da = tl.zeros([PH, BLOCK_K], ACC)
            for c0 in range(0, C, BLOCK_C):
                ck = c0 + tl.arange(0, BLOCK_C)
                ckm = ck < C
                dvr = tl.load(dy_ptr + iq[:, None] * C + ck[None, :], mask=valid[:, None] & ckm[None, :], other=0.0)
                if HAS_S:
                    sv = tl.load(s_ptr + tl.minimum(b, B - 1) * C + ck, mask=ckm, other=0.0)
                    dvr = dvr.to(ACC) * sv.to(ACC)[None, :]
                if HAS_LS:
                    dvr = dvr.to(ACC) * tl.load(ls_ptr + ck, mask=ckm, other=0.0).to(ACC)[None, :]
                w2t = tl.load(w2_ptr + ck[:, None] * HD + cs[None, :], mask=ckm[:, None] & cmask[None, :], other=0.0)
                da += tl.dot(dvr.to(DT), w2t.to(DT), input_precision=DOT_PREC).to(ACC)
            # the barriers order the scratch tile's writes and reads among the warps
            tl.debug_barrier()
            tl.store(sb + rq[:, None] * BLOCK_K + kk, da)
            tl.debug_barrier()
            # ---- du = gelu'(u) * (da + sum_t wc[t] * da[p - o_t]) at the own pixels p (o_t: tap t's offset; the
            # neighbour of own pixel (oy, ox) at -o_t is halo pixel (oy + 2 - ky, ox + 2 - kx))
            dac = tl.load(sb + ((oy + 1) * (OW + 2) + ox + 1)[:, None] * BLOCK_K + kk, mask=own[:, None], other=0.0)
            dg = dac
            for ky in tl.static_range(3):
                for kx in tl.static_range(3):
                    if ky * 3 + kx == 4:        # the own pixel itself: dac, loaded above
                        tap = dac
                    else:
                        tap = tl.load(sb + ((oy + 2 - ky) * (OW + 2) + ox + 2 - kx)[:, None] * BLOCK_K + kk,
                                      mask=own[:, None], other=0.0)
                    dg += _load_w(wc_ptr, cs, cmask, HD, ky * 3 + kx, ACC) * tap
            hoff = idx[:, None] * HD + cs[None, :]
            u = tl.load(u_ptr + hoff, mask=own[:, None] & cmask[None, :], other=0.0).to(ACC)
            cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
            du = dg * (cdf + u * tl.exp(-0.5 * u * u) * 0.3989422804014327)
            tl.store(du_ptr + hoff, du.to(du_ptr.dtype.element_ty), mask=own[:, None] & cmask[None, :])
            if WGRAD:
                # ---- fc1's weight and bias gradients du^T [xn | 1] over the own pixels: du as stored (in the hidden
                # dtype), xn recomputed from x and the forward's row statistics
                du = tl.where(own[:, None] & cmask[None, :], du, 0.0).to(DT)
                acc_w += tl.where(rows[:, None] == 10, tl.sum(du.to(ACC), axis=0)[None, :], 0.0)
                if LAYER_NORM:
                    mean = tl.load(mean_ptr + idx, mask=own, other=0.0).to(ACC)
                    rstd = tl.load(rstd_ptr + idx, mask=own, other=0.0).to(ACC)
                tl.debug_barrier()          # the previous tile's partial updates (another thread's elements)
                for c0 in range(0, C, BLOCK_C):
                    ck = c0 + tl.arange(0, BLOCK_C)
                    ckm = ck < C
                    om = own[:, None] & ckm[None, :]
                    xk = tl.load(x_ptr + idx[:, None] * C + ck[None, :], mask=om, other=0.0).to(ACC)
                    if LAYER_NORM:
                        lng = tl.load(lnw_ptr + ck, mask=ckm, other=0.0).to(ACC)
                        lnb = tl.load(lnb_ptr + ck, mask=ckm, other=0.0).to(ACC)
                        xk = tl.where(om, (xk - mean[:, None]) * rstd[:, None] * lng[None, :] + lnb[None, :], 0.0)
                    m1 = cmask[:, None] & ckm[None, :]
                    d1 = tl.dot(tl.trans(du), xk.to(DT), input_precision=DOT_PREC).to(ACC)
                    tl.store(p1 + ck[None, :], tl.load(p1 + ck[None, :], mask=m1, other=0.0) + d1, mask=m1)
            # ---- d_wc[t] += sum_p da[p] g[p + o_t], d_bc += sum_p da[p] over the own pixels (they partition the
            # map); the neighbours' g = gelu(u) by shifted masked loads of u (L1/L2 hits); with WGRAD fc2's input
            # a = g + dwconv3x3(g) + bc from the same taps
            if WGRAD:
                a = tl.load(bc_ptr + cs, mask=cmask, other=0.0).to(ACC)[None, :] + tl.zeros([PO, BLOCK_K], ACC)
            for ky in tl.static_range(3):
                for kx in tl.static_range(3):
                    nb = own & (h + (ky - 1) >= 0) & (h + (ky - 1) < H) & (w + (kx - 1) >= 0) & (w + (kx - 1) < W)
                    gs = tl.load(u_ptr + hoff + ((ky - 1) * W + (kx - 1)) * HD, mask=nb[:, None] & cmask[None, :],
                                 other=0.0).to(ACC)
                    gs = 0.5 * gs * (1.0 + tl.math.erf(gs * 0.7071067811865476))
                    acc_w += tl.where(rows[:, None] == ky * 3 + kx, tl.sum(dac * gs, axis=0)[None, :], 0.0)
                    if WGRAD:
                        a += gs * _load_w(wc_ptr, cs, cmask, HD, ky * 3 + kx, ACC)
                        if ky == 1:
                            if kx == 1:
                                a += gs
            acc_w += tl.where(rows[:, None] == 9, tl.sum(dac, axis=0)[None, :], 0.0)     # dac is 0 off the own pixels
            if WGRAD:
                # ---- fc2's weight and bias gradients before the layer scale, (dy keep)^T [a | 1] over the own pixels
                a = a.to(DT)
                for c0 in range(0, C, BLOCK_C):
                    ck = c0 + tl.arange(0, BLOCK_C)
                    ckm = ck < C
                    dvk = tl.load(dy_ptr + idx[:, None] * C + ck[None, :], mask=own[:, None] & ckm[None, :],
                                  other=0.0).to(ACC)
                    if HAS_S:
                        dvk *= tl.load(s_ptr + tl.minimum(b, B - 1) * C + ck, mask=ckm, other=0.0).to(ACC)[None, :]
                    dvk = dvk.to(DT)        # the GEMM operand in the hidden dtype, as F.linear's backward has it
                    m2 = ckm[:, None] & cmask[None, :]
                    d2 = tl.dot(tl.trans(dvk), a, input_precision=DOT_PREC).to(ACC)
                    tl.store(p2 + ck[:, None] * HD, tl.load(p2 + ck[:, None] * HD, mask=m2, other=0.0) + d2, mask=m2)
                    if pid_k == 0:
                        tl.store(pb2 + ck, tl.load(pb2 + ck, mask=ckm, other=0.0) + tl.sum(dvk.to(ACC), axis=0),
                                 mask=ckm)
        NROWS: tl.constexpr = 11 if WGRAD else 10
        tl.store(part_ptr + pid_s * NROWS * HD + rows[:, None] * HD + cs[None, :], acc_w,
                 mask=(rows < NROWS)[:, None] & cmask[None, :])

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
#: GPU tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per kernel, from ptxas on sm_90 / sm_80 (the
#: compile gate): fc1 with 32-deep K tiles spills in fp32 (the FMA dot), fc2 builds its A operand (9
#: GELU'd taps per element) in registers and spills with 64-row tiles in bf16; these use <= 230 registers.
GPU_CONFIG = {"fc1": (64, 64, 16, 8, 2), "fc2": (32, 64, 16, 8, 1), "dw2": (16, 128, 16, 8, 1),
              "dw1": (32, 32, 64, 4, 1),
              "sum": (16, 32, 64, 4, 1)}   # the weight gradients' fixed-order partial sums (no GEMM: BLOCK_M unused)
#: the split-M weight gradients: about this many programs per SM in all (each walks ``iters`` pixel chunks and
#: writes one fp32 partial tile), while the partials' traffic (fp32, written and read: 8 n k bytes a split) stays
#: within ``PARTIAL_TRAFFIC_SHARE`` of the GEMM operands' (M (n + k) 16-bit elements): a weight as large as the map
#: it is reduced over (the last stages) gets one split, whose programs write the gradient itself, in its dtype
PROGRAMS_PER_SM = 8


def _config(kind: str, m: int, n: int, k: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a GEMM of m rows, output width n, depth k."""
    bm, bn, bk, warps, stages = GPU_CONFIG[kind]
    if big_interpreter_tiles():             # the interpreter: few, big programs
        bm, bn, bk = 128, 256, 256
    bm = max(16, min(bm, next_pow2(m)))
    bn = max(16, min(bn, next_pow2(n)))
    bk = max(16, min(bk, next_pow2(k)))
    return bm, bn, bk, warps, stages


def _split_m_config(kind: str, M: int, n: int, k: int, device: torch.device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, iters, splits) of a split-M weight-gradient kernel ("dw2": n = C, k = HD;
    "dw1": n = HD, k = C): about ``PROGRAMS_PER_SM`` programs per SM in all, each walking ``iters`` pixel chunks,
    as long as the partials' traffic stays within ``PARTIAL_TRAFFIC_SHARE`` of the operands'."""
    bm, bn, bk, warps, _ = _config(kind, M, n, k)
    tiles = cdiv(n, bn) * cdiv(k, bk)
    chunks = cdiv(M, bm)
    iters = cdiv(chunks, partial_programs(PROGRAMS_PER_SM * num_sms(device) // tiles, 4 * n * k, 2 * M * (n + k)))
    return bm, bn, bk, warps, iters, cdiv(chunks, iters)


#: the backward's dx kernel (whole rows: the LayerNorm backward's reductions over C in its epilogue): pixels x
#: channels per row tile on a GPU, its GEMM depth tile and warps; used while C fits DX_MAX_C (wider maps: torch.mm
#: and ATen's LayerNorm backward)
DX_CONFIG = {"elements": 4096, "block_k": 32, "warps": 8}
#: row tiles wider than ``DX_CONFIG["elements"]`` (16 x 512): 16-deep GEMM tiles, and dy added once the program's
#: rows are stored, from L1/L2 (``DY_AFTER``: 32-deep tiles, or dy beside the epilogue's tiles, even in a loop right
#: after each tile's store, spill on sm_90).  A program re-reads its ``iters`` x 16 rows (10-20 KB a tile); one
#: program fits an SM (~250 registers x 256 threads), so the rows awaiting their dy stay a few MB of L2 in all
DX_WIDE_BLOCK_K = 16
DX_MAX_C = 512


def _dx_config(M: int, C: int, HD: int, device: torch.device):
    """(BLOCK_M, BLOCK_C, BLOCK_K, warps, iters, programs, wide) of the dx kernel: about ``PROGRAMS_PER_SM`` programs
    per SM in all, each walking ``iters`` row tiles; ``wide``: a GPU row tile over the element budget (dy is then
    added after the tile is stored: ``DY_AFTER``)."""
    bc = max(16, next_pow2(C))
    big = big_interpreter_tiles()
    bm = max(16, min(DX_CONFIG["elements"] * (8 if big else 1) // bc, next_pow2(M)))
    bk = max(16, min(DX_CONFIG["block_k"], next_pow2(HD)))
    chunks = cdiv(M, bm)
    iters = cdiv(chunks, PROGRAMS_PER_SM * num_sms(device))
    wide = not big and bm * bc > DX_CONFIG["elements"]
    if wide:
        bk = min(bk, DX_WIDE_BLOCK_K)
    return bm, bc, bk, DX_CONFIG["warps"], iters, cdiv(chunks, iters), wide


#: the backward's dgrad kernel: (own tile's rows, its columns, BLOCK_K, widest BLOCK_C, warps) on a GPU (ptxas:
#: 170-245 registers at 8 warps, no spills; BLOCK_K 32 spills) and in the interpreter (few, big programs).  da is
#: computed on the own tile and its one-pixel halo, (rows + 2) x (columns + 2) pixels padded to a power of two, the
#: rest on the own pixels (padded likewise): 6 x 14 own pixels, an 8 x 16 halo tile (da's GEMM on 128 rows for 84)
DGRAD_CONFIG = {"cuda": (6, 14, 16, 32, 8), "cpu": (30, 30, 128, 256, 4),
                # with fc1's and fc2's weight gradients (WGRAD): 8 x 8 own pixels, so that their two products run
                # on exactly the pixels they own (64 rows) and only da pays for the halo (128 rows for 64); wider own
                # tiles spill at 8 warps, 16 warps cannot hold the 240 registers; 16-channel chunks (32 spill in
                # fp32 on sm_80 under Triton 3.6)
                "cuda_wgrad": (8, 8, 16, 16, 8)}
#: the dgrad kernel's programs per SM (two waves: the last one's ragged tail is short)
DGRAD_PROGRAMS_PER_SM = 2


def _dgrad_rows(oh: int, ow: int):
    """(PO, PH): the dgrad kernel's rows for an ``oh x ow`` own tile and for it with its one-pixel halo."""
    return next_pow2(oh * ow), next_pow2((oh + 2) * (ow + 2))


def _dgrad_config(B: int, H: int, W: int, C: int, HD: int, device: torch.device, wgrad: bool = False):
    """(OH, OW, BLOCK_C, BLOCK_K, warps, tiles_h, tiles_w, iters, splits) of the dgrad kernel: own tiles as large
    as :data:`DGRAD_CONFIG` and the map allow, ``DGRAD_PROGRAMS_PER_SM`` programs per SM in all (a
    program's ~240 registers x 256 threads hold an SM alone: more would only queue, each adding its scratch tile's
    write-back and its partials); with ``wgrad`` (the weight gradients' fp32 partials, 2 x 8 C HD bytes a split)
    one program per SM and no more splits than keep the partials within ``PARTIAL_TRAFFIC_SHARE`` of the two
    GEMMs' operand bytes."""
    oh, ow, bk, bc, warps = DGRAD_CONFIG["cpu" if big_interpreter_tiles() else ("cuda_wgrad" if wgrad else "cuda")]
    oh, ow = min(oh, H), min(ow, W)
    bc = max(16, min(bc, next_pow2(C)))
    bk = max(16, min(bk, next_pow2(HD)))
    tiles_h, tiles_w = cdiv(H, oh), cdiv(W, ow)
    tiles = B * tiles_h * tiles_w
    splits = max(1, (1 if wgrad else DGRAD_PROGRAMS_PER_SM) * num_sms(device) // cdiv(HD, bk))
    if wgrad:
        splits = partial_programs(splits, 2 * 4 * C * HD, 2 * B * H * W * (C + HD) * 2)
    iters = cdiv(tiles, splits)
    return oh, ow, bc, bk, warps, tiles_h, tiles_w, iters, cdiv(tiles, iters)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------
def _forward_triton(x, w1, b1, wc, bc, w2, b2, scale, keep, norm_weight, norm_bias, eps, shortcut, hidden_dtype):
    B, H, W, C = x.shape
    HD = w1.shape[0]
    M = B * H * W
    acc = acc_dtype(x.dtype)
    x2 = x.contiguous()
    res = x2 if shortcut is None else shortcut.contiguous()
    u = new_empty((B, H, W, HD), hidden_dtype, x.device)
    mean, rstd = (new_empty((B, H, W), acc, x.device) for _ in range(2))
    out = new_empty((B, H, W, C), x.dtype, x.device)
    ln = norm_weight is not None
    int64 = needs_int64(x2, u, res)
    bm, bn, bk, warps, stages = _config("fc1", M, HD, C)
    with device_guard(x):
        _irb_fc1_kernel[(cdiv(HD, bn), cdiv(M, bm))](
            x2, norm_weight if ln else b1, norm_bias if ln else b1, w1, b1, u, mean, rstd, M, C, HD, float(eps),
            LAYER_NORM=ln, INT64=int64, ACC=tl_acc(x.dtype), DOT_PREC=_dot_precision(hidden_dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, **launch_options())
        w9 = wc.reshape(HD, 9).t().contiguous()
        bm, bn, bk, warps, stages = _config("fc2", M, C, HD)
        _irb_fc2_kernel[(cdiv(C, bn), cdiv(M, bm))](
            u, w9, bc, w2, b2, scale if scale is not None else b2, keep if keep is not None else b2, res, out,
            M, H, W, HD, C, HAS_SCALE=scale is not None, HAS_KEEP=keep is not None,
            INT64=int64, ACC=tl_acc(x.dtype), DOT_PREC=_dot_precision(hidden_dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, **launch_options())
    return out, u, mean, rstd


def _weight_grad_sum(part, grad_dtype, rs=None, w=None):
    """(gradient (n, k) in ``grad_dtype``, the row dots' partials (column tiles, n) with ``w``, else None) from the
    split-M partials (splits, n, k): their fixed-order sum by ``_weight_grad_sum_kernel``."""
    splits, n, k = part.shape
    _, bn, bk, warps, _ = _config("sum", 1, n, k)
    out = new_empty((n, k), grad_dtype, part.device)
    dot = new_empty((cdiv(k, bk), n), part.dtype, part.device) if w is not None else None
    with device_guard(part):
        _weight_grad_sum_kernel[(cdiv(k, bk), cdiv(n, bn))](
            part, out, rs if rs is not None else part, w if w is not None else part, dot if w is not None else part,
            splits, n, k, HAS_RS=rs is not None, HAS_DOT=w is not None, ACC=tl_acc(part.dtype), BLOCK_N=bn,
            BLOCK_K=bk, num_warps=warps, **launch_options())
    return out, dot


def _fc2_weight_grad_triton(dy, u, wc, bc, s, scale, w2, grad_dtype):
    B, H, W, HD = u.shape
    C = dy.shape[-1]
    M = B * H * W
    bm, bn, bk, warps, iters, splits = _split_m_config("dw2", M, C, HD, u.device)
    acc = acc_dtype(u.dtype)
    final = splits == 1                     # the programs write the gradient itself
    part = new_empty((C, HD) if final else (splits, C, HD), grad_dtype if final else acc, u.device)
    partb = new_empty((splits, C), acc, u.device)
    dot = new_empty((cdiv(HD, bk), C), acc, u.device) if final and w2 is not None else None
    w9 = wc.reshape(HD, 9).t().contiguous()
    with device_guard(u):
        _irb_dw2_kernel[(cdiv(HD, bk), cdiv(C, bn), splits)](
            dy, s if s is not None else dy, u, w9, bc, part, partb, scale if scale is not None else partb,
            w2 if w2 is not None else part, dot if dot is not None else partb, M, H, W, HD, C, iters,
            HAS_S=s is not None, FINAL=final, HAS_RS=final and scale is not None, HAS_DOT=dot is not None,
            INT64=needs_int64(dy, u, part), ACC=tl_acc(u.dtype), DOT_PREC=_dot_precision(u.dtype), BLOCK_M=bm,
            BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=1, **launch_options())
    if not final:
        part, dot = _weight_grad_sum(part, grad_dtype, scale, w2)
    return part, partb.sum(0), dot          # fixed-order sums: deterministic


def _fc1_weight_grad_triton(du, x, mean, rstd, norm_weight, norm_bias, grad_dtype):
    M, HD = du.shape
    C = x.shape[-1]
    bm, bn, bk, warps, iters, splits = _split_m_config("dw1", M, HD, C, du.device)
    acc = acc_dtype(x.dtype)
    final = splits == 1                     # the programs write the gradient itself
    part = new_empty((HD, C) if final else (splits, HD, C), grad_dtype if final else acc, du.device)
    partb = new_empty((splits, HD), acc, du.device)
    ln = norm_weight is not None
    with device_guard(du):
        _irb_dw1_kernel[(cdiv(C, bk), cdiv(HD, bn), splits)](
            du, x, mean, rstd, norm_weight if ln else mean, norm_bias if ln else mean, part, partb, M, C, HD, iters,
            LAYER_NORM=ln, FINAL=final, INT64=needs_int64(du, x, part), ACC=tl_acc(x.dtype),
            DOT_PREC=_dot_precision(du.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=1,
            **launch_options())
    if not final:
        part = _weight_grad_sum(part, grad_dtype)[0]
    return part, partb.sum(0)               # fixed-order sums: deterministic


def _input_grad_triton(du, w1, x, mean, rstd, norm_weight, dy):
    B, H, W, C = x.shape
    M, HD = du.shape
    x, w1 = x.contiguous(), w1.contiguous()
    bm, bc, bk, warps, iters, programs, wide = _dx_config(M, C, HD, du.device)
    acc = acc_dtype(x.dtype)
    ln = norm_weight is not None
    dx = new_empty(x.shape, x.dtype, x.device)
    part = new_empty((programs, 2, C) if ln else (0,), acc, x.device)
    with device_guard(du):
        _irb_dx_kernel[(programs,)](
            du, w1, x, mean, rstd, norm_weight if ln else mean, dy if dy is not None else x, dx, part, M, C, HD, iters,
            LAYER_NORM=ln, ADD_DY=dy is not None, DY_AFTER=wide, INT64=needs_int64(du, x), ACC=tl_acc(x.dtype),
            DOT_PREC=_dot_precision(du.dtype), BLOCK_M=bm, BLOCK_C=bc, BLOCK_K=bk, num_warps=warps, num_stages=1,
            **launch_options())
    if not ln:
        return dx, None, None
    return dx, part[:, 0].sum(0), part[:, 1].sum(0)     # fixed-order reductions over the programs: deterministic


def _dgrad_triton(dy, u, w2, wc, s, bc=None, scale=None, x=None, mean=None, rstd=None, norm_weight=None,
                  norm_bias=None):
    """The dgrad kernel: (du, d_wc, d_bc) and, given x (``WGRAD``: fc1's and fc2's weight gradients in the same
    pass), the fp32 partials (d_b1 (HD,), fc1's (splits, HD, C), fc2's before the layer scale (splits, C, HD), its
    bias's (splits, C)); s (B, C) the per-sample factor of dv and, with x, ``scale`` (C,) the layer scale of da's
    dv = dy * s * scale (fc2's weight gradient takes dy * s)."""
    B, H, W, HD = u.shape
    C = dy.shape[-1]
    wgrad = x is not None
    oh, ow, bc_, bk, warps, tiles_h, tiles_w, iters, splits = _dgrad_config(B, H, W, C, HD, u.device, wgrad)
    po, ph = _dgrad_rows(oh, ow)
    acc = acc_dtype(u.dtype)
    du = new_empty(u.shape, u.dtype, u.device)
    rows = 11 if wgrad else 10
    part = new_empty((splits, rows, HD), acc, u.device)
    scratch = new_empty((splits, cdiv(HD, bk), ph, bk), acc, u.device)
    w9 = wc.reshape(HD, 9).t().contiguous()
    ln = wgrad and norm_weight is not None
    part1, part2, partb2 = ((new_empty((splits, HD, C), acc, u.device), new_empty((splits, C, HD), acc, u.device),
                             new_empty((splits, C), acc, u.device)) if wgrad else (part, part, part))
    with device_guard(u):
        _irb_dgrad_kernel[(cdiv(HD, bk), splits)](
            dy, s if s is not None else dy, scale if scale is not None else part, u, w2, w9,
            bc if bc is not None else part, du, part, scratch, x if wgrad else dy, mean if ln else part,
            rstd if ln else part, norm_weight if ln else part, norm_bias if ln else part, part1, part2, partb2,
            B, H, W, HD, C, tiles_h, tiles_w, iters,
            HAS_S=s is not None, HAS_LS=scale is not None, WGRAD=wgrad, LAYER_NORM=ln,
            INT64=needs_int64(dy, u, *((x,) if wgrad else ())), ACC=tl_acc(u.dtype), DOT_PREC=_dot_precision(u.dtype),
            OH=oh, OW=ow, PO=po, PH=ph, BLOCK_C=bc_, BLOCK_K=bk, num_warps=warps, num_stages=1,
            **launch_options())
    red = part.sum(0)                      # fixed-order reduction over the programs: deterministic
    grads = (du, red[:9].t().reshape(HD, 1, 3, 3).contiguous(), red[9].clone())
    return grads + ((red[10].clone(), part1, part2, partb2) if wgrad else ())


def _hidden_grads_triton(dy, u, x, mean, rstd, w2, wc, bc, b2, keep, scale, norm_weight, norm_bias, need_scale,
                         grad_dtype):
    B, _, _, C = x.shape
    du, dwc, dbc, db1, part1, part2, partb2 = _dgrad_triton(
        dy, u, w2.to(u.dtype), wc, _per_sample(None, keep, B, C, x.dtype), bc, scale, x, mean, rstd, norm_weight,
        norm_bias)
    dw1 = _weight_grad_sum(part1, grad_dtype)[0]
    dw2, dots = _weight_grad_sum(part2, grad_dtype, scale, w2 if need_scale else None)
    db2, dscale = _fc2_bias_and_scale_grads(partb2.sum(0), dots, scale, b2)    # fixed-order sums: deterministic
    return du, dwc, dbc, dw1, db1, dw2, db2, dscale


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def irb_reference(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], wc: torch.Tensor,
                  bc: Optional[torch.Tensor], w2: torch.Tensor, b2: Optional[torch.Tensor],
                  scale: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None,
                  norm_weight: Optional[torch.Tensor] = None, norm_bias: Optional[torch.Tensor] = None,
                  eps: float = 1e-6, shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference math of an LRFormer block's second half, tokens-last (B, H, W, C):
    ``shortcut + scale * keep * fc2(h + dwconv(h)), h = gelu(fc1(layer_norm(x)))``.

    w1 (HD, C) and w2 (C, HD): the 1x1 convs as matrices; wc (HD, 1, 3, 3), bc (HD,): the depthwise conv;
    scale (C,) layer scale or None; keep (B,) drop-path factor or None; norm_weight/norm_bias (C,) a
    LayerNorm's affine parameters (None: x is used as is); shortcut: the residual (default x).
    """
    B, C = x.shape[0], x.shape[-1]
    xn = F.layer_norm(x, (C,), norm_weight, norm_bias, eps) if norm_weight is not None else x
    h = F.linear(xn, w1, b1)
    h = dwconv3x3_reference(h, wc, bc, gelu=True, residual=True)
    h = F.linear(h, w2, b2)
    s = branch_scale(scale, keep, B, C, h)
    res = x if shortcut is None else shortcut
    return res + (h if s is None else h * s)


def _input_grad_reference(du, w1, x, mean, rstd, norm_weight, dy):
    """:func:`irb_input_grad` by torch.mm and ATen's LayerNorm backward: (dx, d_norm_weight, d_norm_bias)."""
    dxn = torch.mm(du, w1).reshape(x.shape)
    dnw = dnb = None
    if norm_weight is not None:
        dx, dnw, dnb = layer_norm_backward_reference(dxn, x, mean, rstd, norm_weight)
    else:
        dx = dxn.to(x.dtype)
    return (dx if dy is None else dx + dy), dnw, dnb


def _forward_reference(x, w1, b1, wc, bc, w2, b2, scale, keep, norm_weight, norm_bias, eps, shortcut, hidden_dtype):
    """The op's outputs (out, u, mean, rstd) by PyTorch (CPU without the interpreter)."""
    B, H, W, C = x.shape
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    if norm_weight is not None:
        mean, rstd = layer_norm_statistics(xa, eps)
        xn = layer_norm_from_statistics(xa, mean, rstd, norm_weight, norm_bias)
    else:
        mean, rstd = xa.new_zeros((B, H, W)), xa.new_zeros((B, H, W))
        xn = xa
    u = F.linear(xn.to(hidden_dtype), w1.to(hidden_dtype), b1.to(hidden_dtype))
    a = dwconv3x3_reference(u.to(acc), wc.to(acc), bc.to(acc), gelu=True, residual=True)
    v = F.linear(a.to(hidden_dtype), w2.to(hidden_dtype)).to(acc) + b2.to(acc)
    s = branch_scale(None if scale is None else scale.to(acc), None if keep is None else keep.to(acc), B, C, v)
    res = (x if shortcut is None else shortcut).to(acc)
    out = (res + (v if s is None else v * s)).to(x.dtype)
    return out, u, mean, rstd


def _per_sample(scale, keep, B: int, C: int, dtype: torch.dtype):
    """dv's factor ``scale[c] * keep[b]`` as a (B, C) tensor in the math dtype, or None: the kernels form
    dv = dy * s[b, c] as they load dy (never stored); fc2's weight gradient takes dy * keep[b] (the layer scale
    applied to the finished gradient)."""
    s = branch_scale(scale, keep, B, C, torch.empty((), dtype=acc_dtype(dtype)))
    return None if s is None else s.expand(B, 1, 1, C).reshape(B, C).contiguous()


def _fc2_bias_and_scale_grads(g, dots, scale, b2):
    """(db2, dscale) from fc2's bias gradient before the layer scale ``g`` (C,) and the row dots' partials
    ``dots`` (tiles, C) of ``sum_k w2 G`` (None: no layer-scale gradient, an empty one)."""
    db2 = g if scale is None else g * scale.to(g.dtype)
    dscale = g.new_empty((0,)) if dots is None else dots.sum(0) + g * (b2.to(g.dtype) if b2 is not None else 0)
    return db2, dscale


def _backward_impl(dy, x, u, mean, rstd, w1, b1, wc, bc, w2, b2, scale, keep, norm_weight, norm_bias,
                   has_shortcut: bool, need_scale: bool):
    """(dx, dw1, db1, dwc, dbc, dw2, db2, dscale, dnorm_weight, dnorm_bias) (the shortcut's gradient is dy
    itself, returned by the autograd function without a copy; without a shortcut dx includes it).  fc2's weight
    and bias gradients and the layer scale's (:func:`irb_fc2_weight_grad`: its input recomputed from u, the fc2
    output never stored), the weight gradients written in the parameters' dtype by their kernels, the backward
    through the depthwise conv (:func:`irb_dgrad`: da never stored), the normalised input recomputed from x and the saved
    statistics inside fc1's weight-gradient kernel (fc1's and fc2's weights of one dtype, as in the models: all
    three in one pass over u, :func:`irb_hidden_grads`), the LayerNorm backward and the residual's dy in the epilogue of the
    input-gradient GEMM (:func:`irb_input_grad`)."""
    B, H, W, C = x.shape
    HD = w1.shape[0]
    M = B * H * W
    hd = u.dtype
    dy2 = dy.contiguous().reshape(M, C)
    if w1.dtype == w2.dtype:                            # the weight gradients in the dgrad pass
        du, dwc, dbc, dw1, db1, dw2, db2, dscale = torch.ops.lrformer.irb_hidden_grads(
            dy2, u, x, mean, rstd, w2, wc, bc, b2, keep, scale, norm_weight, norm_bias, need_scale, w1.dtype)
    else:
        dw2, db2, dscale = torch.ops.lrformer.irb_fc2_weight_grad(
            dy2, u, wc, bc, _per_sample(None, keep, B, C, x.dtype), scale, w2 if need_scale else None,
            b2 if need_scale else None, w2.dtype)
        du, dwc, dbc = torch.ops.lrformer.irb_dgrad(dy2, u, w2.to(hd), wc, bc, _per_sample(scale, keep, B, C, x.dtype))
        dw1, db1 = torch.ops.lrformer.irb_fc1_weight_grad(du.reshape(M, HD), x, mean, rstd, norm_weight, norm_bias,
                                                          w1.dtype)
    du = du.reshape(M, HD)
    db1, db2, dscale = db1.to(b1.dtype), db2.to(b2.dtype), (dscale.to(scale.dtype) if need_scale else None)
    dx, dnw, dnb = torch.ops.lrformer.irb_input_grad(du, w1.to(hd), x, mean, rstd, norm_weight,
                                                    None if has_shortcut else dy2.reshape(x.shape))
    if norm_weight is None:
        dnw = dnb = None
    else:
        dnw, dnb = dnw.to(norm_weight.dtype), dnb.to(norm_bias.dtype)
    return (dx, dw1, db1, dwc.to(wc.dtype), dbc.to(bc.dtype), dw2, db2, dscale, dnw, dnb)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lrformer::irb", mutates_args=())
def _irb_op(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, wc: torch.Tensor, bc: torch.Tensor,
            w2: torch.Tensor, b2: torch.Tensor, scale: Optional[torch.Tensor], keep: Optional[torch.Tensor],
            norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], eps: float,
            shortcut: Optional[torch.Tensor],
            hidden_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, u = fc1 output (B, H, W, HD), LayerNorm mean and 1/std (B, H, W))."""
    fn = _forward_triton if use_kernel(x) else _forward_reference
    return fn(x, w1, b1, wc, bc, w2, b2, scale, keep, norm_weight, norm_bias, eps, shortcut, hidden_dtype)


@_irb_op.register_fake
def _(x, w1, b1, wc, bc, w2, b2, scale, keep, norm_weight, norm_bias, eps, shortcut, hidden_dtype):
    B, H, W, C = x.shape
    acc = acc_dtype(x.dtype)
    return (x.new_empty(x.shape), x.new_empty((B, H, W, w1.shape[0]), dtype=hidden_dtype),
            x.new_empty((B, H, W), dtype=acc), x.new_empty((B, H, W), dtype=acc))


def _scaled(dy: torch.Tensor, s: Optional[torch.Tensor], hidden: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The reference's dv = dy * s[b, c] (M, C) in the hidden dtype (the kernels form it as they load dy)."""
    B, H, W, _ = hidden
    if s is None:
        return dy.to(dtype)
    acc = acc_dtype(dtype)
    return (dy.to(acc).reshape(B, H * W, -1) * s.to(acc)[:, None, :]).reshape(dy.shape).to(dtype)


@torch.library.custom_op("lrformer::irb_fc2_weight_grad", mutates_args=())
def irb_fc2_weight_grad(dy: torch.Tensor, u: torch.Tensor, wc: torch.Tensor, bc: torch.Tensor,
                        s: Optional[torch.Tensor], scale: Optional[torch.Tensor], w2: Optional[torch.Tensor],
                        b2: Optional[torch.Tensor],
                        grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fc2's weight gradient (C, HD) in ``grad_dtype``, its bias gradient (C,) and, given w2 and b2, the layer
    scale's gradient (C,) (else empty), both in the math dtype.  With ``G = dv^T a``, ``g = dv^T 1``,
    ``dv = dy * s[b, c]`` (dy (M, C), s (B, C) the drop-path factor, or None) formed as dy is loaded and
    ``a = g + dwconv3x3(g) + bc``, ``g = gelu(u)``, recomputed from the stored pre-activation u (B, H, W, HD):
    ``dw2 = scale[c] G``, ``db2 = scale[c] g`` (scale (C,) the layer scale, or None: 1) and
    ``dscale[c] = sum_k w2[c, k] G[c, k] + b2[c] g[c]`` (the fc2 output's product with dy * s, that output never
    stored).  Neither dv nor a is stored."""
    if use_kernel(u):
        dw2, g, dots = _fc2_weight_grad_triton(dy, u, wc, bc, s, scale, w2, grad_dtype)
    else:
        acc = acc_dtype(u.dtype)
        dv = _scaled(dy, s, u.shape, u.dtype)
        a = dwconv3x3_reference(u.to(acc), wc.to(acc), bc.to(acc), gelu=True, residual=True)
        G, g = torch.mm(dv.t(), a.to(u.dtype).reshape(-1, u.shape[-1])).to(acc), dv.sum(0, dtype=acc)
        dots = None if w2 is None else (G * w2.to(acc)).sum(1)[None]
        dw2 = (G if scale is None else G * scale.to(acc)[:, None]).to(grad_dtype)
    return (dw2,) + _fc2_bias_and_scale_grads(g, dots if w2 is not None else None, scale, b2)


@irb_fc2_weight_grad.register_fake
def _(dy, u, wc, bc, s, scale, w2, b2, grad_dtype):
    acc = acc_dtype(u.dtype)
    C = dy.shape[-1]
    return (u.new_empty((C, u.shape[-1]), dtype=grad_dtype), u.new_empty((C,), dtype=acc),
            u.new_empty((C if w2 is not None else 0,), dtype=acc))


@torch.library.custom_op("lrformer::irb_fc1_weight_grad", mutates_args=())
def irb_fc1_weight_grad(du: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                        norm_weight: Optional[torch.Tensor],
                        norm_bias: Optional[torch.Tensor],
                        grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1's weight gradient ``du^T xn`` (HD, C) in ``grad_dtype`` and bias gradient ``du^T 1`` (HD,) in the math
    dtype, du (M, HD) in the hidden dtype, ``xn = (x - mean) * rstd * norm_weight + norm_bias`` from x (B, H, W, C)
    and the forward's row statistics (B, H, W) (x itself without norm parameters).  The kernel never stores xn."""
    if use_kernel(du):
        return _fc1_weight_grad_triton(du, x, mean, rstd, norm_weight, norm_bias, grad_dtype)
    C, acc = x.shape[-1], acc_dtype(x.dtype)
    xn = x.to(acc)
    if norm_weight is not None:
        xn = layer_norm_from_statistics(xn, mean, rstd, norm_weight, norm_bias)
    xn = xn.to(du.dtype).reshape(-1, C)
    dwb = torch.mm(du.t(), torch.cat([xn, xn.new_ones((xn.shape[0], 1))], 1)).to(acc)
    return dwb[:, :C].to(grad_dtype), dwb[:, C].contiguous()


@irb_fc1_weight_grad.register_fake
def _(du, x, mean, rstd, norm_weight, norm_bias, grad_dtype):
    acc = acc_dtype(x.dtype)
    return du.new_empty((du.shape[1], x.shape[-1]), dtype=grad_dtype), du.new_empty((du.shape[1],), dtype=acc)


@torch.library.custom_op("lrformer::irb_dgrad", mutates_args=())
def irb_dgrad(dy: torch.Tensor, u: torch.Tensor, w2: torch.Tensor, wc: torch.Tensor, bc: torch.Tensor,
              s: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The IRB backward between fc2 and fc1: from dv = d(fc2 output) = dy * s[b, c] (dy (M, C), s (B, C) or None,
    formed as dy is loaded) and the stored pre-activation u (B, H, W, HD) to (du (B, H, W, HD) in u's dtype,
    d_wc (HD, 1, 3, 3), d_bc (HD,) in the math dtype), ``a = g + dwconv3x3(g) + bc``, ``g = gelu(u)``,
    ``da = dv w2`` (w2 (C, HD) in u's dtype).  The kernel never stores dv or da."""
    if use_kernel(u):
        return _dgrad_triton(dy, u, w2, wc, s)
    acc = acc_dtype(u.dtype)
    dv = _scaled(dy, s, u.shape, u.dtype)
    du, dwc, dbc = torch.ops.lrformer.dwconv3x3_backward(torch.mm(dv, w2).reshape(u.shape), u, wc, bc, True, True)
    return du, dwc.to(acc), dbc.to(acc)


@irb_dgrad.register_fake
def _(dy, u, w2, wc, bc, s):
    acc = acc_dtype(u.dtype)
    HD = u.shape[-1]
    return u.new_empty(u.shape), u.new_empty((HD, 1, 3, 3), dtype=acc), u.new_empty((HD,), dtype=acc)


@torch.library.custom_op("lrformer::irb_hidden_grads", mutates_args=())
def irb_hidden_grads(dy: torch.Tensor, u: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                     w2: torch.Tensor, wc: torch.Tensor, bc: torch.Tensor, b2: torch.Tensor, keep: Optional[torch.Tensor],
                     scale: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
                     norm_bias: Optional[torch.Tensor], need_scale: bool,
                     grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                       torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The IRB backward between the block output's gradient dy (M, C) and du = d(fc1 output), with every weight
    gradient of the branch but the input's: :func:`irb_fc2_weight_grad` (dv = dy * keep[b] * scale[c]; the layer
    scale's gradient with ``need_scale``), :func:`irb_dgrad` and :func:`irb_fc1_weight_grad` in one kernel pass
    over u (the hidden map read once, du written once and not read back; x read for the normalised input):
    (du (B, H, W, HD), d_wc, d_bc, dw1 and dw2 in ``grad_dtype``, db1, db2, dscale in the math dtype)."""
    if use_kernel(u):
        return _hidden_grads_triton(dy, u, x, mean, rstd, w2, wc, bc, b2, keep, scale, norm_weight, norm_bias,
                                    need_scale, grad_dtype)
    B, _, _, C = x.shape
    dw2, db2, dscale = irb_fc2_weight_grad(dy, u, wc, bc, _per_sample(None, keep, B, C, x.dtype), scale,
                                           w2 if need_scale else None, b2 if need_scale else None, grad_dtype)
    du, dwc, dbc = irb_dgrad(dy, u, w2.to(u.dtype), wc, bc, _per_sample(scale, keep, B, C, x.dtype))
    dw1, db1 = irb_fc1_weight_grad(du.reshape(-1, u.shape[-1]), x, mean, rstd, norm_weight, norm_bias, grad_dtype)
    return du, dwc, dbc, dw1, db1, dw2, db2, dscale


@irb_hidden_grads.register_fake
def _(dy, u, x, mean, rstd, w2, wc, bc, b2, keep, scale, norm_weight, norm_bias, need_scale, grad_dtype):
    acc = acc_dtype(u.dtype)
    C, HD = x.shape[-1], u.shape[-1]
    return (u.new_empty(u.shape), u.new_empty((HD, 1, 3, 3), dtype=acc), u.new_empty((HD,), dtype=acc),
            u.new_empty((HD, C), dtype=grad_dtype), u.new_empty((HD,), dtype=acc),
            u.new_empty((C, HD), dtype=grad_dtype), u.new_empty((C,), dtype=acc),
            u.new_empty((C if need_scale else 0,), dtype=acc))


@torch.library.custom_op("lrformer::irb_input_grad", mutates_args=())
def irb_input_grad(du: torch.Tensor, w1: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                   norm_weight: Optional[torch.Tensor],
                   dy: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The IRB input's gradient from du (M, HD): ``dxn = du w1`` (w1 (HD, C) in du's dtype), through the LayerNorm
    (x (B, H, W, C), its forward's row statistics (B, H, W), norm_weight (C,); none: dx = dxn), plus dy (the block
    residual's gradient, or None): (dx in x's dtype, the LayerNorm's weight and bias gradients in the math dtype,
    or empty).  The kernel (maps up to ``DX_MAX_C`` wide) never stores dxn."""
    if use_kernel(du) and x.shape[-1] <= DX_MAX_C:
        dx, dnw, dnb = _input_grad_triton(du, w1, x, mean, rstd, norm_weight, dy)
    else:
        dx, dnw, dnb = _input_grad_reference(du, w1, x, mean, rstd, norm_weight, dy)
    if dnw is None:
        dnw, dnb = (x.new_empty((0,), dtype=acc_dtype(x.dtype)) for _ in range(2))
    return dx, dnw, dnb


@irb_input_grad.register_fake
def _(du, w1, x, mean, rstd, norm_weight, dy):
    acc = acc_dtype(x.dtype)
    n = x.shape[-1] if norm_weight is not None else 0
    return x.new_empty(x.shape), x.new_empty((n,), dtype=acc), x.new_empty((n,), dtype=acc)


@torch.library.custom_op("lrformer::irb_backward", mutates_args=())
def _irb_backward_op(dy: torch.Tensor, x: torch.Tensor, u: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                     w1: torch.Tensor, b1: torch.Tensor, wc: torch.Tensor, bc: torch.Tensor,
                     w2: torch.Tensor, b2: torch.Tensor, scale: Optional[torch.Tensor], keep: Optional[torch.Tensor],
                     norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                     has_shortcut: bool, need_scale: bool) -> list[torch.Tensor]:
    """The gradients of :func:`_backward_impl`; one that does not exist is an empty (0,) tensor."""
    grads = _backward_impl(dy, x, u, mean, rstd, w1, b1, wc, bc, w2, b2, scale, keep, norm_weight, norm_bias,
                           has_shortcut, need_scale)
    return [g if g is not None else x.new_empty((0,)) for g in grads]


@_irb_backward_op.register_fake
def _(dy, x, u, mean, rstd, w1, b1, wc, bc, w2, b2, scale, keep, norm_weight, norm_bias, has_shortcut,
      need_scale):
    def like(t, on=True):
        return t.new_empty(t.shape) if (t is not None and on) else x.new_empty((0,))
    return [like(x), like(w1), like(b1), like(wc), like(bc), like(w2), like(b2), like(scale, need_scale),
            like(norm_weight), like(norm_bias)]


def _setup_context(ctx, inputs, output):
    x, w1, b1, wc, bc, w2, b2, scale, keep, norm_weight, norm_bias, _eps, shortcut, hidden_dtype = inputs
    _, u, mean, rstd = output
    ctx.save_for_backward(x, u, mean, rstd, w1, b1, wc, bc, w2, b2, scale, keep, norm_weight, norm_bias)
    ctx.mark_non_differentiable(u, mean, rstd)
    ctx.set_materialize_grads(False)       # no zero-filled gradients for the non-differentiable outputs
    ctx.has_shortcut = shortcut is not None


def _backward(ctx, dy, _du, _dmean, _drstd):
    x, u, mean, rstd, w1, b1, wc, bc, w2, b2, scale, keep, norm_weight, norm_bias = ctx.saved_tensors
    if dy is None:                          # only the non-differentiable outputs were used
        return (None,) * 14
    need_scale = scale is not None and ctx.needs_input_grad[7]
    g = _irb_backward_op(dy, x, u, mean, rstd, w1, b1, wc, bc, w2, b2, scale, keep, norm_weight, norm_bias,
                         ctx.has_shortcut, need_scale)
    dx, dw1, db1, dwc, dbc, dw2, db2, dscale, dnw, dnb = g
    return (dx, dw1, db1, dwc, dbc, dw2, db2, dscale if need_scale else None, None,
            dnw if norm_weight is not None else None, dnb if norm_weight is not None else None, None,
            dy if ctx.has_shortcut else None, None)


_irb_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def _hidden_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMM operand dtype: the autocast dtype under autocast (as F.linear would cast), else x's."""
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def irb(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], wc: torch.Tensor, bc: Optional[torch.Tensor],
        w2: torch.Tensor, b2: Optional[torch.Tensor], scale: Optional[torch.Tensor] = None,
        keep: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
        norm_bias: Optional[torch.Tensor] = None, eps: float = 1e-6,
        shortcut: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The IRB branch of an LRFormer block fused: ``shortcut + scale * keep * IRB(layer_norm(x))`` (see the
    module docstring and :func:`irb_reference` for the arguments).  x ``(B, H, W, C)``; returns a new
    contiguous ``(B, H, W, C)`` tensor in x's dtype.  Differentiable in x, the weights, biases, layer
    scale, LayerNorm parameters and shortcut; deterministic."""
    check_tensor(x, "x", ndim=4)
    B, H, W, C = x.shape
    pd = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
    check_tensor(w1, "w1", ndim=2, dtypes=pd, device=x.device)
    HD = w1.shape[0]
    if w1.shape[1] != C:
        raise ValueError(f"w1 must be (hidden, C) = (*, {C}) for x of shape {tuple(x.shape)}, got {tuple(w1.shape)}")
    check_tensor(wc, "wc", ndim=4, dtypes=pd, device=x.device)
    if tuple(wc.shape) != (HD, 1, 3, 3):
        raise ValueError(f"wc must have shape (hidden, 1, 3, 3) = {(HD, 1, 3, 3)}, got {tuple(wc.shape)}")
    check_tensor(w2, "w2", ndim=2, dtypes=pd, device=x.device)
    if tuple(w2.shape) != (C, HD):
        raise ValueError(f"w2 must have shape (C, hidden) = {(C, HD)}, got {tuple(w2.shape)}")
    for name, t, n in (("b1", b1, HD), ("bc", bc, HD), ("b2", b2, C), ("scale", scale, C), ("norm_weight", norm_weight, C),
                       ("norm_bias", norm_bias, C), ("keep", keep, B)):
        if t is not None:   # the drop-path factor and the layer scale: any float dtype (buffers, fp32 parameters)
            check_tensor(t, name, ndim=1, device=x.device, **({} if name in ("keep", "scale") else {"dtypes": pd}))
            if t.shape[0] != n:
                raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if (norm_weight is None) != (norm_bias is None):
        raise ValueError("norm_weight and norm_bias must be given together (a LayerNorm's affine parameters)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if shortcut is not None:
        check_tensor(shortcut, "shortcut", ndim=4, device=x.device, dtype=x.dtype)
        if shortcut.shape != x.shape:
            raise ValueError(f"shortcut must have x's shape {tuple(x.shape)}, got {tuple(shortcut.shape)}")
    b1, bc, b2 = (b if b is not None else w1.new_zeros(n) for b, n in ((b1, HD), (bc, HD), (b2, C)))  # no bias: 0
    return _irb_op(x, w1, b1, wc, bc, w2, b2, scale, keep, norm_weight, norm_bias, float(eps), shortcut,
                   _hidden_dtype(x))[0]
