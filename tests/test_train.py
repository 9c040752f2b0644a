"""Training on the synthetic dataset: param groups, schedule, learning, resume, DDP (2 gloo
processes), evaluation and prediction CLIs."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import lrformer
from lrformer.engine import cli as lr_cli
from lrformer.engine import recipes as lr_recipes
from lrformer.engine import evaluate as lr_evaluate
from lrformer.engine import predict as lr_predict
from lrformer.engine import train as lr_train
from lrformer.engine.data import SegDataset, palette_for
from lrformer.engine.evaluate import confusion_matrix, metrics_from_confusion
from synthetic import make_ade20k

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"embed_dims": [16, 32, 48, 64], "depths": [1, 1, 1, 1], "head_channels": 32, "num_heads": [1, 2, 3, 4],
        "num_heads_head": 2}


def tiny_args(data, work_dir, iters, *extra, kwargs=None):
    return ["--data", data, "--work-dir", work_dir, "--num-classes", "4", "--model-kwargs",
            json.dumps(kwargs or TINY), "--iters", str(iters), "--scale", "64", "64", "--crop-size", "48", "48",
            "--test-scale", "0", "0", "--workers", "0", "--no-progress", "--device", "cpu", *extra]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and a busy machine makes OpenMP's
    spinning threads very slow."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_ade20k(str(tmp_path_factory.mktemp("syn") / "ade"), n_train=24, n_val=6, size=(64, 64), seed=0)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """60 steps at batch 4 (lr 2e-3, short warmup, milder augmentation): the trained run shared by the
    tests below (held-out mIoU 0.70-0.78 over training seeds 1-4)."""
    wd = str(tmp_path_factory.mktemp("run"))
    res = lr_train.main(tiny_args(data, wd, 60, "--batch-size", "4", "--lr", "2e-3", "--warmup-iters", "5",
                                  "--no-photometric", "--ratio-range", "0.75", "1.5",
                                  "--log-interval", "20", "--save-interval", "30", "--eval-interval", "60",
                                  "--seed", "0"))
    return wd, res


def test_param_groups_rule():
    model = lrformer.create_model("lrformer_t", num_classes=4, **{k: tuple(v) if isinstance(v, list) else v
                                                                  for k, v in TINY.items()})
    groups = lr_recipes.param_groups(model, weight_decay=0.01, head_lr_mult=10)
    by_id = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_id) == len(names) == sum(len(g["params"]) for g in groups)   # each parameter once
    for n, p in names.items():
        g = by_id[id(p)]
        assert g["lr_mult"] == (1.0 if n.startswith("backbone.") else 10.0), n
        is_norm = any(s in n for s in ("norm", ".bn.", "conv1.1.", "conv1.4.", "conv1.7.")) or "layer_scale" in n
        assert (g["weight_decay"] == 0.0) == is_norm, n
    assert {g["name"] for g in groups} == {"backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"}


def test_sync_batchnorm_conversion_keeps_model_math():
    """The head's BatchNorms become standard SyncBatchNorm (same keys), which the blocks' tokens-last
    BatchNorm path recognises: without a process group it computes exactly what the plain model does,
    forward and backward."""
    from lrformer.engine.distributed import convert_sync_batchnorm
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()}
    torch.manual_seed(0)
    kw["drop_path_rate"] = 0.0
    ref = lrformer.create_model("lrformer_t", num_classes=4, dropout=0.0, **kw)
    model = lrformer.create_model("lrformer_t", num_classes=4, dropout=0.0, **kw)
    model.load_state_dict(ref.state_dict())
    model.decode_head = convert_sync_batchnorm(model.decode_head)
    bns = [m for m in model.decode_head.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert len(bns) == 6 and all(type(m) is torch.nn.SyncBatchNorm for m in bns)
    assert model.state_dict().keys() == ref.state_dict().keys()
    x, y = torch.randn(2, 3, 48, 40), torch.randint(0, 4, (2, 48, 40))
    la, lb = ref.loss(x, y), model.loss(x, y)
    la.backward()
    lb.backward()
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        assert (b.grad - a.grad).norm() <= 1e-4 * a.grad.norm() + 1e-6, n   # float32 rounding only


def test_lr_schedule_warmup_poly():
    f = lambda s: lr_train.lr_at(s, 6e-5, 160000, 1500, 1e-6, 1.0, 0.0)  # noqa: E731
    assert f(0) == pytest.approx(6e-5 * 1e-6)
    assert f(750) == pytest.approx(6e-5 * (1 - 750 / 160000) * (1 - 0.5 * (1 - 1e-6)))
    assert f(1500) == pytest.approx(6e-5 * (1 - 1500 / 160000))
    assert f(80000) == pytest.approx(3e-5)
    assert f(160000) == 0.0
    vals = [f(s) for s in range(1500, 160001, 1000)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_learns_synthetic_task(trained, data):
    """mIoU on the held-out split far above chance (constant or uniform-random predictions)."""
    wd, res = trained
    assert res["step"] == 60 and np.isfinite(res["loss"])
    val = SegDataset(data, "val", "ade20k")
    labels = torch.stack([torch.as_tensor(val.load(i)[1]) for i in range(len(val))])
    g = torch.Generator().manual_seed(0)
    chance = max(max(metrics_from_confusion(confusion_matrix(torch.full_like(labels, k), labels, 4))["mIoU"]
                     for k in range(4)),
                 metrics_from_confusion(confusion_matrix(torch.randint(0, 4, labels.shape, generator=g),
                                                         labels, 4))["mIoU"])
    out = os.path.join(wd, "eval.json")
    ev = lr_evaluate.main(["--data", data, "--checkpoint", os.path.join(wd, "latest.pth"), "--test-scale", "0", "0",
                           "--workers", "0", "--device", "cpu", "--out", out])
    print(f"mIoU {ev['mIoU']:.3f}, chance {chance:.3f}")
    assert ev["mIoU"] > max(2 * chance, 0.5), (ev["mIoU"], chance)
    assert ev["mIoU"] == pytest.approx(res["eval"]["mIoU"])       # the in-training evaluation agrees
    assert json.load(open(out))["num_images"] == 6
    # the log has the loss and the throughput, and the loss went down
    log = [json.loads(line) for line in open(os.path.join(wd, "log.jsonl"))]
    losses = [r["loss"] for r in log if "loss" in r]
    assert [r["step"] for r in log if "loss" in r] == [20, 40, 60] and losses[-1] < losses[0]
    assert all(r["imgs_per_s"] > 0 for r in log if "loss" in r)


def test_checkpoint_format_and_files(trained):
    wd, _ = trained
    assert sorted(f for f in os.listdir(wd) if f.endswith(".pth")) == ["iter_30.pth", "iter_60.pth", "latest.pth"]
    assert not [f for f in os.listdir(wd) if f.endswith(".tmp")]
    ckpt = torch.load(os.path.join(wd, "latest.pth"), map_location="cpu", weights_only=False)
    assert ckpt["step"] == 60 and ckpt["scheduler"]["step"] == 60 and "optimizer" in ckpt
    assert ckpt["meta"]["num_classes"] == 4 and ckpt["meta"]["model"] == "lrformer_t"
    assert all(k.startswith(("backbone.", "decode_head.")) for k in ckpt["state_dict"])
    model = lrformer.create_model("lrformer_t", num_classes=4, **{k: tuple(v) if isinstance(v, list) else v
                                                                  for k, v in TINY.items()})
    lrformer.load_checkpoint(model, os.path.join(wd, "latest.pth"))     # strict, released key names
    assert torch.equal(model.decode_head.conv_seg.weight, ckpt["state_dict"]["decode_head.conv_seg.weight"])


def test_predict_writes_palette_pngs(trained, data, tmp_path):
    wd, _ = trained
    imgs = [os.path.join(data, "images", "validation", f"validation_000{i}.png") for i in range(2)]
    out = lr_predict.main(imgs + ["--checkpoint", os.path.join(wd, "latest.pth"), "--out-dir", str(tmp_path),
                                  "--overlay", "0.5", "--device", "cpu"])
    assert [os.path.basename(p) for p in out] == ["validation_0000.png", "validation_0001.png"]
    palette = palette_for("ade20k", 4)
    model = lr_cli.load_trained(lr_predict.build_parser().parse_args(imgs[:1] + ["--checkpoint", "x"]),
                                  os.path.join(wd, "latest.pth")).eval()
    for img_path, p in zip(imgs, out):
        mask = Image.open(p)
        assert mask.mode == "P" and mask.size == (64, 64)
        ids = np.asarray(mask)
        x = lrformer.engine.data.normalize(lrformer.engine.data.read_image(img_path))[None]
        assert np.array_equal(ids, model.predict(x)[0].numpy())
        rgb = np.asarray(mask.convert("RGB"))
        for k in np.unique(ids):
            assert (rgb[ids == k] == palette[k]).all()
        assert Image.open(p[:-4] + "_overlay.png").size == (64, 64)


def test_resume_is_exact(data, tmp_path):
    """8 steps straight == 4 steps, 'interruption', --resume auto for the rest: same step counter,
    learning rate position and weights (dropout and drop path on, augmentations on)."""
    kw = dict(TINY, drop_path_rate=0.2)
    common = ["--batch-size", "2", "--lr", "1e-3", "--warmup-iters", "3", "--log-interval", "1",
              "--save-interval", "100", "--eval-interval", "0", "--seed", "3"]
    straight = lr_train.main(tiny_args(data, str(tmp_path / "a"), 8, *common, kwargs=kw))
    wd = str(tmp_path / "b")
    first = lr_train.main(tiny_args(data, wd, 8, *common, "--stop-after", "4", kwargs=kw))
    assert first["step"] == 4
    with open(os.path.join(wd, "latest.pth.tmp"), "wb") as f:   # a save killed half-way
        f.write(b"truncated")
    resumed = lr_train.main(tiny_args(data, wd, 8, *common, "--resume", "auto", kwargs=kw))
    assert resumed["step"] == 8
    sa, sb = straight["model"].state_dict(), resumed["model"].state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    la = [json.loads(x) for x in open(tmp_path / "a" / "log.jsonl")]
    lb = [json.loads(x) for x in open(tmp_path / "b" / "log.jsonl")]
    assert [(r["step"], r["lr"], r["loss"]) for r in la] == [(r["step"], r["lr"], r["loss"]) for r in lb]
    ca = torch.load(tmp_path / "a" / "latest.pth", weights_only=False)
    cb = torch.load(tmp_path / "b" / "latest.pth", weights_only=False)
    assert ca["step"] == cb["step"] == 8
    for a, b in zip(ca["optimizer"]["state"].values(), cb["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # resuming a finished run is a no-op
    assert lr_train.main(tiny_args(data, wd, 8, *common, "--resume", "auto", kwargs=kw))["step"] == 8


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    rank = os.environ["RANK"]
    wd = sys.argv[sys.argv.index("--work-dir") + 1]
    _save = torch.save
    def recording_save(obj, f, *a, **k):
        with open(os.path.join(wd, f"saves_rank{rank}.txt"), "a") as fh:
            fh.write(str(f) + "\\n")
        return _save(obj, f, *a, **k)
    torch.save = recording_save
    from lrformer.engine import train
    res = train.main(sys.argv[1:])
    torch.save = _save
    _save({"state_dict": res["model"].state_dict(), "mIoU": res["eval"]["mIoU"], "step": res["step"],
           "world_size": res["world_size"], "loss": res["loss"]}, os.path.join(wd, f"final_rank{rank}.pt"))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(data, tmp_path):
    wd = str(tmp_path / "ddp")
    os.makedirs(wd)
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script),
           *tiny_args(data, wd, 6, "--batch-size", "4", "--lr", "1e-3", "--warmup-iters", "2", "--log-interval", "3",
                      "--save-interval", "3", "--eval-interval", "6")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0 = torch.load(os.path.join(wd, "final_rank0.pt"), weights_only=False)
    r1 = torch.load(os.path.join(wd, "final_rank1.pt"), weights_only=False)
    assert r0["world_size"] == r1["world_size"] == 2 and r0["step"] == r1["step"] == 6
    assert np.isfinite(r0["loss"]) and r0["loss"] == r1["loss"]            # all-reduced mean loss
    for k, v in r0["state_dict"].items():                                   # replicas stay identical
        assert torch.equal(v, r1["state_dict"][k]), k
    assert r0["mIoU"] == r1["mIoU"]                                         # sharded eval, summed matrices
    # only rank 0 writes checkpoints and logs
    assert not os.path.exists(os.path.join(wd, "saves_rank1.txt"))
    saved = open(os.path.join(wd, "saves_rank0.txt")).read().split()
    assert [os.path.basename(s) for s in saved] == ["iter_3.pth.tmp", "latest.pth.tmp", "iter_6.pth.tmp",
                                                    "latest.pth.tmp"]
    ckpt = torch.load(os.path.join(wd, "latest.pth"), weights_only=False)
    assert ckpt["meta"]["world_size"] == 2 and ckpt["step"] == 6
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(v, r0["state_dict"][k]), k
    log = [json.loads(x) for x in open(os.path.join(wd, "log.jsonl"))]
    assert [r["step"] for r in log] == [3, 6, 6]                            # two loss lines + one eval line


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_and_clipping_run(data, tmp_path, amp):
    """bf16 / fp16 autocast (fp16 with a GradScaler, saved for resume) with gradient clipping."""
    res = lr_train.main(tiny_args(data, str(tmp_path), 2, "--batch-size", "2", "--amp", amp, "--clip-grad", "0.5",
                                  "--log-interval", "1", "--eval-interval", "0"))
    assert res["step"] == 2 and np.isfinite(res["loss"])
    ckpt = torch.load(tmp_path / "latest.pth", weights_only=False)
    assert (ckpt["scaler"] is not None) == (amp == "fp16")
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_cityscapes_layout_trains(tmp_path):
    from synthetic import make_cityscapes
    root = make_cityscapes(str(tmp_path / "cs"), n_train=4, n_val=2, size=(32, 64))
    res = lr_train.main(tiny_args(root, str(tmp_path / "run"), 2, "--dataset", "cityscapes", "--batch-size", "2",
                                  "--scale", "64", "32", "--crop-size", "32", "32", "--log-interval", "1",
                                  "--eval-interval", "2", "--mode", "slide", "--crop", "32", "32",
                                  "--stride", "24", "24"))
    assert res["step"] == 2 and 0.0 <= res["eval"]["mIoU"] <= 1.0 and res["eval"]["num_images"] == 2


def test_trainer_bad_data_names_file(data, tmp_path):
    import shutil
    root = str(tmp_path / "bad")
    shutil.copytree(data, root)
    label = os.path.join(root, "annotations", "training", "training_0005.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(label)
    with pytest.raises(lrformer.engine.data.DataError, match="training_0005.png"):
        lr_train.main(tiny_args(root, str(tmp_path / "run"), 20, "--batch-size", "4", "--eval-interval", "0",
                                "--log-interval", "100", "--ratio-range", "1.0", "1.0"))


TINY_QUERY = {"embed_dims": [16, 32, 40, 48], "depths": [1, 1, 1, 1], "hidden_dim": 32, "num_queries": 6,
              "dec_layers": 4, "enc_layers": 1, "train_num_points": 256}


@pytest.mark.parametrize("model", ["lrformer_t_plus", "lrformer_t_faseg"])
def test_query_decoder_trains_resumes_and_evaluates(data, tmp_path, model):
    """The query-decoder families train through the same trainer: finite losses, exact resume, and
    ``evaluate`` rebuilds the model from the checkpoint's meta alone."""
    common = ["--model", model, "--batch-size", "2", "--lr", "1e-3", "--warmup-iters", "2",
              "--log-interval", "1", "--save-interval", "100", "--eval-interval", "0", "--seed", "5"]
    straight = lr_train.main(tiny_args(data, str(tmp_path / "a"), 4, *common, kwargs=TINY_QUERY))
    assert type(straight["model"]).__name__ == "QuerySegmentor"
    wd = str(tmp_path / "b")
    lr_train.main(tiny_args(data, wd, 4, *common, "--stop-after", "2", kwargs=TINY_QUERY))
    resumed = lr_train.main(tiny_args(data, wd, 4, *common, "--resume", "auto", kwargs=TINY_QUERY))
    assert resumed["step"] == 4
    sa, sb = straight["model"].state_dict(), resumed["model"].state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    losses = [json.loads(x)["loss"] for x in open(tmp_path / "a" / "log.jsonl") if "loss" in json.loads(x)]
    assert len(losses) == 4 and all(np.isfinite(losses))
    ckpt = torch.load(tmp_path / "a" / "latest.pth", weights_only=False)
    assert ckpt["meta"]["model"] == model
    res = lr_evaluate.main(["--data", data, "--checkpoint", str(tmp_path / "a" / "latest.pth"), "--device", "cpu",
                            "--test-scale", "0", "0", "--workers", "0"])
    assert 0.0 <= res["mIoU"] <= 1.0


