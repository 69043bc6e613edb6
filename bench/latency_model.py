"""Estimated vs measured latency for every zoo model, fp32 and int8, on a local device profile.

    python bench/latency_model.py [--device desktop-cpu] [--threads N] [--calibrate] [--models a,b]
                                  [--runs 200] [--repeats 3] [--json out.json] [--markdown]

For each zoo model (untrained weights, seed 0, 64x64 input, batch 1): ONNX fp32 export and edgekit's
int8 (ONNX Runtime static QDQ with the device's settings, calibrated on the MNIST calibration split).
Each artifact is measured with ONNX Runtime at the given threads (p50 of ``--runs`` timed runs after
warm-up, the median over ``--repeats`` passes that cycle through all artifacts so machine noise is spread
out; each artifact runs alone, as on a device, not interleaved with another model whose weights would
evict its own), and estimated by ``edgekit.profiling.estimate`` from the same file with the profile's
latency model. ``--calibrate`` first refits the profile's coefficients with the micro-benchmarks of
``edgekit.profiling.calibrate`` (written into the device YAML), so fit and check see the same machine state.

The table prints the error of the estimate relative to the measurement and the share within +-15%.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edgekit import zoo
from edgekit.compress.quantize import OrtQuantConfig, quantize_onnx
from edgekit.config import load_device
from edgekit.data import load_task
from edgekit.export.onnx import export_onnx
from edgekit.profiling import profile_local
from edgekit.profiling.estimate import estimate_latency

TOLERANCE = 0.15


def build_artifacts(names, device, workdir: Path, num_calib: int, console: Console) -> list:
    import torch

    q = device.quantization
    cfg = OrtQuantConfig(activation_type=q.activation_type, weight_type=q.weight_type, per_channel=q.per_channel)
    calib, _ = load_task("mnist").arrays("calib", limit=num_calib)
    arts = []
    for name in names:
        fp32, int8 = workdir / f"{name}.fp32.onnx", workdir / f"{name}.int8.onnx"
        if not (fp32.exists() and int8.exists()):
            torch.manual_seed(0)
            model = zoo.create(name, num_classes=10)
            export_onnx(model, fp32, (1, 3, 64, 64))
            quantize_onnx(fp32, int8, calib, cfg)
            console.log(f"exported {name}")
        arts += [(name, "fp32", fp32), (name, "int8", int8)]
    return arts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="desktop-cpu")
    ap.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="default: the profile's threads")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-calib", type=int, default=64, help="MNIST calibration images for int8")
    ap.add_argument("--calibrate", action="store_true", help="refit the profile's latency model first")
    ap.add_argument("--quick-calibrate", action="store_true", help="a smaller micro-benchmark suite")
    ap.add_argument("--workdir", default=None, help="keep the exported models here (default: a temp folder)")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table too")
    args = ap.parse_args()

    console = Console(width=160)
    device = load_device(args.device)
    if not device.local:
        console.print(f"[red]{device.name} is not a local profile: this benchmark measures on this machine")
        return 2
    threads = int(args.threads or device.resolved_threads())
    names = [n for n in args.models.split(",") if n] or [s.name for s in zoo.list_models()]
    load_before = os.getloadavg()
    if args.calibrate or args.quick_calibrate:
        from edgekit.profiling.calibrate import calibrate_local

        t0 = time.time()
        cal = calibrate_local(args.device, threads=threads, quick=args.quick_calibrate)
        console.print(f"calibrated {device.name} at {threads} thread(s) from {len(cal['samples'])} micro-benchmarks "
                      f"in {time.time() - t0:.0f} s: median |error| {cal['median_abs_error']:.1%}, "
                      f"{cal['within_15pct']:.0%} within 15% -> {cal['path']}")
        device = load_device(args.device)

    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        arts = build_artifacts(names, device, workdir, args.num_calib, console)
        p50s = {str(p): [] for _, _, p in arts}
        for rep in range(args.repeats):
            for _, _, path in arts:
                p50s[str(path)].append(profile_local(path, threads=threads, warmup=20, runs=args.runs)["p50"])
        rows = []
        for name, prec, path in arts:
            est = estimate_latency(path, device, threads=threads)
            measured = float(np.median(p50s[str(path)]))
            rows.append({"model": name, "precision": prec, "ops": est["ops"], "gmacs": est["gmacs"],
                         "measured_p50_ms": measured, "measured_spread": float(np.ptp(p50s[str(path)]) / measured),
                         "estimated_ms": est["p50"], "error": est["p50"] / measured - 1, "source": est["source"]})
    load_after = os.getloadavg()

    table = Table(title=f"Latency model vs measurement: {device.name}, {threads} thread(s), ONNX Runtime, batch 1, "
                        f"64x64")
    for col in ("model", "precision", "ops", "GMACs", "measured p50 ms", "spread", "estimated ms", "error", "+-15%"):
        table.add_column(col, justify="left" if col in ("model", "precision") else "right")
    for r in rows:
        ok = abs(r["error"]) <= TOLERANCE
        table.add_row(r["model"], r["precision"], str(r["ops"]), f"{r['gmacs']:.3f}", f"{r['measured_p50_ms']:.3f}",
                      f"{r['measured_spread']:.0%}", f"{r['estimated_ms']:.3f}", f"{r['error']:+.0%}",
                      "[green]yes" if ok else "[red]no")
    console.print(table)
    errs = np.array([abs(r["error"]) for r in rows])
    share = float(np.mean(errs <= TOLERANCE))
    by_prec = {p: float(np.mean([abs(r["error"]) <= TOLERANCE for r in rows if r["precision"] == p]))
               for p in ("fp32", "int8")}
    worst = sorted(rows, key=lambda r: -abs(r["error"]))[:5]
    console.print(f"within +-15%: {share:.0%} ({int((errs <= TOLERANCE).sum())}/{len(rows)}; fp32 {by_prec['fp32']:.0%}, "
                  f"int8 {by_prec['int8']:.0%}); median |error| {np.median(errs):.1%}; "
                  f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} cores")
    console.print("worst: " + ", ".join(f"{r['model']} {r['precision']} {r['error']:+.0%}" for r in worst))
    if args.markdown:
        print("\n| model | precision | measured p50 ms | estimated ms | error |\n|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['precision']} | {r['measured_p50_ms']:.3f} | {r['estimated_ms']:.3f} | "
                  f"{r['error']:+.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device.name, "threads": threads, "rows": rows,
                                               "within_15pct": share, "load": [load_before, load_after]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
