"""Mask2Former-style query decoder with FASeg's DFPQ and HRCA (the ``decode_head`` of LRFormer+).

Shapes: B batch, Q queries, C hidden width, K classes; maps NCHW unless noted.

Layer schedule (``layer_schedule``): without HRCA the ``L`` decoder layers cycle over the three
low-resolution levels of the pixel decoder, stride 32 -> 16 -> 8 (Mask2Former). With HRCA
(``hrca_every = 4``, the default) every fourth layer -- zero-based indices 3, 7, ... -- is an HRCA
layer that attends to the stride-4 mask features instead, and the other layers keep cycling
32 -> 16 -> 8; for 9 layers: ``[32, 16, 8, HR, 32, 16, 8, HR, 32]``.

Choices the papers leave open (made here, documented once):

* DFPQ (FASeg sec. 3.2): before each cross-attention the positional query is
  ``MLP2(concat[A @ P, E])``, ``P`` (S, C) the sine encoding of the level about to be attended,
  ``E`` (Q, C) the learned query embedding and ``A`` (B, Q, S) a per-query distribution over that
  level's pixels: the previous layer's cross-attention probabilities averaged over heads, resized to
  the level (area pooling when shrinking, bilinear when enlarging) and renormalised to sum 1; for
  the first layer the sigmoid of the initial mask prediction (bilinear to the level) normalised to
  sum 1. After an HRCA layer (whose fused op returns no probabilities) the last dense
  cross-attention's probabilities are used. ``A`` is detached (a positional prior, like the mask).
  The same positional query is used by that layer's self-attention. For the HRCA layer's
  stride-4 target the pooled map is bilinearly enlarged.
* HRCA (FASeg sec. 3.3): the ranking level is the lowest-resolution one (stride 32), so the window
  is ``32 / 4 = 8`` stride-4 pixels (one stride-32 pixel's area). The ranking score of each query
  is the SUM of its head-averaged cross-attention probabilities over the stride-32 level from all
  preceding decoder layers that attended that level (layers 0 for layer 3; 0 and 4 for layer 7),
  resized bilinearly to the window grid if the shapes differ; the top
  ``K = max(1, round(grid_h * grid_w * keep_ratio))`` windows are attended, without the Mask2Former
  mask inside them. If no layer has attended stride 32 yet, the sigmoid of the latest mask
  prediction is used. Keys get the sine encoding of the stride-4 map, values and keys a learned
  level embedding.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as LF
from .msdeform import MSDeformPixelDecoder, sine_position_encoding

HR = "hr"  # schedule entry of an HRCA layer


def layer_schedule(num_layers: int, hrca_every: int = 4, levels: int = 3) -> List:
    """Level attended by each decoder layer: 0/1/2 = stride 32/16/8, ``HR`` = HRCA on stride 4."""
    out, n = [], 0
    for i in range(num_layers):
        if hrca_every and (i + 1) % hrca_every == 0:
            out.append(HR)
        else:
            out.append(n % levels)
            n += 1
    return out


def resize_distribution(a: torch.Tensor, size) -> torch.Tensor:
    """Resize per-query distributions a (B, Q, h, w) to ``size`` and renormalise each to sum 1:
    area (adaptive average) pooling where a side shrinks, bilinear where it grows."""
    h, w = a.shape[-2:]
    if (h, w) != tuple(size):
        B, Q = a.shape[:2]
        a = a.reshape(B * Q, 1, h, w)
        if size[0] <= h and size[1] <= w:
            a = F.adaptive_avg_pool2d(a, size)
        else:
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False).clamp_min(0)
        a = a.reshape(B, Q, *size)
    return a / a.flatten(2).sum(-1)[..., None, None].clamp_min(1e-12)


def hrca_select_windows(scores: torch.Tensor, hr_size, window: int, keep_ratio: float) -> torch.Tensor:
    """Top windows for HRCA. scores (B, Q, h, w): accumulated low-resolution attention; hr_size the
    (H4, W4) of the stride-4 map. The scores are bilinearly resized to ``hrca_window_grid(H4, W4,
    window)`` if needed, then the ``max(1, round(gh * gw * keep_ratio))`` best windows of each query
    are returned as row-major grid indices (B, Q, K), best first."""
    gh, gw = LF.hrca_window_grid(hr_size[0], hr_size[1], window)
    if tuple(scores.shape[-2:]) != (gh, gw):
        B, Q, h, w = scores.shape
        scores = F.interpolate(scores.reshape(B * Q, 1, h, w), size=(gh, gw), mode="bilinear",
                               align_corners=False).reshape(B, Q, gh, gw)
    k = max(1, round(gh * gw * keep_ratio))
    return scores.flatten(2).topk(k, dim=-1).indices


class MLP(nn.Module):
    """``layers`` Linear layers with ReLU between."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, lin in enumerate(self.layers):
            x = lin(x) if i == len(self.layers) - 1 else F.relu(lin(x))
        return x


