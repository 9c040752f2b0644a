"""Train LRFormer (iteration-based, the paper's mmseg recipe) on one GPU, many GPUs or the CPU.

Single process::

    python -m lrformer.engine.train --data data/ade/ADEChallengeData2016 --dataset ade20k --model lrformer_t \
        --pretrained lrformer_t_imagenet.pth --work-dir runs/t_ade

Several GPUs / nodes: the same arguments under ``torchrun`` (DDP, SyncBatchNorm in the head,
one shard of every batch per rank; ``--batch-size`` is the total over all ranks)::

    torchrun --nproc_per_node 8 -m lrformer.engine.train --data ... --work-dir runs/t_ade

Defaults = the released recipe of the model's family (:mod:`lrformer.engine.recipes`; ``--print-config``
shows it resolved): LRFormer's mmseg recipe for ``lrformer_{t,s,b,l}`` (AdamW 6e-5, weight decay 0.01,
head lr x10, no decay on norms and layer scales, 1500-iteration warm-up then poly 1, random resize
0.5-2.0 + crop 512 with cat_max_ratio 0.75 + flip + photometric distortion), the released LRFormer+
recipe for ``*_plus`` and FASeg's for ``*_faseg``; every flag overrides its preset.  bf16 autocast and
the fused Triton kernels are on by default on CUDA.  Checkpoints (``work_dir/iter_<step>.pth`` and
``work_dir/latest.pth``, written atomically) hold ``{"state_dict", "optimizer", "scheduler", "step",
"meta"}``; ``lrformer.load_checkpoint`` reads them and ``--resume auto`` continues from ``latest.pth``
at the exact step (same batches, augmentations and learning rate as an uninterrupted run).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import signal
import sys
import threading
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from .cli import HelpFormatter, add_model_args, amp_dtype_from, build_model, resolve_defaults, run_cli
from .recipes import format_recipe, param_groups, recipe_for
from .data import DATASET_DEFAULTS, SegDataset, StepBatchSampler, TrainTransform, collate, worker_init
from .distributed import (DistInfo, all_reduce_sum, barrier, broadcast_buffers, cleanup, convert_sync_batchnorm,
                          init_distributed)

# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------

def lr_at(step: int, base_lr: float, max_iters: int, warmup_iters: int = 1500, warmup_ratio: float = 1e-6,
          power: float = 1.0, min_lr: float = 0.0) -> float:
    """mmcv's PolyLrUpdaterHook with linear warmup (by iteration), for the update at 0-based ``step``:
    ``poly = (base - min) * (1 - step / max_iters) ** power + min``, times
    ``1 - (1 - step / warmup_iters) * (1 - warmup_ratio)`` during warmup."""
    progress = min(step, max_iters) / max(max_iters, 1)
    lr = (base_lr - min_lr) * (1.0 - progress) ** power + min_lr
    if step < warmup_iters:
        lr *= 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return lr


def set_lr(optimizer, step: int, args) -> float:
    lr = lr_at(step, args.lr, args.iters, args.warmup_iters, args.warmup_ratio, args.poly_power, args.min_lr)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def save_atomic(obj, path: str):
    """torch.save to ``path + '.tmp'`` then ``os.replace``: a crash never leaves a truncated ``path``."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM during training: raised after the checkpoint of the step in progress was saved."""

    def __init__(self, signame: str, step: int, checkpoint: Optional[str]):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        super().__init__(f"interrupted by {signame} at step {step}: saved {checkpoint}; continue with "
                         f"--resume auto")


def find_resume(resume: Optional[str], work_dir: str, verbose: bool = False) -> Optional[str]:
    """``--resume auto``: ``work_dir/latest.pth`` if present (else start fresh, saying so when
    ``verbose``); a path: that file."""
    if not resume:
        return None
    if resume == "auto":
        path = os.path.join(work_dir, "latest.pth")
        if os.path.isfile(path):
            return path
        if verbose:
            print(f"--resume auto: nothing to resume in {work_dir} (no latest.pth), starting from scratch",
                  file=sys.stderr)
        return None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume: checkpoint not found: {resume}")
    return resume


def _prune(work_dir: str, keep: int):
    if keep <= 0:
        return
    files = glob.glob(os.path.join(work_dir, "iter_*.pth"))
    files.sort(key=lambda f: int(re.findall(r"iter_(\d+)\.pth$", f)[0]))
    for f in files[:-keep]:
        os.remove(f)


