"""Markdown summary of a results folder (for the README).

``python -m benchmarks.report benchmarks/results/<device-slug>`` prints it; the sweep also writes
it to ``summary.md`` in the folder.
"""
from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict
from typing import List, Optional

IMPLS = ("eager", "compile", "fused", "fused+compile")


def _load(folder, name):
    p = os.path.join(folder, f"{name}.json")
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return json.load(f).get("rows", [])


def _mpix(image: str) -> float:
    h, w = (int(v) for v in image.split("x"))
    return h * w


def _cell(r: Optional[dict], value="median_ms", digits=3) -> str:
    if r is None:
        return "-"
    v = r.get(value)
    if r.get("status") not in (None, "ok") or v is None:
        st = str(r.get("status") or "-")
        return "skipped" if st.startswith("skipped") else ("error" if st.startswith("error") else st)
    if isinstance(v, float):
        return f"{v:.{digits}g}" if v < 1000 else f"{v:.0f}"
    return str(v)


def _table(header: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def flops_table(folder) -> str:
    rows = _load(folder, "flops")
    if not rows:
        return ""
    images = sorted(dict.fromkeys(r["image"] for r in rows), key=_mpix)
    models = list(dict.fromkeys(r["model"] for r in rows))
    out = []
    for m in models:
        by = {r["image"]: r for r in rows if r["model"] == m}
        first = next(iter(by.values()))
        out.append([m, f"{first.get('params', 0) / 1e6:.2f} M"] +
                   [(f"{by[i]['gflops']:.1f}" if i in by and by[i].get("gflops") is not None else "-") for i in images])
    hdr = ["model", "params"] + [f"{i}" + (" (19 cls)" if i == "1024x2048" else "") for i in images]
    return "### FLOPs (G, multiply-adds; 150 classes unless noted)\n\n" + _table(hdr, out)


def attention_table(folder) -> str:
    rows = _load(folder, "attention_flops")
    if not rows:
        return ""
    images = sorted(dict.fromkeys(r["image"] for r in rows), key=_mpix)
    out = []
    for s in sorted({r["stage"] for r in rows}):
        for kind in dict.fromkeys(r["kind"] for r in rows):
            by = {r["image"]: r for r in rows if r["stage"] == s and r["kind"] == kind}
            if not by:
                continue
            ok = all(r.get("match") in (True, "True") for r in by.values())
            out.append([f"{s} (C={next(iter(by.values()))['dim']})", kind] +
                       [(f"{by[i]['gflops']:.3g}" if i in by and by[i].get("gflops") is not None else "-")
                        for i in images] + ["yes" if ok else "NO"])
    lat = _load(folder, "attention_latency")
    txt = ("### One attention layer at LRFormer-S stage widths: GFLOPs (counted; = closed form)\n\n"
           + _table(["stage", "attention"] + images + ["counter = formula"], out))
    if lat:
        limgs = sorted(dict.fromkeys(r["image"] for r in lat), key=_mpix)
        lo = []
        for s in sorted({r["stage"] for r in lat}):
            for kind in dict.fromkeys(r["name"] for r in lat):
                by = {r["image"]: r for r in lat if r["stage"] == s and r["name"] == kind}
                lo.append([s, kind] + [_cell(by.get(i)) for i in limgs])
        txt += (f"\n\n### One attention layer, forward latency (ms, batch 1, {lat[0].get('dtype')})\n\n"
                + _table(["stage", "attention"] + limgs, lo))
    return txt


def level_table(folder, name, title) -> str:
    rows = _load(folder, name)
    if not rows:
        return ""
    groups = OrderedDict()
    for r in rows:
        k = (r.get("name"), r.get("stage"), r.get("image"), r.get("dtype"), r.get("mode"))
        groups.setdefault(k, {})[r["impl"]] = r
    impls = [i for i in IMPLS if any(i in g for g in groups.values())]
    out = []
    for (n, s, img, dt, mode), g in groups.items():
        f, e = g.get("fused"), g.get("eager")
        line = [n, s, img, dt, mode] + [_cell(g.get(i)) for i in impls]
        sp = f.get("speedup_vs_eager") if f else None
        line.append(f"{sp:.2f}x" if isinstance(sp, (int, float)) else "-")
        if name == "ops":
            bw = (f or {}).get("gbps") or (e or {}).get("gbps")
            pct = (f or {}).get("pct_of_copy_bw")
            line.append("-" if not bw else (f"{bw:.3g}" + (f" ({pct:.0f}%)" if pct else "")))
        mem = [(g.get(i) or {}).get("peak_mem_mb") for i in ("eager", "fused")]
        line.append(" / ".join(f"{m:.0f}" if isinstance(m, (int, float)) else "-" for m in mem))
        out.append(line)
    hdr = ["case", "stage", "image", "dtype", "mode"] + [f"{i} ms" for i in impls] + ["fused speedup"]
    if name == "ops":
        hdr.append("GB/s fused (or eager) (% copy bw)")
    hdr.append("peak MiB eager / fused")
    return f"### {title}\n\n" + _table(hdr, out)


def model_table(folder) -> str:
    rows = _load(folder, "model")
    if not rows:
        return ""
    groups = OrderedDict()
    for r in rows:
        k = (r.get("name"), r.get("task"), r.get("image"), r.get("batch"), r.get("dtype"))
        groups.setdefault(k, {})[r["impl"]] = r
    impls = [i for i in IMPLS if any(i in g for g in groups.values())]
    out = []
    for (n, task, img, b, dt), g in groups.items():
        f = g.get("fused")
        sp = f.get("speedup_vs_eager") if f else None
        mem = [(g.get(i) or {}).get("peak_mem_mb") for i in ("eager", "fused")]
        out.append([n, task, img, b, dt] + [_cell(g.get(i)) for i in impls] +
                   [f"{sp:.2f}x" if isinstance(sp, (int, float)) else "-",
                    " / ".join(f"{m:.0f}" if isinstance(m, (int, float)) else "-" for m in mem)])
    hdr = ["model", "task", "image", "batch", "dtype"] + [f"{i} ms" for i in impls] + \
          ["fused speedup", "peak MiB eager / fused"]
    return "### Segmentor: inference and training step (ms per call)\n\n" + _table(hdr, out)


def traffic_table(folder) -> str:
    rows = _load(folder, "traffic")
    rows = [r for r in rows if r.get("eager_gb") is not None]
    if not rows:
        return ""
    gb = lambda r, k: f"{r[k]:.3f}" if r.get(k) is not None else "-"  # noqa: E731
    out = [[r["case"], str(r.get("stage") or "-"), r["image"], str(r["batch"]), r["dtype"], r["mode"],
            gb(r, "eager_gb"), gb(r, "compile_gb"), gb(r, "fused_gb"), gb(r, "fused_compile_gb"),
            f"{r['ratio']:.2f}x", f"{r['compile_ratio']:.2f}x" if r.get("compile_ratio") is not None else "-",
            f"{r['eager_gflop']:.1f} / {r['fused_gflop']:.1f}" if r.get("eager_gflop") is not None else "-"]
           for r in rows]
    hdr = ["case", "stage", "image", "batch", "dtype", "pass", "eager GB", "compile GB", "fused GB",
           "fused + compile GB", "eager / fused", "compile / fused", "GFLOP eager / fused"]
    return ("### Traffic model (bytes counted per op on the meta device, torch.compile's by inductor scheduled "
            "for a modelled CUDA device; a bound on the memory-bound speed-up, not a timing)\n\n" + _table(hdr, out))


def summarize(folder: str) -> str:
    meta = {}
    p = os.path.join(folder, "metadata.json")
    if os.path.exists(p):
        with open(p) as f:
            meta = json.load(f)
    head = [f"## Benchmarks on {meta.get('device', '?')}",
            "",
            f"torch {meta.get('torch')}, triton {meta.get('triton')}"
            + (f", CUDA {meta['cuda']}" if meta.get("cuda") else "")
            + (f"; copy bandwidth {meta['copy_bandwidth_gbps']:.0f} GB/s" if meta.get("copy_bandwidth_gbps") else "")
            + f"; {meta.get('finished', '')}, {meta.get('elapsed_s', '?')} s; "
              f"command: `python -m benchmarks {' '.join(meta.get('argv', []))}`".rstrip()]
    for r in meta.get("later_runs", []):
        head.append(f"\n{', '.join(r['sections'])}: torch {r.get('torch')}, triton {r.get('triton')}; "
                    f"{r.get('finished', '')}, {r.get('elapsed_s', '?')} s; command: "
                    f"`python -m benchmarks {' '.join(r.get('argv', []))}`")
    for n in meta.get("notes", []):
        head.append(f"\n> {n}")
    parts = ["\n".join(head), flops_table(folder), attention_table(folder),
             level_table(folder, "ops", "Fused ops vs reference (LRFormer-S stage shapes)"),
             level_table(folder, "lrsa", "LRSA module (LRFormer-S stages)"),
             level_table(folder, "block", "Block (LRFormer-S stages)"),
             model_table(folder), traffic_table(folder)]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_summary(folder: str) -> str:
    text = summarize(folder)
    with open(os.path.join(folder, "summary.md"), "w") as f:
        f.write(text)
    return text


if __name__ == "__main__":
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else "."))
