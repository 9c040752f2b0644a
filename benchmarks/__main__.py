"""lrformer-bench (python -m benchmarks): FLOPs, latency and memory sweeps.

Runs on whatever the machine has.  On CUDA: every section (FLOPs; attention FLOPs + latency; op,
LRSA, block and model latency/memory, eager vs fused vs torch.compile, fp32 and bf16).  On a
CPU-only machine: the FLOPs sweeps and CPU timings of the eager reference (fused and compiled
timings need a GPU and are marked so).  Writes CSV + JSON per section, ``metadata.json``, PNG plots
and ``summary.md`` to a fresh folder ``benchmarks/runs/<device-slug>-<time>/`` (never over the
committed results; ``--commit-results`` writes ``benchmarks/results/<device-slug>/``, ``--out`` any
folder), shows a progress bar and prints where it wrote at the end.  ``--max-minutes`` is a time budget: cases that no longer fit
are skipped (recorded as ``skipped (time budget)``), never cut in the middle.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import re
import sys
import time
import traceback
from typing import Dict, List, Optional

import torch

from . import sweeps as SW
from .timing import copy_bandwidth_gbps, free_memory, is_oom

HERE = os.path.dirname(os.path.abspath(__file__))
TIMING_COLUMNS = ["section", "name", "variant", "task", "stage", "image", "shape", "batch", "dtype", "mode",
                  "impl", "status", "median_ms", "p20_ms", "p80_ms", "reps", "input_sets", "peak_mem_mb",
                  "first_call_s", "speedup_vs_eager", "bytes", "gbps", "pct_of_copy_bw", "flop", "tflops",
                  "note", "device", "torch", "triton"]
FLOPS_COLUMNS = ["model", "image", "height", "width", "num_classes", "params", "params_m", "gflops",
                 "reference_gflops", "status", "device", "torch", "triton"]
ATTN_FLOPS_COLUMNS = ["kind", "label", "stage", "dim", "heads", "image", "map", "tokens", "gflops",
                      "gflops_closed_form", "match", "note", "status", "device", "torch", "triton"]
TRAFFIC_COLUMNS = ["section", "case", "stage", "image", "shape", "batch", "dtype", "mode", "status", "eager_gb",
                   "fused_gb", "ratio", "compile_gb", "fused_compile_gb", "compile_ratio", "eager_gflop",
                   "fused_gflop", "flop_ratio", "eager_ops", "fused_ops", "fused_op_gb", "eager_top_gb",
                   "eager_bytes", "fused_bytes", "compile_bytes", "fused_compile_bytes", "device", "torch", "triton"]
FILES = {  # output name -> (case sections, columns)
    "flops": (("flops",), FLOPS_COLUMNS),
    "attention_flops": (("attention_flops",), ATTN_FLOPS_COLUMNS),
    "attention_latency": (("attention_latency",), TIMING_COLUMNS),
    "ops": (("ops",), TIMING_COLUMNS),
    "lrsa": (("lrsa",), TIMING_COLUMNS),
    "block": (("block",), TIMING_COLUMNS),
    "model": (("model",), TIMING_COLUMNS),
    "traffic": (("traffic",), TRAFFIC_COLUMNS),
}


# ------------------------------------------------------------------------------------ device info
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} cores)"


def slugify(name: str) -> str:
    s = re.sub(r"\(.*?\)", "", name.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "device"


def versions() -> Dict[str, str]:
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = "n/a"
    return {"torch": torch.__version__, "triton": tv}


# ----------------------------------------------------------------------------------------- budget
class Budget:
    """A total deadline split between sections by share; unused time rolls over."""

    def __init__(self, minutes: Optional[float], sections: List[str]):
        self.t0 = time.perf_counter()
        self.deadline = None if minutes is None else self.t0 + 60.0 * minutes
        self.remaining_sections = list(sections)
        self.section_deadline = None

    def start_section(self, section: str):
        if self.deadline is None:
            return
        now = time.perf_counter()
        total = sum(SW.SHARES[s] for s in self.remaining_sections)
        frac = SW.SHARES[section] / total if total else 1.0
        self.section_deadline = now + max(0.0, self.deadline - now) * frac
        self.remaining_sections.remove(section)

    def allows(self, case: SW.Case) -> bool:
        if self.deadline is None:
            return True
        now = time.perf_counter()
        if now >= self.deadline or (now >= self.section_deadline and not case.essential):
            return False
        return now + case.min_budget_s <= self.deadline

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# ------------------------------------------------------------------------------------------- run
def _sizes_arg(text: str):
    """``--sizes``: comma-separated ``S`` or ``HxW`` with positive ints."""
    try:
        sizes = tuple(SW.parse_size(s) for s in text.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or any(h <= 0 or w <= 0 for h, w in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: expected sizes like 512,1024,1024x2048")
    return sizes


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="lrformer-bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny settings (tests, CI): seconds on a CPU")
    p.add_argument("--out", default=None,
                   help="results folder (default: a fresh benchmarks/runs/<device-slug>-<date-time>)")
    p.add_argument("--results-root", default=None, help="write to RESULTS_ROOT/<device-slug>")
    p.add_argument("--commit-results", action="store_true",
                   help="write to benchmarks/results/<device-slug>, the committed results of this device")
    p.add_argument("--sections", default=",".join(SW.SECTIONS),
                   help=f"comma-separated subset of {','.join(SW.SECTIONS)}")
    p.add_argument("--dtype", default=None, help="comma-separated: fp32,bf16 (default: both on CUDA, fp32 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="batch of the op/LRSA/block cases and of the "
                                                           "training step (inference is batch 1)")
    p.add_argument("--sizes", default=None, type=_sizes_arg,
                   help="image sizes for every sweep, e.g. 512,1024,1024x2048")
    p.add_argument("--variants", default=None, help="model variants for the model sweep, e.g. t,s")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time budget; cases that no longer fit are skipped (and reported)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases (timings and the traffic model's compile columns)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 with --quick: steadier on a loaded box)")
    return p.parse_args(argv)


def make_config(args) -> SW.Config:
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = SW.default_config(dev, quick=args.quick)
    if args.dtype:
        ds = tuple(d.strip() for d in args.dtype.split(",") if d.strip())
        bad = [d for d in ds if d not in SW.DTYPES]
        if bad:
            raise SystemExit(f"unknown dtype(s) {bad}; choose from {list(SW.DTYPES)}")
        cfg.dtypes = ds
    if args.batch:
        cfg.batch = cfg.train_batch = cfg.traffic_batch = args.batch
    if args.sizes:
        sizes = args.sizes
        cfg.flops_sizes = cfg.attn_sizes = cfg.op_images = cfg.model_sizes = cfg.traffic_sizes = sizes
        if cfg.attn_latency_sizes:
            cfg.attn_latency_sizes = sizes
        small = tuple(s for s in sizes if max(s) <= 1024)
        cfg.train_sizes = small or (min(sizes, key=lambda s: s[0] * s[1]),)
    if args.variants:
        vs = tuple(v.strip().lower().replace("lrformer_", "") for v in args.variants.split(","))
        cfg.model_variants = cfg.train_variants = vs
        cfg.flops_variants = vs
    if args.no_compile:
        cfg.compile = cfg.traffic_compile = False
    return cfg


def run(argv=None) -> str:
    """Run the sweep (``argv`` as on the command line); returns the results folder."""
    threads = torch.get_num_threads()
    try:
        return _run(argv)
    finally:
        torch.set_num_threads(threads)


def _run(argv=None) -> str:
    args = parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in sections:
        if s not in SW.SECTIONS:
            raise SystemExit(f"unknown section {s!r}; choose from {','.join(SW.SECTIONS)}")
    cfg = make_config(args)
    dev = cfg.device
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    name = device_name(dev)
    slug = slugify(name.replace("CPU ", "cpu-")) + ("-quick" if args.quick else "")
    if args.out:
        out = args.out
    elif args.results_root or args.commit_results:
        out = os.path.join(args.results_root or os.path.join(HERE, "results"), slug)
    else:
        out = os.path.join(HERE, "runs", f"{slug}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    ver = versions()
    started = _dt.datetime.now().isoformat(timespec="seconds")
    print(f"lrformer benchmarks on {name} ({dev}), torch {ver['torch']}, triton {ver['triton']} -> {out}")
    if not cfg.cuda:
        print("No CUDA device: running the FLOPs sweeps and CPU timings of the eager reference only; "
              "fused-kernel and torch.compile timings need a GPU (marked 'needs GPU').")

    copy_bw = None
    if cfg.cuda and any(s in sections for s in ("ops", "lrsa", "block", "model", "attention")):
        copy_bw = copy_bandwidth_gbps(dev)
        print(f"device-to-device copy bandwidth: {copy_bw:.0f} GB/s (read + write)")

    all_cases = {s: SW.build_cases(cfg, s) for s in sections}
    if cfg.cuda and any(s in sections for s in ("ops", "lrsa", "block", "model")):
        # the kernels' correctness on this device first: no time is reported for an op that fails it
        import io

        from lrformer_kernels import selftest
        log = io.StringIO()
        selftest.run(quick=True, stream=log)
        with open(os.path.join(out, "selftest.txt"), "w") as f:
            f.write(log.getvalue())
        bad = set(selftest.LAST_FAILED)
        print(f"self-test: {'all checks passed' if not bad else 'FAILED for ' + ', '.join(sorted(bad))} "
              f"(selftest.txt)")
        alias = {"dwconv3x3 (IRB)": ("dwconv_cpe", "dwconv_irb"), "LRSA block": ("LRSA", "Block"),
                 "dwconv3x3_pyramid_pool": ("dwconv_pyramid_pool", "Block")}
        names = {n for b in bad for n in alias.get(b, (b,))}
        for cases in all_cases.values():
            for c in cases:
                if c.key.get("impl") == "fused" and (c.key.get("name") in names or (bad and c.section == "model")):
                    c.fn, c.status = None, "failed self-test"
    total = sum(len(c) for c in all_cases.values())
    budget = Budget(args.max_minutes, sections)
    rows: Dict[str, List[dict]] = {}
    notes: List[str] = []
    skipped_budget: Dict[str, int] = {}
    errors: List[str] = []
    common = dict(device=name, **ver)
    try:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="benchmarks", unit="case", dynamic_ncols=True, file=sys.stderr,
                   mininterval=0.2 if sys.stderr.isatty() else 10.0)
    except ImportError:  # pragma: no cover
        bar = None
    section_s: Dict[str, float] = {}
    for section in sections:
        budget.start_section(section)
        t_sec = time.perf_counter()
        for case in all_cases[section]:
            if bar is not None:
                bar.set_postfix_str(_case_label(case)[:60], refresh=False)
            row = dict(case.key)
            if case.status is not None:
                row["status"] = case.status
            elif not budget.allows(case):
                row["status"] = "skipped (time budget)"
                skipped_budget[section] = skipped_budget.get(section, 0) + 1
            else:
                try:
                    row.update(case.fn())
                    row.setdefault("status", "ok")
                except Exception as exc:  # noqa: BLE001 - record and go on
                    if is_oom(exc):
                        row["status"] = "OOM"
                    else:
                        row["status"] = f"error: {type(exc).__name__}: {exc}"[:300]
                        errors.append(f"{_case_label(case)}: {row['status']}")
                        if os.environ.get("LRFORMER_BENCH_DEBUG"):
                            traceback.print_exc()
                if row.get("status") not in (None, "ok"):
                    free_memory()                 # after an OOM/error, outside the except block
            row.update(common)
            rows.setdefault(case.section, []).append(row)
            if bar is not None:
                bar.update(1)
        section_s[section] = round(time.perf_counter() - t_sec, 1)
        _write_all(out, rows, copy_bw)           # after each section: partial results survive
    if bar is not None:
        bar.close()
    SW.release_models()
    for sec, n in skipped_budget.items():
        notes.append(f"{n} {sec} case(s) skipped: the --max-minutes {args.max_minutes} budget ran out")
    if not cfg.cuda and set(sections) & {"attention", "ops", "lrsa", "block", "model"}:
        notes.append("CPU-only machine: fused-kernel and torch.compile timings need a GPU ('needs GPU' rows); "
                     "CPU timings are of the eager reference with time.perf_counter.")
    meta = dict(device=name, device_type=dev.type, slug=slug, **ver,
                cuda=torch.version.cuda if cfg.cuda else None, python=platform.python_version(),
                platform=platform.platform(), cpu_count=os.cpu_count(), started=started,
                finished=_dt.datetime.now().isoformat(timespec="seconds"),
                elapsed_s=round(budget.elapsed(), 1), section_seconds=section_s, sections=sections,
                torch_threads=torch.get_num_threads(), argv=list(argv or sys.argv[1:]),
                max_minutes=args.max_minutes, copy_bandwidth_gbps=copy_bw,
                dtypes_note=("op level: tensors in the dtype; LRSA/block/model levels: fp32 parameters and "
                             "inputs with autocast to the dtype (bf16 = mixed precision)"),
                timing_method=("CUDA events around each call after warm-up, median over reps, rotating "
                               ">= 3 random input sets (more when a set is smaller than 2x L2); peak memory "
                               "= max_memory_allocated during one call minus memory allocated before it"
                               if cfg.cuda else "time.perf_counter, median of a few calls after one warm-up"),
                settings=cfg.settings(), notes=notes, errors=errors,
                counts={s: len(r) for s, r in rows.items()})
    meta = _merge_metadata(os.path.join(out, "metadata.json"), meta)
    with open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=2, default=str)
    _write_all(out, rows, copy_bw, meta)
    if not args.no_plots:
        try:
            from .plots import make_plots
            made = make_plots(out)
            print(f"plots: {', '.join(os.path.basename(p) for p in made)}")
        except Exception as exc:  # noqa: BLE001
            print(f"plots failed: {type(exc).__name__}: {exc}")
    from .report import write_summary
    summary = write_summary(out)
    print()
    print(summary)
    for n in notes:
        print("NOTE:", n)
    if errors:
        print(f"{len(errors)} case(s) failed; first: {errors[0]}")
    print(f"results in {out} ({budget.elapsed():.0f} s)")
    return out


def _merge_metadata(path: str, meta: dict) -> dict:
    """A run of some sections into a folder that holds an earlier run's other sections (e.g. ``--sections
    traffic --commit-results``) keeps that run's metadata and lists this one under ``later_runs``."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return meta
    if set(old.get("sections", [])) <= set(meta["sections"]) or old.get("device") != meta["device"]:
        return meta
    runs = [r for r in old.get("later_runs", []) if set(r.get("sections", [])) - set(meta["sections"])]
    old["later_runs"] = runs + [{k: meta[k] for k in ("sections", "argv", "torch", "triton", "started",
                                                       "finished", "elapsed_s", "notes", "errors")}]
    return old


def _case_label(case: SW.Case) -> str:
    k = case.key
    parts = [case.section, k.get("name") or k.get("model") or k.get("kind") or k.get("case"), k.get("image"),
             f"s{k['stage']}" if k.get("stage") else None, k.get("dtype"), k.get("mode"), k.get("impl")]
    return " ".join(str(p) for p in parts if p)


def _finish_timing_rows(rows: List[dict], copy_bw: Optional[float]):
    """Derived columns: speedup vs eager, achieved GB/s (and % of copy bandwidth), TFLOP/s."""
    ident = lambda r: tuple(r.get(c) for c in ("section", "name", "variant", "task", "stage", "image",  # noqa: E731
                                                  "batch", "dtype", "mode"))
    eager = {ident(r): r for r in rows if r.get("impl") == "eager" and r.get("median_ms")}
    for r in rows:
        ms = r.get("median_ms")
        if not ms:
            continue
        e = eager.get(ident(r))
        if e is not None:
            r["speedup_vs_eager"] = round(e["median_ms"] / ms, 3)
        if r.get("bytes"):
            r["gbps"] = round(r["bytes"] / (ms * 1e-3) / 1e9, 4)
            if copy_bw:
                r["pct_of_copy_bw"] = round(100 * r["gbps"] / copy_bw, 2)
        if r.get("flop"):
            r["tflops"] = round(r["flop"] / (ms * 1e-3) / 1e12, 3)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def _write_all(out: str, rows: Dict[str, List[dict]], copy_bw, meta: Optional[dict] = None):
    for fname, (secs, cols) in FILES.items():
        rs = [r for s in secs for r in rows.get(s, [])]
        if not rs:
            continue
        if cols is TIMING_COLUMNS:
            _finish_timing_rows(rs, copy_bw)
        with open(os.path.join(out, f"{fname}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            for r in rs:
                w.writerow({c: _fmt(r.get(c)) for c in cols})
        head = meta or dict(device=rs[0].get("device"), torch=rs[0].get("torch"), triton=rs[0].get("triton"),
                            copy_bandwidth_gbps=copy_bw, partial=True)
        with open(os.path.join(out, f"{fname}.json"), "w") as f:
            json.dump(dict(meta=head, columns=cols, rows=rs), f, indent=1, default=str)


def main(argv=None):
    """Console-script entry point: one-line errors (``--debug`` shows the traceback)."""
    from lrformer.engine.cli import run_cli
    return run_cli(run, "lrformer-bench", argv)


if __name__ == "__main__":
    sys.exit(main())
