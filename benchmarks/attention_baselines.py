"""One attention layer of each kind, in plain PyTorch, for the FLOPs (and GPU latency) comparison.

All layers take and return a tokens-last map ``(B, H, W, C)`` and compute the attention product
with ``F.scaled_dot_product_attention``:

- ``lrsa``: LRFormer's low-resolution self-attention (the reference :class:`lrformer.models.layers.LRSA`
  with its stage's four depthwise convs on the pooled key/value maps, output upsampled to H x W);
- ``sra``: SegFormer / PVTv2 spatial-reduction attention (keys/values from a stride-R R x R conv
  + LayerNorm; R = 8, 4, 2, 1 in stages 1..4);
- ``global``: full global self-attention over all H*W tokens (ViT);
- ``window``: Swin window attention (7 x 7 windows, relative position bias; ``shift=True`` rolls
  the map by 3 and masks across window borders; same FLOPs either way).

Each layer has a closed-form FLOPs function (paper / fvcore convention: one multiply-add = 1 FLOP,
biases, softmax, masks and additions free; LayerNorm 5 per element, adaptive average pooling 1 per
input element per grid, bilinear upsampling 4 per output element). ``tests/test_benchmarks.py``
checks that the counter of :mod:`benchmarks.flops` agrees with every formula.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import lrformer_kernels as LF
from lrformer.models.layers import LRSA

from .registry import S_DIMS, S_HEADS, stage_map_size  # LRFormer-S per stage (the widths compared at)

KINDS = ("lrsa", "sra", "global", "window")
LABELS = {"lrsa": "LRSA (LRFormer)", "sra": "spatial-reduction (SegFormer)",
          "global": "global attention", "window": "window 7x7 (Swin)"}

#: SegFormer's reduction ratios per stage.
SR_RATIOS = (8, 4, 2, 1)
WINDOW = 7


def _heads_split(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C // heads)."""
    B, N, C = t.shape
    return t.reshape(B, N, heads, C // heads).transpose(1, 2)


def _heads_merge(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads * d)."""
    B, h, N, d = t.shape
    return t.transpose(1, 2).reshape(B, N, h * d)


# ------------------------------------------------------------------------------------------ LRSA
class LRSAAttention(nn.Module):
    """The reference LRSA with its stage's shared depthwise convs (``d_convs``), as one layer."""

    def __init__(self, dim: int, num_heads: int, q_size: int = 16):
        super().__init__()
        self.attn = LRSA(dim, num_heads, q_size)
        self.d_convs = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, self.d_convs)


def lrsa_flops(height: int, width: int, dim: int, num_heads: int, batch: int = 1, q_size: int = 16) -> int:
    """Closed form of :class:`LRSAAttention` on an ``height x width`` map.

    5 pooled grids (1 per input element each) + depthwise 3x3 on the 4 key/value grids (9 per
    pooled element) + LayerNorm on the M key/value tokens (5 per element) + q (Nq C^2), kv
    (2 M C^2), attention (2 Nq M C), proj (Nq C^2) + bilinear upsample (4 per output element).
    """
    H, W, C = height, width, dim
    grids = LF.lrsa_grids(H, W, q_size)
    nq = grids[0][0] * grids[0][1]
    m = sum(gh * gw for gh, gw in grids[1:])
    per_image = (len(grids) * H * W * C + 9 * m * C + 5 * m * C + nq * C * C + 2 * m * C * C
                 + 2 * nq * m * C + nq * C * C + 4 * H * W * C)
    return batch * per_image


