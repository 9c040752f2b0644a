"""The traffic model's ``torch.compile`` columns: the bytes inductor's CUDA backend would move, counted
without a GPU (a model, not a timing; the same numbers on any machine).

How (:class:`InductorCount`): the case runs on CPU fake tensors (``FakeTensorMode``: shapes, no data)
through ``torch.compile`` as a user gets it (dynamo, AOT autograd's forward/backward partition and its
recomputation choices, inductor's decompositions; default mode, no max-autotune).  Each graph inductor
receives is moved to a modelled CUDA device (sm_90, 132 SMs: fake tensors, no driver) and lowered and
scheduled by inductor's CUDA (Triton) backend: its fusions, its layout choices (the copies it makes for
extern convolutions), the extern calls it leaves to cuBLAS/cuDNN/ATen.  The count is inductor's own
(``GraphLowering.count_bytes``: every scheduler node, a generated kernel or an extern call, reads its
inputs and writes its outputs once, the traffic model's rule), taken once the graph is scheduled; nothing
is code-generated, compiled or run (the graph returns fake outputs of the right metadata, so the
backward is traced too).  A fused op (``lrformer::*``) stays an opaque extern call of the compiled graph
and adds its stated extra (``extra_rules``: the traffic model's ``FUSED_EXTRA``), as in the fused column.

Departures from a run on a GPU, all small: random ops stay ATen calls (``fallback_random``: the graphs are
decomposed on the CPU, where inductor keeps them as calls; here a (B,) drop-path mask); the joint-graph
patterns are registered for the CPU device (they match by graph structure); code left outside the
compiled graphs (the optimizer step) is counted by the eager rule.
"""
from __future__ import annotations

import contextlib
import types
from typing import Callable, List

import torch
from torch.utils._pytree import tree_map

#: the modelled device's SM count (an H100 SXM), also the fused ops' launch grids in the traffic model
MODEL_SMS = 132
_PROPS = types.SimpleNamespace(
    name=f"modelled CUDA device (sm_90, {MODEL_SMS} SMs)", major=9, minor=0, multi_processor_count=MODEL_SMS,
    total_memory=80 << 30, regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
    max_threads_per_block=1024, warp_size=32, shared_memory_per_block_optin=232448, L2_cache_size=50 << 20,
    gcnArchName="")
CUDA = torch.device("cuda", 0)


@contextlib.contextmanager
def _patched(patches):
    """Set ``(owner, name, value)`` attributes for the duration, restoring them afterwards."""
    old = [(o, n, o.__dict__.get(n, getattr(o, n))) for o, n, _ in patches]
    try:
        for o, n, v in patches:
            setattr(o, n, v)
        yield
    finally:
        for o, n, v in reversed(old):
            setattr(o, n, v)


def _fake_like(t: torch.Tensor, device) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)


def _meta(val):
    return tree_map(lambda t: _fake_like(t, "meta") if isinstance(t, torch.Tensor) else t, val)


