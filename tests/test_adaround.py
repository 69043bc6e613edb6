"""AdaRound learns each int8 weight's rounding (up or down) on the calibration split: the layer outputs come closer
to fp32 than with ORT's round-to-nearest, every integer stays floor or ceil of W/s inside ORT's range, and the
graph still runs. A small model made hard to round on purpose, built here."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.evaluate import sqnr_db
from edgekit.export.onnx import export_onnx
from edgekit.export.onnx_int8 import OrtQuantConfig, candidate_key, quantize_onnx
from edgekit.export.adaround import adaround
from edgekit.export.ptq import QUANT_SUFFIX, correct_bias
from edgekit.runtime import load_runner


def _hard_to_round() -> nn.Module:
    """Convs whose per-tensor int8 grid is coarse for most of their channels (output channels scaled 1e-2..1), on
    inputs with a large positive mean, then global pooling: the rounding errors of a channel add up instead of
    cancelling, which is what choosing up or down per weight can undo. The hidden Linear (a Gemm, then a ReLU) is
    rounded too; the last one stays fp32 (the logits layer)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.Conv2d(32, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        m[0].weight *= torch.logspace(-2, 0, 32)[:, None, None, None]
        m[1].weight *= torch.logspace(-2, 0, 16)[:, None, None, None]
        m[4].weight *= torch.logspace(-2, 0, 32)[:, None]
    return m


def _data(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 3, 16, 16)) * 4 + 2).astype(np.float32)


def _logits(path, x):
    run = load_runner("onnxruntime", path, threads=1).run
    return np.concatenate([run(x[i:i + 1]) for i in range(len(x))])


def _int8_weights(fp32_path, q_path) -> dict:
    """{weight name: (fp32 weight, int8 values, scale broadcast to the weight)} of the quantized weights."""
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fp32_path)).graph.initializer}
    g = onnx.load(str(q_path)).graph
    q = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    out = {}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0].endswith(QUANT_SUFFIX) and q[n.input[0]].dtype != np.int32:
            w = inits[n.input[0][:-len(QUANT_SUFFIX)]]
            s = q[n.input[1]].astype(np.float64)
            if s.size > 1:
                shape = [1] * w.ndim
                shape[next((a.i for a in n.attribute if a.name == "axis"), 1)] = -1
                s = s.reshape(shape)
            out[n.input[0]] = (w.astype(np.float64), q[n.input[0]], s)
    return out


def test_adaround_beats_nearest_rounding_within_one_step(tmp_path):
    fp32 = export_onnx(_hard_to_round(), tmp_path / "fp32.onnx", (1, 3, 16, 16))
    calib, held_out = _data(32, 0), _data(64, 1)
    q = quantize_onnx(fp32, tmp_path / "q.onnx", calib, OrtQuantConfig(per_channel=False, preprocess=False))
    info = adaround(fp32, q, calib, out_path=tmp_path / "qa.onnx", iterations=500)
    assert info["layers"] == 3 and info["kept_nearest"] == 0 and info["passes"] == 1  # 2 convs and the Gemm
    # each layer's output (after its ReLU) on the calibration samples comes closer to fp32 ...
    assert all(r["mse_adaround"] < 0.8 * r["mse_nearest"] for r in info["per_layer"])
    assert info["median_mse_ratio"] < 0.6 and 0 < info["changed_weights"] < 0.5
    # ... and so do the logits on inputs it never saw, in ONNX Runtime
    ref = _logits(fp32, held_out)
    plain, learned = sqnr_db(ref, _logits(q, held_out)), sqnr_db(ref, _logits(tmp_path / "qa.onnx", held_out))
    assert learned > plain + 4, (plain, learned)
    onnx.checker.check_model(onnx.load(str(tmp_path / "qa.onnx")))
    nearest, ada = _int8_weights(fp32, q), _int8_weights(fp32, tmp_path / "qa.onnx")
    assert nearest.keys() == ada.keys() and len(ada) == 3
    for name, (w, qa, s) in ada.items():
        qn = nearest[name][1]
        assert qa.dtype == np.int8 and qa.shape == qn.shape
        assert np.abs(qa.astype(int) - qn).max() <= 1 and (qa != qn).any()
        v = w / s
        assert np.all(qa >= np.floor(v) - 1e-9) and np.all(qa <= np.ceil(v) + 1e-9)
        assert np.abs(qa.astype(int)).max() <= np.abs(qn.astype(int)).max() <= 127  # ORT's symmetric range


