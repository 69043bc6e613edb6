"""ONNX Runtime int8: edgekit's settings vs ORT's defaults, on a trained model and real sessions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgekit.export.onnx_int8 import ORT_DEFAULT, OrtQuantConfig, quantize_onnx
from edgekit.errors import EdgekitError
from edgekit.evaluate import agreement, predict_arrays, top1
from edgekit.export.onnx import export_onnx
from edgekit.pipeline import get_baseline
from edgekit.measure.local import interleaved_latency
from edgekit.runtime import load_runner
from edgekit.config import load_device as _load_device
from edgekit.export.onnx import device_quant_config

pytestmark = pytest.mark.slow  # its module fixtures train models: outside the fast tier

# desktop-cpu's int8 settings on this machine (7-bit weights where its int8 kernels saturate)
DESKTOP_INT8 = device_quant_config(_load_device("desktop-cpu"))


@pytest.fixture(scope="module")
def trained(small_task, tmp_path_factory):
    from edgekit.config import Recipe, TrainSpec

    model, _ = get_baseline("shufflenetv2-x0.5", small_task, recipe=Recipe(name="t", train=TrainSpec(epochs=3)))
    d = tmp_path_factory.mktemp("q")
    return export_onnx(model, d / "fp32.onnx", small_task.input_shape), small_task, d


def _qdq_types(path):
    g = onnx.load(str(path)).graph
    inits = {i.name: i for i in g.initializer}
    zp_types = set()
    for n in g.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
            zp_types.add(inits[n.input[2]].data_type)
    return zp_types


def test_edgekit_int8_accuracy_and_types(trained):
    fp32, task, d = trained
    calib, _ = task.arrays("calib")
    q = quantize_onnx(fp32, d / "int8.onnx", calib, DESKTOP_INT8)
    assert _qdq_types(q) == {onnx.TensorProto.UINT8}  # U8 activations, as the desktop-cpu profile asks
    x, y = task.arrays("eval")
    ref = predict_arrays(load_runner("onnxruntime", fp32, threads=1).run, x, batch_size=1)
    got = predict_arrays(load_runner("onnxruntime", q, threads=1).run, x, batch_size=1)
    assert top1(got, y) >= top1(ref, y) - 0.01
    assert agreement(ref, got) >= 0.97
    assert q.stat().st_size < fp32.stat().st_size / 2  # int8 weights (scales and the fp32 head remain)


def test_ort_default_config_is_signed_per_tensor(trained):
    fp32, task, d = trained
    calib, _ = task.arrays("calib", limit=32)
    q = quantize_onnx(fp32, d / "default.onnx", calib, ORT_DEFAULT)
    assert _qdq_types(q) == {onnx.TensorProto.INT8}
    assert "S8S8 per-tensor" in ORT_DEFAULT.label()


def test_bad_quant_settings(trained):
    fp32, task, d = trained
    with pytest.raises(EdgekitError, match="calibration must be one of"):
        quantize_onnx(fp32, d / "x.onnx", task.arrays("calib", limit=4)[0], OrtQuantConfig(calibration="magic"))
    with pytest.raises(EdgekitError, match="at least one input"):
        quantize_onnx(fp32, d / "x.onnx", np.zeros((0, 3, 32, 32), np.float32))


def test_auto_calibration_keeps_the_closest_candidate(trained):
    from edgekit.export.onnx_int8 import quantize_onnx_auto, scope_label

    fp32, task, d = trained
    calib, _ = task.arrays("calib", limit=64)
    path, cfg, details = quantize_onnx_auto(fp32, d / "auto.onnx", calib, DESKTOP_INT8)
    scores = details["calibration_sqnr_db"]
    assert set(scores) == {"minmax", "percentile", "minmax conv-only", "percentile conv-only"}
    assert "search" not in details
    assert cfg.calibration + scope_label(cfg.op_types) == max(scores, key=scores.get)
    assert path.is_file() and scores[cfg.calibration] > 10  # dB: logits close to fp32
    with pytest.raises(EdgekitError, match="calibration must be one of"):
        quantize_onnx(fp32, d / "y.onnx", calib, OrtQuantConfig(calibration="auto"))


def test_latency_search_keeps_the_fastest_accurate_layout(trained):
    """The chosen layout is eligible, the fastest eligible one timed, and the file written is that layout."""
    import onnx

    from edgekit.export.onnx_int8 import FINALISTS, LAYOUT_CANDIDATES, quantize_onnx_auto, search_eligible

    fp32, task, d = trained
    calib, _ = task.arrays("calib", limit=32)
    path, cfg, details = quantize_onnx_auto(fp32, d / "search.onnx", calib, DESKTOP_INT8, latency_threads=1,
                                            rounds=20, timer=interleaved_latency)
    rows = details["search"]
    # the layouts + ORT's defaults + the other op scope at the chosen calibration
    assert len(rows) == len(LAYOUT_CANDIDATES) + 2 and len({r["config"] for r in rows}) == len(rows)
    top = max(rows, key=lambda r: r["sqnr_db"])
    top_sqnr, top_agree = top["sqnr_db"], top["calib_agreement"]
    assert top["eligible"]
    for r in rows:
        assert r["eligible"] == search_eligible(r["sqnr_db"], r["calib_agreement"], top_sqnr, top_agree)
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["eligible"] and chosen[0]["config"] == cfg.label()
    # the most accurate and the first pass's fastest other eligible layouts are timed again; the second pass
    # decides: another layout only when it is faster beyond the noise (its whole ratio interval above 1)
    assert [r["config"] for r in rows if r.get("most_accurate")] == [top["config"]]
    others = sorted((r for r in rows if r["eligible"] and r is not top), key=lambda r: r["p50_ms"])
    finalists = [r for r in rows if "final_p50_ms" in r]
    if others:
        assert {r["config"] for r in finalists} == {top["config"]} | {r["config"] for r in others[:FINALISTS - 1]}
        assert chosen[0] is top or chosen[0]["ratio_vs_most_accurate"][1] > 1
        assert chosen[0]["decision"] == details["search_decision"]
    # The file on disk has the chosen activation type and weight granularity.
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    act_zp = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits]
    want = onnx.TensorProto.UINT8 if cfg.activation_type == "uint8" else onnx.TensorProto.INT8
    assert act_zp and all(z.data_type == want for z in act_zp)
    weight_scales = [inits[n.input[1]] for n in graph.node
                     if n.op_type == "DequantizeLinear" and n.input[0] in inits and len(inits[n.input[0]].dims) == 4]
    assert weight_scales and any(len(s.dims) == 1 and s.dims[0] > 1 for s in weight_scales) == cfg.per_channel


def test_latency_search_times_with_the_timer_it_is_given(trained):
    """The search imports no measurement: it calls the timer passed in, and without one it is skipped, saying why."""
    from edgekit.export.onnx_int8 import SEARCH_NEEDS_TIMER, quantize_onnx_auto

    fp32, task, d = trained
    calib, _ = task.arrays("calib", limit=8)
    calls = []

    def timer(runs_by_name, x, warmup=10, rounds=100, description="", raw=False):  # interleaved_latency's
        calls.append((sorted(runs_by_name), x.shape, warmup, rounds, description, raw))
        return {k: {"p50": float(len(k)), "p90": float(len(k)), "times": [float(len(k))] * rounds}
                for k in runs_by_name}

    _, cfg, details = quantize_onnx_auto(fp32, d / "timed.onnx", calib, OrtQuantConfig(calibration="minmax"),
                                         candidates=("minmax",), scopes=(None,), latency_threads=1, rounds=3,
                                         timer=timer)
    assert calls[0][1:] == ((1, *calib.shape[1:]), 10, 3, "time int8 layouts", True)  # per-round times asked
    assert {r["config"] for r in details["search"]} == set(calls[0][0])
    chosen = next(r for r in details["search"] if r["chosen"])
    assert chosen["config"] == cfg.label() and chosen["p50_ms"] == len(cfg.label())
    _, _, details = quantize_onnx_auto(fp32, d / "untimed.onnx", calib, OrtQuantConfig(calibration="minmax"),
                                       candidates=("minmax",), scopes=(None,), latency_threads=1)
    assert "search" not in details and details["search_skipped"] == SEARCH_NEEDS_TIMER


def test_per_channel_depthwise_only(trained):
    """per_channel_grouped_only: per-channel scales on the grouped convs' weights, one scale on the dense ones."""
    fp32, task, d = trained
    calib, _ = task.arrays("calib", limit=16)
    q = quantize_onnx(fp32, d / "dw.onnx", calib, OrtQuantConfig(per_channel_grouped_only=True, preprocess=False))
    src = onnx.load(str(fp32)).graph
    grouped = {n.input[1] for n in src.node if n.op_type == "Conv"
               and next((a.i for a in n.attribute if a.name == "group"), 1) > 1}
    dense = {n.input[1] for n in src.node if n.op_type == "Conv"} - grouped
    assert grouped and dense
    g = onnx.load(str(q)).graph
    inits = {i.name: i for i in g.initializer}
    scale_len = {}  # fp32 weight name -> number of scales of its DequantizeLinear
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            name = n.input[0].removesuffix("_quantized")
            scale_len[name] = int(np.prod(inits[n.input[1]].dims)) if inits[n.input[1]].dims else 1
    assert all(scale_len[w] > 1 for w in grouped)
    assert all(scale_len[w] == 1 for w in dense)
    assert "per-channel depthwise" in OrtQuantConfig(per_channel_grouped_only=True).label()


