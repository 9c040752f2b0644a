"""The Mask2Former pieces both query decoders share (released LRFormer+ and FASeg), written once.

The two families store their parameters under different names (mmdet/mmcv vs detectron2); their
modules hold the parameters under those names and call the math here.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .msdeform import encoder_reference_points


def mha(attn: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        mask: Optional[torch.Tensor] = None, weights: bool = False):
    """``nn.MultiheadAttention`` on batch-first (B, N, C) tensors -> (output, head-averaged weights or None).
    ``mask`` (B * heads, Q, S) bool, True = blocked."""
    q, k, v = (t.transpose(0, 1) for t in (query, key, value))
    out, w = attn(q, k, v, attn_mask=mask, need_weights=weights)
    return out.transpose(0, 1), w


def fused_mha(attn: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ops):
    """Unmasked ``nn.MultiheadAttention`` (its parameters) through ``ops.lowres_attention`` (the fused
    flash-style kernel after ``fuse``): in-projections, attention over all keys, out-projection."""
    C = query.shape[-1]
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q, k, v = (F.linear(t, w[i * C:(i + 1) * C], b[i * C:(i + 1) * C]) for i, t in enumerate((query, key, value)))
    return attn.out_proj(ops.lowres_attention(q, k, v, attn.num_heads))


def ffn(lin1: nn.Linear, lin2: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``lin2(relu(lin1(x)))`` (dropout 0 in both released configs)."""
    return lin2(F.relu(lin1(x)))


def predict(norm: nn.Module, class_embed: nn.Module, mask_embed: nn.Module, query: torch.Tensor,
            mask_features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prediction head after every layer: ``norm`` then class logits (B, Q, K+1) and mask logits
    ``einsum(mask_embed(q), mask_features)`` (B, Q, H4, W4)."""
    q = norm(query)
    return class_embed(q), torch.einsum("bqc,bchw->bqhw", mask_embed(q), mask_features)


def attention_mask(masks: torch.Tensor, size, threshold: float, heads: int) -> torch.Tensor:
    """Masked attention's mask from mask logits (B, Q, H4, W4): bilinear (align_corners=False) to the
    level ``size``, blocked where ``sigmoid < threshold``, the same for every head; a query that would
    block every key is fully unblocked -> (B * heads, Q, h * w) bool, detached."""
    m = F.interpolate(masks.detach(), size=tuple(size), mode="bilinear", align_corners=False)
    blocked = m.flatten(2).sigmoid() < threshold
    blocked = blocked & ~blocked.all(-1, keepdim=True)
    return blocked.repeat_interleave(heads, dim=0)


def semantic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """pred_logits (B, Q, K+1), pred_masks (B, Q, H, W) logits -> (B, K, H, W) scores
    ``sum_q softmax(logits)[q, k] * sigmoid(mask)[q]`` (no-object dropped)."""
    return torch.einsum("bqk,bqhw->bkhw", pred_logits.softmax(-1)[..., :-1], pred_masks.sigmoid())


def outputs(preds: Sequence[Tuple[torch.Tensor, torch.Tensor]]) -> Dict:
    """``{"pred_logits", "pred_masks"}`` of the last prediction + ``"aux_outputs"``: every prediction
    (the one from ``query_feat`` first), as the released heads return them for deep supervision."""
    return {"pred_logits": preds[-1][0], "pred_masks": preds[-1][1],
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in preds[:-1]]}


def deform_encode(layers: Sequence[nn.Module], maps: Sequence[torch.Tensor], pos: Sequence[torch.Tensor]
                  ) -> List[torch.Tensor]:
    """The deformable encoder over the levels ``maps`` (B, C, h, w) (low -> high resolution) with their
    positional encodings ``pos`` (B, C, h, w): flatten, run ``layers`` (each ``layer(src, pos, ref,
    shapes)``), split back into maps."""
    B, C = maps[0].shape[:2]
    shapes = [tuple(m.shape[-2:]) for m in maps]
    src = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
    p = torch.cat([t.flatten(2).transpose(1, 2) for t in pos], 1)
    ref = encoder_reference_points(shapes, B, src.device)
    for layer in layers:
        src = layer(src, p, ref, shapes)
    outs, start = [], 0
    for h, w in shapes:
        outs.append(src[:, start:start + h * w].transpose(1, 2).reshape(B, C, h, w))
        start += h * w
    return outs


def check_features(feats, channels: Sequence[int], where: str) -> None:
    """A clear error for a feature list of the wrong length or widths."""
    if not isinstance(feats, (list, tuple)) or len(feats) != len(channels):
        n = len(feats) if isinstance(feats, (list, tuple)) else type(feats).__name__
        raise ValueError(f"{where} takes {len(channels)} feature maps (strides 4, 8, 16, 32), got {n}")
    for i, (f, c) in enumerate(zip(feats, channels)):
        if not isinstance(f, torch.Tensor) or f.dim() != 4 or f.shape[1] != c:
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"{where}: feature map {i} must be (B, {c}, H, W), got {shape}")
