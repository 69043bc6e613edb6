"""The device runner's TFLite fallback: tflite-runtime (numpy<2) in its own venv, as on a device without LiteRT.

tflite-runtime 2.14 (the last release; Raspberry Pi OS and older Jetson images still use it) needs
numpy<2, so it cannot share this environment with ai-edge-litert. The test installs it from PyPI
into a fresh venv, runs ``edgekit/deployment/runner.py`` there on .tflite files converted here by
litert-torch, and compares with ai-edge-litert in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("litert_torch", reason="TFLite export needs litert-torch (pip install 'edgekit[tflite]')")
pytest.importorskip("ai_edge_litert", reason="running .tflite here needs ai-edge-litert")

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tflite-runtime")]  # one venv, built once
RUNNER = Path(__file__).resolve().parents[1] / "edgekit" / "device" / "runner.py"
TFLITE_RUNTIME = "tflite-runtime==2.14.0"


class Small(nn.Module):
    """Conv-BN-ReLU, a depthwise block with a residual add, a concat, global pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                                nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.side = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.dw(x))
        x = torch.cat([x, self.side(x)], 1)
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def device_python(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("tflite-runtime") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", TFLITE_RUNTIME,
                        "numpy<2"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return py


@pytest.fixture(scope="module")
def artifacts(mnist_task, tmp_path_factory):
    from edgekit.export.tflite import convert_fp32, convert_int8

    torch.manual_seed(0)
    model = Small().eval()
    calib, _ = mnist_task.arrays("calib", limit=64)
    d = tmp_path_factory.mktemp("tfl")
    shape = (1, *mnist_task.input_shape[1:])
    convert_fp32(model, d / "fp32.tflite", shape)
    convert_int8(model, d / "int8.tflite", shape, calib)
    return {"fp32": d / "fp32.tflite", "int8": d / "int8.tflite"}


def _runner(py: Path, *args) -> tuple[int, dict]:
    p = subprocess.run([str(py), str(RUNNER), *map(str, args)], capture_output=True, text=True, timeout=300)
    return p.returncode, json.loads(p.stdout.strip().splitlines()[-1])


def test_the_device_venv_has_tflite_runtime_and_not_litert(device_python):
    code, r = _runner(device_python, "info")
    assert code == 0 and r["runtimes"]["tflite_runtime"] and not r["runtimes"]["ai_edge_litert"], r
    numpy_version = subprocess.run([str(device_python), "-c", "import numpy; print(numpy.__version__)"],
                                   capture_output=True, text=True, check=True).stdout.strip()
    assert numpy_version.startswith("1."), numpy_version


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_tflite_runtime_predicts_what_litert_predicts(device_python, artifacts, mnist_task, tmp_path, precision):
    from edgekit.runtime import load_runner

    from ai_edge_litert.interpreter import Interpreter

    host = load_runner("litert", artifacts[precision], threads=1)
    # int8: the two runtimes' kernels may round an accumulator differently: one output quantum apart at most
    atol = 1e-5 if precision == "fp32" else 1.01 * Interpreter(
        model_path=str(artifacts[precision])).get_output_details()[0]["quantization"][0]
    x, _ = mnist_task.arrays("eval", limit=4)
    for i in range(len(x)):
        np.save(tmp_path / "x.npy", x[i:i + 1])
        code, r = _runner(device_python, "predict", artifacts[precision], tmp_path / "x.npy", tmp_path / "y.npy",
                          "--threads", 1)
        assert code == 0, r
        assert r["runtime"] == "tflite_runtime" and r["version"] == "2.14.0", r
        got, want = np.load(tmp_path / "y.npy"), np.asarray(host.run(x[i:i + 1]))
        # int8: float in, float out, quantized and dequantized with the model's own parameters
        assert got.dtype == np.float32 and r["integer_io"] == (precision == "int8")
        assert got.argmax() == want.argmax()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("runtime", ["tflite_runtime", "ai_edge_litert"])
def test_runner_bench_on_tflite(device_python, artifacts, mnist_task, runtime):
    # LiteRT reports shapes as numpy int32: the random input must still have the model's shape
    py = device_python if runtime == "tflite_runtime" else Path(sys.executable)
    code, r = _runner(py, "bench", artifacts["int8"], "--runs", 5, "--warmup", 1, "--threads", 1)
    assert code == 0, r
    assert r["runtime"] == runtime and r["runs"] == 5 and 0 < r["p50"] <= r["p90"]
    assert r["input_shapes"] == [[1, *mnist_task.input_shape[1:]]]
