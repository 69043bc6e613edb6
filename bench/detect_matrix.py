"""Detectors × recipes × formats on the default detection task, each run's variants timed side by side.

    python bench/detect_matrix.py [--models yolox-nano,ssdlite-mobilenetv3] [--epochs 20] [--distill-epochs N]

For each detector: the baseline trained on ``digits-detect`` (MNIST digits on textures, 128 px, 3,000 training
images; cached like every baseline), then two ``edgekit compress`` runs. The first exports fp32 and int8 to ONNX
and TFLite; the second runs the steps of the shipped ``edge`` recipe (prune50's: blocks, then channels to 50% of
the MACs with fine-tunes, then distillation from the baseline; ``--distill-epochs`` lengthens the distillation)
and exports the pruned model as fp32 (the prune50 rows) and int8 (the edge rows) to both formats. The pipeline
scores every variant with the same NMS and pycocotools' COCO mAP on the 500 eval images and times each run's
variants round-robin with its own fp32 baseline (batch 1, the device profile's threads), so every speedup is a
ratio from one run. Results: a rich table on the terminal and ``detect-matrix.{txt,json}`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from rich.console import Console
from rich.table import Table

from edgekit.config import Recipe, TrainSpec, VariantSpec, load_device, load_recipe
from edgekit.pipeline.main import compress

FORMATS = [VariantSpec(format=f, precision=p) for f in ("onnx", "tflite") for p in ("fp32", "int8")]


def recipes(epochs: float, distill_epochs: Optional[float]) -> List[Tuple[str, Recipe]]:
    steps = [s.model_copy(deep=True) for s in load_recipe("edge").steps]
    if distill_epochs is not None:
        for s in steps:
            if s.kind == "distill":
                s.params["epochs"] = distill_epochs
    train = TrainSpec(epochs=epochs)
    return [("plain", Recipe(name="detect-matrix", train=train, accuracy_budget_pp=1.0, variants=FORMATS)),
            ("pruned", Recipe(name="detect-matrix-pruned", train=train, steps=steps, accuracy_budget_pp=2.0,
                              variants=FORMATS))]


def row_recipe(kind: str, v: dict) -> str:
    if kind == "plain":
        return "int8" if v["precision"] == "int8" else "fp32"
    if v["name"] == "fp32":  # the run's own baseline, timed beside the pruned variants
        return "fp32 (pruned run)"
    return "edge" if v["precision"] == "int8" else "prune50"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="yolox-nano,ssdlite-mobilenetv3")
    ap.add_argument("--epochs", type=float, default=20)
    ap.add_argument("--distill-epochs", type=float, default=None, help="instead of the edge recipe's")
    ap.add_argument("--device", default="desktop-cpu")
    ap.add_argument("--runs", type=int, default=200, help="timed runs per variant (round-robin)")
    ap.add_argument("--out", default="bench/results/detect_matrix")
    args = ap.parse_args()
    dev = load_device(args.device)
    rows, runs = [], []
    for name in [n for n in args.models.split(",") if n]:
        for kind, rec in recipes(args.epochs, args.distill_epochs):
            with tempfile.TemporaryDirectory() as tmp:
                r = compress(name, recipe=rec, device=dev, out=Path(tmp) / "run", runs=args.runs)
            rep = r.report
            for v in rep["variants"]:
                lat = v.get("latency_ms") or {}
                rows.append({"model": name, "recipe": row_recipe(kind, v), "format": v["format"],
                             "status": v["status"], "error": v.get("error"), "macs": v.get("macs"),
                             "map": (v.get("metrics") or {}).get("map"),
                             "map50": (v.get("metrics") or {}).get("map50"),
                             "map_vs_fp32": v.get("agreement"), "p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"),
                             "speedup": v.get("speedup"), "threads": lat.get("threads"),
                             "runtime": v.get("runtime"), "config": (v.get("details") or {}).get("quantization", {})
                             .get("config")})
            base = (rep.get("model_info") or {}).get("baseline") or {}
            runs.append({"model": name, "run": kind, "steps": rep.get("steps"), "notes": rep.get("notes"),
                         "baseline": {k: base.get(k) for k in ("source", "cached", "epochs", "fit")}})
            print(f"{name} {kind}: baseline {json.dumps(runs[-1]['baseline'])}", file=sys.stderr)
    table = Table(title=f"detectors on digits-detect (500 eval images, 128 px): {platform.machine()}, "
                        f"{dev.resolved_threads()} threads, one compress run per model", header_style="bold")
    for c in ("model", "recipe", "format", "MMACs", "mAP", "mAP50", "mAP vs fp32", "p50 ms", "p90 ms", "speedup",
              "status"):
        table.add_column(c)
    pct = lambda x: "—" if x is None else f"{100 * x:.1f}"  # noqa: E731
    for row in rows:
        table.add_row(row["model"], row["recipe"], row["format"],
                      "—" if row.get("macs") is None else f"{row['macs'] / 1e6:.1f}", pct(row.get("map")),
                      pct(row.get("map50")),
                      pct(row.get("map_vs_fp32")), "—" if row.get("p50_ms") is None else f"{row['p50_ms']:.2f}",
                      "—" if row.get("p90_ms") is None else f"{row['p90_ms']:.2f}",
                      "—" if row.get("speedup") is None else f"{row['speedup']:.2f}x",
                      row["status"] + (f": {row['error']}" if row.get("error") else ""))
    console = Console(record=True, width=200)
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "detect-matrix.txt").write_text(console.export_text())
    (out / "detect-matrix.json").write_text(json.dumps({"rows": rows, "runs": runs, "epochs": args.epochs,
                                                        "distill_epochs": args.distill_epochs, "device": dev.name},
                                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
