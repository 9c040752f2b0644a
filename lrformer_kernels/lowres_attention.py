"""Fused multi-head softmax attention for LRFormer's low-resolution token sets.

``lowres_attention(q, k, v, num_heads, scale=None)``: q (B, Nq, C), k/v (B, M, C) -> (B, Nq, C),
the same math as :func:`lowres_attention_reference` (channel ``c`` belongs to head
``c // (C // num_heads)``; scale defaults to ``head_dim ** -0.5``).

Design (flash-attention style, one launch for all batches and heads):

* forward: grid ``(cdiv(Nq, BLOCK_M), B * heads)``; each program keeps a block of queries and
  streams over the keys/values with an online softmax (fp32 accumulation, fp64 for fp64 inputs),
  writes the output in the input dtype and three per-row statistics of shape (B, heads, Nq)
  (fp32; fp64 for fp64 inputs): the log-sum-exp ``lse`` (natural log; an output of the op, with
  a gradient), and, kept apart for the backward, the row maximum ``row_max`` of the scaled logits
  and the row sum ``row_sum = sum_j exp(s_j - row_max)``.
* backward by recomputation (no attention matrix is stored): ``p = exp(s - row_max) / row_sum``;
  one kernel for dQ (program per query block, looping twice over the key blocks: first
  ``delta = sum_j p dP - dlse`` from the same recomputed p and dP as everything after it, which
  makes saturated rows exact, unlike ``rowsum(dO * O)``; the output is not needed), then one for
  dK/dV (program per key block per (b, head), looping over the query blocks, reading delta).
  Deterministic: no atomics.
* why the maximum and the sum are kept apart: recomputing ``p = exp(s - lse)`` from a float32
  ``lse`` loses ``log(row_sum)`` once the logits are large (``lse`` of 13 equal logits at 1e8 rounds
  to 1e8, so every p becomes 1 instead of 1/13), while ``s - row_max`` is exact where it matters
  and ``row_sum`` is in [1, M].  The logits are computed in natural units (``dot * scale``) in the
  forward and the backward alike (no rounded ``scale * log2 e`` folded in) and converted to base 2
  only after subtracting the maximum, and both backward kernels recompute ``s`` exactly as the
  forward does (``dot(q, k^T) * scale``, queries as rows: the dK/dV kernel transposes ``p`` and
  ``dS`` rather than the product), so the backward's ``s - row_max`` is the forward's bit for bit
  and is exactly 0 at a row's maximum (saturated one-hot rows at logits ~1e4, where an ulp of ``s``
  is 1e-3, keep p = 1 exactly; tests ``test_random_logits_fp32``).  This makes the fp32
  backward as accurate as native fp32 attention at any logit scale (tests/test_lowres_attention.py,
  ``test_huge_logits*``).
* inputs may be arbitrary strided views (e.g. ``k = kv[..., :C]``, ``v = kv[..., C:]``); only the
  strides are passed, nothing is copied.  Head dims that are not powers of two are padded with
  masks to the next power of two (at least 16, for ``tl.dot``).
* fp32 inputs use ``input_precision="ieee"`` (no TF32) so that fp32 stays fp32-accurate.

Packaging: ``torch.library`` custom ops ``lrformer::lowres_attention`` (-> out, lse, row_max,
row_sum; the last two are not differentiable) and
``lrformer::lowres_attention_backward`` with fake (meta) implementations and autograd, so the op
works under ``torch.compile(fullgraph=True)``.  When :func:`use_kernel` says no (CPU without the
Triton interpreter), the ops run the PyTorch reference math instead.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import (cdiv, next_pow2, launch_options, HAS_TRITON, acc_dtype, attention_scale, check_int, check_tensor, device_guard,
                      big_interpreter_tiles, needs_int64, new_empty, num_sms, split_f32, use_kernel, row_statistics)

if HAS_TRITON:
    import triton
    import triton.language as tl

MAX_HEAD_DIM = 256

__all__ = ["lowres_attention", "lowres_attention_reference", "MAX_HEAD_DIM"]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _lra_fwd_kernel(
        Q, K, V, O, LSE, ROW_MAX, ROW_SUM,
        s_qb, s_qn, s_qc,
        s_kb, s_kn, s_kc,
        s_vb, s_vn, s_vc,
        s_ob, s_on, s_oc,
        H, NQ, M, scale_hi, scale_lo,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
        DOT_PREC: tl.constexpr, INT64: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_nb = tl.arange(0, BLOCK_N)
        if INT64:
            b = b.to(tl.int64)
            offs_m = offs_m.to(tl.int64)
            offs_nb = offs_nb.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < NQ
        mask_d = offs_d < HEAD_DIM
        col = h * HEAD_DIM + offs_d

        q = tl.load(Q + b * s_qb + offs_m[:, None] * s_qn + col[None, :] * s_qc,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        k_base = K + b * s_kb + col[:, None] * s_kc
        v_base = V + b * s_vb + col[None, :] * s_vc

        m_i = tl.full([BLOCK_M], float("-inf"), ACC)
        l_i = tl.zeros([BLOCK_M], ACC)
        acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        for start_n in range(0, M, BLOCK_N):
            offs_n = start_n + offs_nb
            mask_n = offs_n < M
            kt = tl.load(k_base + offs_n[None, :] * s_kn, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
            qk = tl.dot(q, kt, input_precision=DOT_PREC).to(ACC) * scale
            qk = tl.where(mask_n[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            if USE_EXP2:  # subtract first, then to base 2 (see the module docstring)
                p = tl.exp2((qk - m_new[:, None]) * 1.4426950408889634)
                alpha = tl.exp2((m_i - m_new) * 1.4426950408889634)
            else:
                p = tl.exp(qk - m_new[:, None])
                alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * s_vn, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC).to(ACC)
            m_i = m_new

        out = acc / l_i[:, None]
        tl.store(O + b * s_ob + offs_m[:, None] * s_on + col[None, :] * s_oc,
                 out.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
        row = pid_bh.to(tl.int64) * NQ + offs_m
        tl.store(LSE + row, (m_i + tl.log(l_i)).to(LSE.dtype.element_ty), mask=mask_m)
        tl.store(ROW_MAX + row, m_i.to(ROW_MAX.dtype.element_ty), mask=mask_m)
        tl.store(ROW_SUM + row, l_i.to(ROW_SUM.dtype.element_ty), mask=mask_m)

    @triton.jit
    def _lra_bwd_dkdv_kernel(
        Q, K, V, DO, ROW_MAX, ROW_SUM, DELTA, DK, DV,
        s_qb, s_qn, s_qc,
        s_kb, s_kn, s_kc,
        s_vb, s_vn, s_vc,
        s_db, s_dn, s_dc,
        s_dkb, s_dkn, s_dkc,
        s_dvb, s_dvn, s_dvc,
        H, NQ, M, scale_hi, scale_lo,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
        DOT_PREC: tl.constexpr, INT64: tl.constexpr,
    ):
        # One program: a block of BLOCK_N keys/values of one (b, head); loops over all queries.
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_mb = tl.arange(0, BLOCK_M)
        if INT64:
            b = b.to(tl.int64)
            offs_n = offs_n.to(tl.int64)
            offs_mb = offs_mb.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < M
        mask_d = offs_d < HEAD_DIM
        col = h * HEAD_DIM + offs_d
        mask_nd = mask_n[:, None] & mask_d[None, :]

        # k^T, v^T tiles (BLOCK_D, BLOCK_N): the logits are recomputed as the forward computes them,
        # dot(q, k^T) with queries as rows (bit-identical s, so s - row_max is exactly 0 at a row's
        # maximum: saturated and tied rows stay exact); p and dS are transposed for dV and dK
        mask_dn = mask_d[:, None] & mask_n[None, :]
        kt = tl.load(K + b * s_kb + col[:, None] * s_kc + offs_n[None, :] * s_kn, mask=mask_dn, other=0.0)
        vt = tl.load(V + b * s_vb + col[:, None] * s_vc + offs_n[None, :] * s_vn, mask=mask_dn, other=0.0)
        q_base = Q + b * s_qb + col[None, :] * s_qc         # (BLOCK_M, BLOCK_D) tiles: q
        do_base = DO + b * s_db + col[None, :] * s_dc       # (BLOCK_M, BLOCK_D) tiles: dO
        row_base = pid_bh.to(tl.int64) * NQ

        dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        for start_m in range(0, NQ, BLOCK_M):
            offs_m = start_m + offs_mb
            mask_m = offs_m < NQ
            mask_md = mask_m[:, None] & mask_d[None, :]
            q = tl.load(q_base + offs_m[:, None] * s_qn, mask=mask_md, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * s_dn, mask=mask_md, other=0.0)
            m_row = tl.load(ROW_MAX + row_base + offs_m, mask=mask_m, other=0.0).to(ACC)
            inv_l = 1.0 / tl.load(ROW_SUM + row_base + offs_m, mask=mask_m, other=1.0).to(ACC)
            delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0).to(ACC)
            qk = tl.dot(q, kt, input_precision=DOT_PREC).to(ACC) * scale     # (BLOCK_M, BLOCK_N)
            if USE_EXP2:
                p = tl.exp2((qk - m_row[:, None]) * 1.4426950408889634) * inv_l[:, None]
            else:
                p = tl.exp(qk - m_row[:, None]) * inv_l[:, None]
            p = tl.where(mask_m[:, None], p, 0.0)
            dv += tl.dot(tl.trans(p.to(vt.dtype)), do, input_precision=DOT_PREC).to(ACC)
            dp = tl.dot(do, vt, input_precision=DOT_PREC).to(ACC)                # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC).to(ACC)

        dk = dk * scale
        tl.store(DK + b * s_dkb + offs_n[:, None] * s_dkn + col[None, :] * s_dkc,
                 dk.to(DK.dtype.element_ty), mask=mask_nd)
        tl.store(DV + b * s_dvb + offs_n[:, None] * s_dvn + col[None, :] * s_dvc,
                 dv.to(DV.dtype.element_ty), mask=mask_nd)

    @triton.jit
    def _lra_dq_block(q, do, kt_base, vt_base, offs_n, mask_d, M, s_kn, s_vn, m_row, inv_l, scale,
                      ACC: tl.constexpr, USE_EXP2: tl.constexpr, DOT_PREC: tl.constexpr):
        """One key block of the dQ kernel's two passes: k^T, p = exp(s - row_max) / row_sum with s
        recomputed as the forward does, and dP = dO v^T, all (BLOCK_M, BLOCK_N)."""
        mask_n = offs_n < M
        mask_dn = mask_d[:, None] & mask_n[None, :]
        kt = tl.load(kt_base + offs_n[None, :] * s_kn, mask=mask_dn, other=0.0)
        vt = tl.load(vt_base + offs_n[None, :] * s_vn, mask=mask_dn, other=0.0)
        qk = tl.dot(q, kt, input_precision=DOT_PREC).to(ACC) * scale
        if USE_EXP2:
            p = tl.exp2((qk - m_row[:, None]) * 1.4426950408889634) * inv_l[:, None]
        else:
            p = tl.exp(qk - m_row[:, None]) * inv_l[:, None]
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC).to(ACC)
        return kt, p, dp

    @triton.jit
    def _lra_bwd_dq_kernel(
        Q, K, V, DO, ROW_MAX, ROW_SUM, DLSE, DELTA, DQ,
        s_qb, s_qn, s_qc,
        s_kb, s_kn, s_kc,
        s_vb, s_vn, s_vc,
        s_db, s_dn, s_dc,
        s_dqb, s_dqn, s_dqc,
        H, NQ, M, scale_hi, scale_lo,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr,
        DOT_PREC: tl.constexpr, INT64: tl.constexpr, HAS_DLSE: tl.constexpr,
    ):
        # One program: a block of BLOCK_M queries of one (b, head); loops twice over all keys: first
        # delta = sum_j p dP - dlse (written for the dK/dV kernel, launched after this one), then dQ.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        scale = tl.cast(scale_hi, ACC) + tl.cast(scale_lo, ACC)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_nb = tl.arange(0, BLOCK_N)
        if INT64:
            b = b.to(tl.int64)
            offs_m = offs_m.to(tl.int64)
            offs_nb = offs_nb.to(tl.int64)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < NQ
        mask_d = offs_d < HEAD_DIM
        col = h * HEAD_DIM + offs_d
        mask_md = mask_m[:, None] & mask_d[None, :]

        q = tl.load(Q + b * s_qb + offs_m[:, None] * s_qn + col[None, :] * s_qc, mask=mask_md, other=0.0)
        do = tl.load(DO + b * s_db + offs_m[:, None] * s_dn + col[None, :] * s_dc, mask=mask_md, other=0.0)
        row = pid_bh.to(tl.int64) * NQ + offs_m
        m_row = tl.load(ROW_MAX + row, mask=mask_m, other=0.0).to(ACC)
        inv_l = 1.0 / tl.load(ROW_SUM + row, mask=mask_m, other=1.0).to(ACC)
        kt_base = K + b * s_kb + col[:, None] * s_kc   # (BLOCK_D, BLOCK_N) tiles: k^T
        vt_base = V + b * s_vb + col[:, None] * s_vc   # v^T

        # delta from the very p and dP the second pass (and the dK/dV kernel) recompute, not from
        # rowsum(dO * O): in a saturated row (p one-hot) dP_max - delta is then exactly 0, as in
        # PyTorch's softmax backward, so dS, dQ and dK are exact there
        delta = tl.zeros([BLOCK_M], ACC)
        for start_n in range(0, M, BLOCK_N):
            kt, p, dp = _lra_dq_block(q, do, kt_base, vt_base, start_n + offs_nb, mask_d, M, s_kn, s_vn, m_row, inv_l,
                                      scale, ACC, USE_EXP2, DOT_PREC)
            delta += tl.sum(p * dp, 1)
        if HAS_DLSE:
            delta -= tl.load(DLSE + row, mask=mask_m, other=0.0).to(ACC)
        tl.store(DELTA + row, delta, mask=mask_m)

        dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        for start_n in range(0, M, BLOCK_N):
            kt, p, dp = _lra_dq_block(q, do, kt_base, vt_base, start_n + offs_nb, mask_d, M, s_kn, s_vn, m_row, inv_l,
                                      scale, ACC, USE_EXP2, DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(q.dtype), tl.trans(kt), input_precision=DOT_PREC).to(ACC)

        dq = dq * scale
        tl.store(DQ + b * s_dqb + offs_m[:, None] * s_dqn + col[None, :] * s_dqc,
                 dq.to(DQ.dtype.element_ty), mask=mask_md)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def _block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))


def _kernel_consts(dtype: torch.dtype, head_dim: int, int64: bool) -> dict:
    fp64 = dtype == torch.float64
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        ACC=tl.float64 if fp64 else tl.float32,
        # exp2 (of logit - row max, times log2 e) for fp32 math; plain exp keeps fp64 exact.
        USE_EXP2=not fp64,
        # fp32 stays fp32 (no TF32); for 16-bit inputs the precision flag has no effect.
        DOT_PREC="ieee" if dtype in (torch.float32, torch.float64) else "tf32",
        INT64=int64,
    )


def _forward_config(dtype: torch.dtype, block_d: int, nq: int = 0, bh: int = 0, device=None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward kernel.

    16-bit inputs: 128-query tiles at 8 warps, unless that leaves fewer than two waves of programs on
    the GPU (small encoder token sets), then 64-query tiles at 4.  fp32 (ieee dots on CUDA cores): 16x16
    tiles.  Each choice is the largest that compiles without register spills on sm_90 and sm_80 for the
    models' head dims (tests/test_gpu_compile.py).
    """
    if big_interpreter_tiles():
        return 32, 32, 1, 1
    if dtype == torch.float64:
        return (32, 32, 4, 1) if block_d <= 64 else (16, 16, 8, 1)
    if dtype == torch.float32:  # ieee fp32 dots run on CUDA cores: small tiles (32x32 and up spill 8-840 B)
        return (16, 16, 4, 1) if block_d <= 64 else (16, 16, 8, 1)
    if block_d > 128:
        return 64, 32, 8, 2
    few = device is not None and cdiv(nq, 128) * bh < 2 * num_sms(device)
    if few:
        return 64, 64, 4, 3
    if block_d > 64:       # head dim 80 (LRFormer-L): 128x64 spills 96 B on sm_80 under Triton 3.6
        return 128, 32, 8, 3
    return 128, 64, 8, 3   # 4 warps spill 16-168 B at head dims 32-48 (tests/test_gpu_compile.py)


