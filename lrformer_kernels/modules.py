"""Drop-in fused modules: same parameters and state-dict names as the reference ones.

:class:`FusedLRSA`, :class:`FusedIRB` and :class:`FusedBlock` subclass the reference modules of
:mod:`lrformer.layers` and only swap the math they call (``ops``) for the Triton ops, so a
checkpoint, an optimizer or a ``state_dict`` cannot tell them apart.  Everything stays
tokens-last ``(B, H, W, C)`` through a whole stage.

Per block the fused path runs: CPE (dwconv + residual, 1 pass) -> LayerNorm -> pyramid pooling
(all 5 grids, 1 launch) -> 4 tiny dwconvs on the pooled maps -> q/kv GEMMs -> low-res attention
(1 launch, all heads) -> proj -> upsample + layer scale + drop path + residual (1 pass) ->
LayerNorm -> fc1 GEMM -> GELU + dwconv + residual (1 pass) -> fc2 GEMM (+ scale, residual).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lrformer import functional as LF
from lrformer.layers import IRB, LRSA, Block, batch_norm_bhwc, is_batch_norm

from .dwconv import dwconv3x3
from .lowres_attention import lowres_attention
from .pyramid_pool import pyramid_pool, split_pyramid
from .upsample_residual import upsample_residual


class FusedOps:
    """The fused ops under the names and signatures of :mod:`lrformer.functional`."""

    dwconv3x3 = staticmethod(dwconv3x3)
    lowres_attention = staticmethod(lowres_attention)
    upsample_residual = staticmethod(upsample_residual)

    @staticmethod
    def pyramid_pool(x, grids):
        return split_pyramid(pyramid_pool(x, grids), grids)


def fused_lrsa_low(x: torch.Tensor, grids, q_weight: torch.Tensor, q_bias: Optional[torch.Tensor],
                   norm: nn.Module, kv: nn.Module, proj: nn.Module, num_heads: int, scale: float,
                   d_convs: Optional[Sequence[nn.Module]] = None) -> torch.Tensor:
    """LRSA up to the low-resolution branch (B, hq, wq, C) on the fused ops; grids[0] is the query grid."""
    B, H, W, C = x.shape
    pooled = pyramid_pool(x, grids)                         # (B, Nq + M, C), one launch
    hq, wq = grids[0]
    nq = hq * wq
    q = F.linear(pooled[:, :nq], q_weight, q_bias)
    if d_convs is None:                                     # decoder: the kv tokens are already concatenated
        kv_tokens = pooled[:, nq:]
    else:
        maps = split_pyramid(pooled, grids)[1:]
        kv_tokens = torch.cat([dwconv3x3(m, dc.weight, dc.bias, residual=True).reshape(B, -1, C)
                               for m, dc in zip(maps, d_convs)], dim=1)
    kvt = kv(norm(kv_tokens))
    o = lowres_attention(q, kvt[..., :C], kvt[..., C:], num_heads, scale)
    return proj(o).reshape(B, hq, wq, C)


class FusedLRSA(LRSA):
    """LRSA on the fused ops: one pyramid-pooling launch feeds the queries and all key/value levels."""

    ops = FusedOps

    def forward_low(self, x: torch.Tensor, d_convs: Optional[Sequence[nn.Module]] = None) -> torch.Tensor:
        qw, qb = self.q_linear()
        return fused_lrsa_low(x, self.grids(x.shape[1], x.shape[2]), qw, qb, self.norm, self.kv_linear(),
                              self.proj, self.num_heads, self.scale, d_convs)


class FusedIRB(IRB):
    """IRB with GELU + depthwise conv + residual in one pass; the 1x1 convs are tokens-last GEMMs."""

    ops = FusedOps


class FusedBlock(Block):
    """Encoder/LRHead block on the fused ops (CPE, LRSA, upsample-residual, IRB)."""

    ops = FusedOps


#: reference class -> fused class (and back, for unfuse)
FUSED_CLASS = {LRSA: FusedLRSA, IRB: FusedIRB, Block: FusedBlock}
REFERENCE_CLASS = {v: k for k, v in FUSED_CLASS.items()}


# ------------------------------------------------------------------------------------------------
# Modules of the released code (class names PoolingAttention / Block / IRB, tokens (B, N, C) with
# H, W passed along, the stage's pyramid convs passed as ``d_convs``): fused stand-ins that keep
# the wrapped modules as attributes, hence the exact parameter names, and the same call signature.
# ------------------------------------------------------------------------------------------------
def _drop_prob(block: nn.Module) -> float:
    dp = getattr(block, "drop_path", None)
    return float(getattr(dp, "drop_prob", 0.0) or 0.0) if dp is not None else 0.0


class FusedReleasedBlock(nn.Module):
    """Fused replacement for a released-code ``Block`` (encoder: LayerNorms; head: BatchNorms).

    It adopts the original block's submodules (``norm1``, ``attn``, ``norm2``, ``mlp``, ``cpe``,
    ``layer_scale_1/2``, ``pre_norm``, ``drop_path``) so every state-dict key is unchanged, and
    keeps the original call signature: ``forward(x, H, W, d_convs=None)`` on tokens (B, N, C)
    for encoder blocks, ``forward(x)`` on NCHW maps for decoder blocks.
    """

    def __init__(self, block: nn.Module, q_size: int, kv_sizes: Sequence[int]):
        super().__init__()
        self._original = [block]  # a list: not registered as a submodule (its children are ours too)
        for name, child in block.named_children():
            setattr(self, name, child)
        for name, param in block.named_parameters(recurse=False):
            setattr(self, name, param)
        for name, buf in block.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        self.head = is_batch_norm(block.norm1)
        self.q_size, self.kv_sizes = q_size, tuple(kv_sizes)
        self.num_heads = int(block.attn.num_heads)
        self.drop_prob = _drop_prob(block)

    def _norm(self, layer, x):
        return batch_norm_bhwc(layer, x) if is_batch_norm(layer) else layer(x)

    def _lrsa_low(self, x: torch.Tensor, d_convs) -> torch.Tensor:
        attn = self.attn
        C = x.shape[-1]
        q_mod = attn.q[0] if isinstance(attn.q, nn.Sequential) else attn.q
        scale = float(getattr(attn, "scale", (C // self.num_heads) ** -0.5))
        grids = LF.lrsa_grids(x.shape[1], x.shape[2], self.q_size, self.kv_sizes)
        return fused_lrsa_low(x, grids, q_mod.weight.flatten(1), q_mod.bias, attn.norm, attn.kv, attn.proj,
                              self.num_heads, scale, d_convs)

    def _keep(self, x):
        return LF.drop_path_keep(x.shape[0], self.drop_prob, self.training, x.device, torch.float32)

    def forward_bhwc(self, x: torch.Tensor, d_convs=None) -> torch.Tensor:
        pre = getattr(self, "pre_norm", None)
        if is_batch_norm(pre):
            x = batch_norm_bhwc(pre, x)
        x = dwconv3x3(x, self.cpe.weight, self.cpe.bias, residual=True)
        low = self._lrsa_low(self._norm(self.norm1, x), d_convs)
        x = upsample_residual(x, low, getattr(self, "layer_scale_1", None), self._keep(x))
        mlp = self.mlp
        h = F.linear(self._norm(self.norm2, x), mlp.fc1.weight.flatten(1), mlp.fc1.bias)
        h = dwconv3x3(h, mlp.conv.weight, mlp.conv.bias, gelu=True, residual=True)
        h = F.linear(h, mlp.fc2.weight.flatten(1), mlp.fc2.bias)
        s = LF.branch_scale(getattr(self, "layer_scale_2", None), self._keep(x), x.shape[0], x.shape[-1], h)
        return x + (h if s is None else h * s)

    def forward(self, x: torch.Tensor, H: Optional[int] = None, W: Optional[int] = None, d_convs=None):
        if x.dim() == 4:  # decoder block: NCHW in, NCHW out
            return self.forward_bhwc(x.permute(0, 2, 3, 1), d_convs).permute(0, 3, 1, 2)
        B, N, C = x.shape
        return self.forward_bhwc(x.reshape(B, H, W, C), d_convs).reshape(B, N, C)

    def unfused(self) -> nn.Module:
        """The original block (it shares every parameter and buffer with this one)."""
        block = self._original[0]
        block.train(self.training)
        return block
