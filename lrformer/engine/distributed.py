"""Process-group helpers for ``torchrun`` (single- or multi-node).

No process management here: ``torchrun`` (``python -m torch.distributed.run``) starts the processes
and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; we only read them.
Backend: nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (no-op for a plain ``python`` run).

    ``device``: 'auto' (cuda:LOCAL_RANK when CUDA is present, else cpu), 'cuda' or 'cpu'.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_buffers(module: torch.nn.Module, src: int = 0):
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank, so that all replicas
    hold identical state (DDP only broadcasts them at the start of each forward)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b.data, src)


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` (same parameters, buffers and state-dict keys); the
    blocks' tokens-last BatchNorm path recognises any ``_BatchNorm`` (``lrformer.models.layers.is_batch_norm``)."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
