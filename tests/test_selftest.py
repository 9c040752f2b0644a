"""``python -m lrformer_kernels.selftest``: passes under the interpreter (small shapes, float64 and fp32),
fails loudly when a kernel is wrong, and says in one line what it needs on a machine without either."""
import importlib
import io

import pytest
import torch

st = importlib.import_module("lrformer_kernels.selftest")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA run is the real thing, not a test case")
def test_selftest_passes_under_the_interpreter():
    out = io.StringIO()
    assert st.run(stream=out) == 0, out.getvalue()
    text = out.getvalue()
    assert "20/20 checks passed" in text and "FAIL" not in text
    for op in ("pyramid_pool", "lowres_attention", "upsample_residual", "dwconv3x3", "ms_deform_attn", "LRSA block",
               "upsampled_cross_entropy", "irb (Block IRB)", "pyramid_pool (norm1)", "dwconv3x3_pyramid_pool"):
        assert op in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_selftest_reports_a_broken_kernel(monkeypatch):
    import lrformer_kernels.backend as backend
    real = backend.FUSED.lowres_attention
    monkeypatch.setattr(backend.FUSED, "lowres_attention", lambda q, k, v, h, scale=None: real(q, k, v, h, scale) * 1.01)
    out = io.StringIO()
    assert st.run(stream=out) == 1
    assert "FAIL" in out.getvalue() and "FAILED" in out.getvalue()


def test_selftest_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setattr(st, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = io.StringIO()
    assert st.run(stream=out) == 2
    assert out.getvalue().count("\n") == 1 and "needs a CUDA GPU" in out.getvalue()


def test_selftest_without_triton_asks_for_triton(monkeypatch):
    """Triton missing (a CPU torch wheel) with TRITON_INTERPRET=1 set: the one line says to install triton
    (before: it asked for the TRITON_INTERPRET=1 that was already set)."""
    monkeypatch.setattr(st, "HAS_TRITON", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = io.StringIO()
    assert st.run(stream=out) == 2
    assert out.getvalue().count("\n") == 1 and "pip install 'triton" in out.getvalue()
    assert "needs a CUDA GPU, or TRITON_INTERPRET=1" not in out.getvalue()
