"""The fused LRFormer (lrformer_kernels.fuse) against the reference model.

On CPU the fused modules run the Triton kernels under the interpreter (float64, small settings: query
grids of 4 instead of 16 keep the interpreter's program count low; the kernels themselves are tested at
the real grid sizes in the op tests).  On CUDA the same comparisons run in fp32 and bf16.
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lrformer
import lrformer_kernels as K
from conftest import devices, rel_err

SMALL = dict(embed_dims=(16, 32, 40, 48), depths=(1, 1, 2, 1), head_channels=32, q_size=4,
             head_q_size=4, head_kv_sizes=(3, 2, 2, 1))


def pair(device, dtype, **kw):
    cfg = dict(SMALL, drop_path_rate=0.0, dropout=0.0)
    cfg.update(kw)
    ref = lrformer.create_model("lrformer_t", num_classes=5, **cfg)
    for name, p in ref.named_parameters():  # layer scales of 1e-6 would hide the attention branch
        if "layer_scale" in name:
            nn.init.uniform_(p, 0.5, 1.5)
    ref = ref.to(device=device, dtype=dtype)
    return ref, K.fuse(copy.deepcopy(ref))


def grad_errors(fused, ref):
    """Relative error of every parameter gradient; tiny exact-zero gradients (conv biases before a
    train-mode BatchNorm) are judged against the norm of all gradients instead of their own."""
    gnorm = math.sqrt(sum(p.grad.double().norm().item() ** 2 for p in ref.parameters()))
    out = {}
    for (name, a), b in zip(fused.named_parameters(), ref.parameters()):
        den = max(b.grad.double().norm().item(), 1e-6 * gnorm)
        out[name] = (a.grad.double() - b.grad.double()).norm().item() / den
    return out


def cases():
    out = [("cpu", torch.float64, 1e-10)]
    if torch.cuda.is_available():
        out += [("cuda", torch.float32, 1e-4), ("cuda", torch.bfloat16, 5e-2)]
    return out


@pytest.mark.parametrize("device,dtype,tol", cases())
@pytest.mark.parametrize("size", [(32, 32), (40, 24), (37, 29)])
def test_fused_matches_reference_fwd_bwd(device, dtype, tol, size):
    ref, fused = pair(device, dtype)
    assert fused.fuse_report["Block"] == 7
    ref.train()
    fused.train()
    x = torch.randn(2, 3, *size, device=device, dtype=dtype)
    out_r, out_f = ref(x), fused(x)
    assert out_f.shape == out_r.shape
    assert rel_err(out_f, out_r) < tol
    g = torch.randn_like(out_r)
    (out_r * g).sum().backward()
    (out_f * g).sum().backward()
    errs = grad_errors(fused, ref)
    worst = max(errs, key=errs.get)
    assert errs[worst] < (tol if dtype != torch.bfloat16 else 0.2), (worst, errs[worst])


def test_fused_eval_and_create_model_fused():
    ref, _ = pair("cpu", torch.float64)
    model = lrformer.create_model("lrformer_t", num_classes=5, fused=True, **dict(SMALL, dropout=0.0))
    model.load_state_dict(ref.state_dict())
    assert model.backbone.block1[0].ops is K.FUSED
    assert model.decode_head.fuse_block2.attn.ops is K.FUSED
    assert model.backbone.block2[0].mlp.ops is K.FUSED
    assert set(model.state_dict()) == set(ref.state_dict())
    model, ref = model.double().eval(), ref.eval()
    x = torch.randn(1, 3, 27, 45, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) < 1e-10
    K.unfuse(model)
    assert type(model.backbone.block1[0]) is lrformer.Block and type(model.backbone.block1[0].attn) is lrformer.LRSA
    assert not any(getattr(m, "fused", False) for m in model.modules())
    assert model.backbone.block1[0].ops is K.REFERENCE


def test_training_loss_curves_agree():
    """30 SGD steps on a fixed synthetic batch (drop path off): fused and reference losses agree."""
    ref, fused = pair("cpu", torch.float64, depths=(1, 1, 1, 1), embed_dims=(8, 16, 20, 32), head_channels=16)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 16, 16))
    labels[:, :3] = 255
    curves = []
    for model in (ref, fused):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(30):
            loss = model.loss(x, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    r, f = torch.tensor(curves[0]), torch.tensor(curves[1])
    assert r[-1] < r[0]  # it learns
    assert (r - f).abs().max().item() < 1e-6 * r.abs().max().item()


def test_gradient_checkpointing_and_drop_path_train():
    ref, fused = pair("cpu", torch.float64, drop_path_rate=0.5)
    fused.backbone.grad_checkpointing = True
    fused.train()
    x = torch.randn(2, 3, 24, 32, dtype=torch.float64)
    torch.manual_seed(3)
    out_c = fused(x)
    out_c.square().mean().backward()
    grads_c = [p.grad.clone() for p in fused.parameters()]
    fused.zero_grad()
    fused.backbone.grad_checkpointing = False
    torch.manual_seed(3)
    out = fused(x)
    out.square().mean().backward()
    assert torch.allclose(out_c, out, rtol=1e-12, atol=1e-12)  # same drop-path draws
    for a, p in zip(grads_c, fused.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-9, atol=1e-12)
    torch.manual_seed(4)
    ref.train()
    x = torch.randn(4, 3, 24, 32, dtype=torch.float64)
    # drop path is random per sample: two training passes differ, eval passes do not
    assert not torch.allclose(fused(x), fused(x))


def _compile_backend():
    """inductor on CUDA (what a user gets); on CPU aot_eager: the same dynamo capture (fullgraph) and
    AOTAutograd forward/backward graphs around the opaque custom ops, without inductor's C++ codegen
    (minutes per graph on a 2-core CI machine)."""
    return "inductor" if torch.cuda.is_available() else "aot_eager"


@pytest.mark.parametrize("device,dtype,tol", cases())
def test_torch_compile_of_the_fused_encoder_fullgraph(device, dtype, tol):
    """torch.compile(fuse(encoder), fullgraph=True): one graph (a graph break raises), equal to the
    reference encoder forward and backward; the fused ops stay single opaque nodes."""
    from torch import _dynamo
    _dynamo.reset()
    ref, fused = pair(device, dtype, depths=(1, 1, 1, 1))
    ref_enc, enc = ref.backbone.train(), fused.backbone.train()
    compiled = torch.compile(enc, fullgraph=True, dynamic=False, backend=_compile_backend())
    x = torch.randn(2, 3, 40, 24, device=device, dtype=dtype)
    outs_c, outs_r = compiled(x), ref_enc(x)
    for a, b in zip(outs_c, outs_r):
        assert rel_err(a, b) < tol
    g = [torch.randn_like(o) for o in outs_r]
    torch.autograd.backward(outs_c, g)
    torch.autograd.backward(outs_r, g)
    for name, err in grad_errors(enc, ref_enc).items():
        assert err < 10 * tol, name


@pytest.mark.parametrize("device,dtype,tol", cases())
def test_torch_compile_of_the_fused_model_training_step(device, dtype, tol):
    """A training step with torch.compile(fuse(model), fullgraph=True): forward, the segmentor's loss,
    backward and two AdamW steps (drop path on) track the eager reference step for step."""
    from torch import _dynamo
    _dynamo.reset()
    ref, fused = pair(device, dtype, drop_path_rate=0.1, depths=(1, 1, 1, 1))
    ref.train()
    fused.train()
    compiled = torch.compile(fused, fullgraph=True, dynamic=False, backend=_compile_backend())
    opt_r, opt_f = (torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, fused))
    for step in range(2):
        x = torch.randn(2, 3, 32, 40, device=device, dtype=dtype)
        y = torch.randint(0, 5, (2, 32, 40), device=device)
        torch.manual_seed(step)
        loss_f = fused.loss(x, y, logits=compiled(x))
        torch.manual_seed(step)
        loss_r = ref.loss(x, y)
        assert abs(loss_f.item() - loss_r.item()) < tol * abs(loss_r.item())
        loss_f.backward()
        loss_r.backward()
        for name, err in grad_errors(fused, ref).items():
            assert err < 10 * tol, (step, name)
        for opt in (opt_r, opt_f):
            opt.step()
            opt.zero_grad(set_to_none=True)


def test_torch_compile_fused_model_fullgraph():
    ref, fused = pair("cpu", torch.float64, depths=(1, 1, 1, 1))
    fused.eval()
    x = torch.randn(1, 3, 32, 24, dtype=torch.float64)
    with torch.no_grad():
        expect = ref.eval()(x)
        compiled = torch.compile(fused, fullgraph=True, dynamic=False, backend="aot_eager")
        assert rel_err(compiled(x), expect) < 1e-10


# -------------------------------------------------------------------------------------------------
# A stand-in for the released code: class and attribute names of the released LRFormer
# (PoolingAttention, Block, IRB, d_convs), tokens (B, N, C) with H, W passed along, written
# independently in NCHW the way the released code computes.
# -------------------------------------------------------------------------------------------------
def _grid(H, W, p):
    return (p, round(W * p / H + 0.001)) if W >= H else (round(H * p / W + 0.001), p)


class PoolingAttention(nn.Module):
    def __init__(self, dim, num_heads, q_pooled_size, head=False):
        super().__init__()
        self.num_heads, self.q_pooled_size, self.head = num_heads, q_pooled_size, head
        self.scale = (dim // num_heads) ** -0.5
        if head:
            self.q = nn.Conv2d(dim, dim, 1)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.q = nn.Sequential(nn.Linear(dim, dim))
            self.kv = nn.Sequential(nn.Linear(dim, 2 * dim))
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x, H, W, d_convs=None):  # x: NCHW map
        B, C = x.shape[:2]
        qs = self.q_pooled_size
        sizes = [round(t * qs / 16 + 0.001) for t in (11, 8, 6, 4)]
        qm = F.adaptive_avg_pool2d(x, _grid(H, W, qs))
        hq, wq = qm.shape[-2:]
        if self.head:
            q = self.q(qm).flatten(2).transpose(1, 2)
        else:
            q = self.q(qm.flatten(2).transpose(1, 2))
        pools = []
        for i, s in enumerate(sizes):
            p = F.adaptive_avg_pool2d(x, _grid(H, W, s))
            if d_convs is not None:
                p = p + d_convs[i](p)
            pools.append(p.flatten(2))
        kv = self.kv(self.norm(torch.cat(pools, 2).transpose(1, 2)))
        d = C // self.num_heads
        q = q.reshape(B, -1, self.num_heads, d).transpose(1, 2)
        kv = kv.reshape(B, -1, 2, self.num_heads, d).permute(2, 0, 3, 1, 4)
        attn = (q @ kv[0].transpose(-2, -1) * self.scale).softmax(-1)
        o = self.proj((attn @ kv[1]).transpose(1, 2).reshape(B, -1, C))
        o = o.transpose(1, 2).reshape(B, C, hq, wq)
        return F.interpolate(o, size=(H, W), mode="bilinear", align_corners=False)


class IRB(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):  # NCHW
        h = self.act(self.fc1(x))
        return self.fc2(h + self.conv(h))


class Block(nn.Module):
    """Encoder flavour (LayerNorm, tokens) or head flavour (BatchNorm, NCHW)."""

    def __init__(self, dim, num_heads, q_pooled_size, head=False):
        super().__init__()
        self.head = head
        self.layer_scale_1 = nn.Parameter(torch.rand(dim) + 0.5)
        self.layer_scale_2 = nn.Parameter(torch.rand(dim) + 0.5)
        self.norm1 = nn.BatchNorm2d(dim) if head else nn.LayerNorm(dim, eps=1e-6)
        self.attn = PoolingAttention(dim, num_heads, q_pooled_size, head)
        self.norm2 = nn.BatchNorm2d(dim) if head else nn.LayerNorm(dim, eps=1e-6)
        self.mlp = IRB(dim, 2 * dim)
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def _n(self, norm, x):  # x: NCHW
        return norm(x) if self.head else norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x, H=None, W=None, d_convs=None):
        if not self.head:
            B, N, C = x.shape
            x = x.transpose(1, 2).reshape(B, C, H, W)
        H, W = x.shape[-2:]
        x = x + self.cpe(x)
        x = x + self.layer_scale_1[:, None, None] * self.attn(self._n(self.norm1, x), H, W, d_convs)
        x = x + self.layer_scale_2[:, None, None] * self.mlp(self._n(self.norm2, x))
        return x if self.head else x.flatten(2).transpose(1, 2)


class ReleasedStyleModel(nn.Module):
    def __init__(self, dim=24, heads=3, qs=4):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.d_convs1 = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in range(4))
        self.block1 = nn.ModuleList(Block(dim, heads, qs) for _ in range(2))
        self.fuse_block1 = Block(dim, heads, 2 * qs, head=True)

    def forward(self, img):
        x = self.patch(img)
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        for blk in self.block1:
            x = blk(x, H, W, self.d_convs1)
        x = x.transpose(1, 2).reshape(B, C, H, W)
        return self.fuse_block1(x)


def test_fuse_released_code_structure():
    ref = ReleasedStyleModel().double().train()
    keys = list(ref.state_dict())
    fused = K.fuse(copy.deepcopy(ref))
    assert fused.fuse_report == {"PoolingAttention -> FusedPoolingAttention": 3, "IRB -> FusedIRB": 3}
    assert isinstance(fused.block1[0].attn, K.FusedPoolingAttention)
    assert isinstance(fused.fuse_block1.mlp, K.FusedIRB)
    assert list(fused.state_dict()) == keys
    x = torch.randn(2, 3, 36, 52, dtype=torch.float64)
    out_r, out_f = ref(x), fused(x)
    assert rel_err(out_f, out_r) < 1e-10
    g = torch.randn_like(out_r)
    (out_r * g).sum().backward()
    (out_f * g).sum().backward()
    errs = grad_errors(fused, ref)
    assert max(errs.values()) < 1e-9, max(errs, key=errs.get)
    K.unfuse(fused)
    assert type(fused.block1[0].attn) is PoolingAttention and type(fused.fuse_block1.mlp) is IRB
    fused.eval(), ref.eval()
    with torch.no_grad():
        assert rel_err(fused(x), ref(x)) < 1e-12


def test_fuse_reports_nothing_on_other_models(capsys):
    m = nn.Sequential(nn.Linear(3, 3))
    assert K.fuse(m, verbose=True) is m
    assert m.fuse_report == {}
    assert "nothing fused" in capsys.readouterr().out
