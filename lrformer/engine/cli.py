"""What the engine's command lines share: the model options and building a model from them."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

import torch
import torch.nn as nn

from .data import DATASET_DEFAULTS

# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="lrformer_t / _s / _b / _l (LRHead), lrformer_{t,s,b,l,xl}_plus (released LRFormer+: "
                        "Mask2Former head) or lrformer_{t,s,b,l,xl}_faseg (FASeg's decoder) "
                        "(default: the checkpoint's, else lrformer_t)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="default: the checkpoint's, else 150 (ADE20K) / 19 (Cityscapes)")
    g.add_argument("--model-kwargs", default=None,
                   help="JSON dict of create_model overrides, e.g. '{\"drop_path_rate\": 0.2}'")
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="fused Triton kernels (default: on when CUDA is available)")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: cuda:LOCAL_RANK when CUDA is available")
    add_debug_arg(p)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` except where the default is None (those helps say what happens)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def apply_checkpoint_meta(args, meta: Optional[dict]):
    """Take ``model`` / ``num_classes`` / ``model_kwargs`` / ``dataset`` from a checkpoint written by
    this trainer where the command line left them unset."""
    if not meta:
        return args
    for key in ("model", "num_classes", "model_kwargs", "dataset"):
        if getattr(args, key, "missing") is None and meta.get(key) is not None:
            setattr(args, key, meta[key])
    return args


def resolve_defaults(args):
    """Fill the remaining defaults in place (model, dataset-dependent class count, fused, kwargs)."""
    if getattr(args, "dataset", None) is None:
        args.dataset = "ade20k"
    if args.model is None:
        args.model = "lrformer_t"
    if getattr(args, "num_classes", None) is None:
        args.num_classes = DATASET_DEFAULTS[args.dataset]["num_classes"]
    if args.fused is None:
        args.fused = torch.cuda.is_available() and args.device != "cpu"
    if args.model_kwargs is None:
        args.model_kwargs = {}
    elif isinstance(args.model_kwargs, str):
        args.model_kwargs = json.loads(args.model_kwargs)
    return args


def build_model(args) -> nn.Module:
    """The one place a segmentor is built from the command line (``--model``, ``--num-classes``,
    ``--model-kwargs``, ``--fused``, ``--pretrained``), after :func:`resolve_defaults`."""
    from ..factory import create_model
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(args.model_kwargs).items()}
    return create_model(args.model, num_classes=args.num_classes, fused=bool(args.fused),
                        pretrained=getattr(args, "pretrained", None),
                        pretrained_sha256=getattr(args, "pretrained_sha256", None), **kw)


def load_trained(args, checkpoint: str) -> nn.Module:
    """Build the model described by ``args`` (completed from the checkpoint's meta) and load
    ``checkpoint`` (ours, or a released mmseg file) into it."""
    from ..checkpoint import fetch_checkpoint, load_checkpoint, read_checkpoint
    ckpt = read_checkpoint(fetch_checkpoint(checkpoint))
    apply_checkpoint_meta(args, ckpt.get("meta") if isinstance(ckpt, dict) else None)
    resolve_defaults(args)
    fused, args.fused = args.fused, False
    model = build_model(args)
    load_checkpoint(model, ckpt)
    args.fused = fused
    if fused:
        from lrformer_kernels import fuse
        fuse(model)
    return model


def amp_dtype_from(name: str, device: torch.device) -> Optional[torch.dtype]:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]




def add_debug_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def run_cli(main: Callable, prog: str, argv=None) -> int:
    """Console-script wrapper: ``main(argv)``; an error prints one line ``prog: error: ...`` (the full
    traceback with ``--debug``) and exits with status 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        main(argv)
    except KeyboardInterrupt as e:            # the trainer's TrainingInterrupted says what it saved
        print(f"{prog}: {e}" if str(e) else f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        if "--debug" in argv:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{prog}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0
