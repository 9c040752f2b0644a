"""FASeg's decoder as its authors published it (``MaskFormerHeadFASeg``), parameters under its names.

``pixel_decoder`` (SPEC_PLUS B.1): the stride 32/16/8 maps and res2 projected (1x1 conv + GN,
``input_proj.0..3``), a learned conditional positional encoding per level (``pos_linear``: depthwise 3x3
of the projected map), 6 post-norm deformable encoder layers (``transformer.encoder``, PE +
``transformer.level_embed``), the FPN step to stride 4 (``adapter_1``, ``layer_1``) and
``mask_features``; it returns 4 maps [1/32, 1/16, 1/8, 1/4] and their 4 PEs (the res2 one for HRCA).

``predictor`` (SPEC_PLUS B.2): 13 layers cross-attention -> self-attention -> FFN over levels
1/32, 1/16, 1/8 and the HRCA branch (layers 3, 7, 11), masks blocked where ``sigmoid < 0.15``, and
DFPQ: the query position is ``adapt_pos2d(A @ PE + E)`` rebuilt after each standard layer from its
head-averaged attention ``A`` (before layer 0 from the first prediction's complement, ``sigmoid < 0.5``).
HRCA: one set of ``n0 // 32`` windows per image (the stride-32 tokens ranked by the latest stride-32
layer's attention summed over all queries), each an ``s x s`` window of the stride-4 map
(``s = floor(sqrt(H4 W4 // n0))``); keys = the windows of the FPN output + ``level_embed[3]`` with the
res2 PE, query position = the static ``query_embed`` E, no mask; with no window the layer attends to an
empty key set and its attention output is the output projection's bias, as in the released code.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lrformer_kernels import Fusable

from .common import attention_mask, check_features, deform_encode, ffn, fused_mha, mha, outputs, predict
from .msdeform import DeformEncoderLayer, group_norm


class NormConv2d(nn.Conv2d):
    """detectron2's ``Conv2d`` with ``norm`` (and optional ReLU): keys ``weight``, ``norm.*``."""

    def __init__(self, cin: int, cout: int, kernel: int, relu: bool = False):
        super().__init__(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.norm = group_norm(cout)
        self.relu = relu
        nn.init.kaiming_uniform_(self.weight, a=1)

    def forward(self, x):
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


class EncoderOnly(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, points: int, ffn_dim: int):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(3, dim).normal_())
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(DeformEncoderLayer(dim, ffn_dim, 3, heads, points) for _ in range(layers))
        for p in self.encoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.encoder.layers:
            layer.self_attn.reset_parameters()


