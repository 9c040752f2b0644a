"""A segmentor around a query decoder (LRFormer+ = released Mask2Former head, or FASeg's decoder).

Same interface as :class:`lrformer.models.segmentor.LRFormerSegmentor` (``backbone``, ``decode_head``,
``num_classes``, ``forward``, ``predict``, ``loss``) so the trainer and evaluator work unchanged; only
``forward`` returns a dict of set predictions instead of a logit map.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.segmentor import check_images, check_labels, eval_mode
from .common import semantic_inference
from .matching import SetCriterion, semantic_targets

IGNORE_INDEX = 255

#: loss defaults of both released recipes (SPEC_PLUS A.5, B.5)
LOSS_DEFAULTS = dict(class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_weight=0.1,
                     train_num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75)


def make_criterion(num_classes: int, **overrides) -> SetCriterion:
    ls = {**LOSS_DEFAULTS, **overrides}
    return SetCriterion(num_classes, ls["class_weight"], ls["mask_weight"], ls["dice_weight"],
                        ls["no_object_weight"], ls["train_num_points"], ls["oversample_ratio"],
                        ls["importance_sample_ratio"])


class QuerySegmentor(nn.Module):
    """``forward(images)`` -> ``{"pred_logits" (B, Q, K+1), "pred_masks" (B, Q, H/4, W/4),
    "aux_outputs"}``; ``predict`` -> (B, H, W) labels or (B, K, H, W) scores; ``loss(images, labels)``
    -> scalar (``loss_dict`` for the terms)."""

    #: released test pipelines pad the image to a multiple of this and crop the prediction back
    size_divisor = 32

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, criterion: SetCriterion):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.criterion = criterion

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def forward(self, images: torch.Tensor) -> Dict:
        check_images(images)
        return self.decode_head(self.backbone(images))

    def predict(self, images: torch.Tensor, return_labels: bool = True) -> torch.Tensor:
        """The released semantic inference: pad to a multiple of 32 (zeros), last prediction's mask
        logits bilinearly upsampled to the padded size, ``sum_q softmax(class) * sigmoid(mask)``,
        cropped to the image -> (B, K, H, W) scores, or their argmax (B, H, W).  Runs in eval mode
        without gradients whatever the model's mode (restored after)."""
        H, W = images.shape[-2:]
        d = self.size_divisor
        check_images(images)
        padded = F.pad(images, (0, -W % d, 0, -H % d))
        with eval_mode(self):
            out = self(padded)
        masks = F.interpolate(out["pred_masks"], size=padded.shape[-2:], mode="bilinear", align_corners=False)
        scores = semantic_inference(out["pred_logits"].float(), masks.float())[..., :H, :W]
        return scores.argmax(1) if return_labels else scores

    def loss_dict(self, images: torch.Tensor, labels: torch.Tensor,
                  outputs: Optional[Dict] = None) -> Dict[str, torch.Tensor]:
        """All weighted loss terms and their sum ``"loss"``; labels (B, H, W) int64, 255 = ignore."""
        check_labels(labels, self.num_classes)
        if outputs is None:
            outputs = self(images)
        return self.criterion(outputs, semantic_targets(labels.to(images.device), IGNORE_INDEX))

    def loss(self, images: torch.Tensor, labels: torch.Tensor, outputs: Optional[Dict] = None) -> torch.Tensor:
        return self.loss_dict(images, labels, outputs)["loss"]
