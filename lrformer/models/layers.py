"""Building blocks of LRFormer, tokens-last inside.

Feature maps flow as (B, H, W, C) tensors; an NCHW view of one is ``x.permute(0, 3, 1, 2)``
(channels_last memory), which is what the convolutions and BatchNorms see.  The ops (pyramid
pooling, low-resolution attention, upsample + residual, depthwise conv) come from
:mod:`lrformer_kernels` through ``self.ops`` (:class:`lrformer_kernels.Fusable`): the reference math
by default, the fused kernels after :func:`lrformer_kernels.fuse` — the one place where the fused
path enters the model.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lrformer_kernels import Fusable, bilinear_resize, lrsa_grids, lrsa_low, lrsa_pooled, pyramid_sizes


def nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) view."""
    return x.permute(0, 3, 1, 2)


def bhwc(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H, W, C) view."""
    return x.permute(0, 2, 3, 1)


def is_batch_norm(m) -> bool:
    """BatchNorm of any kind (``BatchNorm2d``, ``SyncBatchNorm`` after DDP conversion, ...)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def affine_layer_norm(m) -> bool:
    """A LayerNorm with weight and bias (one the fused ops can take inside)."""
    return isinstance(m, nn.LayerNorm) and m.weight is not None


def batch_norm_bhwc(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a BatchNorm2d / SyncBatchNorm to a tokens-last map."""
    return bhwc(bn(nchw(x)))


def conv_weight_2d(conv: nn.Conv2d) -> torch.Tensor:
    """A 1x1 conv's weight as a (out, in) matrix for F.linear on tokens-last maps."""
    return conv.weight.reshape(conv.weight.shape[0], conv.weight.shape[1])


def drop_path_keep(batch: int, drop_prob: float, training: bool, device=None,
                   dtype=torch.float32, generator: Optional[torch.Generator] = None):
    """Per-sample drop-path factor: 0 for a dropped sample, 1/keep_prob for a kept one; None if off."""
    if drop_prob <= 0.0 or not training:
        return None
    keep_prob = 1.0 - drop_prob
    mask = torch.empty(batch, device=device, dtype=dtype).bernoulli_(keep_prob, generator=generator)
    return mask / keep_prob


class DropPath(nn.Module):
    """Stochastic depth: per-sample factor 0 or 1/keep_prob in training, None (identity) otherwise."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def keep(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return drop_path_keep(x.shape[0], self.drop_prob, self.training, x.device, torch.float32)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class IRB(Fusable, nn.Module):
    """Inverted residual FFN: fc1 (1x1) -> GELU -> h + dwconv3x3(h) -> fc2 (1x1). Keys fc1/conv/fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def parameters_2d(self):
        """(w1, b1, wc, bc, w2, b2): the 1x1 convs as matrices, the depthwise conv as stored (for ``ops.irb``)."""
        return (conv_weight_2d(self.fc1), self.fc1.bias, self.conv.weight, self.conv.bias, conv_weight_2d(self.fc2),
                self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        h = F.linear(x, conv_weight_2d(self.fc1), self.fc1.bias)
        h = self.ops.dwconv3x3(h, self.conv.weight, self.conv.bias, gelu=True, residual=True)
        return F.linear(h, conv_weight_2d(self.fc2), self.fc2.bias)


class LRSA(Fusable, nn.Module):
    """Low-resolution self-attention.

    ``head=False`` (encoder): ``q`` = Sequential(Linear), ``kv`` = Sequential(Linear), pooled
    key/value maps refined by the encoder's shared depthwise convs (passed to forward).
    ``head=True`` (LRHead): ``q`` = 1x1 Conv2d, ``kv`` = Linear, no depthwise convs.
    ``forward_low`` returns the low-resolution branch (B, hq, wq, C) before upsampling;
    ``forward`` upsamples it to the input size.
    """

    def __init__(self, dim: int, num_heads: int, q_size: int = 16,
                 kv_sizes: Optional[Sequence[int]] = None, qkv_bias: bool = True, head: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.q_size = dim, num_heads, q_size
        self.kv_sizes = tuple(kv_sizes) if kv_sizes is not None else pyramid_sizes(q_size)
        self.scale = (dim // num_heads) ** -0.5
        self.head = head
        if head:
            self.q = nn.Conv2d(dim, dim, 1, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        else:
            self.q = nn.Sequential(nn.Linear(dim, dim, bias=qkv_bias))
            self.kv = nn.Sequential(nn.Linear(dim, 2 * dim, bias=qkv_bias))
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def q_linear(self):
        """(weight (C, C), bias) of the query projection, whichever module holds it."""
        if self.head:
            return conv_weight_2d(self.q), self.q.bias
        return self.q[0].weight, self.q[0].bias

    def kv_linear(self) -> nn.Linear:
        return self.kv if self.head else self.kv[0]

    def grids(self, h: int, w: int):
        return lrsa_grids(h, w, self.q_size, self.kv_sizes)

    def forward_low(self, x: torch.Tensor, d_convs: Optional[Sequence[nn.Conv2d]] = None) -> torch.Tensor:
        """The low-resolution branch (B, hq, wq, C) of a normalised map x (B, H, W, C)."""
        qw, qb = self.q_linear()
        return lrsa_low(self.ops, x, self.grids(x.shape[1], x.shape[2]), qw, qb, self.norm, self.kv_linear(),
                        self.proj, self.num_heads, self.scale, d_convs)

    def forward_pooled(self, pooled: torch.Tensor, grids, d_convs: Optional[Sequence[nn.Conv2d]] = None):
        """The low-resolution branch from the normalised map's pooled ``grids`` (``self.grids(H, W)``)."""
        qw, qb = self.q_linear()
        return lrsa_pooled(self.ops, pooled, grids, qw, qb, self.norm, self.kv_linear(), self.proj, self.num_heads,
                           self.scale, d_convs)

    def forward(self, x: torch.Tensor, d_convs: Optional[Sequence[nn.Conv2d]] = None) -> torch.Tensor:
        """x: normalised map (B, H, W, C) -> attention branch at full resolution (B, H, W, C)."""
        return bilinear_resize(self.forward_low(x, d_convs), x.shape[1:3])

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, q_size={self.q_size}, kv_sizes={self.kv_sizes}, head={self.head}"


class Block(Fusable, nn.Module):
    """LRFormer block (encoder, LayerNorms) or LRHead block (``head=True``, BatchNorms).

    x = pre_norm(x); x = x + cpe(x); x = x + drop_path(ls1 * LRSA(norm1(x))) (an encoder block's CPE, LayerNorm
    norm1 and LRSA pooling as one op, ``ops.dwconv3x3_pyramid_pool``); x = x + drop_path(ls2 * IRB(norm2(x)))
    (``ops.irb``: one op, LayerNorm included).  Tokens-last in and out.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0,
                 layer_scale: Optional[float] = None, q_size: int = 16,
                 kv_sizes: Optional[Sequence[int]] = None, head: bool = False, pre_norm: bool = False):
        super().__init__()
        self.head = head
        if layer_scale is not None:
            self.layer_scale_1 = nn.Parameter(layer_scale * torch.ones(dim))
            self.layer_scale_2 = nn.Parameter(layer_scale * torch.ones(dim))
        else:
            self.layer_scale_1 = self.layer_scale_2 = None
        self.pre_norm = nn.BatchNorm2d(dim) if pre_norm else None
        if head:
            self.norm1 = nn.BatchNorm2d(dim)
            self.norm2 = nn.BatchNorm2d(dim)
        else:
            self.norm1 = nn.LayerNorm(dim, eps=1e-6)
            self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = LRSA(dim, num_heads, q_size, kv_sizes, head=head)
        self.mlp = IRB(dim, int(dim * mlp_ratio))
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.drop_path = DropPath(drop_path)

    def norm(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return batch_norm_bhwc(layer, x) if is_batch_norm(layer) else layer(x)

    def forward(self, x: torch.Tensor, d_convs: Optional[Sequence[nn.Conv2d]] = None) -> torch.Tensor:
        if self.pre_norm is not None:
            x = batch_norm_bhwc(self.pre_norm, x)
        if affine_layer_norm(self.norm1):         # the CPE, norm1 and the pooling in one op (the CPE output's two uses)
            grids = self.attn.grids(x.shape[1], x.shape[2])
            x, pooled = self.ops.dwconv3x3_pyramid_pool(x, self.cpe.weight, self.cpe.bias, grids, self.norm1.weight,
                                                        self.norm1.bias, self.norm1.eps)
            low = self.attn.forward_pooled(pooled, grids, d_convs)
        else:
            x = self.ops.dwconv3x3(x, self.cpe.weight, self.cpe.bias, residual=True)
            low = self.attn.forward_low(self.norm(self.norm1, x), d_convs)
        x = self.ops.upsample_residual(x, low, self.layer_scale_1, self.drop_path.keep(x))
        keep = self.drop_path.keep(x)
        if affine_layer_norm(self.norm2):                                            # norm2 inside the op
            return self.ops.irb(x, *self.mlp.parameters_2d(), self.layer_scale_2, keep, self.norm2.weight,
                                self.norm2.bias, self.norm2.eps)
        return self.ops.irb(self.norm(self.norm2, x), *self.mlp.parameters_2d(), self.layer_scale_2, keep,
                            shortcut=x)
