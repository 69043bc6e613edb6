"""Bias correction of the TFLite int8 path (``edgekit.export.pt2e_bias``): real PT2E graphs, real LiteRT files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekit.evaluate import predict_arrays, sqnr_db
from edgekit.runtime import load_runner

pytest.importorskip("litert_torch", reason="TFLite export needs litert-torch (pip install 'edgekit[tflite]')")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tflite")]

SHAPE = (1, 3, 16, 16)


def hard_model() -> nn.Module:
    """Per-tensor int8 weights where one weight is 200x the others: the small ones round to a level or two, and
    with positive inputs each channel's output is off by a mean that bias correction can take out."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU6(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():
        m[0].weight.uniform_(0.003, 0.006)
        m[0].weight[0, 0] = 1.0  # reads input channel 0, which is near zero: a wide weight range, a small output
        m[0].bias.fill_(0.01)
    return m.eval()


def images(n: int, seed: int) -> np.ndarray:
    # positive-mean inputs (as images are): a rounding error meets a non-zero mean input; channel 0 near zero
    x = np.random.RandomState(seed).rand(n, *SHAPE[1:]) * 1.5
    x[:, 0] *= 0.005
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from edgekit.export.tflite import convert_int8

    d = tmp_path_factory.mktemp("pt2e-bias")
    model, calib, x = hard_model(), images(64, 0), images(64, 1)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for bc in (False, True, None):
        report: dict = {}
        path = d / f"bc-{bc}.tflite"
        convert_int8(model, path, SHAPE, calib, per_channel=False, bias_correction=bc, report=report)
        got = predict_arrays(load_runner("litert", path, threads=1).run, x, batch_size=1)
        out[bc] = {"sqnr": sqnr_db(ref, got), "report": report}
        # the exported graph shares tensors with the model: the correction must not reach the user's model
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    return out


def test_bias_correction_brings_the_tflite_file_closer_to_fp32(converted):
    off, on = converted[False], converted[True]
    assert "bias_correction" not in off["report"]
    rep = on["report"]["bias_correction"]
    assert rep["kept"] and rep["layers"] == 3  # two convs and the linear layer
    assert on["sqnr"] > off["sqnr"] + 3, (off["sqnr"], on["sqnr"])  # unseen images, LiteRT file: +6.8 dB here


def test_auto_keeps_it_by_the_calibration_sqnr(converted):
    rep = converted[None]["report"]["bias_correction"]
    assert rep["calib_sqnr_db_after"] > rep["calib_sqnr_db_before"] and rep["kept"]
    assert converted[None]["sqnr"] == pytest.approx(converted[True]["sqnr"], abs=1e-6)


def test_auto_restores_the_biases_when_the_correction_does_not_pay():
    """A graph whose simulated SQNR cannot rise (every bias already exact: a float-valued correction of zero
    still changes nothing) keeps its biases bit for bit."""
    from edgekit.export.pt2e_bias import correct_bias_pt2e

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 3, 1, 1))
            self.bias = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return nn.functional.conv2d(x, self.weight, self.bias)

    from litert_torch.quantize import pt2e_quantizer as pq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from edgekit.export.tflite import litert_quantizer

    x = torch.from_numpy(images(1, 2))
    g = torch.export.export(Fixed().eval(), (x,)).module()
    prepared = prepare_pt2e(g, litert_quantizer(pq.get_symmetric_quantization_config(is_per_channel=True)))
    prepared(x)
    q = convert_pt2e(prepared, fold_quantize=False)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    rep = correct_bias_pt2e(q, [x], auto=True)
    assert rep["layers"] == 1 and not rep["kept"]  # weights of 1.0 are exact in int8: nothing to correct
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
