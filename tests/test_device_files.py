"""The device-side files run where edgekit is not installed: a venv with numpy and onnxruntime only.

The venv is made without pip and without the system site-packages (edgekit is installed in the test venv); a
``.pth`` file puts a folder holding links to this venv's numpy and onnxruntime on its path, nothing else. Every
command runs with a clean environment from a folder outside the checkout, so ``import edgekit`` cannot succeed.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

DEVICE = Path(__file__).resolve().parents[1] / "edgekit" / "device"
DEPS = ("numpy", "numpy.libs", "onnxruntime")  # what a device venv holds (pip install numpy onnxruntime)


@pytest.fixture(scope="module")
def device_python(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("device-venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, env=_clean_env()).stdout.strip()
    deps = root / "deps"
    deps.mkdir()
    site = Path(np.__file__).resolve().parents[1]
    for name in DEPS:
        if (site / name).exists():
            (deps / name).symlink_to(site / name)
    (Path(purelib) / "device-deps.pth").write_text(f"{deps}\n")
    return str(py)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"  # no trtexec, no venv bin folder
    return env


def on_device(python: str, *args, cwd: Path, timeout: float = 120) -> tuple:
    """(exit code, the last JSON line of stdout or None, the process) of ``python args...`` run in ``cwd``."""
    proc = subprocess.run([python, *map(str, args)], cwd=cwd, env=_clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        payload = json.loads(lines[-1]) if lines else None
    except ValueError:
        payload = None
    return proc.returncode, payload, proc


def tiny_onnx(path: Path) -> Path:
    """(1, 3, 8, 8) -> Conv 3x3 -> ReLU -> GlobalAveragePool -> Flatten -> (1, 4) logits."""
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["output"])]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_the_device_venv_has_the_runtime_but_not_edgekit(device_python, tmp_path):
    code, _, proc = on_device(device_python, "-c", "import numpy, onnxruntime", cwd=tmp_path)
    assert code == 0, proc.stderr
    for mod in ("edgekit", "torch", "pydantic"):
        code, _, proc = on_device(device_python, "-c", f"import {mod}", cwd=tmp_path)
        assert code != 0 and "No module named" in proc.stderr, mod


def test_no_device_file_imports_edgekit():
    """Statically: no import of edgekit, and no relative import (the files run as scripts, not as a package)."""
    files = sorted(DEVICE.glob("*.py"))
    assert {"runner.py", "agent.py", "bundlecheck.py", "build_engine.py"} <= {f.name for f in files}
    bad = []
    for f in files:
        if f.name == "__init__.py":  # the host's handle on the folder (DEVICE_DIR); never copied to a device
            continue
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                bad += [f"{f.name}:{node.lineno} import {a.name}" for a in node.names
                        if a.name.split(".")[0] == "edgekit"]
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "edgekit"):
                bad.append(f"{f.name}:{node.lineno} from {'.' * node.level}{node.module or ''} import ...")
    assert not bad, bad


def test_runner_info_predict_and_bench(device_python, tmp_path):
    import onnxruntime as ort

    model = tiny_onnx(tmp_path / "tiny.onnx")
    runner = DEVICE / "runner.py"
    code, r, proc = on_device(device_python, runner, "info", cwd=tmp_path)
    assert code == 0 and r["runtimes"]["onnxruntime"] and not r["runtimes"]["tensorrt"], proc.stderr

    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code, r, proc = on_device(device_python, runner, "predict", model, "x.npy", "y.npy", "--threads", 1, cwd=tmp_path)
    assert code == 0 and r["output_shape"] == [1, 4], proc.stdout + proc.stderr
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=1e-5, atol=1e-6)

    code, r, proc = on_device(device_python, runner, "bench", model, "--warmup", 1, "--runs", 5, "--threads", 1,
                              cwd=tmp_path)
    assert code == 0, proc.stdout + proc.stderr
    assert r["runtime"] == "onnxruntime" and r["runs"] == 5 and 0 < r["min"] <= r["p50"] <= r["p90"]
    assert r["input_shapes"] == [[1, 3, 8, 8]] and r["python_executable"] == device_python


@pytest.fixture(scope="module")
def jetson_bundle(tmp_path_factory) -> Path:
    """A real bundle (edgekit's build_bundle, no wheels) for a TensorRT device, from a hand-made one-variant run."""
    from edgekit.deployment.bundle import build_bundle

    run = tmp_path_factory.mktemp("run")
    tiny_onnx(run / "model.fp32.onnx")
    report = {"model": "tiny", "recipe": "none", "device": "desktop-cpu", "seed": 0, "task": {"name": "random"},
              "recipe_spec": {"accuracy_budget_pp": 1.0},
              "variants": [{"name": "fp32", "format": "onnx", "precision": "fp32", "path": "model.fp32.onnx",
                            "status": "ok", "accuracy": None}]}
    (run / "report.json").write_text(json.dumps(report))
    return build_bundle(run, "jetson-orin-nano", tmp_path_factory.mktemp("bundle") / "jetson.tar.gz",
                        fetch_wheels=False)


def test_bundle_extracts_verifies_and_runs_on_the_device(device_python, jetson_bundle, tmp_path):
    into = tmp_path / "release"
    into.mkdir()
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bundlecheck as b; "
              "b.extract_members(sys.argv[2], sys.argv[3]); m = b.verify_tree(sys.argv[3]); "
              "print(json.dumps({'files': sorted(m['files']), "
              "'id': b.manifest_id(open(sys.argv[3] + '/manifest.json', 'rb').read())}))")
    code, r, proc = on_device(device_python, "-c", script, DEVICE, jetson_bundle, into, cwd=tmp_path)
    assert code == 0, proc.stdout + proc.stderr
    assert {"runner.py", "build_engine.py", "model.fp32.onnx", "install.sh", "run.sh"} <= set(r["files"])
    assert r["id"] == hashlib.sha256((into / "manifest.json").read_bytes()).hexdigest()[:16]

    # the bundle's own runner reproduces what the host computed for its smoke-test sample
    manifest = json.loads((into / "manifest.json").read_text())
    sample = manifest["sample"]
    code, r, proc = on_device(device_python, "runner.py", "predict", sample["model"], sample["inputs"][0], "out.npy",
                              cwd=into)
    assert code == 0, proc.stdout + proc.stderr
    np.testing.assert_allclose(np.load(into / "out.npy").reshape(-1), sample["expected"][0], atol=sample["atol"])

    # without TensorRT the engine builder says so: exit 3 and one JSON line, no traceback
    if Path("/usr/src/tensorrt/bin/trtexec").exists():
        pytest.skip("trtexec is installed here")
    code, r, proc = on_device(device_python, "build_engine.py", cwd=into)
    assert code == 3 and "TensorRT is not installed" in r["error"] and r["exit_code"] == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and not (into / "engines").exists()


def test_bundlecheck_refuses_a_link_on_the_device(device_python, tmp_path):
    tar = tmp_path / "evil.tar"
    with tarfile.open(tar, "w") as t:
        data = b"{}"
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("model.onnx")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    (tmp_path / "into").mkdir()
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import bundlecheck as b\n"
              "try:\n    b.extract_members(sys.argv[2], sys.argv[3])\n"
              "except b.BundleError as e:\n    print(e); sys.exit(5)")
    code, _, proc = on_device(device_python, "-c", script, DEVICE, tar, tmp_path / "into", cwd=tmp_path)
    assert code == 5 and "link" in proc.stdout, proc.stdout + proc.stderr
    assert list((tmp_path / "into").iterdir()) == []


def test_agent_usage_errors_are_one_json_line(device_python, tmp_path):
    for args in ((), ("status",), ("wait", str(tmp_path), "0123456789abcdef")):
        code, r, proc = on_device(device_python, DEVICE / "agent.py", *args, cwd=tmp_path)
        assert code == 2 and r["stage"] == "usage" and r["error"].startswith("usage"), proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