# ----------------------------------------------------------------------------------------------- recipes
def _rule(model_name, rule):
    with torch.device("meta"):
        model = lrformer.create_model(model_name)
    groups = lr_recipes.param_groups(model, 0.05, 1.0, 0.1, rule)
    return {n: (g["lr_mult"], g["weight_decay"]) for g in groups for n in g["names"]}


def test_plus_parameter_groups_follow_the_released_custom_keys():
    g = _rule("lrformer_t_plus", "plus")
    assert g["backbone.patch_embed1.norm.weight"] == (0.1, 0.0)          # custom key: decay 0
    assert g["backbone.block1.0.norm1.weight"] == (0.1, 0.0)
    assert g["backbone.block3.2.attn.norm.bias"] == (0.1, 0.0)
    assert g["backbone.patch_embed1.conv1.1.weight"] == (0.1, 0.05)      # stem BN: matches only 'backbone'
    assert g["backbone.block3.0.layer_scale_1"] == (0.1, 0.05)
    assert g["backbone.block1.0.attn.q.0.weight"] == (0.1, 0.05)
    for n in ("decode_head.query_embed.weight", "decode_head.query_feat.weight", "decode_head.level_embed.weight"):
        assert g[n] == (1.0, 0.0), n
    assert g["decode_head.pixel_decoder.level_encoding.weight"] == (1.0, 0.05)   # matches no key
    assert g["decode_head.pixel_decoder.input_convs.0.gn.weight"] == (1.0, 0.0)  # head norms: norm_decay_mult 0
    assert g["decode_head.transformer_decoder.layers.0.norms.2.bias"] == (1.0, 0.0)
    assert g["decode_head.cls_embed.bias"] == (1.0, 0.05)


