"""``fuse(model)`` / ``unfuse(model)``: flip a model's layers to the fused kernels and back."""
from __future__ import annotations

from collections import Counter
from typing import Dict

import torch.nn as nn

from . import released
from .backend import Fusable

__all__ = ["fuse", "unfuse", "format_report"]


def _flip(model: nn.Module, fused: bool) -> Counter:
    report: Counter = Counter()
    for m in model.modules():
        if isinstance(m, Fusable) and m.fused != fused:
            m.fused = fused
            report[type(m).__name__] += 1
    return report


def fuse(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Route every fusable computation of ``model`` through the fused Triton ops, in place.

    The project's models (:func:`lrformer.create_model`): every layer that computes an op
    (:class:`~lrformer_kernels.backend.Fusable`: blocks, LRSA, IRB, decoder attention layers) gets
    ``fused = True``; classes, parameters and state-dict names are unchanged.  Models built from the
    released code: their ``PoolingAttention``/``IRB`` modules are replaced by fused stand-ins that
    adopt their parameters (:mod:`lrformer_kernels.released`).  Returns the model; what changed is in
    ``model.fuse_report`` (printed if ``verbose``).  On CPU the fused ops run the reference math
    (or the kernels under ``TRITON_INTERPRET=1``).
    """
    report = _flip(model, True) + released.patch(model)
    model.fuse_report = dict(report)
    if verbose:
        print(format_report(model.fuse_report, "fused"))
    return model


def unfuse(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Undo :func:`fuse` in place (the parameters are shared, so training done fused is kept)."""
    report = _flip(model, False) + released.unpatch(model)
    model.fuse_report = {}
    if verbose:
        print(format_report(dict(report), "unfused"))
    return model


def format_report(report: Dict[str, int], verb: str) -> str:
    if not report:
        return f"lrformer_kernels: nothing {verb} (no LRFormer layers recognised)"
    return f"lrformer_kernels {verb}: " + ", ".join(f"{n} x {k}" for k, n in report.items())
