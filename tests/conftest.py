"""Test setup: Triton's interpreter on CPU-only machines, poisoned outputs, shared helpers."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is created (i.e. before lrformer_kernels imports).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lrformer_kernels._common as common  # noqa: E402

#: The shared folder beside the checkout (../shared: the released parameter names and the golden cases);
#: LRFORMER_SHARED points elsewhere.  Tests that need it skip with this reason when it is missing, and the
#: run's summary says how many did.
SHARED = os.environ.get("LRFORMER_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
SHARED_MISSING = (f"needs the shared folder with the golden cases and released parameter names, not found at "
                  f"{os.path.abspath(SHARED)} (put it beside the checkout or set LRFORMER_SHARED)")


def pytest_terminal_summary(terminalreporter):
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if SHARED_MISSING in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(f"NOTE: {len(skipped)} golden/released-code test(s) skipped: {SHARED_MISSING}",
                                    yellow=True)


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


def integer_logit_qk(B, Nq, M, heads, d, shift, dtype=torch.float32, device="cpu"):
    """q (B, Nq, C), k (B, M, C) whose per-head logits (scale 1) are ``shift + t`` with t in {0, -1, -2}
    and shift = a * b an integer: every logit is exact in float32 (shift <= 2**24), so a float64
    run on the same inputs is the exact answer, and rows hold several tied maxima.  Channel 0 of a
    head carries a (queries) and b (keys), channel 1 carries 1 and t."""
    a = 2.0 ** (int(shift).bit_length() // 2)
    b = shift / a
    assert a * b == shift and d >= 2
    q = torch.zeros(B, Nq, heads, d, dtype=dtype, device=device)
    k = torch.zeros(B, M, heads, d, dtype=dtype, device=device)
    q[..., 0], q[..., 1] = a, 1.0
    k[..., 0] = b
    k[..., 1] = -torch.randint(0, 3, (B, M, heads), device=device).to(dtype)
    return q.reshape(B, Nq, heads * d), k.reshape(B, M, heads * d)


def assert_as_accurate_as_native(ours, native, exact, names, slack=8.0, floor=1e-6):
    """Each tensor of ``ours`` is as close to ``exact`` (float64) as PyTorch's own float32 math
    (``native``) is, up to ``slack`` times its error plus ``floor`` times the exact tensor's size."""
    for name, o, n, e in zip(names, ours, native, exact):
        e = e.detach().double().cpu()
        err = (o.detach().double().cpu() - e).abs().max().item()
        err_native = (n.detach().double().cpu() - e).abs().max().item()
        bound = slack * err_native + floor * e.abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (native float32 error {err_native:.3g})"