class CrossAttentionLayer(nn.Module):
    """Post-norm cross-attention ``tgt = LN(tgt + Attn(tgt + qpos, mem + pos, mem))``.

    Dense mode (``win_idx is None``): memory (B, S, C), optional boolean mask (B, Q, S) with True =
    blocked (Mask2Former's masked attention); returns (tgt, head-averaged probabilities (B, Q, S)).
    HRCA mode: memory/pos tokens-last (B, H4, W4, C), ``win_idx`` (B, Q, K) windows of size ``window``;
    attention through ``self.ops.hrca_attention`` (the reference in :mod:`lrformer.functional`;
    assign ``lrformer_kernels`` -- or any object with the same ``hrca_attention`` -- to swap in the
    fused op); returns (tgt, None).
    """

    #: where ``hrca_attention`` comes from (class-wide; can be set per instance).
    ops = LF

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, tgt, memory, pos, query_pos, attn_mask=None, win_idx=None, window=None):
        q = self.q_proj(tgt + query_pos)
        k = self.k_proj(memory + pos)
        v = self.v_proj(memory)
        probs = None
        if win_idx is None:
            B, Q, C = q.shape
            M, d = self.heads, C // self.heads
            qh = q.reshape(B, Q, M, d).transpose(1, 2)
            kh = k.reshape(B, -1, M, d).transpose(1, 2)
            vh = v.reshape(B, -1, M, d).transpose(1, 2)
            logits = qh @ kh.transpose(-1, -2) * d ** -0.5                 # (B, M, Q, S)
            if attn_mask is not None:
                logits = logits.masked_fill(attn_mask[:, None], float("-inf"))
            attn = logits.softmax(-1)
            out = (attn @ vh).transpose(1, 2).reshape(B, Q, C)
            probs = attn.mean(1)
        else:
            out = self.ops.hrca_attention(q, k, v, win_idx, window, self.heads)
        return self.norm(tgt + self.dropout(self.out_proj(out))), probs


