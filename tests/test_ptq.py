"""Cross-layer equalization keeps the fp32 function and evens out channel ranges; bias correction removes the mean
output error of int8 weights; ``calibration: auto`` records which of them it kept. Small models built here."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgekit.evaluate import sqnr_db
from edgekit.export.onnx import export_onnx
from edgekit.export.onnx_int8 import OrtQuantConfig, candidate_key, quantize_onnx, quantize_onnx_auto
from edgekit.export.ptq import correct_bias, equalize, find_pairs, weight_range_spread
from edgekit.runtime import load_runner


def _unbalanced(relu6: bool = False) -> nn.Module:
    """conv -> act -> depthwise -> act -> conv, with conv1's output channels scaled by 1e-2..1e2 and the depthwise
    filters by the inverse (same function, wildly different per-channel weight ranges: what BN folding does)."""
    torch.manual_seed(0)
    act = nn.ReLU6 if relu6 else nn.ReLU
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), act(), nn.Conv2d(16, 16, 3, padding=1, groups=16), act(),
                      nn.Conv2d(16, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    a = torch.from_numpy(np.logspace(-2, 2, 16, dtype=np.float32)[np.random.default_rng(0).permutation(16)])
    with torch.no_grad():
        m[0].weight *= a[:, None, None, None]
        m[0].bias *= a
        m[2].weight /= a[:, None, None, None]
    return m


def _logits(path, x):
    run = load_runner("onnxruntime", path, threads=1).run
    return np.concatenate([run(x[i:i + 1]) for i in range(len(x))])


def _weights(path):
    g = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in g.initializer}
    return [inits[n.input[1]] for n in g.node if n.op_type == "Conv"]


def test_equalization_keeps_fp32_logits_and_evens_channel_ranges(tmp_path):
    fp32 = export_onnx(_unbalanced(), tmp_path / "fp32.onnx", (1, 3, 16, 16))
    info = equalize(fp32, tmp_path / "cle.onnx")
    assert info["pairs"] == 2 and info["relu6_to_relu"] == 0  # conv -> dw and dw -> conv
    x = np.random.default_rng(1).normal(size=(8, 3, 16, 16)).astype(np.float32)
    ref, got = _logits(fp32, x), _logits(tmp_path / "cle.onnx", x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    before, after = _weights(fp32), _weights(tmp_path / "cle.onnx")
    assert weight_range_spread(before[0]) > 30 and weight_range_spread(before[1]) > 30
    assert weight_range_spread(after[0]) < weight_range_spread(before[0]) / 10
    assert weight_range_spread(after[1]) < weight_range_spread(before[1]) / 10
    # the triplet's fixed point (AIMET's closed form): every channel's ranges in conv1, dw and conv2's inputs meet
    r1 = np.abs(after[0]).max(axis=(1, 2, 3))
    r2 = np.abs(after[1]).max(axis=(1, 2, 3))
    r3 = np.abs(after[2]).max(axis=(0, 2, 3))
    np.testing.assert_allclose(r1, r2, rtol=1e-3)
    np.testing.assert_allclose(r2, r3, rtol=1e-3)


def test_relu6_pairs_become_relu_only_when_asked(tmp_path):
    fp32 = export_onnx(_unbalanced(relu6=True), tmp_path / "fp32.onnx", (1, 3, 16, 16))
    assert find_pairs(onnx.load(str(fp32))) == [] and equalize(fp32, tmp_path / "kept.onnx")["pairs"] == 0
    info = equalize(fp32, tmp_path / "cle.onnx", relu6=True)  # AIMET's way: ReLU6 -> ReLU
    assert info["pairs"] == 2 and info["relu6_to_relu"] == 2
    ops = [n.op_type for n in onnx.load(str(tmp_path / "cle.onnx")).graph.node]
    assert "Clip" not in ops and ops.count("Relu") == 3
    onnx.checker.check_model(onnx.load(str(tmp_path / "cle.onnx")))


def _hard_for_bias() -> nn.Module:
    """A wide conv on inputs with a large positive mean, per-tensor int8 weights across channels of very different
    ranges: the small channels' rounding errors add up to a mean shift (what bias correction removes)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.Conv2d(32, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(16, 10)).eval()
    with torch.no_grad():
        m[0].weight *= torch.logspace(-2, 0, 32)[:, None, None, None]
        m[1].weight *= torch.logspace(-2, 0, 16)[:, None, None, None]
    return m