class InductorCount:
    """Counts what ``torch.compile`` moves on the functions it wraps (``count(fn)``), inside :meth:`device`;
    ``bytes`` is the total (a case adds what it runs outside the compiled functions)."""

    def __init__(self, extra_rules):
        self.extra_rules = extra_rules        # op name -> (args, outputs) -> bytes: the fused ops' extras
        self.bytes = 0
        self.graphs = 0
        self.kernels: List[tuple] = []        # (scheduler node kind, bytes) of every node

    # -- the compile step: inductor up to its scheduler ------------------------------------------------
    def _lower(self, gm, example_inputs, **kwargs):
        from torch._guards import detect_fake_mode
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch._inductor.compile_fx import compile_fx_inner
        out = next(n for n in gm.graph.nodes if n.op == "output")
        results = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in out.args[0]]
        mode = detect_fake_mode(example_inputs)
        with unset_fake_temporarily():      # the fused ops' stated extras, on plain meta copies of their values
            for n in gm.graph.nodes:
                if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) \
                        and n.target.namespace == "lrformer":
                    args = tree_map(lambda a: _meta(a.meta["val"]) if isinstance(a, torch.fx.Node) else a, n.args)
                    self.bytes += self.extra_rules[n.target.name()](args, _meta(n.meta["val"]))
        # the graph moved to the modelled CUDA device: device arguments, and every value's metadata with its
        # traced strides kept (the views in the graph were traced against them)
        cuda = lambda t: _fake_like(t, CUDA) if isinstance(t, torch.Tensor) else t  # noqa: E731
        with mode:
            for n in gm.graph.nodes:
                n.args = tree_map(lambda a: CUDA if isinstance(a, torch.device) else a, n.args)
                n.kwargs = tree_map(lambda a: CUDA if isinstance(a, torch.device) else a, n.kwargs)
                if "val" in n.meta:
                    n.meta["val"] = tree_map(cuda, n.meta["val"])
            inputs = [cuda(t) for t in example_inputs]
        gm.recompile()
        compile_fx_inner(gm, inputs, **kwargs)

        def run(args):                       # outputs of the right metadata on the traced (CPU) device
            with (detect_fake_mode(args) or mode):
                return [_fake_like(v, v.device) if isinstance(v, torch.Tensor) else v for v in results]
        run._boxed_call = True
        return run

    def _scheduled(self, graph):
        """Replaces ``GraphLowering.compile_to_module``: schedule (fuse), count, generate nothing."""
        graph._update_scheduler()
        if graph.device_types - {"cuda"}:
            raise RuntimeError(f"inductor scheduled kernels for {sorted(graph.device_types)}, not the modelled CUDA")
        nbytes, per_node, _ = graph.count_bytes()
        self.bytes += nbytes
        self.graphs += 1
        self.kernels += [(type(n).__name__, 4 * b) for n, b in per_node]
        return types.SimpleNamespace(call=lambda args: None)     # never called: _lower returns its own

    def _backend(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs, inner_compile=self._lower)

    def count(self, fn: Callable) -> Callable:
        return torch.compile(fn, backend=self._backend, dynamic=False)

    # -- the environment: a modelled CUDA device, scoped ------------------------------------------------
    @contextlib.contextmanager
    def device(self):
        import torch._inductor.config as config
        from torch._dynamo import device_interface as di
        from torch._inductor.fx_passes import joint_graph
        from torch._inductor.graph import GraphLowering
        C = di.CudaInterface
        const = lambda v: staticmethod(lambda *a, **k: v)  # noqa: E731
        lazy_init = joint_graph.lazy_init
        patches = [(C, "get_device_properties", const(_PROPS)), (C.Worker, "get_device_properties", const(_PROPS)),
                   (C, "get_compute_capability", const(90)), (C, "current_device", const(0)),
                   (C.Worker, "current_device", const(0)), (C, "device_count", const(1)),
                   (C, "is_available", const(True)), (C, "is_bf16_supported", const(True)),
                   (C, "is_triton_capable", const(True)), (C, "raise_if_triton_unavailable", const(None)),
                   (torch.cuda, "get_device_properties", lambda *a, **k: _PROPS),
                   (torch.cuda, "get_device_capability", lambda *a, **k: (9, 0)),
                   (torch.cuda, "current_device", lambda: 0), (torch.cuda, "device_count", lambda: 1),
                   (torch.cuda, "is_bf16_supported", lambda *a, **k: True),
                   (joint_graph, "lazy_init", lambda input_device=None: lazy_init(torch.device("cpu"))),
                   (GraphLowering, "compile_to_module", lambda graph: self._scheduled(graph))]
        # inductor asks has_triton() before scheduling for a GPU: the modelled device has it (the package itself
        # is not needed: nothing is compiled), whatever an earlier caller's environment made it answer
        import torch._inductor.compile_fx as compile_fx
        import torch._inductor.scheduler as scheduler
        import torch.utils._triton as utils_triton
        patches += [(m, "has_triton", lambda: True) for m in (utils_triton, scheduler, compile_fx)
                    if hasattr(m, "has_triton")]
        torch._dynamo.reset()
        try:
            with _patched(patches), config.patch(fx_graph_cache=False, fallback_random=True, compile_threads=1):
                yield
        finally:
            torch._dynamo.reset()
