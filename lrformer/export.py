"""ONNX export of the inference models (all three families) at a fixed image size.

``export_onnx(model, path, image_size=(H, W))`` writes a graph from a normalised image batch
``(B, 3, H, W)`` to the semantic scores at the image size ``(B, K, H, W)`` (``model.predict(images,
return_labels=False)``: the LRHead logits upsampled; for the query decoders the released semantic
inference, padding to a multiple of 32 and cropping back included), so a serving stack needs only an
argmax.  The size is fixed (TensorRT-friendly static shapes); any size works, multiples of 32 or not.

A fused model exports through the reference math: the Triton custom ops are not ONNX operators, so
the export runs with the model unfused and restores it afterwards.  It uses PyTorch's ``torch.export``
based exporter (``torch.onnx.export(..., dynamo=True)``), which needs the optional extra ``[export]``
(``onnx``, ``onnxscript``; ``onnxruntime`` for :func:`check_onnx`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import warnings
from typing import Sequence, Tuple, Union

import torch
import torch.nn as nn

import lrformer_kernels

__all__ = ["export_onnx", "check_onnx", "DEFAULT_OPSET"]

#: the ONNX opset written by default (GridSample for the deformable attention needs >= 16)
DEFAULT_OPSET = 18


def _require(*modules: str, what: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{what} needs {', '.join(missing)}: pip install 'lrformer-kernels[export]' "
                          f"(onnx, onnxscript, onnxruntime)")


class _Scores(nn.Module):
    """The deployed graph: normalised images -> semantic scores at the image size."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.predict(images, return_labels=False)


@contextlib.contextmanager
def _reference_math(model: nn.Module):
    """The model unfused (reference math) inside, as it was after."""
    fused = bool(getattr(model, "fuse_report", None)) or any(
        isinstance(m, lrformer_kernels.Fusable) and m.fused for m in model.modules())
    if fused:
        lrformer_kernels.unfuse(model)
    try:
        yield fused
    finally:
        if fused:
            lrformer_kernels.fuse(model)


def _check_size(image_size) -> Tuple[int, int]:
    if (not isinstance(image_size, Sequence) or len(image_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 32 for s in image_size)):
        raise ValueError(f"image_size must be (H, W), two ints >= 32, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def export_onnx(model: nn.Module, path: Union[str, os.PathLike], image_size=(512, 512), opset: int = DEFAULT_OPSET,
                batch: int = 1, verbose: bool = False) -> str:
    """Write ``model``'s inference graph (normalised images ``(batch, 3, H, W)`` float32 -> semantic scores
    ``(batch, K, H, W)``) to ``path`` as ONNX with opset ``opset``; returns the path.

    ``model``: any :func:`lrformer.create_model` segmentor (LRHead, LRFormer+ or FASeg), fused or not (a
    fused model is exported through the reference math and left fused).  The model is put in eval mode
    for the export and its mode restored after.
    """
    _require("onnx", "onnxscript", what="lrformer.export_onnx")
    if not hasattr(model, "predict"):
        raise TypeError(f"export_onnx takes a segmentor from lrformer.create_model, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 16:
        raise ValueError(f"opset must be an int >= 16 (GridSample), got {opset!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    H, W = _check_size(image_size)
    param = next(model.parameters())
    images = torch.randn(batch, 3, H, W, device=param.device, dtype=torch.float32)
    path = os.fspath(path)
    was_training = model.training
    model.eval()
    try:
        with _reference_math(model) as unfused, torch.no_grad(), warnings.catch_warnings():
            if unfused and verbose:
                print("lrformer.export_onnx: the fused model is exported through the reference math "
                      "(its Triton ops are not ONNX operators)")
            warnings.simplefilter("ignore")
            with contextlib.ExitStack() as quiet:
                if not verbose:                     # the exporter's progress lines and optimiser notes
                    quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
                    for name in ("torch.onnx", "onnxscript", "torch._export", "torch.export"):
                        logger = logging.getLogger(name)
                        quiet.callback(logger.setLevel, logger.level)
                        logger.setLevel(logging.ERROR)
                torch.onnx.export(_Scores(model), (images,), path, input_names=["images"], output_names=["scores"],
                                  opset_version=opset, dynamo=True, external_data=False, verbose=verbose)
    finally:
        model.train(was_training)
    return path


def check_onnx(model: nn.Module, path: Union[str, os.PathLike], images: torch.Tensor = None) -> float:
    """Run the exported graph in onnxruntime on ``images`` (a random normalised batch of the graph's input
    shape by default) and return the largest absolute difference from ``model.predict``, relative to the
    largest score of the PyTorch result."""
    _require("onnxruntime", what="lrformer.check_onnx")
    import onnxruntime as ort
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if images is None:
        images = torch.randn(*inp.shape, dtype=torch.float32)
    got = torch.from_numpy(sess.run(None, {inp.name: images.detach().cpu().float().numpy()})[0])
    with _reference_math(model):
        ref = model.predict(images.to(next(model.parameters()).device), return_labels=False).float().cpu()
    if got.shape != ref.shape:
        raise ValueError(f"onnx output {tuple(got.shape)} does not match the model's {tuple(ref.shape)}")
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
