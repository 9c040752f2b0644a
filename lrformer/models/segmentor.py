"""Encoder + LRHead segmentor (``backbone`` / ``decode_head`` as in the released mmseg files)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = 255


class LRFormerSegmentor(nn.Module):
    """``forward(images)`` -> logits at stride 8; ``predict`` -> full-size logits or labels;
    ``loss(images, labels)`` -> cross-entropy (ignore 255) on logits upsampled to the labels."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, return_labels: bool = True) -> torch.Tensor:
        """Full-size (B, classes, H, W) logits, or (B, H, W) int64 labels if ``return_labels``."""
        logits = F.interpolate(self(images), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(1) if return_labels else logits

    def loss(self, images: torch.Tensor, labels: torch.Tensor,
             logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cross-entropy with ignore index 255; labels (B, H, W) int64 at any size."""
        if labels.dim() != 3:
            raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
        if logits is None:
            logits = self(images)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), labels.long(), ignore_index=IGNORE_INDEX)
