"""The released LRFormer+ head: mmseg's ``Mask2FormerHead`` (mmdet 3.3), parameters under its names.

``decode_head.pixel_decoder``: mmdet's ``MSDeformAttnPixelDecoder`` (SPEC_PLUS A.1): the stride 32/16/8
maps projected (1x1 conv + GN), 6 post-norm deformable encoder layers with sine PE + ``level_encoding``,
an FPN step to stride 4 and ``mask_feature``.  ``decode_head.transformer_decoder``: 9 layers of masked
cross-attention -> self-attention -> FFN (post-norm, ``norms.0/1/2``), the static ``query_embed`` as
the query position everywhere, keys = level map + ``level_embed`` with the sine PE of that level,
levels 1/32, 1/16, 1/8 in turn, a key blocked where ``sigmoid(mask) < 0.5`` (SPEC_PLUS A.2).
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import attention_mask, check_features, deform_encode, ffn, mha, outputs, predict
from .msdeform import MSDeformAttn, group_norm, sine_position_encoding


class ConvGN(nn.Module):
    """mmcv ``ConvModule`` with GroupNorm (keys ``conv``, ``gn``), optional ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, bias: bool, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias)
        self.gn = group_norm(cout)
        self.relu = relu

    def forward(self, x):
        x = self.gn(self.conv(x))
        return F.relu(x) if self.relu else x


class FFN(nn.Module):
    """mmcv ``FFN`` (keys ``layers.0.0``, ``layers.1``); the residual is added by the caller."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Dropout(0.0)),
                                    nn.Linear(hidden, dim), nn.Dropout(0.0))

    def forward(self, x):
        return ffn(self.layers[0][0], self.layers[1], x)


class Attention(nn.Module):
    """mmcv ``MultiheadAttention`` wrapper (key ``attn``): ``query + MHA(query + qpos, key + kpos, value)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=0.0)

    def forward(self, query, key, value, query_pos, key_pos, mask=None):
        return query + mha(self.attn, query + query_pos, key + key_pos, value, mask)[0]


class DeformEncoderLayer(nn.Module):
    """mmdet ``DeformableDetrTransformerEncoderLayer``: ``x = LN(x + MSDA(x, pos))``, ``x = LN(x + FFN(x))``."""

    def __init__(self, dim: int, ffn_dim: int, levels: int, heads: int, points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, levels, heads, points)
        self.ffn = FFN(dim, ffn_dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2))

    def forward(self, src, pos, ref, shapes):
        src = self.norms[0](src + self.self_attn(src + pos, ref, src, shapes))
        return self.norms[1](src + self.ffn(src))


class Encoder(nn.Module):
    def __init__(self, layers: int, **kw):
        super().__init__()
        self.layers = nn.ModuleList(DeformEncoderLayer(**kw) for _ in range(layers))


class PixelDecoder(nn.Module):
    """mmdet ``MSDeformAttnPixelDecoder`` -> (mask_feature (B, C, H/4, W/4), [1/32, 1/16, 1/8 maps])."""

    def __init__(self, in_channels: Sequence[int], dim: int = 256, layers: int = 6, heads: int = 8,
                 points: int = 4, ffn_dim: int = 1024):
        super().__init__()
        self.dim = dim
        self.input_convs = nn.ModuleList(ConvGN(c, dim, 1, bias=True) for c in reversed(in_channels[1:]))
        self.encoder = Encoder(layers, dim=dim, ffn_dim=ffn_dim, levels=3, heads=heads, points=points)
        self.level_encoding = nn.Embedding(3, dim)
        self.lateral_convs = nn.ModuleList([ConvGN(in_channels[0], dim, 1, bias=False)])
        self.output_convs = nn.ModuleList([ConvGN(dim, dim, 3, bias=False, relu=True)])
        self.mask_feature = nn.Conv2d(dim, dim, 1)
        self.reset_parameters()

    def reset_parameters(self):
        """mmdet's init (SPEC_PLUS A.4)."""
        for m in self.input_convs:
            nn.init.xavier_uniform_(m.conv.weight, gain=1)
            nn.init.zeros_(m.conv.bias)
        for conv in (self.lateral_convs[0].conv, self.output_convs[0].conv, self.mask_feature):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.level_encoding.weight)
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
        for layer in self.encoder.layers:
            layer.self_attn.reset_parameters()

    def forward(self, feats: Sequence[torch.Tensor]):
        maps = [conv(f) for conv, f in zip(self.input_convs, reversed(feats[1:]))]     # 1/32, 1/16, 1/8
        pos = [sine_position_encoding(m.shape[0], m.shape[2], m.shape[3], self.dim, m.device, m.dtype)
               + self.level_encoding.weight[i].to(m.dtype)[None, :, None, None] for i, m in enumerate(maps)]
        outs = deform_encode(self.encoder.layers, maps, pos)
        y = self.lateral_convs[0](feats[0]) + F.interpolate(outs[-1], size=feats[0].shape[-2:], mode="bilinear",
                                                            align_corners=False)
        return self.mask_feature(self.output_convs[0](y)), outs


