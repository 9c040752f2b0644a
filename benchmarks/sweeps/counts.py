"""FLOPs sweeps (meta device) and one-attention-layer comparisons (FLOPs; latency on CUDA)."""
from __future__ import annotations

from typing import List

import torch

from .. import attention_baselines as AB
from ..registry import stage_map_size
from .common import Case, Config, _autocast, _gen, _m_fields, _randn, measure, size_str


def flops_cases(cfg: Config) -> List[Case]:
    from ..flops import REFERENCE_GFLOPS, model_flops
    cases = []
    for v in cfg.flops_variants:
        for hw in cfg.flops_sizes:
            nc = 19 if hw == (1024, 2048) else 150
            name = f"lrformer_{v}"

            def fn(name=name, hw=hw, nc=nc):
                r = model_flops(name, hw[0], hw[1], nc)
                ref = REFERENCE_GFLOPS.get((name, hw[0], hw[1], nc))
                return dict(params=r["params"], params_m=round(r["params"] / 1e6, 3),
                            gflops=round(r["flops"] / 1e9, 3), reference_gflops=ref)
            cases.append(Case("flops", dict(model=name, image=size_str(hw), height=hw[0], width=hw[1],
                                            num_classes=nc), fn, essential=True))
    return cases


def _attention_layers(cfg: Config, images):
    """(image, stage, map h, map w, dim, heads, kind) of one attention layer of each kind at the
    LRFormer-S stage widths, for every image size in ``images``."""
    for hw in images:
        for s in cfg.stages:
            h, w = stage_map_size(hw[0], hw[1], s)
            for kind in AB.KINDS:
                yield hw, s, h, w, AB.S_DIMS[s - 1], AB.S_HEADS[s - 1], kind


def attention_flops_cases(cfg: Config) -> List[Case]:
    cases = []
    for hw, s, h, w, dim, heads, kind in _attention_layers(cfg, cfg.attn_sizes):
        def fn(kind=kind, h=h, w=w, dim=dim, heads=heads, s=s):
            counted = AB.counted_flops(kind, h, w, dim, heads, s)
            closed = AB.closed_form_flops(kind, h, w, dim, heads, s)
            return dict(gflops=counted / 1e9, gflops_closed_form=closed / 1e9,
                        match=counted == closed)
        extra = {"sr_ratio": AB.effective_sr(AB.SR_RATIOS[s - 1], h, w)} if kind == "sra" else {}
        cases.append(Case("attention_flops", dict(
            kind=kind, label=AB.LABELS[kind], stage=s, dim=dim, heads=heads, image=size_str(hw),
            map=f"{h}x{w}", tokens=h * w, note=";".join(f"{k}={v}" for k, v in extra.items())), fn,
            essential=True))
    return cases


def attention_latency_cases(cfg: Config) -> List[Case]:
    """CUDA only: forward latency of one layer of each kind (bf16 autocast, batch 1)."""
    if not cfg.cuda:
        return []
    cases = []
    dtype = "bf16" if "bf16" in cfg.dtypes else cfg.dtypes[0]
    for hw, s, h, w, dim, heads, kind in _attention_layers(cfg, cfg.attn_latency_sizes):
        def fn(kind=kind, h=h, w=w, dim=dim, heads=heads, s=s):
            layer = AB.make_layer(kind, dim, heads, s, map_size=(h, w)).to(cfg.device).eval()

            def run(inp):
                with torch.no_grad(), _autocast(cfg, dtype):
                    return layer(inp[0])
            m = measure(lambda i: (_randn((1, h, w, dim), cfg, gen=_gen(cfg, i)),), run,
                        cfg.device, cfg.timing)
            return _m_fields(m)
        cases.append(Case("attention_latency", dict(
            section="attention", name=kind, stage=s, image=size_str(hw), shape=f"1x{h}x{w}x{dim}",
            batch=1, dtype=dtype, mode="fwd", impl="eager"), fn))
    return cases


