"""Weights from the Hugging Face Hub (``hf://``, offline against a local Hub cache built here) and
``.safetensors`` files (``lrformer.save_weights``, loading); the one-line errors without the extra."""
import json
import os
import subprocess
import sys

import pytest
import torch

import lrformer
from lrformer.checkpoint import parse_hf

KW = dict(embed_dims=(16, 32, 40, 48), depths=(1, 1, 1, 1), head_channels=16)
hub = pytest.importorskip("huggingface_hub", reason="the [hub] extra (huggingface_hub) is not installed")
pytest.importorskip("safetensors", reason="the [hub] extra (safetensors) is not installed")


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_parse_hf():
    assert parse_hf("hf://yuhuan-wu/LRFormer-Models/ade20k/lrformer_t.pth") == \
        ("yuhuan-wu/LRFormer-Models", "ade20k/lrformer_t.pth", None)
    assert parse_hf("hf://o/r@v1.0/w.safetensors") == ("o/r", "w.safetensors", "v1.0")
    for bad in ("hf://o/w.pth", "hf://o//w.pth", "hf://"):
        with pytest.raises(ValueError, match="hf://<owner>/<repo>"):
            parse_hf(bad)


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_save_weights_and_load_both_formats(tmp_path, ext):
    src = lrformer.create_model("lrformer_t", num_classes=5, **KW)
    path = lrformer.save_weights(src, tmp_path / f"w{ext}")
    m = lrformer.create_model("lrformer_t", num_classes=5, pretrained=path, **KW)
    assert _same(m, src)
    m2 = lrformer.create_model("lrformer_t", num_classes=5, **KW)
    lrformer.load_checkpoint(m2, path)
    assert _same(m2, src)
    (tmp_path / f"bad{ext}").write_bytes(b"\x00garbage" * 8)
    with pytest.raises(lrformer.CheckpointError, match=f"bad{ext}: not a readable"):
        lrformer.load_checkpoint(m2, str(tmp_path / f"bad{ext}"))


def _fake_hub_cache(root, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567", refs=("main",)):
    """The Hub cache layout huggingface_hub reads offline: models--<owner>--<repo>/{refs,snapshots}."""
    base = root / ("models--" + repo_id.replace("/", "--"))
    for name, src in files.items():
        dst = base / "snapshots" / commit / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    (base / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (base / "refs" / ref).write_text(commit)
    return commit


def test_hf_urls_offline_from_the_hub_cache(tmp_path):
    """pretrained="hf://owner/repo/file" (and @revision) resolved by huggingface_hub offline (HF_HUB_OFFLINE=1)
    from a cache laid out as the Hub client writes it; .pth and .safetensors; a file the cache lacks is a
    one-line CheckpointError naming the URL.  In a subprocess, so the Hub client reads the environment."""
    a = lrformer.create_model("lrformer_t", num_classes=5, **KW)
    b = lrformer.create_model("lrformer_t", num_classes=5, **KW)
    pa, pb = lrformer.save_weights(a, tmp_path / "a.pth"), lrformer.save_weights(b, tmp_path / "b.safetensors")
    cache = tmp_path / "hub"
    c1 = _fake_hub_cache(cache, "someone/LRFormer-Models", {"ade20k/t.pth": tmp_path / "a.pth",
                                                            "ade20k/t.safetensors": tmp_path / "b.safetensors"})
    lrformer.save_weights(b, tmp_path / "b.pth")
    c2 = _fake_hub_cache(cache, "someone/LRFormer-Models", {"ade20k/t.pth": tmp_path / "b.pth"},
                         commit="f" * 40, refs=("v2",))
    script = f"""
import json, sys, torch, lrformer
kw = {KW!r}
out = {{}}
for url in sys.argv[1:]:
    try:
        m = lrformer.create_model("lrformer_t", num_classes=5, pretrained=url, **kw)
        out[url] = float(sum(v.double().sum() for v in m.state_dict().values() if v.is_floating_point()))
    except Exception as e:
        out[url] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""
    urls = ["hf://someone/LRFormer-Models/ade20k/t.pth", "hf://someone/LRFormer-Models/ade20k/t.safetensors",
            f"hf://someone/LRFormer-Models@{c1}/ade20k/t.pth", "hf://someone/LRFormer-Models@v2/ade20k/t.pth",
            "hf://someone/LRFormer-Models/ade20k/missing.pth"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hfhome"))
    r = subprocess.run([sys.executable, "-c", script, *urls], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])

    def total(m):
        return float(sum(v.double().sum() for v in m.state_dict().values() if v.is_floating_point()))
    assert got[urls[0]] == pytest.approx(total(a), rel=1e-12) and got[urls[2]] == got[urls[0]]
    assert got[urls[1]] == pytest.approx(total(b), rel=1e-12)
    assert got[urls[3]] == pytest.approx(total(b), rel=1e-12)          # the pinned revision's file
    assert got[urls[4]].startswith("CheckpointError: cannot fetch hf://someone/LRFormer-Models/ade20k/missing.pth")
    assert "\n" not in got[urls[4]]
    assert c2 and pa and pb


def test_one_line_errors_without_the_extra(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_hub(name, *a, **k):
        if name.split(".")[0] in ("huggingface_hub", "safetensors"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_hub)
    import importlib
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: no_hub(name))
    m = lrformer.create_model("lrformer_t", num_classes=5, **KW)
    with pytest.raises(ImportError, match=r"needs huggingface_hub, which is not installed: pip install 'lrformer-kernels\[hub\]'"):
        lrformer.load_checkpoint(m, "hf://o/r/w.pth")
    with pytest.raises(ImportError, match=r"needs safetensors, which is not installed"):
        lrformer.save_weights(m, tmp_path / "w.safetensors")