def test_adaround_flag_runs_before_bias_correction_and_is_labelled(tmp_path):
    """``OrtQuantConfig.adaround`` is AdaRound on ORT's output, then bias correction on the learned weights."""
    fp32 = export_onnx(_hard_to_round(), tmp_path / "fp32.onnx", (1, 3, 16, 16))
    calib = _data(16, 0)
    cfg = OrtQuantConfig(preprocess=False, adaround=True, bias_correction=True)  # per-channel
    assert cfg.label().endswith(" +AdaRound +bias-correction") and candidate_key(cfg) == "minmax +AdaRound " \
                                                                                         "+bias-correction"
    assert "AdaRound" not in OrtQuantConfig().label()
    q = quantize_onnx(fp32, tmp_path / "q.onnx", calib, cfg)
    by_hand = quantize_onnx(fp32, tmp_path / "hand.onnx", calib, replace(cfg, adaround=False, bias_correction=False))
    adaround(fp32, by_hand, calib)
    correct_bias(fp32, by_hand, calib)
    want = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "hand.onnx")).graph.initializer}
    got = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(q)).graph.initializer}
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    with pytest.raises(EdgekitError, match="AdaRound needs at least one calibration input"):
        adaround(fp32, q, calib[:0], out_path=tmp_path / "none.onnx")


def test_conv_samples_are_crops_of_the_padded_input(tmp_path):
    """The sampled crops (stride 2, dilation 2, asymmetric pads) give exactly the conv's outputs somewhere."""
    from onnx import TensorProto, helper

    from edgekit.export.adaround import _layer_fn, _rounding_jobs, _Sampler
    from edgekit.export.ptq import _Graph

    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(6, 4, 3, 3)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], strides=[2, 2], dilations=[2, 2], pads=[2, 1, 1, 0])
    graph = helper.make_graph([conv], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 40, 44])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(fp32))
    x = rng.normal(size=(4, 4, 40, 44)).astype(np.float32)
    q = quantize_onnx(fp32, tmp_path / "q.onnx", x, OrtQuantConfig(preprocess=False, fp32_output_layer=False))
    (job,) = _rounding_jobs(_Graph(onnx.load(str(fp32))), _Graph(onnx.load(str(q))))
    assert job.is_conv and job.act is None
    s = _Sampler(job, (1, 4, 40, 44), 1)
    s.add(x[:1], np.random.default_rng(1))
    crops = s.data()
    full = _logits(fp32, x[:1])[0]
    assert full.shape == (6, 20, 21) and s.out == [20, 21] and len(crops) == s.total == 8 and s.positions == 16 * 16
    got = _layer_fn(job)(torch.from_numpy(crops), torch.from_numpy(job.w)).numpy()
    for y in got:
        assert any(np.allclose(full[:, i:i + 16, j:j + 16], y, atol=1e-4) for i in range(full.shape[1] - 15)
                   for j in range(full.shape[2] - 15))


