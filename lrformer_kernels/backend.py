"""The one place that chooses between the reference math and the fused kernels.

Every op exists twice under one name and one signature: its reference (plain PyTorch, the ground
truth, ``<op>_reference`` in the op's file) and its fused custom op.  :data:`REFERENCE` and
:data:`FUSED` hold them; a model layer that computes an op inherits :class:`Fusable` and calls
``self.ops.<op>(...)``, so one flag per layer (``layer.fused``) picks the backend and
:func:`lrformer_kernels.fuse` flips it for a whole model.  (As timm's fused attention: the layers
consult one switch; nothing swaps classes.)
"""
from __future__ import annotations

from types import MappingProxyType

from .dwconv import dwconv3x3, dwconv3x3_reference
from .dwconv_pyramid_pool import dwconv3x3_pyramid_pool, dwconv3x3_pyramid_pool_reference
from .hrca import hrca_attention, hrca_attention_reference
from .irb import irb, irb_reference
from .lowres_attention import lowres_attention, lowres_attention_reference
from .ms_deform_attn import ms_deform_attn, ms_deform_attn_reference
from .pyramid_pool import pyramid_pool, pyramid_pool_reference
from .upsample_residual import upsample_residual, upsample_residual_reference
from .upsampled_cross_entropy import upsampled_cross_entropy, upsampled_cross_entropy_reference

__all__ = ["Ops", "REFERENCE", "FUSED", "Fusable", "OP_NAMES"]

#: the ops every backend provides
OP_NAMES = ("pyramid_pool", "lowres_attention", "upsample_residual", "dwconv3x3", "hrca_attention", "ms_deform_attn",
            "upsampled_cross_entropy", "irb", "dwconv3x3_pyramid_pool")


class Ops:
    """One backend: the ops of :data:`OP_NAMES` as attributes (``ops.dwconv3x3(...)``)."""

    def __init__(self, name: str, **functions):
        missing = set(OP_NAMES) - set(functions)
        if missing:
            raise ValueError(f"backend {name!r} lacks {sorted(missing)}")
        self.name = name
        self.functions = MappingProxyType(dict(functions))
        for op, fn in functions.items():
            setattr(self, op, fn)

    def __repr__(self) -> str:
        return f"<lrformer_kernels backend {self.name!r}>"


REFERENCE = Ops("reference", pyramid_pool=pyramid_pool_reference, lowres_attention=lowres_attention_reference,
                upsample_residual=upsample_residual_reference, dwconv3x3=dwconv3x3_reference,
                hrca_attention=hrca_attention_reference, ms_deform_attn=ms_deform_attn_reference,
                upsampled_cross_entropy=upsampled_cross_entropy_reference, irb=irb_reference,
                dwconv3x3_pyramid_pool=dwconv3x3_pyramid_pool_reference)
FUSED = Ops("fused", pyramid_pool=pyramid_pool, lowres_attention=lowres_attention,
            upsample_residual=upsample_residual, dwconv3x3=dwconv3x3, hrca_attention=hrca_attention,
            ms_deform_attn=ms_deform_attn, upsampled_cross_entropy=upsampled_cross_entropy, irb=irb,
            dwconv3x3_pyramid_pool=dwconv3x3_pyramid_pool)


class Fusable:
    """Mixin for model layers that compute the ops: they call ``self.ops.<op>``; ``fused`` (False by
    default: the reference math) picks :data:`FUSED` or :data:`REFERENCE`."""

    fused: bool = False

    @property
    def ops(self) -> Ops:
        return FUSED if self.fused else REFERENCE