def test_faseg_parameter_groups():
    g = _rule("lrformer_t_faseg", "faseg")
    assert g["backbone.patch_embed1.conv1.1.weight"] == (0.1, 0.0)       # every norm layer: decay 0
    assert g["backbone.block3.0.layer_scale_1"] == (0.1, 0.05)
    assert g["decode_head.predictor.query_embed.weight"] == (1.0, 0.0)   # nn.Embedding: decay 0
    assert g["decode_head.predictor.level_embed.weight"] == (1.0, 0.0)
    assert g["decode_head.pixel_decoder.transformer.level_embed"] == (1.0, 0.05)   # a Parameter, not Embedding
    assert g["decode_head.pixel_decoder.layer_1.norm.weight"] == (1.0, 0.0)
    assert g["decode_head.predictor.adapt_pos2d.0.weight"] == (1.0, 0.05)


@pytest.mark.parametrize("model,expect", [
    ("lrformer_t_plus", ["lr 0.0001", "weight_decay 0.05", "lr x0.1", "poly power 0.9", "warm-up 0 iterations",
                         "global L2 norm 0.01", "batch 16", "shortest edge from {256..1024}", "cat_max_ratio 0.75",
                         "pad to a multiple of 32"]),
    ("lrformer_s_plus", ["global L2 norm 0.1", "batch 32"]),
    ("lrformer_t_faseg", ["lr 0.0001", "weight_decay 0.05", "lr x0.1", "poly power 0.9", "global L2 norm 0.01",
                          "batch 16", "shortest edge from {256..1024}", "pad image 128"]),
    ("lrformer_t", ["lr 6e-05", "weight_decay 0.01", "lr x10", "poly power 1 ", "warm-up 1500", "clipping: off",
                    "random resize x0.5..2"]),
])
def test_print_config_shows_the_released_recipe(model, expect, capsys, tmp_path):
    lr_train.main(["--data", str(tmp_path), "--work-dir", str(tmp_path / "w"), "--model", model, "--print-config"])
    text = capsys.readouterr().out
    for e in expect:
        assert e in text, (e, text)
    assert not os.path.exists(tmp_path / "w")                            # printed and exited


