"""The LRSA math, written once.

Every function here is plain PyTorch and is the *reference* for a fused Triton op in
``lrformer_kernels``: the reference model calls these, and the kernel tests compare the
kernels against them (in float64).  Feature maps are tokens-last, ``(B, H, W, C)``; an NCHW
tensor can be passed as ``x.permute(0, 2, 3, 1)`` (a view, no copy).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

#: pyramid levels of the keys/values for a query pooled size of 16 (SPEC).
BASE_PYRAMID = (11, 8, 6, 4)


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


def adaptive_avg_pool(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` on a tokens-last map: (B, H, W, C) -> (B, h, w, C)."""
    return F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), tuple(size)).permute(0, 2, 3, 1)


def pyramid_pool(x: torch.Tensor, grids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Pool one map (B, H, W, C) to every grid in ``grids``; returns a list of (B, gh, gw, C)."""
    return [adaptive_avg_pool(x, g) for g in grids]


def lowres_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Multi-head softmax attention on token sets: q (B, Nq, C), k/v (B, M, C) -> (B, Nq, C).

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
    attn = (qh @ kh.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return (attn @ vh).transpose(1, 2).reshape(B, Nq, C)


def bilinear_resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
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


def upsample_residual(x: torch.Tensor, low: torch.Tensor, scale: Optional[torch.Tensor] = None,
                      keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + scale[c] * keep[b] * bilinear(low -> x's size)``, tokens-last.

    x (B, H, W, C) residual; low (B, h, w, C) low-resolution branch; scale (C,) layer scale or None;
    keep (B,) drop-path factor (0 or 1/keep_prob per sample) or None.
    """
    B, H, W, C = x.shape
    up = bilinear_resize(low, (H, W))
    s = branch_scale(scale, keep, B, C, up)
    return x + (up if s is None else up * s)


def dwconv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              gelu: bool = False, residual: bool = True) -> torch.Tensor:
    """Depthwise 3x3 convolution (padding 1) of a tokens-last map (B, H, W, C).

    ``g = gelu(x)`` if ``gelu`` else ``x``; returns ``g + conv(g)`` if ``residual`` else ``conv(g)``.
    weight (C, 1, 3, 3) as ``nn.Conv2d(C, C, 3, padding=1, groups=C)`` stores it.
    """
    g = F.gelu(x) if gelu else x
    y = F.conv2d(g.permute(0, 3, 1, 2), weight, bias, padding=1, groups=x.shape[-1])
    y = y.permute(0, 2, 3, 1)
    return g + y if residual else y


def drop_path_keep(batch: int, drop_prob: float, training: bool, device=None,
                   dtype=torch.float32, generator: Optional[torch.Generator] = None):
    """Per-sample drop-path factor: 0 for a dropped sample, 1/keep_prob for a kept one; None if off."""
    if drop_prob <= 0.0 or not training:
        return None
    keep_prob = 1.0 - drop_prob
    mask = torch.empty(batch, device=device, dtype=dtype).bernoulli_(keep_prob, generator=generator)
    return mask / keep_prob


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


def hrca_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, win_idx: torch.Tensor,
                   window: int, num_heads: int, scale: Optional[float] = None) -> torch.Tensor:
    """High-resolution cross-attention restricted to selected windows (FASeg's HRCA).

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


__all__ = [
    "BASE_PYRAMID", "pool_grid", "pyramid_sizes", "lrsa_grids", "adaptive_avg_pool", "pyramid_pool",
    "lowres_attention", "bilinear_resize", "branch_scale", "upsample_residual", "dwconv3x3",
    "drop_path_keep", "hrca_window_grid", "hrca_window_pixels", "hrca_attention",
]