class WindowedPE:
    """The res2 positional encoding ``pos_linear[3](GN(input_proj[3](res2)))`` evaluated only where HRCA
    needs it: on the selected windows plus a one-pixel halo (the depthwise 3x3's support), never over
    the whole stride-4 map.  GroupNorm's statistics of a 1x1 projection ``y = W x + b`` follow exactly
    from the input's per-sample channel means ``mu`` and second moments ``S = E[x x^T]``:
    ``E[y_c] = W_c mu + b_c`` and ``E[y_c^2] = W_c S W_c^T + 2 b_c W_c mu + b_c^2``, averaged over a
    group's channels — one pass over the narrow res2 map (48..128 channels)."""

    def __init__(self, res2: torch.Tensor, proj: nn.Sequential, pos_linear: nn.Conv2d):
        self.x, self.conv, self.gn, self.pos = res2, proj[0], proj[1], pos_linear
        B, cin, H, W = res2.shape
        xf = res2.flatten(2).to(torch.promote_types(res2.dtype, torch.float32))
        mu = xf.mean(-1)                                                    # (B, Cin)
        S = torch.einsum("bcn,bdn->bcd", xf, xf) / (H * W)                  # (B, Cin, Cin)
        w, b = self.conv.weight.flatten(1).to(xf.dtype), self.conv.bias.to(xf.dtype)
        mean_c = mu @ w.t() + b                                             # (B, C)
        e2_c = torch.einsum("cd,bde,ce->bc", w, S, w) + 2 * b * (mu @ w.t()) + b * b
        G = self.gn.num_groups
        mean_g = mean_c.unflatten(1, (G, -1)).mean(-1)
        var_g = e2_c.unflatten(1, (G, -1)).mean(-1) - mean_g * mean_g
        self.mean = mean_g.repeat_interleave(mean_c.shape[1] // G, 1)       # (B, C) per channel
        self.rstd = torch.rsqrt(var_g.clamp_min(0) + self.gn.eps).repeat_interleave(mean_c.shape[1] // G, 1)

    def gather(self, win: torch.Tensor, window: int, grid_w: int) -> torch.Tensor:
        """Tokens (B, K * window**2, C) of the PE on windows ``win`` (B, K), as :func:`gather_windows`
        of the full PE map would give."""
        B, cin, H, W = self.x.shape
        K, ws = win.shape[1], window
        if K == 0:
            return self.x.new_zeros((B, 0, self.conv.out_channels))
        off = torch.arange(-1, ws + 1, device=win.device)
        rows = (win // grid_w)[:, :, None, None] * ws + off[:, None]        # (B, K, ws+2, 1)
        cols = (win % grid_w)[:, :, None, None] * ws + off[None, :]         # (B, K, 1, ws+2)
        rows, cols = torch.broadcast_tensors(rows, cols)
        inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
        flat = (rows.clamp(0, H - 1) * W + cols.clamp(0, W - 1)).reshape(B, 1, -1)
        xw = torch.gather(self.x.flatten(2), 2, flat.expand(B, cin, -1))     # (B, Cin, K*(ws+2)^2)
        y = F.conv1d(xw, self.conv.weight.flatten(1)[..., None], self.conv.bias)
        y = (y - self.mean[..., None].to(y.dtype)) * self.rstd[..., None].to(y.dtype)
        y = y * self.gn.weight[:, None] + self.gn.bias[:, None]
        y = y * inside.reshape(B, 1, -1).to(y.dtype)                        # the conv's zero padding
        C = y.shape[1]
        y = y.reshape(B, C, K, ws + 2, ws + 2).transpose(1, 2).reshape(B * K, C, ws + 2, ws + 2)
        pe = F.conv2d(y, self.pos.weight, self.pos.bias, groups=C)          # (B*K, C, ws, ws)
        return pe.reshape(B, K, C, ws * ws).permute(0, 1, 3, 2).reshape(B, K * ws * ws, C)


class FASegPixelDecoder(Fusable, nn.Module):
    """-> (mask_features (B, C, H/4, W/4), [1/32, 1/16, 1/8, 1/4 maps], [their 4 positional encodings]).
    Fused (``lrformer_kernels.fuse``), the res2 PE (used only by HRCA) is a :class:`WindowedPE`."""

    def __init__(self, in_channels: Sequence[int], dim: int = 256, layers: int = 6, heads: int = 8,
                 points: int = 4, ffn_dim: int = 1024):
        super().__init__()
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, dim, 1), group_norm(dim))
                                        for c in list(reversed(in_channels[1:])) + [in_channels[0]])
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.pos_linear = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1, groups=dim) for _ in range(4))
        self.transformer = EncoderOnly(dim, layers, heads, points, ffn_dim)
        self.mask_features = nn.Conv2d(dim, dim, 1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)
        self.adapter_1 = NormConv2d(in_channels[0], dim, 1)
        self.layer_1 = NormConv2d(dim, dim, 3, relu=True)

    def forward(self, feats: Sequence[torch.Tensor]):
        srcs = [proj(f) for proj, f in zip(self.input_proj[:3], reversed(feats[1:]))]
        pos = [lin(s) for lin, s in zip(self.pos_linear, srcs)]
        if self.fused:
            pos.append(WindowedPE(feats[0], self.input_proj[3], self.pos_linear[3]))
        else:
            pos.append(self.pos_linear[3](self.input_proj[3](feats[0])))
        lvl = self.transformer.level_embed
        outs = deform_encode(self.transformer.encoder.layers, srcs,
                             [p + lvl[i].to(p.dtype)[None, :, None, None] for i, p in enumerate(pos[:3])])
        y = self.adapter_1(feats[0]) + F.interpolate(outs[-1], size=feats[0].shape[-2:], mode="bilinear",
                                                     align_corners=False)
        y = self.layer_1(y)
        return self.mask_features(y), outs + [y], pos


