"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch, and the Mask2Former-style
pieces the two pixel decoders (:mod:`.mask2former`, :mod:`.faseg`) build on.

Conventions: token sequences are ``(B, N, C)``; maps are NCHW; sampling locations are normalised to
``[0, 1]`` with ``(x, y)`` order, ``(0, 0)`` the top-left corner of the top-left pixel and a pixel
``(i, j)`` centred at ``((j + 0.5) / W, (i + 0.5) / H)`` -- the convention of ``F.grid_sample`` with
``align_corners=False``; samples outside a map read zeros (``padding_mode="zeros"``).
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from lrformer_kernels import Fusable
from lrformer_kernels.compat import init_deformable_attention


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups as in Mask2Former (256 channels: 8 per group); narrow test widths get
    ``gcd(32, channels / 2)`` groups, so each group has >= 2 channels (a 1x1 map still normalises)."""
    return nn.GroupNorm(math.gcd(groups, max(channels // 2, 1)), channels)


class MSDeformAttn(Fusable, nn.Module):
    """Multi-scale deformable attention module (Deformable DETR, Zhu et al. 2021, eq. 3).

    Each query predicts, per head and level, ``points`` offsets (in units of that level's pixels)
    around its reference point and softmax weights over all ``levels * points`` samples; the sampling
    is ``self.ops.ms_deform_attn`` (the reference, or the fused kernel after ``lrformer_kernels.fuse``).
    """

    def __init__(self, dim: int = 256, levels: int = 3, heads: int = 8, points: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.dim, self.levels, self.heads, self.points = dim, levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self):
        """Deformable DETR's initialisation: zero offset weights and a bias putting head m's points
        on a ray at angle ``2 pi m / heads`` at distances 1..points; uniform attention weights."""
        init_deformable_attention(self, self.heads, self.levels, self.points)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value_in: torch.Tensor,
                shapes: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """query (B, Nq, C); reference_points (B, Nq, L, 2) in [0, 1] (x, y); value_in (B, S, C)
        (levels flattened and concatenated as in ``shapes``) -> (B, Nq, C)."""
        B, Nq, _ = query.shape
        M, L, P = self.heads, self.levels, self.points
        value = self.value_proj(value_in).reshape(B, value_in.shape[1], M, self.dim // M)
        offsets = self.sampling_offsets(query).reshape(B, Nq, M, L, P, 2)
        weights = self.attention_weights(query).reshape(B, Nq, M, L * P).softmax(-1).reshape(B, Nq, M, L, P)
        # offsets are in pixels of each level: divide by (W_l, H_l) to get normalised units
        normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        # the float32 reference points promote a float64 model's locations as in the released code; under
        # autocast (bf16 value, fp32 points) the sampling runs in the widest of the three dtypes
        dt = torch.promote_types(torch.promote_types(value.dtype, locations.dtype), weights.dtype)
        value, locations, weights = value.to(dt), locations.to(dt), weights.to(dt)
        return self.output_proj(self.ops.ms_deform_attn(value, shapes, locations, weights).to(query.dtype))


def sine_position_encoding(b: int, h: int, w: int, dim: int, device=None, dtype=torch.float32,
                           temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised sine positional encoding as used by Mask2Former -> (B, dim, H, W).

    Half the channels encode y (first), half x; coordinates ``(i + 1) / (H + 1e-6) * 2 pi`` (mmdet's
    ``SinePositionalEncoding(normalize=True)``, offset 0: cumsum / (last + eps) * scale, SPEC A.1);
    channel j: sin (even j) / cos (odd j) of the coordinate over ``temperature ** (2 (j // 2) / (dim / 2))``.
    """
    if dim % 4:
        raise ValueError(f"positional encoding dim must be divisible by 4, got {dim}")
    npf = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, device=device, dtype=torch.float64) / (h + eps) * scale
    x = torch.arange(1, w + 1, device=device, dtype=torch.float64) / (w + eps) * scale
    k = torch.arange(npf, device=device, dtype=torch.float64)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / npf)

    def enc(t):                                                    # (n,) -> (n, npf) sin/cos interleaved
        t = t[:, None] / dim_t
        return torch.stack([t[:, 0::2].sin(), t[:, 1::2].cos()], dim=2).flatten(1)  # j=0 sin, j=1 cos, ...

    py = enc(y)[:, None, :].expand(h, w, npf)
    px = enc(x)[None, :, :].expand(h, w, npf)
    pos = torch.cat([py, px], dim=-1).permute(2, 0, 1)
    return pos.to(dtype)[None].expand(b, dim, h, w)


class DeformEncoderLayer(nn.Module):
    """Post-norm deformable encoder layer: ``x = LN(x + MSDA(x + pos))``; ``x = LN(x + FFN(x))``."""

    def __init__(self, dim: int = 256, ffn_dim: int = 1024, levels: int = 3, heads: int = 8,
                 points: int = 4, dropout: float = 0.0):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src, pos, reference_points, shapes):
        src = self.norm1(src + self.dropout(self.self_attn(src + pos, reference_points, src, shapes)))
        return self.norm2(src + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(src))))))


def encoder_reference_points(shapes: Sequence[Tuple[int, int]], batch: int, device=None) -> torch.Tensor:
    """Reference point of every token = its pixel centre, normalised -> (B, S, L, 2) (x, y), the
    same point for all L levels (no padding, so Deformable DETR's valid ratios are all 1).

    Always float32, whatever the model's dtype, as both released decoders build them (FASeg's
    ``get_reference_points``: ``linspace(0.5, H - 0.5, H, dtype=float32) / H``; mmdet 3's
    ``MlvlPointGenerator``: float32 ``(i + 0.5) * stride`` over an integer ``W * stride``): each is
    float32's correctly rounded ``(i + 0.5) / H``; a float64 model promotes them when it adds the
    offsets, so at sides that are not powers of two the points differ from float64's ``(i + 0.5) / H``.
    """
    refs = []
    for h, w in shapes:
        ys = torch.linspace(0.5, h - 0.5, h, device=device, dtype=torch.float32) / h
        xs = torch.linspace(0.5, w - 0.5, w, device=device, dtype=torch.float32) / w
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        refs.append(torch.stack([xx.flatten(), yy.flatten()], -1))
    ref = torch.cat(refs, 0)                                              # (S, 2)
    return ref[None, :, None, :].expand(batch, ref.shape[0], len(shapes), 2)
