"""LRFormer+ : the LRFormer encoder + a Mask2Former-style query decoder with FASeg's DFPQ and HRCA.

Same interface as :class:`lrformer.segmentor.LRFormerSegmentor` (``backbone``, ``decode_head``,
``num_classes``, ``forward``, ``predict``, ``loss``) so the trainer and evaluator work unchanged; only
``forward`` returns a dict of set predictions instead of a logit map.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .matching import SetCriterion, semantic_targets
from .query_decoder import QueryDecoderHead

IGNORE_INDEX = 255

#: LRFormer+ variants: encoder variant of :data:`lrformer.factory.VARIANTS`; the query decoder is the
#: same for all (Mask2Former's defaults: 256 channels, 100 queries, 9 layers, 6 pixel-decoder layers).
PLUS_VARIANTS = {f"lrformer_{v}_plus": v for v in ("t", "s", "b", "l", "xl")}

#: decoder / loss defaults; every key can be overridden through ``create_model``.
DECODER_DEFAULTS = dict(hidden_dim=256, num_queries=100, dec_layers=9, dec_heads=8, dec_ffn=2048,
                        enc_layers=6, enc_heads=8, enc_points=4, enc_ffn=1024, dfpq=True, hrca_every=4,
                        hrca_keep_ratio=1 / 32, dropout=0.0)
LOSS_DEFAULTS = dict(class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1,
                     train_num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75)
PLUS_KEYS = tuple(DECODER_DEFAULTS) + tuple(LOSS_DEFAULTS)


def semantic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """Mask2Former's semantic inference: pred_logits (B, Q, K+1), pred_masks (B, Q, H, W) logits ->
    (B, K, H, W) scores ``sum_q softmax(logits)[q, k] * sigmoid(mask)[q]`` (no-object dropped)."""
    return torch.einsum("bqk,bqhw->bkhw", pred_logits.softmax(-1)[..., :-1], pred_masks.sigmoid())


class LRFormerPlusSegmentor(nn.Module):
    """``forward(images)`` -> ``{"pred_logits" (B, Q, K+1), "pred_masks" (B, Q, H/4, W/4),
    "aux_outputs"}``; ``predict`` -> (B, H, W) labels or (B, K, H, W) scores; ``loss(images, labels)``
    -> scalar (``loss_dict`` for the terms)."""

    def __init__(self, backbone: nn.Module, decode_head: QueryDecoderHead, criterion: SetCriterion):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.criterion = criterion

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def forward(self, images: torch.Tensor) -> Dict:
        return self.decode_head(self.backbone(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, return_labels: bool = True) -> torch.Tensor:
        """Mask logits bilinearly upsampled to the image size (as Mask2Former), then
        :func:`semantic_inference` -> (B, K, H, W) scores, or their argmax (B, H, W) int64."""
        out = self(images)
        masks = F.interpolate(out["pred_masks"], size=images.shape[-2:], mode="bilinear", align_corners=False)
        scores = semantic_inference(out["pred_logits"].float(), masks.float())
        return scores.argmax(1) if return_labels else scores

    def loss_dict(self, images: torch.Tensor, labels: torch.Tensor,
                  outputs: Optional[Dict] = None) -> Dict[str, torch.Tensor]:
        """All weighted loss terms and their sum ``"loss"``; labels (B, H, W) int64, 255 = ignore."""
        if labels.dim() != 3:
            raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
        if outputs is None:
            outputs = self(images)
        return self.criterion(outputs, semantic_targets(labels.to(images.device), IGNORE_INDEX))

    def loss(self, images: torch.Tensor, labels: torch.Tensor, outputs: Optional[Dict] = None) -> torch.Tensor:
        return self.loss_dict(images, labels, outputs)["loss"]


def create_plus_model(name: str, num_classes: int = 150, encoder_overrides: Optional[Dict] = None,
                      **plus_overrides) -> LRFormerPlusSegmentor:
    """Build ``lrformer_{t,s,b,l,xl}_plus``; ``plus_overrides`` from :data:`PLUS_KEYS`."""
    from .factory import create_encoder
    unknown = set(plus_overrides) - set(PLUS_KEYS)
    if unknown:
        raise TypeError(f"unknown LRFormer+ overrides {sorted(unknown)}")
    enc = create_encoder(PLUS_VARIANTS[name], **(encoder_overrides or {}))
    dec = {**DECODER_DEFAULTS, **{k: v for k, v in plus_overrides.items() if k in DECODER_DEFAULTS}}
    ls = {**LOSS_DEFAULTS, **{k: v for k, v in plus_overrides.items() if k in LOSS_DEFAULTS}}
    head = QueryDecoderHead(enc.embed_dims, num_classes, **dec)
    criterion = SetCriterion(num_classes, ls["class_weight"], ls["mask_weight"], ls["dice_weight"],
                             ls["no_object_weight"], ls["train_num_points"], ls["oversample_ratio"],
                             ls["importance_sample_ratio"])
    return LRFormerPlusSegmentor(enc, head, criterion)
