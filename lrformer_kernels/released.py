"""Fused path for models built from the *released* LRFormer code (mmseg classes, not ours).

The released ``Block.forward`` stays theirs: only its two leaf modules are replaced, by stand-ins
that adopt the original's submodules (so every state-dict key is unchanged) and keep its call
signature (tokens ``(B, N, C)`` with ``H, W``, or an NCHW map):

* ``PoolingAttention`` -> :class:`FusedPoolingAttention`: one pyramid-pooling launch, the pooled
  maps' depthwise convs, fused low-resolution attention (:func:`lrformer_kernels.lrsa.lrsa_low`),
  then the bilinear upsample the released module ends with;
* ``IRB`` -> :class:`FusedIRB`: GELU + depthwise conv + residual in one pass between the 1x1 convs.

The residual adds, CPE, norms and drop path stay in the released ``Block.forward`` (fusing those
would need a second copy of it).  :func:`patch` / :func:`unpatch` are called by
:func:`lrformer_kernels.fuse` / :func:`lrformer_kernels.unfuse`.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backend import FUSED, Fusable
from .lrsa import lrsa_low
from .pyramid_pool import lrsa_grids, pyramid_sizes
from .upsample_residual import bilinear_resize

__all__ = ["FusedPoolingAttention", "FusedIRB", "patch", "unpatch"]


def _is_released(m: nn.Module, cls_name: str, attrs) -> bool:
    return (type(m).__name__ == cls_name and not isinstance(m, (Fusable, _Adopting))
            and all(hasattr(m, a) for a in attrs))


class _Adopting(nn.Module):
    """A stand-in that adopts ``original``'s children, parameters and buffers (same names)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self._original = [original]  # a list: not registered as a submodule (its children are ours)
        for name, child in original.named_children():
            setattr(self, name, child)
        for name, param in original.named_parameters(recurse=False):
            setattr(self, name, param)
        for name, buf in original.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        for name, value in vars(original).items():       # plain attributes: num_heads, scale, sizes ...
            if not name.startswith("_") and name != "training" and not hasattr(self, name):
                setattr(self, name, value)
        self.train(original.training)

    def original(self) -> nn.Module:
        """The module this one replaced (it shares every parameter and buffer with this one)."""
        return self._original[0].train(self.training)


def _tokens_last(x: torch.Tensor, H: Optional[int], W: Optional[int]) -> torch.Tensor:
    if x.dim() == 4:                                  # NCHW map
        return x.permute(0, 2, 3, 1)
    B, N, C = x.shape                                 # tokens (B, N, C) of an H x W map
    return x.reshape(B, int(H), int(W), C)


def _like_input(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) back to the caller's layout (tokens or NCHW)."""
    return y.permute(0, 3, 1, 2) if x.dim() == 4 else y.reshape(x.shape[0], -1, y.shape[-1])


class FusedPoolingAttention(_Adopting):
    """Fused stand-in for the released ``PoolingAttention`` (encoder: ``q``/``kv`` Sequential(Linear);
    head: ``q`` a 1x1 Conv2d).  ``forward(x, H, W, d_convs=None)`` as the original."""

    def __init__(self, attn: nn.Module):
        super().__init__(attn)
        q_size = int(getattr(attn, "q_pooled_size", 16))
        sizes = getattr(attn, "pooled_sizes", None)
        self.q_size = q_size
        self.kv_sizes = tuple(int(s) for s in sizes) if sizes is not None else pyramid_sizes(q_size)

    def forward(self, x: torch.Tensor, H: Optional[int] = None, W: Optional[int] = None, d_convs=None):
        t = _tokens_last(x, H, W)
        C = t.shape[-1]
        q = self.q[0] if isinstance(self.q, nn.Sequential) else self.q
        scale = float(getattr(self, "scale", (C // self.num_heads) ** -0.5))
        grids = lrsa_grids(t.shape[1], t.shape[2], self.q_size, self.kv_sizes)
        low = lrsa_low(FUSED, t, grids, q.weight.flatten(1), q.bias, self.norm, self.kv, self.proj,
                       int(self.num_heads), scale, d_convs)
        return _like_input(bilinear_resize(low, t.shape[1:3]), x)


class FusedIRB(_Adopting):
    """Fused stand-in for the released ``IRB``: fc1 -> [GELU + depthwise 3x3 + residual] -> fc2.
    ``forward(x, H, W)`` on tokens or ``forward(x)`` on an NCHW map, as the original."""

    def forward(self, x: torch.Tensor, H: Optional[int] = None, W: Optional[int] = None):
        t = _tokens_last(x, H, W)
        h = F.linear(t, self.fc1.weight.flatten(1), self.fc1.bias)
        h = FUSED.dwconv3x3(h, self.conv.weight, self.conv.bias, gelu=True, residual=True)
        return _like_input(F.linear(h, self.fc2.weight.flatten(1), self.fc2.bias), x)


#: released class name -> (attributes that identify it, fused stand-in)
_PATCHES = {
    "PoolingAttention": (("q", "kv", "proj", "norm", "num_heads"), FusedPoolingAttention),
    "IRB": (("fc1", "conv", "fc2", "act"), FusedIRB),
}


def patch(model: nn.Module) -> Counter:
    """Replace every released ``PoolingAttention``/``IRB`` in ``model`` by its fused stand-in."""
    report: Counter = Counter()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            for cls_name, (attrs, fused_cls) in _PATCHES.items():
                if _is_released(child, cls_name, attrs):
                    setattr(parent, name, fused_cls(child))
                    report[f"{cls_name} -> {fused_cls.__name__}"] += 1
    return report


def unpatch(model: nn.Module) -> Counter:
    """Put the original released modules back (they share their parameters with the stand-ins)."""
    report: Counter = Counter()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _Adopting):
                original = child.original()
                setattr(parent, name, original)
                report[f"{type(child).__name__} -> {type(original).__name__}"] += 1
    return report
