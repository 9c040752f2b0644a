"""The benchmark sweep (CPU, --quick), the attention baselines' closed-form FLOPs, the SDPA FLOP
handler and the op byte formulas."""
import csv
import json
import os
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks import attention_baselines as AB
from benchmarks import registry as R
from benchmarks import sweeps as SW
from benchmarks.__main__ import ATTN_FLOPS_COLUMNS, FLOPS_COLUMNS, TIMING_COLUMNS, run
from benchmarks.flops import count_flops
from benchmarks.report import summarize
from benchmarks.timing import tensor_bytes


def _csv(path):
    with open(path) as f:
        r = csv.DictReader(f)
        return r.fieldnames, list(r)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    t0 = time.perf_counter()
    run(["--quick", "--device", "cpu", "--out", str(out)])
    return out, time.perf_counter() - t0


def test_quick_sweep_end_to_end(quick_results):
    out, elapsed = quick_results
    assert elapsed < 60, f"--quick took {elapsed:.0f} s"
    for name in ("metadata.json", "summary.md", "flops_vs_resolution.png", "attention_flops.png",
                 "ops_latency_fp32.png", "model_latency.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "metadata.json") as f:
        meta = json.load(f)
    for k in ("device", "torch", "triton", "settings", "dtypes_note", "timing_method", "notes"):
        assert k in meta, k
    assert meta["torch"] == torch.__version__
    assert meta["settings"]["dtypes"] == ["fp32"] and meta["settings"]["quick"] is True
    assert any("need a GPU" in n for n in meta["notes"])
    cols, rows = _csv(out / "flops.csv")
    assert cols == FLOPS_COLUMNS and rows and all(float(r["gflops"]) > 0 for r in rows)
    cols, rows = _csv(out / "attention_flops.csv")
    assert cols == ATTN_FLOPS_COLUMNS
    assert {r["kind"] for r in rows} == set(AB.KINDS) and all(r["match"] == "True" for r in rows)
    for name in ("ops", "lrsa", "block", "model"):
        cols, rows = _csv(out / f"{name}.csv")
        assert cols == TIMING_COLUMNS, name
        eager = [r for r in rows if r["impl"] == "eager"]
        assert eager and all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in eager), name
        assert all(r["status"] == "needs GPU" for r in rows if r["impl"] in ("fused", "compile")), name
        assert all(r["device"] == meta["device"] and r["torch"] == torch.__version__ for r in rows)
        with open(out / f"{name}.json") as f:
            js = json.load(f)
        assert js["meta"]["device"] == meta["device"] and len(js["rows"]) == len(rows)
    _, ops = _csv(out / "ops.csv")
    assert {r["name"] for r in ops} == {n for n, e in R.OPS.items() if not e.cuda_stage1_only}
    assert all(int(r["bytes"]) > 0 and float(r["gbps"]) >= 0 for r in ops if r["impl"] == "eager")
    text = summarize(str(out))
    assert "### FLOPs" in text and "needs GPU" in text and "lrformer_t" in text


def test_budget_and_sections(tmp_path):
    run(["--quick", "--device", "cpu", "--out", str(tmp_path), "--sections", "ops,flops",
         "--max-minutes", "0", "--no-plots"])
    assert not (tmp_path / "model.csv").exists()
    _, rows = _csv(tmp_path / "ops.csv")
    assert all(r["status"] == "skipped (time budget)" for r in rows if r["impl"] == "eager")
    with open(tmp_path / "metadata.json") as f:
        meta = json.load(f)
    assert meta["sections"] == ["ops", "flops"]
    assert any("budget ran out" in n for n in meta["notes"])