class LossWrapper(nn.Module):
    """``forward(images, labels) = model.loss(images, labels)`` so that DDP sees the loss computation."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, labels):
        return self.model.loss(images, labels)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrformer-train", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="dataset root (ADE20K or Cityscapes layout)")
    p.add_argument("--dataset", choices=tuple(DATASET_DEFAULTS), default="ade20k", help="folder layout / recipe")
    p.add_argument("--work-dir", required=True, help="checkpoints and logs go here")
    p.add_argument("--pretrained", default=None,
                   help="ImageNet encoder checkpoint or a full segmentor file: a path or a URL (downloaded once "
                        "into torch's hub cache)")
    p.add_argument("--pretrained-sha256", default=None, help="expected SHA-256 (or a prefix) of --pretrained")
    p.add_argument("--resume", default=None, help="'auto' (work_dir/latest.pth when present) or a checkpoint path")
    add_model_args(p)
    g = p.add_argument_group("schedule (defaults: the model family's released recipe, see --print-config)")
    g.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    g.add_argument("--iters", type=int, default=160000, help="total iterations")
    g.add_argument("--batch-size", type=int, default=None, help="total batch over all processes")
    g.add_argument("--lr", type=float, default=None, help="base learning rate")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    g.add_argument("--head-lr-mult", type=float, default=None, help="learning-rate multiplier of the decoder")
    g.add_argument("--backbone-lr-mult", type=float, default=None, help="learning-rate multiplier of the encoder")
    g.add_argument("--warmup-iters", type=int, default=None, help="linear warmup iterations")
    g.add_argument("--warmup-ratio", type=float, default=None, help="warmup starts at this fraction of the lr")
    g.add_argument("--poly-power", type=float, default=None, help="poly decay power")
    g.add_argument("--min-lr", type=float, default=None, help="poly decay floor")
    g.add_argument("--clip-grad", type=float, default=None,
                   help="clip the global gradient norm to this (0: off; default: the recipe's)")
    g.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="autocast dtype (auto: bf16 on CUDA, none on CPU); fp16 uses a GradScaler")
    g.add_argument("--stop-after", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps of this run, keeping the --iters schedule")
    g = p.add_argument_group("data")
    g.add_argument("--crop-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="random crop size")
    g.add_argument("--resize", choices=("ratio", "short_edge"), default=None,
                   help="'ratio': x ratio-range of --scale (LRFormer); 'short_edge': shortest edge drawn from "
                        "256..1024 (LRFormer+/FASeg)")
    g.add_argument("--scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="base scale of the ratio resize (default 2048 512 ADE20K, 2048 1024 Cityscapes)")
    g.add_argument("--ratio-range", type=float, nargs=2, default=None, help="random resize ratios of --scale")
    g.add_argument("--cat-max-ratio", type=float, default=None,
                   help="crop retried (10x) while one class covers more than this (1: no limit)")
    g.add_argument("--no-photometric", dest="photometric", action="store_false",
                   help="disable the photometric distortion")
    g.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=None,
                   help="label 0 -> ignore, k -> k-1 (default: on for ADE20K)")
    g.add_argument("--workers", type=int, default=4, help="data loader processes per rank")
    from .evaluate import add_inference_args
    add_inference_args(p)  # for the evaluations during training
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--seed", type=int, default=0, help="data order, augmentations, init, dropout")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower on GPU)")
    g.add_argument("--log-interval", type=int, default=50, help="iterations between log lines")
    g.add_argument("--save-interval", type=int, default=16000, help="iterations between checkpoints (and at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="iter_*.pth files kept (0: all)")
    g.add_argument("--eval-interval", type=int, default=16000,
                   help="evaluate on the validation split every N iterations and at the end (0: never)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    g.add_argument("--find-unused-parameters", action="store_true", help="DDP option")
    return p


def apply_recipe(args):
    """Fill every recipe-controlled option the command line left unset from the model family's preset."""
    recipe = recipe_for(args.model)
    args.family = recipe["family"]
    for key in ("batch_size", "lr", "weight_decay", "head_lr_mult", "backbone_lr_mult", "warmup_iters",
                "warmup_ratio", "poly_power", "min_lr", "clip_grad", "crop_size", "resize", "ratio_range",
                "cat_max_ratio"):
        if getattr(args, key, None) is None:
            setattr(args, key, recipe[key])
    for key in ("param_rule", "short_edges", "max_long", "pad_value"):
        setattr(args, key, recipe[key])
    if args.scale is None:
        args.scale = DATASET_DEFAULTS[args.dataset]["scale"]
    return args


