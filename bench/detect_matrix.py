"""Detectors × recipes × formats on the default detection task, each model's variants timed side by side.

    python bench/detect_matrix.py [--models yolox-nano,ssdlite-mobilenetv3] [--epochs 20] [--out DIR]

For each detector: the baseline trained on ``digits-detect`` (MNIST digits on textures, 128 px, 3,000 training
images; cached like every baseline), then one ``edgekit compress`` run whose recipe exports fp32 and int8 to ONNX
and to TFLite. The pipeline scores every variant with the same NMS and pycocotools' COCO mAP on the 500 eval
images and times all of them round-robin in one run (batch 1, the device profile's threads), so the speedups are
ratios from one run. Rows the toolkit cannot make yet (prune50 and edge for detectors) are listed as such, never
filled in. Results: a rich table on the terminal and ``detect-matrix.{txt,json}`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgekit.config import Recipe, TrainSpec, VariantSpec, load_device
from edgekit.pipeline.main import compress

NOT_YET = {"prune50": "edgekit does not prune detectors yet (issue #30)",
           "edge": "the edge recipe prunes, which detectors do not take yet (issue #30)"}


def recipe(epochs: float) -> Recipe:
    return Recipe(name="detect-matrix", train=TrainSpec(epochs=epochs), accuracy_budget_pp=1.0, variants=[
        VariantSpec(format="onnx", precision="fp32"), VariantSpec(format="onnx", precision="int8"),
        VariantSpec(format="tflite", precision="fp32"), VariantSpec(format="tflite", precision="int8")])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="yolox-nano,ssdlite-mobilenetv3")
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--device", default="desktop-cpu")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per variant (round-robin)")
    ap.add_argument("--out", default="bench/results/detect_matrix")
    args = ap.parse_args()
    dev = load_device(args.device)
    rows = []
    for name in [n for n in args.models.split(",") if n]:
        with tempfile.TemporaryDirectory() as tmp:
            r = compress(name, recipe=recipe(args.epochs), device=dev, out=Path(tmp) / "run", runs=args.runs)
        rep = r.report
        for v in rep["variants"]:
            lat = v.get("latency_ms") or {}
            rows.append({"model": name, "recipe": "int8" if v["precision"] == "int8" else "fp32",
                         "format": v["format"], "status": v["status"], "error": v.get("error"),
                         "map": (v.get("metrics") or {}).get("map"), "map50": (v.get("metrics") or {}).get("map50"),
                         "map_vs_fp32": v.get("agreement"), "p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"),
                         "speedup": v.get("speedup"), "threads": lat.get("threads"),
                         "runtime": v.get("runtime"), "config": (v.get("details") or {}).get("quantization", {})
                         .get("config")})
        for rec, why in NOT_YET.items():
            rows.append({"model": name, "recipe": rec, "format": "onnx/tflite", "status": "not built", "error": why})
        base = (rep.get("model_info") or {}).get("baseline") or {}
        print(f"{name}: baseline {json.dumps({k: base.get(k) for k in ('source', 'cached', 'epochs', 'fit')})}",
              file=sys.stderr)
    table = Table(title=f"detectors on digits-detect (500 eval images, 128 px): {platform.machine()}, "
                        f"{dev.resolved_threads()} threads, one compress run per model", header_style="bold")
    for c in ("model", "recipe", "format", "mAP", "mAP50", "mAP vs fp32", "p50 ms", "p90 ms", "speedup", "status"):
        table.add_column(c)
    pct = lambda x: "—" if x is None else f"{100 * x:.1f}"  # noqa: E731
    for row in rows:
        table.add_row(row["model"], row["recipe"], row["format"], pct(row.get("map")), pct(row.get("map50")),
                      pct(row.get("map_vs_fp32")), "—" if row.get("p50_ms") is None else f"{row['p50_ms']:.2f}",
                      "—" if row.get("p90_ms") is None else f"{row['p90_ms']:.2f}",
                      "—" if row.get("speedup") is None else f"{row['speedup']:.2f}x",
                      row["status"] + (f": {row['error']}" if row.get("error") else ""))
    console = Console(record=True, width=200)
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "detect-matrix.txt").write_text(console.export_text())
    (out / "detect-matrix.json").write_text(json.dumps({"rows": rows, "epochs": args.epochs, "device": dev.name},
                                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