class _Attn(Fusable, nn.Module):
    """Post-norm attention layer ``tgt = LN(tgt + MHA(tgt + qpos, mem + pos, mem))`` (detectron2 names).
    Fused (``lrformer_kernels.fuse``), the unmasked attentions (HRCA over the shared windows of an
    image, self-attention) run through ``lowres_attention``."""

    def __init__(self, dim: int, heads: int, attr: str):
        super().__init__()
        self.attr = attr
        setattr(self, attr, nn.MultiheadAttention(dim, heads, dropout=0.0))
        self.norm = nn.LayerNorm(dim)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt, memory, pos, query_pos, mask=None, weights=False):
        attn = getattr(self, self.attr)
        if memory.shape[1] == 0:           # no key (HRCA with 0 windows): softmax over nothing -> bias
            out, w = attn.out_proj.bias.to(tgt.dtype).expand_as(tgt), None
        elif self.fused and mask is None and not weights:
            out, w = fused_mha(attn, tgt + query_pos, memory + pos, memory, self.ops), None
        else:
            out, w = mha(attn, tgt + query_pos, memory + pos, memory, mask, weights)
        return self.norm(tgt + out), w


class CrossAttentionLayer(_Attn):
    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads, "multihead_attn")


class SelfAttentionLayer(_Attn):
    def __init__(self, dim: int, heads: int):
        super().__init__(dim, heads, "self_attn")


class FFNLayer(nn.Module):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tgt):
        return self.norm(tgt + ffn(self.linear1, self.linear2, tgt))


class MLP(nn.Module):
    """detectron2 Mask2Former's ``MLP`` (keys ``layers.0..2``), ReLU between layers."""

    def __init__(self, dim: int, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x):
        for i, lin in enumerate(self.layers):
            x = lin(x) if i == len(self.layers) - 1 else F.relu(lin(x))
        return x


def hrca_windows(scores: torch.Tensor, n_windows: int) -> torch.Tensor:
    """FASeg's window choice: stride-32 token scores (B, n0) (attention summed over queries) ->
    indices (B, n_windows) of the highest, in rank order."""
    return scores.sort(dim=-1, descending=True).indices[:, :n_windows]


