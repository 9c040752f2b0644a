"""LRFormer (Low-Resolution Self-Attention for semantic segmentation) in PyTorch.

Layout: ``models/`` (the LRFormer layers, encoder, LRHead, segmentor), ``decoders/`` (the query
decoders: pixel decoder, masked-attention decoder, matcher and losses), ``factory`` and
``checkpoint`` (building models by name, loading released weights), ``engine/`` (data, training,
evaluation, prediction).  The ops come from :mod:`lrformer_kernels` (reference math by default; the
fused kernels after ``lrformer_kernels.fuse(model)``).
"""
from .checkpoint import CheckpointError, CheckpointMismatch, load_checkpoint, save_weights
from .decoders.matching import HungarianMatcher, SetCriterion
from .decoders.msdeform import MSDeformAttn
from .decoders.faseg import FASegHead
from .decoders.mask2former import Mask2FormerHead
from .decoders.plus import QuerySegmentor
from .engine.data import preprocess
from .export import check_onnx, export_onnx
from .factory import VARIANTS, create_model, model_names
from .models.encoder import LRFormerEncoder
from .models.head import LRHead
from .models.layers import IRB, LRSA, Block
from .models.segmentor import LRFormerSegmentor

__all__ = ["create_model", "model_names", "preprocess", "load_checkpoint", "save_weights", "export_onnx", "check_onnx", "CheckpointMismatch", "CheckpointError",
           "LRFormerEncoder", "LRHead", "LRFormerSegmentor", "LRSA", "Block", "IRB", "VARIANTS",
           "QuerySegmentor", "Mask2FormerHead", "FASegHead", "MSDeformAttn", "HungarianMatcher", "SetCriterion"]
