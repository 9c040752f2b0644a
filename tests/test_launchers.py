"""Structural checks of the op files: every kernel launch runs under the CUDA device guard (a tensor on
cuda:1 while cuda:0 is current must launch on cuda:1), and every op file has the same sections in the
same order."""
import ast
import importlib
import inspect

import pytest

OPS = ("pyramid_pool", "lowres_attention", "upsample_residual", "dwconv", "hrca", "ms_deform_attn")
SECTIONS = ["Kernels", "Config", "Launch", "Reference", "Registration", "Public function"]


def _launches_outside_guard(tree):
    bad = []

    def visit(node, guarded):
        if isinstance(node, ast.With):
            guarded = guarded or any(isinstance(i.context_expr, ast.Call) and getattr(i.context_expr.func, "id", "")
                                     == "device_guard" for i in node.items)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                and getattr(node.func.value, "id", "").endswith("kernel") and not guarded):
            bad.append((node.func.value.id, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)
    visit(tree, False)
    return bad


@pytest.mark.parametrize("op", OPS)
def test_every_launch_is_under_the_device_guard(op):
    mod = importlib.import_module(f"lrformer_kernels.{op}")
    tree = ast.parse(inspect.getsource(mod))
    launches = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
                and getattr(n.func.value, "id", "").endswith("kernel")]
    assert launches, "no kernel launch found"
    assert _launches_outside_guard(tree) == []


@pytest.mark.parametrize("op", OPS)
def test_op_files_share_one_template(op):
    src = inspect.getsource(importlib.import_module(f"lrformer_kernels.{op}"))
    heads = [line[2:].strip() for line in src.splitlines() if line.startswith("# ") and not line.startswith("# -")
             and line[2:].strip() in SECTIONS]
    assert heads == SECTIONS
    for name in ("_forward_config", "_backward_config", "_forward_triton", "_backward_triton",
                 "_forward_reference", "_backward_reference", "_setup_context", "_backward", f"{op}_reference"
                 if op not in ("hrca", "dwconv") else {"hrca": "hrca_attention_reference", "dwconv": "dwconv3x3_reference"}[op]):
        assert f"def {name}(" in src, name
