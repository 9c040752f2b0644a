"""Fused multi-scale deformable attention (Deformable DETR's sampling core), forward and backward.

``ms_deform_attn(value, shapes, locations, weights)``: value (B, S, M, D) per-head values of all
levels flattened row-major and concatenated (``S = sum(H_l * W_l)`` in the order of ``shapes``),
locations (B, Nq, M, L, P, 2) in ``[0, 1]`` as ``(x, y)``, weights (B, Nq, M, L, P) -> (B, Nq, M * D):
``sum_{l,p} weights * bilinear(value_l, location)`` per head, with ``F.grid_sample``'s semantics
(``align_corners=False``: pixel ``(i, j)`` is centred at ``((j + 0.5) / W, (i + 0.5) / H)``; samples
outside a map read zeros).  :func:`ms_deform_attn_reference` is the ground truth (``grid_sample`` per
level, as the released decoders compute without mmcv's CUDA op).

Design
------
* forward, ONE launch for all levels: grid ``(cdiv(Nq, BLOCK_Q), B * M)``; a program owns a block of
  queries of one (batch, head) and the whole head dim (``BLOCK_D = next_pow2(D)``, masked), loops over
  the levels (their (H, W, start) from a small int32 table) and points, computes the 4 bilinear taps'
  weights exactly as ``grid_sample`` does on the CPU (``ix = fma(2x - 1 + 1, W / 2, -0.5)``, ``floor``), gathers the
  valid taps' value rows (contiguous runs of D channels) and accumulates ``w * tap * value`` in fp32
  (fp64 for fp64 inputs).  Nothing of size (Nq, M, L, P, D) is materialised (the reference stores
  every sampled value and its gradient).
* backward, ONE launch: the same program recomputes the taps, loads ``dO`` once, and gives
  ``dweights = sum_taps tap * <dO, v_tap>``, ``dlocations = w * sum_taps dtap/dix <dO, v_tap> * W``
  (resp. ``H`` for y), and the value gradient ``w * tap * dO`` for each valid tap:

  - default: ``tl.atomic_add`` into an fp32 (fp64) buffer, cast at the end (float atomics: bitwise
    non-deterministic summation order);
  - deterministic mode (``torch.are_deterministic_algorithms_enabled()``): the kernel writes every
    tap's contribution and its destination row instead, and ``index_put_(accumulate=True)`` — which
    PyTorch makes deterministic in that mode — sums them.  Costs (B, Nq, M, L, P, 4, D) of memory.

* any strides for value/locations/weights (nothing is copied); int64 offsets when a tensor spans
  2**31 elements; no ``tl.dot`` (so no bf16-dot caveat of the interpreter).  Atomics' ordering is not
  modelled by the interpreter: their correctness rests on there being no other write to the buffer
  during the launch and on the fp32 sum being order-independent up to rounding.

Packaging: ``torch.library`` custom ops ``lrformer::ms_deform_attn`` and
``lrformer::ms_deform_attn_backward`` with fake implementations and autograd (one opaque node under
``torch.compile(fullgraph=True)`` / ``torch.export``).  Off-GPU without ``TRITON_INTERPRET=1`` the ops
run the reference math.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._common import (cdiv, FLOAT_DTYPES, HAS_TRITON, acc_dtype, big_interpreter_tiles, check_tensor, device_guard,
                      launch_options, needs_int64, new_empty, next_pow2, tl_acc, use_kernel)

if HAS_TRITON:
    import triton
    import triton.language as tl

MAX_HEAD_DIM = 256

__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "MAX_HEAD_DIM"]


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _msda_program(NQ, M, D, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, INT64: tl.constexpr):
        """This program's batch b, head m, block of queries q and head-dim lanes d, with their masks."""
        pid_q = tl.program_id(0)
        pid_bm = tl.program_id(1)
        b = pid_bm // M
        m = pid_bm % M
        q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        if INT64:
            b = b.to(tl.int64)
            q = q.to(tl.int64)
        d = tl.arange(0, BLOCK_D)
        return b, m, q, d, q < NQ, d < D

    @triton.jit
    def _msda_point(LOC, WGT, loc_row, wgt_row, lvl, pt, s_ll, s_lp, s_lc, s_wl, s_wp, Hl, Wl, qmask,
                    ACC: tl.constexpr):
        """One (level, point) for a block of queries: grid_sample's integer corner (x0, y0) and fractional
        parts of the location, and the point's attention weight."""
        loc_off = loc_row + lvl * s_ll + pt * s_lp
        lx = tl.load(LOC + loc_off, mask=qmask, other=0.0).to(ACC)
        ly = tl.load(LOC + loc_off + s_lc, mask=qmask, other=0.0).to(ACC)
        # exactly grid_sample's CPU arithmetic (the reference): grid g = 2 loc - 1, then one fused
        # multiply-add ix = (g + 1) * (W / 2) - 0.5; at a pixel centre of a side that is not a power of
        # two any other order rounds ix to the other side of an integer (another corner: another gradient)
        ix = tl.fma(lx * 2.0 - 1.0 + 1.0, Wl.to(ACC) * 0.5, -0.5)
        iy = tl.fma(ly * 2.0 - 1.0 + 1.0, Hl.to(ACC) * 0.5, -0.5)
        fx = tl.floor(ix)
        fy = tl.floor(iy)
        w = tl.load(WGT + wgt_row + lvl * s_wl + pt * s_wp, mask=qmask, other=0.0).to(ACC)
        return fx.to(tl.int32), fy.to(tl.int32), ix - fx, iy - fy, w

    @triton.jit
    def _msda_corner(c: tl.constexpr, x0, y0, fx, fy, Hl, Wl, start, qmask, INT64: tl.constexpr):
        """Corner ``c`` of the taps ((x0, y0), (x0+1, y0), (x0, y0+1), (x0+1, y0+1)): its bilinear
        factors along x and y, whether it lies on the map, and its row in the flattened levels."""
        cx: tl.constexpr = c % 2
        cy: tl.constexpr = c // 2
        xi = x0 + cx
        yi = y0 + cy
        tx = cx * fx + (1 - cx) * (1.0 - fx)
        ty = cy * fy + (1 - cy) * (1.0 - fy)
        ok = qmask & (xi >= 0) & (xi < Wl) & (yi >= 0) & (yi < Hl)
        row = start + yi * Wl + xi
        if INT64:
            row = row.to(tl.int64)
        return tx, ty, ok, row

    @triton.jit
    def _msda_fwd_kernel(
        V, TABLE, LOC, WGT, OUT,
        s_vb, s_vs, s_vm, s_vd,
        s_lb, s_lq, s_lm, s_ll, s_lp, s_lc,
        s_wb, s_wq, s_wm, s_wl, s_wp,
        s_ob, s_oq, s_oc,
        NQ, M, L, P, D,
        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
    ):
        b, m, q, d, qmask, dmask = _msda_program(NQ, M, D, BLOCK_Q, BLOCK_D, INT64)
        v_base = V + b * s_vb + m * s_vm + d[None, :] * s_vd
        loc_row = b * s_lb + q * s_lq + m * s_lm
        wgt_row = b * s_wb + q * s_wq + m * s_wm
        acc = tl.zeros([BLOCK_Q, BLOCK_D], ACC)
        for lvl in range(L):
            Hl = tl.load(TABLE + 3 * lvl)
            Wl = tl.load(TABLE + 3 * lvl + 1)
            start = tl.load(TABLE + 3 * lvl + 2)
            for pt in range(P):
                x0, y0, fx, fy, w = _msda_point(LOC, WGT, loc_row, wgt_row, lvl, pt, s_ll, s_lp, s_lc, s_wl, s_wp,
                                                Hl, Wl, qmask, ACC)
                for c in tl.static_range(4):
                    tx, ty, ok, row = _msda_corner(c, x0, y0, fx, fy, Hl, Wl, start, qmask, INT64)
                    v = tl.load(v_base + (row * s_vs)[:, None], mask=ok[:, None] & dmask[None, :],
                                other=0.0).to(ACC)
                    acc += (w * (tx * ty))[:, None] * v
        tl.store(OUT + b * s_ob + q[:, None] * s_oq + (m * D + d)[None, :] * s_oc,
                 acc.to(OUT.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])

    @triton.jit
    def _msda_bwd_kernel(
        V, TABLE, LOC, WGT, DO, DV, DLOC, DW, CONTRIB, ROWS,
        s_vb, s_vs, s_vm, s_vd,
        s_lb, s_lq, s_lm, s_ll, s_lp, s_lc,
        s_wb, s_wq, s_wm, s_wl, s_wp,
        s_db, s_dq, s_dc,
        NQ, M, L, P, D, S,
        BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, INT64: tl.constexpr,
        ATOMIC: tl.constexpr,
    ):
        # DV: (B, S, M, D) contiguous accumulation buffer (ATOMIC); DLOC/DW: contiguous like LOC/WGT
        # shapes; CONTRIB (B, NQ, M, L, P, 4, D) and ROWS (same without D) in deterministic mode.
        b, m, q, d, qmask, dmask = _msda_program(NQ, M, D, BLOCK_Q, BLOCK_D, INT64)
        qd = qmask[:, None] & dmask[None, :]
        g = tl.load(DO + b * s_db + q[:, None] * s_dq + (m * D + d)[None, :] * s_dc, mask=qd, other=0.0).to(ACC)
        v_base = V + b * s_vb + m * s_vm + d[None, :] * s_vd
        loc_row = b * s_lb + q * s_lq + m * s_lm
        wgt_row = b * s_wb + q * s_wq + m * s_wm
        for lvl in range(L):
            Hl = tl.load(TABLE + 3 * lvl)
            Wl = tl.load(TABLE + 3 * lvl + 1)
            start = tl.load(TABLE + 3 * lvl + 2)
            for pt in range(P):
                x0, y0, fx, fy, w = _msda_point(LOC, WGT, loc_row, wgt_row, lvl, pt, s_ll, s_lp, s_lc, s_wl, s_wp,
                                                Hl, Wl, qmask, ACC)
                dw = tl.zeros([BLOCK_Q], ACC)
                dix = tl.zeros([BLOCK_Q], ACC)
                diy = tl.zeros([BLOCK_Q], ACC)
                # contiguous (B, NQ, M, L, P) index of this (query, head, level, point)
                flat = (((b * NQ + q) * M + m) * L + lvl) * P + pt
                for c in tl.static_range(4):
                    tx, ty, ok, row = _msda_corner(c, x0, y0, fx, fy, Hl, Wl, start, qmask, INT64)
                    okd = ok[:, None] & dmask[None, :]
                    v = tl.load(v_base + (row * s_vs)[:, None], mask=okd, other=0.0).to(ACC)
                    gv = tl.sum(g * v, 1)                                    # <dO, v_tap>
                    dw += tx * ty * gv
                    sx = 2.0 * (c % 2) - 1.0                # d tx / d ix
                    sy = 2.0 * (c // 2) - 1.0
                    dix += sx * ty * gv
                    diy += sy * tx * gv
                    contrib = (w * tx * ty)[:, None] * g
                    if ATOMIC:
                        tl.atomic_add(DV + ((b * S + row) * M + m)[:, None] * D + d[None, :], contrib,
                                      mask=okd, sem="relaxed")
                    else:
                        tl.store(CONTRIB + (flat * 4 + c)[:, None] * D + d[None, :], contrib, mask=qd)
                        dest = tl.where(ok, (b * S + row) * M + m, -1)
                        tl.store(ROWS + flat * 4 + c, dest.to(tl.int64), mask=qmask)
                tl.store(DW + flat, dw, mask=qmask)
                # ix = x * W - 0.5 (through grid_sample's unnormalisation): d ix / d x = W
                tl.store(DLOC + flat * 2, w * dix * Wl, mask=qmask)
                tl.store(DLOC + flat * 2 + 1, w * diy * Hl, mask=qmask)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
def _forward_config(head_dim: int):
    """(BLOCK_Q, BLOCK_D, num_warps): the whole head dim per program (row loads of D contiguous
    channels), 4 warps; 1024-element tiles (512 from a head dim of 128 on).  Chosen from ptxas -v on
    sm_90 and sm_80 (the compile gate, tests/test_gpu_compile.py): 2048-element tiles reach 254 registers and
    spill on sm_80, and 8 warps cap the kernel at 128 registers and spill.  The interpreter takes big
    blocks (its cost is per program)."""
    bd = next_pow2(max(head_dim, 2))
    if big_interpreter_tiles():
        return 128, bd, 1
    return max(2, (1024 if bd <= 64 else 512) // bd), bd, 4


def _backward_config(head_dim: int):
    """As the forward with half the tile (dO, the 4 taps' values and their products are live:
    1024-element tiles reach 255 registers and spill on sm_90)."""
    bd = next_pow2(max(head_dim, 2))
    if big_interpreter_tiles():
        return 128, bd, 1
    return max(2, (512 if bd <= 64 else 256) // bd), bd, 4


_TABLES = {}


def _level_table(shapes: Sequence[Tuple[int, int]], device: torch.device) -> torch.Tensor:
    """(L * 3,) int32 [H, W, start] per level on ``device`` (cached: one copy per shapes and device)."""
    key = (tuple(shapes), str(device))
    t = _TABLES.get(key)
    if t is None:
        rows, start = [], 0
        for h, w in shapes:
            rows += [h, w, start]
            start += h * w
        t = _TABLES[key] = torch.tensor(rows, dtype=torch.int32, device=device)
    return t


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------
def _forward_triton(value, shapes, locations, weights):
    B, S, M, D = value.shape
    _, NQ, _, L, P, _ = locations.shape
    out = new_empty((B, NQ, M * D), value.dtype, value.device)
    block_q, block_d, warps = _forward_config(D)
    table = _level_table(shapes, value.device)
    with device_guard(value):
        _msda_fwd_kernel[(cdiv(NQ, block_q), B * M)](
            value, table, locations, weights, out,
            *value.stride(), *locations.stride(), *weights.stride(), *out.stride(),
            NQ, M, L, P, D,
            BLOCK_Q=block_q, BLOCK_D=block_d, ACC=tl_acc(value.dtype),
            INT64=needs_int64(value, locations, weights, out), num_warps=warps, **launch_options(),
        )
    return out


def _backward_triton(grad_out, value, shapes, locations, weights, deterministic: bool):
    B, S, M, D = value.shape
    _, NQ, _, L, P, _ = locations.shape
    acc = acc_dtype(value.dtype)
    dloc = new_empty(locations.shape, acc, value.device)
    dw = new_empty(weights.shape, acc, value.device)
    if deterministic:
        dv = None
        contrib = new_empty((B, NQ, M, L, P, 4, D), acc, value.device)
        rows = torch.empty((B, NQ, M, L, P, 4), dtype=torch.int64, device=value.device)
    else:
        dv = torch.zeros((B, S, M, D), dtype=acc, device=value.device)
        contrib = rows = dloc  # unused
    block_q, block_d, warps = _backward_config(D)
    table = _level_table(shapes, value.device)
    int64 = needs_int64(value, locations, weights, grad_out, dloc) or B * NQ * M * L * P * 4 * D >= 2 ** 31 - 1
    with device_guard(value):
        _msda_bwd_kernel[(cdiv(NQ, block_q), B * M)](
            value, table, locations, weights, grad_out, dv if dv is not None else dloc, dloc, dw, contrib, rows,
            *value.stride(), *locations.stride(), *weights.stride(), *grad_out.stride(),
            NQ, M, L, P, D, S,
            BLOCK_Q=block_q, BLOCK_D=block_d, ACC=tl_acc(value.dtype), INT64=int64,
            ATOMIC=not deterministic, num_warps=warps, **launch_options(),
        )
    if deterministic:
        flat = torch.zeros((B * S * M + 1, D), dtype=acc, device=value.device)
        r = rows.reshape(-1)
        flat.index_put_((torch.where(r < 0, B * S * M, r),), contrib.reshape(-1, D), accumulate=True)
        dv = flat[:-1].reshape(B, S, M, D)
    return dv.to(value.dtype), dloc.to(locations.dtype), dw.to(weights.dtype)


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def ms_deform_attn_reference(value: torch.Tensor, shapes: Sequence[Tuple[int, int]], locations: torch.Tensor,
                             weights: torch.Tensor) -> torch.Tensor:
    """The reference math (``grid_sample`` per level, bilinear, zero padding, align_corners=False).

    value (B, S, M, D); locations (B, Nq, M, L, P, 2) in ``[0, 1]``, ``(x, y)``; weights (B, Nq, M, L, P)
    (softmax over ``L * P`` done by the caller) -> (B, Nq, M * D).
    """
    B, S, M, D = value.shape
    _, Nq, _, L, P, _ = locations.shape
    if sum(h * w for h, w in shapes) != S:
        raise ValueError(f"value has {S} tokens but shapes {list(shapes)} sum to {sum(h * w for h, w in shapes)}")
    grids = 2 * locations - 1                                               # grid_sample's [-1, 1]
    sampled, start = [], 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(B * M, D, h, w)
        start += h * w
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * M, Nq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    sampled = torch.stack(sampled, dim=-2).flatten(-2)                      # (B*M, D, Nq, L*P)
    w = weights.transpose(1, 2).reshape(B * M, 1, Nq, L * P)
    out = (sampled * w).sum(-1)                                             # (B*M, D, Nq)
    return out.reshape(B, M * D, Nq).transpose(1, 2)


def _forward_reference(value, shapes, locations, weights):
    acc = acc_dtype(value.dtype)
    out = ms_deform_attn_reference(value.to(acc), shapes, locations.to(acc), weights.to(acc))
    return out.to(value.dtype).contiguous()


def _backward_reference(grad_out, value, shapes, locations, weights):
    """Analytic backward of the reference in the accumulation dtype (autograd does not run inside a
    custom op): per level, ``aten.grid_sampler_2d_backward`` for the value and grid gradients."""
    acc = acc_dtype(value.dtype)
    v, loc, w, gout = (t.to(acc) for t in (value, locations, weights, grad_out))
    B, S, M, D = v.shape
    _, Nq, _, L, P, _ = loc.shape
    go = gout.reshape(B, Nq, M, D).permute(0, 2, 3, 1).reshape(B * M, D, Nq, 1)
    grids = 2 * loc - 1
    dv, dloc, dw, start = torch.zeros_like(v), torch.zeros_like(loc), torch.zeros_like(w), 0
    for lvl, (h, wd) in enumerate(shapes):
        vl = v[:, start:start + h * wd].permute(0, 2, 3, 1).reshape(B * M, D, h, wd)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(B * M, Nq, P, 2)
        wl = w[:, :, :, lvl].transpose(1, 2).reshape(B * M, 1, Nq, P)
        sampled = F.grid_sample(vl, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        dw[:, :, :, lvl] = (go * sampled).sum(1).reshape(B, M, Nq, P).transpose(1, 2)
        dvl, dg = torch.ops.aten.grid_sampler_2d_backward(go * wl, vl, g, 0, 0, False, [True, True])
        dv[:, start:start + h * wd] = dvl.reshape(B, M, D, h * wd).permute(0, 3, 1, 2)
        dloc[:, :, :, lvl] = 2 * dg.reshape(B, M, Nq, P, 2).transpose(1, 2)
        start += h * wd
    return dv.to(value.dtype), dloc.to(locations.dtype), dw.to(weights.dtype)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
def _pairs(shapes: List[int]) -> List[Tuple[int, int]]:
    return [(shapes[2 * i], shapes[2 * i + 1]) for i in range(len(shapes) // 2)]


@torch.library.custom_op("lrformer::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(value: torch.Tensor, shapes: List[int], locations: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
    if use_kernel(value):
        return _forward_triton(value, _pairs(shapes), locations, weights)
    return _forward_reference(value, _pairs(shapes), locations, weights)


@_ms_deform_attn_op.register_fake
def _(value, shapes, locations, weights):
    B, _, M, D = value.shape
    return value.new_empty((B, locations.shape[1], M * D))


@torch.library.custom_op("lrformer::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward_op(grad_out: torch.Tensor, value: torch.Tensor, shapes: List[int],
                                locations: torch.Tensor, weights: torch.Tensor
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_kernel(value):
        return _backward_triton(grad_out, value, _pairs(shapes), locations, weights,
                                deterministic=torch.are_deterministic_algorithms_enabled())
    return _backward_reference(grad_out, value, _pairs(shapes), locations, weights)


@_ms_deform_attn_backward_op.register_fake
def _(grad_out, value, shapes, locations, weights):
    return value.new_empty(value.shape), locations.new_empty(locations.shape), weights.new_empty(weights.shape)


def _setup_context(ctx, inputs, output):
    value, shapes, locations, weights = inputs
    ctx.save_for_backward(value, locations, weights)
    ctx.shapes = list(shapes)


def _backward(ctx, grad_out):
    value, locations, weights = ctx.saved_tensors
    dv, dloc, dw = _ms_deform_attn_backward_op(grad_out.contiguous(), value, ctx.shapes, locations, weights)
    return dv, None, dloc, dw


_ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------
def _check_shapes(shapes, S: int) -> List[int]:
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence) or len(shapes) == 0:
        raise TypeError(f"shapes must be a non-empty sequence of (H, W) pairs, got {shapes!r}")
    flat = []
    for i, s in enumerate(shapes):
        if isinstance(s, torch.Tensor):
            s = s.tolist()
        if isinstance(s, (str, bytes)) or not isinstance(s, Sequence) or len(s) != 2:
            raise ValueError(f"shapes[{i}] must be an (H, W) pair, got {s!r}")
        for v in s:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"shapes[{i}] must hold positive ints, got {tuple(s)}")
        flat += [int(s[0]), int(s[1])]
    total = sum(flat[2 * i] * flat[2 * i + 1] for i in range(len(flat) // 2))
    if total != S:
        raise ValueError(f"value has {S} tokens but shapes {[tuple(s) for s in shapes]} hold {total}")
    return flat


def ms_deform_attn(value: torch.Tensor, shapes: Sequence[Tuple[int, int]], locations: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention's sampling core -> (B, Nq, M * D) in value's dtype.

    value (B, S, M, D) (levels flattened row-major and concatenated as in ``shapes``); shapes: the
    levels' (H, W); locations (B, Nq, M, L, P, 2) in [0, 1] as (x, y); weights (B, Nq, M, L, P).  All
    three tensors float, same dtype and device, any strides.  Differentiable in value, locations and
    weights; the value gradient uses float atomics unless ``torch.use_deterministic_algorithms(True)``.
    """
    check_tensor(value, "value", ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor(locations, "locations", ndim=6, device=value.device, dtype=value.dtype)
    check_tensor(weights, "weights", ndim=5, device=value.device, dtype=value.dtype)
    B, S, M, D = value.shape
    flat = _check_shapes(shapes, S)
    L = len(flat) // 2
    if D > MAX_HEAD_DIM:
        raise ValueError(f"value's head dim D={D} is unsupported; the maximum is {MAX_HEAD_DIM}")
    if locations.shape[0] != B or locations.shape[2] != M or locations.shape[3] != L or locations.shape[5] != 2:
        raise ValueError(f"locations must be (B, Nq, M, L, P, 2) = ({B}, Nq, {M}, {L}, P, 2), "
                         f"got {tuple(locations.shape)}")
    if tuple(weights.shape) != tuple(locations.shape[:5]):
        raise ValueError(f"weights must be (B, Nq, M, L, P) = {tuple(locations.shape[:5])}, got {tuple(weights.shape)}")
    return _ms_deform_attn_op(value, flat, locations, weights)
