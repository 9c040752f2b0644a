"""Fused segmentation loss (cross-entropy on bilinearly upsampled logits): kernel vs the float64 reference
``F.cross_entropy(F.interpolate(...))``, forward and backward."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import lrformer_kernels._common as common
from conftest import TOL, devices, dtypes_for, rel_err
from lrformer_kernels import upsampled_cross_entropy, upsampled_cross_entropy_reference

mod = importlib.import_module("lrformer_kernels.upsampled_cross_entropy")

# (B, K, (h, w), (H, W)): 8x upsampling (the segmentor's), odd / non-square sizes, a map smaller than a
# tile, identity and down-sampling, one class tile and several (K = 37 > 32 on the GPU config)
CASES = [
    (2, 5, (3, 4), (24, 31)),
    (1, 37, (5, 7), (40, 56)),
    (3, 3, (6, 6), (6, 6)),
    (1, 4, (8, 9), (3, 5)),
    (3, 7, (1, 1), (5, 3)),
]


def _inputs(B, K, hw, HW, device, dtype, nchw=True, ignored=0.2, label_dtype=torch.int64):
    h, w = hw
    if nchw:
        logits = 3 * torch.randn(B, K, h, w, device=device, dtype=dtype)
    else:  # channels-last memory (what conv_seg gives for a channels-last input), seen as NCHW
        logits = 3 * torch.randn(B, h, w, K, device=device, dtype=dtype).permute(0, 3, 1, 2)
    labels = torch.randint(0, K, (B, *HW), device=device)
    labels[torch.rand(B, *HW, device=device) < ignored] = 255
    return logits, labels.to(label_dtype)


def _check(logits, labels, dtype, ignore_index=255):
    z = logits.detach().requires_grad_(True)
    loss = upsampled_cross_entropy(z, labels, ignore_index)
    assert loss.dim() == 0 and loss.dtype == common.acc_dtype(dtype)
    g = torch.rand((), dtype=loss.dtype, device=loss.device) + 0.5
    (dz,) = torch.autograd.grad(loss, z, g)
    zr = logits.detach().double().requires_grad_(True)
    up = F.interpolate(zr, size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
    ref = F.cross_entropy(up, labels.long(), ignore_index=ignore_index)
    (dzr,) = torch.autograd.grad(ref, zr, g.double())
    tol = TOL[dtype]
    assert abs(loss.double().item() - ref.item()) <= tol * abs(ref.item()), (loss.item(), ref.item())
    assert dz.dtype == dtype and dz.shape == logits.shape
    assert rel_err(dz, dzr) < tol, rel_err(dz, dzr)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}_K{c[1]}_{c[2][0]}x{c[2][1]}to{c[3][0]}x{c[3][1]}")
def test_forward_backward(case, device):
    for dtype in dtypes_for(device):
        _check(*_inputs(*case, device, dtype), dtype)


@pytest.mark.parametrize("device", devices())
def test_gpu_tiles_layouts_label_dtypes_and_int64(device, monkeypatch):
    """The CUDA dispatch's tiles (several class tiles, several low-column tiles and label-column chunks),
    channels-last logits, uint8/int32 labels, and the int64-offset path."""
    monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)
    for dtype in dtypes_for(device):
        _check(*_inputs(2, 40, (6, 5), (47, 38), device, dtype, nchw=False, label_dtype=torch.uint8), dtype)
        _check(*_inputs(1, 150, (3, 12), (24, 96), device, dtype, label_dtype=torch.int32), dtype)
        monkeypatch.setattr(mod, "needs_int64", lambda *t: True)
        _check(*_inputs(2, 33, (4, 3), (17, 30), device, dtype), dtype)
        monkeypatch.setattr(mod, "needs_int64", common.needs_int64)


@pytest.mark.parametrize("device", devices())
def test_ignore_index_edge_cases(device):
    """No ignored pixel; every pixel of one sample ignored; every pixel ignored (NaN loss, as
    F.cross_entropy, and a zero gradient); another ignore index."""
    dtype = dtypes_for(device)[0]
    logits, labels = _inputs(2, 6, (3, 5), (20, 37), device, dtype, ignored=0.0)
    _check(logits, labels, dtype)
    labels[1] = 255
    _check(logits, labels, dtype)
    labels[:] = 255
    z = logits.detach().requires_grad_(True)
    loss = upsampled_cross_entropy(z, labels)
    ref = upsampled_cross_entropy_reference(logits.double(), labels)
    assert torch.isnan(loss) and torch.isnan(ref)
    (dz,) = torch.autograd.grad(loss, z)
    assert torch.equal(dz, torch.zeros_like(dz))
    logits, labels = _inputs(2, 6, (3, 5), (20, 37), device, dtype, ignored=0.0)
    labels[0, :4] = -1
    _check(logits, labels, dtype, ignore_index=-1)


def test_reference_matches_the_segmentor_formula():
    """The op's reference is the released loss: F.cross_entropy on F.interpolate'd float32 logits."""
    logits, labels = _inputs(2, 5, (3, 4), (24, 31), "cpu", torch.float32)
    up = F.interpolate(logits, size=(24, 31), mode="bilinear", align_corners=False)
    want = F.cross_entropy(up, labels, ignore_index=255)
    assert torch.equal(upsampled_cross_entropy_reference(logits, labels), want)


def test_reference_fallback_path(monkeypatch):
    """The PyTorch path the op takes when no kernel can run (CPU without the interpreter)."""
    monkeypatch.setattr(mod, "use_kernel", lambda *t: False)
    for case in CASES[:2]:
        for dtype in (torch.float64, torch.float32):
            _check(*_inputs(*case, "cpu", dtype), dtype)


def test_deterministic():
    logits, labels = _inputs(2, 37, (4, 6), (31, 45), "cpu", torch.float32)
    runs = []
    for _ in range(2):
        z = logits.detach().requires_grad_(True)
        loss = upsampled_cross_entropy(z, labels)
        runs.append((loss, torch.autograd.grad(loss, z)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_gradcheck_and_opcheck():
    logits, labels = _inputs(1, 3, (2, 3), (5, 7), "cpu", torch.float64)
    z = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: upsampled_cross_entropy(a, labels), (z,), eps=1e-6, atol=1e-7,
                                    fast_mode=True)
    torch.library.opcheck(torch.ops.lrformer.upsampled_cross_entropy, (z, labels, 255),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_fake_tensor_shapes():
    """The op under FakeTensorMode (what torch.compile traces): never allocates the upsampled logits."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        z = torch.empty(8, 150, 64, 64, dtype=torch.bfloat16, requires_grad=True)
        labels = torch.empty(8, 512, 512, dtype=torch.int64)
        loss = upsampled_cross_entropy(z, labels)
        (dz,) = torch.autograd.grad(loss, z)
    assert loss.shape == () and loss.dtype == torch.float32 and dz.shape == z.shape and dz.dtype == torch.bfloat16


