"""Variant table and ``create_model``."""
from __future__ import annotations

import torch.nn as nn

from .encoder import LRFormerEncoder
from .head import LRHead
from .segmentor import LRFormerSegmentor

#: SPEC table: embed dims, depths, head channels, drop-path rate.
VARIANTS = {
    "t": dict(embed_dims=(48, 96, 240, 384), depths=(2, 2, 6, 3), head_channels=256, drop_path_rate=0.1),
    "s": dict(embed_dims=(64, 128, 320, 512), depths=(3, 3, 12, 3), head_channels=384, drop_path_rate=0.2),
    "b": dict(embed_dims=(80, 160, 400, 512), depths=(4, 4, 15, 8), head_channels=512, drop_path_rate=0.4),
    "l": dict(embed_dims=(96, 192, 480, 640), depths=(4, 6, 18, 8), head_channels=640, drop_path_rate=0.6),
    "xl": dict(embed_dims=(128, 256, 640, 768), depths=(4, 8, 22, 8), head_channels=None, drop_path_rate=0.4),
}

SEGMENTORS = tuple(f"lrformer_{v}" for v in ("t", "s", "b", "l"))
ENCODERS = tuple(f"lrformer_{v}_encoder" for v in VARIANTS)
#: LRFormer+ (encoder + Mask2Former-style query decoder with DFPQ/HRCA), built by :mod:`lrformer.plus`.
PLUS_SEGMENTORS = tuple(f"lrformer_{v}_plus" for v in VARIANTS)
ENCODER_KEYS = ("num_heads", "mlp_ratios", "drop_path_rate", "q_size", "layer_scale_init",
                "layer_scale_stages", "in_chans")
HEAD_KEYS = ("num_heads_head", "head_q_size", "head_kv_sizes", "head_mlp_ratio", "dropout", "head_channels")


def model_names():
    return SEGMENTORS + PLUS_SEGMENTORS + ENCODERS


def create_encoder(variant: str, **overrides) -> LRFormerEncoder:
    cfg = VARIANTS[variant]
    kw = dict(embed_dims=cfg["embed_dims"], depths=cfg["depths"], drop_path_rate=cfg["drop_path_rate"])
    kw.update({k: v for k, v in overrides.items() if k in ENCODER_KEYS + ("embed_dims", "depths")})
    return LRFormerEncoder(**kw)


def create_model(name: str, num_classes: int = 150, fused: bool = False, pretrained=None,
                 **overrides) -> nn.Module:
    """Build ``lrformer_t/s/b/l`` (segmentor), ``lrformer_{t,s,b,l,xl}_plus`` (LRFormer+, query decoder)
    or ``lrformer_{t,s,b,l,xl}_encoder``.

    overrides: encoder settings (``drop_path_rate``, ``embed_dims``, ``depths``, ``num_heads``,
    ``mlp_ratios``, ``q_size``, ``layer_scale_init``, ...) and head settings (``head_channels``,
    ``num_heads_head``, ``head_q_size``, ``head_kv_sizes``, ``head_mlp_ratio``, ``dropout``).
    ``pretrained``: a checkpoint path or state dict, loaded with :func:`lrformer.load_checkpoint`.
    ``fused=True`` swaps in the fused Triton LRSA/blocks (``lrformer_kernels.fuse``).
    LRFormer+ models take encoder overrides and the decoder/loss overrides of
    :data:`lrformer.plus.PLUS_KEYS` (``hidden_dim``, ``num_queries``, ``dec_layers``, ``enc_layers``, ...).
    """
    allowed = ENCODER_KEYS + HEAD_KEYS + ("embed_dims", "depths")
    if name in PLUS_SEGMENTORS:  # no LRHead: its keys are replaced by the query decoder's
        from .plus import PLUS_KEYS as plus_keys
        allowed = ENCODER_KEYS + ("embed_dims", "depths") + plus_keys
    unknown = set(overrides) - set(allowed)
    if unknown:
        raise TypeError(f"create_model got unknown overrides {sorted(unknown)}")
    if name in PLUS_SEGMENTORS:
        from .plus import create_plus_model
        enc_kw = {k: v for k, v in overrides.items() if k in ENCODER_KEYS + ("embed_dims", "depths")}
        model = create_plus_model(name, num_classes, enc_kw,
                                  **{k: v for k, v in overrides.items() if k in plus_keys})
    elif name in ENCODERS:
        model = create_encoder(name[len("lrformer_"):-len("_encoder")], **overrides)
    elif name in SEGMENTORS:
        variant = name[len("lrformer_"):]
        enc = create_encoder(variant, **overrides)
        head = LRHead(enc.embed_dims, overrides.get("head_channels", VARIANTS[variant]["head_channels"]),
                      num_classes,
                      num_heads=overrides.get("num_heads_head", 8),
                      q_size=overrides.get("head_q_size", 32),
                      kv_sizes=overrides.get("head_kv_sizes", (22, 16, 12, 8)),
                      mlp_ratio=overrides.get("head_mlp_ratio", 4),
                      dropout=overrides.get("dropout", 0.1))
        model = LRFormerSegmentor(enc, head)
    elif name == "lrformer_xl":
        raise ValueError("lrformer_xl pairs the XL encoder with the query decoder: use 'lrformer_xl_plus' "
                         "(LRFormer+), or 'lrformer_xl_encoder' for the encoder alone")
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(model_names())}")
    if pretrained is not None:
        from .checkpoint import load_checkpoint
        load_checkpoint(model, pretrained)
    if fused:
        from lrformer_kernels import fuse
        fuse(model)
    return model
