"""Ahead-of-time compilation of Triton kernels for a GPU target without a GPU, and the resources of the
cubin Triton builds (registers, local memory = spills, shared memory): ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`` then the wheel's ``cuobjdump --dump-resource-usage`` on its cubin
(what the driver would load; a separate ``ptxas -v`` run on the PTX uses other options and reports
spills the real build does not have).

The tests run the kernels under ``TRITON_INTERPRET=1``, where ``@triton.jit`` functions are not
compilable, so :func:`compile_reports` runs this file in a subprocess without the interpreter:
``python gpu_compile.py < specs.json`` -> one JSON report per spec.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

#: shared memory per block (bytes) a kernel may use: the opt-in maximum of each architecture
SHARED_LIMIT = {90: 232448, 80: 166912}


def ptxas_path() -> str:
    import importlib.util
    spec = importlib.util.find_spec("triton")
    return os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "ptxas")


def compile_reports(specs):
    """specs: dicts ``{"module", "kernel", "signature": {arg: type}, "constexprs": {arg: value}
    ("ACC": "fp32"/"fp64" for the accumulation dtype), "cc", "num_warps", "num_stages"}`` -> the same
    dicts with ``registers``, ``spill_stores``, ``spill_loads``, ``shared``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(specs), capture_output=True,
                       text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"AOT compile failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _one(spec):
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    consts = {k: (tl.dtype(v["tl"]) if isinstance(v, dict) else v) for k, v in spec["constexprs"].items()}
    if consts.get("ACC") in ("fp32", "fp64"):
        consts["ACC"] = {"fp32": tl.float32, "fp64": tl.float64}[consts["ACC"]]
    sig = {name: ("constexpr" if name in consts else spec["signature"][name]) for name in fn.arg_names}
    cc = int(spec["cc"])
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": spec["num_warps"], "num_stages": spec.get("num_stages", 1),
                                **({"maxnreg": spec["maxnreg"]} if spec.get("maxnreg") else {})})
    # the cubin Triton built with its own ptxas invocation: its resource usage (cuobjdump, in the wheel)
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        r = subprocess.run([os.path.join(os.path.dirname(ptxas_path()), "cuobjdump"), "--dump-resource-usage",
                            cubin], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"cuobjdump failed for {spec['kernel']} sm_{cc}: {r.stderr[-2000:]}")
    use = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", r.stdout))
    # a spill shows as a stack frame (STACK) or local memory (LOCAL): these kernels have no local arrays
    spill = int(use["STACK"]) + int(use["LOCAL"])
    return dict(spec, registers=int(use["REG"]), local=int(use["LOCAL"]), stack=int(use["STACK"]),
                spill_stores=spill, spill_loads=spill,
                shared=max(int(k.metadata.shared), int(use["SHARED"])))


if __name__ == "__main__":
    print(json.dumps([_one(s) for s in json.load(sys.stdin)]))
