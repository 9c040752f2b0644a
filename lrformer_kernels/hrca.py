"""Fused high-resolution cross-attention over selected windows (FASeg's HRCA), forward and backward.

``hrca_attention(q, k, v, win_idx, window, num_heads, scale=None)``: q (B, Nq, C) queries,
k/v (B, H, W, C) tokens-last high-resolution maps, win_idx (B, Nq, K) int32/int64 indices of each
query's windows in the ``ceil(H/window) x ceil(W/window)`` window grid (row-major) -> (B, Nq, C);
the same math as :func:`hrca_attention_reference` (each query attends, per head, to the
pixels of its K windows; pixels past the map's edge are excluded; a window listed twice counts
twice, as in the reference).  The reference gathers the keys/values into a
(B, Nq, K * window**2, C) tensor; the kernels never do: they read the window pixels straight from
k/v through the window indices.

Design
------
Each query has its own windows, so queries cannot share key tiles (no ``tl.dot`` over a query
block); the kernels are element-wise products + reductions over (pixels, heads, head_dim) tiles,
which keeps any head dim (masked up to the next power of two) and any window size.

* forward: grid ``(Nq, B * cdiv(heads, BLOCK_HB))``; one program = one query and a block of
  ``BLOCK_HB`` heads (whole channel rows per pixel, so loads are contiguous runs of
  ``BLOCK_HB * head_dim`` channels).  It loops over the K windows (index loaded from ``win_idx``)
  and, inside a window, over chunks of ``BLOCK_R`` window rows: a tile is
  ``(BLOCK_R * BLOCK_W pixels, BLOCK_HB, BLOCK_D)`` with ``BLOCK_W = next_pow2(window)``; pixels
  outside the window or the map are masked.  Online softmax per head, fp32 accumulation (fp64 for
  fp64 inputs); writes out (input dtype) and, per (b, head, query) (fp32; fp64 for fp64 inputs),
  the natural-log log-sum-exp ``lse`` and, kept apart for the backward, the row maximum
  ``row_max`` of the scaled logits and ``row_sum = sum exp(s - row_max)`` (why: see
  :mod:`lrformer_kernels.lowres_attention`; logits in natural units, base 2 only after the max
  is subtracted).
* backward by recomputation (no attention matrix is stored), one program per (query, head block)
  as in the forward: ``delta = rowsum(dO * O) - dlse`` in-program, then over the same window
  tiles ``p = exp(s - row_max) / row_sum``, ``ds = p * (dO.v - delta)``; ``dq`` is accumulated in registers and
  written once.

  - default (fast) mode: the same program adds ``ds * q * scale`` and ``p * dO`` to full-size
    (B, H, W, C) fp32 buffers (fp64 for fp64 inputs) with ``tl.atomic_add`` (several queries may
    select the same window), cast to the input dtype at the end (no cast for fp32/fp64).  Float
    atomics make dk/dv bit-wise non-deterministic (summation order).
  - deterministic mode (``torch.are_deterministic_algorithms_enabled()``): no atomics.  The
    (query, slot) pairs are sorted by window with a stable ``torch.sort`` (a CSR list per
    (batch, window) built with ``searchsorted``); the dq kernel stores ``delta``, then a second
    kernel with grid ``(B * n_windows, cdiv(heads, BLOCK_HB))`` owns one window: for each chunk
    of its rows it loops over the queries that selected it in sorted (query, slot) order,
    recomputes ``p``/``ds`` and accumulates dk/dv in registers, then writes them once in the
    input dtype (windows tile the map, so every pixel is written exactly once; unselected windows
    get zeros).  Same result every run; it costs a sort and a second pass over q/dO.

* inputs may be arbitrary strided views (k/v halves of one kv tensor, NCHW tensors permuted to
  NHWC, a slice of q): only strides are passed, nothing is copied; int64 offsets when a tensor
  spans more than 2**31 elements.
* ``win_idx`` is range-checked inside the op (one ``aminmax`` + host sync, as the reference
  does) so a bad index raises ValueError instead of reading out of bounds; it runs inside the
  opaque custom op, so ``torch.compile(fullgraph=True)`` does not break on it.

Packaging: ``torch.library`` custom ops ``lrformer::hrca_attention`` (-> out, lse, row_max, row_sum;
the last two are not differentiable) and
``lrformer::hrca_attention_backward`` with fake (meta) implementations and autograd.  When
:func:`use_kernel` says no (CPU without the Triton interpreter) the ops run the PyTorch reference
math (gathered, as :func:`hrca_attention_reference`).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import (cdiv, next_pow2, launch_options, HAS_TRITON, acc_dtype, attention_scale, check_int, check_tensor, device_guard,
                      big_interpreter_tiles, needs_int64, new_empty, split_f32, use_kernel, row_statistics)

if HAS_TRITON:
    import triton
    import triton.language as tl

MAX_HEAD_DIM = 256
MAX_WINDOW = 64

__all__ = ["hrca_attention", "hrca_attention_reference", "hrca_window_grid", "hrca_window_pixels",
           "MAX_HEAD_DIM", "MAX_WINDOW"]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _hrca_window_tile(w, r0, GW, H, W, WS: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_W: tl.constexpr, INT64: tl.constexpr):
        """Map rows/cols and validity of the pixels of rows ``r0 .. r0+BLOCK_R`` of window ``w``."""
        wy = w // GW
        wx = w - wy * GW
        offs_p = tl.arange(0, BLOCK_R * BLOCK_W)
        pr = r0 + offs_p // BLOCK_W
        pc = offs_p % BLOCK_W
        y = wy * WS + pr
        x = wx * WS + pc
        mask = (pr < WS) & (pc < WS) & (y < H) & (x < W)
        if INT64:
            y = y.to(tl.int64)
            x = x.to(tl.int64)
        return y, x, mask

    @triton.jit
    def _hrca_fwd_kernel(
        Q, K, V, WIN, O, LSE, ROW_MAX, ROW_SUM,
        s_qb, s_qn, s_qc,
        s_kb, s_kh, s_kw, s_kc,
        s_vb, s_vh, s_vw, s_vc,
        s_wb, s_wn, s_wk,
        s_ob, s_on, s_oc,
        NQ, NK, H, W, GW, NH, NHB, scale_hi, scale_lo,
        HEAD_DIM: tl.constexpr, WS: tl.constexpr, BLOCK_HB: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
        INT64: tl.constexpr,
    ):
        n = tl.program_id(0)
        pid1 = tl.program_id(1)
        b = pid1 // NHB
        hb = pid1 % NHB
        if INT64:
            b = b.to(tl.int64)
            n = n.to(tl.int64)
        scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
        h = hb * BLOCK_HB + tl.arange(0, BLOCK_HB)
        dd = tl.arange(0, BLOCK_D)
        mask_h = h < NH
        cmask = mask_h[:, None] & (dd < HEAD_DIM)[None, :]
        ch = h[:, None] * HEAD_DIM + dd[None, :]                       # (HB, D) channels

        q = tl.load(Q + b * s_qb + n * s_qn + ch * s_qc, mask=cmask, other=0.0).to(ACC)
        k_base = K + b * s_kb + (ch * s_kc)[None, :, :]
        v_base = V + b * s_vb + (ch * s_vc)[None, :, :]
        w_base = WIN + b * s_wb + n * s_wn

        m_i = tl.full([BLOCK_HB], float("-inf"), ACC)
        l_i = tl.zeros([BLOCK_HB], ACC)
        acc = tl.zeros([BLOCK_HB, BLOCK_D], ACC)
        for kk in range(0, NK):
            w = tl.load(w_base + kk * s_wk)
            if not INT64:
                w = w.to(tl.int32)
            for r0 in range(0, WS, BLOCK_R):
                y, x, pmask = _hrca_window_tile(w, r0, GW, H, W, WS, BLOCK_R, BLOCK_W, INT64)
                tmask = pmask[:, None, None] & cmask[None, :, :]
                kt = tl.load(k_base + (y * s_kh + x * s_kw)[:, None, None], mask=tmask, other=0.0).to(ACC)
                s = tl.sum(kt * q[None, :, :], 2) * scale                # (P, HB)
                s = tl.where(pmask[:, None], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 0))
                m_new = tl.where(m_new == float("-inf"), 0.0, m_new)    # fully masked chunk
                if USE_EXP2:  # subtract first, then to base 2
                    p = tl.exp2((s - m_new[None, :]) * 1.4426950408889634)
                    alpha = tl.exp2((m_i - m_new) * 1.4426950408889634)
                else:
                    p = tl.exp(s - m_new[None, :])
                    alpha = tl.exp(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 0)
                vt = tl.load(v_base + (y * s_vh + x * s_vw)[:, None, None], mask=tmask, other=0.0).to(ACC)
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * vt, 0)
                m_i = m_new

        out = acc / l_i[:, None]
        tl.store(O + b * s_ob + n * s_on + ch * s_oc, out.to(O.dtype.element_ty), mask=cmask)
        row = (b * NH + h) * NQ + n
        tl.store(LSE + row, (m_i + tl.log(l_i)).to(LSE.dtype.element_ty), mask=mask_h)
        tl.store(ROW_MAX + row, m_i.to(ROW_MAX.dtype.element_ty), mask=mask_h)
        tl.store(ROW_SUM + row, l_i.to(ROW_SUM.dtype.element_ty), mask=mask_h)

    @triton.jit
    def _hrca_bwd_kernel(
        Q, K, V, WIN, O, DO, ROW_MAX, ROW_SUM, DLSE, DELTA, DQ, DK, DV,
        s_qb, s_qn, s_qc,
        s_kb, s_kh, s_kw, s_kc,
        s_vb, s_vh, s_vw, s_vc,
        s_wb, s_wn, s_wk,
        s_ob, s_on, s_oc,
        s_db, s_dn, s_dc,
        s_dqb, s_dqn, s_dqc,
        s_dkb, s_dkh, s_dkw, s_dkc,
        s_dvb, s_dvh, s_dvw, s_dvc,
        NQ, NK, H, W, GW, NH, NHB, scale_hi, scale_lo,
        HEAD_DIM: tl.constexpr, WS: tl.constexpr, BLOCK_HB: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
        INT64: tl.constexpr, HAS_DLSE: tl.constexpr, ATOMIC: tl.constexpr,
    ):
        # One program: one query, a block of heads.  dq in registers; dk/dv atomically (ATOMIC)
        # or left to _hrca_bwd_dkdv_kernel (deterministic mode; then delta is stored for it).
        n = tl.program_id(0)
        pid1 = tl.program_id(1)
        b = pid1 // NHB
        hb = pid1 % NHB
        if INT64:
            b = b.to(tl.int64)
            n = n.to(tl.int64)
        scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
        h = hb * BLOCK_HB + tl.arange(0, BLOCK_HB)
        dd = tl.arange(0, BLOCK_D)
        mask_h = h < NH
        cmask = mask_h[:, None] & (dd < HEAD_DIM)[None, :]
        ch = h[:, None] * HEAD_DIM + dd[None, :]

        q = tl.load(Q + b * s_qb + n * s_qn + ch * s_qc, mask=cmask, other=0.0).to(ACC)
        o = tl.load(O + b * s_ob + n * s_on + ch * s_oc, mask=cmask, other=0.0).to(ACC)
        do = tl.load(DO + b * s_db + n * s_dn + ch * s_dc, mask=cmask, other=0.0).to(ACC)
        row = (b * NH + h) * NQ + n
        m_row = tl.load(ROW_MAX + row, mask=mask_h, other=0.0).to(ACC)
        inv_l = 1.0 / tl.load(ROW_SUM + row, mask=mask_h, other=1.0).to(ACC)
        delta = tl.sum(o * do, 1)
        if HAS_DLSE:
            delta -= tl.load(DLSE + row, mask=mask_h, other=0.0).to(ACC)
        if not ATOMIC:
            tl.store(DELTA + row, delta, mask=mask_h)
        k_base = K + b * s_kb + (ch * s_kc)[None, :, :]
        v_base = V + b * s_vb + (ch * s_vc)[None, :, :]
        dk_base = DK + b * s_dkb + (ch * s_dkc)[None, :, :]
        dv_base = DV + b * s_dvb + (ch * s_dvc)[None, :, :]
        w_base = WIN + b * s_wb + n * s_wn
        qs = q * scale

        dq = tl.zeros([BLOCK_HB, BLOCK_D], ACC)
        for kk in range(0, NK):
            w = tl.load(w_base + kk * s_wk)
            if not INT64:
                w = w.to(tl.int32)
            for r0 in range(0, WS, BLOCK_R):
                y, x, pmask = _hrca_window_tile(w, r0, GW, H, W, WS, BLOCK_R, BLOCK_W, INT64)
                tmask = pmask[:, None, None] & cmask[None, :, :]
                kt = tl.load(k_base + (y * s_kh + x * s_kw)[:, None, None], mask=tmask, other=0.0).to(ACC)
                vt = tl.load(v_base + (y * s_vh + x * s_vw)[:, None, None], mask=tmask, other=0.0).to(ACC)
                s = tl.sum(kt * q[None, :, :], 2) * scale                # (P, HB)
                if USE_EXP2:
                    p = tl.exp2((s - m_row[None, :]) * 1.4426950408889634) * inv_l[None, :]
                else:
                    p = tl.exp(s - m_row[None, :]) * inv_l[None, :]
                p = tl.where(pmask[:, None], p, 0.0)
                dp = tl.sum(vt * do[None, :, :], 2)
                ds = p * (dp - delta[None, :])
                dq += tl.sum(ds[:, :, None] * kt, 0)
                if ATOMIC:
                    tl.atomic_add(dk_base + (y * s_dkh + x * s_dkw)[:, None, None],
                                  ds[:, :, None] * qs[None, :, :], mask=tmask, sem="relaxed")
                    tl.atomic_add(dv_base + (y * s_dvh + x * s_dvw)[:, None, None],
                                  p[:, :, None] * do[None, :, :], mask=tmask, sem="relaxed")

        dq = dq * scale
        tl.store(DQ + b * s_dqb + n * s_dqn + ch * s_dqc, dq.to(DQ.dtype.element_ty), mask=cmask)

    @triton.jit
    def _hrca_bwd_dkdv_kernel(
        Q, K, V, DO, ROW_MAX, ROW_SUM, DELTA, OFFS, ENTRY, DK, DV,
        s_qb, s_qn, s_qc,
        s_kb, s_kh, s_kw, s_kc,
        s_vb, s_vh, s_vw, s_vc,
        s_db, s_dn, s_dc,
        s_dkb, s_dkh, s_dkw, s_dkc,
        s_dvb, s_dvh, s_dvw, s_dvc,
        NQ, H, W, GW, NWIN, NH, scale_hi, scale_lo,
        HEAD_DIM: tl.constexpr, WS: tl.constexpr, BLOCK_HB: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
        INT64: tl.constexpr,
    ):
        # Deterministic dk/dv: one program owns one window (of one batch) and a block of heads and
        # loops over the queries that selected it, in the sorted order of ENTRY[OFFS[i]:OFFS[i+1]].
        pid0 = tl.program_id(0)
        hb = tl.program_id(1)
        b = pid0 // NWIN
        w = pid0 % NWIN
        if INT64:
            b = b.to(tl.int64)
        scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
        h = hb * BLOCK_HB + tl.arange(0, BLOCK_HB)
        dd = tl.arange(0, BLOCK_D)
        mask_h = h < NH
        cmask = mask_h[:, None] & (dd < HEAD_DIM)[None, :]
        ch = h[:, None] * HEAD_DIM + dd[None, :]
        start = tl.load(OFFS + pid0)
        end = tl.load(OFFS + pid0 + 1)
        row_base = (b * NH + h) * NQ                                     # (HB,)
        k_base = K + b * s_kb + (ch * s_kc)[None, :, :]
        v_base = V + b * s_vb + (ch * s_vc)[None, :, :]
        q_base = Q + b * s_qb + ch * s_qc
        do_base = DO + b * s_db + ch * s_dc

        for r0 in range(0, WS, BLOCK_R):
            y, x, pmask = _hrca_window_tile(w, r0, GW, H, W, WS, BLOCK_R, BLOCK_W, INT64)
            tmask = pmask[:, None, None] & cmask[None, :, :]
            kt = tl.load(k_base + (y * s_kh + x * s_kw)[:, None, None], mask=tmask, other=0.0).to(ACC)
            vt = tl.load(v_base + (y * s_vh + x * s_vw)[:, None, None], mask=tmask, other=0.0).to(ACC)
            dk = tl.zeros([BLOCK_R * BLOCK_W, BLOCK_HB, BLOCK_D], ACC)
            dv = tl.zeros([BLOCK_R * BLOCK_W, BLOCK_HB, BLOCK_D], ACC)
            for i in range(start, end):
                n = tl.load(ENTRY + i)
                if INT64:
                    n = n.to(tl.int64)
                q = tl.load(q_base + n * s_qn, mask=cmask, other=0.0).to(ACC)
                do = tl.load(do_base + n * s_dn, mask=cmask, other=0.0).to(ACC)
                m_row = tl.load(ROW_MAX + row_base + n, mask=mask_h, other=0.0).to(ACC)
                inv_l = 1.0 / tl.load(ROW_SUM + row_base + n, mask=mask_h, other=1.0).to(ACC)
                delta = tl.load(DELTA + row_base + n, mask=mask_h, other=0.0).to(ACC)
                s = tl.sum(kt * q[None, :, :], 2) * scale
                if USE_EXP2:
                    p = tl.exp2((s - m_row[None, :]) * 1.4426950408889634) * inv_l[None, :]
                else:
                    p = tl.exp(s - m_row[None, :]) * inv_l[None, :]
                p = tl.where(pmask[:, None], p, 0.0)
                dp = tl.sum(vt * do[None, :, :], 2)
                ds = p * (dp - delta[None, :])
                dk += ds[:, :, None] * q[None, :, :]
                dv += p[:, :, None] * do[None, :, :]
            dk = dk * scale
            tl.store(DK + b * s_dkb + (y * s_dkh + x * s_dkw)[:, None, None] + (ch * s_dkc)[None, :, :],
                     dk.to(DK.dtype.element_ty), mask=tmask)
            tl.store(DV + b * s_dvb + (y * s_dvh + x * s_dvw)[:, None, None] + (ch * s_dvc)[None, :, :],
                     dv.to(DV.dtype.element_ty), mask=tmask)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def _tiles(dtype: torch.dtype, num_heads: int, head_dim: int, window: int, backward: bool = False):
    """(BLOCK_HB, BLOCK_D, BLOCK_R, BLOCK_W, num_warps).

    Interpreter: all heads and whole windows per step (fewest interpreted ops).  GPU: about 64
    channels per program (2 heads of 32) for parallelism at small batch, and tiles of at most
    ~2048 elements (1024 in the backward, which holds more live tiles) per step.
    """
    block_d = next_pow2(head_dim)
    block_w = next_pow2(window)
    heads_p2 = next_pow2(num_heads)
    if big_interpreter_tiles():
        return heads_p2, block_d, block_w, block_w, 1
    block_hb = max(1, min(heads_p2, 64 // block_d))
    budget = 1024 if (backward or dtype == torch.float64) else 2048
    block_r = max(1, min(block_w, budget // (block_w * block_hb * block_d)))
    warps = 4 if block_r * block_w * block_hb * block_d >= 1024 else 2
    return block_hb, block_d, block_r, block_w, warps


def _forward_config(dtype: torch.dtype, num_heads: int, head_dim: int, window: int):
    return _tiles(dtype, num_heads, head_dim, window, backward=False)


def _backward_config(dtype: torch.dtype, num_heads: int, head_dim: int, window: int):
    return _tiles(dtype, num_heads, head_dim, window, backward=True)


def _consts(dtype: torch.dtype, head_dim: int, window: int, int64: bool) -> dict:
    fp64 = dtype == torch.float64
    return dict(HEAD_DIM=head_dim, WS=window, ACC=tl.float64 if fp64 else tl.float32,
                USE_EXP2=not fp64, INT64=int64)


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------
def _forward_triton(q, k, v, win_idx, window: int, num_heads: int, scale: float):
    B, NQ, C = q.shape
    H, W = k.shape[1], k.shape[2]
    NK = win_idx.shape[2]
    D = C // num_heads
    _, gw = hrca_window_grid(H, W, window)
    out = new_empty((B, NQ, C), q.dtype, q.device)
    lse, row_max, row_sum = (new_empty((B, num_heads, NQ), acc_dtype(q.dtype), q.device) for _ in range(3))
    consts = _consts(q.dtype, D, window, needs_int64(q, k, v, win_idx, out))
    bhb, bd, br, bw, warps = _forward_config(q.dtype, num_heads, D, window)
    nhb = cdiv(num_heads, bhb)
    with device_guard(q):
        _hrca_fwd_kernel[(NQ, B * nhb)](
            q, k, v, win_idx, out, lse, row_max, row_sum,
            *q.stride(), *k.stride(), *v.stride(), *win_idx.stride(), *out.stride(),
            NQ, NK, H, W, gw, num_heads, nhb, *split_f32(scale),
            BLOCK_HB=bhb, BLOCK_D=bd, BLOCK_R=br, BLOCK_W=bw, num_warps=warps, **launch_options(), num_stages=1, **consts,
        )
    return out, lse, row_max, row_sum


def _window_csr(win_idx: torch.Tensor, n_windows: int):
    """(offsets (B*n_windows + 1,), query index per entry (B*Nq*K,)): the (query, slot) pairs of
    each (batch, window), sorted by window and, within a window, by (query, slot) (stable sort)."""
    B, NQ, NK = win_idx.shape
    key = win_idx.long() + torch.arange(B, device=win_idx.device).view(B, 1, 1) * n_windows
    key_sorted, order = torch.sort(key.reshape(-1), stable=True)
    bounds = torch.arange(B * n_windows + 1, device=win_idx.device)
    offs = torch.searchsorted(key_sorted, bounds)
    entry = (order // NK) % NQ
    idx_dtype = torch.int32 if B * NQ * NK < 2 ** 31 - 1 else torch.int64
    return offs.to(idx_dtype).contiguous(), entry.to(idx_dtype).contiguous()


def _backward_triton(grad_out, q, k, v, win_idx, out, row_max, row_sum, grad_lse, window: int,
                     num_heads: int, scale: float, deterministic: bool):
    B, NQ, C = q.shape
    H, W = k.shape[1], k.shape[2]
    NK = win_idx.shape[2]
    D = C // num_heads
    gh, gw = hrca_window_grid(H, W, window)
    acc_t = acc_dtype(q.dtype)
    dq = new_empty(q.shape, q.dtype, q.device)
    if deterministic:
        dk = new_empty(k.shape, k.dtype, k.device)
        dv = new_empty(v.shape, v.dtype, v.device)
        delta = torch.empty((B, num_heads, NQ), dtype=acc_t, device=q.device)
    else:  # atomic accumulation buffers in the accumulation dtype
        dk = torch.zeros(k.shape, dtype=acc_t, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc_t, device=v.device)
        delta = row_max  # unused
    row_max, row_sum = row_max.contiguous(), row_sum.contiguous()
    has_dlse = grad_lse is not None
    if has_dlse:
        grad_lse = grad_lse.contiguous()
    consts = _consts(q.dtype, D, window, needs_int64(q, k, v, win_idx, out, grad_out, dq, dk, dv))
    bhb, bd, br, bw, warps = _backward_config(q.dtype, num_heads, D, window)
    nhb = cdiv(num_heads, bhb)
    with device_guard(q):
        _hrca_bwd_kernel[(NQ, B * nhb)](
            q, k, v, win_idx, out, grad_out, row_max, row_sum, grad_lse if has_dlse else row_max, delta,
            dq, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *win_idx.stride(), *out.stride(),
            *grad_out.stride(), *dq.stride(), *dk.stride(), *dv.stride(),
            NQ, NK, H, W, gw, num_heads, nhb, *split_f32(scale),
            BLOCK_HB=bhb, BLOCK_D=bd, BLOCK_R=br, BLOCK_W=bw, num_warps=warps, **launch_options(), num_stages=1,
            HAS_DLSE=has_dlse, ATOMIC=not deterministic, **consts,
        )
        if deterministic:
            offs, entry = _window_csr(win_idx, gh * gw)
            _hrca_bwd_dkdv_kernel[(B * gh * gw, nhb)](
                q, k, v, grad_out, row_max, row_sum, delta, offs, entry, dk, dv,
                *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
                NQ, H, W, gw, gh * gw, num_heads, *split_f32(scale),
                BLOCK_HB=bhb, BLOCK_D=bd, BLOCK_R=br, BLOCK_W=bw, num_warps=warps, **launch_options(), num_stages=1,
                **consts,
            )
    if dk.dtype != k.dtype:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def hrca_window_grid(h: int, w: int, window: int) -> tuple[int, int]:
    """Window grid of a high-resolution ``h x w`` map cut into ``window x window`` windows
    (``ceil`` on each side: the last row/column of windows may be cut by the map's edge)."""
    h, w, window = int(h), int(w), int(window)
    if h <= 0 or w <= 0 or window <= 0:
        raise ValueError(f"hrca_window_grid needs positive sizes, got h={h}, w={w}, window={window}")
    return -(-h // window), -(-w // window)


def hrca_window_pixels(win_idx: torch.Tensor, h: int, w: int, window: int):
    """Flat pixel indices ``(..., K * window**2)`` of the windows ``win_idx`` (row-major in the window
    grid) of an ``h x w`` map, and a mask of those inside the map (pixels past the edge are skipped)."""
    _, gw = hrca_window_grid(h, w, window)
    off = torch.arange(window, device=win_idx.device)
    rows = (win_idx // gw)[..., None, None] * window + off[:, None]       # (..., K, ws, 1)
    cols = (win_idx % gw)[..., None, None] * window + off[None, :]        # (..., K, ws, ws)
    rows, cols = torch.broadcast_tensors(rows, cols)
    valid = (rows < h) & (cols < w)
    flat = (rows.clamp(max=h - 1) * w + cols.clamp(max=w - 1))
    return flat.flatten(-3), valid.flatten(-3)


def hrca_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, win_idx: torch.Tensor,
                             window: int, num_heads: int, scale: Optional[float] = None) -> torch.Tensor:
    """The reference math: cross-attention restricted to selected windows.

    q (B, Nq, C) queries; k, v (B, H, W, C) high-resolution keys/values (tokens-last);
    win_idx (B, Nq, K) integer indices of each query's windows in the window grid
    ``hrca_window_grid(H, W, window)`` (row-major; shared by all heads). Each query attends, per head,
    to the pixels of its K windows (pixels past the map's edge excluded) -> (B, Nq, C).
    This reference gathers the keys/values (B, Nq, K * window**2, C); the fused op does not.
    """
    B, Nq, C = q.shape
    _, H, W, _ = k.shape
    d = C // num_heads
    if scale is None:
        scale = d ** -0.5
    gh, gw = hrca_window_grid(H, W, window)
    if win_idx.numel() and (int(win_idx.min()) < 0 or int(win_idx.max()) >= gh * gw):
        raise ValueError(f"win_idx must lie in [0, {gh * gw}) for a {H}x{W} map with window {window}")
    flat, valid = hrca_window_pixels(win_idx.long(), H, W, window)        # (B, Nq, L)
    L = flat.shape[-1]
    idx = flat.reshape(B, Nq * L, 1).expand(B, Nq * L, C)
    kg = torch.gather(k.reshape(B, H * W, C), 1, idx).reshape(B, Nq, L, num_heads, d)
    vg = torch.gather(v.reshape(B, H * W, C), 1, idx).reshape(B, Nq, L, num_heads, d)
    qh = q.reshape(B, Nq, num_heads, d)
    logits = torch.einsum("bqhd,bqlhd->bhql", qh, kg) * scale
    logits = logits.masked_fill(~valid[:, None], float("-inf"))
    attn = logits.softmax(dim=-1)
    return torch.einsum("bhql,bqlhd->bqhd", attn, vg).reshape(B, Nq, C)


def _gather(q, k, v, win_idx, window: int, num_heads: int):
    """Reference-path gather in the accumulation dtype: q (B, Nq, heads, d), the window pixels'
    k/v (B, Nq, L, heads, d), their flat pixel indices (B, Nq * L, C) and validity (B, Nq, L)."""
    acc = acc_dtype(q.dtype)
    B, NQ, C = q.shape
    _, H, W, _ = k.shape
    d = C // num_heads
    flat, valid = hrca_window_pixels(win_idx.long(), H, W, window)        # (B, Nq, L)
    L = flat.shape[-1]
    idx = flat.reshape(B, NQ * L, 1).expand(B, NQ * L, C)
    kg = torch.gather(k.to(acc).reshape(B, H * W, C), 1, idx).reshape(B, NQ, L, num_heads, d)
    vg = torch.gather(v.to(acc).reshape(B, H * W, C), 1, idx).reshape(B, NQ, L, num_heads, d)
    return q.to(acc).reshape(B, NQ, num_heads, d), kg, vg, idx, valid


def _forward_reference(q, k, v, win_idx, window: int, num_heads: int, scale: float):
    """The reference math (gathered keys/values) in the accumulation dtype, with the row statistics."""
    B, NQ, C = q.shape
    qh, kg, vg, _, valid = _gather(q, k, v, win_idx, window, num_heads)
    logits = torch.einsum("bqhd,bqlhd->bhql", qh, kg) * scale
    logits = logits.masked_fill(~valid[:, None], float("-inf"))
    row_max, row_sum, lse = row_statistics(logits)                              # (B, heads, Nq)
    attn = torch.exp(logits - row_max[..., None]) / row_sum[..., None]
    out = torch.einsum("bhql,bqlhd->bqhd", attn, vg).reshape(B, NQ, C)
    return out.to(q.dtype).contiguous(), lse, row_max, row_sum


def _backward_reference(grad_out, q, k, v, win_idx, out, row_max, row_sum, grad_lse, window: int,
                        num_heads: int, scale: float):
    """Recomputation backward on the gathered tensors; dk/dv by ``scatter_add_`` (deterministic
    on CPU).  (Autograd is not available inside a custom op's implementation.)"""
    B, NQ, C = q.shape
    _, H, W, _ = k.shape
    qh, kg, vg, idx, valid = _gather(q, k, v, win_idx, window, num_heads)
    acc = qh.dtype
    doh = grad_out.to(acc).reshape(qh.shape)
    logits = torch.einsum("bqhd,bqlhd->bhql", qh, kg) * scale
    p = (torch.exp(logits - row_max.to(acc)[..., None]) / row_sum.to(acc)[..., None]).masked_fill(~valid[:, None], 0.0)
    delta = (doh * out.to(acc).reshape(qh.shape)).sum(-1).transpose(1, 2)      # (B, heads, Nq)
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc)
    ds = p * (torch.einsum("bqhd,bqlhd->bhql", doh, vg) - delta[..., None])
    dq = torch.einsum("bhql,bqlhd->bqhd", ds, kg).reshape(B, NQ, C) * scale
    dkg = torch.einsum("bhql,bqhd->bqlhd", ds, qh).reshape(B, -1, C) * scale
    dvg = torch.einsum("bhql,bqhd->bqlhd", p, doh).reshape(B, -1, C)
    dk = torch.zeros(B, H * W, C, dtype=acc, device=k.device).scatter_add_(1, idx, dkg)
    dv = torch.zeros(B, H * W, C, dtype=acc, device=v.device).scatter_add_(1, idx, dvg)
    return (dq.to(q.dtype).contiguous(), dk.reshape(k.shape).to(k.dtype),
            dv.reshape(v.shape).to(v.dtype))


def _check_win_range(win_idx: torch.Tensor, h: int, w: int, window: int) -> None:
    gh, gw = hrca_window_grid(h, w, window)
    lo, hi = (int(t) for t in torch.aminmax(win_idx))
    if lo < 0 or hi >= gh * gw:
        raise ValueError(f"win_idx must lie in [0, {gh * gw}) for a {h}x{w} map with window {window} "
                         f"(a {gh}x{gw} window grid), got values in [{lo}, {hi}]")


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lrformer::hrca_attention", mutates_args=())
def _hrca_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, win_idx: torch.Tensor,
                       window: int, num_heads: int, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_win_range(win_idx, k.shape[1], k.shape[2], window)
    if use_kernel(q):
        return _forward_triton(q, k, v, win_idx, window, num_heads, scale)
    return _forward_reference(q, k, v, win_idx, window, num_heads, scale)


@_hrca_attention_op.register_fake
def _(q, k, v, win_idx, window, num_heads, scale):
    B, NQ, C = q.shape
    stats = [q.new_empty((B, num_heads, NQ), dtype=acc_dtype(q.dtype)) for _ in range(3)]
    return (q.new_empty((B, NQ, C)), *stats)


@torch.library.custom_op("lrformer::hrca_attention_backward", mutates_args=())
def _hrca_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                v: torch.Tensor, win_idx: torch.Tensor, out: torch.Tensor,
                                row_max: torch.Tensor, row_sum: torch.Tensor, grad_lse: Optional[torch.Tensor],
                                window: int, num_heads: int, scale: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_kernel(q):
        return _backward_triton(grad_out, q, k, v, win_idx, out, row_max, row_sum, grad_lse, window, num_heads,
                                scale, deterministic=torch.are_deterministic_algorithms_enabled())
    return _backward_reference(grad_out, q, k, v, win_idx, out, row_max, row_sum, grad_lse, window, num_heads,
                               scale)


@_hrca_attention_backward_op.register_fake
def _(grad_out, q, k, v, win_idx, out, row_max, row_sum, grad_lse, window, num_heads, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, win_idx, window, num_heads, scale = inputs
    out, _, row_max, row_sum = output
    ctx.save_for_backward(q, k, v, win_idx, out, row_max, row_sum)
    ctx.mark_non_differentiable(row_max, row_sum)
    ctx.set_materialize_grads(False)   # an unused lse gets no zero-filled gradient (nothing to read)
    ctx.window, ctx.num_heads, ctx.scale = window, num_heads, scale


def _backward(ctx, grad_out, grad_lse, _grad_row_max, _grad_row_sum):
    q, k, v, win_idx, out, row_max, row_sum = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _hrca_attention_backward_op(grad_out, q, k, v, win_idx, out, row_max, row_sum, grad_lse,
                                             ctx.window, ctx.num_heads, ctx.scale)
    return dq, dk, dv, None, None, None, None


_hrca_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def _validate(q, k, v, win_idx, window, num_heads, scale) -> float:
    check_tensor(q, "q", ndim=3)
    check_tensor(k, "k", ndim=4, device=q.device, dtype=q.dtype)
    check_tensor(v, "v", ndim=4, device=q.device, dtype=q.dtype)
    check_tensor(win_idx, "win_idx", ndim=3, dtypes=(torch.int32, torch.int64), device=q.device)
    check_int("num_heads", num_heads)
    check_int("window", window, MAX_WINDOW)
    B, NQ, C = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != C or v.shape[3] != C:
        raise ValueError(f"channel mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"(k and v must be (B, H, W, C) with q's C={C} channels last)")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if win_idx.shape[0] != B or win_idx.shape[1] != NQ:
        raise ValueError(f"win_idx must be (B, Nq, K) = ({B}, {NQ}, K), got {tuple(win_idx.shape)}")
    return attention_scale(C, num_heads, scale, MAX_HEAD_DIM)


def hrca_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, win_idx: torch.Tensor,
                   window: int, num_heads: int, scale: Optional[float] = None) -> torch.Tensor:
    """High-resolution cross-attention over each query's selected windows -> (B, Nq, C).

    q (B, Nq, C); k, v (B, H, W, C) (any strides); win_idx (B, Nq, K) int32/int64 window indices
    in ``hrca_window_grid(H, W, window)`` (row-major); ``scale`` defaults to
    ``head_dim ** -0.5``.  Differentiable in q, k and v; the k/v gradients use float atomics
    unless ``torch.use_deterministic_algorithms(True)`` is set (then a sort-based deterministic
    kernel runs).  Raises ValueError for window indices outside the grid.
    """
    scale = _validate(q, k, v, win_idx, window, num_heads, scale)
    out = _hrca_attention_op(q, k, v, win_idx, window, num_heads, scale)[0]
    return out