class DecoderLayer(nn.Module):
    """mmdet ``Mask2FormerTransformerDecoderLayer``: cross-attn -> norms.0 -> self-attn -> norms.1 ->
    FFN -> norms.2."""

    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.ffn = FFN(dim, ffn_dim)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, query, query_pos, memory, memory_pos, mask):
        query = self.norms[0](self.cross_attn(query, memory, memory, query_pos, memory_pos, mask))
        query = self.norms[1](self.self_attn(query, query, query, query_pos, query_pos))
        return self.norms[2](query + self.ffn(query))


class TransformerDecoder(nn.Module):
    def __init__(self, layers: int, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn_dim) for _ in range(layers))
        self.post_norm = nn.LayerNorm(dim)


class Mask2FormerHead(nn.Module):
    """The released LRFormer+ ``decode_head``; ``forward(feats)`` on the four encoder maps (strides
    4, 8, 16, 32) -> ``{"pred_logits" (B, Q, K+1), "pred_masks" (B, Q, H/4, W/4), "aux_outputs"}``
    with ``layers`` aux predictions (``aux_outputs[0]`` from ``query_feat`` before any layer)."""

    mask_threshold = 0.5

    def __init__(self, in_channels: Sequence[int], num_classes: int = 150, dim: int = 256, num_queries: int = 100,
                 layers: int = 9, heads: int = 8, ffn_dim: int = 2048, enc_layers: int = 6, enc_ffn_dim: int = 1024):
        super().__init__()
        self.in_channels, self.num_classes, self.heads = tuple(in_channels), num_classes, heads
        self.pixel_decoder = PixelDecoder(in_channels, dim, enc_layers, heads, 4, enc_ffn_dim)
        self.transformer_decoder = TransformerDecoder(layers, dim, heads, ffn_dim)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.query_feat = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(3, dim)
        self.cls_embed = nn.Linear(dim, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim),
                                        nn.ReLU(inplace=True), nn.Linear(dim, dim))
        for p in self.transformer_decoder.parameters():   # mmdet: Xavier-normal for dim > 1 (SPEC_PLUS A.4)
            if p.dim() > 1:
                nn.init.xavier_normal_(p)

    def forward(self, feats: Sequence[torch.Tensor]) -> Dict:
        check_features(feats, self.in_channels, "Mask2FormerHead")
        mask_features, maps = self.pixel_decoder(feats)
        B, C = mask_features.shape[:2]
        memory = [m.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, m in enumerate(maps)]
        memory_pos = [sine_position_encoding(B, m.shape[2], m.shape[3], C, m.device, m.dtype).flatten(2)
                      .transpose(1, 2) for m in maps]
        query = self.query_feat.weight[None].expand(B, -1, -1)
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)
        dec = self.transformer_decoder
        head = (dec.post_norm, self.cls_embed, self.mask_embed)
        preds = [predict(*head, query, mask_features)]
        for i, layer in enumerate(dec.layers):
            lvl = i % 3
            mask = attention_mask(preds[-1][1], maps[lvl].shape[-2:], self.mask_threshold, self.heads)
            query = layer(query, query_pos, memory[lvl], memory_pos[lvl], mask)
            preds.append(predict(*head, query, mask_features))
        return outputs(preds)
