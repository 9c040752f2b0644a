"""The traffic model's torch.compile columns (benchmarks/sweeps/inductor.py): inductor scheduled for a
modelled CUDA device on fake tensors, its own byte count, hand-checked; the fused ops' extras added; the
environment restored afterwards; a small case of each path end to end."""
import torch
import torch._inductor.config as inductor_config
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.sweeps import traffic as T
from benchmarks.sweeps.inductor import InductorCount


def _compiled(fn, *shapes, backward=False):
    ic = InductorCount(T.FUSED_EXTRA)
    with ic.device(), FakeTensorMode(allow_non_fake_inputs=True):
        args = [torch.empty(*s, requires_grad=backward) for s in shapes]
        out = ic.count(fn)(*args)
        if backward:
            out.sum().backward()
    return ic


def _f(x, w):
    return torch.nn.functional.gelu(x @ w).sum(-1) + x.mean(-1)


def test_hand_checked_graph():
    """fp32 x (1024, 256) @ w (256, 256): the matmul is an extern call (reads x and w, writes the product);
    GELU, both row reductions and the add are one generated kernel (reads the product and x, writes 1024)."""
    ic = _compiled(_f, (1024, 256), (256, 256))
    x, w, p, out = 1024 * 256 * 4, 256 * 256 * 4, 1024 * 256 * 4, 1024 * 4
    assert ic.graphs == 1
    assert sorted(ic.kernels) == sorted([("ExternKernelSchedulerNode", x + w + p), ("FusedSchedulerNode", p + x + out)])
    assert ic.bytes == x + w + p + p + x + out


def test_counts_whatever_has_triton_said_before(monkeypatch):
    """Inductor refuses to schedule for a GPU when ``has_triton()`` says no (as it can after an earlier caller
    without a usable Triton, e.g. a CPU-only run that cached the answer): the modelled device answers yes
    for the count and the caller's answer is back afterwards."""
    import torch._inductor.scheduler as scheduler
    monkeypatch.setattr(scheduler, "has_triton", lambda: False)
    ic = _compiled(_f, (1024, 256), (256, 256))
    assert ic.graphs == 1 and ic.bytes == 2 * (1024 * 256 * 4) * 2 + 256 * 256 * 4 + 1024 * 4
    assert scheduler.has_triton() is False


def test_backward_graph_counted_and_patches_restored():
    props, ctm = torch.cuda.get_device_properties, torch._inductor.graph.GraphLowering.compile_to_module
    fallback = inductor_config.fallback_random
    ic = _compiled(_f, (1024, 256), (256, 256), backward=True)
    assert ic.graphs == 2 and ic.bytes > 2 * (1024 * 256 * 4)          # forward and backward scheduled
    assert torch.cuda.get_device_properties is props and not torch.cuda.is_available()
    assert torch._inductor.graph.GraphLowering.compile_to_module is ctm
    assert inductor_config.fallback_random == fallback


def test_fused_op_adds_its_extra():
    """A fused op stays one extern call of the compiled graph (its arguments read, its output written) plus its
    stated extra (the depthwise conv forward: the (9, C) weight copy written and read)."""
    import lrformer_kernels as K
    B, H, W, C = 2, 8, 8, 32
    ic = _compiled(lambda x, wt, b: K.dwconv3x3(x, wt, b), (B, H, W, C), (C, 1, 3, 3), (C,))
    io = (2 * B * H * W * C + 9 * C + C) * 4
    assert ic.bytes == io + 2 * 9 * C * 4, ic.kernels


def test_case_rows_with_compile_columns():
    """A small stage-1 Block fwd+bwd, eager and fused, through torch.compile: both columns filled; inductor
    moves less than eager (it fuses the elementwise glue), the fused path less than either compiled model."""
    row = T.traffic_row(lambda: T._stage_module("Block", 1), T._module_run((1, 16, 16, 64), True))
    assert 0 < row["compile_bytes"] < row["eager_bytes"]
    assert 0 < row["fused_bytes"] < min(row["compile_bytes"], row["fused_compile_bytes"])
    assert row["compile_ratio"] == round(row["compile_bytes"] / row["fused_bytes"], 3)
