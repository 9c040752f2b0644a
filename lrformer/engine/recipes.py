"""The released training recipes, one preset per model family; command-line flags override them.

* ``lrformer`` (``lrformer_{t,s,b,l}``, LRHead): the paper's mmseg recipe.
* ``plus`` (``lrformer_*_plus``, the released LRFormer+): ``../shared/SPEC_PLUS.md`` A.6 — AdamW 1e-4,
  weight decay 0.05, backbone lr x0.1, mmengine's custom keys for norms and query embeddings, poly 0.9
  without warm-up, gradient clipping 0.01 (T+) / 0.1, shortest-edge resize 256..1024 (long <= 2048).
* ``faseg`` (``lrformer_*_faseg``): B.6 — AdamW 1e-4, weight decay 0.05 (0 for norms and embeddings),
  backbone lr x0.1, full-model clipping 0.01, poly 0.9 without warm-up, shortest-edge resize, crop
  without the single-class limit, padding the image with 128.
"""
from __future__ import annotations

import re
from typing import Dict, List

import torch.nn as nn

from .data import DATASET_DEFAULTS

#: shortest edges of the released query-decoder pipelines: floor(512 * x / 10), x = 5..20
SHORT_EDGES = tuple(int(512 * x / 10) for x in range(5, 21))

_BASE = dict(warmup_ratio=1e-6, min_lr=0.0, photometric=True, ratio_range=(0.5, 2.0), max_long=2048,
             pad_value="mean", short_edges=SHORT_EDGES)
RECIPES: Dict[str, dict] = {
    "lrformer": dict(_BASE, lr=6e-5, weight_decay=0.01, param_rule="lrformer", head_lr_mult=10.0,
                     backbone_lr_mult=1.0, warmup_iters=1500, poly_power=1.0, clip_grad=None, batch_size=16,
                     crop_size=(512, 512), resize="ratio", cat_max_ratio=0.75),
    "plus": dict(_BASE, lr=1e-4, weight_decay=0.05, param_rule="plus", head_lr_mult=1.0, backbone_lr_mult=0.1,
                 warmup_iters=0, poly_power=0.9, clip_grad=0.1, batch_size=32, crop_size=(512, 512),
                 resize="short_edge", cat_max_ratio=0.75),
    "faseg": dict(_BASE, lr=1e-4, weight_decay=0.05, param_rule="faseg", head_lr_mult=1.0, backbone_lr_mult=0.1,
                  warmup_iters=0, poly_power=0.9, clip_grad=0.01, batch_size=16, crop_size=(512, 512),
                  resize="short_edge", cat_max_ratio=1.0, pad_value=128),
}
#: per-variant differences of the released LRFormer+ configs (SPEC_PLUS A.6)
PLUS_VARIANT = {"t": dict(clip_grad=0.01, batch_size=16), "xl": dict(batch_size=16, crop_size=(640, 640),
                                                                      short_edges=tuple(int(640 * x / 10)
                                                                                        for x in range(5, 21)))}


def family_of(model_name: str) -> str:
    for fam in ("plus", "faseg"):
        if model_name.endswith(f"_{fam}"):
            return fam
    return "lrformer"


def recipe_for(model_name: str) -> dict:
    """The preset of ``model_name``'s family (with the released per-variant differences)."""
    fam = family_of(model_name)
    r = dict(RECIPES[fam], family=fam)
    if fam == "plus":
        variant = model_name[len("lrformer_"):-len("_plus")]
        r.update(PLUS_VARIANT.get(variant, {}))
    return r


# ----------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
#: mmengine custom keys of the LRFormer+ configs that set decay 0 inside the backbone (A.6)
_PLUS_BACKBONE_NO_DECAY = re.compile(r"^backbone\.(patch_embed\d+\.norm\.|block\d+\.\d+\.(norm\d*|pre_norm)\.|"
                                     r"block\d+\.\d+\.attn\.norm\.)")
_PLUS_EMBEDDINGS = ("query_embed", "query_feat", "level_embed")


def _owners(model: nn.Module) -> Dict[str, nn.Module]:
    out = {}
    for mod_name, mod in model.named_modules():
        for pn, _ in mod.named_parameters(recurse=False):
            out[f"{mod_name}.{pn}" if mod_name else pn] = mod
    return out


