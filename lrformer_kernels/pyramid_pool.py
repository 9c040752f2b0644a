"""Pyramid adaptive average pooling: one map (B, H, W, C) -> every pooled grid in one tensor.

``pyramid_pool(x, grids)`` returns one contiguous ``(B, N_total, C)`` tensor, ``N_total =
sum(gh * gw)``: the cells of ``grids[0]`` (row-major), then those of ``grids[1]``, ...  It equals
``torch.cat([adaptive_avg_pool(x, g).reshape(B, -1, C) for g in grids], 1)`` (exact
``F.adaptive_avg_pool2d`` semantics: cell ``i`` of a grid of size ``g`` over an axis of length
``L`` covers ``[floor(i*L/g), ceil((i+1)*L/g))``, so grids larger than the map repeat pixels).
``split_pyramid(out, grids)`` gives the per-grid ``(B, gh, gw, C)`` views.

Design
------
Forward: ONE launch for all grids.  A program owns (batch b, channel block, block of
BLOCK_CELLS consecutive cells of one grid); it finds its grid from the block index (grid sizes
and offsets are scalar kernel arguments, at most 8 grids: no device-side table, no host->device
copy), and walks the cells' windows (flattened row-major, BLOCK_Q pixels of every cell per step,
tile ``[BLOCK_CELLS, BLOCK_Q, BLOCK_C]``, ~2K elements) with fp32 accumulation (fp64 for fp64
input), then writes each mean once.  ``x`` is read through its own strides, so an NCHW tensor
passed as ``x.permute(0, 2, 3, 1)`` (or any slice / expand) works without a copy; with a unit
channel stride the loads are 16-byte vectors along C.  Deterministic, no atomics, no
intermediate buffer.

Bytes (s = element size, K grids, M = B*H*W*C): the program id puts the cell block fastest, so all
cells of one (b, channel block) slab (H*W*BLOCK_C elements, e.g. 56*56*64*2 B = 400 KB) are pooled
back to back while the slab sits in L2: DRAM reads ~= M*s (the map once), L2->SM reads ~=
sum_k (cover factor of grid k) * M*s ~= K*M*s (a grid's windows overlap by at most one row/column
when g <= L; a grid larger than the map re-reads pixels ~(g/L)^2 times, but then the map is
tiny), writes B*N_total*C*s.  For the LRSA grids at 56x56 (N_total = 493 cells vs 3136 pixels)
that is ~1.16 M*s of DRAM traffic in all.  A strict "read once from SM" variant (a program per
(b, channel block, band of rows) keeping every grid's partial sums on chip) needs N_total*BLOCK_C
fp32 accumulators per program, or an fp32 row-sum intermediate of H*sum(gw)*C*4 bytes (~1.6x the
bf16 map at 56x56): no DRAM saving over the L2 reuse above, less parallelism; not chosen.
Programs of the last (coarsest, longest-window) grids are launched first to shorten the tail.

Backward (dL/dx, contiguous (B, H, W, C) in x's dtype): a program owns (b, block of BLOCK_P
pixels, channel block) and GATHERS, for every grid, the cells whose window contains each pixel:
rows ``floor(h*gh/H) <= i < ceil((h+1)*gh/H)`` (at most ``ceil(gh/H) + 1`` of them; 2 when the
grid is not larger than the map), same for columns, each divided by its cell's area.  grad_x is
written exactly once (B*H*W*C*s bytes); grad_out (B*N_total*C*s, read through its strides, so an
expanded gradient needs no copy) is gathered ~4K times per pixel but from L1/L2.  Deterministic,
no atomics, no full-resolution intermediate besides grad_x.  The backward op is itself
differentiable (its gradient is the forward pool), so double backward works.

With a LayerNorm (an encoder block's norm1, read by nothing but this pooling): ``pyramid_pool(x, grids, w, b,
eps)`` pools ``layer_norm(x)`` without materialising it (the encoder's blocks take the statistics from their CPE's
conv instead, and y's other gradient into the backward: :mod:`.dwconv_pyramid_pool`).  Forward:
``_ln_stats_kernel`` writes each pixel's mean and 1/std (fp32, 8 bytes a pixel), then the pooling kernel normalises each pixel as it loads it and applies
w and b to the cell means (pooling is linear): x read twice, where LayerNorm + pool read it twice and write and
read the normalised map once more.  Backward (``_pyramid_pool_ln_bwd_kernel``): a program owns whole rows
(BLOCK_C >= C) of a block of pixels, gathers d(normalised x) from every grid as above and runs the LayerNorm
backward in registers (xhat recomputed from x and the statistics): dx written once; the LayerNorm's weight and
bias gradients as per-program fp32 partials summed in a fixed order (a program walks several pixel blocks, so
the partials stay a small fraction of the map: within ``PARTIAL_TRAFFIC_SHARE`` of its bytes).  Not twice
differentiable.

Offsets are int64 when ``needs_int64`` says a tensor spans 2**31 elements, int32 otherwise.
Off-GPU without ``TRITON_INTERPRET=1`` the ops run the PyTorch reference instead.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (cdiv, launch_options, FLOAT_DTYPES, HAS_TRITON, acc_dtype, big_interpreter_tiles, check_tensor, device_guard,
                      layer_norm_backward_reference, layer_norm_from_statistics, layer_norm_statistics, needs_int64,
                      new_empty, next_pow2, num_sms, partial_programs, tl_acc, use_kernel)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import layer_norm_backward_rows, layer_norm_statistics_rows

#: most grids one call can pool (the kernels take the grid sizes as scalar arguments).
MAX_GRIDS = 8
#: most cells all grids of one call may hold (cell indices are int32 inside the kernels): larger grids are
#: rejected before anything is allocated
MAX_CELLS = 2 ** 31 - 1

#: pyramid levels of the keys/values for a query pooled size of 16 (SPEC).
BASE_PYRAMID = (11, 8, 6, 4)

__all__ = ["pyramid_pool", "pyramid_pool_reference", "split_pyramid", "pyramid_total", "pool_grid",
           "pyramid_sizes", "lrsa_grids", "adaptive_avg_pool", "BASE_PYRAMID", "MAX_GRIDS"]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _later_grid(blk, gh, gw, c0, b0, GH, GW, GC, GB):
        """Switch to grid (GH, GW) (first cell GC, first cell block GB) if block ``blk`` is in it."""
        later = blk >= GB
        gh = tl.where(later, GH, gh)
        gw = tl.where(later, GW, gw)
        c0 = tl.where(later, GC, c0)
        b0 = tl.where(later, GB, b0)
        return gh, gw, c0, b0

    @triton.jit
    def _ln_stats_kernel(x_ptr, mean_ptr, rstd_ptr, N_PIX, H, W, C, sxb, sxh, sxw, sxc, eps,
                         ACC: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Per-pixel LayerNorm statistics (mean, 1/std) over C, two passes over a row tile (the second from L1/L2)."""
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        if INT64:
            p = p.to(tl.int64)
        mask_p = p < N_PIX
        b = p // (H * W)
        hw = p - b * (H * W)
        h = hw // W
        row = x_ptr + (b * sxb + h * sxh + (hw - h * W) * sxw)[:, None]
        mean, rstd = layer_norm_statistics_rows(row, mask_p, C, sxc, eps, ACC, BLOCK_P, BLOCK_C)
        tl.store(mean_ptr + p, mean, mask=mask_p)
        tl.store(rstd_ptr + p, rstd, mask=mask_p)

    @triton.jit
    def _pyramid_pool_fwd_kernel(
        x_ptr, out_ptr, mean_ptr, rstd_ptr, lnw_ptr, lnb_ptr,
        H, W, C, N_TOTAL, N_BLK, N_CB,
        sxb, sxh, sxw, sxc,
        G0H, G0W, G1H, G1W, G1C, G1B, G2H, G2W, G2C, G2B, G3H, G3W, G3C, G3B,
        G4H, G4W, G4C, G4B, G5H, G5W, G5C, G5B, G6H, G6W, G6C, G6B, G7H, G7W, G7C, G7B,
        NUM_GRIDS: tl.constexpr, BLOCK_CELLS: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_C: tl.constexpr, LAYER_NORM: tl.constexpr,
        ACC: tl.constexpr, INT64: tl.constexpr,
    ):
        # LAYER_NORM: each pixel normalised as it is loaded, (x - mean[p]) * rstd[p] (the statistics of
        # _ln_stats_kernel), the cell means scaled by the LayerNorm's weight and shifted by its bias
        # GkH, GkW: size of grid k; GkC: its first cell in the output; GkB: its first cell block
        # (a block of BLOCK_CELLS consecutive cells never straddles two grids).
        pid = tl.program_id(0)
        # cell blocks fastest, so one (b, channel block) slab stays in L2 while all its cells are
        # pooled; last grid first (the pyramid's coarse grids have the longest programs).
        blk = N_BLK - 1 - pid % N_BLK
        rest = pid // N_BLK
        cb = rest % N_CB
        b = rest // N_CB

        gh = G0H + 0 * blk
        gw = G0W + 0 * blk
        c0 = 0 * blk
        b0 = 0 * blk
        if NUM_GRIDS > 1:
            gh, gw, c0, b0 = _later_grid(blk, gh, gw, c0, b0, G1H, G1W, G1C, G1B)
        if NUM_GRIDS > 2:
            gh, gw, c0, b0 = _later_grid(blk, gh, gw, c0, b0, G2H, G2W, G2C, G2B)
        if NUM_GRIDS > 3:
            gh, gw, c0, b0 = _later_grid(blk, gh, gw, c0, b0, G3H, G3W, G3C, G3B)
        if NUM_GRIDS > 4:
            gh, gw, c0, b0 = _later_grid(blk, gh, gw, c0, b0, G4H, G4W, G4C, G4B)
        if NUM_GRIDS > 5:
            gh, gw, c0, b0 = _later_grid(blk, gh, gw, c0, b0, G5H, G5W, G5C, G5B)
        if NUM_GRIDS > 6:
            gh, gw, c0, b0 = _later_grid(blk, gh, gw, c0, b0, G6H, G6W, G6C, G6B)
        if NUM_GRIDS > 7:
            gh, gw, c0, b0 = _later_grid(blk, gh, gw, c0, b0, G7H, G7W, G7C, G7B)

        loc = (blk - b0) * BLOCK_CELLS + tl.arange(0, BLOCK_CELLS)   # cell index inside the grid
        mask_cell = loc < gh * gw
        i = loc // gw
        j = loc - i * gw
        if INT64:                                         # (i + 1) * H can pass 2**31 (grid x map side)
            i = i.to(tl.int64)
            j = j.to(tl.int64)
        h0 = (i * H) // gh
        n_r = tl.where(mask_cell, ((i + 1) * H + gh - 1) // gh - h0, 0)
        w0 = (j * W) // gw
        n_c = tl.where(mask_cell, ((j + 1) * W + gw - 1) // gw - w0, 0)
        area = n_r * n_c                                  # 0 for masked-off cells
        ww = tl.where(mask_cell, n_c, 1)
        max_area = tl.max(area, axis=0)

        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if INT64:
            b = b.to(tl.int64)
            h0 = h0.to(tl.int64)
            w0 = w0.to(tl.int64)
            c_off = offs_c.to(tl.int64) * sxc
        else:
            c_off = offs_c * sxc
        base = x_ptr + b * sxb + c_off[None, None, :]
        cell_off = (h0 * sxh + w0 * sxw)[:, None]                  # [BLOCK_CELLS, 1]
        mask_c3 = mask_c[None, None, :]

        # BLOCK_Q pixels of every cell's window per step (window flattened row-major).
        acc = tl.zeros([BLOCK_CELLS, BLOCK_Q, BLOCK_C], dtype=ACC)
        for p0 in range(0, max_area, BLOCK_Q):
            p = p0 + tl.arange(0, BLOCK_Q)[None, :]                 # [1, BLOCK_Q]
            r = p // ww[:, None]                                    # [BLOCK_CELLS, BLOCK_Q]
            q = p - r * ww[:, None]
            if INT64:
                r = r.to(tl.int64)
            off = cell_off + r * sxh + q * sxw
            m = (p < area[:, None])[:, :, None] & mask_c3
            v = tl.load(base + off[:, :, None], mask=m, other=0.0).to(ACC)
            if LAYER_NORM:
                pm = p < area[:, None]
                pix = b * (H * W) + (h0[:, None] + r) * W + w0[:, None] + q
                mu = tl.load(mean_ptr + pix, mask=pm, other=0.0)
                rs = tl.load(rstd_ptr + pix, mask=pm, other=0.0)          # 0 off the window: v - mu -> 0
                v = (v - mu[:, :, None]) * rs[:, :, None]
            acc += v
        total = tl.sum(acc, axis=1)                                 # [BLOCK_CELLS, BLOCK_C]
        mean = total / tl.where(mask_cell, area, 1).to(ACC)[:, None]
        if LAYER_NORM:
            mean = mean * tl.load(lnw_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :] \
                + tl.load(lnb_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[None, :]
        out_off = (b * N_TOTAL + c0 + loc)[:, None] * C + offs_c[None, :]
        m = mask_cell[:, None] & mask_c[None, :]
        tl.store(out_ptr + out_off, mean.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _gather_grid(acc, g_base, sgn, c_off, mask_c, mask_p, h, w, H, W, start, gh, gw,
                     ACC: tl.constexpr, INT64: tl.constexpr):
        """acc += sum over the cells of grid (gh, gw) containing pixel (h, w) of grad / area.

        Rows of those cells: floor(h*gh/H) <= i < ceil((h+1)*gh/H) (same for columns)."""
        i_lo = (h * gh) // H
        n_i = tl.where(mask_p, ((h + 1) * gh + H - 1) // H - i_lo, 0)
        j_lo = (w * gw) // W
        n_j = tl.where(mask_p, ((w + 1) * gw + W - 1) // W - j_lo, 0)
        max_i = tl.max(n_i, axis=0)
        max_j = tl.max(n_j, axis=0)
        for di in range(0, max_i):
            i = i_lo + di
            ok_i = di < n_i
            rows = ((i + 1) * H + gh - 1) // gh - (i * H) // gh
            row_cell = start + i * gw
            for dj in range(0, max_j):
                j = j_lo + dj
                ok = ok_i & (dj < n_j)
                cols = ((j + 1) * W + gw - 1) // gw - (j * W) // gw
                area = tl.where(ok, rows * cols, 1)
                cell = row_cell + j
                if INT64:
                    cell = cell.to(tl.int64)
                m = ok[:, None] & mask_c[None, :]
                v = tl.load(g_base + (cell * sgn)[:, None] + c_off[None, :], mask=m, other=0.0)
                acc += v.to(ACC) / area.to(ACC)[:, None]
        return acc

    @triton.jit
    def _gather_all(acc, g_base, sgn, c_off, mask_c, mask_p, h, w, H, W,
                    G0H, G0W, G1H, G1W, G2H, G2W, G3H, G3W, G4H, G4W, G5H, G5W, G6H, G6W, G7H, G7W,
                    NUM_GRIDS: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr):
        """acc += dL/d(pooled input) at pixels (h, w): every grid's cells containing them, gathered (g_base: the
        gradient's batch base, a pointer or one per pixel as a column)."""
        start = 0
        acc = _gather_grid(acc, g_base, sgn, c_off, mask_c, mask_p, h, w, H, W, start, G0H, G0W, ACC, INT64)
        start += G0H * G0W
        if NUM_GRIDS > 1:
            acc = _gather_grid(acc, g_base, sgn, c_off, mask_c, mask_p, h, w, H, W, start, G1H, G1W, ACC, INT64)
            start += G1H * G1W
        if NUM_GRIDS > 2:
            acc = _gather_grid(acc, g_base, sgn, c_off, mask_c, mask_p, h, w, H, W, start, G2H, G2W, ACC, INT64)
            start += G2H * G2W
        if NUM_GRIDS > 3:
            acc = _gather_grid(acc, g_base, sgn, c_off, mask_c, mask_p, h, w, H, W, start, G3H, G3W, ACC, INT64)
            start += G3H * G3W
        if NUM_GRIDS > 4:
            acc = _gather_grid(acc, g_base, sgn, c_off, mask_c, mask_p, h, w, H, W, start, G4H, G4W, ACC, INT64)
            start += G4H * G4W
        if NUM_GRIDS > 5:
            acc = _gather_grid(acc, g_base, sgn, c_off, mask_c, mask_p, h, w, H, W, start, G5H, G5W, ACC, INT64)
            start += G5H * G5W
        if NUM_GRIDS > 6:
            acc = _gather_grid(acc, g_base, sgn, c_off, mask_c, mask_p, h, w, H, W, start, G6H, G6W, ACC, INT64)
            start += G6H * G6W
        if NUM_GRIDS > 7:
            acc = _gather_grid(acc, g_base, sgn, c_off, mask_c, mask_p, h, w, H, W, start, G7H, G7W, ACC, INT64)
        return acc

    @triton.jit
    def _pyramid_pool_bwd_kernel(
        g_ptr, gx_ptr,
        H, W, C, N_PB, N_CB,
        sgb, sgn, sgc,
        G0H, G0W, G1H, G1W, G2H, G2W, G3H, G3W, G4H, G4W, G5H, G5W, G6H, G6W, G7H, G7W,
        NUM_GRIDS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
        ACC: tl.constexpr, INT64: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cb = pid % N_CB               # channel blocks fastest: neighbours write adjacent bytes
        rest = pid // N_CB
        pb = rest % N_PB
        b = rest // N_PB

        p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = p < H * W
        h = p // W
        w = p - h * W
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if INT64:                         # also (h + 1) * gh: can pass 2**31 (grid x map side)
            b = b.to(tl.int64)
            p = p.to(tl.int64)
            h = h.to(tl.int64)
            w = w.to(tl.int64)
            c_off = offs_c.to(tl.int64) * sgc
        else:
            c_off = offs_c * sgc
        acc = _gather_all(tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC), g_ptr + b * sgb, sgn, c_off, mask_c, mask_p, h, w,
                          H, W, G0H, G0W, G1H, G1W, G2H, G2W, G3H, G3W, G4H, G4W, G5H, G5W, G6H, G6W, G7H, G7W,
                          NUM_GRIDS, ACC, INT64)

        out_off = (b * (H * W) + p)[:, None] * C + offs_c[None, :]
        m = mask_p[:, None] & mask_c[None, :]
        tl.store(gx_ptr + out_off, acc.to(gx_ptr.dtype.element_ty), mask=m)


    @triton.jit
    def _pyramid_pool_ln_bwd_kernel(
        g_ptr, x_ptr, mean_ptr, rstd_ptr, lnw_ptr, gin_ptr, gx_ptr, part_ptr,
        N_PIX, H, W, C, iters,
        sgb, sgn, sgc, sxb, sxh, sxw, sxc, sib, sih, siw, sic,
        G0H, G0W, G1H, G1W, G2H, G2W, G3H, G3W, G4H, G4W, G5H, G5W, G6H, G6W, G7H, G7W,
        NUM_GRIDS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
        ACC: tl.constexpr, INT64: tl.constexpr, GRAD_IN: tl.constexpr,
    ):
        """The backward of pyramid_pool(layer_norm(x)): per pixel, d(normalised x) gathered from every grid's
        cells over whole rows (BLOCK_C >= C), then the LayerNorm backward (xhat recomputed from x and the saved
        statistics, the row reductions in registers): dx written once, the normalised map never stored.  A
        program walks ``iters`` pixel blocks (of any samples) and writes one fp32 partial row pair of the
        LayerNorm's weight and bias gradients, summed over the programs afterwards in a fixed order.  ``GRAD_IN``:
        x's gradient from its other uses (``gin``, any strides) is added to dx as it is written."""
        pid = tl.program_id(0)
        offs_c = tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        gam = tl.load(lnw_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
        acc_w = tl.zeros([BLOCK_C], ACC)
        acc_b = tl.zeros([BLOCK_C], ACC)
        for it in range(0, iters):
            p = (pid * iters + it) * BLOCK_P + tl.arange(0, BLOCK_P)
            if INT64:
                p = p.to(tl.int64)
            mask_p = p < N_PIX
            b = p // (H * W)
            hw = p - b * (H * W)
            h = hw // W
            w = hw - h * W
            if INT64:
                c_off = offs_c.to(tl.int64) * sgc
            else:
                c_off = offs_c * sgc
            acc = _gather_all(tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC), g_ptr + (b * sgb)[:, None], sgn, c_off, mask_c,
                              mask_p, h, w, H, W, G0H, G0W, G1H, G1W, G2H, G2W, G3H, G3W, G4H, G4W, G5H, G5W, G6H,
                              G6W, G7H, G7W, NUM_GRIDS, ACC, INT64)
            m2 = mask_p[:, None] & mask_c[None, :]
            xv = tl.load(x_ptr + (b * sxb + h * sxh + w * sxw)[:, None] + offs_c[None, :] * sxc, mask=m2,
                         other=0.0).to(ACC)
            mu = tl.load(mean_ptr + p, mask=mask_p, other=0.0).to(ACC)
            rs = tl.load(rstd_ptr + p, mask=mask_p, other=0.0).to(ACC)
            xhat = tl.where(m2, (xv - mu[:, None]) * rs[:, None], 0.0)
            acc_w += tl.sum(acc * xhat, axis=0)              # acc is 0 off the map and past C
            acc_b += tl.sum(acc, axis=0)
            dx = layer_norm_backward_rows(acc, xhat, rs, gam, C)
            if GRAD_IN:
                dx += tl.load(gin_ptr + (b * sib + h * sih + w * siw)[:, None] + offs_c[None, :] * sic, mask=m2,
                              other=0.0).to(ACC)
            tl.store(gx_ptr + p[:, None] * C + offs_c[None, :], dx.to(gx_ptr.dtype.element_ty), mask=m2)
        tl.store(part_ptr + pid * 2 * C + offs_c, acc_w, mask=mask_c)
        tl.store(part_ptr + pid * 2 * C + C + offs_c, acc_b, mask=mask_c)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def _pairs(grids: Sequence[int]) -> List[tuple]:
    return [(int(grids[2 * k]), int(grids[2 * k + 1])) for k in range(len(grids) // 2)]


def pyramid_total(grids) -> int:
    """N_total = sum(gh * gw) of a list of (gh, gw) pairs (or the flattened list)."""
    if len(grids) and not isinstance(grids[0], (tuple, list)):
        grids = _pairs(grids)
    return sum(int(gh) * int(gw) for gh, gw in grids)


def _grid_args(pairs) -> List[int]:
    flat = []
    for gh, gw in pairs:
        flat += [gh, gw]
    return flat + [0, 0] * (MAX_GRIDS - len(pairs))


def _index_int64(pairs, H: int, W: int) -> bool:
    """Whether a window bound ``(i + 1) * H + gh`` (forward) or ``(h + 1) * gh + H`` (backward) can pass
    int32 for these grids: the products of a grid side and a map side, not only the tensors' sizes."""
    return any(max(gh * H + gh + H, gw * W + gw + W) >= 2 ** 31 - 1 for gh, gw in pairs)


def _forward_config(C: int, H: int, W: int, pairs):
    """(BLOCK_CELLS, BLOCK_Q, BLOCK_C): tiles of cells x window pixels x channels, ~2K elements
    on a GPU (a 4-pixel step keeps ~4 KB of bf16 loads in flight per program and cuts the loop
    of a coarse grid's long windows 4x); much bigger under the interpreter, whose cost is per
    program and per op, not per element."""
    block_c = min(next_pow2(C), 64)
    max_cells = max(gh * gw for gh, gw in pairs)
    max_area = max(min(H, -(-H // gh) + 1) * min(W, -(-W // gw) + 1) for gh, gw in pairs)
    if big_interpreter_tiles():
        return min(128, next_pow2(max_cells)), min(16, next_pow2(max_area)), block_c
    block_q = min(4, next_pow2(max_area))
    block_cells = max(1, min(2048 // (block_c * block_q), 16, next_pow2(max_cells)))
    return block_cells, block_q, block_c


def _backward_config(C: int, H: int, W: int, int64: bool = False):
    """(BLOCK_P, BLOCK_C): pixels x channels per program, ~1K elements on a GPU (the 5 grids' gathers are
    unrolled: 4K-element tiles spill ~1.5 KB per thread on sm_90/sm_80, tests/test_gpu_compile.py)."""
    block_c = min(next_pow2(C), 64)
    if big_interpreter_tiles():
        return min(1024, next_pow2(H * W)), block_c
    return max(4, min((512 if int64 else 1024) // block_c, next_pow2(H * W))), block_c   # int64: 64-bit index math


def _stats_config(C: int, n_pix: int):
    """(BLOCK_P, BLOCK_C) of the LayerNorm statistics pass: pixels x channels, ~2K elements on a GPU."""
    if big_interpreter_tiles():
        return min(1024, next_pow2(n_pix)), next_pow2(C)
    block_c = min(next_pow2(C), 128)
    return max(1, min(2048 // block_c, next_pow2(n_pix))), block_c


#: the LayerNorm'd backward's programs: about this many per SM (each walks ``iters`` pixel blocks and writes
#: one fp32 partial row pair of the LayerNorm's weight and bias gradients), at least this many blocks each
LN_PROGRAMS_PER_SM, LN_MIN_ITERS = 8, 8


def _ln_backward_config(C: int, n_pix: int, elem_size: int, device: torch.device, int64: bool = False):
    """(BLOCK_P, BLOCK_C, iters, programs) of the LayerNorm'd backward: whole rows (BLOCK_C >= C), ~1K elements
    per tile on a GPU as the plain backward (the grids' gathers are unrolled); the programs' partials within
    ``PARTIAL_TRAFFIC_SHARE`` of the map's bytes (x read, dx written)."""
    block_c = next_pow2(C)
    if big_interpreter_tiles():
        block_p = max(1, min(16384 // block_c, next_pow2(n_pix)))
    else:
        block_p = max(1, min((512 if int64 else 1024) // block_c, next_pow2(n_pix)))
    blocks = cdiv(n_pix, block_p)
    programs = partial_programs(min(LN_PROGRAMS_PER_SM * num_sms(device), blocks // LN_MIN_ITERS),
                                2 * C * max(4, elem_size), 2 * n_pix * C * elem_size)   # fp32 (fp64) partials
    iters = cdiv(blocks, programs)
    return block_p, block_c, iters, cdiv(blocks, iters)


# ----------------------------------------------------------------------------------------------
# Launch
# ----------------------------------------------------------------------------------------------
def _stats_triton(x: Tensor, eps: float):
    """Per-pixel LayerNorm (mean, 1/std) (B, H, W) in the math dtype."""
    B, H, W, C = x.shape
    mean, rstd = (new_empty((B, H, W), acc_dtype(x.dtype), x.device) for _ in range(2))
    block_p, block_c = _stats_config(C, B * H * W)
    with device_guard(x):
        _ln_stats_kernel[(cdiv(B * H * W, block_p),)](
            x, mean, rstd, B * H * W, H, W, C, *x.stride(), float(eps), ACC=tl_acc(x.dtype),
            INT64=needs_int64(x), BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4, **launch_options())
    return mean, rstd


def _forward_triton(x: Tensor, pairs, norm=None) -> Tensor:
    """Pool x, or its LayerNorm with ``norm = (mean, rstd, weight, bias)`` (the statistics of _stats_triton)."""
    B, H, W, C = x.shape
    n_total = sum(gh * gw for gh, gw in pairs)
    out = new_empty((B, n_total, C), x.dtype, x.device)
    block_cells, block_q, block_c = _forward_config(C, H, W, pairs)
    args, cell0, blk0 = [], 0, 0
    for k, (gh, gw) in enumerate(pairs):
        args += [gh, gw] if k == 0 else [gh, gw, cell0, blk0]
        cell0 += gh * gw
        blk0 += cdiv(gh * gw, block_cells)
    args += [0, 0, 0, 0] * (MAX_GRIDS - len(pairs))
    n_cb = cdiv(C, block_c)
    grid = (B * n_cb * blk0,)
    with device_guard(x):
        _pyramid_pool_fwd_kernel[grid](
            x, out, *(norm if norm is not None else (x,) * 4), H, W, C, n_total, blk0, n_cb, *x.stride(), *args,
            NUM_GRIDS=len(pairs), BLOCK_CELLS=block_cells, BLOCK_Q=block_q, BLOCK_C=block_c,
            LAYER_NORM=norm is not None,
            ACC=tl_acc(x.dtype), INT64=needs_int64(x, out) or _index_int64(pairs, H, W), num_warps=4, **launch_options(),
        )
    return out


def _backward_triton(grad: Tensor, pairs, H: int, W: int) -> Tensor:
    B, _, C = grad.shape
    gx = new_empty((B, H, W, C), grad.dtype, grad.device)
    int64 = needs_int64(grad, gx) or _index_int64(pairs, H, W)
    block_p, block_c = _backward_config(C, H, W, int64)
    n_cb = cdiv(C, block_c)
    n_pb = cdiv(H * W, block_p)
    grid = (B * n_pb * n_cb,)
    with device_guard(grad):
        _pyramid_pool_bwd_kernel[grid](
            grad, gx, H, W, C, n_pb, n_cb, *grad.stride(), *_grid_args(pairs),
            NUM_GRIDS=len(pairs), BLOCK_P=block_p, BLOCK_C=block_c,
            ACC=tl_acc(grad.dtype), INT64=int64, num_warps=4, **launch_options(),
        )
    return gx


def _ln_backward_triton(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, pairs,
                        grad_in: Optional[Tensor] = None):
    """(dx, d_weight, d_bias) of pyramid_pool(layer_norm(x)), plus ``grad_in`` (x's gradient from its other uses)
    in dx when given; the LayerNorm's gradients in the math dtype."""
    B, H, W, C = x.shape
    acc = acc_dtype(x.dtype)
    gx = new_empty((B, H, W, C), x.dtype, x.device)
    gin = grad_in if grad_in is not None else x
    int64 = needs_int64(grad, x, gx, gin) or _index_int64(pairs, H, W)
    block_p, block_c, iters, programs = _ln_backward_config(C, B * H * W, x.element_size(), x.device, int64)
    part = new_empty((programs, 2, C), acc, x.device)
    with device_guard(x):
        _pyramid_pool_ln_bwd_kernel[(programs,)](
            grad, x, mean, rstd, weight, gin, gx, part, B * H * W, H, W, C, iters, *grad.stride(), *x.stride(),
            *gin.stride(), *_grid_args(pairs), NUM_GRIDS=len(pairs), BLOCK_P=block_p, BLOCK_C=block_c,
            ACC=tl_acc(x.dtype), INT64=int64, GRAD_IN=grad_in is not None, num_warps=4, **launch_options())
    return gx, part[:, 0].sum(0), part[:, 1].sum(0)     # fixed-order reductions over the programs: deterministic


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------
def pool_grid(h: int, w: int, p: int) -> tuple[int, int]:
    """Pooled grid of target size ``p`` for an ``h x w`` map, keeping the aspect ratio.

    ``(p, round(w*p/h + 0.001))`` if ``w >= h`` else ``(round(h*p/w + 0.001), p)`` (Python round).
    The grid may be larger than the map; adaptive average pooling then repeats pixels.
    """
    h, w, p = int(h), int(w), int(p)  # sizes arrive as tensors under torch.jit.trace
    if h <= 0 or w <= 0 or p <= 0:
        raise ValueError(f"pool_grid needs positive sizes, got h={h}, w={w}, p={p}")
    if w >= h:
        return p, max(1, round(w * p / h + 0.001))
    return max(1, round(h * p / w + 0.001)), p


def pyramid_sizes(q_size: int) -> tuple[int, ...]:
    """Key/value pooled sizes for a query pooled size ``q_size``: (11, 8, 6, 4) for 16."""
    return tuple(round(t * q_size / 16 + 0.001) for t in BASE_PYRAMID)


def lrsa_grids(h: int, w: int, q_size: int = 16, kv_sizes: Optional[Sequence[int]] = None):
    """All pooled grids of one LRSA: ``[query grid, kv grid 1, ..., kv grid 4]``."""
    if kv_sizes is None:
        kv_sizes = pyramid_sizes(q_size)
    return [pool_grid(h, w, q_size)] + [pool_grid(h, w, p) for p in kv_sizes]


def adaptive_avg_pool(x: Tensor, size: Sequence[int]) -> Tensor:
    """``F.adaptive_avg_pool2d`` on a tokens-last map: (B, H, W, C) -> (B, h, w, C)."""
    return F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), tuple(size)).permute(0, 2, 3, 1)


def pyramid_pool_reference(x: Tensor, grids: Sequence[Sequence[int]], norm_weight: Optional[Tensor] = None,
                           norm_bias: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """The reference math: ``x`` (B, H, W, C), LayerNorm'd first when ``norm_weight``/``norm_bias`` are given,
    pooled to every grid, cells concatenated (B, sum(gh*gw), C), grid after grid, each row-major (the fused
    op's layout)."""
    B, C = x.shape[0], x.shape[3]
    if norm_weight is not None:
        x = F.layer_norm(x, (C,), norm_weight, norm_bias, eps)
    return torch.cat([adaptive_avg_pool(x, g).reshape(B, -1, C) for g in grids], 1)


def _forward_reference(x: Tensor, pairs) -> Tensor:
    return pyramid_pool_reference(x, pairs)


def _ln_forward_reference(x: Tensor, pairs, weight: Tensor, bias: Tensor, eps: float):
    """(pooled layer_norm(x) in x's dtype, mean, 1/std in the math dtype), the LayerNorm in the math dtype."""
    xa = x.to(acc_dtype(x.dtype))
    mean, rstd = layer_norm_statistics(xa, eps)
    xn = layer_norm_from_statistics(xa, mean, rstd, weight, bias)
    return pyramid_pool_reference(xn, pairs).to(x.dtype), mean, rstd


def _ln_backward_reference(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, pairs):
    g = _backward_reference(grad.to(acc_dtype(x.dtype)), pairs, x.shape[1], x.shape[2])    # d(normalised x)
    return layer_norm_backward_reference(g, x, mean, rstd, weight)


def _backward_reference(grad: Tensor, pairs, H: int, W: int) -> Tensor:
    B, _, C = grad.shape
    acc = acc_dtype(grad.dtype)
    like = torch.empty((B, C, H, W), dtype=acc, device=grad.device)
    gx = torch.zeros((B, H, W, C), dtype=acc, device=grad.device)
    start = 0
    for gh, gw in pairs:
        g = grad[:, start:start + gh * gw].to(acc).reshape(B, gh, gw, C).permute(0, 3, 1, 2)
        gx += torch.ops.aten._adaptive_avg_pool2d_backward(g, like).permute(0, 2, 3, 1)
        start += gh * gw
    return gx.to(grad.dtype)


# ----------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lrformer::pyramid_pool", mutates_args=())
def _pyramid_pool_op(x: Tensor, grids: List[int]) -> Tensor:
    pairs = _pairs(grids)
    if use_kernel(x):
        return _forward_triton(x, pairs)
    return _forward_reference(x, pairs)


@_pyramid_pool_op.register_fake
def _(x: Tensor, grids: List[int]) -> Tensor:
    B, _, _, C = x.shape
    return x.new_empty((B, pyramid_total(grids), C))


@torch.library.custom_op("lrformer::pyramid_pool_backward", mutates_args=())
def _pyramid_pool_backward_op(grad: Tensor, grids: List[int], height: int, width: int) -> Tensor:
    pairs = _pairs(grids)
    if use_kernel(grad):
        return _backward_triton(grad, pairs, height, width)
    return _backward_reference(grad, pairs, height, width)


@_pyramid_pool_backward_op.register_fake
def _(grad: Tensor, grids: List[int], height: int, width: int) -> Tensor:
    B, _, C = grad.shape
    return grad.new_empty((B, height, width, C))


def _setup_context(ctx, inputs, output):
    x, grids = inputs
    ctx.grids = list(grids)
    ctx.hw = (x.shape[1], x.shape[2])


def _backward(ctx, grad):
    return _pyramid_pool_backward_op(grad, ctx.grids, ctx.hw[0], ctx.hw[1]), None


def _setup_context_backward_op(ctx, inputs, output):
    ctx.grids = list(inputs[1])


def _backward_backward_op(ctx, grad_gx):
    # the backward is linear in grad_out; its adjoint is the forward pool.
    return _pyramid_pool_op(grad_gx, ctx.grids), None, None, None


_pyramid_pool_op.register_autograd(_backward, setup_context=_setup_context)
_pyramid_pool_backward_op.register_autograd(_backward_backward_op, setup_context=_setup_context_backward_op)


@torch.library.custom_op("lrformer::layer_norm_pyramid_pool", mutates_args=())
def _ln_pool_op(x: Tensor, grids: List[int], weight: Tensor, bias: Tensor,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(pyramid_pool(layer_norm(x)), the LayerNorm's per-pixel mean and 1/std (B, H, W) in the math dtype)."""
    pairs = _pairs(grids)
    if use_kernel(x):
        mean, rstd = _stats_triton(x, eps)
        return _forward_triton(x, pairs, (mean, rstd, weight, bias)), mean, rstd
    return _ln_forward_reference(x, pairs, weight, bias, eps)


@_ln_pool_op.register_fake
def _(x, grids, weight, bias, eps):
    B, H, W, C = x.shape
    acc = acc_dtype(x.dtype)
    return x.new_empty((B, pyramid_total(grids), C)), x.new_empty((B, H, W), dtype=acc), x.new_empty((B, H, W), dtype=acc)


@torch.library.custom_op("lrformer::layer_norm_pyramid_pool_backward", mutates_args=())
def _ln_pool_backward_op(grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor,
                         grids: List[int]) -> tuple[Tensor, Tensor, Tensor]:
    """(dx in x's dtype, the LayerNorm's weight and bias gradients in the math dtype)."""
    pairs = _pairs(grids)
    if use_kernel(grad):
        return _ln_backward_triton(grad, x, mean, rstd, weight, pairs)
    return _ln_backward_reference(grad, x, mean, rstd, weight, pairs)


@_ln_pool_backward_op.register_fake
def _(grad, x, mean, rstd, weight, grids):
    acc = acc_dtype(x.dtype)
    C = x.shape[-1]
    return x.new_empty(x.shape), x.new_empty((C,), dtype=acc), x.new_empty((C,), dtype=acc)


def _setup_context_ln(ctx, inputs, output):
    x, grids, weight, bias, _eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, mean, rstd, weight)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)
    ctx.grids = list(grids)
    ctx.bias_dtype = bias.dtype


def _backward_ln(ctx, grad, _dmean, _drstd):
    if grad is None:
        return None, None, None, None, None
    x, mean, rstd, weight = ctx.saved_tensors
    dx, dw, db = _ln_pool_backward_op(grad, x, mean, rstd, weight, ctx.grids)
    return dx, None, dw.to(weight.dtype), db.to(ctx.bias_dtype), None


_ln_pool_op.register_autograd(_backward_ln, setup_context=_setup_context_ln)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _check_grids(grids) -> List[int]:
    if isinstance(grids, (str, bytes)) or not isinstance(grids, Sequence):
        raise TypeError(f"grids must be a sequence of (gh, gw) pairs, got {type(grids).__name__}")
    if not 1 <= len(grids) <= MAX_GRIDS:
        raise ValueError(f"grids must hold 1 to {MAX_GRIDS} (gh, gw) pairs, got {len(grids)}")
    flat = []
    for k, g in enumerate(grids):
        if isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or len(g) != 2:
            raise ValueError(f"grids[{k}] must be a (gh, gw) pair, got {g!r}")
        for v in g:
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"grids[{k}] must hold Python ints, got {g!r}")
            if v <= 0:
                raise ValueError(f"grids[{k}] must be positive, got {tuple(g)}")
        flat += [int(g[0]), int(g[1])]
    total = sum(flat[2 * k] * flat[2 * k + 1] for k in range(len(flat) // 2))
    if total > MAX_CELLS:
        raise ValueError(f"grids {[tuple(g) for g in grids]} hold {total} cells; at most {MAX_CELLS} are supported")
    return flat


def pyramid_pool(x: Tensor, grids: Sequence[Sequence[int]], norm_weight: Optional[Tensor] = None,
                 norm_bias: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """Adaptive-average-pool ``x`` (B, H, W, C), any strides, to every grid of ``grids`` at once.

    grids: 1 to 8 ``(gh, gw)`` pairs of positive ints (may exceed H/W).  Returns a contiguous
    ``(B, sum(gh*gw), C)`` tensor in x's dtype: each grid's cells row-major, grids in order
    (``split_pyramid`` gives per-grid views).  Differentiable, torch.compile-able.
    ``norm_weight``/``norm_bias`` (C,): pool ``layer_norm(x)`` instead (an LRSA's norm1), the normalised map
    never materialised: per-pixel statistics in a first pass, each pixel normalised as the pooling loads it;
    the backward gathers the pooled gradient and runs the LayerNorm backward in one pass.  Differentiable twice
    without the LayerNorm.
    """
    check_tensor(x, "x", ndim=4, dtypes=FLOAT_DTYPES)
    flat = _check_grids(grids)
    if norm_weight is None and norm_bias is None:
        return _pyramid_pool_op(x, flat)
    check_layer_norm(x, norm_weight, norm_bias, eps)
    return _ln_pool_op(x, flat, norm_weight, norm_bias, float(eps))[0]


def check_layer_norm(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor], eps: float) -> None:
    """Raise a one-line error unless ``norm_weight``/``norm_bias`` (C,) and ``eps`` > 0 make a LayerNorm of x's C."""
    if norm_weight is None or norm_bias is None:
        raise ValueError("norm_weight and norm_bias go together (a LayerNorm with both, or neither)")
    C = x.shape[-1]
    check_tensor(norm_weight, "norm_weight", ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor(norm_bias, "norm_bias", ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    if norm_weight.shape[0] != C or norm_bias.shape[0] != C:
        raise ValueError(f"norm_weight and norm_bias must be ({C},), got {tuple(norm_weight.shape)} and "
                         f"{tuple(norm_bias.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def split_pyramid(out: Tensor, grids: Sequence[Sequence[int]]) -> List[Tensor]:
    """The per-grid views ``(B, gh, gw, C)`` of a ``pyramid_pool`` result ``out`` (B, N_total, C)."""
    check_tensor(out, "out", ndim=3)
    flat = _check_grids(grids)
    pairs = _pairs(flat)
    B, n, C = out.shape
    if n != pyramid_total(pairs):
        raise ValueError(f"out has {n} cells but grids {pairs} have {pyramid_total(pairs)}")
    # one split (its backward is one concatenation; per-grid slices would each build a full-size gradient)
    return [v.unflatten(1, (gh, gw)) for v, (gh, gw) in zip(out.split([gh * gw for gh, gw in pairs], dim=1), pairs)]
