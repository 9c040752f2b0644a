"""Variant table and ``create_model``."""
from __future__ import annotations

from typing import Dict, Optional

import torch.nn as nn

from .decoders.faseg import FASegHead
from .decoders.mask2former import Mask2FormerHead
from .decoders.plus import LOSS_DEFAULTS, QuerySegmentor, make_criterion
from .models.encoder import LRFormerEncoder
from .models.head import LRHead
from .models.segmentor import LRFormerSegmentor

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
#: LRFormer+ as released (encoder + mmseg's Mask2Former head) and the encoder + FASeg's decoder.
PLUS_SEGMENTORS = tuple(f"lrformer_{v}_plus" for v in VARIANTS)
FASEG_SEGMENTORS = tuple(f"lrformer_{v}_faseg" for v in VARIANTS)
ENCODER_KEYS = ("num_heads", "mlp_ratios", "drop_path_rate", "q_size", "layer_scale_init",
                "layer_scale_stages", "in_chans")
HEAD_KEYS = ("num_heads_head", "head_q_size", "head_kv_sizes", "head_mlp_ratio", "dropout", "head_channels")


def model_names():
    return SEGMENTORS + PLUS_SEGMENTORS + FASEG_SEGMENTORS + ENCODERS


def create_encoder(variant: str, **overrides) -> LRFormerEncoder:
    cfg = VARIANTS[variant]
    kw = dict(embed_dims=cfg["embed_dims"], depths=cfg["depths"], drop_path_rate=cfg["drop_path_rate"])
    kw.update({k: v for k, v in overrides.items() if k in ENCODER_KEYS + ("embed_dims", "depths")})
    return LRFormerEncoder(**kw)


#: drop path of the released LRFormer+ configs (SPEC_PLUS A.0)
PLUS_DROP_PATH = {"t": 0.2, "s": 0.3, "b": 0.4, "l": 0.6, "xl": 0.4}
#: decoder overrides accepted by ``create_model`` for the query-decoder families
QUERY_KEYS = ("hidden_dim", "num_queries", "dec_layers", "enc_layers") + tuple(LOSS_DEFAULTS)


def create_query_model(family: str, variant: str, num_classes: int = 150, encoder_overrides: Optional[Dict] = None,
                       **overrides) -> QuerySegmentor:
    """``family`` "plus" (released LRFormer+: Mask2Former head) or "faseg" (FASeg's decoder) on the
    LRFormer ``variant`` encoder (query pooled size 16 in every stage, the released drop path)."""
    enc_kw = {"drop_path_rate": PLUS_DROP_PATH[variant], **(encoder_overrides or {})}
    enc = create_encoder(variant, **enc_kw)
    head_cls = Mask2FormerHead if family == "plus" else FASegHead
    names = {"hidden_dim": "dim", "num_queries": "num_queries", "dec_layers": "layers", "enc_layers": "enc_layers"}
    head_kw = {names[k]: v for k, v in overrides.items() if k in names}
    head = head_cls(enc.embed_dims, num_classes, **head_kw)
    criterion = make_criterion(num_classes, **{k: v for k, v in overrides.items() if k in LOSS_DEFAULTS})
    return QuerySegmentor(enc, head, criterion)


def create_model(name: str, num_classes: int = 150, fused: bool = False, pretrained=None,
                 pretrained_sha256: Optional[str] = None, **overrides) -> nn.Module:
    """Build ``lrformer_t/s/b/l`` (segmentor), ``lrformer_{t,s,b,l,xl}_plus`` (LRFormer+, query decoder)
    or ``lrformer_{t,s,b,l,xl}_encoder``.

    overrides: encoder settings (``drop_path_rate``, ``embed_dims``, ``depths``, ``num_heads``,
    ``mlp_ratios``, ``q_size``, ``layer_scale_init``, ...) and head settings (``head_channels``,
    ``num_heads_head``, ``head_q_size``, ``head_kv_sizes``, ``head_mlp_ratio``, ``dropout``).
    ``pretrained``: a checkpoint path (``.pth`` or ``.safetensors``), URL (``https://``: downloaded once into
    torch's hub cache; ``file://``; ``hf://<owner>/<repo>[@<revision>]/<file>`` from the Hugging Face Hub,
    extra ``[hub]``) or state dict, loaded with :func:`lrformer.load_checkpoint`; ``pretrained_sha256``
    checks the file.
    ``fused=True`` swaps in the fused Triton LRSA/blocks (``lrformer_kernels.fuse``).
    LRFormer+ models take encoder overrides and the decoder/loss overrides of
    :data:`lrformer.decoders.plus.PLUS_KEYS` (``hidden_dim``, ``num_queries``, ``dec_layers``, ``enc_layers``, ...).
    """
    allowed = ENCODER_KEYS + HEAD_KEYS + ("embed_dims", "depths")
    query = name in PLUS_SEGMENTORS + FASEG_SEGMENTORS
    if query:  # no LRHead: its keys are replaced by the query decoder's
        allowed = ENCODER_KEYS + ("embed_dims", "depths") + QUERY_KEYS
    unknown = set(overrides) - set(allowed)
    if unknown:
        raise TypeError(f"create_model got unknown overrides {sorted(unknown)}")
    if query:
        variant, family = name[len("lrformer_"):].split("_")
        enc_kw = {k: v for k, v in overrides.items() if k in ENCODER_KEYS + ("embed_dims", "depths")}
        model = create_query_model(family, variant, num_classes, enc_kw,
                                   **{k: v for k, v in overrides.items() if k in QUERY_KEYS})
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
        load_checkpoint(model, pretrained, sha256=pretrained_sha256)
    if fused:
        from lrformer_kernels import fuse
        fuse(model)
    return model
