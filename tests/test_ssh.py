"""Latency over SSH against a real OpenSSH server on 127.0.0.1 (the ``sshd`` fixture in conftest.py).

The "device" is this machine: the runner is copied into a per-run temporary folder and run there with
the test venv's python. Every failure a user can meet ends in one clear EdgekitError.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from edgekit.config import DeviceProfile
from edgekit.errors import EdgekitError
from edgekit.measure import profile_artifact
from edgekit.estimate.micro import Micro, build_micro
from edgekit.measure.ssh import parse_target, profile_remote, spec_for_target


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ssh-model") / "block.onnx"
    onnx.save(build_micro(Micro("mbblock", 16, 16, 3, 1, 3)), str(path))
    return path


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A python with neither numpy nor onnxruntime: a device where the runtime is missing."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    py = venv / "bin" / "python"
    assert subprocess.run([str(py), "-c", "import onnxruntime"], capture_output=True).returncode != 0
    return str(py)


def _remote_dirs(sshd):
    return list((sshd.root / "remote").glob("run.*"))


# ----------------------------------------------------------------------------- targets (no server needed)


@pytest.mark.parametrize("target, expected", [
    ("pi@10.0.0.5", ("pi", "10.0.0.5", None)),
    ("pi@raspberrypi.local:2222", ("pi", "raspberrypi.local", 2222)),
    ("jetson", (None, "jetson", None)),
    ("root@[::1]:22", ("root", "::1", 22)),
])
def test_parse_target(target, expected):
    assert parse_target(target) == expected


@pytest.mark.parametrize("bad", ["pi@", "@host", "pi@host:99999", "-oProxyCommand=x", "a b@host", "pi@host:port"])
def test_parse_target_rejects(bad):
    with pytest.raises(EdgekitError, match="host|Port"):
        parse_target(bad)


def test_target_overrides_only_the_address(sshd):
    base = sshd.spec(python="/opt/py")
    spec = spec_for_target("me@example.org:2200", base)
    assert (spec.user, spec.host, spec.port) == ("me", "example.org", 2200)
    assert (spec.key, spec.known_hosts, spec.python) == (base.key, base.known_hosts, "/opt/py")


# ----------------------------------------------------------------------------- against the real sshd


def test_remote_benchmark_returns_numbers_and_cleans_up(sshd, model):
    lat = profile_remote(model, sshd.spec(python=sys.executable), threads=1, warmup=2, runs=10)
    assert lat.source == "measured-ssh" and lat.measured
    assert lat.runtime == "onnxruntime" and lat.threads == 1 and lat.runs == 10 and lat.runtime_version
    r = lat.to_json()
    assert 0 < r["min"] <= r["p50"] <= r["p90"]
    assert r["host"] == f"{sshd.user}@127.0.0.1:{sshd.port}"
    assert r["machine"] and r["python"] and r["version"] and r["artifact_bytes"] > 0
    assert _remote_dirs(sshd) == [], "the per-run folder is removed"


def test_profile_artifact_with_host_goes_over_ssh(sshd, model):
    dev = DeviceProfile(name="pi-like", arch="aarch64", cores=4, peak_gops={"fp32": 48},
                        ssh=sshd.spec(python=sys.executable, host="unused.invalid", port=22))
    r = profile_artifact(model, dev, host=f"{sshd.user}@127.0.0.1:{sshd.port}", threads=1, runs=5, warmup=1)
    assert r.source == "measured-ssh" and r.device == "pi-like"


def test_hostile_names_are_quoted(sshd, tmp_path):
    """A model name and a workdir full of shell syntax reach the device as plain strings."""
    weird = tmp_path / "m; touch INJECTED $(touch INJECTED2).onnx"
    onnx.save(build_micro(Micro("pwconv", 8, 8, 1, 1)), str(weird))
    workdir = sshd.root / "remote" / "dir with 'quotes' $(touch INJECTED3)"
    r = profile_remote(weird, sshd.spec(python=sys.executable, workdir=str(workdir)), threads=1, warmup=0, runs=2)
    assert r.runs == 2
    assert workdir.is_dir() and list(workdir.iterdir()) == []
    for name in ("INJECTED", "INJECTED2", "INJECTED3"):
        assert not (Path.home() / name).exists() and not list(sshd.root.rglob(name))


def test_wrong_key_is_an_authentication_error(sshd, model):
    with pytest.raises(EdgekitError, match=r"SSH authentication failed for .*127\.0\.0\.1.*wrong_ed25519"):
        profile_remote(model, sshd.spec(key=str(sshd.wrong_key)), threads=1, runs=1)


def test_closed_port_is_unreachable(sshd, model):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(EdgekitError, match=rf"Cannot reach .*127\.0\.0\.1:{port}: connection refused"):
        profile_remote(model, sshd.spec(port=port), threads=1, runs=1)


def test_changed_host_key_is_refused(sshd, model):
    with pytest.raises(EdgekitError, match="host key mismatch.*man-in-the-middle"):
        profile_remote(model, sshd.spec(known_hosts=str(sshd.other_known_hosts)), threads=1, runs=1)


def test_unknown_host_key_is_refused(sshd, model):
    with pytest.raises(EdgekitError, match=r"host key of .* is unknown.*ssh-keyscan -p \d+ 127\.0\.0\.1"):
        profile_remote(model, sshd.spec(known_hosts=str(sshd.empty_known_hosts)), threads=1, runs=1)


def test_missing_runtime_on_the_device(sshd, model, bare_python):
    with pytest.raises(EdgekitError, match=r"no runtime for \.onnx on this device: install onnxruntime"):
        profile_remote(model, sshd.spec(python=bare_python), threads=1, runs=1)
    assert _remote_dirs(sshd) == []


def test_missing_python_on_the_device(sshd, model):
    with pytest.raises(EdgekitError, match=r"device python '/nonexistent/python3' was not found"):
        profile_remote(model, sshd.spec(python="/nonexistent/python3"), threads=1, runs=1)


def test_local_files_are_checked_before_connecting(sshd, model, tmp_path):
    with pytest.raises(EdgekitError, match="SSH key not found"):
        profile_remote(model, sshd.spec(key=str(tmp_path / "nokey")), runs=1)
    with pytest.raises(EdgekitError, match="known_hosts file not found"):
        profile_remote(model, sshd.spec(known_hosts=str(tmp_path / "nokh")), runs=1)
    with pytest.raises(EdgekitError, match="Model file not found"):
        profile_remote(tmp_path / "none.onnx", sshd.spec(), runs=1)


# ----------------------------------------------------------------------------- interrupted benchmarks

_PROFILE = """import json, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the test runner ignores Ctrl-C
from edgekit.config import SSHSpec
from edgekit.measure.ssh import profile_remote
profile_remote(sys.argv[1], SSHSpec(**json.loads(sys.argv[2])), threads=1, warmup=0, runs=int(sys.argv[3]))
"""


def _runners(runs: int) -> list:
    """Device processes of a benchmark with this (unique) run count."""
    out = subprocess.run(["pgrep", "-f", f"runner.py bench model.onnx --warmup 0 --runs {runs} "], capture_output=True,
                         text=True).stdout
    return out.split()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigint", "sigterm", "timeout"])
def test_interrupted_benchmark_stops_the_remote_runner(sshd, model, tmp_path, how):
    """`profile --host` interrupted (Ctrl-C to the process group; SIGINT to python alone, whose ssh client is then
    SIGKILLed; SIGTERM; the command timeout) while the runner benchmarks on the device: the runner's process group
    there is killed and its run folder removed. (Before, only a cleanly closed ssh session stopped it.)"""
    import os
    import signal
    import time

    runs = {"ctrl-c": 90000001, "sigint": 90000002, "sigterm": 90000003, "timeout": 90000004}[how]
    workdir = tmp_path / "work"
    spec = sshd.spec(python=sys.executable, workdir=str(workdir), command_timeout=4 if how == "timeout" else 900)
    proc = subprocess.Popen([sys.executable, "-c", _PROFILE, str(model), spec.model_dump_json(), str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not _runners(runs):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: the ssh client gets it too
    elif how in ("sigint", "sigterm"):
        proc.send_signal(signal.SIGINT if how == "sigint" else signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert ("did not finish within 4 s" if how == "timeout" else "KeyboardInterrupt") in err, err
    assert _runners(runs) == [], "the runner still runs on the device"
    assert list(workdir.iterdir()) == [], "the run folder is removed"
