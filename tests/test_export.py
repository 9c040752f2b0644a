"""ONNX export of the three families (lrformer.export_onnx, lrformer-export): the exported graph run in
onnxruntime equals the PyTorch model within 1e-4 relative, at sizes that are not multiples of 32, fused
models exported through the reference math.  Needs the [export] extra (onnx, onnxscript, onnxruntime)."""
import importlib.util

import pytest
import torch

import lrformer
import lrformer_kernels as K

MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
needs_export = pytest.mark.skipif(bool(MISSING), reason=f"the [export] extra is not installed (missing "
                                                         f"{', '.join(MISSING)}): pip install -e '.[export]'")
ENC = dict(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1))
DEC = dict(hidden_dim=32, num_queries=6, enc_layers=1)


def tiny(family):
    if family == "lrhead":
        return lrformer.create_model("lrformer_t", num_classes=5, head_channels=32, **ENC)
    return lrformer.create_model(f"lrformer_t_{family}", num_classes=5, dec_layers=4 if family == "faseg" else 2,
                                 **ENC, **DEC)


@needs_export
@pytest.mark.parametrize("family,size", [("plus", (72, 104)), ("faseg", (100, 150))])
def test_export_round_trip(tmp_path, family, size):
    torch.manual_seed(0)
    model = K.fuse(tiny(family)).train()
    report = dict(model.fuse_report)
    path = lrformer.export_onnx(model, tmp_path / f"{family}.onnx", image_size=size)
    assert model.training and model.fuse_report == report              # mode and fusion restored
    x = torch.randn(1, 3, *size)
    err = lrformer.check_onnx(model, path, x)
    assert err < 1e-4, err
    import onnx
    graph = onnx.load(path)
    assert not [n.op_type for n in graph.graph.node if n.domain.startswith("lrformer")]   # no custom ops
    assert [d.dim_value for d in graph.graph.output[0].type.tensor_type.shape.dim] == [1, 5, *size]


@needs_export
def test_export_cli_lrhead(tmp_path, capsys):
    """lrformer-export on a trained-checkpoint file of an LRHead model at 100x150: writes the graph, runs it
    in onnxruntime and prints the largest difference, which is within 1e-4."""
    from lrformer.engine import export as cli
    torch.manual_seed(0)
    ckpt = tmp_path / "t.pth"
    torch.save({"state_dict": tiny("lrhead").state_dict(),
                "meta": {"model": "lrformer_t", "num_classes": 5, "model_kwargs": dict(ENC, head_channels=32)}}, ckpt)
    res = cli.main(["--checkpoint", str(ckpt), "--size", "100", "150", "--out", str(tmp_path / "t.onnx")])
    assert res["max_rel_diff"] < 1e-4
    out = capsys.readouterr().out
    assert "largest difference" in out and "t.onnx" in out


def test_export_errors(tmp_path, monkeypatch):
    model = tiny("lrhead")
    if not MISSING:
        with pytest.raises(ValueError, match="image_size must be"):
            lrformer.export_onnx(model, tmp_path / "m.onnx", image_size=(16, 64))
        with pytest.raises(ValueError, match="opset must be"):
            lrformer.export_onnx(model, tmp_path / "m.onnx", image_size=(64, 64), opset=11)
        with pytest.raises(TypeError, match="segmentor"):
            lrformer.export_onnx(model.backbone, tmp_path / "m.onnx", image_size=(64, 64))
    import lrformer.export as E
    monkeypatch.setattr(E.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install 'lrformer-kernels\[export\]'"):
        lrformer.export_onnx(model, tmp_path / "m.onnx", image_size=(64, 64))