def test_bad_inputs():
    z = torch.randn(2, 5, 3, 4)
    y = torch.randint(0, 5, (2, 24, 32))
    with pytest.raises(TypeError, match="logits"):
        upsampled_cross_entropy(z.numpy(), y)
    with pytest.raises(ValueError, match="logits"):
        upsampled_cross_entropy(z[0], y)
    with pytest.raises(TypeError, match="labels"):
        upsampled_cross_entropy(z, y.float())
    with pytest.raises(TypeError, match="labels"):
        upsampled_cross_entropy(z, y.numpy())
    with pytest.raises(ValueError, match="labels"):
        upsampled_cross_entropy(z, y[0])
    with pytest.raises(ValueError, match="batch"):
        upsampled_cross_entropy(z, y[:1])
    with pytest.raises(ValueError, match="labels hold 5"):
        upsampled_cross_entropy(z, torch.full((2, 24, 32), 5))
    with pytest.raises(ValueError, match="labels hold -1"):
        upsampled_cross_entropy(z, torch.full((2, 24, 32), -1))
    with pytest.raises(ValueError, match="ignore_index=3"):
        upsampled_cross_entropy(z, y, ignore_index=3)
    with pytest.raises(TypeError, match="ignore_index"):
        upsampled_cross_entropy(z, y, ignore_index=255.0)
    with pytest.raises(TypeError, match="logits"):
        upsampled_cross_entropy(z.long(), y)
    with pytest.raises(ValueError, match="labels"):
        upsampled_cross_entropy(z, torch.zeros(2, 0, 4, dtype=torch.long))


def test_fused_segmentor_loss_never_forms_the_upsampled_logits():
    """The model's training loss, fused: no tensor of the upsampled logits' size (B, K, H, W) is created in
    the forward or the backward (the reference path creates several), counted on the meta device."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import lrformer
    import lrformer_kernels

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numels = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.numels += [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            return out

    B, K, H, W = 2, 150, 256, 320
    for fused in (False, True):
        with torch.device("meta"):
            model = lrformer.create_model("lrformer_t", num_classes=K)
        if fused:
            lrformer_kernels.fuse(model)
        images = torch.empty(B, 3, H, W, device="meta")
        labels = torch.empty(B, H, W, device="meta", dtype=torch.long)
        logits = model(images).detach().requires_grad_(True)
        with Sizes() as s:
            model.loss(images, labels, logits).backward()
        big = [n for n in s.numels if n >= B * K * H * W]
        assert (not big) if fused else big, (fused, big)
