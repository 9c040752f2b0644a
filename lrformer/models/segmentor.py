"""Encoder + LRHead segmentor (``backbone`` / ``decode_head`` as in the released mmseg files)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lrformer_kernels import Fusable

IGNORE_INDEX = 255


def check_images(images, where: str = "images") -> None:
    """A clear ValueError/TypeError for what the model cannot take: it expects RGB float images (B, 3, H, W),
    normalised with the ImageNet mean/std on the 0-255 scale (:func:`lrformer.preprocess` does it)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor (B, 3, H, W), got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"{where} has dtype {images.dtype}; the model takes float images normalised with the "
                        f"ImageNet mean/std (use lrformer.preprocess(image) on uint8 RGB images)")
    if images.dim() != 4:
        raise ValueError(f"{where} must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        hint = " (channels last? use images.permute(0, 3, 1, 2))" if images.shape[-1] == 3 else ""
        raise ValueError(f"{where} must have 3 (RGB) channels in dim 1, got shape {tuple(images.shape)}{hint}")


def check_labels(labels, num_classes: int) -> None:
    """Labels (B, H, W) integers in [0, num_classes) or 255 (ignored).  The value range is checked on
    CPU tensors only, and not under ``torch.compile`` (on a GPU it would cost a host sync every training
    step; traced, it would break the graph)."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 3:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be (B, H, W), got {shape}")
    if labels.is_floating_point():
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    if labels.device.type != "cpu" or torch.compiler.is_compiling():
        return
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        v = int(labels[bad][0])
        raise ValueError(f"labels hold {v}, outside [0, {num_classes}) and not the ignore index {IGNORE_INDEX}")


class eval_mode:
    """Context: the module in eval mode without gradients, its previous mode restored after."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.grad = torch.no_grad()
        self.grad.__enter__()
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        self.module.train(self.was_training)
        self.grad.__exit__(*exc)
        return False


class LRFormerSegmentor(Fusable, nn.Module):
    """``forward(images)`` -> logits at stride 8; ``predict`` -> full-size logits or labels;
    ``loss(images, labels)`` -> cross-entropy (ignore 255) on logits upsampled to the labels (fused: one op
    that never forms the upsampled logits)."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return self.decode_head(self.backbone(images))

    def predict(self, images: torch.Tensor, return_labels: bool = True) -> torch.Tensor:
        """Full-size (B, classes, H, W) logits, or (B, H, W) int64 labels if ``return_labels``.  Runs in
        eval mode without gradients whatever the model's mode (restored after)."""
        with eval_mode(self):
            logits = F.interpolate(self(images), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits.argmax(1) if return_labels else logits

    def loss(self, images: torch.Tensor, labels: torch.Tensor,
             logits: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Cross-entropy with ignore index 255 of the logits bilinearly upsampled to the labels (B, H, W), any
        integer dtype, any size; in float32 (the upsampling too, as mmseg's loss casts first)."""
        check_labels(labels, self.num_classes)
        if logits is None:
            logits = self(images)
        return self.ops.upsampled_cross_entropy(logits, labels, IGNORE_INDEX)
