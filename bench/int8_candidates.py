"""Every int8 auto candidate (calibration x op scope) per model: eval top-1 and the calibration-split SQNR that picks.

    python bench/int8_candidates.py --models efficientnetv2-b0,mobilenetv3-large [--epochs 4] [--input-size 64]

Shows why ``calibration: auto`` tries the conv-only scope: the candidate with the best logits SQNR on the
calibration split (marked *) is what the int8 recipe ships; eval top-1 is measured on the 1,000 eval images
that the choice never sees. Baselines come from the cache (trained once, as ``edgekit compress`` does).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgekit.export.onnx_int8 import AUTO_CANDIDATES, AUTO_SCOPES, OrtQuantConfig, quantize_onnx, scope_label
from edgekit.config import Recipe, TrainSpec, load_device
from edgekit.data import load_task
from edgekit.evaluate import agreement, predict_arrays, sqnr_db, top1
from edgekit.export.onnx import export_onnx
from edgekit.pipeline import get_baseline
from edgekit.runtime import load_runner


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated zoo names")
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--device", default="desktop-cpu")
    args = ap.parse_args()
    q = load_device(args.device).quantization
    base = OrtQuantConfig(activation_type=q.activation_type, weight_type=q.weight_type, per_channel=q.per_channel)
    task = load_task("mnist", input_size=args.input_size)
    calib, _ = task.arrays("calib")
    x, y = task.arrays("eval")
    table = Table(title=f"int8 auto candidates ({args.input_size} px, {args.epochs:g}-epoch baselines; * = chosen)")
    for c in ("model", "candidate", "calib SQNR dB", "top-1 fp32", "top-1 int8", "Δ pp", "agreement"):
        table.add_column(c, justify="left" if c in ("model", "candidate") else "right")
    for name in args.models.split(","):
        model, _ = get_baseline(name, task, recipe=Recipe(name="bench", train=TrainSpec(epochs=args.epochs)))
        with tempfile.TemporaryDirectory() as d:
            fp32 = export_onnx(model, Path(d) / "fp32.onnx", task.input_shape)
            run = load_runner("onnxruntime", fp32, threads=1).run
            ref, cref = predict_arrays(run, x, batch_size=1), predict_arrays(run, calib, batch_size=1)
            rows = []
            for method in AUTO_CANDIDATES:
                for ops in AUTO_SCOPES:
                    cfg = replace(base, calibration=method, op_types=list(ops) if ops else None)
                    p = quantize_onnx(fp32, Path(d) / "q.onnx", calib, cfg)
                    r = load_runner("onnxruntime", p, threads=1).run
                    out = predict_arrays(r, x, batch_size=1)
                    rows.append((method + scope_label(ops), sqnr_db(cref, predict_arrays(r, calib, batch_size=1)),
                                 top1(out, y), agreement(ref, out)))
        best = max(rows, key=lambda r: r[1])
        for r in rows:
            table.add_row(name, r[0] + (" *" if r is best else ""), f"{r[1]:.2f}", f"{100 * top1(ref, y):.1f}",
                          f"{100 * r[2]:.1f}", f"{100 * (r[2] - top1(ref, y)):+.1f}", f"{100 * r[3]:.1f}%")
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