def param_rule(rule: str, name: str, owner: nn.Module, head_lr_mult: float, backbone_lr_mult: float):
    """(lr multiplier, weight decay on/off) of parameter ``name`` (owned by ``owner``) under ``rule``."""
    backbone = name.startswith("backbone.")
    lr = backbone_lr_mult if backbone else head_lr_mult
    norm = isinstance(owner, NORM_TYPES)
    if rule == "lrformer":        # mmseg paramwise_cfg: no decay on norm layers and layer scales
        return lr, not (norm or name.rsplit(".", 1)[-1].startswith("layer_scale"))
    if rule == "plus":            # mmengine custom keys (the longest match wins), norm_decay_mult=0 otherwise
        if backbone:
            return lr, not _PLUS_BACKBONE_NO_DECAY.match(name)
        if any(k in name for k in _PLUS_EMBEDDINGS):
            return 1.0, False
        return lr, not norm
    if rule == "faseg":           # detectron2: WEIGHT_DECAY_NORM 0, WEIGHT_DECAY_EMBED 0
        return lr, not (norm or isinstance(owner, nn.Embedding))
    raise ValueError(f"unknown parameter rule {rule!r}")


def param_groups(model: nn.Module, weight_decay: float, head_lr_mult: float = 10.0, backbone_lr_mult: float = 1.0,
                 rule: str = "lrformer") -> List[dict]:
    """AdamW parameter groups by (part, lr multiplier, decay); each carries ``lr_mult`` (the scheduler
    multiplies it in) and a ``name``."""
    owners = _owners(model)
    groups: Dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult, decay = param_rule(rule, name, owners[name], head_lr_mult, backbone_lr_mult)
        part = "backbone" if name.startswith("backbone.") else "head"
        key = (part, lr_mult, decay)
        g = groups.setdefault(key, {"params": [], "names": [], "lr_mult": lr_mult,
                                    "name": f"{part}_{'decay' if decay else 'no_decay'}",
                                    "weight_decay": weight_decay if decay else 0.0})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups, key=str)]


def format_recipe(args, groups: List[dict]) -> str:
    """The resolved recipe as text (``--print-config``)."""
    ds = DATASET_DEFAULTS[args.dataset]
    lines = [f"model {args.model} (family {args.family}), dataset {args.dataset}, {args.num_classes} classes",
             f"optimizer AdamW lr {args.lr:g} betas (0.9, 0.999) eps 1e-8 weight_decay {args.weight_decay:g}",
             "parameter groups:"]
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        lines.append(f"  {g['name']:<28} {len(g['params']):>5} tensors {n:>12,} params  lr x{g['lr_mult']:g}  "
                     f"weight_decay {g['weight_decay']:g}")
    lines += [f"schedule {args.iters} iterations, poly power {args.poly_power:g} to {args.min_lr:g}, "
              f"warm-up {args.warmup_iters} iterations" + (f" from x{args.warmup_ratio:g}" if args.warmup_iters else ""),
              f"gradient clipping: {'off' if not args.clip_grad else f'global L2 norm {args.clip_grad:g}'}",
              f"batch {args.batch_size} in total, amp {args.amp}",
              "train pipeline: " + train_pipeline_text(args),
              f"test pipeline: resize keep-ratio to fit {tuple(args.test_scale or ds['scale'])}, "
              f"{args.mode or ds['test_mode']} inference" + (", pad to a multiple of 32 and crop back"
                                                            if args.family != "lrformer" else "")]
    return "\n".join(lines)


def train_pipeline_text(args) -> str:
    if args.resize == "short_edge":
        resize = (f"shortest edge from {{{min(args.short_edges)}..{max(args.short_edges)}}} "
                  f"({len(args.short_edges)} choices), long edge <= {args.max_long}")
    else:
        resize = f"random resize x{args.ratio_range[0]:g}..{args.ratio_range[1]:g} of {tuple(args.scale)}"
    crop = f"random crop {tuple(args.crop_size)}" + (f" (cat_max_ratio {args.cat_max_ratio:g})"
                                                     if args.cat_max_ratio < 1 else "")
    pad = "pad image 0 after normalising" if args.pad_value == "mean" else f"pad image {args.pad_value} (raw)"
    return (f"{resize}; {crop}; flip 0.5; " + ("photometric distortion; " if args.photometric else "")
            + f"normalise; {pad}, label 255")
