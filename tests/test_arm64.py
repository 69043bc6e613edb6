"""The Raspberry Pi bundle really runs on arm64: Debian's arm64 Python under qemu-user, the bundle's own wheels.

``edgekit/deployment/arm64_sysroot.sh`` assembles a minimal Debian bookworm arm64 userland with CPython 3.11
(cached in the user cache dir; qemu-user-static is apt-installed when missing and we are root). The
bundle's install.sh then creates a venv with that arm64 Python and installs the bundle's aarch64 wheels
offline (``--no-index --find-links wheels``), every python call prefixed by ``qemu-aarch64-static -L
SYSROOT`` (no binfmt_misc needed). ``runner.py predict`` runs the int8 and fp32 models on eval images and
the outputs are compared with this machine's ONNX Runtime: same argmax, logits within tolerance.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.arm64, pytest.mark.slow, pytest.mark.xdist_group("wheel-cache")]  # one pip at a time

RECIPE = ("description: deploy test recipe\ntrain: {epochs: 1}\nvariants:\n  - {format: onnx, precision: fp32}\n"
          "  - {format: onnx, precision: int8, options: {num_calib: 64, search: none}}\naccuracy_budget_pp: 5.0\n")


def user_cache() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgekit"))


@pytest.fixture(scope="module")
def arm64():
    """(launcher argv prefix, arm64 python path): qemu-user + the cached sysroot, or nothing on an arm64 host."""
    if platform.machine() in ("aarch64", "arm64"):
        return [], shutil.which("python3.11") or shutil.which("python3")
    from edgekit.deployment import SYSROOT_SCRIPT

    t0 = time.perf_counter()
    proc = subprocess.run(["sh", str(SYSROOT_SCRIPT), str(user_cache() / "arm64-sysroot-bookworm")],
                          capture_output=True, text=True, timeout=900)
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if qemu is None:
        pytest.skip("qemu-user cannot be installed here (needs root and Debian's qemu-user-static package): "
                    + proc.stderr.strip()[-300:])
    assert proc.returncode == 0, proc.stderr[-2000:]
    sysroot = proc.stdout.strip().splitlines()[-1]
    print(f"\narm64 sysroot {sysroot} ready in {time.perf_counter() - t0:.1f} s")
    return [qemu, "-L", sysroot], f"{sysroot}/usr/bin/python3.11"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from edgekit.pipeline import run

    root = tmp_path_factory.mktemp("arm64-run")
    recipe = root / "deploy.yaml"
    recipe.write_text(RECIPE)
    run("shufflenetv2-x0.5", str(recipe), out=root / "run", input_size=32, runs=10)
    return root / "run"


def test_rpi4_bundle_runs_on_arm64(arm64, run_dir, tmp_path):
    from edgekit.data import load_task
    from edgekit.deployment.bundle import build_bundle, extract_bundle
    from edgekit.runtime import load_runner

    launcher, python = arm64
    t_start = time.perf_counter()
    tar = build_bundle(run_dir, "rpi4", tmp_path / "rpi4.tar.gz", wheel_cache=user_cache() / "wheels")
    d = extract_bundle(tar, tmp_path / "device")
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["arch"] == "aarch64" and manifest["artifact"]["path"] == "model.int8.onnx"

    # install.sh: venv with the arm64 Python, the bundle's aarch64 wheels, offline
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": python,
           "EDGEKIT_LAUNCHER": " ".join(launcher), "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": "/dev/null"}
    t0 = time.perf_counter()
    proc = subprocess.run(["sh", str(d / "install.sh")], capture_output=True, text=True, env=env, timeout=900)
    t_install = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads((d / "runner-info.json").read_text())
    assert info["machine"] == "aarch64" and info["runtimes"]["onnxruntime"] is True, info
    site = next((d / "venv" / "lib").glob("python3.11/site-packages"))
    ort_libs = list(site.glob("onnxruntime/capi/onnxruntime_pybind11_state*.so"))
    assert ort_libs and b"\x7fELF" == ort_libs[0].read_bytes()[:4]
    assert ort_libs[0].read_bytes()[18] == 183  # e_machine EM_AARCH64: the arm64 wheel was installed

    # predictions on eval images: the device runner (arm64) vs this machine's ONNX Runtime (x86_64)
    task = load_task("mnist", input_size=32)
    x, y = task.arrays("eval", limit=6)
    vpy = str(d / "venv" / "bin" / "python")
    results = {}
    t0 = time.perf_counter()
    for model, n, atol in (("model.int8.onnx", 6, 0.05), ("model.fp32.onnx", 3, 1e-3)):
        host = load_runner("onnxruntime", d / model, threads=1)
        for i in range(n):
            inp, out = tmp_path / f"in{i}.npy", tmp_path / f"{model}.{i}.npy"
            np.save(inp, x[i:i + 1])
            p = subprocess.run([*launcher, vpy, str(d / "runner.py"), "predict", str(d / model), str(inp), str(out),
                                "--threads", "1"], capture_output=True, text=True, env=env, timeout=300)
            assert p.returncode == 0, p.stdout + p.stderr
            res = json.loads(p.stdout.strip().splitlines()[-1])
            assert res["machine"] == "aarch64" and res["runtime"] == "onnxruntime" and res["version"] == "1.32.0"
            dev_logits = np.load(out).reshape(-1)
            host_logits = np.asarray(host.run(x[i:i + 1])).reshape(-1)
            assert dev_logits.argmax() == host_logits.argmax(), (model, i, dev_logits, host_logits)
            diff = float(np.abs(dev_logits - host_logits).max())
            assert diff <= atol, (model, i, diff)
            results.setdefault(model, []).append(diff)
    t_predict = time.perf_counter() - t0

    # the bundle's own run.sh (bench) on arm64
    p = subprocess.run(["sh", str(d / "run.sh"), "bench", "--runs", "3", "--warmup", "1", "--threads", "1"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    bench = json.loads(p.stdout.strip().splitlines()[-1])
    assert bench["machine"] == "aarch64" and bench["runs"] == 3
    print(f"\narm64 (qemu-user): bundle {tar.stat().st_size / 2**20:.1f} MiB; install {t_install:.0f} s; "
          f"{sum(map(len, results.values()))} predicts in {t_predict:.0f} s; max |logit diff| vs host ORT: "
          + ", ".join(f"{m} {max(v):.2e}" for m, v in results.items())
          + f"; emulated p50 {bench['p50']:.1f} ms; total {time.perf_counter() - t_start:.0f} s")
