"""Mask2Former's set-prediction loss: Hungarian matching, point-sampled mask losses, deep supervision.

Predictions: ``pred_logits`` (B, Q, K+1) (last = no object), ``pred_masks`` (B, Q, h, w) logits.
Targets: a list of B dicts ``{"labels": (N,) int64, "masks": (N, H, W) {0,1}, "valid": (H, W) {0,1}}``
(``valid`` optional; 0 = ignored pixel, excluded from the mask costs and losses). Masks are compared
at ``P`` points in normalised ``[0, 1]`` coordinates (``grid_sample``, ``align_corners=False``), so
predictions and targets may have different resolutions.

Ignored pixels (not in Mask2Former, which trains on padded panoptic masks): ``valid`` is sampled at
the same points with nearest-neighbour sampling and multiplies every per-point term, i.e. BCE is
``sum_p v_p bce_p / P`` and dice uses ``sum_p v_p s_p t_p`` etc. With no ignored pixels this is
exactly Mask2Former's loss.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def point_sample(x: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """x (N, C, H, W), coords (N, P, 2) in [0, 1] (x, y) -> (N, C, P) (zeros outside)."""
    return F.grid_sample(x, 2 * coords[:, :, None, :] - 1, mode=mode, align_corners=False)[..., 0]


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """Mask2Former's point uncertainty: ``-|logit|`` (highest at the decision boundary)."""
    return -logits.abs()


def uncertain_point_coords(logits: torch.Tensor, num_points: int, oversample_ratio: float = 3.0,
                           importance_sample_ratio: float = 0.75,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """PointRend/Mask2Former importance sampling. logits (N, 1, h, w) -> coords (N, num_points, 2):
    draw ``num_points * oversample_ratio`` uniform points, keep the ``importance_sample_ratio *
    num_points`` most uncertain ones and add uniform random points for the rest."""
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=logits.device, dtype=logits.dtype, generator=generator)
    unc = uncertainty(point_sample(logits, coords))[:, 0]                    # (N, num_sampled)
    k = int(importance_sample_ratio * num_points)
    idx = unc.topk(k, dim=1).indices
    coords = torch.gather(coords, 1, idx[..., None].expand(n, k, 2))
    if num_points - k > 0:
        coords = torch.cat([coords, torch.rand(n, num_points - k, 2, device=logits.device, dtype=logits.dtype,
                                               generator=generator)], 1)
    return coords


# --------------------------------------------------------------------------------- per-pair losses
def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None):
    """Per-mask point BCE: logits, targets (weights) (N, P) -> (N,) = ``mean_p w_p BCE(x_p, t_p)``."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if weights is not None:
        loss = loss * weights
    return loss.mean(1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None):
    """Per-mask dice: ``1 - (2 sum w s t + 1) / (sum w s + sum w t + 1)``, s = sigmoid(x) -> (N,)."""
    s = logits.sigmoid()
    if weights is not None:
        s, targets = s * weights, targets * weights
    return 1 - (2 * (s * targets).sum(1) + 1) / (s.sum(1) + targets.sum(1) + 1)


def pairwise_sigmoid_ce(logits: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None):
    """All-pairs point BCE: logits (Q, P), targets (N, P), weights (P,) -> (Q, N)."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    if weights is not None:
        pos, neg = pos * weights, neg * weights
    return (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]


def pairwise_dice(logits: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None):
    """All-pairs dice: logits (Q, P), targets (N, P), weights (P,) -> (Q, N)."""
    s = logits.sigmoid()
    if weights is not None:
        s, targets = s * weights, targets * weights
    return 1 - (2 * s @ targets.T + 1) / (s.sum(1)[:, None] + targets.sum(1)[None, :] + 1)


