"""One-call swap of a model's LRSA/blocks to the fused path, and back."""
from __future__ import annotations

from collections import Counter
from typing import Dict

import torch.nn as nn

from lrformer.layers import is_batch_norm

from .modules import FUSED_CLASS, REFERENCE_CLASS, FusedReleasedBlock

#: defaults of the released code: encoder query grid 16 (pyramid 11/8/6/4), decoder 32 (22/16/12/8)
ENCODER_SIZES = (16, (11, 8, 6, 4))
HEAD_SIZES = (32, (22, 16, 12, 8))


def _is_released_block(m: nn.Module) -> bool:
    """A block of the released LRFormer code: class ``Block`` with ``attn`` (``PoolingAttention``-like:
    q/kv/proj/norm), ``mlp`` (``IRB``: fc1/conv/fc2), ``cpe``, ``norm1``, ``norm2``."""
    if type(m) in FUSED_CLASS or type(m) in REFERENCE_CLASS or isinstance(m, FusedReleasedBlock):
        return False
    attn, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
    return (type(m).__name__ == "Block" and attn is not None and mlp is not None
            and all(hasattr(attn, a) for a in ("q", "kv", "proj", "norm", "num_heads"))
            and all(hasattr(mlp, a) for a in ("fc1", "conv", "fc2"))
            and all(hasattr(m, a) for a in ("cpe", "norm1", "norm2")))


def _released_sizes(block: nn.Module):
    attn = block.attn
    for name in ("q_pooled_size", "q_size", "pool_size"):
        if isinstance(getattr(attn, name, None), int):
            q = getattr(attn, name)
            return q, tuple(round(t * q / 16 + 0.001) for t in (11, 8, 6, 4))
    return HEAD_SIZES if is_batch_norm(block.norm1) else ENCODER_SIZES


def _set_hrca(model: nn.Module, fused: bool) -> int:
    """LRFormer+ decoders: route the HRCA cross-attention through the fused op (or back)."""
    from lrformer.query_decoder import use_fused_hrca
    return use_fused_hrca(model, fused)


def fuse(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Swap every LRSA/block the function recognises to the fused Triton path, in place.

    Models from :func:`lrformer.create_model`: ``Block``/``LRSA``/``IRB`` become ``FusedBlock``/
    ``FusedLRSA``/``FusedIRB`` (same objects, same parameters). Models built from the released code:
    each ``Block`` (with ``PoolingAttention``/``IRB`` children) is replaced by a
    :class:`FusedReleasedBlock` that adopts its submodules, so state-dict names are unchanged.
    LRFormer+ decoders: the cross-attention layers' HRCA goes through the fused ``hrca_attention``.
    Returns the model; what was swapped is in ``model.fuse_report`` (and printed if ``verbose``).
    On CPU the fused modules run the reference math (or the kernels under TRITON_INTERPRET=1).
    """
    report: Counter = Counter()
    for m in model.modules():
        fused_cls = FUSED_CLASS.get(type(m))
        if fused_cls is not None:
            m.__class__ = fused_cls
            report[f"{REFERENCE_CLASS[fused_cls].__name__} -> {fused_cls.__name__}"] += 1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_released_block(child):
                q, kv = _released_sizes(child)
                setattr(parent, name, FusedReleasedBlock(child, q, kv).train(child.training))
                report[f"{type(child).__name__} ({type(child.attn).__name__}) -> FusedReleasedBlock"] += 1
    n_hrca = _set_hrca(model, fused=True)
    if n_hrca:
        report["CrossAttentionLayer -> fused hrca_attention"] += n_hrca
    model.fuse_report = dict(report)
    if verbose:
        print(format_report(model.fuse_report, "fused"))
    return model


def unfuse(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Undo :func:`fuse` in place (the parameters are shared, so training done fused is kept)."""
    report: Counter = Counter()
    for m in model.modules():
        ref_cls = REFERENCE_CLASS.get(type(m))
        if ref_cls is not None:
            m.__class__ = ref_cls
            report[f"{ref_cls.__name__}"] += 1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FusedReleasedBlock):
                setattr(parent, name, child.unfused())
                report["FusedReleasedBlock -> original"] += 1
    n_hrca = _set_hrca(model, fused=False)
    if n_hrca:
        report["CrossAttentionLayer -> reference hrca_attention"] += n_hrca
    model.fuse_report = {}
    if verbose:
        print(format_report(dict(report), "unfused"))
    return model


def format_report(report: Dict[str, int], verb: str) -> str:
    if not report:
        return f"lrformer_kernels: nothing {verb} (no LRFormer blocks recognised)"
    return f"lrformer_kernels {verb}: " + ", ".join(f"{n} x {k}" for k, n in report.items())