def test_flags_override_the_recipe(capsys, tmp_path):
    lr_train.main(["--data", str(tmp_path), "--work-dir", str(tmp_path / "w"), "--model", "lrformer_t_plus",
                   "--print-config", "--lr", "3e-4", "--clip-grad", "0", "--resize", "ratio"])
    text = capsys.readouterr().out
    assert "lr 0.0003" in text and "clipping: off" in text and "random resize" in text


def test_short_edge_resize_and_raw_pad():
    from lrformer.engine.data import MEAN, STD, TrainTransform
    rng = np.random.default_rng(0)
    t = TrainTransform(crop_size=(600, 600), resize="short_edge", short_edges=(300,), max_long=2048,
                       cat_max_ratio=1.0, photometric=False, pad_value=128)
    img = np.full((100, 150, 3), 7, np.uint8)
    lab = np.zeros((100, 150), np.uint8)
    x, y = t(img, lab, rng)
    assert x.shape == (3, 600, 600) and (y[:300, :450] == 0).all() and (y[300:] == 255).all()
    torch.testing.assert_close(x[:, 450, 500], torch.from_numpy((128 - MEAN) / STD))
    t2 = TrainTransform(crop_size=(50, 50), resize="short_edge", short_edges=(100,), max_long=120)
    x2, _ = t2(np.zeros((100, 300, 3), np.uint8), np.zeros((100, 300), np.uint8), rng)
    assert x2.shape == (3, 50, 50)                                       # long edge capped: 40x120 -> padded