def _backward_config(dtype: torch.dtype, block_d: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) shared by the dK/dV and dQ kernels: the largest tiles that
    compile without register spills on sm_90 and sm_80 for every head dim the models use (24..80; the
    compile gate tests/test_gpu_compile.py records and checks every launch)."""
    if big_interpreter_tiles():
        return 32, 32, 1, 1
    if dtype == torch.float64:
        return (32, 32, 4, 1) if block_d <= 64 else (16, 16, 8, 1)
    if dtype == torch.float32:  # 32x32 tiles spill 8-1752 B with ieee fp32 dots (tests/test_gpu_compile.py)
        return (16, 16, 4, 1) if block_d <= 64 else (16, 16, 8, 1)
    if block_d <= 64:      # 64x64 tiles spill 16-344 B on sm_80 (tests/test_gpu_compile.py)
        return 32, 32, 4, 2
    return 32, 32, 8, 1    # head dim 80 (LRFormer-L's head): 64x64 at 8 warps spills 8-304 B


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------
def _forward_triton(q, k, v, num_heads: int, scale: float):
    B, NQ, C = q.shape
    M = k.shape[1]
    D = C // num_heads
    out = new_empty((B, NQ, C), q.dtype, q.device)
    lse, row_max, row_sum = (new_empty((B, num_heads, NQ), acc_dtype(q.dtype), q.device) for _ in range(3))
    consts = _kernel_consts(q.dtype, D, needs_int64(q, k, v, out))
    bm, bn, warps, stages = _forward_config(q.dtype, consts["BLOCK_D"], NQ, B * num_heads, q.device)
    grid = (cdiv(NQ, bm), B * num_heads)
    with device_guard(q):
        _lra_fwd_kernel[grid](
            q, k, v, out, lse, row_max, row_sum,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            num_heads, NQ, M, *split_f32(scale),
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **launch_options(), num_stages=stages, **consts,
        )
    return out, lse, row_max, row_sum


def _backward_triton(grad_out, q, k, v, row_max, row_sum, grad_lse, num_heads: int, scale: float):
    B, NQ, C = q.shape
    M = k.shape[1]
    D = C // num_heads
    acc_t = acc_dtype(q.dtype)
    dq = new_empty(q.shape, q.dtype, q.device)
    dk = new_empty(k.shape, k.dtype, k.device)
    dv = new_empty(v.shape, v.dtype, v.device)
    delta = new_empty((B, num_heads, NQ), acc_t, q.device)
    row_max, row_sum = row_max.contiguous(), row_sum.contiguous()
    has_dlse = grad_lse is not None
    if has_dlse:
        grad_lse = grad_lse.contiguous()
    consts = _kernel_consts(q.dtype, D, needs_int64(q, k, v, grad_out, dq, dk, dv))
    bm, bn, warps, stages = _backward_config(q.dtype, consts["BLOCK_D"])
    with device_guard(q):
        # dQ first: it computes delta (per row), which the dK/dV kernel reads
        _lra_bwd_dq_kernel[(cdiv(NQ, bm), B * num_heads)](
            q, k, v, grad_out, row_max, row_sum, grad_lse if has_dlse else delta, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
            num_heads, NQ, M, *split_f32(scale),
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **launch_options(), num_stages=stages, HAS_DLSE=has_dlse,
            **consts,
        )
        _lra_bwd_dkdv_kernel[(cdiv(M, bn), B * num_heads)](
            q, k, v, grad_out, row_max, row_sum, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
            num_heads, NQ, M, *split_f32(scale),
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, **launch_options(), num_stages=stages, **consts,
        )
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def lowres_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                               scale: Optional[float] = None) -> torch.Tensor:
    """The reference math: multi-head softmax attention, q (B, Nq, C), k/v (B, M, C) -> (B, Nq, C).

    Channel ``c`` belongs to head ``c // (C // num_heads)``; scale defaults to head_dim ** -0.5.
    """
    B, Nq, C = q.shape
    M = k.shape[1]
    d = C // num_heads
    if scale is None:
        scale = d ** -0.5
    qh = q.reshape(B, Nq, num_heads, d).transpose(1, 2)
    kh = k.reshape(B, M, num_heads, d).transpose(1, 2)
    vh = v.reshape(B, M, num_heads, d).transpose(1, 2)
    rows = max(1, REFERENCE_MAX_SCORES // max(1, B * num_heads * M))
    if rows >= Nq:
        return _attend(qh, kh, vh, scale).transpose(1, 2).reshape(B, Nq, C)
    # a score matrix past REFERENCE_MAX_SCORES (an extreme aspect ratio: ~20k x 19k tokens in the LRHead
    # of a 2000x100 image): blocks of query rows, each its own softmax (the same math row by row), and
    # under autograd each block recomputed in the backward instead of keeping its probabilities
    from torch.utils.checkpoint import checkpoint
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = [checkpoint(_attend, qh[:, :, i:i + rows], kh, vh, scale, use_reentrant=False) if grad
            else _attend(qh[:, :, i:i + rows], kh, vh, scale) for i in range(0, Nq, rows)]
    return torch.cat(outs, 2).transpose(1, 2).reshape(B, Nq, C)


#: The reference attention materialises at most this many scores (B * heads * rows * M) at once:
#: 2**26 (256 MiB in float32); beyond it, query rows are processed in blocks
REFERENCE_MAX_SCORES = 1 << 26


def _attend(qh, kh, vh, scale):
    return ((qh @ kh.transpose(-2, -1)) * scale).softmax(dim=-1) @ vh


def _split_heads(t, num_heads):
    B, N, C = t.shape
    return t.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)  # (B, H, N, d)


def _merge_heads(t):
    B, H, N, d = t.shape
    return t.transpose(1, 2).reshape(B, N, H * d)


def _forward_reference(q, k, v, num_heads: int, scale: float):
    out = lowres_attention_reference(q, k, v, num_heads, scale)
    acc = acc_dtype(q.dtype)
    s = (_split_heads(q, num_heads).to(acc) @ _split_heads(k, num_heads).to(acc).transpose(-2, -1)) * scale
    row_max, row_sum, lse = row_statistics(s)
    return out.contiguous(), lse, row_max, row_sum


def _backward_reference(grad_out, q, k, v, row_max, row_sum, grad_lse, num_heads: int, scale: float):
    acc = acc_dtype(q.dtype)
    qh, kh, vh = (_split_heads(t, num_heads).to(acc) for t in (q, k, v))
    doh = _split_heads(grad_out, num_heads).to(acc)
    s = (qh @ kh.transpose(-2, -1)) * scale
    p = torch.exp(s - row_max.to(acc).unsqueeze(-1)) / row_sum.to(acc).unsqueeze(-1)
    dp = doh @ vh.transpose(-2, -1)
    delta = (p * dp).sum(-1, keepdim=True)          # as the kernels: exact in saturated rows
    if grad_lse is not None:
        delta = delta - grad_lse.to(acc).unsqueeze(-1)
    dv = p.transpose(-2, -1) @ doh
    ds = p * (dp - delta)
    dq = (ds @ kh) * scale
    dk = (ds.transpose(-2, -1) @ qh) * scale
    return (_merge_heads(dq).to(q.dtype).contiguous(), _merge_heads(dk).to(k.dtype).contiguous(),
            _merge_heads(dv).to(v.dtype).contiguous())


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lrformer::lowres_attention", mutates_args=())
def _lowres_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_kernel(q):
        return _forward_triton(q, k, v, num_heads, scale)
    return _forward_reference(q, k, v, num_heads, scale)


@_lowres_attention_op.register_fake
def _(q, k, v, num_heads, scale):
    B, NQ, C = q.shape
    out = q.new_empty((B, NQ, C))
    stats = [q.new_empty((B, num_heads, NQ), dtype=acc_dtype(q.dtype)) for _ in range(3)]
    return (out, *stats)


@torch.library.custom_op("lrformer::lowres_attention_backward", mutates_args=())
def _lowres_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                  v: torch.Tensor, row_max: torch.Tensor,
                                  row_sum: torch.Tensor, grad_lse: Optional[torch.Tensor], num_heads: int,
                                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_kernel(q):
        return _backward_triton(grad_out, q, k, v, row_max, row_sum, grad_lse, num_heads, scale)
    return _backward_reference(grad_out, q, k, v, row_max, row_sum, grad_lse, num_heads, scale)


@_lowres_attention_backward_op.register_fake
def _(grad_out, q, k, v, row_max, row_sum, grad_lse, num_heads, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, num_heads, scale = inputs
    _, _, row_max, row_sum = output
    ctx.save_for_backward(q, k, v, row_max, row_sum)      # not the output: delta comes from p and dP
    ctx.mark_non_differentiable(row_max, row_sum)
    ctx.set_materialize_grads(False)   # an unused lse gets no zero-filled gradient (nothing to read)
    ctx.num_heads = num_heads
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse, _grad_row_max, _grad_row_sum):
    q, k, v, row_max, row_sum = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(q)
    dq, dk, dv = _lowres_attention_backward_op(grad_out, q, k, v, row_max, row_sum, grad_lse,
                                               ctx.num_heads, ctx.scale)
    return dq, dk, dv, None, None


_lowres_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def _validate(q, k, v, num_heads, scale) -> float:
    check_tensor(q, "q", ndim=3)
    check_tensor(k, "k", ndim=3, device=q.device, dtype=q.dtype)
    check_tensor(v, "v", ndim=3, device=q.device, dtype=q.dtype)
    check_int("num_heads", num_heads)
    B, NQ, C = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != C or v.shape[2] != C:
        raise ValueError(f"channel mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         f"(k and v must have q's C={C} channels)")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of tokens, got k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    return attention_scale(C, num_heads, scale, MAX_HEAD_DIM)


def lowres_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Multi-head softmax attention: q (B, Nq, C), k/v (B, M, C) -> (B, Nq, C) in q's dtype.

    Channel ``c`` belongs to head ``c // (C // num_heads)``; ``scale`` defaults to
    ``head_dim ** -0.5``.  Inputs may be strided views (e.g. the two halves of one kv tensor).
    Differentiable in q, k and v.
    """
    scale = _validate(q, k, v, num_heads, scale)
    out = _lowres_attention_op(q, k, v, num_heads, scale)[0]
    return out
