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

PLAIN = "train: {epochs: 2}\nvariants:\n  - {format: onnx, precision: fp32}\naccuracy_budget_pp: 1.0\n"
INT8 = ("train: {epochs: 2}\nvariants:\n  - {format: onnx, precision: fp32}\n"
        "  - {format: onnx, precision: int8, options: {num_calib: 64, search: none}}\naccuracy_budget_pp: 1.0\n")


def _intervals(report: dict):
    for v in report["variants"]:
        lat = v.get("latency_ms") or {}
        if v["status"] == "ok" and "started" in lat:
            yield lat["host"], lat["started"], lat["finished"]


def test_two_boards_share_cells_never_overlap_and_a_dead_board_is_routed_around(sshd, tmp_path):
    import json

    from edgekit.sweep import sweep

    a_proc, a_port, _ = sshd.spawn("board-a")
    b_proc, b_port, _ = sshd.spawn("board-b")
    try:
        rpi4 = (Path(__file__).parents[1] / "edgekit/devices/rpi4.yaml").read_text()
        board = tmp_path / "lab-pi.yaml"
        board.write_text(rpi4.replace("aliases:", "name: lab-pi\naliases:", 1) + (
            f"ssh:\n  host: 127.0.0.1\n  key: {sshd.key}\n  known_hosts: {sshd.known_hosts}\n"
            f"  python: {sys.executable}\n  workdir: {sshd.root / 'remote'}\n  connect_timeout: 5\n"))
        (tmp_path / "plain.yaml").write_text(PLAIN)
        (tmp_path / "int8-fast.yaml").write_text(INT8)
        a, b = f"{sshd.user}@127.0.0.1:{a_port}", f"{sshd.user}@127.0.0.1:{b_port}"

        def kill_board_a_once_it_finished_a_cell():
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not any(
                    f'"board": "{a}"' in p.read_text(errors="replace")
                    for p in (tmp_path / "out" / "cells").glob("*/report.json")):
                time.sleep(0.05)
            a_proc.terminate()

        killer = threading.Thread(target=kill_board_a_once_it_finished_a_cell, daemon=True)
        killer.start()
        s = sweep(models=["micronet-m1", "shufflenetv2-x0.5"],
                  recipes=[str(tmp_path / "plain.yaml"), str(tmp_path / "int8-fast.yaml")],
                  devices=[str(board)], hosts={"lab-pi": [a, b]}, input_size=32, runs=20, out=tmp_path / "out")
        killer.join(timeout=5)
    finally:
        for p in (a_proc, b_proc):
            p.terminate()
            p.wait(timeout=10)
    data = s.to_json()
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
    assert set(by_board) == {a, b}, "both boards measured: one cell before board a was killed, the rest on b"
    assert sum(c["board"] == b for c in s.cells) >= 2
    for host, spans in by_board.items():
        spans.sort()
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:])), f"measurements overlap on {host}"
