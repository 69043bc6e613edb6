"""How much of post-training int8's loss QAT wins back, and how much of that the training itself does.

    python bench/qat_recovery.py --models efficientnet-b0,mobilenetv3-large --input-size 32 --epochs 4 \
        --qat-epochs 1 [--json out.json]

Per model, two ``edgekit.compress`` runs on the labelled default task (MNIST) from the same cached baseline:
- ``ptq``: the int8 recipe (ONNX int8 with ``calibration: auto``, accuracy only: no latency search) and TFLite
  int8 (LiteRT's post-training quantizer);
- ``qat``: a ``qat`` step (fake quantization as the device's int8 computes it, initial ranges from the calibration
  split, distillation from the fp32 baseline), exported to ONNX int8 and TFLite int8 with the learned scales.

Top-1 on the 1,000 eval images neither run calibrates or trains on. "recovered" is the share of PTQ's loss that
QAT wins back, (qat - ptq) / (fp32 - ptq), per format. The step records the fake-quant model's top-1 *before*
training (post-training quantization in QAT's own scheme) and after, so "by training" is the share of that
starting point's loss the epochs win back, (after - before) / (fp32 - before): where the QAT scheme alone already
beats ORT's PTQ, the first figure says nothing about training.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

import edgekit
from edgekit.config import Recipe, StepSpec, TrainSpec, VariantSpec


def _recipes(epochs: float, qat_epochs: float, qat_lr):
    train = TrainSpec(epochs=epochs)
    ptq = Recipe(name="ptq", train=train, variants=[
        VariantSpec(format="onnx", precision="fp32"),
        VariantSpec(format="onnx", precision="int8", options={"calibration": "auto", "search": "none"}),
        VariantSpec(format="tflite", precision="int8")])
    qat_params = {"epochs": qat_epochs, **({"lr": qat_lr} if qat_lr else {})}
    qat = Recipe(name="qat", train=train, steps=[StepSpec(kind="qat", params=qat_params)], variants=[
        VariantSpec(format="onnx", precision="int8"), VariantSpec(format="tflite", precision="int8")])
    return ptq, qat


def _acc(report: dict, fmt: str, precision: str):
    for v in report["variants"]:
        if v["format"] == fmt and v["precision"] == precision and v.get("status") == "ok":
            return v.get("accuracy")
    return None


def _share(won: float, lost: float):
    return None if lost <= 0 else won / lost


def bench_model(name: str, args, work: Path) -> dict:
    ptq_recipe, qat_recipe = _recipes(args.epochs, args.qat_epochs, args.qat_lr)
    common = dict(input_size=args.input_size, runs=10, seed=args.seed)
    ptq = edgekit.compress(name, ptq_recipe, out=work / "ptq", **common).to_json()
    qat = edgekit.compress(name, qat_recipe, out=work / "qat", **common).to_json()
    step = next(s for s in qat["steps"] if s["kind"] == "qat")
    fp32 = _acc(ptq, "onnx", "fp32")
    row = {"model": name, "input_size": args.input_size, "baseline_epochs": args.epochs, "qat_epochs": args.qat_epochs,
           "qat_lr": step.get("lr"), "fp32": fp32, "qat_before": step.get("acc_before"),
           "qat_after": step.get("acc_after"), "seconds": {"ptq": ptq.get("seconds"), "qat": qat.get("seconds")}}
    for fmt in ("onnx", "tflite"):
        p, q = _acc(ptq, fmt, "int8"), _acc(qat, fmt, "int8")
        row[f"ptq_{fmt}"], row[f"qat_{fmt}"] = p, q
        if None not in (fp32, p, q):
            row[f"recovered_{fmt}"] = _share(q - p, fp32 - p)
    if None not in (fp32, row["qat_before"], row["qat_after"]):
        row["recovered_by_training"] = _share(row["qat_after"] - row["qat_before"], fp32 - row["qat_before"])
    return row


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def _share_s(v):
    return "-" if v is None else f"{100 * v:.0f}%"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="efficientnet-b0,mobilenetv3-large")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--epochs", type=float, default=4, help="baseline training epochs")
    ap.add_argument("--qat-epochs", type=float, default=1)
    ap.add_argument("--qat-lr", type=float, default=None, help="default: the qat step's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as d:
            rows.append(bench_model(name, args, Path(d)))
    if args.json:
        args.json.write_text(json.dumps({"hardware": hardware, "load_after": round(os.getloadavg()[0], 2),
                                         "rows": rows}, indent=1))
    table = Table(title=f"QAT vs PTQ, top-1 % on MNIST eval ({args.input_size} px; {hardware})")
    for c in ("model", "fp32", "PTQ onnx", "PTQ tflite", "QAT fake-quant before -> after", "QAT onnx", "QAT tflite",
              "recovered onnx", "recovered tflite", "by training"):
        table.add_column(c, justify="left" if c == "model" else "right")
    for r in rows:
        table.add_row(r["model"], _pct(r["fp32"]), _pct(r["ptq_onnx"]), _pct(r["ptq_tflite"]),
                      f"{_pct(r['qat_before'])} -> {_pct(r['qat_after'])}", _pct(r["qat_onnx"]), _pct(r["qat_tflite"]),
                      _share_s(r.get("recovered_onnx")), _share_s(r.get("recovered_tflite")),
                      _share_s(r.get("recovered_by_training")))
    Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
