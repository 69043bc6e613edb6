"""The device pool: two SSH "boards" of one device (two sshd servers on 127.0.0.1) measure a sweep's cells on a
local Ray instance. One board never runs two measurements at once (the runner's own timestamps say so), and a
board whose server is killed mid-sweep (after it finished one cell) is marked down while the other board finishes
the sweep."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sweep")]

PLAIN = "variants:\n  - {format: onnx, precision: fp32}\naccuracy_budget_pp: 1.0\n"
INT8 = ("variants:\n  - {format: onnx, precision: fp32}\n"
        "  - {format: onnx, precision: int8, options: {num_calib: 64, search: none}}\naccuracy_budget_pp: 1.0\n")


def _intervals(report: dict):
    for v in report["variants"]:
        lat = v.get("latency_ms") or {}
        if v["status"] == "ok" and "started" in lat:
            yield lat["host"], lat["started"], lat["finished"]


def _tiny_onnx(path: Path, width: int) -> Path:
    import torch
    from torch import nn

    from edgekit.export.onnx import export_onnx

    torch.manual_seed(width)
    net = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(width, 10)).eval()
    return export_onnx(net, path, (1, 3, 32, 32))


def test_two_boards_share_cells_never_overlap_and_a_dead_board_is_routed_around(sshd, tmp_path):
    import json

    from edgekit.sweep import sweep

    a_proc, a_port, _ = sshd.spawn("board-a")
    b_proc, b_port, _ = sshd.spawn("board-b")
    a, b = f"{sshd.user}@127.0.0.1:{a_port}", f"{sshd.user}@127.0.0.1:{b_port}"
    seen_a = threading.Event()
    try:
        rpi4 = (Path(__file__).parents[1] / "edgekit/devices/rpi4.yaml").read_text()
        board = tmp_path / "lab-pi.yaml"
        # the "boards" are this machine: one thread each, so two boards timing at once do not crowd its cores
        board.write_text(rpi4.replace("aliases:", "name: lab-pi\naliases:", 1).replace("threads: 4", "threads: 1") + (
            f"ssh:\n  host: 127.0.0.1\n  key: {sshd.key}\n  known_hosts: {sshd.known_hosts}\n"
            f"  python: {sys.executable}\n  workdir: {sshd.root / 'remote'}\n  connect_timeout: 5\n"
            f"  command_timeout: 300\n"))
        (tmp_path / "plain.yaml").write_text(PLAIN)
        (tmp_path / "int8-fast.yaml").write_text(INT8)
        models = [str(_tiny_onnx(tmp_path / f"tiny{w}.onnx", w)) for w in (8, 16)]  # no training: builds are quick

        def kill_board_a_once_it_finished_a_cell():
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if any(f'"board": "{a}"' in p.read_text(errors="replace")
                       for p in (tmp_path / "out" / "cells").glob("*/report.json")):
                    seen_a.set()
                    a_proc.terminate()
                    return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_board_a_once_it_finished_a_cell, daemon=True)
        killer.start()
        s = sweep(models=models, recipes=[str(tmp_path / "plain.yaml"), str(tmp_path / "int8-fast.yaml")],
                  devices=[str(board)], hosts={"lab-pi": [a, b]}, runs=20, out=tmp_path / "out")
        killer.join(timeout=5)
    finally:
        for p in (a_proc, b_proc):
            p.terminate()
            p.wait(timeout=10)
    data = s.to_json()
    assert seen_a.is_set(), f"board a finished no cell: {data['cells']}"
    assert data["counts"]["ok"] == 4 and data["counts"]["failed"] == 0, data["cells"]
    assert [d["board"] for d in data["boards_down"]] == [a]
    assert "connection refused" in data["boards_down"][0]["error"]
    by_board = {}
    for c in s.cells:
        report = json.loads((Path(c["folder"]) / "report.json").read_text())
        assert {v["latency_ms"]["source"] for v in report["variants"] if v["status"] == "ok"} == {"measured-ssh"}
        assert report["sweep"]["board"] == c["board"]
        for host, start, end in _intervals(report):
            assert host == c["board"]
            by_board.setdefault(host, []).append((start, end))
    assert set(by_board) == {a, b}, "both boards measured: a until it was killed, b the rest"
    assert sum(c["board"] == b for c in s.cells) >= 2
    for host, spans in by_board.items():
        spans.sort()
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:])), f"measurements overlap on {host}"
