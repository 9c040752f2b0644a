"""The LRHead decoder (``decode_head.*``): logits at stride 8."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Block, bhwc, nchw


class ConvBNReLU(nn.Module):
    """``squeeze1/2``: 1x1 conv without bias (``conv``), BatchNorm (``bn``), ReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # NCHW
        return F.relu(self.bn(self.conv(x)))


def resize_to(x: torch.Tensor, size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class LRHead(nn.Module):
    """Maps 2-4 resized to stride 8 and concatenated -> squeeze1 -> fuse_block1 -> cat(map 4) ->
    squeeze2 -> fuse_block2 -> Dropout2d -> conv_seg."""

    def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int = 150,
                 num_heads: int = 8, q_size: int = 32, kv_sizes: Sequence[int] = (22, 16, 12, 8),
                 mlp_ratio: float = 4, layer_scale_init: float = 1e-6, dropout: float = 0.1):
        super().__init__()
        c2, c3, c4 = in_channels[-3:]
        self.in_channels, self.channels, self.num_classes = tuple(in_channels), channels, num_classes
        self.squeeze1 = ConvBNReLU(c2 + c3 + c4, channels)
        self.fuse_block1 = Block(channels, num_heads, mlp_ratio, 0.0, layer_scale_init, q_size, kv_sizes, head=True)
        self.squeeze2 = ConvBNReLU(channels + c4, channels)
        self.fuse_block2 = Block(channels, num_heads, mlp_ratio, 0.0, layer_scale_init, q_size, kv_sizes, head=True)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        f2, f3, f4 = feats[-3:]
        size = f2.shape[-2:]
        x = torch.cat([f2, resize_to(f3, size), resize_to(f4, size)], dim=1)
        x = bhwc(self.squeeze1(x))
        x = nchw(self.fuse_block1(x))
        x = bhwc(self.squeeze2(torch.cat([x, resize_to(f4, size)], dim=1)))
        x = nchw(self.fuse_block2(x))
        return self.conv_seg(self.dropout(x))
