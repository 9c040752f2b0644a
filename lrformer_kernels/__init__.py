"""Fused Triton ops for LRFormer, forward and backward, each a ``torch.library`` custom op.

Ops (tokens-last maps ``(B, H, W, C)``, any strides; CPU tensors run the reference math, or the
kernels under ``TRITON_INTERPRET=1``), each with its reference ``<op>_reference``:

* :func:`pyramid_pool` — all adaptive-average-pooled grids of an LRSA in one pass (its block's LayerNorm inside);
* :func:`lowres_attention` — multi-head softmax attention over the low-resolution tokens;
* :func:`upsample_residual` — ``x + layer_scale * drop_path_keep * bilinear(low)``;
* :func:`dwconv3x3` — depthwise 3x3 conv + bias (+ GELU first) (+ residual);
* :func:`dwconv3x3_pyramid_pool` — a block's CPE (depthwise conv + residual) and its LRSA's pooling of norm1 of it;
* :func:`irb` — a block's IRB branch: LayerNorm, fc1, GELU, depthwise conv, fc2, layer scale, drop path, residual;
* :func:`hrca_attention` — cross-attention over per-query windows of a high-resolution map;
* :func:`ms_deform_attn` — multi-scale deformable attention's bilinear sampling (the pixel decoders);
* :func:`upsampled_cross_entropy` — the segmentation loss on bilinearly upsampled logits, never forming them.

:mod:`lrformer_kernels.compat` offers :func:`ms_deform_attn` under the calling convention of Deformable
DETR / Mask2Former / mmcv (``MSDeformAttnFunction.apply``, ``multi_scale_deformable_attn``, mmcv's
``MultiScaleDeformableAttention`` module), a drop-in for their CUDA extension.

Layout: ``_common`` (checks, launch helpers) <- one file per op <- ``backend`` (the reference and
fused namespaces, the :class:`Fusable` switch) <- ``lrsa`` (LRSA composed from the ops) <-
``released`` (patches for models built from the released code) <- ``fuse``; ``compat`` (other codebases'
conventions) sits beside ``backend`` on the op files.  Nothing here imports
the model package :mod:`lrformer`; the model imports this one.

Adding an op
------------
1. ``lrformer_kernels/<op>.py`` with the sections, in this order and under these names, of the other
   op files: ``Kernels`` (``@triton.jit``), ``Config`` (``_forward_config`` / ``_backward_config``:
   tiles and warps, and why), ``Launch`` (``_forward_triton`` / ``_backward_triton``, inside
   ``device_guard``), ``Reference`` (the public ``<op>_reference``: the ground truth; and
   ``_forward_reference`` / ``_backward_reference`` for CPU without the interpreter),
   ``Registration`` (``torch.library.custom_op("lrformer::<op>")`` + fake + ``_backward``),
   ``Public function`` (input checks naming the bad argument, then the op).
2. Shared helpers come from ``_common`` (``acc_dtype``, ``next_pow2``, ``num_sms``,
   ``device_guard``, ``big_interpreter_tiles``, ``needs_int64``, ``new_empty``).
3. Add it to :data:`backend.OP_NAMES`, :data:`backend.REFERENCE` and :data:`backend.FUSED`; model
   layers call ``self.ops.<op>``.
4. ``tests/test_<op>.py``: float64 under the interpreter vs ``<op>_reference`` (forward and
   backward, poisoned outputs, GPU tile configs), ``opcheck``, bad inputs.
5. A benchmark entry in ``benchmarks/registry.py``.
"""
from . import compat
from .backend import FUSED, REFERENCE, Fusable, Ops
from .dwconv import dwconv3x3, dwconv3x3_reference
from .dwconv_pyramid_pool import dwconv3x3_pyramid_pool, dwconv3x3_pyramid_pool_reference
from .fuse import fuse, unfuse
from .irb import irb, irb_reference
from .hrca import hrca_attention, hrca_attention_reference, hrca_window_grid, hrca_window_pixels
from .lowres_attention import lowres_attention, lowres_attention_reference
from .lrsa import lrsa_low, lrsa_pooled
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_reference
from .pyramid_pool import (adaptive_avg_pool, lrsa_grids, pool_grid, pyramid_pool, pyramid_pool_reference, pyramid_sizes,
                           split_pyramid)
from .released import FusedIRB, FusedPoolingAttention
from .upsample_residual import bilinear_resize, branch_scale, upsample_residual, upsample_residual_reference
from .upsampled_cross_entropy import upsampled_cross_entropy, upsampled_cross_entropy_reference

__all__ = ["pyramid_pool", "pyramid_pool_reference", "adaptive_avg_pool", "split_pyramid", "pool_grid", "pyramid_sizes", "lrsa_grids",
           "lowres_attention", "lowres_attention_reference", "upsample_residual", "upsample_residual_reference",
           "bilinear_resize", "branch_scale", "dwconv3x3", "dwconv3x3_reference", "dwconv3x3_pyramid_pool",
           "dwconv3x3_pyramid_pool_reference", "irb", "irb_reference", "hrca_attention",
           "hrca_attention_reference", "hrca_window_grid", "hrca_window_pixels", "lrsa_low", "lrsa_pooled", "ms_deform_attn",
           "ms_deform_attn_reference", "upsampled_cross_entropy", "upsampled_cross_entropy_reference",
           "Ops", "REFERENCE", "FUSED", "Fusable", "fuse", "unfuse", "FusedPoolingAttention", "FusedIRB"]
