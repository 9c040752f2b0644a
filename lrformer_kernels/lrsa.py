"""Low-resolution self-attention composed from the ops (no kernel of its own).

:func:`lrsa_low` is the LRSA up to its low-resolution output, written once for the reference model
(:class:`lrformer.models.layers.LRSA`) and for the released-code patches (:mod:`lrformer_kernels.released`):
one pyramid-pooling call feeds the queries and all key/value levels (tokens-last, no copies besides
the kv concatenation of the encoder's refined levels); :func:`lrsa_pooled` is the rest of it from the pooled
grids, for an encoder block whose CPE op pools them (:func:`~lrformer_kernels.dwconv3x3_pyramid_pool`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import Ops
from .pyramid_pool import split_pyramid

__all__ = ["lrsa_low", "lrsa_pooled"]


def lrsa_low(ops: Ops, x: torch.Tensor, grids, q_weight: torch.Tensor, q_bias: Optional[torch.Tensor],
             norm: nn.Module, kv: nn.Module, proj: nn.Module, num_heads: int, scale: float,
             d_convs: Optional[Sequence[nn.Module]] = None) -> torch.Tensor:
    """LRSA of a normalised map x (B, H, W, C) up to the low-resolution branch (B, hq, wq, C).

    grids: ``[query grid, kv grids...]``; q_weight/q_bias: the query projection as a matrix;
    norm/kv/proj: the attention's LayerNorm, kv Linear and output Linear; d_convs: the encoder's
    depthwise convs refining each pooled kv level (``m + conv(m)``), or None (LRHead).
    """
    return lrsa_pooled(ops, ops.pyramid_pool(x, grids), grids, q_weight, q_bias, norm, kv, proj, num_heads, scale,
                       d_convs)


def lrsa_pooled(ops: Ops, pooled: torch.Tensor, grids, q_weight: torch.Tensor, q_bias: Optional[torch.Tensor],
                norm: nn.Module, kv: nn.Module, proj: nn.Module, num_heads: int, scale: float,
                d_convs: Optional[Sequence[nn.Module]] = None) -> torch.Tensor:
    """:func:`lrsa_low` from the map's pooled grids (B, Nq + M, C) (one ``pyramid_pool`` result, e.g. of an
    encoder block's ``dwconv3x3_pyramid_pool``, which pools its norm1 of the CPE's output)."""
    B, C = pooled.shape[0], pooled.shape[-1]
    # views by one split each (their backward is one concatenation, where slices would each build a
    # zero-filled full-size gradient and add them up)
    hq, wq = grids[0]
    nq = hq * wq
    if d_convs is None:                                     # the kv tokens are already concatenated
        q_tokens, kv_tokens = pooled.split([nq, pooled.shape[1] - nq], dim=1)
    else:
        q_map, *maps = split_pyramid(pooled, grids)
        q_tokens = q_map.flatten(1, 2)
        kv_tokens = torch.cat([ops.dwconv3x3(m, dc.weight, dc.bias, residual=True).reshape(B, -1, C)
                               for m, dc in zip(maps, d_convs)], dim=1)
    q = F.linear(q_tokens, q_weight, q_bias)
    k, v = kv(norm(kv_tokens)).split(C, dim=-1)
    o = ops.lowres_attention(q, k, v, num_heads, scale)
    return proj(o).reshape(B, hq, wq, C)
