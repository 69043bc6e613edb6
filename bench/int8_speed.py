"""fp32 vs edgekit int8 vs ONNX Runtime's default int8, for every zoo model, side by side in one run.

    python bench/int8_speed.py [--models a,b] [--device desktop-cpu] [--rounds 200] [--epochs 4]

For each model: the baseline trained on the default task (cached), exported to
ONNX fp32; edgekit's int8 as the int8 recipe makes it (pre-processing,
per-channel, the device's activation type, fp32 logits layer, calibration
method chosen by logits SQNR on the calibration split, and, when the device is this
machine, the weight/activation layout chosen by latency measured here among the accurate ones); and `quantize_static` with ORT's defaults (QDQ S8S8,
per-tensor, no pre-processing). All three are timed round-robin in one loop
(order shuffled each round), batch 1, so the ratios are fair on a noisy machine;
edgekit vs ORT-default gets a 95% bootstrap interval over the paired rounds; an
A/A control (the edgekit file again, in a second session) shows how far two
sessions of one file drift apart, and "slower than ORT default" means the whole
interval is below 1 and below the A/A interval. Accuracy is top-1 on the
1,000-image eval split.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edgekit import zoo
from edgekit.export.onnx_int8 import ORT_DEFAULT, OrtQuantConfig, quantize_onnx, quantize_onnx_auto
from edgekit.config import Recipe, TrainSpec, load_device
from edgekit.data import load_task
from edgekit.evaluate import agreement, predict_arrays, top1
from edgekit.export.onnx import export_onnx
from edgekit.pipeline import get_baseline
from edgekit.measure.local import interleaved_latency, ratio_interval
from edgekit.runtime import load_runner


def slower(r: dict) -> bool:
    """edgekit is slower than ORT default: the whole 95% interval of their ratio lies below 1 and below the
    A/A control's interval (two sessions of one file), i.e. the gap is wider than the measurement can resolve."""
    return r["vs_ortdef"][2] < min(1.0, r["aa"][1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    ap.add_argument("--device", default="desktop-cpu")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table too")
    args = ap.parse_args()
    dev = load_device(args.device)
    q = dev.quantization
    edge_cfg = OrtQuantConfig(activation_type=q.activation_type, weight_type=q.weight_type, per_channel=q.per_channel)
    names = [n for n in args.models.split(",") if n] or [s.name for s in zoo.list_models()]
    task = load_task("mnist")
    calib, _ = task.arrays("calib")
    x, y = task.arrays("eval")
    threads = dev.resolved_threads()
    rows = []
    console = Console(width=200)
    for name in names:
        t0 = time.time()
        model, info = get_baseline(name, task, recipe=Recipe(name="bench", train=TrainSpec(epochs=args.epochs)))
        with tempfile.TemporaryDirectory() as d:
            fp32 = export_onnx(model, Path(d) / "fp32.onnx", task.input_shape)
            edge_path, chosen, _ = quantize_onnx_auto(fp32, Path(d) / "edgekit.onnx", calib, edge_cfg,
                                                      latency_threads=threads if dev.local else None,
                                                      timer=interleaved_latency)
            paths = {"fp32": fp32, "edgekit": edge_path,
                     "ort-default": quantize_onnx(fp32, Path(d) / "ortdefault.onnx", calib, ORT_DEFAULT)}
            runners = {k: load_runner("onnxruntime", p, threads=threads) for k, p in paths.items()}
            logits = {k: predict_arrays(r.run, x, batch_size=1) for k, r in runners.items()}
            # A/A control: the same edgekit file in a second session. Two sessions of one file differ by up to ~4%
            # (memory placement), more than the per-round noise the bootstrap sees; only a gap wider than this
            # one counts.
            runners["edgekit-again"] = load_runner("onnxruntime", edge_path, threads=threads)
            lat = interleaved_latency({k: r.run for k, r in runners.items()}, x[:1], warmup=20, rounds=args.rounds,
                                      raw=True)
        acc = {k: top1(v, y) for k, v in logits.items()}
        p50 = {k: v["p50"] for k, v in lat.items()}
        row = {"model": name, "acc_fp32": acc["fp32"], "acc_edgekit": acc["edgekit"], "acc_ortdef": acc["ort-default"],
               "agree_edgekit": agreement(logits["fp32"], logits["edgekit"]),
               "p50_fp32": p50["fp32"], "p50_edgekit": p50["edgekit"], "p50_ortdef": p50["ort-default"],
               "speedup_edgekit": p50["fp32"] / p50["edgekit"], "speedup_ortdef": p50["fp32"] / p50["ort-default"],
               "vs_ortdef": ratio_interval(lat["ort-default"]["times"], lat["edgekit"]["times"]),
               "aa": ratio_interval(lat["edgekit-again"]["times"], lat["edgekit"]["times"]),
               "config": chosen.label().replace("QDQ ", ""), "seconds": time.time() - t0}
        rows.append(row)
        console.print(f"{name}: fp32 {acc['fp32']:.3f} / edgekit int8 {acc['edgekit']:.3f} "
                      f"({row['speedup_edgekit']:.2f}x) / ORT default {acc['ort-default']:.3f} "
                      f"({row['speedup_ortdef']:.2f}x)  [{row['seconds']:.0f} s, baseline {info['source']}]")
    cols = ["model", "top-1 fp32", "top-1 edgekit int8", "Δ pp", "top-1 ORT-default int8", "fp32 p50 ms",
            "edgekit int8 p50 ms", "ORT-default int8 p50 ms", "edgekit speedup", "ORT-default speedup",
            "edgekit / ORT-default [95% CI]", "A/A: edgekit 2nd session / 1st", "edgekit int8 layout", "verdict"]
    table = Table(title=f"int8 on {dev.name} ({threads} threads, batch 1, input {task.input_shape[-1]}px, "
                        f"{args.rounds} interleaved rounds)")
    for c in cols:
        table.add_column(c, justify="left" if c in ("model", "verdict", "edgekit int8 layout") else "right")
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        drop = 100 * (r["acc_fp32"] - r["acc_edgekit"])
        verdict = []
        if r["speedup_edgekit"] < 1:
            verdict.append("int8 slower than fp32: use fp32")
        if drop > 0.5 + 1e-9:
            verdict.append(f"drop {drop:.1f} pp > 0.5")
        ratio, lo, hi = r["vs_ortdef"]
        if slower(r):
            verdict.append("slower than ORT default")
        cells = [r["model"], f"{100 * r['acc_fp32']:.1f}", f"{100 * r['acc_edgekit']:.1f}", f"{-drop:+.1f}",
                 f"{100 * r['acc_ortdef']:.1f}", f"{r['p50_fp32']:.3f}", f"{r['p50_edgekit']:.3f}",
                 f"{r['p50_ortdef']:.3f}", f"{r['speedup_edgekit']:.2f}x", f"{r['speedup_ortdef']:.2f}x",
                 f"{ratio:.2f}x [{lo:.2f}-{hi:.2f}]", "{:.2f}x [{:.2f}-{:.2f}]".format(*r["aa"]), r["config"],
                 "; ".join(verdict) or "ok"]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    n = len(rows)
    within = sum(100 * (r["acc_fp32"] - r["acc_edgekit"]) <= 0.5 + 1e-9 for r in rows)
    not_slower = sum(not slower(r) for r in rows)
    faster_ortdef = sum(r["vs_ortdef"][1] > max(1.0, r["aa"][2]) for r in rows)
    faster_fp32 = sum(r["speedup_edgekit"] > 1 for r in rows)
    console.print(f"{within}/{n} within 0.5 pp of fp32; edgekit int8 not slower than ORT-default int8 on "
                  f"{not_slower}/{n} (faster beyond noise on {faster_ortdef}/{n}); faster than fp32 on {faster_fp32}/{n}; median edgekit/ORT-default "
                  f"{float(np.median([r['p50_ortdef'] / r['p50_edgekit'] for r in rows])):.2f}x")
    if args.markdown:
        print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
