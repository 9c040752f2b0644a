"""Drop-in multi-scale deformable attention for Deformable-DETR / Mask2Former / mmcv code, backed by
:func:`lrformer_kernels.ms_deform_attn` (Triton, forward and backward; no CUDA extension to build).

The calls those projects make, with their argument order and layouts::

    from lrformer_kernels.compat import MSDeformAttnFunction, multi_scale_deformable_attn
    out = MSDeformAttnFunction.apply(value, value_spatial_shapes, value_level_start_index,
                                     sampling_locations, attention_weights, im2col_step)
    out = multi_scale_deformable_attn_pytorch(value, value_spatial_shapes, sampling_locations,
                                              attention_weights)      # their CPU fallback, same result

value ``(B, S, heads, D)``; value_spatial_shapes ``(L, 2)`` int64 ``(H, W)`` per level;
value_level_start_index ``(L,)`` (checked against the shapes); sampling_locations
``(B, Nq, heads, L, P, 2)`` in ``[0, 1]`` as ``(x, y)``; attention_weights ``(B, Nq, heads, L, P)``
-> ``(B, Nq, heads * D)`` in value's dtype.  ``im2col_step`` is accepted and ignored (the kernel has no
batch chunking).  Mixed dtypes (e.g. fp16 value with fp32 locations under autocast) are computed in
the widest of the three.  The level shapes are read on the host (``tolist``), as the CUDA op's launch
does.

:class:`MultiScaleDeformableAttention` is mmcv's module of that name (same parameters and names:
``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``; same initialisation and
``forward`` signature), computing the sampling with the fused op.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from ._common import check_tensor
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_reference

__all__ = ["multi_scale_deformable_attn", "multi_scale_deformable_attn_pytorch", "MSDeformAttnFunction",
           "MultiScaleDeformableAttnFunction", "MultiScaleDeformableAttention", "init_deformable_attention"]


def _level_shapes(value_spatial_shapes, value_level_start_index=None):
    if isinstance(value_spatial_shapes, torch.Tensor):
        if value_spatial_shapes.dim() != 2 or value_spatial_shapes.shape[1] != 2:
            raise ValueError(f"value_spatial_shapes must be (L, 2) (H, W) per level, got "
                             f"{tuple(value_spatial_shapes.shape)}")
        shapes = [tuple(int(v) for v in s) for s in value_spatial_shapes.tolist()]
    else:
        shapes = [tuple(int(v) for v in s) for s in value_spatial_shapes]
    if value_level_start_index is not None:
        starts = value_level_start_index.tolist() if isinstance(value_level_start_index, torch.Tensor) \
            else list(value_level_start_index)
        want = [sum(h * w for h, w in shapes[:i]) for i in range(len(shapes))]
        if [int(s) for s in starts] != want:
            raise ValueError(f"value_level_start_index {starts} does not match value_spatial_shapes {shapes} "
                             f"(expected {want})")
    return shapes


def _common_dtype(value, sampling_locations, attention_weights):
    for name, t in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        check_tensor(t, name)
    dt = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    return value.to(dt), sampling_locations.to(dt), attention_weights.to(dt)


def multi_scale_deformable_attn(value: torch.Tensor, value_spatial_shapes, value_level_start_index,
                                sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                                im2col_step: int = 64) -> torch.Tensor:
    """Deformable DETR's ``MSDeformAttnFunction.apply`` / mmcv's ``MultiScaleDeformableAttnFunction.apply``
    (same arguments, same result) through the fused kernel; differentiable in value, sampling_locations and
    attention_weights."""
    shapes = _level_shapes(value_spatial_shapes, value_level_start_index)
    v, loc, w = _common_dtype(value, sampling_locations, attention_weights)
    return ms_deform_attn(v, shapes, loc, w).to(value.dtype)


def multi_scale_deformable_attn_pytorch(value: torch.Tensor, value_spatial_shapes, sampling_locations: torch.Tensor,
                                        attention_weights: torch.Tensor) -> torch.Tensor:
    """Their pure-PyTorch CPU fallback (``ms_deform_attn_core_pytorch`` / mmcv's
    ``multi_scale_deformable_attn_pytorch``): ``grid_sample`` per level, the same arguments."""
    shapes = _level_shapes(value_spatial_shapes)
    v, loc, w = _common_dtype(value, sampling_locations, attention_weights)
    return ms_deform_attn_reference(v, shapes, loc, w).to(value.dtype)


class MSDeformAttnFunction:
    """``MSDeformAttnFunction.apply(value, value_spatial_shapes, value_level_start_index,
    sampling_locations, attention_weights, im2col_step)``, as Deformable DETR and Mask2Former call it
    (and mmcv's ``MultiScaleDeformableAttnFunction``); autograd comes from the fused op."""

    apply = staticmethod(multi_scale_deformable_attn)


#: mmcv's name for the same function object
MultiScaleDeformableAttnFunction = MSDeformAttnFunction


def init_deformable_attention(module: nn.Module, heads: int, levels: int, points: int) -> None:
    """Deformable DETR's initialisation of a module with ``sampling_offsets``, ``attention_weights``,
    ``value_proj`` and ``output_proj`` (mmcv's too): zero offset weights and a bias putting head m's points
    on a ray at angle 2 pi m / heads at distances 1..points; uniform attention weights (zero weight and
    bias); xavier-uniform projections with zero biases."""
    nn.init.zeros_(module.sampling_offsets.weight)
    theta = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    grid = torch.stack([theta.cos(), theta.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(heads, 1, 1, 2).repeat(1, levels, points, 1)
    grid = grid * torch.arange(1, points + 1, dtype=torch.float32).view(1, 1, -1, 1)
    with torch.no_grad():
        module.sampling_offsets.bias.copy_(grid.flatten())
    nn.init.zeros_(module.attention_weights.weight)
    nn.init.zeros_(module.attention_weights.bias)
    for lin in (module.value_proj, module.output_proj):
        nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(lin.bias)


class MultiScaleDeformableAttention(nn.Module):
    """mmcv's ``MultiScaleDeformableAttention`` (``mmcv.ops.multi_scale_deform_attn``): the same
    constructor, parameters (names and shapes), initialisation and ``forward``; the sampling runs in
    :func:`lrformer_kernels.ms_deform_attn`.  ``forward(query, key=None, value=None, identity=None,
    query_pos=None, key_padding_mask=None, reference_points=None, spatial_shapes=None,
    level_start_index=None)`` returns ``identity + dropout(output_proj(attention))``; tensors are
    ``(num_query, bs, C)`` unless ``batch_first``; reference_points ``(bs, num_query, L, 2)`` (points) or
    ``(bs, num_query, L, 4)`` (boxes, offsets scaled by half the box size / points)."""

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 im2col_step: int = 64, dropout: float = 0.1, batch_first: bool = False, norm_cfg=None,
                 init_cfg=None, value_proj_ratio: float = 1.0):
        super().__init__()
        if embed_dims % num_heads != 0:
            raise ValueError(f"embed_dims must be divisible by num_heads, got {embed_dims} and {num_heads}")
        self.embed_dims, self.num_heads, self.num_levels, self.num_points = embed_dims, num_heads, num_levels, num_points
        self.im2col_step, self.batch_first = im2col_step, batch_first
        self.dropout = nn.Dropout(dropout)
        value_dims = int(embed_dims * value_proj_ratio)
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, value_dims)
        self.output_proj = nn.Linear(value_dims, embed_dims)
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv's initialisation (:func:`init_deformable_attention`)."""
        init_deformable_attention(self, self.num_heads, self.num_levels, self.num_points)

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                identity: Optional[torch.Tensor] = None, query_pos: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, reference_points: Optional[torch.Tensor] = None,
                spatial_shapes: Optional[torch.Tensor] = None, level_start_index: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        if reference_points is None or spatial_shapes is None:
            raise ValueError("MultiScaleDeformableAttention.forward needs reference_points and spatial_shapes")
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query, value = query.permute(1, 0, 2), value.permute(1, 0, 2)
        bs, num_query, _ = query.shape
        num_value = value.shape[1]
        shapes = _level_shapes(spatial_shapes, level_start_index)
        if sum(h * w for h, w in shapes) != num_value:
            raise ValueError(f"value has {num_value} tokens but spatial_shapes {shapes} hold "
                             f"{sum(h * w for h, w in shapes)}")
        M, L, P = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, num_value, M, -1)
        offsets = self.sampling_offsets(query).view(bs, num_query, M, L, P, 2)
        weights = self.attention_weights(query).view(bs, num_query, M, L * P).softmax(-1).view(bs, num_query, M, L, P)
        if reference_points.shape[-1] == 2:
            normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = reference_points[:, :, None, :, None, :2] + \
                offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 (points) or 4 (boxes), got {tuple(reference_points.shape)}")
        output = self.output_proj(multi_scale_deformable_attn(value, shapes, None, locations, weights,
                                                              self.im2col_step))
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity
