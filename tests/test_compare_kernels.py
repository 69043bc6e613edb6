"""compare shows the logits of the real int8 kernels beside the Q/DQ simulation its per-layer table uses, and warns
when the kernels lose more than the arithmetic (saturation)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from edgekit.comparison import KERNEL_GAP_DB, _simulated_row, compare_artifacts, render_comparison
from edgekit.export.onnx import export_onnx
from edgekit.export.onnx_int8 import OrtQuantConfig, quantize_onnx


def _models(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    fp32 = export_onnx(net, tmp_path / "fp32.onnx", (1, 3, 32, 32))
    calib = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    int8 = quantize_onnx(fp32, tmp_path / "int8.onnx", calib, OrtQuantConfig(calibration="minmax"))
    return fp32, int8


def test_real_kernels_and_simulation_side_by_side(tmp_path):
    fp32, int8 = _models(tmp_path)
    x = np.random.default_rng(1).standard_normal((24, 3, 32, 32)).astype(np.float32)
    r = compare_artifacts(fp32, int8, data=x, layer_inputs=8)
    real, sim = r["outputs"]
    assert real["output"].startswith("logits (this machine's kernels)") and sim.get("simulated") is True
    assert np.isfinite(sim["sqnr_db"]) and abs(sim["sqnr_db"] - real["sqnr_db"]) < KERNEL_GAP_DB  # VNNI or 7-bit
    text = "".join(str(t) for t in render_comparison(r) if isinstance(t, str))
    assert "warning" not in text
    # fp32 against itself has no Q/DQ: one row only
    assert len(compare_artifacts(fp32, fp32, data=x, per_layer=False)["outputs"]) == 1


def test_a_kernel_loss_beyond_the_arithmetic_is_named(tmp_path):
    fp32, int8 = _models(tmp_path)
    x = np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)
    sim = _simulated_row(fp32, int8, x, {"sqnr_db": 5.0}, threads=1)  # the kernels as a saturating CPU gives them
    assert sim["sqnr_db"] > 5.0 + KERNEL_GAP_DB and "reduce_range" in sim["note"]


def test_a_pretrained_model_is_compared_on_the_photos_in_its_run_preprocessing(tmp_path):
    """No --data: a 1000-class model gets the unlabelled photos (not digit labels it would score 0% on), through the
    transform its run recorded in report.json; a malformed one is refused in one line."""
    import json

    import pytest

    from edgekit.comparison import _inputs, run_preprocess
    from edgekit.data import Preprocess, load_task
    from edgekit.errors import EdgekitError

    pre = Preprocess(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")
    (tmp_path / "report.json").write_text(json.dumps({"task": {"preprocess": pre.to_json()}}))
    assert run_preprocess(tmp_path / "model.fp32.onnx", tmp_path / "model.int8.onnx") == pre
    batches, n, source = _inputs((3, 32, 32), None, None, 8, classes=1000, preprocess=pre)
    x = np.concatenate([b for b, _ in batches])
    want, _ = load_task("photos", preprocess=pre).arrays("eval", limit=8)
    default, _ = load_task("photos", input_size=32).arrays("eval", limit=8)
    assert "photos" in source and "unlabelled" in source and np.allclose(x, want) and not np.allclose(x, default)
    assert "mnist" in _inputs((3, 32, 32), None, None, 8, classes=10)[2]
    (tmp_path / "report.json").write_text(json.dumps({"task": {"preprocess": {"std": [0, 1, 1]}}}))
    with pytest.raises(EdgekitError, match="std must be 3 numbers"):
        run_preprocess(tmp_path / "model.fp32.onnx")
