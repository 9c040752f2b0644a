"""lrformer_kernels.compat: the Deformable-DETR / Mask2Former / mmcv calling convention of multi-scale
deformable attention, against the pure-PyTorch grid_sample formula those projects ship as their CPU
fallback (written here from its definition), forward and backward, float64 (the fused kernel under the
interpreter on CPU)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from lrformer_kernels import compat

SHAPES = [(7, 9), (4, 5), (2, 3), (1, 1)]


def formula(value, shapes, locations, weights):
    """Deformable DETR's ms_deform_attn_core_pytorch, from its definition: per level, the head-split value
    map (B*heads, D, H, W) bilinearly sampled (grid_sample, zeros, align_corners=False) at 2 * loc - 1,
    the L*P samples weighted and summed -> (B, Nq, heads*D)."""
    B, _, M, D = value.shape
    _, Nq, _, L, P, _ = locations.shape
    levels = value.split([h * w for h, w in shapes], dim=1)
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        v = levels[lvl].flatten(2).transpose(1, 2).reshape(B * M, D, h, w)
        g = (2 * locations[:, :, :, lvl] - 1).transpose(1, 2).flatten(0, 1)       # (B*M, Nq, P, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    wts = weights.transpose(1, 2).reshape(B * M, 1, Nq, L * P)
    out = (torch.stack(samples, dim=-2).flatten(-2) * wts).sum(-1).view(B, M * D, Nq)
    return out.transpose(1, 2).contiguous()


def inputs(B=2, Nq=11, M=2, D=5, P=3, dtype=torch.float64):
    S = sum(h * w for h, w in SHAPES)
    value = torch.randn(B, S, M, D, dtype=dtype)
    loc = torch.rand(B, Nq, M, len(SHAPES), P, 2, dtype=dtype) * 1.2 - 0.1
    w = torch.rand(B, Nq, M, len(SHAPES), P, dtype=dtype).softmax(-1)
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    return value, shapes, start, loc, w


@pytest.mark.parametrize("entry", ["function", "apply", "mmcv_apply", "pytorch"])
def test_matches_the_grid_sample_formula_forward_and_backward(entry):
    value, shapes, start, loc, w = (t.requires_grad_() if t.is_floating_point() else t for t in inputs())
    call = {"function": lambda: compat.multi_scale_deformable_attn(value, shapes, start, loc, w, 64),
            "apply": lambda: compat.MSDeformAttnFunction.apply(value, shapes, start, loc, w, 64),
            "mmcv_apply": lambda: compat.MultiScaleDeformableAttnFunction.apply(value, shapes, start, loc, w, 64),
            "pytorch": lambda: compat.multi_scale_deformable_attn_pytorch(value, shapes, loc, w)}[entry]
    out = call()
    ref = formula(value, SHAPES, loc, w)
    assert out.shape == ref.shape == (2, 11, 10) and rel_err(out, ref) < 1e-12
    g = torch.randn_like(ref)
    for name, a, b in zip(("value", "locations", "weights"), torch.autograd.grad(out, (value, loc, w), g),
                          torch.autograd.grad(ref, (value, loc, w), g)):
        assert rel_err(a, b) < 1e-12, name


def test_mixed_dtypes_and_bad_inputs():
    value, shapes, start, loc, w = inputs()
    out = compat.multi_scale_deformable_attn(value.float(), shapes, start, loc, w.float())   # fp32 value
    assert out.dtype == torch.float32
    assert rel_err(out, formula(value, SHAPES, loc, w)) < 1e-6
    with pytest.raises(ValueError, match="value_level_start_index"):
        compat.multi_scale_deformable_attn(value, shapes, start + 1, loc, w)
    with pytest.raises(ValueError, match="value_spatial_shapes must be"):
        compat.multi_scale_deformable_attn(value, shapes.flatten(), start, loc, w)
    with pytest.raises(TypeError, match="sampling_locations must be a torch.Tensor"):
        compat.multi_scale_deformable_attn(value, shapes, start, loc.tolist(), w)


def module_formula(mod, query, value, ref, shapes, mask=None, identity=None, query_pos=None):
    """mmcv MultiScaleDeformableAttention.forward (batch-first tensors) from its definition."""
    q = query if query_pos is None else query + query_pos
    B, Nq, _ = q.shape
    M, L, P = mod.num_heads, mod.num_levels, mod.num_points
    v = mod.value_proj(value)
    if mask is not None:
        v = v.masked_fill(mask[..., None], 0.0)
    v = v.view(B, value.shape[1], M, -1)
    off = mod.sampling_offsets(q).view(B, Nq, M, L, P, 2)
    wts = mod.attention_weights(q).view(B, Nq, M, L * P).softmax(-1).view(B, Nq, M, L, P)
    if ref.shape[-1] == 2:
        norm = torch.tensor([[w, h] for h, w in shapes], dtype=q.dtype)
        loc = ref[:, :, None, :, None, :] + off / norm[None, None, None, :, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + off / P * ref[:, :, None, :, None, 2:] * 0.5
    return mod.output_proj(formula(v, shapes, loc, wts)) + (query if identity is None else identity)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_mmcv_module(batch_first, ref_dim):
    torch.manual_seed(0)
    mod = compat.MultiScaleDeformableAttention(embed_dims=16, num_heads=2, num_levels=len(SHAPES), num_points=3,
                                               dropout=0.0, batch_first=batch_first).double()
    assert sorted(n for n, _ in mod.named_parameters()) == sorted(
        f"{m}.{p}" for m in ("sampling_offsets", "attention_weights", "value_proj", "output_proj") for p in ("weight", "bias"))
    assert mod.sampling_offsets.weight.shape == (2 * 4 * 3 * 2, 16)
    with torch.no_grad():                                # leave the init: random offsets and weights
        mod.sampling_offsets.weight.normal_(0, 0.3)
        mod.attention_weights.weight.normal_(0, 0.3)
    B, Nq, S = 2, 9, sum(h * w for h, w in SHAPES)
    query = torch.randn(B, Nq, 16, dtype=torch.float64, requires_grad=True)
    value = torch.randn(B, S, 16, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(B, Nq, 16, dtype=torch.float64)
    ref = torch.rand(B, Nq, len(SHAPES), ref_dim, dtype=torch.float64) * (0.5 if ref_dim == 4 else 1.0)
    mask = torch.rand(B, S) < 0.2
    shapes = torch.tensor(SHAPES)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    t = (lambda x: x) if batch_first else (lambda x: x.transpose(0, 1))
    out = mod(t(query), value=t(value), query_pos=t(pos), key_padding_mask=mask, reference_points=ref,
              spatial_shapes=shapes, level_start_index=start)
    want = module_formula(mod, query, value, ref, SHAPES, mask=mask, query_pos=pos)
    assert rel_err(t(out), want) < 1e-12
    g = torch.randn_like(want)
    params = [query, value] + list(mod.parameters())
    for a, b in zip(torch.autograd.grad(t(out), params, g), torch.autograd.grad(want, params, g)):
        assert rel_err(a, b) < 1e-11
