"""Test setup: Triton's interpreter on CPU-only machines, poisoned outputs, shared helpers."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is created (i.e. before lrformer_kernels imports).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lrformer_kernels._common as common  # noqa: E402

#: Relative-error tolerances (||out - ref|| / ||ref||) against a float64 reference, per dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def devices():
    """CPU always (the kernel under TRITON_INTERPRET=1) and CUDA when present."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dtypes_for(device):
    """float64 on the CPU interpreter; fp32/bf16/fp16 on CUDA."""
    if device == "cpu":
        return [torch.float64]
    return [torch.float32, torch.bfloat16, torch.float16]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf (never passes)."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if torch.isnan(out).any() or torch.isinf(out).any():
        return float("inf")
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every fused op allocates its outputs NaN-filled during the tests."""
    common.POISON_OUTPUTS = True
    yield
    common.POISON_OUTPUTS = False


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs on every run; the seed is printed so a failure can be replayed
    with LRFORMER_TEST_SEED=<seed>."""
    seed = int(os.environ.get("LRFORMER_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    print(f"[seed {seed}]")
