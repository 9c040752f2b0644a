"""Record the kernel launches the ops' dispatch makes, without running them: every ``@triton.jit`` kernel of
the op modules is replaced by a recorder, and the launchers are called on ``meta`` tensors with the shapes
the models produce, the GPU tile configurations selected (``INTERPRETER_BIG_TILES = False``) and an H100's
SM count.  Each launch becomes a compile spec for :mod:`gpu_compile` (kernel, argument types, constexprs,
warps, stages, maxnreg)."""
import importlib
import inspect

import torch

OP_MODULES = ("lrformer_kernels.pyramid_pool", "lrformer_kernels.lowres_attention", "lrformer_kernels.upsample_residual",
              "lrformer_kernels.dwconv", "lrformer_kernels.hrca", "lrformer_kernels.ms_deform_attn",
              "lrformer_kernels.upsampled_cross_entropy", "lrformer_kernels.irb")
PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64",
       torch.int32: "*i32", torch.int64: "*i64"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def _is_kernel(obj) -> bool:
    return type(obj).__name__ in ("JITFunction", "InterpretedFunction") and hasattr(obj, "fn")


class _Fake:
    def __init__(self, rec, module, name, kernel):
        self.rec, self.module, self.name = rec, module, name
        params = inspect.signature(kernel.fn).parameters
        self.names = list(params)
        self.constexpr = {n for n, p in params.items() if "constexpr" in str(p.annotation)}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            sig, consts = {}, {}
            for n, a in zip(self.names, args):
                if isinstance(a, torch.Tensor):
                    sig[n] = PTR[a.dtype]
                elif isinstance(a, bool):
                    sig[n] = "i1"
                elif isinstance(a, int):
                    sig[n] = "i64" if abs(a) >= 2 ** 31 else "i32"
                elif isinstance(a, float):
                    sig[n] = "fp32"
                else:
                    raise TypeError(f"{self.name}: argument {n} of type {type(a).__name__}")
            for n, v in kwargs.items():
                if n in LAUNCH_OPTIONS:
                    continue
                consts[n] = {"tl": v.name} if hasattr(v, "primitive_bitwidth") else v
            spec = dict(module=self.module, kernel=self.name, signature=sig, constexprs=consts,
                        num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 1),
                        maxnreg=kwargs.get("maxnreg"))
            self.rec.add(spec)
        return launch


class Recorder:
    """``with Recorder(monkeypatch) as rec:`` then call launchers; ``rec.specs`` holds the distinct launches."""

    def __init__(self, monkeypatch):
        self.mp, self.specs, self._seen = monkeypatch, [], set()

    def add(self, spec):
        import json
        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in self._seen:
            self._seen.add(key)
            self.specs.append(spec)

    def __enter__(self):
        import lrformer_kernels._common as common
        self.mp.setattr(common, "INTERPRETER_BIG_TILES", False)
        self.mp.setattr(common, "DEFAULT_SMS", 132)
        for modname in OP_MODULES:
            mod = importlib.import_module(modname)
            for name, obj in list(vars(mod).items()):
                if _is_kernel(obj) and name.endswith("kernel"):
                    self.mp.setattr(mod, name, _Fake(self, modname, name, obj))
        return self

    def __exit__(self, *exc):
        return False
