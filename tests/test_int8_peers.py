"""bench/int8_peers.py's row-making functions on a small CNN at 32 px MNIST: the ORT-default, edgekit PTQ and NNCF rows
come out as files whose scores and timings are sane. NNCF is a bench-only extra (``.[bench]``), absent in CI: its
part is skipped there with the reason."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "bench" / "int8_peers.py"


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("int8_peers", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def _small_cnn() -> nn.Module:
    """conv-BN-ReLU, depthwise, pointwise, pool, linear: the shapes int8 quantizers treat specially, untrained (the
    rows only need the same fp32 function to compare against)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 32, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


@pytest.fixture(scope="module")
def bench(peers, small_task, tmp_path_factory):
    return peers.bench_from("small-cnn", _small_cnn(), small_task, tmp_path_factory.mktemp("peers"), threads=1,
                            num_calib=32, num_eval=64)


def _check(peers, b, rows):
    made = {k: peers.make_row(b, k, qat_epochs=1) for k in ("fp32", *rows)}
    for k, m in made.items():
        assert m.path.is_file() and m.seconds > 0, k
    scores = peers.score_rows(b, made)
    lat = peers.time_rows(b, made, rounds=10, warmup=2)
    assert scores["fp32"]["agreement"] == 1.0 and scores["fp32"]["sqnr_db"] is None  # identical: no noise
    for k in rows:
        s = scores[k]
        assert 0.0 <= s["agreement"] <= 1.0 and 0.0 <= s["top5_overlap"] <= 1.0 and 0.0 <= s["top1"] <= 1.0, k
        assert s["sqnr_db"] is not None and math.isfinite(s["sqnr_db"]) and s["sqnr_db"] > 5, (k, s)
        assert lat[k]["p50"] > 0 and lat[k]["p90"] >= lat[k]["p50"] and len(lat[k]["times"]) == 10, k
    return made, scores, lat


def test_ort_default_and_edgekit_ptq_rows(peers, bench):
    made, scores, lat = _check(peers, bench, ("ort-default", "edgekit-ptq"))
    assert "S8S8 per-tensor" in made["ort-default"].info["config"]
    assert made["edgekit-ptq"].info["calibration_sqnr_db"]  # calibration auto ran, and said what it tried
    assert "edgekit-ptq (2nd session)" in lat  # the A/A control


def test_nncf_row(peers, bench):
    pytest.importorskip("nncf", reason="nncf is a bench-only extra (pip install -e .[bench]); CI does not install it")
    made, scores, lat = _check(peers, bench, ("edgekit-ptq", "nncf", "nncf-mixed"))  # edgekit PTQ is made once
    assert "PERFORMANCE" in made["nncf"].info["config"] and "MIXED" in made["nncf-mixed"].info["config"]
    g = peers.goal_check({k: {"status": "ok", **s} for k, s in scores.items()}, lat, labelled=True)
    assert set(g["rows"]) == {"edgekit-ptq"} and g["holds"] is g["rows"]["edgekit-ptq"]["meets"]
    closer = max(peers.NNCF_ROWS, key=lambda k: (scores[k]["sqnr_db"], scores[k]["top1"]))
    assert g["nncf"] == closer and g["rows"]["edgekit-ptq"]["nncf_sqnr_db"] == scores[closer]["sqnr_db"]


def test_nncf_missing_is_one_row_not_a_stop(peers, bench, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_nncf(name, *a, **kw):
        if name == "nncf" or name.startswith("nncf."):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_nncf)
    with pytest.raises(peers.Unavailable, match=r"pip install -e \.\[bench\]"):
        peers.make_nncf(bench)