@pytest.mark.parametrize("sqnr,agree,ok", [
    (30.0, 0.99, True),     # the most accurate one itself
    (29.2, 0.987, True),    # within 1 dB and half a point
    (29.2, 0.984, False),   # within 1 dB, loses more than half a point of agreement
    (28.2, 0.99, True),     # 1.8 dB below, but no calibration prediction lost
    (28.2, 0.988, False),   # 1.8 dB below and a prediction lost
    (27.9, 0.99, False),    # more than 2 dB below
])
def test_search_eligibility_rule(sqnr, agree, ok):
    from edgekit.export.onnx_int8 import search_eligible

    assert search_eligible(sqnr, agree, 30.0, 0.99) is ok


def test_remembered_weight_parameters_give_byte_identical_models(trained, monkeypatch, tmp_path):
    """``memoised_weight_params``: with ORT's weight parameters remembered from earlier calls, each layout
    quantizes to the same bytes as with ORT computing them afresh (and the memo is really used)."""
    from dataclasses import replace

    from onnxruntime.quantization import qdq_quantizer

    from edgekit.export import onnx_int8 as q

    fp32, task, _ = trained
    calib, _ = task.arrays("calib", limit=8)
    base = OrtQuantConfig(preprocess=False)
    configs = [base, replace(base, activation_type="int8", calibration="percentile"),
               replace(base, per_channel_grouped_only=True), replace(base, per_channel=False, reduce_range=True)]
    q._WEIGHT_PARAMS.clear()
    for i, cfg in enumerate(configs):
        for _ in range(2):  # the second call finds every channel remembered
            remembered = quantize_onnx(fp32, tmp_path / f"m{i}.onnx", calib, cfg).read_bytes()
        monkeypatch.setenv("EDGEKIT_ORT_PARAMS_MEMO", "0")
        assert quantize_onnx(fp32, tmp_path / f"o{i}.onnx", calib, cfg).read_bytes() == remembered, cfg.label()
        monkeypatch.delenv("EDGEKIT_ORT_PARAMS_MEMO")
    assert len(q._WEIGHT_PARAMS) > 100  # per-channel entries of this ShuffleNetV2's convs
    original = qdq_quantizer.compute_data_quant_params
    with q.memoised_weight_params():
        assert qdq_quantizer.compute_data_quant_params is not original
    assert qdq_quantizer.compute_data_quant_params is original


