"""PNG plots of a results folder (matplotlib, Agg backend).  ``python -m benchmarks.plots DIR``."""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

IMPL_STYLE = {"eager": "-", "compile": ":", "fused": "--", "fused+compile": "-."}
IMPL_COLOR = {"eager": "tab:gray", "compile": "tab:orange", "fused": "tab:blue", "fused+compile": "tab:green"}
VARIANT_COLOR = {"t": "tab:red", "s": "tab:orange", "b": "tab:blue", "l": "tab:green", "xl": "tab:purple"}
KIND_COLOR = {"lrsa": "tab:blue", "sra": "tab:green", "global": "tab:red", "window": "tab:purple"}


def _save(fig, folder: str, fname: str, out: list, dpi: int) -> None:
    """Lay out, write ``folder/fname``, close the figure and record the path in ``out``."""
    fig.tight_layout()
    p = os.path.join(folder, fname)
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    out.append(p)


def load(folder: str, name: str):
    p = os.path.join(folder, f"{name}.json")
    if not os.path.exists(p):
        return None, []
    with open(p) as f:
        d = json.load(f)
    return d.get("meta", {}), d.get("rows", [])


def _mpix(image: str) -> float:
    h, w = (int(v) for v in image.split("x"))
    return h * w / 1e6


def _title(meta) -> str:
    return f"{meta.get('device', '')} | torch {meta.get('torch', '')}"