def test_coco_stuff_layout_trains_and_evaluates(tmp_path):
    """COCO-Stuff-164k (images/{train2017,val2017} + annotations/<split>/*_labelTrainIds.png): its
    defaults (171 classes, 2048x512 scale, whole inference), a short training run and the evaluator."""
    from synthetic import make_coco_stuff
    from lrformer.engine.data import DATASET_DEFAULTS, find_pairs
    d = DATASET_DEFAULTS["coco_stuff164k"]
    assert (d["num_classes"], d["scale"], d["test_mode"], d["reduce_zero_label"]) == (171, (2048, 512), "whole", False)
    root = make_coco_stuff(str(tmp_path / "coco"))
    assert len(find_pairs(root, "train", "coco_stuff164k")) == 6 and len(find_pairs(root, "val", "coco_stuff164k")) == 3
    res = lr_train.main(tiny_args(root, str(tmp_path / "run"), 2, "--dataset", "coco_stuff164k", "--batch-size", "2",
                                  "--log-interval", "1", "--eval-interval", "2"))
    assert res["step"] == 2 and res["eval"]["num_images"] == 3 and 0.0 <= res["eval"]["mIoU"] <= 1.0
    ev = lr_evaluate.main(["--data", root, "--checkpoint", str(tmp_path / "run" / "latest.pth"), "--device", "cpu",
                           "--test-scale", "0", "0", "--workers", "0"])
    assert ev["num_images"] == 3
    os.remove(os.path.join(root, "annotations", "val2017", "000000000001_labelTrainIds.png"))
    with pytest.raises(lrformer.engine.data.DataError, match="000000000001_labelTrainIds.png"):
        find_pairs(root, "val", "coco_stuff164k")