@pytest.mark.parametrize("hw", [(128, 128), (64, 96), (7, 5), (25, 19)])
@pytest.mark.parametrize("stage", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", AB.KINDS + ("window-shifted",))
def test_attention_flops_closed_form(kind, stage, hw):
    shift = kind == "window-shifted"
    kind = "window" if shift else kind
    dim, heads = AB.S_DIMS[stage - 1], AB.S_HEADS[stage - 1]
    counted = AB.counted_flops(kind, hw[0], hw[1], dim, heads, stage, batch=2, shift=shift)
    assert counted == AB.closed_form_flops(kind, hw[0], hw[1], dim, heads, stage, batch=2)


def test_attention_layers_run_and_scale():
    torch.manual_seed(0)
    x = torch.randn(2, 13, 9, 64)
    for kind in AB.KINDS:
        for shift in (False, True):
            layer = AB.make_layer(kind, 64, 2, 1, shift=shift, map_size=(13, 9))
            y = layer(x)
            assert y.shape == x.shape and torch.isfinite(y).all()
    # LRSA's cost hardly grows with the map; global attention's grows with its square
    f = lambda k, s: AB.closed_form_flops(k, s, s, 64, 2, 1)  # noqa: E731
    assert f("lrsa", 256) / f("lrsa", 128) < 4.1
    assert f("global", 256) / f("global", 128) > 10


def test_window_attention_matches_naive():
    """Unshifted window attention == attention computed window by window with explicit loops."""
    torch.manual_seed(0)
    layer = AB.WindowAttention(16, 2)
    x = torch.randn(1, 14, 7, 16)
    y = layer(x)
    w = 7
    ref = torch.empty_like(x)
    bias = layer.rel_bias[layer.rel_index.reshape(-1)].reshape(w * w, w * w, 2).permute(2, 0, 1)
    for i in range(2):
        win = x[:, i * w:(i + 1) * w].reshape(1, w * w, 16)
        q, k, v = layer.qkv(win).chunk(3, -1)
        q, k, v = (t.reshape(1, w * w, 2, 8).transpose(1, 2) for t in (q, k, v))
        a = ((q @ k.transpose(-2, -1)) * 8 ** -0.5 + bias).softmax(-1)
        o = (a @ v).transpose(1, 2).reshape(1, w * w, 16)
        ref[:, i * w:(i + 1) * w] = layer.proj(o).reshape(1, w, w, 16)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_sdpa_flops_counted_on_cpu_and_meta():
    for dev in ("meta", "cpu"):
        q = torch.randn(2, 4, 10, 16, device=dev)
        k = torch.randn(2, 4, 7, 16, device=dev)
        v = torch.randn(2, 4, 7, 8, device=dev)
        assert count_flops(F.scaled_dot_product_attention, q, k, v).total == 2 * 4 * 10 * 7 * (16 + 8)


@pytest.mark.parametrize("op", [n for n, e in R.OPS.items() if not e.cuda_stage1_only])
@pytest.mark.parametrize("stage", [1, 3])
def test_op_bytes_formula_forward(op, stage):
    """Forward bytes = the inputs' bytes + the output's bytes of the reference call."""
    cfg = SW.Config(device=torch.device("cpu"))
    h, w = AB.stage_map_size(96, 128, stage)
    eager, _, inputs = R.OPS[op].functions(stage, h, w)
    inp = inputs(cfg, 2, torch.float32, False, 0)
    out = eager(*inp)
    expect = tensor_bytes(inp) + tensor_bytes(out)
    assert R.OPS[op].bytes(2, h, w, stage, 4, "fwd") == expect


def test_faseg_hrca_branch_entry():
    """The FASeg HRCA-branch case (CUDA-only in the sweep): reference (full-map res2 PE) and fused (PE on
    the windows, lowres_attention under the interpreter) agree in float64; its byte and FLOP formulas."""
    entry = R.OPS["faseg_hrca_branch"]
    h, w = 32, 64                                                    # 32 stride-32 tokens -> 1 window
    assert R.hrca_branch_windows(h, w) == (32, 1)
    ref, fused, inputs = entry.functions(1, h, w)
    inp = inputs(SW.Config(device=torch.device("cpu")), 1, torch.float64, False, 0)
    torch.testing.assert_close(fused(*inp), ref(*inp), rtol=1e-9, atol=1e-9)
    C, cin = R.HRCA_BRANCH["C"], R.HRCA_BRANCH["cin"]
    assert entry.bytes(2, 128, 128, 1, 2, "fwd") == (2 * 128 * 128 * cin + 2 * 8 * 100 * cin + 2 * 8 * 64 * C
                                                     + 3 * 2 * 100 * C) * 2
    assert entry.flops(2, 128, 128, 1, "fwd") == 2 * (2 * 2 * 100 * 8 * 64 * C)
    names = lambda dev: {c.key["name"] for c in SW.op_cases(SW.default_config(torch.device(dev), quick=True))}  # noqa: E731
    assert "faseg_hrca_branch" in names("cuda") and "faseg_hrca_branch" not in names("cpu")


def test_ms_deform_attn_entry():
    """The deformable-attention case (CUDA-only in the sweep) at the LRFormer-S+ decoder shapes: levels of
    a 512 image are 16x16, 32x32, 64x64; reference and fused agree (interpreter, float64); formulas."""
    entry = R.OPS["ms_deform_attn"]
    assert R.msda_shapes(128, 128) == [(16, 16), (32, 32), (64, 64)]
    ref, fused, inputs = entry.functions(1, 8, 12)                   # tiny: levels 1x2, 2x3, 4x6
    inp = inputs(SW.Config(device=torch.device("cpu")), 1, torch.float64, False, 0)
    torch.testing.assert_close(fused(*inp), ref(*inp), rtol=1e-10, atol=1e-10)
    S = 16 * 16 + 32 * 32 + 64 * 64
    assert entry.bytes(2, 128, 128, 1, 2, "fwd") == (2 * 2 * S * 256 + 2 * S * 8 * 3 * 4 * 3) * 2
    assert entry.flops(2, 128, 128, 1, "fwd") == 2 * 2 * S * 8 * 3 * 4 * 4 * 32
    names = lambda dev: {c.key["name"] for c in SW.op_cases(SW.default_config(torch.device(dev), quick=True))}  # noqa: E731
    assert "ms_deform_attn" in names("cuda") and "ms_deform_attn" not in names("cpu")