# ------------------------------------------------------------------------------------------- SRA
class SpatialReductionAttention(nn.Module):
    """SegFormer's efficient self-attention: keys/values from an R x R stride-R conv + LayerNorm."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__()
        self.num_heads, self.sr_ratio = num_heads, sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        q = _heads_split(self.q(tokens), self.num_heads)
        if effective_sr(self.sr_ratio, H, W) != self.sr_ratio:
            raise ValueError(f"map {H}x{W} is smaller than the reduction ratio {self.sr_ratio}")
        if self.sr_ratio > 1:
            r = self.sr(x.permute(0, 3, 1, 2))
            r = self.norm(r.flatten(2).transpose(1, 2))
        else:
            r = tokens
        k, v = self.kv(r).chunk(2, dim=-1)
        o = F.scaled_dot_product_attention(q, _heads_split(k, self.num_heads), _heads_split(v, self.num_heads))
        return self.proj(_heads_merge(o)).reshape(B, H, W, C)


def effective_sr(sr_ratio: int, height: int, width: int) -> int:
    """The reduction ratio used on a map: the stage's ratio, but at most the map's shorter side."""
    return max(1, min(int(sr_ratio), int(height), int(width)))


def sra_flops(height: int, width: int, dim: int, num_heads: int, sr_ratio: int, batch: int = 1) -> int:
    """Closed form of :class:`SpatialReductionAttention`: q (N C^2) + [R > 1: conv (M C^2 R^2) +
    LayerNorm (5 M C)] + kv (2 M C^2) + attention (2 N M C) + proj (N C^2), M = (H//R)(W//R)."""
    C, n = dim, height * width
    R = sr_ratio
    m = (height // R) * (width // R) if R > 1 else n
    per_image = n * C * C + 2 * m * C * C + 2 * n * m * C + n * C * C
    if R > 1:
        per_image += m * C * C * R * R + 5 * m * C
    return batch * per_image


# ---------------------------------------------------------------------------------------- global
class GlobalAttention(nn.Module):
    """Full multi-head self-attention over all H*W tokens (ViT)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        q, k, v = self.qkv(x.reshape(B, H * W, C)).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(*(_heads_split(t, self.num_heads) for t in (q, k, v)))
        return self.proj(_heads_merge(o)).reshape(B, H, W, C)


def global_flops(height: int, width: int, dim: int, num_heads: int, batch: int = 1) -> int:
    """qkv (3 N C^2) + attention (2 N^2 C) + proj (N C^2)."""
    n, C = height * width, dim
    return batch * (3 * n * C * C + 2 * n * n * C + n * C * C)


# ---------------------------------------------------------------------------------------- window
class WindowAttention(nn.Module):
    """Swin (shifted) window attention: 7 x 7 windows on the map padded to multiples of 7,
    relative position bias, and for ``shift=True`` a cyclic shift by 3 with the border mask."""

    def __init__(self, dim: int, num_heads: int, window: int = WINDOW, shift: bool = False):
        super().__init__()
        self.num_heads, self.window, self.shift = num_heads, window, shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rel_bias = nn.Parameter(0.02 * torch.randn((2 * window - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("rel_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)

    def _mask(self, hp: int, wp: int, device) -> torch.Tensor:
        """(nW, L, L) additive mask: -inf-like between tokens from different pre-shift regions."""
        w, s = self.window, self.window // 2
        region = torch.zeros(hp, wp, device=device)
        cnt = 0
        for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
                region[hs, ws] = cnt
                cnt += 1
        win = region.reshape(hp // w, w, wp // w, w).transpose(1, 2).reshape(-1, w * w)
        diff = win[:, None, :] != win[:, :, None]
        return torch.zeros(diff.shape, device=device).masked_fill(diff, -100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        w, h = self.window, self.num_heads
        hp, wp = math.ceil(H / w) * w, math.ceil(W / w) * w
        x = F.pad(x, (0, 0, 0, wp - W, 0, hp - H))
        if self.shift:
            x = torch.roll(x, (-(w // 2), -(w // 2)), (1, 2))
        nh, nw = hp // w, wp // w
        win = x.reshape(B, nh, w, nw, w, C).transpose(2, 3).reshape(B * nh * nw, w * w, C)
        q, k, v = (_heads_split(t, h) for t in self.qkv(win).chunk(3, dim=-1))
        bias = self.rel_bias[self.rel_index.reshape(-1)].reshape(w * w, w * w, h).permute(2, 0, 1)
        bias = bias.to(q.dtype)[None]                                   # (1, heads, L, L)
        if self.shift:
            mask = self._mask(hp, wp, x.device).to(q.dtype)             # (nW, L, L)
            bias = (bias + mask[:, None]).expand(B, -1, -1, -1, -1).reshape(B * nh * nw, h, w * w, w * w)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        o = self.proj(_heads_merge(o)).reshape(B, nh, nw, w, w, C).transpose(2, 3).reshape(B, hp, wp, C)
        if self.shift:
            o = torch.roll(o, (w // 2, w // 2), (1, 2))
        return o[:, :H, :W]


def window_flops(height: int, width: int, dim: int, num_heads: int, window: int = WINDOW,
                 batch: int = 1) -> int:
    """On the padded map (Np = ceil(H/w) w * ceil(W/w) w tokens): qkv (3 Np C^2) + attention
    (2 Np w^2 C) + proj (Np C^2). Shifted or not: the same."""
    n = math.ceil(height / window) * window * math.ceil(width / window) * window
    C = dim
    return batch * (3 * n * C * C + 2 * n * window * window * C + n * C * C)


# -------------------------------------------------------------------------------------- factory
def make_layer(kind: str, dim: int, num_heads: int, stage: int, shift: bool = False,
               map_size: Tuple[int, int] = None) -> nn.Module:
    """The layer of ``kind`` for LRFormer-S stage ``stage`` (1..4) at width ``dim``.

    ``map_size`` (H, W) caps SegFormer's reduction ratio at the map's shorter side (tiny maps)."""
    if kind == "lrsa":
        return LRSAAttention(dim, num_heads)
    if kind == "sra":
        ratio = SR_RATIOS[stage - 1]
        if map_size is not None:
            ratio = effective_sr(ratio, *map_size)
        return SpatialReductionAttention(dim, num_heads, ratio)
    if kind == "global":
        return GlobalAttention(dim, num_heads)
    if kind == "window":
        return WindowAttention(dim, num_heads, shift=shift)
    raise ValueError(f"unknown attention kind {kind!r}; choose from {KINDS}")


def closed_form_flops(kind: str, height: int, width: int, dim: int, num_heads: int, stage: int,
                      batch: int = 1) -> int:
    """Closed-form FLOPs of ``make_layer(kind, dim, num_heads, stage)`` on an ``height x width`` map."""
    if kind == "lrsa":
        return lrsa_flops(height, width, dim, num_heads, batch)
    if kind == "sra":
        return sra_flops(height, width, dim, num_heads, effective_sr(SR_RATIOS[stage - 1], height, width), batch)
    if kind == "global":
        return global_flops(height, width, dim, num_heads, batch)
    if kind == "window":
        return window_flops(height, width, dim, num_heads, batch=batch)
    raise ValueError(f"unknown attention kind {kind!r}; choose from {KINDS}")


def counted_flops(kind: str, height: int, width: int, dim: int, num_heads: int, stage: int,
                  batch: int = 1, shift: bool = False) -> int:
    """FLOPs of the layer counted by :func:`benchmarks.flops.count_flops` on the meta device."""
    from .flops import count_flops
    with torch.device("meta"):
        layer = make_layer(kind, dim, num_heads, stage, shift=shift, map_size=(height, width)).eval()
        x = torch.empty(batch, height, width, dim)
    return count_flops(layer, x).total


__all__ = ["KINDS", "LABELS", "S_DIMS", "S_HEADS", "SR_RATIOS", "WINDOW", "stage_map_size",
           "LRSAAttention", "SpatialReductionAttention", "GlobalAttention", "WindowAttention",
           "lrsa_flops", "effective_sr", "sra_flops", "global_flops", "window_flops", "make_layer",
           "closed_form_flops", "counted_flops"]
