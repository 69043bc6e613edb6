"""Device profiles: every built-in loads with a latency model; bad files end in one clear EdgekitError."""

from __future__ import annotations

import pytest

from edgekit.config import LatencyModel, SSHSpec, builtin_names, load_device
from edgekit.errors import EdgekitError


def test_every_builtin_profile_loads_with_a_latency_model():
    for name in builtin_names("devices"):
        dev = load_device(name)
        assert dev.name == name
        assert dev.peak_gops, name
        assert isinstance(dev.latency_model, LatencyModel)
        assert dev.latency_model.session_overhead_us >= 0


def test_desktop_cpu_is_local_and_calibrated():
    dev = load_device("desktop-cpu")
    assert dev.local
    lm = dev.latency_model
    assert lm.calibration.get("host"), "desktop-cpu coefficients come from calibrate_local"
    for key in ("pwconv.fp32", "dwconv.fp32", "pwconv.int8", "dwconv.int8"):
        assert lm.efficiency[key] > 0 and lm.overhead_us[key] >= 0


def test_unknown_device_name_suggests():
    with pytest.raises(EdgekitError, match=r"Unknown device 'rpi44'.*Did you mean: rpi4"):
        load_device("rpi44")


def test_missing_device_file(tmp_path):
    with pytest.raises(EdgekitError, match="Device file not found"):
        load_device(str(tmp_path / "nope.yaml"))


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("kind: cpu\ncores: [4\npeak_gops: {fp32: 1}\n")
    with pytest.raises(EdgekitError, match=r"Malformed YAML in .*bad.yaml line \d+"):
        load_device(str(p))


def test_bad_field_value_names_the_field(tmp_path):
    p = tmp_path / "dev.yaml"
    p.write_text("kind: cpu\ncores: -2\n")
    with pytest.raises(EdgekitError, match=r"field 'cores' \(line 2\)"):
        load_device(str(p))


def test_unknown_field_is_rejected(tmp_path):
    p = tmp_path / "dev.yaml"
    p.write_text("kind: cpu\ncorez: 4\n")
    with pytest.raises(EdgekitError, match="field 'corez'.*[Ee]xtra"):
        load_device(str(p))


def test_latency_model_values_are_checked(tmp_path):
    p = tmp_path / "dev.yaml"
    p.write_text("kind: cpu\nlatency_model:\n  efficiency: {conv: -0.5}\n")
    with pytest.raises(EdgekitError, match="latency_model.efficiency"):
        load_device(str(p))
    p.write_text("kind: cpu\nlatency_model:\n  overhead_us: {conv: -1}\n")
    with pytest.raises(EdgekitError, match="latency_model.overhead_us"):
        load_device(str(p))
    p.write_text("kind: cpu\nlatency_model:\n  int8_layout: nchwc\n")
    with pytest.raises(EdgekitError, match="latency_model.int8_layout"):
        load_device(str(p))


def test_ssh_block_is_validated(tmp_path):
    p = tmp_path / "pi.yaml"
    p.write_text("kind: cpu\narch: aarch64\nssh:\n  host: pi.local\n  port: 70000\n")
    with pytest.raises(EdgekitError, match=r"field 'ssh.port'"):
        load_device(str(p))
    p.write_text("kind: cpu\narch: aarch64\nssh:\n  host: pi.local\n  user: pi\n  known_hosts: ~/.ssh/kh\n"
                 "  connect_timeout: 3\n  python: /opt/venv/bin/python\n")
    dev = load_device(str(p))
    assert dev.ssh == SSHSpec(host="pi.local", user="pi", known_hosts="~/.ssh/kh", connect_timeout=3,
                              python="/opt/venv/bin/python")
    assert dev.name == "pi"
