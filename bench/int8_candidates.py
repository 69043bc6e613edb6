"""Every activation range method (x op scope, x bias correction) per model: what each does to int8's closeness to fp32.

    python bench/int8_candidates.py --models efficientnet-lite0,efficientnet-lite1,efficientnet-lite2
    python bench/int8_candidates.py --models efficientnetv2-b0,mobilenetv3-large --scopes all,conv-only
    python bench/int8_candidates.py --models efficientnet-lite2 --methods percentile,mse --bias-correction on \
        --aids none,cle,adaround,cle+adaround

Methods: ORT's minmax, entropy and percentile, and edgekit's mse (per tensor, the range of least expected squared
error) and mean-minmax (the mean of each image's extremes). ``efficientnet-lite0/1/2`` are the pretrained
ImageNet models at their native sizes judged on the photos task (80 calibration and 80 evaluation crops from
different photos, each model's own preprocessing; agreement with fp32, no labels); other names are zoo baselines
trained on MNIST (cached, as ``edgekit compress`` trains them), judged on top-1 on the 1,000 eval images. The
column ``calib SQNR`` is what ``calibration: auto`` ranks by (marked *: the best of the methods auto tries, ``+``:
the best of every row); evaluation images are never seen by the choice.
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

from rich.console import Console
from rich.table import Table

from edgekit.config import Recipe, TrainSpec, load_device
from edgekit.data import load_task
from edgekit.evaluate import agreement, predict_arrays, sqnr_db, top1, topk_overlap
from edgekit.export.onnx import device_quant_config, export_onnx
from edgekit.export.onnx_int8 import AUTO_CANDIDATES, CALIBRATIONS, CONV_ONLY, candidate_key, quantize_onnx
from edgekit.runtime import load_runner

PRETRAINED = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
SCOPES = {"all": None, "conv-only": CONV_ONLY}
# Aids on top of a range method, '+'-joined in --aids: cross-layer equalization, AdaRound, per-channel weights on
# depthwise convs only.
AIDS = {"cle": "equalize", "adaround": "adaround", "dw-per-channel": "per_channel_grouped_only"}


def _key(cfg) -> str:
    return candidate_key(cfg) + (" dw-per-channel" if cfg.per_channel_grouped_only else "")


def _aids(spec: str) -> dict:
    return {} if spec == "none" else {AIDS[a]: True for a in spec.split("+")}


def _logits(path, x):
    return predict_arrays(load_runner("onnxruntime", path, threads=1).run, x, batch_size=1)


def _model_and_task(name: str, epochs: float, input_size: int):
    if name in PRETRAINED:
        from edgekit import zoo
        from edgekit.data import Preprocess

        model = zoo.create(name, pretrained=True).eval()
        return model, load_task("photos", preprocess=Preprocess.for_model(model)), False
    from edgekit.pipeline import get_baseline

    task = load_task("mnist", input_size=input_size)
    model, _ = get_baseline(name, task, recipe=Recipe(name="bench", train=TrainSpec(epochs=epochs)))
    return model, task, True


def bench_model(name: str, args, base, work: Path) -> dict:
    model, task, labelled = _model_and_task(name, args.epochs, args.input_size)
    calib, _ = task.arrays("calib", limit=args.calib)
    x, y = task.arrays("eval")
    fp32 = export_onnx(model, work / "fp32.onnx", (1, *calib.shape[1:]))
    ref, cref = _logits(fp32, x), _logits(fp32, calib)
    rows = []
    for method in args.methods:
        for scope in args.scopes:
            for bc, aids in ((b, a) for b in args.bias_correction for a in args.aids):
                cfg = replace(base, calibration=method, op_types=list(SCOPES[scope]) if SCOPES[scope] else None,
                              bias_correction=bc, **_aids(aids))
                t0 = time.perf_counter()
                try:
                    p = quantize_onnx(fp32, work / "q.onnx", calib, cfg)
                except (ValueError, RuntimeError) as exc:  # an ORT calibrator that cannot handle a tensor
                    rows.append({"candidate": _key(cfg), "failed": str(exc).splitlines()[0][:120]})
                    continue
                seconds = time.perf_counter() - t0
                out = _logits(p, x)
                row = {"candidate": _key(cfg), "method": method, "bias_correction": bc, "aids": aids,
                       "calib_sqnr_db": round(sqnr_db(cref, _logits(p, calib)), 2),
                       "eval_sqnr_db": round(sqnr_db(ref, out), 2), "eval_agreement": round(agreement(ref, out), 4),
                       "eval_top5_overlap": round(topk_overlap(ref, out) or 0.0, 4), "quantize_s": round(seconds, 1)}
                if labelled:
                    row["eval_top1"], row["fp32_top1"] = round(top1(out, y), 4), round(top1(ref, y), 4)
                rows.append(row)
    ok = [r for r in rows if "failed" not in r]
    auto = [r for r in ok if r["method"] in AUTO_CANDIDATES]
    return {"model": name, "calib_images": len(calib), "eval_images": len(x), "input": list(calib.shape[1:]),
            "labelled": labelled, "rows": rows,
            "best_of_auto_methods": max(auto, key=lambda r: r["calib_sqnr_db"])["candidate"] if auto else None,
            "best_of_all": max(ok, key=lambda r: r["calib_sqnr_db"])["candidate"] if ok else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(PRETRAINED))
    ap.add_argument("--methods", default=",".join(CALIBRATIONS))
    ap.add_argument("--scopes", default="all", help="comma-separated: all, conv-only")
    ap.add_argument("--bias-correction", default="off,on", help="off, on or off,on")
    ap.add_argument("--aids", default="none", help=f"comma-separated, each none or a '+'-joined set of "
                    f"{', '.join(AIDS)}")
    ap.add_argument("--epochs", type=float, default=4, help="training epochs of MNIST baselines")
    ap.add_argument("--input-size", type=int, default=64, help="MNIST baselines' input size")
    ap.add_argument("--calib", type=int, default=256, help="calibration images at most (the photos task has 80)")
    ap.add_argument("--device", default="desktop-cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.methods = args.methods.split(",")
    args.scopes = args.scopes.split(",")
    args.bias_correction = [v == "on" for v in args.bias_correction.split(",")]
    args.aids = args.aids.split(",")
    bad = [m for m in args.methods if m not in CALIBRATIONS] + [s for s in args.scopes if s not in SCOPES] \
        + [a for spec in args.aids if spec != "none" for a in spec.split("+") if a not in AIDS]
    if bad:
        ap.error(f"unknown method, scope or aid: {', '.join(bad)}")
    base = device_quant_config(load_device(args.device))
    hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
    results = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as d:
            results.append(bench_model(name, args, base, Path(d)))
    if args.json:
        args.json.write_text(json.dumps({"hardware": hardware, "load_after": round(os.getloadavg()[0], 2),
                                         "config": base.label(), "results": results}, indent=1))
    table = Table(title=f"int8 activation range methods ({base.label()}; {hardware}; * best of auto's methods "
                        f"{'/'.join(AUTO_CANDIDATES)} by calib SQNR, + best of all)")
    for c in ("model", "candidate", "calib SQNR dB", "eval SQNR dB", "eval agreement", "top-5 overlap",
              "eval top-1 (fp32)", "quantize s"):
        table.add_column(c, justify="left" if c in ("model", "candidate") else "right")
    for r in results:
        for i, row in enumerate(r["rows"]):
            last = i == len(r["rows"]) - 1
            if "failed" in row:
                table.add_row(r["model"], row["candidate"], f"failed: {row['failed']}", "", "", "", "", "",
                              end_section=last)
                continue
            mark = (" *" if row["candidate"] == r["best_of_auto_methods"] else "") + \
                (" +" if row["candidate"] == r["best_of_all"] else "")
            t1 = f"{100 * row['eval_top1']:.1f} ({100 * row['fp32_top1']:.1f})" if "eval_top1" in row else "-"
            table.add_row(r["model"], row["candidate"] + mark, f"{row['calib_sqnr_db']:.2f}",
                          f"{row['eval_sqnr_db']:.2f}", f"{100 * row['eval_agreement']:.1f}%",
                          f"{100 * row['eval_top5_overlap']:.1f}%", t1, f"{row['quantize_s']}", end_section=last)
    Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