def _groups(model: nn.Module, args) -> List[dict]:
    return param_groups(model, args.weight_decay, args.head_lr_mult, args.backbone_lr_mult, args.param_rule)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + rank * 7919 + 12345) % (2 ** 63)


def train(args) -> Dict[str, object]:
    """Run training as described by the parsed ``args``; returns a summary dict (final ``step``,
    ``checkpoint`` path, last logged ``loss``, last ``eval`` results, the trained ``model``)."""
    resolve_defaults(args)
    apply_recipe(args)
    if args.print_config:
        with torch.device("meta"):
            model = build_model(argparse.Namespace(**{**vars(args), "fused": False, "pretrained": None}))
        print(format_recipe(args, _groups(model, args)))
        return {"config": vars(args)}
    ds_defaults = DATASET_DEFAULTS[args.dataset]
    info: DistInfo = init_distributed(args.device)
    device = info.device
    if args.batch_size % info.world_size:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by the {info.world_size} processes")
    per_rank = args.batch_size // info.world_size
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    model = build_model(args)
    if info.distributed and device.type == "cuda":
        # SyncBatchNorm in the decoder (every child but the backbone: ``decode_head`` here, whatever a
        # future decoder names its parts). It needs a GPU; on CPU (gloo) the head keeps BatchNorm and
        # the buffers are broadcast from rank 0.
        for name, child in list(model.named_children()):
            if name != "backbone":
                setattr(model, name, convert_sync_batchnorm(child))
    model.to(device)
    optimizer = torch.optim.AdamW(_groups(model, args), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=args.weight_decay)
    amp_dtype = amp_dtype_from(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start = 0
    resume_path = find_resume(args.resume, args.work_dir, verbose=info.is_main)
    if resume_path:
        ckpt = torch.load(resume_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start = int(ckpt["step"])
        if info.is_main:
            print(f"resumed from {resume_path} at step {start}", file=sys.stderr)
    if info.is_main:
        os.makedirs(args.work_dir, exist_ok=True)
        with open(os.path.join(args.work_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1, default=str)

    net: nn.Module = LossWrapper(model)
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[info.local_rank] if device.type == "cuda" else None,
            find_unused_parameters=args.find_unused_parameters)

    reduce_zero = args.reduce_zero_label
    transform = TrainTransform(tuple(args.crop_size), tuple(args.scale), tuple(args.ratio_range), args.cat_max_ratio,
                               photometric=args.photometric, resize=args.resize, short_edges=args.short_edges,
                               max_long=args.max_long, pad_value=args.pad_value)
    dataset = SegDataset(args.data, ds_defaults["train_split"], args.dataset, transform, reduce_zero)
    end = args.iters if args.stop_after is None else min(args.iters, start + args.stop_after)
    sampler = StepBatchSampler(len(dataset), per_rank, end, start, info.rank, info.world_size, args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda",
                                         worker_init_fn=worker_init, persistent_workers=False)

    val_dataset = None
    if args.eval_interval > 0:
        try:
            val_dataset = SegDataset(args.data, ds_defaults["val_split"], args.dataset, None, reduce_zero)
        except Exception as e:  # a missing validation split only disables evaluation
            if info.is_main:
                print(f"evaluation disabled: {e}", file=sys.stderr)

    def checkpoint(step: int) -> str:
        path = os.path.join(args.work_dir, "latest.pth")
        broadcast_buffers(model)  # identical BatchNorm statistics on every rank (rank 0's are saved)
        if info.is_main:
            state = {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": {"step": step, "max_iters": args.iters, "warmup_iters": args.warmup_iters,
                                   "lr": args.lr, "power": args.poly_power},
                     "step": step, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "meta": {"model": args.model, "num_classes": args.num_classes,
                              "model_kwargs": args.model_kwargs, "dataset": args.dataset, "step": step,
                              "world_size": info.world_size, "batch_size": args.batch_size,
                              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": str(torch.__version__),
                              # plain JSON types only: the file loads with torch.load(weights_only=True)
                              "args": json.loads(json.dumps(vars(args), default=str))}}
            iter_path = os.path.join(args.work_dir, f"iter_{step}.pth")
            save_atomic(state, iter_path)
            _prune(args.work_dir, args.keep_checkpoints)
            save_atomic(state, path)
        barrier()
        return path

    from .evaluate import evaluate, inference_kwargs

    def run_eval(step: int):
        broadcast_buffers(model)
        res = evaluate(model, val_dataset, args.num_classes, info.rank, info.world_size,
                       progress=args.progress, workers=min(args.workers, 2),
                       **inference_kwargs(args, device, amp_dtype))
        if info.is_main:
            _log({"step": step, "mIoU": res["mIoU"], "aAcc": res["aAcc"], "mAcc": res["mAcc"]})
        return res

    log_path = os.path.join(args.work_dir, "log.jsonl")

    def _log(rec):
        line = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items())
        (bar.write if bar is not None else print)(line, file=sys.stderr)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    bar = None
    if info.is_main and args.progress:
        from tqdm import tqdm
        bar = tqdm(total=args.iters, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)

    # SIGINT (Ctrl-C) / SIGTERM (a scheduler's preemption): finish the step in progress, save a checkpoint
    # (rank 0, atomically, as every save) and stop; a second signal stops at once
    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name
        if info.is_main:
            print(f"{stop['signal']}: saving a checkpoint after this step (send it again to stop at once)",
                  file=sys.stderr)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def stop_requested() -> bool:
        if not info.distributed:
            return stop["signal"] is not None
        flag = torch.tensor([1.0 if stop["signal"] else 0.0], device=device)
        all_reduce_sum(flag)                       # every rank stops at the same step
        if flag.item() and stop["signal"] is None:
            stop["signal"] = "a signal on another rank"
        return bool(flag.item())

    try:
        net.train()
        step, last_ckpt, last_eval, last_loss = start, None, None, float("nan")
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_sum, t_log = 0, time.time()
        for batch in loader:
            lr = set_lr(optimizer, step, args)
            torch.manual_seed(_step_seed(args.seed, step, info.rank))  # dropout / drop path, resumable
            images = batch["img"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = net(images, labels)
            scaler.scale(loss).backward()
            if args.clip_grad:                          # global L2 norm over the whole model
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_sum += loss.detach().double()
            n_sum += 1
            if bar is not None:
                bar.update(1)
            if step % args.log_interval == 0 or step == end:
                stats = torch.stack([loss_sum, torch.tensor(float(n_sum), dtype=torch.float64, device=device)])
                all_reduce_sum(stats)
                last_loss = (stats[0] / stats[1]).item()
                if not math.isfinite(last_loss):  # the same all-reduced value on every rank: all stop together
                    raise FloatingPointError(f"non-finite loss ({last_loss}) in steps {step - n_sum + 1}..{step}; "
                                             f"last batch: {batch['path']}")
                dt = time.time() - t_log
                if info.is_main:
                    _log({"step": step, "loss": last_loss, "lr": lr,
                          "imgs_per_s": n_sum * args.batch_size / max(dt, 1e-9),
                          "mem_gb": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0})
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                loss_sum.zero_()
                n_sum, t_log = 0, time.time()
            if stop_requested():
                last_ckpt = checkpoint(step)
                if bar is not None:
                    bar.close()
                cleanup()
                raise TrainingInterrupted(stop["signal"], step, last_ckpt)
            if step % args.save_interval == 0 or step == end:
                last_ckpt = checkpoint(step)
            if val_dataset is not None and (step % args.eval_interval == 0 or step == args.iters):
                last_eval = run_eval(step)
        if bar is not None:
            bar.close()
        if step == start and info.is_main:
            print(f"nothing to do: already at step {step} of {args.iters}", file=sys.stderr)
        cleanup()
        return {"step": step, "checkpoint": last_ckpt, "loss": last_loss, "eval": last_eval,
                "rank": info.rank, "world_size": info.world_size, "model": model}
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    return train(build_parser().parse_args(argv))


def cli():
    """Console-script entry point (``lrformer-train``): one-line errors (``--debug`` for the traceback)."""
    sys.exit(run_cli(main, "lrformer-train"))


if __name__ == "__main__":
    cli()
