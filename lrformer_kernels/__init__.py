"""Fused Triton kernels for LRFormer, forward and backward, registered with ``torch.library``.

Ops (tokens-last maps ``(B, H, W, C)``, any strides; CPU tensors run the reference math, or the
kernels under ``TRITON_INTERPRET=1``):

* :func:`pyramid_pool` — all adaptive-average-pooled grids of an LRSA in one pass;
* :func:`lowres_attention` — multi-head softmax attention over the low-resolution tokens;
* :func:`upsample_residual` — ``x + layer_scale * drop_path_keep * bilinear(low)``;
* :func:`dwconv3x3` — depthwise 3x3 conv + bias (+ GELU first) (+ residual);
* :func:`hrca_attention` — high-resolution cross-attention over each query's selected windows (FASeg).

Modules: :class:`FusedLRSA`, :class:`FusedBlock`, :class:`FusedIRB`; :func:`fuse` / :func:`unfuse`.
"""
from .dwconv import dwconv3x3
from .fuse import fuse, unfuse
from .hrca import hrca_attention
from .lowres_attention import lowres_attention
from .modules import FusedBlock, FusedIRB, FusedLRSA, FusedOps, FusedReleasedBlock
from .pyramid_pool import pyramid_pool, split_pyramid
from .upsample_residual import upsample_residual

__all__ = ["pyramid_pool", "split_pyramid", "lowres_attention", "upsample_residual", "dwconv3x3",
           "hrca_attention", "FusedLRSA", "FusedBlock", "FusedIRB", "FusedOps", "FusedReleasedBlock",
           "fuse", "unfuse"]