def test_cli_errors_are_one_line(tmp_path, capsys):
    """The console scripts print one line for an error (no traceback) and exit 1; --debug re-raises;
    a bad --sizes is an argparse usage error naming the argument."""
    from lrformer.engine import predict
    from benchmarks import __main__ as bench
    from benchmarks import flops
    assert predict.run_cli(predict.main, "lrformer-predict", [str(tmp_path / "nope.jpg"), "--checkpoint",
                                                               str(tmp_path / "missing.pth")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lrformer-predict: error:") and "missing.pth" in err
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert lr_evaluate.run_cli(lr_evaluate.main, "lrformer-evaluate", ["--data", str(tmp_path), "--checkpoint",
                                                                         str(garbage)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "garbage.pth: not a readable PyTorch checkpoint" in err
    with pytest.raises(lrformer.CheckpointError):
        lr_evaluate.run_cli(lr_evaluate.main, "lrformer-evaluate", ["--data", str(tmp_path), "--checkpoint",
                                                                      str(garbage), "--debug"])
    for main in (bench.main, flops.main):
        with pytest.raises(SystemExit) as e:
            main(["--sizes", "512x"])
        assert e.value.code == 2 and "'512x': expected" in capsys.readouterr().err


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_resume_is_exact(data, tmp_path, monkeypatch, capsys, sig):
    """SIGTERM (preemption) / SIGINT (Ctrl-C) during step 3: the step finishes, latest.pth is saved at
    step 4 (the save interval is 100), TrainingInterrupted says where; --resume auto then ends where an
    uninterrupted run does, bit for bit.  --resume auto in an empty work dir says it starts from scratch."""
    import signal
    kw = dict(TINY, drop_path_rate=0.2)
    common = ["--batch-size", "2", "--lr", "1e-3", "--warmup-iters", "3", "--log-interval", "1",
              "--save-interval", "100", "--eval-interval", "0", "--seed", "3"]
    straight = lr_train.main(tiny_args(data, str(tmp_path / "a"), 6, *common, kwargs=kw))
    wd = str(tmp_path / "b")
    real_set_lr = lr_train.set_lr

    def set_lr(optimizer, step, args):
        if step == 3:
            os.kill(os.getpid(), getattr(signal, sig))
        return real_set_lr(optimizer, step, args)
    monkeypatch.setattr(lr_train, "set_lr", set_lr)
    capsys.readouterr()
    with pytest.raises(lr_train.TrainingInterrupted, match=f"{sig} at step 4"):
        lr_train.main(tiny_args(data, wd, 6, *common, "--resume", "auto", kwargs=kw))
    assert "nothing to resume" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL                       # handlers restored
    assert torch.load(os.path.join(wd, "latest.pth"), weights_only=False)["step"] == 4
    monkeypatch.setattr(lr_train, "set_lr", real_set_lr)
    resumed = lr_train.main(tiny_args(data, wd, 6, *common, "--resume", "auto", kwargs=kw))
    assert resumed["step"] == 6
    for k, v in straight["model"].state_dict().items():
        assert torch.equal(v, resumed["model"].state_dict()[k]), k
