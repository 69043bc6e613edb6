"""Two shortcuts edgekit takes through its converters: the time each saves, and proof the files do not change.

    python bench/convert_speed.py [--models condensenet-small,shufflenetv2,igcv3] [--size 32] [--only tflite|ort]

1. TFLite int8. ``edgekit.export.tflite.convert_int8`` runs ``convert_pt2e`` without torchao's QAT conv-BN folding pass
(``_without_qat_conv_bn_fold``): a post-training graph has no QAT patterns, yet the pass torch-exports its 216
pattern graphs whenever a BatchNorm is left after ``prepare_pt2e`` (pre-activation BN-ReLU-conv). For each model
this converts the same untrained network both ways (``EDGEKIT_TFLITE_QAT_FOLD=1`` restores the pass), and
prints the BatchNorms ``prepare_pt2e`` left, both times, their ratio and whether the two .tflite files are
byte-identical. ``condensenet-small`` is the two-stage CondenseNet ``tests/test_tflite.py`` converts.

2. ONNX int8. ``edgekit.export.onnx_int8.memoised_weight_params`` remembers ORT's per-channel weight scales
across ``quantize_static`` calls (``EDGEKIT_ORT_PARAMS_MEMO=0`` turns it off). For each model this runs
``quantize_onnx_auto`` (the four ``calibration: auto`` candidates) and ``quantize_for_tensorrt`` (its four)
from a cold memo, both ways, on 64 random calibration images, and compares the files.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from edgekit import zoo
from edgekit.export import onnx_int8 as q
from edgekit.export.onnx import export_onnx
from edgekit.export.tensorrt import quantize_for_tensorrt
from edgekit.export.tflite import convert_int8


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "condensenet-small":
        from edgekit.zoo.own.condensenet import CondenseNet

        return CondenseNet(10, stages=(2, 2), growth=(8, 16)).eval()
    return zoo.create(name, num_classes=10, in_chans=3).eval()


def bn_left_after_prepare(model: torch.nn.Module, shape) -> int:
    from litert_torch.quantize import pt2e_quantizer as pq
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.utils import _is_bn_node

    from edgekit.export.tflite import _prepare

    module, sample = _prepare(model, shape, nhwc=False)  # the export form convert_int8 converts
    quantizer = pq.PT2EQuantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=True))
    graph = torch.export.export(module, (sample,)).module()
    return sum(_is_bn_node(n) for n in prepare_pt2e(graph, quantizer).graph.nodes)


def tflite_table(models, shape) -> Table:
    calib = np.random.RandomState(0).rand(16, *shape[1:]).astype(np.float32)
    table = Table(title=f"TFLite PT2E int8 conversion, {shape[-1]} px, untrained weights")
    for col in ("model", "BN left after prepare", "with the QAT fold s", "without s", "ratio", "same file"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
    for name in models:
        times, files = {}, {}
        for flag in ("1", "0"):
            os.environ["EDGEKIT_TFLITE_QAT_FOLD"] = flag
            path = Path(tempfile.mkdtemp()) / f"{name}.tflite"
            t0 = time.perf_counter()
            try:
                convert_int8(build(name), path, shape, calib)
                files[flag] = path.read_bytes()
            except RuntimeError as exc:
                files[flag] = f"fails: {str(exc)[:80]}"
            times[flag] = time.perf_counter() - t0
        os.environ.pop("EDGEKIT_TFLITE_QAT_FOLD")
        same = files["1"] == files["0"]
        table.add_row(name, str(bn_left_after_prepare(build(name), shape)), f"{times['1']:.1f}", f"{times['0']:.1f}",
                      f"{times['1'] / times['0']:.2f}x",
                      ("yes" if same else "NO") + (f" (both {files['1']})" if isinstance(files["1"], str) else ""))
    return table


def ort_table(models, shape) -> Table:
    calib = np.random.RandomState(0).rand(64, *shape[1:]).astype(np.float32)
    table = Table(title=f"ONNX Runtime int8, four candidates each, {shape[-1]} px, untrained weights")
    for col in ("model", "quantizer", "ORT computes s", "remembered s", "ratio", "same file"):
        table.add_column(col, justify="left" if col in ("model", "quantizer") else "right", no_wrap=True)
    for name in models:
        if name == "condensenet-small":
            continue
        fp32 = export_onnx(build(name), Path(tempfile.mkdtemp()) / f"{name}.onnx", shape)
        runs = {"calibration: auto": lambda out: q.quantize_onnx_auto(fp32, out, calib, q.OrtQuantConfig())[0],
                "tensorrt auto": lambda out: quantize_for_tensorrt(fp32, out, calib)[0]}
        for label, run in runs.items():
            times, files = {}, {}
            for flag in ("0", "1"):
                os.environ["EDGEKIT_ORT_PARAMS_MEMO"] = flag
                q._WEIGHT_PARAMS.clear()
                t0 = time.perf_counter()
                files[flag] = run(Path(tempfile.mkdtemp()) / "q.onnx").read_bytes()
                times[flag] = time.perf_counter() - t0
            os.environ.pop("EDGEKIT_ORT_PARAMS_MEMO")
            table.add_row(name, label, f"{times['0']:.1f}", f"{times['1']:.1f}", f"{times['0'] / times['1']:.2f}x",
                          "yes" if files["0"] == files["1"] else "NO")
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="condensenet-small,shufflenetv2,igcv3")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--only", choices=("tflite", "ort"))
    args = ap.parse_args(argv)
    shape, models = (1, 3, args.size, args.size), args.models.split(",")
    console = Console(width=150)
    if args.only != "ort":
        console.print(tflite_table(models, shape))
    if args.only != "tflite":
        console.print(ort_table(models, shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())
