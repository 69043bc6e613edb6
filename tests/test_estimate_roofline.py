"""The per-operator roofline (edgekit.estimate): graph rewrites it assumes, labelling, the ``estimate`` entry point,
and calibration from micro-benchmarks."""

from __future__ import annotations

import collections

import onnx
import pytest
import yaml

from edgekit.config import DeviceProfile, LatencyModel, load_device
from edgekit.errors import EdgekitError
from edgekit.estimate import estimate
from edgekit.estimate.calibrate import calibrate_local, write_latency_model
from edgekit.estimate.graph import analyze
from edgekit.estimate.host import quantize_for
from edgekit.estimate.micro import Micro, build_micro
from edgekit.measure import profile_artifact
from edgekit.results import Latency


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """An inverted-residual chain in fp32 and its edgekit int8 (QDQ) form."""
    d = tmp_path_factory.mktemp("est")
    m = Micro("mbblock", 16, 16, 3, 2, 3)
    fp32 = d / "mb.fp32.onnx"
    onnx.save(build_micro(m), str(fp32))
    int8 = quantize_for(fp32, d / "mb.int8.onnx", m.input_shape, load_device("desktop-cpu"))
    return fp32, int8


@pytest.mark.slow
def test_every_result_is_labelled_estimated(graphs):
    for path in graphs:
        for dev in ("rpi4", "rpi5", "jetson-orin-nano", "desktop-cpu"):
            r = estimate(path, dev, per_op=True).to_json()
            assert r["source"] == "estimated"
            assert r["p50"] > 0 and r["device"] == dev
            assert all(row["source"] == "estimated" for row in r["by_category"].values())
            assert r["per_op"] and all(op["source"] == "estimated" for op in r["per_op"])


def test_estimate_is_one_latency_whose_json_keeps_the_report_keys(graphs):
    """``estimate`` returns a ``Latency`` labelled estimated, with the method and where its coefficients came from;
    its JSON holds every key report.json's estimated latencies have always had."""
    for dev, method in (("rpi4", "per-operator roofline"), ("desktop-cpu", "per-kernel regression")):
        lat = estimate(graphs[0], dev)  # desktop-cpu: its kernel table for the profile's threads, fitted above
        assert isinstance(lat, Latency) and lat.source == "estimated" and not lat.measured
        assert lat.device == dev and lat.threads == load_device(dev).resolved_threads() and lat.p50 > 0
        assert lat.method.startswith(method)
        assert lat.extra["coefficients"] == lat.extra["calibration"]
        d = lat.to_json()
        assert {"p50", "p90", "source", "device", "threads", "method", "coefficients"} <= set(d) and d["p90"] is None
        assert Latency.from_json(d).p50 == lat.p50


def test_profile_artifact_estimates_for_a_remote_device_without_ssh(graphs):
    r = profile_artifact(graphs[0], "rpi4")
    assert isinstance(r, Latency) and r.source == "estimated" and r.device == "rpi4" and r.threads == 4


def test_fp32_activations_and_residual_fuse_into_convs(graphs):
    ops = analyze(graphs[0])
    kinds = collections.Counter(o.category for o in ops)
    assert kinds == {"pwconv": 4, "dwconv": 2}, kinds  # Clip and the residual Add ride on the convs
    assert any("Add" in o.fused for o in ops)
    assert all(o.precision == "fp32" for o in ops)


