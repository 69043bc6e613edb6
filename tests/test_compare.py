"""compare_artifacts on real artifacts: torch checkpoint, ONNX fp32 / int8 / TensorRT QDQ, TFLite."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rich.console import Console

from edgekit import zoo
from edgekit.comparison import compare_artifacts, render_comparison
from edgekit.export.onnx_int8 import OrtQuantConfig, quantize_onnx
from edgekit.config import Recipe, TrainSpec, load_device
from edgekit.errors import EdgekitError
from edgekit.export import ExportContext, export
from edgekit.export.onnx import export_onnx
from edgekit.export.tensorrt_qdq import quantize_for_tensorrt
from edgekit.config import load_device as _load_device
from edgekit.export.onnx import device_quant_config

# desktop-cpu's int8 settings on this machine (7-bit weights where its int8 kernels saturate)
DESKTOP_INT8 = device_quant_config(_load_device("desktop-cpu"))

SHORT = Recipe(name="test-short", train=TrainSpec(epochs=1))  # same cache key as the other test files
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("compare")]  # one worker builds this module's artifacts once


@pytest.fixture(scope="module")
def artifacts(mnist_task, tmp_path_factory):
    from edgekit.pipeline.benchmark import baseline_model

    d = tmp_path_factory.mktemp("compare")
    calib, _ = mnist_task.arrays("calib")
    out = {"dir": d}
    for name in ("shufflenetv2", "mobilenetv2"):
        model = baseline_model(name, mnist_task, recipe=SHORT)
        torch.save(model.state_dict(), d / f"{name}.pt")
        fp32 = export_onnx(model, d / f"{name}.fp32.onnx", mnist_task.input_shape)
        out[name] = {"model": model, "pt": d / f"{name}.pt", "fp32": fp32,
                     "int8": quantize_onnx(fp32, d / f"{name}.int8.onnx", calib, DESKTOP_INT8),
                     "trt": quantize_for_tensorrt(fp32, d / f"{name}.trt.onnx", calib, calibration="percentile")[0]}
    ctx = ExportContext(d, mnist_task, load_device("desktop-cpu"), mnist_task.input_shape, name="shuffle-int8")
    out["shufflenetv2"]["tflite"] = export("tflite", out["shufflenetv2"]["model"], "int8", {"num_calib": 32}, ctx)
    return out


def test_checkpoint_vs_onnx_fp32(artifacts):
    a = artifacts["shufflenetv2"]
    r = compare_artifacts(a["pt"], a["fp32"], model="shufflenetv2", limit=200)
    out = r["outputs"][0]
    assert r["num_inputs"] == 200 and r["a"]["format"] == "torch" and r["b"]["format"] == "onnx"
    assert out["agreement"] == 1.0 and out["cosine"] > 0.999999 and out["max_abs"] < 1e-3 and out["sqnr_db"] > 60
    assert out["accuracy_a"] == out["accuracy_b"]
    assert r["layers"] is None and "two ONNX" in r["layers_note"]


@pytest.mark.parametrize("name", ["shufflenetv2", "mobilenetv2"])
def test_fp32_vs_int8_per_layer(artifacts, name):
    a = artifacts[name]
    r = compare_artifacts(a["fp32"], a["int8"], limit=200, layer_inputs=8)
    out = r["outputs"][0]
    assert out["agreement"] >= 0.9 and 15 < out["sqnr_db"] < 60
    layers = r["layers"]
    assert len(layers) > 20 and [row["index"] for row in layers] == sorted(row["index"] for row in layers)
    assert layers[0]["op"] == "Input" and layers[0]["compared"] == "dequantized"
    assert any(row["op"] == "Conv" for row in layers)
    assert all(np.isfinite(row["sqnr_db"]) or row["sqnr_db"] == float("inf") for row in layers)
    first = r["first_divergence"]
    below = [row for row in layers if row["sqnr_db"] < r["threshold_db"]]
    assert first == (below[0] if below else None)
    # A threshold above every layer's SQNR names the first compared layer that is not exact; 0 dB names none.
    hi = compare_artifacts(a["fp32"], a["int8"], limit=16, layer_inputs=4, threshold_db=200)
    assert hi["first_divergence"]["index"] == next(row["index"] for row in hi["layers"] if row["sqnr_db"] < 200)
    lo = compare_artifacts(a["fp32"], a["int8"], limit=16, layer_inputs=4, threshold_db=-100)
    assert lo["first_divergence"] is None


def test_tensorrt_qdq_vs_fp32_and_table(artifacts):
    a = artifacts["mobilenetv2"]
    r = compare_artifacts(a["fp32"], a["trt"], limit=100, layer_inputs=4)
    assert r["outputs"][0]["agreement"] >= 0.9
    assert any(row["op"] == "Add" for row in r["layers"])  # residual adds are compared too
    console = Console(width=160, record=True)
    for table in render_comparison(r, max_layers=10):
        console.print(table)
    text = console.export_text()
    assert "agreement" in text and "per layer" in text and "Q/DQ SQNR dB" in text


def test_onnx_vs_tflite(artifacts):
    a = artifacts["shufflenetv2"]
    r = compare_artifacts(a["fp32"], a["tflite"], limit=100)
    assert r["b"]["format"] == "tflite" and r["outputs"][0]["agreement"] >= 0.95
    assert r["layers"] is None


def test_inputs_from_array_and_task_name(artifacts):
    a = artifacts["shufflenetv2"]
    x = np.random.default_rng(0).standard_normal((5, 3, 64, 64)).astype(np.float32)
    r = compare_artifacts(a["fp32"], a["trt"], data=x, per_layer=False)
    assert r["num_inputs"] == 5 and "accuracy_a" not in r["outputs"][0] and r["layers"] is None
    r = compare_artifacts(a["fp32"], a["fp32"], task="mnist", limit=10, per_layer=False)
    assert r["outputs"][0]["max_abs"] == 0.0 and r["outputs"][0]["sqnr_db"] == float("inf")


def test_bad_inputs(artifacts, tmp_path, small_task):
    a = artifacts["shufflenetv2"]
    with pytest.raises(EdgekitError, match="Unknown artifact format '.xyz'"):
        (tmp_path / "m.xyz").write_text("x")
        compare_artifacts(tmp_path / "m.xyz", a["fp32"])
    with pytest.raises(EdgekitError, match="Artifact not found"):
        compare_artifacts(tmp_path / "missing.onnx", a["fp32"])
    (tmp_path / "text.onnx").write_text("this is not a model")
    with pytest.raises(EdgekitError, match="not a model ONNX Runtime can load"):
        compare_artifacts(tmp_path / "text.onnx", a["fp32"])
    (tmp_path / "text.tflite").write_bytes(b"\0" * 64)
    with pytest.raises(EdgekitError, match="not a model LiteRT can load"):
        compare_artifacts(a["fp32"], tmp_path / "text.tflite")
    with pytest.raises(EdgekitError, match="--model"):
        compare_artifacts(a["pt"], a["fp32"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EdgekitError, match="Cannot read weights file"):
        compare_artifacts(tmp_path / "junk.pt", a["fp32"], model="shufflenetv2")
    with pytest.raises(EdgekitError, match="does not hold a mobilenetv2 state dict"):
        compare_artifacts(a["pt"], a["fp32"], model="mobilenetv2")
    small = export_onnx(zoo.create("shufflenetv2", num_classes=10), tmp_path / "small.onnx", small_task.input_shape)
    with pytest.raises(EdgekitError, match="Input shapes differ"):
        compare_artifacts(a["fp32"], small)
    with pytest.raises(EdgekitError, match="does not match"):
        compare_artifacts(a["fp32"], a["trt"], data=np.zeros((2, 3, 32, 32), np.float32))
    other = export_onnx(zoo.create("mobilenetv2", num_classes=10), tmp_path / "other.onnx", (1, 3, 64, 64))
    with pytest.raises(EdgekitError, match="share no tensor names"):
        compare_artifacts(a["fp32"], other, limit=4, layer_inputs=2)
