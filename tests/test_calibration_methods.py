"""edgekit's activation range methods beside ORT's: mse (least expected squared error) and mean-minmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.evaluate import sqnr_db
from edgekit.export.onnx import export_onnx
from edgekit.export.onnx_int8 import CALIBRATIONS, OrtQuantConfig, quantize_onnx
from edgekit.export.ort_calibration import mse_range
from edgekit.formats import OnnxOptions
from edgekit.runtime import load_runner


def _grid_error(x: np.ndarray, lo: float, hi: float, levels: int = 256) -> float:
    """Mean squared error of x on ORT's asymmetric grid for [lo, hi] (zero point rounded, 0 exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / (levels - 1)
    zp = np.round(-lo / s)
    q = (np.clip(np.round(x / s) + zp, 0, levels - 1) - zp) * s
    return float(np.mean((x - q) ** 2))


def test_mse_range_keeps_a_uniform_range_and_clips_a_long_tail():
    rng = np.random.default_rng(0)
    u = rng.uniform(-1, 3, 200_000)
    lo, hi = mse_range(*np.histogram(u, bins=2048, range=(-1, 3)))
    assert lo == pytest.approx(-1, abs=0.02) and hi == pytest.approx(3, abs=0.05)

    # a skewed Laplace, the shape of many pre-activations: its extremes are rare and far
    x = rng.laplace(0, 1, 1_000_000)
    x = np.where(rng.random(x.size) < 0.5, np.abs(x), x)
    lo, hi = mse_range(*np.histogram(x, bins=2048, range=(x.min(), x.max())))
    assert x.min() < lo < 0 < hi < 0.9 * x.max()
    minmax = _grid_error(x, x.min(), x.max())
    percentile = _grid_error(x, *np.percentile(x, [0.001, 99.999]))
    mse = _grid_error(x, lo, hi)
    assert mse < 0.75 * minmax and mse < percentile, (mse, minmax, percentile)


def test_mse_range_of_an_empty_or_flat_histogram_is_its_bounds():
    assert mse_range(np.zeros(4), np.linspace(0, 1, 5)) == (0.0, 1.0)
    assert mse_range(np.ones(4), np.zeros(5)) == (0.0, 0.0)


class _Spiky(nn.Module):
    """A conv net whose calibration inputs carry rare huge pixels: min-max ranges are stretched by them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


def _spiky_data():
    rng = np.random.default_rng(1)
    calib = rng.normal(0, 1, (32, 3, 16, 16)).astype(np.float32)
    for i in range(0, 32, 8):  # one pixel in 8 images is 60 sigma
        calib[i, :, rng.integers(16), rng.integers(16)] = 60.0
    ev = rng.normal(0, 1, (64, 3, 16, 16)).astype(np.float32)
    return calib, ev


def _logits(path, x):
    run = load_runner("onnxruntime", path, threads=1).run
    return np.concatenate([run(x[i:i + 1]) for i in range(len(x))])


def _input_scale(path) -> float:
    """The scale of the graph input's QuantizeLinear: the activation range ORT was given, over 255."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == m.graph.input[0].name)
    return float(inits[q.input[1]])


def test_ort_quantizes_with_the_ranges_each_method_computes(tmp_path):
    calib, _ = _spiky_data()
    fp32 = export_onnx(_Spiky().eval(), tmp_path / "fp32.onnx", (1, 3, 16, 16))
    lo, hi = min(calib.min(), 0), max(calib.max(), 0)
    a, b = mse_range(*np.histogram(calib.astype(np.float64), bins=2048, range=(lo, hi)))
    q = quantize_onnx(fp32, tmp_path / "mse.onnx", calib, OrtQuantConfig(calibration="mse"))
    assert _input_scale(q) == pytest.approx((b - a) / 255, rel=1e-5)
    # mean-minmax: the mean over images of each image's extremes (ORT's MinMax with CalibMovingAverage)
    per_lo, per_hi = calib.reshape(len(calib), -1).min(1), calib.reshape(len(calib), -1).max(1)
    q = quantize_onnx(fp32, tmp_path / "mean.onnx", calib, OrtQuantConfig(calibration="mean-minmax"))
    assert _input_scale(q) == pytest.approx((max(per_hi.mean(), 0) - min(per_lo.mean(), 0)) / 255, rel=1e-5)


def test_mean_minmax_is_not_stretched_by_a_few_outlier_images(tmp_path):
    calib, ev = _spiky_data()
    fp32 = export_onnx(_Spiky().eval(), tmp_path / "fp32.onnx", (1, 3, 16, 16))
    ref = _logits(fp32, ev)
    sq = {}
    for method in ("minmax", "mean-minmax"):
        q = quantize_onnx(fp32, tmp_path / f"{method}.onnx", calib, OrtQuantConfig(calibration=method))
        sq[method] = sqnr_db(ref, _logits(q, ev))
    assert sq["mean-minmax"] > sq["minmax"] + 3, sq


def test_methods_are_options_of_the_onnx_format_only():
    assert {"mse", "mean-minmax"} <= set(CALIBRATIONS)
    assert OnnxOptions(calibration="mse").calibration == "mse"
    from edgekit.formats import TensorrtOptions

    with pytest.raises(ValueError):
        TensorrtOptions(calibration="mse")  # TensorRT's symmetric int8 keeps ORT's three


def test_an_unknown_method_is_an_edgekit_error(tmp_path):
    fp32 = export_onnx(_Spiky().eval(), tmp_path / "fp32.onnx", (1, 3, 16, 16))
    with pytest.raises(EdgekitError, match="calibration must be one of"):
        quantize_onnx(fp32, tmp_path / "q.onnx", _spiky_data()[0], OrtQuantConfig(calibration="kl"))