def test_auto_calibration_survives_a_failing_candidate(trained, monkeypatch):
    """A calibration method ORT fails on (seen: percentile's 2,048-bin histogram of an untrained MobileNetV3's
    near-constant tensor) is reported and skipped; if every candidate fails, one clear EdgekitError."""
    from edgekit.export import onnx_int8 as q

    fp32, task, d = trained
    calib, _ = task.arrays("calib", limit=16)
    real = q.quantize_onnx

    def percentile_fails(src, out, data, cfg):
        if cfg.calibration == "percentile":
            raise ValueError("Too many bins for data range. Cannot create 2048 finite-sized bins.")
        return real(src, out, data, cfg)

    monkeypatch.setattr(q, "quantize_onnx", percentile_fails)
    path, cfg, details = q.quantize_onnx_auto(fp32, d / "survives.onnx", calib, DESKTOP_INT8)
    assert cfg.calibration == "minmax" and path.is_file()
    assert set(details["failed"]) == {"percentile", "percentile conv-only"}
    assert "Too many bins" in details["failed"]["percentile"]
    with pytest.raises(EdgekitError, match="any calibration candidate: percentile: Too many bins"):
        q.quantize_onnx_auto(fp32, d / "never.onnx", calib, DESKTOP_INT8, candidates=("percentile",))
    assert not (d / "never.onnx").exists()