class SelfAttentionLayer(nn.Module):
    """Post-norm ``tgt = LN(tgt + MHA(tgt + qpos, tgt + qpos, tgt))``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt, query_pos):
        q = tgt + query_pos
        return self.norm(tgt + self.dropout(self.attn(q, q, tgt, need_weights=False)[0]))


class FFNLayer(nn.Module):
    """Post-norm ``tgt = LN(tgt + W2 relu(W1 tgt))``."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt):
        return self.norm(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


class MaskedTransformerDecoder(nn.Module):
    """Mask2Former's masked-attention transformer decoder + FASeg's DFPQ and HRCA.

    forward(mask_features (B, C, H4, W4), multi_scale [stride 32, 16, 8] (B, C, h, w)) ->
    ``{"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H4, W4), "aux_outputs": [...]}`` with one
    aux entry per earlier prediction (the initial one from the learned queries, then each layer's
    but the last).
    """

    def __init__(self, num_classes: int, dim: int = 256, num_queries: int = 100, layers: int = 9,
                 heads: int = 8, ffn_dim: int = 2048, dfpq: bool = True, hrca_every: int = 4,
                 hrca_keep_ratio: float = 1 / 32, dropout: float = 0.0):
        super().__init__()
        self.num_classes, self.dim, self.num_queries = num_classes, dim, num_queries
        self.num_layers, self.heads, self.dfpq = layers, heads, dfpq
        self.hrca_every, self.hrca_keep_ratio = hrca_every, hrca_keep_ratio
        self.schedule = layer_schedule(layers, hrca_every)
        self.num_levels = 3
        self.hrca_window = 32 // 4       # window of one stride-32 pixel on the stride-4 map
        self.query_feat = nn.Embedding(num_queries, dim)    # content queries
        self.query_embed = nn.Embedding(num_queries, dim)   # learned positional queries
        self.level_embed = nn.Embedding(self.num_levels + (1 if HR in self.schedule else 0), dim)
        self.cross_attn = nn.ModuleList(CrossAttentionLayer(dim, heads, dropout) for _ in range(layers))
        self.self_attn = nn.ModuleList(SelfAttentionLayer(dim, heads, dropout) for _ in range(layers))
        self.ffn = nn.ModuleList(FFNLayer(dim, ffn_dim, dropout) for _ in range(layers))
        if dfpq:
            self.pos_mlp = MLP(2 * dim, dim, dim, 2)        # DFPQ: concat[A @ P, E] -> positional query
        self.decoder_norm = nn.LayerNorm(dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.mask_embed = MLP(dim, dim, dim, 3)

    # ------------------------------------------------------------------ pieces (tested directly)
    def prediction_heads(self, output, mask_features, target_size=None):
        """-> class logits (B, Q, K+1), mask logits (B, Q, H4, W4), and, if ``target_size``, the
        attention mask (B, Q, h*w) bool, True = blocked: ``sigmoid(bilinear(mask)) < 0.5``, with
        queries blocked everywhere unblocked (Mask2Former), plus the resized mask logits (B, Q, h, w)."""
        out = self.decoder_norm(output)
        logits = self.class_embed(out)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_features)
        if target_size is None:
            return logits, masks, None, None
        small = F.interpolate(masks, size=target_size, mode="bilinear", align_corners=False)
        attn_mask = (small.sigmoid().flatten(2) < 0.5).detach()
        attn_mask[attn_mask.all(-1)] = False
        return logits, masks, attn_mask, small

    def dfpq_query_pos(self, dist: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """DFPQ positional queries: dist (B, Q, S) sums to 1 per query, pos (B, S, C) the level's
        positional encoding -> ``MLP2(concat[dist @ pos, query_embed])`` (B, Q, C)."""
        agg = dist @ pos
        emb = self.query_embed.weight[None].expand(agg.shape[0], -1, -1)
        return self.pos_mlp(torch.cat([agg, emb], -1))

    # ------------------------------------------------------------------------------- forward
    def forward(self, mask_features: torch.Tensor, multi_scale: Sequence[torch.Tensor]) -> Dict:
        B = mask_features.shape[0]
        H4, W4 = mask_features.shape[-2:]
        srcs, poss, sizes = [], [], []
        for lvl, x in enumerate(multi_scale):
            h, w = x.shape[-2:]
            sizes.append((h, w))
            poss.append(sine_position_encoding(B, h, w, self.dim, x.device, x.dtype).flatten(2).transpose(1, 2))
            srcs.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[lvl].to(x.dtype))
        if HR in self.schedule:
            hr_src = mask_features.permute(0, 2, 3, 1) + self.level_embed.weight[self.num_levels].to(mask_features.dtype)
            hr_pos = sine_position_encoding(B, H4, W4, self.dim, mask_features.device,
                                            mask_features.dtype).permute(0, 2, 3, 1)

        def size_of(entry):
            return (H4, W4) if entry == HR else sizes[entry]

        output = self.query_feat.weight[None].expand(B, -1, -1)
        static_pos = self.query_embed.weight[None].expand(B, -1, -1)
        logits, masks, attn_mask, small = self.prediction_heads(output, mask_features,
                                                                size_of(self.schedule[0]) if self.num_layers else None)
        preds = [(logits, masks)]
        # last dense cross-attention distribution (B, Q, h, w), initially the first mask prediction
        last_dist = None if small is None else small.detach().sigmoid()
        acc_low = None                                     # summed stride-32 attention (B, Q, h0, w0)
        for i, entry in enumerate(self.schedule):
            size = size_of(entry)
            if self.dfpq:
                dist = resize_distribution(last_dist, size).flatten(2)
                query_pos = self.dfpq_query_pos(dist, hr_pos.flatten(1, 2) if entry == HR else poss[entry])
            else:
                query_pos = static_pos
            if entry == HR:
                scores = acc_low if acc_low is not None else masks.detach().sigmoid()
                win_idx = hrca_select_windows(scores, (H4, W4), self.hrca_window, self.hrca_keep_ratio)
                output, _ = self.cross_attn[i](output, hr_src, hr_pos, query_pos, win_idx=win_idx,
                                               window=self.hrca_window)
            else:
                output, probs = self.cross_attn[i](output, srcs[entry], poss[entry], query_pos, attn_mask)
                last_dist = probs.detach().reshape(B, -1, *size)
                if entry == 0:
                    acc_low = last_dist if acc_low is None else acc_low + last_dist
            output = self.self_attn[i](output, query_pos)
            output = self.ffn[i](output)
            # the attention mask is for the next dense layer; HRCA layers take none
            nxt = self.schedule[i + 1] if i + 1 < self.num_layers else HR
            nxt = None if nxt == HR else size_of(nxt)
            logits, masks, attn_mask, _ = self.prediction_heads(output, mask_features, nxt)
            preds.append((logits, masks))
        return {"pred_logits": preds[-1][0], "pred_masks": preds[-1][1],
                "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in preds[:-1]]}


def use_fused_hrca(model: nn.Module, enabled: bool = True) -> int:
    """Point every :class:`CrossAttentionLayer` of ``model`` at the fused Triton op
    ``lrformer_kernels.hrca_attention`` (``enabled=False``: back to the reference). Returns the
    number of layers changed. (``lrformer_kernels.fuse`` only swaps the encoder's LRSA blocks.)"""
    if enabled:
        import lrformer_kernels as ops
    else:
        ops = LF
    layers = [m for m in model.modules() if isinstance(m, CrossAttentionLayer)]
    for m in layers:
        m.ops = ops
    return len(layers)


class QueryDecoderHead(nn.Module):
    """``decode_head`` of LRFormer+: :class:`MSDeformPixelDecoder` + :class:`MaskedTransformerDecoder`.

    in_channels: encoder channels at strides 4/8/16/32. forward(feats) -> the decoder's dict.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, hidden_dim: int = 256,
                 num_queries: int = 100, dec_layers: int = 9, dec_heads: int = 8, dec_ffn: int = 2048,
                 enc_layers: int = 6, enc_heads: int = 8, enc_points: int = 4, enc_ffn: int = 1024,
                 dfpq: bool = True, hrca_every: int = 4, hrca_keep_ratio: float = 1 / 32,
                 dropout: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.pixel_decoder = MSDeformPixelDecoder(in_channels, hidden_dim, enc_layers, enc_heads, enc_points,
                                                  enc_ffn, dropout)
        self.predictor = MaskedTransformerDecoder(num_classes, hidden_dim, num_queries, dec_layers, dec_heads,
                                                  dec_ffn, dfpq, hrca_every, hrca_keep_ratio, dropout)

    def forward(self, feats: Sequence[torch.Tensor]) -> Dict:
        mask_features, multi_scale = self.pixel_decoder(feats)
        return self.predictor(mask_features, multi_scale)