def _size_axis(ax, images):
    xs = sorted(set(images), key=_mpix)
    ax.set_xscale("log")
    ax.set_xticks([_mpix(i) for i in xs])
    ax.set_xticklabels(xs, rotation=30, fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("image size")


def plot_flops(folder, out: List[str]):
    meta, rows = load(folder, "flops")
    rows = [r for r in rows if r.get("gflops") is not None]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    by = defaultdict(list)
    for r in rows:
        by[r["model"]].append(r)
    for model, rs in by.items():
        rs.sort(key=lambda r: _mpix(r["image"]))
        ax.plot([_mpix(r["image"]) for r in rs], [r["gflops"] for r in rs], "o-",
                label=f"{model} ({rs[0]['params_m']:.1f} M params)")
    _size_axis(ax, [r["image"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("GFLOPs (multiply-adds)")
    ax.set_title("LRFormer FLOPs vs resolution\n" + _title(meta), fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, folder, "flops_vs_resolution.png", out, dpi=120)


def _per_stage_lines(folder, rows, value, ylabel, fname, title, meta, out, log=True):
    stages = sorted({r["stage"] for r in rows})
    if not stages:
        return
    fig, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3.6), squeeze=False)
    for ax, s in zip(axes[0], stages):
        rs = [r for r in rows if r["stage"] == s and r.get(value) is not None]
        by = defaultdict(list)
        for r in rs:
            by[r.get("kind") or r.get("name")].append(r)
        for kind, krs in by.items():
            krs = [r for r in krs if r["image"].split("x")[0] == r["image"].split("x")[1]] or krs
            krs.sort(key=lambda r: _mpix(r["image"]))
            ax.plot([_mpix(r["image"]) for r in krs], [r[value] for r in krs], "o-",
                    color=KIND_COLOR.get(kind), label=kind)
        if rs:
            _size_axis(ax, [r["image"] for r in rs if r["image"].split("x")[0] == r["image"].split("x")[1]]
                       or [r["image"] for r in rs])
        if log:
            ax.set_yscale("log")
        dim = rs[0].get("dim") if rs else ""
        ax.set_title(f"stage {s}" + (f" (C={dim})" if dim else ""), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title + "\n" + _title(meta), fontsize=9)
    _save(fig, folder, fname, out, dpi=120)


def plot_attention(folder, out):
    meta, rows = load(folder, "attention_flops")
    if rows:
        _per_stage_lines(folder, rows, "gflops", "GFLOPs, one layer (log)", "attention_flops.png",
                         "One attention layer at LRFormer-S stage widths: LRSA vs SegFormer SRA vs global "
                         "vs Swin window\n(SRA's reduction ratio is 1 at stage 4: it is global attention there, "
                         "the two curves coincide)", meta, out)
    meta, rows = load(folder, "attention_latency")
    rows = [dict(r, kind=r["name"]) for r in rows if r.get("median_ms")]
    if rows:
        _per_stage_lines(folder, rows, "median_ms", "forward latency, ms (log)", "attention_latency.png",
                         f"One attention layer, forward, batch 1, {rows[0].get('dtype')}", meta, out)


def _bar_grid(folder, name, rows, group_key, fname, title, meta, out):
    """rows = cases at one image; subplot per (group, mode); bars per stage x impl."""
    if not rows:
        return
    groups = sorted({r[group_key] for r in rows}, key=lambda g: [r[group_key] for r in rows].index(g))
    modes = sorted({r["mode"] for r in rows})
    impls = [i for i in IMPL_COLOR if any(r["impl"] == i for r in rows)]
    fig, axes = plt.subplots(len(modes), len(groups), figsize=(max(7.0, 3.2 * len(groups)), 3.0 * len(modes)),
                             squeeze=False)
    for i, mode in enumerate(modes):
        for j, g in enumerate(groups):
            ax = axes[i][j]
            rs = [r for r in rows if r[group_key] == g and r["mode"] == mode]
            stages = sorted({r["stage"] for r in rs})
            wdt = 0.8 / max(len(impls), 1)
            for k, impl in enumerate(impls):
                ys = []
                for s in stages:
                    m = [r for r in rs if r["stage"] == s and r["impl"] == impl and r.get("median_ms")]
                    ys.append(m[0]["median_ms"] if m else 0)
                ax.bar([x + k * wdt for x in range(len(stages))], ys, wdt, label=impl, color=IMPL_COLOR[impl])
            ax.set_xticks([x + wdt * (len(impls) - 1) / 2 for x in range(len(stages))])
            ax.set_xticklabels([f"s{s}" for s in stages])
            ax.set_title(f"{g} {mode}", fontsize=8)
            ax.set_ylim(bottom=0)                   # bars start at zero: heights compare honestly
            ax.grid(True, axis="y", alpha=0.3)
            if j == 0:
                ax.set_ylabel("median ms")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title + "\n" + _title(meta), fontsize=9)
    _save(fig, folder, fname, out, dpi=130)


def plot_levels(folder, out):
    for name in ("ops", "lrsa", "block"):
        meta, rows = load(folder, name)
        rows = [r for r in rows if r.get("median_ms")]
        if not rows:
            continue
        image = max({r["image"] for r in rows}, key=_mpix)
        for dtype in sorted({r["dtype"] for r in rows}):
            rs = [r for r in rows if r["image"] == image and r["dtype"] == dtype]
            _bar_grid(folder, name, rs, "name", f"{name}_latency_{dtype}.png",
                      f"{name}: LRFormer-S stage shapes, {image} images, batch {rs[0]['batch'] if rs else ''}, "
                      f"{dtype}", meta, out)
    meta, rows = load(folder, "ops")
    rows = [r for r in rows if r.get("pct_of_copy_bw") and r.get("impl") in ("eager", "fused")]
    if rows:
        ops = [o for o in dict.fromkeys(r["name"] for r in rows)]
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(ops)), 3.8))
        image = max({r["image"] for r in rows}, key=_mpix)
        labels, vals, colors = [], [], []
        for op in ops:
            for impl in ("eager", "fused"):
                rs = [r for r in rows if r["name"] == op and r["impl"] == impl and r["image"] == image
                      and r["mode"] == "fwd" and r["stage"] == 1]
                for r in rs:
                    labels.append(f"{op}\n{impl} {r['dtype']}")
                    vals.append(r["pct_of_copy_bw"])
                    colors.append(IMPL_COLOR[impl])
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, fontsize=6, rotation=60)
        ax.set_ylabel("% of device copy bandwidth")
        ax.set_title(f"ops forward at stage 1 ({image} images): achieved bandwidth\n" + _title(meta), fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        _save(fig, folder, "ops_bandwidth.png", out, dpi=110)


def plot_model(folder, out):
    meta, rows = load(folder, "model")
    for value, fname, ylabel in (("median_ms", "model_latency.png", "median ms (log)"),
                                 ("peak_mem_mb", "model_memory.png", "peak extra memory, MiB (log)")):
        rs = [r for r in rows if r.get(value)]
        if not rs:
            continue
        panels = list(dict.fromkeys((r["task"], r["dtype"]) for r in rs))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
        for ax, (task, dtype) in zip(axes[0], panels):
            prs = [r for r in rs if r["task"] == task and r["dtype"] == dtype]
            by = defaultdict(list)
            for r in prs:
                by[(r["variant"], r["impl"])].append(r)
            colors = VARIANT_COLOR
            for (variant, impl), vrs in by.items():
                vrs.sort(key=lambda r: _mpix(r["image"]))
                ax.plot([_mpix(r["image"]) for r in vrs], [r[value] for r in vrs], "o" + IMPL_STYLE[impl],
                        color=colors[variant], label=f"{variant.upper()} {impl}")
            _size_axis(ax, [r["image"] for r in prs])
            ax.set_yscale("log")
            ax.set_title(f"{task}, batch {prs[0]['batch']}, {dtype}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
        axes[0][0].set_ylabel(ylabel)
        fig.suptitle("LRFormer segmentor\n" + _title(meta), fontsize=9)
        _save(fig, folder, fname, out, dpi=110)


def plot_traffic(folder, out):
    """Bytes moved (traffic model, not a timing): eager / fused and torch.compile / fused per case, one
    panel per image size."""
    meta, rows = load(folder, "traffic")
    rows = [r for r in rows if r.get("eager_gb") is not None]
    if not rows:
        return
    images = sorted({r["image"] for r in rows}, key=_mpix)
    fig, axes = plt.subplots(1, len(images), figsize=(max(7.0, 6.5 * len(images)), 8.5), squeeze=False)
    for ax, img in zip(axes[0], images):
        rs = [r for r in rows if r["image"] == img]
        labels = [f"{r['case']}{' s' + str(r['stage']) if r.get('stage') else ''} {r['mode']}" for r in rs]
        ys = list(range(len(rs)))
        comp = [r.get("compile_ratio") for r in rs]
        ax.barh([y - 0.2 for y in ys], [r["ratio"] for r in rs], 0.4, color=IMPL_COLOR["eager"],
                label="eager / fused")
        if any(c is not None for c in comp):
            ax.barh([y + 0.2 for y in ys], [c or 0 for c in comp], 0.4, color=IMPL_COLOR["compile"],
                    label="torch.compile / fused")
        for y, r in zip(ys, rs):
            txt = f" {r['ratio']:.2f}x  ({r['eager_gb']:.3g} -> {r['fused_gb']:.3g} GB)"
            if r.get("compile_ratio") is not None:
                txt += f";  compile {r['compile_gb']:.3g} GB: {r['compile_ratio']:.2f}x"
            ax.text(max(r["ratio"], r.get("compile_ratio") or 0), y, txt, va="center", fontsize=5.5)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.9 * max(max(r["ratio"], r.get("compile_ratio") or 0) for r in rs))   # bars start at zero
        ax.set_xlabel("bytes of the peer / bytes of the fused path (model)")
        ax.set_title(f"{img}, batch {rs[0]['batch']}, {rs[0]['dtype']}", fontsize=8)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("Traffic model: bytes every op (every inductor kernel) reads + writes, peer / fused (a bound on "
                 "the memory-bound speed-up, not a timing)", fontsize=9)
    _save(fig, folder, "traffic.png", out, dpi=130)


def make_plots(folder: str) -> List[str]:
    out: List[str] = []
    for f in (plot_flops, plot_attention, plot_levels, plot_model, plot_traffic):
        f(folder, out)
    return out


if __name__ == "__main__":
    for p in make_plots(sys.argv[1]):
        print(p)
