"""Cross-layer equalization (CLE), AdaRound and bias correction per model: does each help int8, what does auto keep?

    python bench/int8_ptq.py --models efficientnet-lite0 [--json out.json]
    python bench/int8_ptq.py --models mobilenetv2,shufflenetv2 --epochs 1

``efficientnet-lite0`` is the pretrained ImageNet model at 224 px judged on the photos task (80 calibration,
80 eval images, its own preprocessing; agreement with fp32, no labels); other names are zoo baselines trained on
MNIST (cached). Per model and calibration method (minmax, percentile; every op ORT quantizes): plain, +CLE,
+bias correction, +both, +AdaRound, +AdaRound +bias correction: logits SQNR vs fp32 on the calibration split
(what auto picks by) and on the eval split, and top-1 agreement with fp32 on the eval split. "fp32 CLE" is the
SQNR of the equalized fp32 graph vs the original (inf where nothing changed; AIMET's ReLU6 -> ReLU, which edgekit
does not do, is shown beside). AdaRound rows also give its own seconds and the median over layers of its
layer-output MSE over round-to-nearest's. Then ``calibration: auto`` with all three left to it: its choice and
the seconds its extra candidates took.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edgekit.config import Recipe, TrainSpec, load_device
from edgekit.data import load_task
from edgekit.evaluate import agreement, sqnr_db
from edgekit.export.onnx import device_quant_config, export_onnx
from edgekit.export.onnx_int8 import candidate_key, quantize_onnx, quantize_onnx_auto
from edgekit.export import adaround as adaround_module
from edgekit.export.ptq import equalize
from edgekit.runtime import load_runner


def _logits(path, x):
    run = load_runner("onnxruntime", path, threads=1).run
    return np.concatenate([run(x[i:i + 1]) for i in range(len(x))])


def _model_and_task(name: str, epochs: float):
    if name == "efficientnet-lite0":
        from edgekit import zoo
        from edgekit.data import Preprocess

        model = zoo.create(name, pretrained=True).eval()
        task = load_task("photos", preprocess=Preprocess.for_model(model))
        return model, task, 80
    from edgekit.pipeline import get_baseline

    task = load_task("mnist")
    model, _ = get_baseline(name, task, recipe=Recipe(name="bench", train=TrainSpec(epochs=epochs)))
    return model, task, 256


def bench_model(name: str, epochs: float, base, work: Path) -> dict:
    model, task, n = _model_and_task(name, epochs)
    calib, _ = task.arrays("calib", limit=n)
    x, _ = task.arrays("eval", limit=n if name == "efficientnet-lite0" else None)
    fp32 = export_onnx(model, work / "fp32.onnx", (1, *calib.shape[1:]))
    ref, cref = _logits(fp32, x), _logits(fp32, calib)
    cle = equalize(fp32, work / "cle.onnx")
    relu6 = equalize(fp32, work / "cle-relu6.onnx", relu6=True)  # AIMET's ReLU6 -> ReLU, for the record
    relu6["fp32_sqnr_db"] = round(sqnr_db(ref, _logits(work / "cle-relu6.onnx", x)), 2)
    rows = []
    adarounds: list = []  # what each AdaRound call inside quantize_onnx reported
    learn = adaround_module.adaround

    def recorded(*args, **kwargs):
        adarounds.append(learn(*args, **kwargs))
        return adarounds[-1]

    adaround_module.adaround = recorded
    try:
        for method in ("minmax", "percentile"):
            for eq, bc, ada in ((False, False, False), (True, False, False), (False, True, False), (True, True, False),
                                (False, False, True), (False, True, True)):
                cfg = replace(base, calibration=method, equalize=eq, bias_correction=bc, adaround=ada)
                t0 = time.perf_counter()
                p = quantize_onnx(fp32, work / "q.onnx", calib, cfg)
                seconds = time.perf_counter() - t0
                out = _logits(p, x)
                row = {"candidate": candidate_key(cfg), "calib_sqnr_db": round(sqnr_db(cref, _logits(p, calib)), 2),
                       "eval_sqnr_db": round(sqnr_db(ref, out), 2), "eval_agreement": round(agreement(ref, out), 4),
                       "quantize_s": round(seconds, 1)}
                if ada:
                    row["adaround"] = {k: v for k, v in adarounds[-1].items() if k != "per_layer"}
                rows.append(row)
        t0 = time.perf_counter()
        _, chosen, details = quantize_onnx_auto(fp32, work / "auto.onnx", calib, base, equalize=None,
                                                bias_correction=None, adaround=None)
    finally:
        adaround_module.adaround = learn
    auto_s = time.perf_counter() - t0
    return {"model": name, "calib_images": len(calib), "eval_images": len(x), "input": list(calib.shape[1:]),
            "cle": cle, "cle_relu6_to_relu": relu6,
            "fp32_cle_sqnr_db": round(sqnr_db(ref, _logits(work / "cle.onnx", x)), 2), "rows": rows,
            "auto": {"chosen": candidate_key(chosen), "calibration_sqnr_db": details["calibration_sqnr_db"],
                     "total_s": round(auto_s, 1), "ptq_extra_s": details.get("ptq_search_seconds")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="efficientnet-lite0")
    ap.add_argument("--epochs", type=float, default=1, help="training epochs of MNIST baselines")
    ap.add_argument("--device", default="desktop-cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    base = device_quant_config(load_device(args.device))
    hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
    results = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as d:
            results.append(bench_model(name, args.epochs, base, Path(d)))
    if args.json:
        args.json.write_text(json.dumps({"hardware": hardware, "load_after": round(os.getloadavg()[0], 2),
                                         "config": base.label(), "results": results}, indent=1))
    table = Table(title=f"int8 CLE / AdaRound / bias correction ({base.label()}; {hardware}; * = auto's choice)")
    for c in ("model", "candidate", "calib SQNR dB", "eval SQNR dB", "eval agreement", "quantize s",
              "AdaRound s", "layer MSE ratio"):
        table.add_column(c, justify="left" if c in ("model", "candidate") else "right")
    for r in results:
        for row in r["rows"]:
            star = " *" if row["candidate"] == r["auto"]["chosen"] else ""
            a = row.get("adaround", {})
            table.add_row(r["model"], row["candidate"] + star, f"{row['calib_sqnr_db']:.2f}",
                          f"{row['eval_sqnr_db']:.2f}", f"{100 * row['eval_agreement']:.1f}%", f"{row['quantize_s']}",
                          str(a.get("seconds", "")), str(a.get("median_mse_ratio", "")))
        c = r["cle"]
        r6 = r["cle_relu6_to_relu"]
        table.add_row(r["model"], f"CLE: {c['pairs']} pairs, spread {c.get('spread_before')}->{c.get('spread_after')}"
                      f", fp32 {r['fp32_cle_sqnr_db']} dB; with ReLU6->ReLU (not used): {r6['pairs']} pairs, "
                      f"fp32 {r6['fp32_sqnr_db']} dB; "
                      f"auto {r['auto']['total_s']} s ({r['auto']['ptq_extra_s']} s of it CLE/AdaRound/BC)", "", "",
                      "", "", "", "", end_section=True)
    Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
