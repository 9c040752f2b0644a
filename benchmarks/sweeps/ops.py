"""The op sweep: every :data:`benchmarks.registry.OPS` entry, reference vs compile vs fused, forward
and forward+backward, at the LRFormer-S stage shapes."""
from __future__ import annotations

from typing import List

import torch

from ..registry import OPS
from .common import DTYPES, Case, Config, _compiled, _impls, _m_fields, _time_callable, size_str, stage_maps


def op_cases(cfg: Config) -> List[Case]:
    cases: List[Case] = []
    compile_cases: List[Case] = []
    for img, s, h, w, compile_here in stage_maps(cfg):
        for entry in OPS.values():
            if entry.cuda_stage1_only and not (cfg.cuda and s == 1):
                continue
            B, C = cfg.batch, entry.channels(s)
            for dtype in cfg.dtypes:
                for mode in cfg.modes:
                    for impl, preset in _impls(cfg, compile_here, fused_compile=False):
                        key = dict(section="ops", name=entry.name, stage=s, image=size_str(img),
                                   shape=f"{B}x{h}x{w}x{C}" + entry.shape_note(h, w), batch=B, dtype=dtype,
                                   mode=mode, impl=impl)
                        esize = torch.tensor([], dtype=DTYPES[dtype]).element_size()
                        key["bytes"] = entry.bytes(B, h, w, s, esize, mode)
                        if entry.flops is not None:
                            key["flop"] = entry.flops(B, h, w, s, mode)
                        if preset:
                            (compile_cases if impl == "compile" else cases).append(
                                Case("ops", key, status=preset))
                            continue

                        def fn(entry=entry, s=s, h=h, w=w, dtype=dtype, mode=mode, impl=impl):
                            eager, fused, inputs = entry.functions(s, h, w)
                            f = {"eager": eager, "fused": fused}.get(impl) or _compiled(eager)
                            mk = lambda i: inputs(cfg, cfg.batch, DTYPES[dtype], mode != "fwd", i)  # noqa: E731
                            return _m_fields(_time_callable(cfg, f, mk, mode, probe_fn=eager))
                        c = Case("ops", key, fn, compile=impl == "compile", min_budget_s=20 if impl == "compile" else 0)
                        (compile_cases if impl == "compile" else cases).append(c)
    return cases + compile_cases