def test_bias_correction_removes_the_mean_output_error(tmp_path):
    fp32 = export_onnx(_hard_for_bias(), tmp_path / "fp32.onnx", (1, 3, 16, 16))
    rng = np.random.default_rng(0)
    calib = (rng.random((32, 3, 16, 16)) * 4 + 2).astype(np.float32)
    held_out = (rng.random((32, 3, 16, 16)) * 4 + 2).astype(np.float32)
    cfg = OrtQuantConfig(per_channel=False, preprocess=False)
    q = quantize_onnx(fp32, tmp_path / "q.onnx", calib, cfg)
    info = correct_bias(fp32, q, calib, out_path=tmp_path / "qbc.onnx")
    assert info["convs_corrected"] == 2 and info["mean_abs_correction"] > 0
    ref = _logits(fp32, held_out)
    err_q = np.abs((_logits(q, held_out) - ref).mean(axis=0)).mean()
    err_bc = np.abs((_logits(tmp_path / "qbc.onnx", held_out) - ref).mean(axis=0)).mean()
    assert err_bc < err_q / 2
    # the same through the config, and the weights themselves stay as quantized
    q2 = quantize_onnx(fp32, tmp_path / "q2.onnx", calib, OrtQuantConfig(per_channel=False, preprocess=False,
                                                                          bias_correction=True))
    np.testing.assert_allclose(_logits(q2, held_out), _logits(tmp_path / "qbc.onnx", held_out), rtol=1e-5, atol=1e-5)


def test_auto_tries_cle_and_bias_correction_and_records_the_choice(tmp_path):
    fp32 = export_onnx(_unbalanced(), tmp_path / "fp32.onnx", (1, 3, 16, 16))
    calib = np.random.default_rng(2).normal(size=(16, 3, 16, 16)).astype(np.float32)
    path, cfg, details = quantize_onnx_auto(fp32, tmp_path / "auto.onnx", calib, OrtQuantConfig(),
                                            equalize=None, bias_correction=None)
    scores = details["calibration_sqnr_db"]
    assert len(scores) == 4 + 3 and details["ptq_search_seconds"] >= 0
    assert sum(k.endswith("+CLE") for k in scores) == 1 and sum(k.endswith("+CLE +bias-correction") for k in scores) == 1
    assert candidate_key(cfg) == max(scores, key=scores.get)
    # CLE matters on this model: per-tensor activations after the unbalanced conv lose the small channels
    plain = max(v for k, v in scores.items() if "+" not in k)
    assert max(v for k, v in scores.items() if "+CLE" in k) > plain + 3
    assert cfg.equalize and sqnr_db(_logits(fp32, calib), _logits(path, calib)) == pytest.approx(scores[candidate_key(cfg)], abs=0.01)
    # pinned: no extra candidates
    _, cfg2, d2 = quantize_onnx_auto(fp32, tmp_path / "pinned.onnx", calib, OrtQuantConfig(), equalize=False,
                                     bias_correction=False)
    assert len(d2["calibration_sqnr_db"]) == 4 and not cfg2.equalize and "ptq_search_seconds" not in d2


class _Task:
    """Only what the onnx exporter asks of a task: calibration inputs."""

    def arrays(self, split, limit=None):
        x = np.random.default_rng(3).normal(size=(16, 3, 16, 16)).astype(np.float32)
        return x[:limit], np.zeros(len(x[:limit]), np.int64)


def test_report_records_what_auto_kept_and_explicit_options_pin_it(tmp_path):
    from edgekit.config import load_device
    from edgekit.export import ExportContext, export

    model = _unbalanced()
    device = load_device("jetson-orin-nano")  # not this machine: no latency search
    ctx = ExportContext(tmp_path, _Task(), device, (1, 3, 16, 16), name="auto")
    export("onnx", model, "int8", {"calibration": "auto"}, ctx)
    q = ctx.info["quantization"]
    assert len(q["calibration_sqnr_db"]) == 7 and "ptq_search_seconds" not in q  # timings stay out of it
    assert q["equalize"] is True and candidate_key(_cfg(q)) == max(q["calibration_sqnr_db"],
                                                                  key=q["calibration_sqnr_db"].get)
    ctx = ExportContext(tmp_path, _Task(), device, (1, 3, 16, 16), name="pinned")
    export("onnx", model, "int8", {"calibration": "auto", "equalize": False}, ctx)
    q = ctx.info["quantization"]
    assert q["equalize"] is False and [k for k in q["calibration_sqnr_db"] if "+" in k] == [
        next(k for k in q["calibration_sqnr_db"] if k.endswith("+bias-correction"))]
    ctx = ExportContext(tmp_path, _Task(), device, (1, 3, 16, 16), name="named")
    export("onnx", model, "int8", {"calibration": "minmax", "bias_correction": True}, ctx)
    assert ctx.info["quantization"]["bias_correction"] is True and ctx.info["quantization"]["equalize"] is False


def _cfg(q: dict) -> OrtQuantConfig:
    return OrtQuantConfig(**{k: q[k] for k in OrtQuantConfig.__dataclass_fields__ if k in q})