def gather_windows(x: torch.Tensor, win: torch.Tensor, window: int, grid_w: int) -> torch.Tensor:
    """Tokens (B, K * window**2, C) of the windows ``win`` (B, K) (row-major in a grid ``grid_w`` wide) of
    the map x (B, C, H, W), windows in the order of ``win``, pixels row-major inside a window (the
    released ``window_partition`` + gather)."""
    B, C = x.shape[:2]
    K = win.shape[1]
    off = torch.arange(window, device=x.device)
    rows = (win // grid_w)[:, :, None, None] * window + off[:, None]
    cols = (win % grid_w)[:, :, None, None] * window + off[None, :]
    flat = (rows * x.shape[-1] + cols).reshape(B, 1, K * window * window)
    return torch.gather(x.flatten(2), 2, flat.expand(B, C, -1)).transpose(1, 2)


class FASegPredictor(nn.Module):
    """``MultiScaleMaskedTransformerDecoderFASeg`` (13 layers, HRCA at 3, 7, 11)."""

    mask_threshold = 0.15
    pooling_threshold = 0.5

    def __init__(self, num_classes: int, dim: int = 256, num_queries: int = 100, layers: int = 13,
                 heads: int = 8, ffn_dim: int = 2048, omega_rate: int = 32):
        super().__init__()
        self.heads, self.omega_rate = heads, omega_rate
        self.transformer_self_attention_layers = nn.ModuleList(SelfAttentionLayer(dim, heads) for _ in range(layers))
        self.transformer_cross_attention_layers = nn.ModuleList(CrossAttentionLayer(dim, heads) for _ in range(layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(dim, ffn_dim) for _ in range(layers))
        self.decoder_norm = nn.LayerNorm(dim)
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_embed = nn.Embedding(num_queries, dim)
        self.level_embed = nn.Embedding(4, dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)
        self.mask_embed = MLP(dim, 3)
        self.adapt_pos2d = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, maps, mask_features, pos2d) -> Dict:
        B, C = mask_features.shape[:2]
        src = [m.flatten(2).transpose(1, 2) + self.level_embed.weight[i] for i, m in enumerate(maps)]
        pos = [p.flatten(2).transpose(1, 2) for p in pos2d[:3]]          # the res2 PE is only gathered
        sizes = [m.shape[-2:] for m in maps]
        fg_src, fg_pos = maps[3] + self.level_embed.weight[3][None, :, None, None], pos2d[3]
        n0, w32 = src[0].shape[1], sizes[0][1]
        window = int((fg_src.shape[-1] * fg_src.shape[-2] // n0) ** 0.5)
        E = self.query_embed.weight[None].expand(B, -1, -1)
        query = self.query_feat.weight[None].expand(B, -1, -1)
        head = (self.decoder_norm, self.class_embed, self.mask_embed)
        preds = [predict(*head, query, mask_features)]
        # DFPQ before layer 0: positions outside the first predicted masks (sigmoid < 0.5) at 1/32
        m0 = F.interpolate(preds[0][1], size=tuple(sizes[0]), mode="bilinear", align_corners=False)
        pooling = (m0.flatten(2).sigmoid() < self.pooling_threshold).to(query.dtype)
        P = self.adapt_pos2d(pooling @ pos[0] / (pooling.sum(-1, keepdim=True) + 1e-6) + E)
        self.last_windows, cg_attn = {}, None
        for i, (cross, self_attn, ffn_layer) in enumerate(zip(self.transformer_cross_attention_layers,
                                                               self.transformer_self_attention_layers,
                                                               self.transformer_ffn_layers)):
            lvl = i % 4
            if lvl == 3:                                                   # HRCA
                win = hrca_windows(cg_attn.sum(1), n0 // self.omega_rate)
                self.last_windows[i] = win
                keys = gather_windows(fg_src, win, window, w32)
                kpos = (fg_pos.gather(win, window, w32) if isinstance(fg_pos, WindowedPE)
                        else gather_windows(fg_pos, win, window, w32))
                query, _ = cross(query, keys, kpos, E)
            else:
                mask = attention_mask(preds[-1][1], sizes[lvl], self.mask_threshold, self.heads)
                query, attn = cross(query, src[lvl], pos[lvl], P, mask, weights=True)
                if lvl == 0:
                    cg_attn = attn
            query, _ = self_attn(query, query, P, P)                      # q = k = query + P, v = query
            query = ffn_layer(query)
            preds.append(predict(*head, query, mask_features))
            if lvl != 3:                                                   # DFPQ from this layer's attention
                P = self.adapt_pos2d(attn @ pos[lvl] + E)
        return outputs(preds)


class FASegHead(nn.Module):
    """FASeg's ``sem_seg_head`` as the ``decode_head`` of an LRFormer encoder: ``forward(feats)`` on the
    four encoder maps (strides 4, 8, 16, 32) -> ``{"pred_logits", "pred_masks", "aux_outputs"}`` with
    ``layers`` aux predictions.  A FASeg checkpoint's ``sem_seg_head.*`` weights load into it when
    the encoder widths match."""

    def __init__(self, in_channels: Sequence[int], num_classes: int = 150, dim: int = 256, num_queries: int = 100,
                 layers: int = 13, heads: int = 8, ffn_dim: int = 2048, enc_layers: int = 6, enc_ffn_dim: int = 1024):
        super().__init__()
        self.in_channels, self.num_classes = tuple(in_channels), num_classes
        self.pixel_decoder = FASegPixelDecoder(in_channels, dim, enc_layers, heads, 4, enc_ffn_dim)
        self.predictor = FASegPredictor(num_classes, dim, num_queries, layers, heads, ffn_dim)

    def forward(self, feats: Sequence[torch.Tensor]) -> Dict:
        check_features(feats, self.in_channels, "FASegHead")
        mask_features, maps, pos = self.pixel_decoder(feats)
        return self.predictor(maps, mask_features, pos)
