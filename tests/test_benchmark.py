"""edgekit.pipeline.benchmark: every format x precision of a model, real exports, real sessions, one timing run."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from rich.console import Console
from torch import nn

from edgekit.pipeline.benchmark import FAILED, OK, UNAVAILABLE, benchmark, benchmark_table
from edgekit.config import Recipe, TrainSpec
from edgekit.errors import EdgekitError

SHORT = Recipe(name="test-short", train=TrainSpec(epochs=1))  # same cache key as the other test files
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("benchmark")]  # one worker builds this module's artifacts once
HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
# ONNX int8 without the latency search (a dozen more quantizations, timed): these tests are about the rows;
# test_quantize.py and test_cli.py run the search.
FAST = {"onnx:int8": {"search": "none"}, "tflite:int8": {"num_calib": 32}, "tensorrt:int8": {"num_calib": 32}}


@pytest.fixture(scope="module")
def rows(mnist_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return benchmark("shufflenetv2", recipe=SHORT, task=mnist_task, options=FAST, runs=20, warmup=3,
                     threads=1, out_dir=out), out


def _by(rows, fmt, precision):
    return rows.row(fmt, precision)


def test_one_row_per_format_and_precision(rows):
    rows, _ = rows
    assert [(r.format, r.precision) for r in rows] == [
        ("onnx", "fp32"), ("onnx", "int8"), ("tflite", "fp32"), ("tflite", "fp16"), ("tflite", "int8"),
        ("tensorrt", "fp16"), ("tensorrt", "int8")]


def test_cpu_formats_run_and_are_timed_side_by_side(rows):
    rows, out = rows
    ok = [r for r in rows if r.format != "tensorrt"]
    assert all(r.status == OK for r in ok), [(r.format, r.precision, r.error) for r in ok]
    ref = _by(rows, "onnx", "fp32")
    assert ref.speedup == 1.0 and ref.agreement == 1.0
    for r in ok:
        lat = r.latency
        assert r.size_mb > 0 and lat.p50 > 0 and lat.p90 >= lat.p50 and r.speedup > 0 and lat.source == "measured"
        assert r.accuracy >= ref.accuracy - 0.01, (r.format, r.precision, r.accuracy)
        assert r.agreement >= 0.97 and lat.threads == 1
        assert r.path.is_file() and r.path.parent == out
    assert _by(rows, "tflite", "fp32").agreement == 1.0
    assert _by(rows, "tflite", "int8").size_mb < 0.4 * _by(rows, "tflite", "fp32").size_mb
    assert "PT2E" in _by(rows, "tflite", "int8").info["quantization"]["tool"]
    assert [v["format"] for v in rows.to_json()["variants"]] == [r.format for r in rows]  # the JSON is the records


@pytest.mark.skipif(HAVE_TRT, reason="checks the unavailable rows where tensorrt is absent")
def test_tensorrt_rows_are_unavailable_with_reason(rows):
    rows, out = rows
    for precision in ("fp16", "int8"):
        r = _by(rows, "tensorrt", precision)
        assert r.status == UNAVAILABLE and "tensorrt is not installed" in r.error
        assert r.latency is None and r.accuracy is None
    assert (out / "trtexec.sh").is_file() and (out / "model.tensorrt-int8.trt.onnx").is_file()


def test_table_renders(rows):
    rows, _ = rows
    console = Console(width=200, record=True)
    console.print(benchmark_table(rows, title="shufflenetv2"))
    text = console.export_text()
    for token in ("format", "speedup", "1.00x", "✅ ok", "tflite", "onnxruntime", "accuracy %"):
        assert token in text
    if not HAVE_TRT:
        assert "❎ unavailable" in text


class Bucketize(nn.Module):
    """ONNX exports it; litert-torch has no lowering for aten.bucketize."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4)
        self.fc = nn.Linear(8, 10)
        self.register_buffer("edges", torch.tensor([-1.0, 0.0, 1.0]))

    def forward(self, x):
        y = self.conv(x)
        y = y * torch.bucketize(y, self.edges).float()
        return self.fc(y.mean((2, 3)))


def test_a_failing_format_does_not_stop_the_others(mnist_task):
    rows = benchmark(Bucketize(), task=mnist_task, formats=["onnx", "tflite"], runs=5, warmup=1, threads=1,
                     num_eval=64, options=FAST)
    assert rows.row("onnx", "fp32").status == OK and rows.row("onnx", "fp32").latency.p50 > 0
    for precision in ("fp32", "fp16", "int8"):
        r = rows.row("tflite", precision)
        assert r.status == FAILED and "bucketize" in r.error and r.error.startswith("export:")


def test_bad_arguments(mnist_task, tmp_path):
    with pytest.raises(EdgekitError, match="Unknown format 'onx'"):
        benchmark(Bucketize(), task=mnist_task, formats=["onx"])
    with pytest.raises(EdgekitError, match="Unknown device"):
        benchmark(Bucketize(), task=mnist_task, device="rpi9")
    (tmp_path / "old.onnx").write_text("")
    with pytest.raises(EdgekitError, match="not an empty folder"):
        benchmark(Bucketize(), task=mnist_task, out_dir=tmp_path)


def test_onnxruntime_sessions_stop_spinning_between_runs(tmp_path):
    """Variants are timed round-robin in one process: an idle session's spinning pool would take the timed one's
    cores (bench/ort_spinning.py), so every session edgekit times stops spinning when its Run ends."""
    import torch

    from edgekit.export.onnx import export_onnx
    from edgekit.runtime import load_runner

    path = export_onnx(torch.nn.Conv2d(3, 4, 3), tmp_path / "c.onnx", (1, 3, 8, 8))
    r = load_runner("onnxruntime", path, threads=2)
    assert r.session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