def test_auto_tries_adaround_once_on_the_best_candidate(tmp_path):
    from edgekit.export.onnx_int8 import quantize_onnx_auto

    fp32 = export_onnx(_hard_to_round(), tmp_path / "fp32.onnx", (1, 3, 16, 16))
    calib = _data(16, 0)
    cfg = OrtQuantConfig(per_channel=False)
    _, chosen, details = quantize_onnx_auto(fp32, tmp_path / "auto.onnx", calib, cfg, candidates=("minmax",),
                                            scopes=(None,), adaround=None)
    scores = details["calibration_sqnr_db"]
    assert list(scores) == ["minmax", "minmax +AdaRound"] and "ptq_search_seconds" in details
    assert chosen.adaround and scores["minmax +AdaRound"] > scores["minmax"]  # kept: higher SQNR
    _, pinned, d2 = quantize_onnx_auto(fp32, tmp_path / "off.onnx", calib, replace(cfg, adaround=True),
                                       candidates=("minmax",), scopes=(None,))
    assert not pinned.adaround and list(d2["calibration_sqnr_db"]) == ["minmax"]  # False: not even tried


def test_adaround_needs_the_qdq_format(tmp_path):
    fp32 = export_onnx(_hard_to_round(), tmp_path / "fp32.onnx", (1, 3, 16, 16))
    with pytest.raises(EdgekitError, match="^adaround learns the int8 weights of the QDQ graph: use quant_format qdq$"):
        quantize_onnx(fp32, tmp_path / "q.onnx", _data(4, 0), OrtQuantConfig(quant_format="qoperator", adaround=True))


class _Task:
    """Only what the onnx exporter asks of a task: calibration inputs."""

    def arrays(self, split, limit=None):
        x = _data(16, 3)
        return x[:limit], np.zeros(len(x[:limit]), np.int64)


def test_onnx_option_is_off_by_default_null_lets_auto_try_it_true_pins_it(tmp_path):
    from edgekit.config import load_device
    from edgekit.export import ExportContext, export

    model, device = _hard_to_round(), load_device("jetson-orin-nano")  # not this machine: no latency search
    runs = {}
    for name, options in (("default", {"calibration": "auto", "equalize": False, "bias_correction": False}),
                          ("null", {"calibration": "auto", "equalize": False, "bias_correction": False,
                                    "adaround": None}),
                          ("named", {"calibration": "minmax", "adaround": True})):
        ctx = ExportContext(tmp_path, _Task(), device, (1, 3, 16, 16), name=name)
        export("onnx", model, "int8", options, ctx)
        runs[name] = ctx.info["quantization"]
    assert runs["default"]["adaround"] is False and not any("AdaRound" in k for k in
                                                            runs["default"]["calibration_sqnr_db"])
    tried = [k for k in runs["null"]["calibration_sqnr_db"] if "AdaRound" in k]
    assert len(tried) == 1 and runs["null"]["adaround"] == (runs["null"]["calibration_sqnr_db"][tried[0]] == max(
        runs["null"]["calibration_sqnr_db"].values()))
    assert runs["named"]["adaround"] is True and runs["named"]["config"].endswith("minmax +AdaRound")


def test_latency_search_times_layouts_without_adaround_and_gives_it_to_the_chosen_one(tmp_path):
    """Layouts are quantized without AdaRound (the integers do not change the speed); a faster eligible layout that
    wins is quantized once more with it."""
    from edgekit.export.onnx_int8 import quantize_onnx_auto

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", (1, 3, 16, 16))
    calib = np.random.default_rng(0).normal(size=(8, 3, 16, 16)).astype(np.float32)

    def timer(runs_by_name, x, warmup=10, rounds=100, description="", raw=False):  # no-preprocess: 2x faster
        return {k: {"p50": 0.5 if "no-preprocess" in k else 1.0, "times": [0.5 if "no-preprocess" in k else 1.0] * 5}
                for k in runs_by_name}
    _, cfg, details = quantize_onnx_auto(fp32, tmp_path / "q.onnx", calib, OrtQuantConfig(), candidates=("minmax",),
                                         scopes=(None,), latency_threads=1, rounds=5, timer=timer, adaround=True)
    rows = details["search"]
    assert [r["config"] for r in rows if "AdaRound" in r["config"]] == [rows[0]["config"]]  # only the candidate
    assert cfg.adaround and not cfg.preprocess and details["search_decision"].endswith("; then AdaRound on it")
