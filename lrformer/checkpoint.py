"""Loading the released (mmseg-format) checkpoints with their exact parameter names."""
from __future__ import annotations

import os
from typing import Mapping, Union

import torch
import torch.nn as nn


class CheckpointMismatch(RuntimeError):
    """The checkpoint's keys or shapes do not match the model (message lists them)."""


def _unwrap(obj) -> dict:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], Mapping):
                return _unwrap(obj[key])
        return dict(obj)
    raise TypeError(f"checkpoint must be a mapping of tensors, got {type(obj).__name__}")


def adapt_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict:
    """Rename checkpoint keys for ``model``: strip ``module.`` (DDP); add ``backbone.`` for an
    encoder-only file loaded into a segmentor; strip ``backbone.`` (dropping ``decode_head.*``)
    for a segmentor file loaded into an encoder."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    is_segmentor = hasattr(model, "backbone")
    has_prefix = any(k.startswith("backbone.") for k in state)
    if is_segmentor and not has_prefix:
        state = {"backbone." + k: v for k, v in state.items()}
    elif not is_segmentor and has_prefix:
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_checkpoint(model: nn.Module, checkpoint: Union[str, os.PathLike, Mapping], strict: bool = True,
                    map_location="cpu", verbose: bool = False):
    """Load a released LRFormer checkpoint (path or state dict) into ``model``.

    Accepts the mmseg files (``state_dict`` wrapper, ``backbone.``/``decode_head.`` prefixes) and the
    encoder-only ImageNet files.  An encoder-only file loaded into a segmentor loads the encoder
    strictly and reports the head as missing (it is trained from scratch).  Raises
    :class:`CheckpointMismatch` naming every missing, unexpected or mis-shaped key otherwise.
    Returns ``(missing, unexpected)``.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        if not os.path.exists(checkpoint):
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        checkpoint = torch.load(checkpoint, map_location=map_location, weights_only=True)
    raw = _unwrap(checkpoint)
    encoder_only_file = hasattr(model, "backbone") and not any(
        k.startswith(("backbone.", "decode_head.", "module.backbone.")) for k in raw)
    state = adapt_state_dict(raw, model)
    own = model.state_dict()
    shape_errors = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    head_missing = [k for k in missing if k.startswith("decode_head.")] if encoder_only_file else []
    real_missing = [k for k in missing if k not in head_missing]
    if shape_errors or (strict and (real_missing or unexpected)):
        lines = []
        if shape_errors:
            lines.append(f"{len(shape_errors)} shape mismatch(es):\n  " + "\n  ".join(shape_errors))
        if real_missing:
            lines.append(f"{len(real_missing)} missing key(s):\n  " + "\n  ".join(real_missing))
        if unexpected:
            lines.append(f"{len(unexpected)} unexpected key(s):\n  " + "\n  ".join(unexpected))
        raise CheckpointMismatch("checkpoint does not match the model:\n" + "\n".join(lines))
    model.load_state_dict(state, strict=False)
    if verbose or head_missing:
        msg = f"loaded {len(state)} tensors"
        if head_missing:
            msg += f"; encoder-only checkpoint: {len(head_missing)} decode_head keys left at their init"
        if missing and not strict:
            msg += f"; missing {len(real_missing)}"
        if unexpected and not strict:
            msg += f"; ignored {len(unexpected)} unexpected"
        print(msg)
    return missing, unexpected
