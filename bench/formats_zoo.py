"""Every zoo model x every format and precision (ONNX, TFLite, TensorRT): does it export, run, and keep accuracy?

    python bench/formats_zoo.py [--models a,b] [--formats onnx,tflite,tensorrt] [--epochs 4]
                                [--markdown] [--json out.json]

For each model: the baseline trained on the default task (cached, 64x64), then
``edgekit.pipeline.benchmark.benchmark`` on it: each format x precision is exported,
loaded in its runtime here (ONNX Runtime, LiteRT) and evaluated on the
1,000-image eval split. The TensorRT rows write the fp16 ONNX and the QDQ int8
ONNX that TensorRT builds its engine from; the int8 one must pass
``check_trt_qdq`` or its export fails (❌). Without TensorRT (this machine) the
engine is not built and the row is ❎; the checked QDQ ONNX is then run in ONNX
Runtime and must match the ONNX int8 accuracy within 0.5 points, counted on the
eval + train images (none of them calibrates; 1,000 eval images alone cannot tell
two int8 models 0.5 points apart). A row is
flagged when an int8 variant loses more than 1 point against its format's fp32.
Latency is not timed here (see bench/int8_speed.py and ``edgekit benchmark``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edgekit import zoo
from edgekit.pipeline.benchmark import FAILED, OK, UNAVAILABLE, benchmark
from edgekit.config import Recipe, TrainSpec, load_device
from edgekit.data import load_task
from edgekit.evaluate import predict_arrays, top1
from edgekit.pipeline import get_baseline
from edgekit.runtime import load_runner

INT8_BUDGET_PP = 1.0
QDQ_BUDGET = 0.005  # TensorRT's QDQ ONNX (run in ORT) vs the ONNX int8, on eval + train images


def _acc(path: Path, x, y) -> float:
    return top1(predict_arrays(load_runner("onnxruntime", path, threads=2).run, x, batch_size=1), y)


def _cell(row: dict, fp32_acc) -> str:
    if row["status"] == OK:
        text = f"{100 * row['accuracy']:.1f}"
        if row["precision"] == "int8" and fp32_acc is not None:
            text += f" ({100 * (row['accuracy'] - fp32_acc):+.1f})"
        return text
    if row["status"] == UNAVAILABLE and row["format"] == "tensorrt":
        if row["precision"] == "int8" and row.get("qdq_ort_accuracy") is not None:
            text = f"❎ checker passed; QDQ in ORT {100 * row['qdq_ort_accuracy']:.1f}"
            if row.get("qdq_vs_int8_pp") is not None:
                text += f" ({row['qdq_vs_int8_pp']:+.2f} vs ONNX int8*)"
            return text
        return "❎ ONNX written, no TensorRT here"
    return f"{row['status']} {(row['reason'] or '')[:60]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    ap.add_argument("--formats", default="onnx,tflite,tensorrt")
    ap.add_argument("--epochs", type=float, default=4, help="baseline training epochs")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table too")
    ap.add_argument("--json", default="", help="write every row to this file")
    args = ap.parse_args()
    formats = [f for f in args.formats.split(",") if f]
    names = [n for n in args.models.split(",") if n] or [s.name for s in zoo.list_models()]
    task = load_task("mnist")
    dev = load_device("desktop-cpu").model_copy(update={"local": False})  # accuracy only: no timing pass
    console = Console(width=220)
    x_eval, y_eval = task.arrays("eval")
    x_train, y_train = task.arrays("train")  # never calibration images: a wider sample for quantizer vs quantizer
    x_held, y_held = np.concatenate([x_eval, x_train]), np.concatenate([y_eval, y_train])
    results, problems = {}, []
    for name in names:
        t0 = time.time()
        model, _ = get_baseline(name, task, recipe=Recipe(name="bench", train=TrainSpec(epochs=args.epochs)))
        with tempfile.TemporaryDirectory(prefix="edgekit-fz-") as d:
            rows = [{"format": v.format, "precision": v.precision, "status": v.status, "accuracy": v.accuracy,
                     "reason": v.error, "path": str(v.path) if v.path else None}
                    for v in benchmark(model.eval(), task=task, device=dev, formats=formats, out_dir=Path(d) / "out")]
            trt = Path(d) / "out" / "model.tensorrt-int8.trt.onnx"
            int8 = next((r for r in rows if r["format"] == "onnx" and r["precision"] == "int8" and r["status"] == OK
                         and r.get("path")), None)
            if trt.is_file():  # the QDQ ONNX TensorRT would build from, run in ONNX Runtime here
                row = next(r for r in rows if r["format"] == "tensorrt" and r["precision"] == "int8")
                row["qdq_ort_accuracy"] = _acc(trt, x_eval, y_eval)
                if int8 is not None:  # quantizer vs quantizer on every image calibration did not see
                    row["qdq_vs_int8_pp"] = 100 * (_acc(trt, x_held, y_held) - _acc(Path(int8["path"]), x_held, y_held))
                    if abs(row["qdq_vs_int8_pp"]) > 100 * QDQ_BUDGET + 1e-9:
                        problems.append(f"{name} tensorrt int8 QDQ ONNX in ORT: {row['qdq_vs_int8_pp']:+.2f} pp vs "
                                        f"ONNX int8 on {len(y_held)} images")
        results[name] = rows
        fp32 = {r["format"]: r["accuracy"] for r in rows if r["precision"] == "fp32" and r["status"] == OK}
        for r in rows:
            if r["status"] == FAILED:
                problems.append(f"{name} {r['format']} {r['precision']}: {r['reason']}")
            elif (r["status"] == OK and r["precision"] == "int8" and r["format"] in fp32
                  and 100 * (fp32[r["format"]] - r["accuracy"]) > INT8_BUDGET_PP):
                problems.append(f"{name} {r['format']} int8: {100 * (fp32[r['format']] - r['accuracy']):.1f} pp "
                                f"below fp32")
        console.print(f"{name}: " + ", ".join(f"{r['format']} {r['precision']} {r['status']}" for r in rows)
                      + f"  [{time.time() - t0:.0f} s]")
    cols = ["model"] + [f"{r['format']} {r['precision']}" for r in next(iter(results.values()))]
    table = Table(title=f"Every format x precision, top-1 % on the eval split ({task.input_shape[-1]}px); "
                        f"int8: change vs the same format's fp32")
    for c in cols:
        table.add_column(c, justify="left" if c == "model" else "right")
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, rows in results.items():
        fp32 = {r["format"]: r["accuracy"] for r in rows if r["precision"] == "fp32" and r["status"] == OK}
        cells = [name] + [_cell(r, fp32.get(r["format"])) for r in rows]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    total = sum(len(rows) for rows in results.values())
    ran = sum(r["status"] == OK for rows in results.values() for r in rows)
    console.print(f"{len(results)} models, {total} rows: {ran} ran here, "
                  f"{sum(r['status'] == UNAVAILABLE for rows in results.values() for r in rows)} not available here, "
                  f"{sum(r['status'] == FAILED for rows in results.values() for r in rows)} failed; "
                  f"{len(problems)} problem(s)")
    for p in problems:
        console.print(f"  ⚠ {p}")
    console.print(f"* TensorRT int8: top-1 difference, QDQ ONNX run in ORT minus ONNX int8, on the {len(y_held)} eval + "
                  f"train images (none used for calibration); one eval split of {len(y_eval)} images is too small "
                  f"to tell two int8 models 0.5 points apart")
    if args.markdown:
        print("\n".join(md))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: [{**r, "info": {}} for r in v] for k, v in results.items()}, f, indent=1, default=str)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
