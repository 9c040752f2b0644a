"""The released query decoders against their golden cases (../shared/golden): LRFormer-T+ (encoder +
mmseg's Mask2Former head) and FASeg's decoder (LRFormer-T widths), outputs and gradients, float32 on
the CPU, for the reference model and the fused one (the Triton kernels under the interpreter).

Tolerances (../shared/golden/README.md): outputs 1e-5 relative; each gradient max(2e-5, 5 x the
released code's own float32-vs-float64 error stored beside it).
"""
import importlib.util
import json
import os

import pytest
import torch

import lrformer
import lrformer_kernels as K
from lrformer.decoders.faseg import FASegHead

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
GOLDEN = os.path.join(SHARED, "golden")
pytestmark = pytest.mark.skipif(not os.path.isdir(GOLDEN), reason="../shared/golden not present")


def _detweights():
    spec = importlib.util.spec_from_file_location("detweights", os.path.join(GOLDEN, "detweights.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _case(file):
    case = torch.load(os.path.join(GOLDEN, file), weights_only=False)
    return next(iter(case.values()))


def rel(a, b):
    return ((a.detach().double() - b.double()).norm() / b.double().norm()).item()


def _check(out, g, grads, grad_names, noise):
    """Outputs within 1e-5, gradients within max(2e-5, 5 x noise)."""
    assert rel(out["pred_logits"], g["pred_logits"]) < 1e-5
    assert rel(out["pred_masks"], g["pred_masks"]) < 1e-5
    assert len(out["aux_outputs"]) == len(g["aux"])
    for a, b in zip(out["aux_outputs"], g["aux"]):
        assert rel(a["pred_logits"], b["pred_logits"]) < 1e-5
        assert rel(a["pred_masks"][:, g["aux_mask_queries"]], b["pred_masks"]) < 1e-5
    for name, grad in zip(grad_names, grads):
        ref = g["grad_params"][name[len("grad_params."):]] if name.startswith("grad_params.") else None
        if ref is None:
            ref = g[name] if name in g else g["grad_inputs"][int(name[len("grad_inputs["):-1])]
        tol = max(2e-5, 5 * noise[name])
        assert rel(grad, ref) < tol, (name, rel(grad, ref), tol)


def _loss(out, det):
    R = det.det_input(out["pred_masks"].shape, seed=99)
    R2 = det.det_input(out["pred_logits"].shape, seed=98)
    return (out["pred_masks"] * R).sum() + (out["pred_logits"] * R2).sum()


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_lrformer_t_plus_golden(fused):
    det = _detweights()
    g = _case("lrformer_t_plus_1x3x128x128.pt")
    keys = json.load(open(os.path.join(SHARED, "official_plus_state_dict_keys.json")))["lrformer_t_plus"]
    model = lrformer.create_model("lrformer_t_plus", num_classes=150)
    model.load_state_dict(det.det_state_dict(keys["state_dict"]), strict=True)
    model.eval()
    if fused:
        K.fuse(model)
    x = det.det_input(g["input_shape"]).requires_grad_()
    out = model(x)
    names = list(g["grad_params"])
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(_loss(out, det), [x] + [params[n] for n in names])
    _check(out, g, grads, ["grad_input"] + [f"grad_params.{n}" for n in names], g["fp32_vs_fp64_rel_err"])
    assert abs(_loss(out, det).item() - g["loss"]) < 1e-5 * abs(g["loss"])
    # the released semantic prediction at the image size (no padding needed at 128x128)
    scores = model.predict(x.detach(), return_labels=False)
    assert tuple(scores.shape) == tuple(g["seg_logits_shape"])
    assert rel(scores[:, g["seg_logits_classes"]], g["seg_logits"]) < 1e-5
    assert rel(scores.sum(1), g["seg_logits_class_sum"]) < 1e-5


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_faseg_decoder_golden(fused):
    det = _detweights()
    g = _case("faseg_lrformer_t_2x128x256.pt")
    keys = json.load(open(os.path.join(SHARED, "faseg_state_dict_keys.json")))["faseg_lrformer_t"]
    head = FASegHead(keys["in_channels"], keys["num_classes"])
    head.load_state_dict(det.det_state_dict(keys["state_dict"]), strict=True)
    assert sum(p.numel() for p in head.parameters()) == keys["params"]
    head.eval()
    if fused:
        K.fuse(head)
    feats = [det.det_input(s, seed=sd).requires_grad_() for s, sd in zip(g["input_shapes"], g["input_seeds"])]
    out = head(feats)
    assert {k: v.tolist() for k, v in head.predictor.last_windows.items()} == g["diag_hrca_selected_windows"]
    names = list(g["grad_params"])
    params = dict(head.named_parameters())
    grads = torch.autograd.grad(_loss(out, det), feats + [params[n] for n in names])
    _check(out, g, grads, [f"grad_inputs[{i}]" for i in range(4)] + [f"grad_params.{n}" for n in names],
           g["fp32_vs_fp64_rel_err"])
