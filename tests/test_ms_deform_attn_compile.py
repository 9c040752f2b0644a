"""ms_deform_attn's kernels compile for sm_90 and sm_80 (no GPU needed) at every configuration the CUDA
dispatch picks (head dim 32 as in the decoders, 64 too), fp32/bf16/fp16 inputs, atomic and deterministic
backward, int32 and int64 offsets: no register spill, shared memory within the target's limit."""
import importlib
import os

import pytest

pytest.importorskip("triton")
from gpu_compile import SHARED_LIMIT, compile_reports, ptxas_path  # noqa: E402

import lrformer_kernels._common as common  # noqa: E402

msda = importlib.import_module("lrformer_kernels.ms_deform_attn")
pytestmark = pytest.mark.skipif(not os.path.exists(ptxas_path()), reason="the Triton wheel has no ptxas")

PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
FWD_ARGS = ["V", "TABLE", "LOC", "WGT", "OUT"]
BWD_ARGS = ["V", "TABLE", "LOC", "WGT", "DO", "DV", "DLOC", "DW", "CONTRIB", "ROWS"]
INTS = ["s_vb", "s_vs", "s_vm", "s_vd", "s_lb", "s_lq", "s_lm", "s_ll", "s_lp", "s_lc",
        "s_wb", "s_wq", "s_wm", "s_wl", "s_wp"]


def _sig(dtype, backward):
    sig = {n: "i32" for n in INTS + ["s_ob", "s_oq", "s_oc", "s_db", "s_dq", "s_dc", "NQ", "M", "L", "P", "D", "S"]}
    for n in ("V", "LOC", "WGT", "OUT", "DO"):
        sig[n] = PTR[dtype]
    sig.update(TABLE="*i32", DV="*fp32", DLOC="*fp32", DW="*fp32", CONTRIB="*fp32", ROWS="*i64")
    return sig


def test_kernels_compile_without_spills(monkeypatch):
    monkeypatch.setattr(common, "INTERPRETER_BIG_TILES", False)          # the GPU configurations
    specs = []
    for cc in (90, 80):
        for dtype in ("fp32", "bf16", "fp16"):
            for head_dim in (32, 64, 128, 256):
                fq, fd, fw = msda._forward_config(head_dim)
                bq, bd, bw = msda._backward_config(head_dim)
                for int64 in (False, True):
                    specs.append(dict(module="lrformer_kernels.ms_deform_attn", kernel="_msda_fwd_kernel",
                                      signature=_sig(dtype, False), cc=cc, num_warps=fw, maxnreg=msda.MAXNREG,
                                      constexprs=dict(BLOCK_Q=fq, BLOCK_D=fd, ACC="fp32", INT64=int64)))
                    for atomic in (True, False):
                        specs.append(dict(module="lrformer_kernels.ms_deform_attn", kernel="_msda_bwd_kernel",
                                          signature=_sig(dtype, True), cc=cc, num_warps=bw, maxnreg=msda.MAXNREG,
                                          constexprs=dict(BLOCK_Q=bq, BLOCK_D=bd, ACC="fp32", INT64=int64,
                                                          ATOMIC=atomic)))
    reports = compile_reports(specs)
    assert len(reports) == len(specs) == 144
    bad = [(r["kernel"], r["cc"], r["signature"]["V"], r["constexprs"], r["registers"], r["spill_stores"])
           for r in reports if r["spill_stores"] or r["spill_loads"] or r["shared"] > SHARED_LIMIT[r["cc"]]]
    assert not bad, bad
    assert all(0 < r["registers"] <= 255 for r in reports)
