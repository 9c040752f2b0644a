"""Hungarian matching, point sampling and the set criterion (lrformer.decoders.matching) against direct formulas."""
import itertools
import math

import torch
import torch.nn.functional as F

from lrformer.decoders.matching import (HungarianMatcher, SetCriterion, dice_loss, hungarian, pairwise_dice,
                               pairwise_sigmoid_ce, point_sample, semantic_targets, sigmoid_ce_loss,
                               uncertain_point_coords)


def test_hungarian_vs_brute_force():
    g = torch.Generator().manual_seed(0)
    for Q, N in ((4, 3), (5, 5), (6, 2)):
        cost = torch.rand(Q, N, generator=g, dtype=torch.float64)
        qi, ti = hungarian(cost)
        best = min(sum(cost[q, t].item() for q, t in zip(perm, range(N)))
                   for perm in itertools.permutations(range(Q), N))
        assert len(qi) == N and sorted(ti.tolist()) == list(range(N)) and len(set(qi.tolist())) == N
        assert math.isclose(cost[qi, ti].sum().item(), best, rel_tol=1e-12)


def test_matcher_hand_made_case():
    """Three target regions; query q predicts region perm[q] (right class, right mask), the others
    predict garbage. The matcher must recover the permutation."""
    H = W = 16
    masks = torch.zeros(3, H, W)
    masks[0, :8, :8] = 1
    masks[1, 8:, :] = 1
    masks[2, :8, 8:] = 1
    target = {"labels": torch.tensor([4, 1, 2]), "masks": masks, "valid": torch.ones(H, W)}
    Q, K = 6, 5
    owner = {1: 2, 3: 0, 4: 1}           # query -> target
    logits = torch.zeros(Q, K + 1)
    pred = torch.full((Q, H // 2, W // 2), -8.0)          # predictions at half resolution
    for q, t in owner.items():
        logits[q, target["labels"][t]] = 6.0
        pred[q] = torch.where(F.avg_pool2d(masks[t][None], 2)[0] > 0.5, 8.0, -8.0)
    pred[0] = 8.0                        # a query predicting everything, class 0
    logits[0, 0] = 6.0
    matcher = HungarianMatcher(num_points=500)
    (qi, ti), = matcher({"pred_logits": logits[None], "pred_masks": pred[None]}, [target])
    assert dict(zip(qi.tolist(), ti.tolist())) == owner
    # an image without targets gets an empty assignment
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, H, W)}
    (qi, ti), = matcher({"pred_logits": logits[None], "pred_masks": pred[None]}, [empty])
    assert qi.numel() == 0 and ti.numel() == 0


def test_cost_matrix_vs_direct():
    g = torch.Generator().manual_seed(1)
    Q, N, K, P = 4, 3, 5, 50
    logits = torch.randn(Q, K + 1, generator=g)
    pred = torch.randn(Q, 6, 7, generator=g)
    tmask = (torch.rand(N, 12, 14, generator=g) > 0.5).float()
    valid = (torch.rand(12, 14, generator=g) > 0.2).float()
    target = {"labels": torch.tensor([3, 0, 3]), "masks": tmask, "valid": valid}
    coords = torch.rand(1, P, 2, generator=g)
    m = HungarianMatcher(2.0, 5.0, 5.0, P)
    cost = m.cost_matrix(logits, pred, target, coords)
    x = point_sample(pred[None], coords)[0]
    t = point_sample(tmask[None], coords)[0]
    w = point_sample(valid[None, None], coords, mode="nearest")[0, 0]
    assert set(w.unique().tolist()) <= {0.0, 1.0}
    for q in range(Q):
        for n in range(N):
            s = x[q].sigmoid()
            bce = -(t[n] * F.logsigmoid(x[q]) + (1 - t[n]) * F.logsigmoid(-x[q]))
            ce = (w * bce).mean()
            dice = 1 - (2 * (w * s * t[n]).sum() + 1) / ((w * s).sum() + (w * t[n]).sum() + 1)
            cls = -logits[q].softmax(-1)[target["labels"][n]]
            torch.testing.assert_close(cost[q, n], 5 * ce + 5 * dice + 2 * cls, rtol=1e-5, atol=1e-5)


def test_mask_losses_vs_direct_and_pairwise():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, generator=g, dtype=torch.float64)
    t = (torch.rand(3, 40, generator=g) > 0.5).double()
    w = (torch.rand(3, 40, generator=g) > 0.3).double()
    s = x.sigmoid()
    bce = -(t * s.log() + (1 - t) * (1 - s).log())
    torch.testing.assert_close(sigmoid_ce_loss(x, t), bce.mean(1))
    torch.testing.assert_close(sigmoid_ce_loss(x, t, w), (w * bce).sum(1) / 40)
    torch.testing.assert_close(dice_loss(x, t), 1 - (2 * (s * t).sum(1) + 1) / (s.sum(1) + t.sum(1) + 1))
    torch.testing.assert_close(dice_loss(x, t, w), 1 - (2 * (w * s * t).sum(1) + 1)
                               / ((w * s).sum(1) + (w * t).sum(1) + 1))
    # pairwise versions agree with the per-pair ones (shared point weights)
    pw = w[0]
    pce, pdice = pairwise_sigmoid_ce(x, t, pw), pairwise_dice(x, t, pw)
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(pce[i, j], sigmoid_ce_loss(x[i:i + 1], t[j:j + 1], pw[None])[0])
            torch.testing.assert_close(pdice[i, j], dice_loss(x[i:i + 1], t[j:j + 1], pw[None])[0])


