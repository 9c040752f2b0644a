"""The benchmark sweeps: each section yields :class:`Case` objects that the runner executes.

Sections
--------
- ``flops``: FLOPs and params of every variant T/S/B/L vs image size (meta device).
- ``attention``: FLOPs of ONE attention layer at LRFormer-S stage widths: LRSA vs SegFormer's
  spatial-reduction attention vs global attention vs Swin window attention (counted and closed
  form); on CUDA also their forward latency (bf16 autocast, batch 1).
- ``ops``: each fused op (``lrformer_kernels``, one :data:`benchmarks.registry.OPS` entry each) vs its reference (``<op>_reference``) vs
  ``torch.compile(reference)`` at LRFormer-S stage shapes, forward and forward+backward, with
  achieved GB/s (bytes formulas in :func:`op_bytes`) against the measured copy bandwidth.  On
  CUDA also FASeg's HRCA (``hrca_attention``, windowed cross-attention of 100 queries over the
  stride-4 map = stage-1 resolution; shape in :data:`HRCA`), listed under stage 1.
- ``lrsa`` / ``block``: the reference LRSA (with its stage's depthwise convs) / Block vs the
  fused module (``lrformer_kernels.fuse``) vs ``torch.compile``.
- ``model``: T/S/B/L inference (batch 1) and a training step (forward, backward, AdamW step;
  bf16 autocast on CUDA) vs image size: eager vs fused vs torch.compile.
- ``traffic``: the traffic model (:mod:`.traffic`): bytes every op of the eager and of the fused
  path reads and writes, counted on the meta device (LRSA, Block, LRFormer-S encoder forward,
  training step; 512 and 1024, batch 8, bf16), and their ratio.  Device-independent; not a timing.

Implementations are named ``eager`` (the reference, eager PyTorch), ``compile``
(``torch.compile`` of the reference, ``dynamic=False``) and ``fused`` (the Triton path).  On a
CPU-only machine only ``eager`` is timed; ``fused`` and ``compile`` rows say ``needs GPU``.
"""
from __future__ import annotations

from typing import List

from .common import DTYPES, VARIANTS, Case, Config, default_config, fuse_copy, parse_size, size_str
from .counts import attention_flops_cases, attention_latency_cases, flops_cases
from .model import model_cases, release_models
from .modules import module_cases
from .ops import op_cases
from .traffic import traffic_cases

__all__ = ["DTYPES", "VARIANTS", "Case", "Config", "default_config", "fuse_copy", "parse_size", "size_str",
           "SECTIONS", "SHARES", "build_cases", "release_models", "op_cases", "module_cases", "model_cases",
           "flops_cases", "attention_flops_cases", "attention_latency_cases", "traffic_cases"]

SECTIONS = ("flops", "attention", "ops", "lrsa", "block", "model", "traffic")
#: share of the time budget per section (unused time rolls over to the later sections).
SHARES = {"flops": 0.07, "attention": 0.1, "ops": 0.25, "lrsa": 0.08, "block": 0.1, "model": 0.38, "traffic": 0.02}


def build_cases(cfg: Config, section: str) -> List[Case]:
    if section == "flops":
        return flops_cases(cfg)
    if section == "attention":
        return attention_flops_cases(cfg) + attention_latency_cases(cfg)
    if section == "ops":
        return op_cases(cfg)
    if section in ("lrsa", "block"):
        return module_cases(cfg, section)
    if section == "model":
        return model_cases(cfg)
    if section == "traffic":
        return traffic_cases(cfg)
    raise ValueError(f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")
