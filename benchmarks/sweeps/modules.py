"""The LRSA and Block sweeps: the reference module vs the fused one vs ``torch.compile`` of each."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from lrformer.models.layers import Block

from .. import attention_baselines as AB
from ..registry import S_DIMS, S_HEADS, S_LAYER_SCALE, S_MLP_RATIOS
from .common import COMPILED_IMPLS, Case, Config, _compiled, _gen, _impls, _m_fields, _randn, _time_callable, fuse_copy, size_str, stage_maps


class StageBlock(nn.Module):
    """One encoder block with its stage's shared depthwise convs."""

    def __init__(self, s: int, drop_path: float = 0.1):
        super().__init__()
        dim = S_DIMS[s - 1]
        self.blk = Block(dim, S_HEADS[s - 1], S_MLP_RATIOS[s - 1], drop_path, S_LAYER_SCALE[s - 1])
        self.d_convs = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in range(4))

    def forward(self, x):
        return self.blk(x, self.d_convs)


def module_cases(cfg: Config, level: str) -> List[Case]:
    cases: List[Case] = []
    compile_cases: List[Case] = []
    for img, s, h, w, compile_here in stage_maps(cfg):
        C = S_DIMS[s - 1]
        for dtype in cfg.dtypes:
            for mode in cfg.modes:
                for impl, preset in _impls(cfg, compile_here):
                    key = dict(section=level, name="LRSA" if level == "lrsa" else "Block", stage=s,
                               image=size_str(img), shape=f"{cfg.batch}x{h}x{w}x{C}", batch=cfg.batch,
                               dtype=dtype, mode=mode, impl=impl)
                    compiled = impl in COMPILED_IMPLS
                    if preset:
                        (compile_cases if compiled else cases).append(Case(level, key, status=preset))
                        continue

                    def fn(s=s, h=h, w=w, C=C, dtype=dtype, mode=mode, impl=impl):
                        torch.manual_seed(s)
                        ref = (AB.LRSAAttention(C, S_HEADS[s - 1]) if level == "lrsa" else StageBlock(s))
                        ref = ref.to(cfg.device).train(mode != "fwd")
                        own = ref                           # the module whose parameters get the gradients
                        if impl in ("fused", "fused+compile"):
                            own, why = fuse_copy(ref)
                            if own is None:
                                return dict(status=why)
                        mod = _compiled(own) if impl in COMPILED_IMPLS else own
                        mk = lambda i: (_randn((cfg.batch, h, w, C), cfg, torch.float32, mode != "fwd",  # noqa: E731
                                               _gen(cfg, i)),)
                        ac = None if dtype == "fp32" else dtype
                        return _m_fields(_time_callable(cfg, mod, mk, mode, modules=(own,),
                                                        autocast_dtype=ac, probe_fn=ref))
                    c = Case(level, key, fn, compile=compiled, min_budget_s=30 if compiled else 0)
                    (compile_cases if compiled else cases).append(c)
    return cases + compile_cases


