"""Latency measured on this machine, and the standalone device runner (run here as a subprocess)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgekit.config import SSHSpec, load_device
from edgekit.deployment import RUNNER_PATH
from edgekit.errors import EdgekitError
from edgekit.estimate.micro import Micro, build_micro
from edgekit.measure import latency_source, profile_artifact, profile_local
from edgekit.results import ESTIMATED, MEASURED, MEASURED_SSH, Latency


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("local") / "block.onnx"
    onnx.save(build_micro(Micro("mbblock", 16, 16, 3, 1, 3)), str(path))
    return path


def runner(*args, python=sys.executable):
    proc = subprocess.run([python, str(RUNNER_PATH), *map(str, args)], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout + proc.stderr  # exactly one JSON object
    return proc.returncode, json.loads(lines[0])


def test_local_device_is_measured_here(model):
    lat = profile_artifact(model, "desktop-cpu", threads=1, runs=20, warmup=2)
    assert isinstance(lat, Latency) and lat.source == MEASURED and lat.measured and lat.device == "desktop-cpu"
    assert lat.runtime == "onnxruntime" and lat.threads == 1 and lat.runs == 20
    assert 0 < lat.extra["min"] <= lat.p50 <= lat.p90
    r = lat.to_json()  # every key the profile's JSON had before it was typed
    assert {"source", "p50", "p90", "mean", "min", "runs", "runtime", "version", "threads", "warmup", "machine",
            "python", "artifact", "device"} <= set(r) and r["source"] == "measured"


def test_one_decision_between_here_ssh_and_estimated():
    here, pi = load_device("desktop-cpu"), load_device("rpi4")
    with_ssh = pi.model_copy(update={"ssh": SSHSpec(host="pi.local")})
    assert latency_source(here) == MEASURED and latency_source(pi) == ESTIMATED
    assert latency_source(here, host="pi@pi.local") == latency_source(pi, host="pi@x") == MEASURED_SSH
    assert latency_source(with_ssh) == MEASURED_SSH and latency_source(with_ssh, ssh=False) == ESTIMATED


def test_cli_profile_prints_the_latency_and_its_json(model):
    from typer.testing import CliRunner

    from edgekit.cli import app

    res = CliRunner().invoke(app, ["profile", str(model), "--threads", "1", "--runs", "3", "--warmup", "0", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["source"] == "measured" and r["runs"] == 3 and {"mean", "min", "machine", "artifact"} <= set(r)
    res = CliRunner().invoke(app, ["profile", str(model), "--runs", "3", "--warmup", "0"])
    assert res.exit_code == 0 and "measured here" in res.output, res.output
    res = CliRunner().invoke(app, ["profile", str(model), "--device", "rpi4"])
    assert res.exit_code == 0 and "ESTIMATED" in res.output, res.output


def test_default_threads_come_from_the_profile(model):
    assert profile_local(model, runs=3, warmup=0).threads >= 1
    assert profile_artifact(model, "desktop-cpu", runs=3, warmup=0).threads == \
        load_device("desktop-cpu").resolved_threads()


def test_bad_inputs_are_clear_errors(model, tmp_path):
    with pytest.raises(EdgekitError, match="Model file not found"):
        profile_artifact(tmp_path / "none.onnx", "desktop-cpu")
    with pytest.raises(EdgekitError, match="runs must be"):
        profile_artifact(model, "desktop-cpu", runs=0)
    odd = tmp_path / "m.xyz"
    odd.write_bytes(b"x")
    with pytest.raises(EdgekitError, match="No runtime for m.xyz"):
        profile_artifact(odd, "desktop-cpu")
    with pytest.raises(EdgekitError, match="Unknown device"):
        profile_artifact(model, "desktop-cpuu")


def test_runner_does_not_import_edgekit():
    tree = ast.parse(RUNNER_PATH.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "edgekit" not in imported


def test_runner_bench_prints_one_json_object(model):
    code, r = runner("bench", model, "--warmup", 2, "--runs", 15, "--threads", 1)
    assert code == 0, r
    assert r["runtime"] == "onnxruntime" and r["version"] and r["threads"] == 1 and r["runs"] == 15
    assert 0 < r["min"] <= r["p50"] <= r["p90"] and r["mean"] > 0
    assert r["machine"] and r["python"] and r["input_shapes"] == [[1, 16, 16, 16]]


def test_runner_predict_matches_onnxruntime(model, tmp_path):
    import onnxruntime as ort

    x = np.random.default_rng(3).standard_normal((1, 16, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, r = runner("predict", model, tmp_path / "x.npy", tmp_path / "y.npy")
    assert code == 0, r
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=1e-5, atol=1e-5)
    assert r["output_shape"] == list(ref.shape)


def test_runner_errors(model, tmp_path):
    code, r = runner("bench", tmp_path / "none.onnx")
    assert code == 2 and "model file not found" in r["error"]
    code, r = runner("bench", model, "--runs", 0)
    assert code == 2 and "--runs" in r["error"]
    code, r = runner("bench")
    assert code == 2 and "bad arguments" in r["error"]
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    code, r = runner("bench", bad)
    assert code == 2 and "cannot load" in r["error"]
    (tmp_path / "m.bin").write_bytes(b"x")
    code, r = runner("bench", tmp_path / "m.bin")
    assert code == 2 and "unknown model format .bin" in r["error"]


def test_runner_without_runtime_exits_3(model, tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    code, r = runner("bench", model, python=venv / "bin" / "python")
    assert code == 3
    assert r["error"].startswith("no runtime for .onnx on this device: install onnxruntime")
    code, r = runner("info", python=venv / "bin" / "python")
    assert code == 0 and r["runtimes"]["onnxruntime"] is False


def test_interleaved_rounds_are_paired_and_shuffled():
    """Every variant runs once per round, in a different order from round to round."""
    from edgekit.measure.local import interleaved_latency

    calls = []
    runs = {k: (lambda x, k=k: calls.append(k)) for k in "abcd"}
    lat = interleaved_latency(runs, np.zeros(1), warmup=0, rounds=30, raw=True)
    assert all(len(lat[k]["times"]) == 30 and lat[k]["runs"] == 30 for k in runs)
    rounds = [tuple(calls[i:i + 4]) for i in range(0, len(calls), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    assert len(set(rounds)) > 5 and len({r[0] for r in rounds}) == 4
    assert "times" not in interleaved_latency(runs, np.zeros(1), warmup=0, rounds=3)["a"]


def test_ratio_interval_tells_a_difference_from_noise():
    from edgekit.measure.local import ratio_interval

    rng = np.random.default_rng(1)
    base = rng.lognormal(0, 0.3, 400)  # the machine's noise, shared by both variants of a round
    same = ratio_interval(base * rng.lognormal(0, 0.05, 400), base * rng.lognormal(0, 0.05, 400))
    assert same[1] < 1 < same[2] and same[1] <= same[0] <= same[2]
    slower = ratio_interval(1.1 * base * rng.lognormal(0, 0.05, 400), base * rng.lognormal(0, 0.05, 400))
    assert 1 < slower[1] and abs(slower[0] - 1.1) < 0.05
