"""The model sweep: T/S/B/L inference and a training step (forward, the segmentor's loss, backward,
AdamW) vs image size: eager vs fused vs ``torch.compile``."""
from __future__ import annotations

import dataclasses
from typing import Dict, List

import torch

from ..timing import free_memory
from .common import COMPILED_IMPLS, Case, Config, _autocast, _compiled, _gen, _impls, _m_fields, measure, size_str


_MODEL_CACHE: Dict = {}


def _cached_model(cfg: Config, variant: str, impl: str, train: bool):
    """Eager/fused models are reused by consecutive cases (one kept at a time); compiled ones not."""
    key = (variant, impl)
    if impl not in COMPILED_IMPLS and key in _MODEL_CACHE:
        model = _MODEL_CACHE[key].train(train)
        return model, model, ""
    _MODEL_CACHE.clear()
    free_memory()
    model, fwd, why = _make_model(cfg, variant, impl, train)
    if model is not None and impl not in COMPILED_IMPLS:
        _MODEL_CACHE[key] = model
    return model, fwd, why


def release_models():
    _MODEL_CACHE.clear()
    free_memory()


def _make_model(cfg: Config, variant: str, impl: str, train: bool):
    import lrformer
    name = f"lrformer_{variant}"
    torch.manual_seed(0)
    if impl in ("fused", "fused+compile"):
        try:
            model = lrformer.create_model(name, fused=True)
        except Exception as exc:  # noqa: BLE001
            return None, None, f"n/a (create_model(fused=True) failed: {type(exc).__name__})"
        if not getattr(model, "fuse_report", True):
            return None, None, "n/a (fuse swapped nothing)"
    else:
        model = lrformer.create_model(name)
    model = model.to(cfg.device).train(train)
    fwd = _compiled(model) if impl in COMPILED_IMPLS else model
    return model, fwd, ""


def model_cases(cfg: Config) -> List[Case]:
    cases: List[Case] = []
    compile_cases: List[Case] = []
    tasks = [("inference", hw, dt) for hw in cfg.model_sizes for dt in cfg.dtypes]

    def compile_here(variant, task, hw, dtype):
        if variant != cfg.compile_model_variant:
            return False
        if task == "inference":   # compile at one representative size: 1024x1024 if swept
            big = max(cfg.model_sizes, key=lambda x: x[0] * x[1])
            rep = (1024, 1024) if (1024, 1024) in cfg.model_sizes else big
            return hw == rep and dtype == ("bf16" if "bf16" in cfg.dtypes else cfg.dtypes[0])
        return hw == min(cfg.train_sizes, key=lambda x: x[0] * x[1])

    order = []   # (variant, impl, preset, task, hw, dtype): one model per (variant, impl) run
    for variant in cfg.model_variants:
        vt = tasks + ([("training", hw, cfg.train_dtype) for hw in cfg.train_sizes]
                      if variant in cfg.train_variants else [])
        impls = list(dict.fromkeys(i for t, hw, dt in vt for i, _ in _impls(cfg, compile_here(variant, t, hw, dt))))
        for impl_name in impls:
            for task, hw, dtype in vt:
                for impl, preset in _impls(cfg, compile_here(variant, task, hw, dtype)):
                    if impl == impl_name:
                        order.append((variant, impl, preset, task, hw, dtype))
    for variant, impl, preset, task, hw, dtype in order:
        B = cfg.infer_batch if task == "inference" else cfg.train_batch
        key = dict(section="model", name=f"lrformer_{variant}", variant=variant, task=task,
                   image=size_str(hw), shape=f"{B}x3x{hw[0]}x{hw[1]}", batch=B, dtype=dtype,
                   mode="fwd" if task == "inference" else "train step", impl=impl)
        if task == "training" and dtype != "fp32":
            key["note"] = f"{dtype} autocast, AdamW"
        elif task == "training":
            key["note"] = "fp32, AdamW"
        elif dtype != "fp32":
            key["note"] = f"{dtype} autocast"
        compiled = impl in COMPILED_IMPLS
        if preset:
            (compile_cases if compiled else cases).append(Case("model", key, status=preset))
            continue

        def fn(variant=variant, task=task, hw=hw, dtype=dtype, impl=impl, B=B):
            model = fwd = opt = None
            try:
                model, fwd, why = _cached_model(cfg, variant, impl, task == "training")
                if model is None:
                    return dict(status=why)
                ac = None if dtype == "fp32" else dtype
                model_timing = dataclasses.replace(cfg.timing, min_reps=min(3, cfg.timing.min_reps))

                def images(i):
                    g = _gen(cfg, i)
                    x = torch.randn(B, 3, hw[0], hw[1], device=cfg.device, generator=g)
                    if task == "inference":
                        return (x,)
                    y = torch.randint(0, 150, (B, hw[0], hw[1]), device=cfg.device, generator=g)
                    return (x, y)
                if task == "inference":
                    def run(inp):
                        with torch.no_grad(), (_autocast(cfg, ac) if ac else _autocast(cfg, "fp32")):
                            return fwd(inp[0])
                    m = measure(images, run, cfg.device, model_timing, n_sets=cfg.timing.min_sets)
                else:
                    fused_ok = cfg.cuda
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True if fused_ok else None)

                    def run(inp):
                        with (_autocast(cfg, ac) if ac else _autocast(cfg, "fp32")):
                            loss = model.loss(inp[0], inp[1], fwd(inp[0]))
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    m = measure(images, run, cfg.device, model_timing, n_sets=cfg.timing.min_sets)
                return _m_fields(m)
            finally:
                del model, fwd, opt
                if impl in COMPILED_IMPLS:
                    release_models()
        c = Case("model", key, fn, compile=compiled,
                 min_budget_s=(150 if task == "training" else 90) if compiled else 0)
        (compile_cases if compiled else cases).append(c)
    return cases + compile_cases


