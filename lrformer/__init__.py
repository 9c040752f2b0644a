"""LRFormer (Low-Resolution Self-Attention for semantic segmentation), reference PyTorch model."""
from . import functional
from .checkpoint import CheckpointMismatch, load_checkpoint
from .encoder import LRFormerEncoder
from .factory import VARIANTS, create_model, model_names
from .head import LRHead
from .layers import IRB, LRSA, Block
from .matching import HungarianMatcher, SetCriterion
from .msdeform import MSDeformAttn, MSDeformPixelDecoder
from .plus import LRFormerPlusSegmentor
from .query_decoder import MaskedTransformerDecoder, QueryDecoderHead
from .segmentor import LRFormerSegmentor

__all__ = ["functional", "create_model", "model_names", "load_checkpoint", "CheckpointMismatch",
           "LRFormerEncoder", "LRHead", "LRFormerSegmentor", "LRSA", "Block", "IRB", "VARIANTS",
           "LRFormerPlusSegmentor", "QueryDecoderHead", "MaskedTransformerDecoder", "MSDeformPixelDecoder",
           "MSDeformAttn", "HungarianMatcher", "SetCriterion"]
