"""The LRFormer encoder (``backbone.*`` in the released checkpoints)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .layers import Block, bhwc, nchw


class StemEmbed(nn.Module):
    """``patch_embed1``: four 3x3 convs (strides 2, 1, 2, 1) with BN+GELU between, then LayerNorm."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        half = dim // 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, 1, 1),
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW in, (B, H, W, C) out
        return self.norm(bhwc(self.conv1(x)))


class PatchEmbed(nn.Module):
    """``patch_embed2..4``: 3x3 stride-2 conv, then LayerNorm."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 3, 2, 1)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) in and out
        return self.norm(bhwc(self.proj(nchw(x))))


class LRFormerEncoder(nn.Module):
    """Four stages; ``forward(images)`` returns NCHW maps at strides 4, 8, 16, 32.

    Stage s owns ``d_convs{s}``: four depthwise 3x3 convs shared by all its blocks, one per
    pyramid level of the LRSA keys/values.
    """

    def __init__(self, embed_dims: Sequence[int], depths: Sequence[int],
                 num_heads: Sequence[int] = (2, 4, 10, 16), mlp_ratios: Sequence[float] = (8, 8, 4, 4),
                 drop_path_rate: float = 0.1, q_size: int = 16, layer_scale_init: float = 1e-6,
                 layer_scale_stages: Sequence[int] = (3, 4), in_chans: int = 3):
        super().__init__()
        self.embed_dims, self.depths = tuple(embed_dims), tuple(depths)
        self.num_heads, self.mlp_ratios = tuple(num_heads), tuple(mlp_ratios)
        self.q_size = q_size
        #: recompute each block in the backward pass (saves activation memory) when True.
        self.grad_checkpointing = False
        n = sum(depths)  # stochastic depth rising linearly from 0 (plain floats: works on meta too)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        cur = 0
        for s in range(1, 5):
            dim, depth = embed_dims[s - 1], depths[s - 1]
            embed = StemEmbed(in_chans, dim) if s == 1 else PatchEmbed(embed_dims[s - 2], dim)
            setattr(self, f"patch_embed{s}", embed)
            setattr(self, f"d_convs{s}", nn.ModuleList(
                nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in range(4)))
            pre_norm_at = (7, 15) if depth > 20 else ()
            setattr(self, f"block{s}", nn.ModuleList(
                Block(dim, num_heads[s - 1], mlp_ratios[s - 1], dpr[cur + i],
                      layer_scale_init if s in layer_scale_stages else None, q_size,
                      pre_norm=i in pre_norm_at)
                for i in range(depth)))
            cur += depth

    @property
    def out_channels(self):
        return self.embed_dims

    def forward_stage(self, s: int, x: torch.Tensor) -> torch.Tensor:
        """Run stage s (1..4) on its input (images for s=1, else the previous (B, H, W, C) map)."""
        x = getattr(self, f"patch_embed{s}")(x)
        d_convs = getattr(self, f"d_convs{s}")
        for blk in getattr(self, f"block{s}"):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(blk, x, d_convs, use_reentrant=False)
            else:
                x = blk(x, d_convs)
        return x

    def forward(self, images: torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        outs, x = [], images
        for s in range(1, 5):
            x = self.forward_stage(s, x)
            outs.append(nchw(x))
        return outs