def test_qdq_groups_run_as_int8_and_their_q_dq_are_free(graphs):
    ops = analyze(graphs[1])
    convs = [o for o in ops if o.category in ("pwconv", "dwconv")]
    assert len(convs) == 6 and all(o.precision == "int8" for o in convs)
    assert all("QuantizeLinear" in o.fused or "DequantizeLinear" in o.fused for o in convs)
    adds = [o for o in ops if o.op_type == "Add"]
    # the first residual Add is a QLinearAdd; the last one writes the model's float output, so it stays fp32
    assert [o.precision for o in adds] == ["int8", "fp32"]
    # what runs on its own: the input's Q and the DQs feeding that float Add
    quant = collections.Counter(o.op_type for o in ops if o.category == "quant")
    assert quant == {"QuantizeLinear": 1, "DequantizeLinear": 2}, quant
    conv_compute = {name: sum(op["compute_us"] for op in estimate(path, "rpi5", per_op=True).extra["per_op"]
                              if op["category"] in ("pwconv", "dwconv")) for name, path in zip("fq", graphs)}
    assert conv_compute["q"] < conv_compute["f"] / 2, "a Pi 5's int8 peak is 4x its fp32 peak"


def test_layout_conversions_follow_ort_nchwc(graphs):
    """With 16-channel blocks (AVX-512) the convs of this chain stay blocked: one reorder in, one out."""
    ops = analyze(graphs[0], channel_block=16)
    layout = [o.op_type for o in ops if o.category == "layout"]
    assert sorted(layout) == ["ReorderInput", "ReorderOutput"]


def test_coefficients_change_the_estimate(graphs):
    dev = load_device("rpi4")
    slow = dev.model_copy(update={"latency_model": dev.latency_model.model_copy(
        update={"default_overhead_us": 500.0, "overhead_us": {}})})
    assert estimate(graphs[0], slow).p50 > estimate(graphs[0], dev).p50 + 2.0


def test_non_onnx_and_missing_files_are_clear_errors(tmp_path):
    p = tmp_path / "m.tflite"
    p.write_bytes(b"TFL3")
    with pytest.raises(EdgekitError, match="reads ONNX graphs"):
        estimate(p, "rpi4")
    with pytest.raises(EdgekitError, match="Model file not found"):
        estimate(tmp_path / "none.onnx", "rpi4")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(EdgekitError, match="not a readable ONNX model"):
        estimate(bad, "rpi4")


def test_write_latency_model_keeps_the_rest_of_the_yaml(tmp_path):
    p = tmp_path / "dev.yaml"
    p.write_text("# my board\nkind: cpu\ncores: 4   # four\nlatency_model:\n  session_overhead_us: 1\n"
                 "  efficiency: {conv: 0.2}\nthreads: 2\n")
    write_latency_model(p, LatencyModel(session_overhead_us=7.5, efficiency={"conv": 0.4}))
    text = p.read_text()
    assert "# my board" in text and "cores: 4   # four" in text and "threads: 2" in text
    data = yaml.safe_load(text)
    assert data["latency_model"]["session_overhead_us"] == 7.5
    assert load_device(str(p)).latency_model.efficiency == {"conv": 0.4}


@pytest.mark.slow
def test_calibrate_local_fits_and_writes_a_profile(tmp_path):
    """A reduced micro-benchmark suite, timed here, fitted, written, loaded back, and used."""
    src = load_device("desktop-cpu")
    out = tmp_path / "here.yaml"
    out.write_text("kind: cpu\nlocal: true\ncores: 2\nthreads: 1\npeak_gops: {fp32: 60, int8: 120}\n"
                   "memory_bandwidth_gbs: 20\n")
    dev = load_device(str(out))
    res = calibrate_local(str(out), threads=1, quick=True, runs=10, kinds=("pwconv", "dwconv", "net"))
    assert res["path"] == str(out)
    fitted = load_device(str(out))
    lm = fitted.latency_model
    assert lm.threads == 1 and lm.calibration["micro_benchmarks"] == len(res["samples"])
    assert {"pwconv.fp32", "pwconv.int8", "dwconv.fp32", "dwconv.int8"} <= set(lm.efficiency)
    assert res["median_abs_error"] < 0.5, res["median_abs_error"]
    assert fitted.peak_gops["fp32"] > 0 and fitted.peak_gops["int8"] > 0 and fitted.peak_gops != dev.peak_gops
    assert isinstance(src, DeviceProfile)