def test_point_sample_and_importance_sampling():
    # point_sample at a pixel centre reads the pixel
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    coords = torch.tensor([[[(2 + 0.5) / 4, (1 + 0.5) / 3]]])
    assert point_sample(x, coords).item() == x[0, 0, 1, 2].item()
    # uncertainty = -|logit|: with the left half at 0 and the right half at +-20, every importance
    # point lies in the left half (bilinear blending reaches at most one pixel into the right half)
    logits = torch.full((2, 1, 8, 8), 20.0)
    logits[1] = -20.0
    logits[:, :, :, :4] = 0.0
    c = uncertain_point_coords(logits, num_points=40, oversample_ratio=3, importance_sample_ratio=0.75)
    assert c.shape == (2, 40, 2)
    assert (c[:, :30, 0] < 4.5 / 8).all()
    assert (c[:, 30:] >= 0).all() and (c[:, 30:] <= 1).all()
    c = uncertain_point_coords(logits, num_points=40, importance_sample_ratio=0.0)
    assert c.shape == (2, 40, 2)


def test_semantic_targets():
    lab = torch.tensor([[[0, 3, 255], [3, 3, 0]]])
    (t,) = semantic_targets(lab)
    assert t["labels"].tolist() == [0, 3]
    assert t["masks"].tolist() == [[[1, 0, 0], [0, 0, 1]], [[0, 1, 0], [1, 1, 0]]]
    assert t["valid"].tolist() == [[1, 1, 0], [1, 1, 1]]


def _outputs(B, Q, K, h, w, aux=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda: {"pred_logits": torch.randn(B, Q, K + 1, generator=g, requires_grad=True),  # noqa: E731
                  "pred_masks": torch.randn(B, Q, h, w, generator=g, requires_grad=True)}
    out = mk()
    out["aux_outputs"] = [mk() for _ in range(aux)]
    return out


def test_criterion_class_loss_and_deep_supervision():
    B, Q, K = 2, 5, 4
    out = _outputs(B, Q, K, 8, 8)
    lab = torch.randint(0, K, (B, 16, 16))
    lab[1] = 255                                          # an image with nothing but ignore
    targets = semantic_targets(lab)
    crit = SetCriterion(K, num_points=64)
    calls = []
    match = crit.matcher.forward
    crit.matcher.forward = lambda o, t: calls.append(match(o, t)) or calls[-1]   # record the assignments
    losses = crit(out, targets)
    assert len(calls) == 3                                # final + 2 aux predictions, matched separately
    assert set(losses) == {"loss"} | {f"loss_{k}{s}" for k in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    # class term vs direct weighted cross-entropy with the matcher's assignment
    indices = calls[0]
    tgt = torch.full((B, Q), K)
    for b, (qi, ti) in enumerate(indices):
        tgt[b, qi] = targets[b]["labels"][ti]
    logp = out["pred_logits"].log_softmax(-1)
    wts = torch.where(tgt == K, 0.1, 1.0)
    direct = -(wts * logp.gather(-1, tgt[..., None])[..., 0]).sum() / wts.sum()
    torch.testing.assert_close(losses["loss_ce"], 2 * direct)
    assert len(indices[1][0]) == 0                        # all-ignore image: nothing matched
    losses["loss"].backward()
    assert out["pred_masks"].grad.abs().sum() > 0 and out["aux_outputs"][1]["pred_logits"].grad.abs().sum() > 0


def test_criterion_ignores_pixels_labelled_255():
    """Changing the predicted masks only where the label is 255 must not change the loss (uniform
    points, same seed -> same points; the matching is fixed by strong class logits). Rows 0-3 are
    ignored; rows 0-2 are changed (a bilinear sample of a valid point reads rows >= 3)."""
    B, Q, K, H = 1, 3, 2, 16
    lab = torch.zeros(B, H, H, dtype=torch.int64)
    lab[:, :, 8:] = 1
    lab[:, :4] = 255
    targets = semantic_targets(lab)
    logits = torch.full((B, Q, K + 1), -5.0)
    logits[0, 0, 0] = logits[0, 1, 1] = logits[0, 2, 2] = 5.0
    masks = torch.randn(B, Q, H, H)
    crit = SetCriterion(K, num_points=200, importance_sample_ratio=0.0)
    torch.manual_seed(0)
    a = crit({"pred_logits": logits, "pred_masks": masks}, targets)
    masks2 = masks.clone()
    masks2[:, :, :3] += 10 * torch.randn(B, Q, 3, H)
    torch.manual_seed(0)
    b = crit({"pred_logits": logits, "pred_masks": masks2}, targets)
    torch.testing.assert_close(a["loss_mask"], b["loss_mask"])
    torch.testing.assert_close(a["loss_dice"], b["loss_dice"])
    masks3 = masks.clone()
    masks3[:, :, 4:] += 10 * torch.randn(B, Q, H - 4, H)   # a change on labelled pixels does count
    torch.manual_seed(0)
    c = crit({"pred_logits": logits, "pred_masks": masks3}, targets)
    assert (c["loss_mask"] - a["loss_mask"]).abs() > 1e-3
