"""A sweep on a real local Ray instance: 2 models x 2 recipes x 2 devices (desktop-cpu measured here, rpi4
estimated) on the default task, plus an ONNX model whose SVD cells cannot run; then the same sweep again."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sweep")]

# Both recipes train the baseline alike (train: epochs 1), so each model's baseline is trained once for both.
INT8 = ("train: {epochs: 1}\nvariants:\n  - {format: onnx, precision: fp32}\n"
        "  - {format: onnx, precision: int8, options: {num_calib: 64, search: none}}\naccuracy_budget_pp: 1.0\n")
SVD = ("train: {epochs: 1}\nsteps:\n  - svd: {macs: 0.7}\n"
       "variants:\n  - {format: onnx, precision: fp32}\naccuracy_budget_pp: 2.0\n")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    import torch
    from torch import nn

    from edgekit.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("sweep")
    (root / "int8-fast.yaml").write_text(INT8)
    (root / "svd-fast.yaml").write_text(SVD)
    torch.manual_seed(0)
    tiny = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10)).eval()
    export_onnx(tiny, root / "tiny.onnx", (1, 3, 32, 32))
    return root


def _run(root):
    from edgekit.sweep import sweep

    return sweep(models=["micronet-m1", "shufflenetv2-x0.5", str(root / "tiny.onnx")],
                 recipes=[str(root / "int8-fast.yaml"), str(root / "svd-fast.yaml")],
                 devices=["desktop-cpu", "rpi4"], input_size=32, runs=20, out=root / "out")


def test_sweep_runs_cells_on_ray_shares_work_and_reports_failures(grid):
    import ray

    s = _run(grid)
    data = s.to_json()
    assert data["engine"] == "ray" and data["ray_version"] == ray.__version__ and data["address"] == "local"
    assert data["counts"] == {"ok": 10, "failed": 2, "not-measured": 0, "resumed": 0}
    failed = [c for c in s.cells if c["status"] == "failed"]
    assert {(c["model"].endswith("tiny.onnx"), c["recipe"].endswith("svd-fast.yaml")) for c in failed} == {(True, True)}
    assert all("need the PyTorch model" in c["error"] for c in failed)
    ok = [c for c in s.cells if c["status"] == "ok"]
    for c in ok:
        report = json.loads((grid / "out" / "cells" / c["folder"].split("/cells/")[1] / "report.json").read_text())
        assert report["device"] == c["device"]
        sources = {v["latency_ms"]["source"] for v in report["variants"] if v["status"] == "ok"}
        assert sources == ({"measured"} if c["device"] == "desktop-cpu" else {"estimated"})
        assert all((grid / "out" / "cells" / c["folder"].split("/cells/")[1] / v["path"]).is_file()
                   for v in report["variants"] if v["status"] == "ok")
        if "tiny" not in c["model"]:
            # the baseline was trained once, by the sweep's baseline task: every build read it from the cache
            assert report["model_info"]["baseline"]["cached"] is True, c
    steps = [c for c in ok if c["recipe"].endswith("svd-fast.yaml")]
    assert len(steps) == 4 and all(c["best"] is not None or c["variants"] for c in steps)
    desk = s.devices["desktop-cpu"]
    assert {d["metric"] for d in desk} == {"accuracy", "agreement"}, "MNIST models by accuracy, the ONNX by agreement"
    acc = next(d for d in desk if d["metric"] == "accuracy")
    assert acc["pareto"] and set(map(id, acc["pareto"])) <= set(map(id, acc["points"]))
    html = (grid / "out" / "sweep.html").read_text()
    assert html.count("<svg") == len(data["devices"]) and "target" in html
    assert "| micronet-m1 |" in (grid / "out" / "sweep.md").read_text()
    assert not (grid / "out" / ".work").exists(), "builds are removed once the cells are published"


def test_sweep_again_skips_every_finished_cell(grid):
    before = {p: p.stat().st_mtime_ns for p in (grid / "out" / "cells").glob("*/report.json")}
    assert len(before) == 10
    s = _run(grid)
    assert s.to_json()["counts"] == {"ok": 10, "failed": 2, "not-measured": 0, "resumed": 10}
    assert {p: p.stat().st_mtime_ns for p in (grid / "out" / "cells").glob("*/report.json")} == before


def _cli(*args, **kw):
    import subprocess
    import sys
    from pathlib import Path

    edgekit = Path(sys.executable).with_name("edgekit")
    return subprocess.Popen([str(edgekit), "sweep", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def test_ctrl_c_keeps_only_whole_cells(grid):
    import os
    import signal
    import time

    from edgekit.fsutil import MARKER

    out = grid / "interrupted"
    proc = _cli("-m", "micronet-m1,shufflenetv2-x0.5", "-r", grid / "int8-fast.yaml", "-d", "desktop-cpu,rpi4",
                "--input-size", 32, "--runs", 20, "--out", out)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not list((out / "cells").glob("*/report.json")):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    cells = list((out / "cells").iterdir())
    assert cells and len(cells) < 4, "some cells finished, not all"
    for c in cells:
        assert not c.name.startswith("."), f"a half-written cell was left: {c.name}"
        assert (c / MARKER).is_file() and (c / "report.json").is_file()
    assert not (out / ".work").exists()


def test_sweep_on_a_ray_cluster_address(grid, tmp_path):
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from edgekit.errors import EdgekitError
    from edgekit.sweep import sweep

    ray_cli = str(Path(sys.executable).with_name("ray"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**__import__("os").environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--num-cpus", "2", "--resources", '{"edgekit-local": 1}', "--include-dashboard", "false",
                    "--disable-usage-stats"], check=True, capture_output=True, env=env, timeout=180)
    try:
        address = f"127.0.0.1:{port}"
        with pytest.raises(EdgekitError, match="lacks the resources edgekit-board-pi-10.0.0.5"):
            sweep(models=[str(grid / "tiny.onnx")], recipes=[str(grid / "int8-fast.yaml")], devices=["rpi4"],
                  hosts={"rpi4": ["pi@10.0.0.5"]}, address=address, out=tmp_path / "refused")
        s = sweep(models=[str(grid / "tiny.onnx")], recipes=[str(grid / "int8-fast.yaml")],
                  devices=["desktop-cpu", "rpi4"], address=address, runs=20, out=tmp_path / "cluster")
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, env=env, timeout=120)
    assert s.to_json()["address"] == address
    assert s.to_json()["counts"]["ok"] == 2, s.cells


def test_sweep_file_with_every_board_down_reports_not_measured(grid, tmp_path):
    import socket
    from pathlib import Path

    with socket.socket() as s:  # a port nobody listens on: the board is down from the start
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    rpi4 = (Path(__file__).parents[1] / "edgekit/devices/rpi4.yaml").read_text()
    (tmp_path / "lab.yaml").write_text(rpi4.replace("aliases:", "name: lab\naliases:", 1)
                                       + "ssh:\n  host: 127.0.0.1\n  connect_timeout: 5\n")
    (tmp_path / "sweep.yaml").write_text(
        f"models: [{grid / 'tiny.onnx'}]\nrecipes: [{grid / 'int8-fast.yaml'}]\ndevices: [lab.yaml, rpi4]\n"
        f"hosts: {{lab: ['nobody@127.0.0.1:{closed}']}}\nruns: 20\nout: result\n")
    proc = _cli(tmp_path / "sweep.yaml")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-2000:]
    s = json.loads((tmp_path / "result" / "sweep.json").read_text())
    by = {c["device"]: c for c in s["cells"]}
    assert by["rpi4"]["status"] == "ok"
    assert by["lab"]["status"] == "not-measured" and "every board of lab is down" in by["lab"]["error"]
    assert [d["board"] for d in s["boards_down"]] == [f"nobody@127.0.0.1:{closed}"]
    assert "not-measured" in stdout and not (tmp_path / "result" / "cells" / "tiny-int8-fast-lab").exists()