# ------------------------------------------------------------------------------------- matching
def hungarian(cost: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment of a (Q, N) cost matrix (scipy's ``linear_sum_assignment``)
    -> (query indices, target indices), int64, sorted by query."""
    qi, ti = linear_sum_assignment(cost.detach().cpu().double().numpy())
    return torch.as_tensor(qi, dtype=torch.int64), torch.as_tensor(ti, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """One-to-one query/target assignment minimising
    ``cost_class * (-p(class)) + cost_mask * BCE + cost_dice * dice`` (Mask2Former: 2 / 5 / 5), the mask
    costs on ``num_points`` uniform random points shared by all pairs of an image."""

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544):
        super().__init__()
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def cost_matrix(self, logits: torch.Tensor, masks: torch.Tensor, target: Dict,
                    coords: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One image: logits (Q, K+1), masks (Q, h, w), target dict -> cost (Q, N)."""
        tgt_masks = target["masks"].to(masks.dtype)
        if coords is None:
            coords = torch.rand(1, self.num_points, 2, device=masks.device, dtype=masks.dtype)
        prob = logits.softmax(-1)
        cost_class = -prob[:, target["labels"]]
        out = point_sample(masks[None].float(), coords.float())[0]                   # (Q, P)
        tgt = point_sample(tgt_masks[None].float(), coords.float())[0]               # (N, P)
        w = None
        if target.get("valid") is not None:
            w = point_sample(target["valid"][None, None].float(), coords.float(), mode="nearest")[0, 0]
        return (self.cost_mask * pairwise_sigmoid_ce(out, tgt, w) + self.cost_dice * pairwise_dice(out, tgt, w)
                + self.cost_class * cost_class.float())

    @torch.no_grad()
    def forward(self, outputs: Dict, targets: Sequence[Dict]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """-> per image (query indices, target indices), int64, sorted by query."""
        out = []
        for b, t in enumerate(targets):
            if len(t["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty))
                continue
            out.append(hungarian(self.cost_matrix(outputs["pred_logits"][b], outputs["pred_masks"][b], t)))
        return out


# ------------------------------------------------------------------------------------ criterion
class SetCriterion(nn.Module):
    """Mask2Former's loss: class cross-entropy over all queries (no-object weight ``eos_coef``) and, for
    matched pairs, point-sampled BCE and dice (importance sampling) normalised by the number of target
    masks; weighted 2 / 5 / 5 and summed over the final and every aux prediction (deep supervision).

    forward(outputs, targets) -> dict of weighted terms ``loss_ce``, ``loss_mask``, ``loss_dice`` and
    ``loss_ce_{i}`` ... for aux prediction i, plus ``loss`` = their sum.
    """

    def __init__(self, num_classes: int, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, eos_coef: float = 0.1, num_points: int = 12544,
                 oversample_ratio: float = 3.0, importance_sample_ratio: float = 0.75):
        super().__init__()
        self.num_classes = num_classes
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def loss_labels(self, logits, targets, indices):
        """Cross-entropy of every query: matched ones to their target's class, others to no-object."""
        tgt = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        for b, (qi, ti) in enumerate(indices):
            tgt[b, qi.to(logits.device)] = targets[b]["labels"][ti.to(targets[b]["labels"].device)].to(logits.device)
        return F.cross_entropy(logits.float().transpose(1, 2), tgt, self.empty_weight.float())

    def loss_masks(self, masks, targets, indices, num_masks):
        """Point-sampled BCE and dice of the matched pairs -> (loss_mask, loss_dice)."""
        src = torch.cat([masks[b, qi.to(masks.device)] for b, (qi, _) in enumerate(indices)])       # (M, h, w)
        if src.shape[0] == 0:
            zero = masks.sum() * 0
            return zero, zero
        tgt = torch.cat([targets[b]["masks"][ti.to(targets[b]["masks"].device)]
                         for b, (_, ti) in enumerate(indices)]).to(src.device).float()
        src = src[:, None].float()
        with torch.no_grad():
            coords = uncertain_point_coords(src, self.num_points, self.oversample_ratio,
                                            self.importance_sample_ratio)
            labels = point_sample(tgt[:, None], coords)[:, 0]
            w = None
            if any(t.get("valid") is not None for t in targets):
                valid = torch.cat([
                    (t["valid"] if t.get("valid") is not None else torch.ones(t["masks"].shape[-2:]))
                    .to(src.device).float()[None].expand(len(qi), -1, -1)
                    for t, (qi, _) in zip(targets, indices)])
                w = point_sample(valid[:, None], coords, mode="nearest")[:, 0]
        logits = point_sample(src, coords)[:, 0]
        return (sigmoid_ce_loss(logits, labels, w).sum() / num_masks,
                dice_loss(logits, labels, w).sum() / num_masks)

    def single(self, outputs: Dict, targets: Sequence[Dict], num_masks: float) -> Dict[str, torch.Tensor]:
        indices = self.matcher(outputs, targets)
        ce = self.loss_labels(outputs["pred_logits"], targets, indices)
        bce, dice = self.loss_masks(outputs["pred_masks"], targets, indices, num_masks)
        return {"loss_ce": ce * self.weights["loss_ce"], "loss_mask": bce * self.weights["loss_mask"],
                "loss_dice": dice * self.weights["loss_dice"]}

    def forward(self, outputs: Dict, targets: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        num_masks = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses = self.single(outputs, targets, num_masks)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self.single(aux, targets, num_masks).items()})
        losses["loss"] = sum(losses.values())
        return losses


def semantic_targets(labels: torch.Tensor, ignore_index: int = 255) -> List[Dict]:
    """Semantic label maps (B, H, W) int64 -> per image ``{"labels": present classes (N,), "masks":
    (N, H, W) float one-hot, "valid": (H, W) float (0 at ``ignore_index``)}``."""
    out = []
    for lab in labels:
        classes = torch.unique(lab)
        classes = classes[classes != ignore_index]
        out.append({"labels": classes.long(), "masks": (lab[None] == classes[:, None, None]).float(),
                    "valid": (lab != ignore_index).float()})
    return out
