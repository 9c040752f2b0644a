"""Shared plumbing for the fused ops: input checks, the kernel-or-reference decision and the launch
helpers every op file uses (accumulation dtype, tile rounding, SM count, device guard)."""
from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Iterable, Optional

import torch

try:  # triton is optional on CPU-only machines
    import triton  # noqa: F401
    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    HAS_TRITON = False

if HAS_TRITON:
    import triton.language as tl

    @triton.jit
    def bilinear_taps(d, n_in, n_out, ACC: tl.constexpr):
        """Source taps of output index ``d`` of an ``align_corners=False`` bilinear resize n_in -> n_out,
        exactly in integers: ``src = max(((2d+1) n_in - n_out) / (2 n_out), 0)`` -> (i0, i1, lambda)."""
        nd = tl.maximum((2 * d + 1) * n_in - n_out, 0)
        i0 = nd // (2 * n_out)
        lam = (nd - i0 * (2 * n_out)).to(ACC) / (2 * n_out)
        return i0, tl.minimum(i0 + 1, n_in - 1), lam

    @triton.jit
    def bilinear_lerp(v00, v01, v10, v11, ly, lx, same_h, same_w):
        """The bilinear blend of four taps (row-major: v<row><col>).  Along a side whose size does not
        change the resize is the identity (F.interpolate's single tap): select instead of weighting by 0,
        so a NaN/inf stays in its own pixel as in the reference (elsewhere zero-weight taps are
        multiplied, as F.interpolate does)."""
        r0 = tl.where(same_w, v00, (1.0 - lx) * v00 + lx * v01)
        r1 = tl.where(same_w, v10, (1.0 - lx) * v10 + lx * v11)
        return tl.where(same_h, r0, (1.0 - ly) * r0 + ly * r1)

    @triton.jit
    def bilinear_weight(src, i0, i1, lam):
        """The weight with which source index ``src`` enters outputs whose taps are (i0, i1, lambda)."""
        return tl.where(i0 == src, 1.0 - lam, 0.0) + tl.where(i1 == src, lam, 0.0)

    @triton.jit
    def bilinear_gather_columns(acc, red, x0, x1, lx, colmask, j0, BLOCK_J: tl.constexpr):
        """The horizontal half of a bilinear backward gather: add to row ``jo`` of ``acc`` (BLOCK_J source
        columns ``j0 + jo`` x channels) the output columns of ``red`` (columns x channels) weighted by how
        much each takes from that source column (taps x0, x1, lx; columns outside ``colmask`` add nothing)."""
        for jo in tl.static_range(BLOCK_J):
            wx = tl.where(colmask, bilinear_weight(j0 + jo, x0, x1, lx), 0.0)
            col = tl.sum(wx[:, None] * red, axis=0)
            acc = tl.where((tl.arange(0, BLOCK_J) == jo)[:, None], acc + col[None, :], acc)
        return acc

    @triton.jit
    def layer_norm_statistics_rows(row, rmask, C, sc, eps, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
                                   BLOCK_C: tl.constexpr):
        """Per-row LayerNorm statistics (mean, 1/std) over the C channels of rows ``row`` (``[BLOCK_R, 1]``
        pointers, channel stride ``sc``; rows off ``rmask`` give finite garbage): two passes, the second from
        L1/L2, its deviations from the mean exact (no E[x^2] - mean^2 cancellation)."""
        s1 = tl.zeros([BLOCK_R], ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = rmask[:, None] & (c < C)[None, :]
            s1 += tl.sum(tl.load(row + c[None, :] * sc, mask=m, other=0.0).to(ACC), axis=1)
        mean = s1 / C
        s2 = tl.zeros([BLOCK_R], ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = rmask[:, None] & (c < C)[None, :]
            d = tl.where(m, tl.load(row + c[None, :] * sc, mask=m, other=0.0).to(ACC) - mean[:, None], 0.0)
            s2 += tl.sum(d * d, axis=1)
        return mean, 1.0 / tl.sqrt(s2 / C + eps)

    @triton.jit
    def layer_norm_backward_rows(dxn, xhat, rstd, gamma, C):
        """dx of a LayerNorm over whole rows held in one tile ``[rows, BLOCK_C >= C]``: ``dxn`` = d(normalised x),
        ``xhat = (x - mean) * rstd`` (0 past C and off the rows), ``gamma`` its weight (0 past C)."""
        d = dxn * gamma[None, :]
        c1 = tl.sum(d * xhat, axis=1) / C
        c2 = tl.sum(d, axis=1) / C
        return (d - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]

    @triton.jit
    def bilinear_support(first, last, n_in, n_out):
        """Output indices ``[lo, hi)`` of a bilinear resize n_in -> n_out whose i0 or i1 tap lies in the
        source range ``[first, last]`` (closed form: the first output with i0 >= k is
        ``ceil((2k+1) n_out / n_in) // 2`` for k >= 1, else 0)."""
        lo = tl.where(first >= 2, ((2 * first - 1) * n_out + n_in - 1) // n_in // 2, 0)
        lo = tl.minimum(lo, n_out)
        hi = tl.minimum(((2 * last + 3) * n_out + n_in - 1) // n_in // 2, n_out)
        return lo, hi


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: Under the interpreter the ops use much bigger tiles (its cost is per program and per op, not per
#: element).  The tests switch this off to run the exact GPU tile configurations on the CPU.
INTERPRETER_BIG_TILES = True


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def big_interpreter_tiles() -> bool:
    """Whether to pick the interpreter's big tiles (interpreting and :data:`INTERPRETER_BIG_TILES`)."""
    return INTERPRETER_BIG_TILES and interpreting()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    """:func:`acc_dtype` as a Triton dtype (a kernel's ``ACC`` constexpr)."""
    import triton.language as tl
    return tl.float64 if dtype == torch.float64 else tl.float32


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints (plain Python: the tile configs run without Triton too)."""
    return -(-int(a) // int(b))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


#: SM count assumed for non-CUDA devices (the ahead-of-time compile check sets an H100's 132 to record the
#: launches a GPU would get; 1 otherwise)
DEFAULT_SMS = 1


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (:data:`DEFAULT_SMS` for any other device)."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


#: a grid whose programs each write fp32 partial sums (weight/bias gradients reduced over a map, summed afterwards
#: in a fixed order) keeps their traffic (written and read) within this share of the bytes its op moves over the
#: map: small maps with wide channels (the last stages, the pooled maps) get fewer, longer programs
PARTIAL_TRAFFIC_SHARE = 0.125


def partial_programs(wanted: int, partial_bytes: int, map_bytes: int) -> int:
    """Programs of a partial-sum grid: ``wanted`` (occupancy), but no more than keep their partials
    (``partial_bytes`` each, written and read once) within :data:`PARTIAL_TRAFFIC_SHARE` of ``map_bytes``; >= 1."""
    return max(1, min(int(wanted), int(PARTIAL_TRAFFIC_SHARE * map_bytes) // (2 * max(1, int(partial_bytes)))))


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device current for a launch (a no-op context off CUDA)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def split_f32(x: float):
    """``x`` as an fp32 pair ``hi + lo``: Triton passes Python floats to kernels as fp32, which
    would cost fp64 inputs ~1e-8 relative error (e.g. in a softmax scale); kernels add the pair."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    lo = float(torch.tensor(x - hi, dtype=torch.float32))
    return hi, lo


#: register cap passed to ptxas for every launch: without one, ptxas aims at an occupancy level of its
#: choosing (64..168 registers) and spills a few bytes in many configurations; the compile gate
#: (tests/test_gpu_compile.py) checks every configuration the dispatch picks with it.
MAXNREG = 255


@functools.lru_cache(maxsize=None)
def launch_options() -> dict:
    """Launch options shared by every kernel: ``maxnreg`` where this Triton knows it."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        return {"maxnreg": MAXNREG} if "maxnreg" in CUDAOptions.__dataclass_fields__ else {}
    except Exception:  # pragma: no cover - no NVIDIA backend
        return {}


def use_kernel(*tensors: torch.Tensor) -> bool:
    """Run the Triton kernel (True) or the PyTorch reference (False) for these inputs.

    CUDA tensors take the kernel (float64 too); CPU tensors take it only under the Triton
    interpreter, otherwise the reference path runs.
    """
    if not HAS_TRITON:
        return False
    t = tensors[0]
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and interpreting()


def check_tensor(t, name: str, ndim: Optional[int] = None, dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
    """Raise a clear TypeError/ValueError naming ``name`` if ``t`` is not what an op needs."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: {', '.join(str(d) for d in dtypes)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match the input's dtype {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the input is on {device}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")


def check_int(name: str, value, maximum: Optional[int] = None) -> None:
    """Raise a TypeError unless ``value`` is an int (not a bool), a ValueError unless it is positive
    (and at most ``maximum`` if given)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} is unsupported; the maximum is {maximum}")


def attention_scale(channels: int, num_heads: int, scale, max_head_dim: int) -> float:
    """Check that q's ``channels`` split into ``num_heads`` heads of at most ``max_head_dim`` channels and
    that ``scale`` is a finite float or None; returns the scale (default ``head_dim ** -0.5``)."""
    if channels % num_heads != 0:
        raise ValueError(f"channels C={channels} of q are not divisible by num_heads={num_heads}")
    head_dim = channels // num_heads
    if head_dim > max_head_dim:
        raise ValueError(f"head dim {head_dim} (C={channels} / num_heads={num_heads}) is unsupported; "
                         f"the maximum is {max_head_dim}")
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def bilinear_index_int64(H: int, W: int, h: int, w: int) -> bool:
    """Whether the exact source-coordinate products of a bilinear resize between an (h, w) and an (H, W)
    map, ``(2 * out + 1) * in`` (forward) or ``(2 * i + 3) * out + in`` (the backward's ranges), can pass
    int32: products of the two maps' sides, not tensor sizes."""
    return max((2 * H + 1) * h, (2 * h + 3) * H + h, (2 * W + 1) * w, (2 * w + 3) * W + w) >= 2 ** 31 - 1


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any tensor spans more elements than an int32 offset can address."""
    for t in tensors:
        span = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
        if span >= 2 ** 31 - 1:
            return True
    return False


#: Set by the tests: fused ops then allocate their outputs filled with NaN, so that an element a
#: kernel fails to write shows up as NaN instead of passing by luck.
POISON_OUTPUTS = False


def new_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation for the fused ops (NaN-filled while ``POISON_OUTPUTS`` is set)."""
    if POISON_OUTPUTS:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def layer_norm_statistics(xa: torch.Tensor, eps: float):
    """Per-row LayerNorm statistics (mean, 1/std) over the last dim of ``xa`` (in the math dtype)."""
    var, mean = torch.var_mean(xa, dim=-1, unbiased=False)
    return mean, torch.rsqrt(var + eps)


def layer_norm_from_statistics(xa: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor) -> torch.Tensor:
    """The LayerNorm of ``xa`` (in the math dtype) from its row statistics (mean, 1/std)."""
    return (xa - mean[..., None]) * rstd[..., None] * weight.to(xa.dtype) + bias.to(xa.dtype)


def layer_norm_backward_reference(dxn: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                  weight: torch.Tensor):
    """(dx in x's dtype, d_weight, d_bias in the math dtype) of a LayerNorm over x's last dim from the gradient of
    its output ``dxn`` and the forward's row statistics, by ATen's LayerNorm backward."""
    C, acc = x.shape[-1], acc_dtype(x.dtype)
    # CUDA (and meta: the traffic model) pairs half maps with fp32 statistics; the CPU wants one dtype
    ln = x.dtype if x.device.type in ("cuda", "meta") else acc
    w = weight.to(ln)                   # (the bias argument's values are not read: it only needs a device)
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(dxn.to(ln), x.to(ln), [C], mean.unsqueeze(-1),
                                                           rstd.unsqueeze(-1), w, w, [True, True, True])
    return dx.to(x.dtype), dw.to(acc), db.to(acc)


def row_statistics(s: torch.Tensor):
    """Softmax row statistics of logits ``s`` over the last dim, as the attention ops store them:
    (row_max, row_sum = sum exp(s - row_max), lse = row_max + log(row_sum))."""
    row_max = s.amax(-1)
    row_sum = torch.exp(s - row_max.unsqueeze(-1)).sum(-1)
    return row_max.contiguous(), row_sum.contiguous(), (row_max + torch.log(row_sum)).contiguous()
