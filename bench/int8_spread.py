"""How far int8 lands from fp32 across training trajectories: the spread the tests' tolerances are derived from.

A test that checks one run's number (int8 top-1 >= fp32 - 1 point, SQNR > 15 dB) passes on the trajectory it was
tuned on and fails on another machine, whose float rounding trains a slightly different model from the same seed.
This script trains the tests' short baselines under several seeds (a stand-in for other machines' trajectories),
quantizes each the way the tests do, and prints per metric the worst value and mean - 3 std, so that a test
threshold sits outside what trajectories do on their own.

    python bench/int8_spread.py --seeds 0 1 2 3 4 5        # ~15 minutes on 2 cores (fresh cache)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edgekit.comparison import compare_artifacts
from edgekit.config import Recipe, TrainSpec
from edgekit.data import load_task
from edgekit.evaluate import agreement, predict_arrays, top1
from edgekit.export.onnx import export_onnx
from edgekit.export.onnx_int8 import OrtQuantConfig, quantize_onnx
from edgekit.export.tensorrt_qdq import quantize_for_tensorrt
from edgekit.pipeline import get_baseline
from edgekit.runtime import load_runner
from edgekit.config import load_device as _load_device
from edgekit.export.onnx import device_quant_config

# desktop-cpu's int8 settings on this machine (7-bit weights where its int8 kernels saturate)
DESKTOP_INT8 = device_quant_config(_load_device("desktop-cpu"))

SHORT = Recipe(name="test-short", train=TrainSpec(epochs=1))  # the tests' 1-epoch baselines
THREE = Recipe(name="t", train=TrainSpec(epochs=3))  # test_quantize.py's small model


def _logits(path, x):
    return predict_arrays(load_runner("onnxruntime", path, threads=1).run, x, batch_size=1)


def one_seed(seed: int, work: Path) -> dict:
    rows = {}
    for name, task_kw, recipe in (("shufflenetv2-x0.5", {"input_size": 32}, THREE),
                                  ("shufflenetv2", {}, SHORT), ("mobilenetv2", {}, SHORT)):
        task = load_task("mnist", **task_kw)
        model, _ = get_baseline(name, task, recipe=recipe, seed=seed)
        d = work / f"{name}-{seed}"
        d.mkdir()
        fp32 = export_onnx(model, d / "fp32.onnx", task.input_shape)
        calib, _ = task.arrays("calib")
        x, y = task.arrays("eval")
        q = quantize_onnx(fp32, d / "int8.onnx", calib, DESKTOP_INT8)
        ref, got = _logits(fp32, x), _logits(q, x)
        r = {"fp32_top1": top1(ref, y), "int8_drop_pp": 100 * (top1(ref, y) - top1(got, y)),
             "int8_agreement": agreement(ref, got),
             "int8_sqnr_db": compare_artifacts(fp32, q, task=task, per_layer=False, limit=200)["outputs"][0]["sqnr_db"]}
        if name != "shufflenetv2-x0.5":
            trt, _ = quantize_for_tensorrt(fp32, d / "trt.onnx", calib)
            t = _logits(trt, x)
            r.update({"trt_drop_pp": 100 * (top1(ref, y) - top1(t, y)), "trt_agreement": agreement(ref, t)})
        rows[name] = r
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    args = ap.parse_args()
    per_seed = {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.seeds:
            per_seed[s] = one_seed(s, Path(tmp))
            Console().print(f"seed {s}: {per_seed[s]}")
    table = Table(title=f"int8 vs fp32 over {len(args.seeds)} training seeds (eval split, 1,000 MNIST images)")
    for c in ("model", "metric", "per seed", "worst", "mean - 3 std"):
        table.add_column(c)
    for name in per_seed[args.seeds[0]]:
        for metric in per_seed[args.seeds[0]][name]:
            vals = [per_seed[s][name][metric] for s in args.seeds]
            higher_is_worse = metric.endswith("_drop_pp")
            worst = max(vals) if higher_is_worse else min(vals)
            sd = statistics.pstdev(vals)
            bound = statistics.mean(vals) + (3 if higher_is_worse else -3) * sd
            table.add_row(name, metric, " ".join(f"{v:.3f}" for v in vals), f"{worst:.3f}", f"{bound:.3f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
