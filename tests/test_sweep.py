"""`edgekit sweep`: the grid's checks, its plan (shared builds, resumption keys), its summary, and bad input.

The sweep on a real local Ray instance is in test_sweep_ray.py; the board pool over SSH in test_sweep_pool.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.errors import EdgekitError
from edgekit.fsutil import MARKER
from edgekit.sweep import SWEEP_MARKER, make_spec
from edgekit.sweep.plan import CELL_KIND, cell_done, make_plan
from edgekit.sweep.results import device_summaries, pareto
from edgekit.sweep.spec import CheckedSweep

runner = CliRunner()


def _checked(**fields):
    return CheckedSweep(make_spec(**{"models": ["micronet-m1"], "recipes": ["int8"], "devices": ["rpi4"],
                                     **fields}))


def test_sweep_file_fields_lines_and_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "fast.yaml").write_text("variants:\n  - {format: onnx, precision: fp32}\n")
    f = tmp_path / "sweep.yaml"
    f.write_text("models: [micronet-m1]\nrecipes: [int8, sub/fast.yaml]\ndevices: [rpi4]\nout: results\n")
    spec = make_spec(f)
    assert spec.recipes == ["int8", str(tmp_path / "sub" / "fast.yaml")]
    assert spec.out == str(tmp_path / "results")
    assert make_spec(f, runs=50).runs == 50  # a command-line option replaces the file's field
    f.write_text("models: [micronet-m1]\nrecipes: [int8]\ndevices: [rpi4]\nruns: 5\n")
    with pytest.raises(EdgekitError, match=r"Invalid sweep file .*runs.*line 4.*from 10 to"):
        make_spec(f)
    f.write_text("models: [micronet-m1]\nrecipes: [int8]\ndevices: [rpi4]\nthreads: 2\n")
    with pytest.raises(EdgekitError, match="threads"):
        make_spec(f)


@pytest.mark.parametrize("fields, message", [
    ({"models": []}, "models"),
    ({"devices": ["rpi4", "rpi4"]}, "twice"),
    ({"recipes": ["nosuch"]}, "Unknown recipe"),
    ({"models": ["nosuchnet"]}, "Unknown model"),
    ({"hosts": {"rpi5": ["pi@10.0.0.5"]}}, "not one of the sweep's devices"),
    ({"hosts": {"rpi4": ["pi@10.0.0.5"]}, "devices": ["rpi4", "rpi5"],
      "recipes": ["int8"]}, None),
    ({"hosts": {"rpi4": ["pi@10.0.0.5"], "rpi5": ["pi@10.0.0.5:22"]}, "devices": ["rpi4", "rpi5"]}, "listed for"),
    ({"hosts": {"desktop-cpu": ["me@127.0.0.1"]}, "devices": ["desktop-cpu"]}, "this machine"),
    ({"hosts": {"rpi4": ["pi@@x"]}}, "Cannot parse host"),
    ({"data": "/nonexistent/data"}, "Data folder not found"),
])
def test_bad_grids_are_refused_before_anything_runs(fields, message):
    if message is None:
        assert _checked(**fields).boards["rpi4"][0].host == "10.0.0.5"
        return
    with pytest.raises(EdgekitError, match=message):
        _checked(**fields)


def test_plan_shares_baselines_and_builds_by_export_signature(tmp_path):
    twin = tmp_path / "rpi4-lab.yaml"  # rpi4 with another latency target: same files, another cell
    twin.write_text((Path(__file__).parents[1] / "edgekit/devices/rpi4.yaml").read_text()
                    .replace("latency_target_ms: 30", "latency_target_ms: 20"))
    sweep = _checked(models=["micronet-m1", "shufflenetv2-x0.5"], recipes=["int8", "svd"],
                     devices=["desktop-cpu", "rpi4", str(twin)])
    plan = make_plan(sweep, tmp_path / "out")
    assert len(plan.cells) == 12 and len(plan.todo) == 12
    assert len(plan.baselines) == 2, "int8 and svd train the baseline alike: one per model"
    assert len(plan.builds) == 6, "int8: x86 and ARM get their own files, the two rpi4 profiles share theirs; " \
                                  "svd: one build serves every device"
    by = {(c.model, c.recipe, c.device_name): c for c in plan.cells}
    assert by[("micronet-m1", "int8", "rpi4")].build == by[("micronet-m1", "int8", "rpi4-lab")].build
    assert by[("micronet-m1", "int8", "rpi4")].build != by[("micronet-m1", "int8", "desktop-cpu")].build
    assert by[("micronet-m1", "svd", "rpi4")].build == by[("micronet-m1", "svd", "desktop-cpu")].build
    assert len({c.key for c in plan.cells}) == 12 and len({c.folder for c in plan.cells}) == 12
    again = make_plan(_checked(models=["micronet-m1", "shufflenetv2-x0.5"], recipes=["int8", "svd"],
                               devices=["desktop-cpu", "rpi4", str(twin)], runs=200), tmp_path / "out")
    assert {c.key for c in again.cells}.isdisjoint({c.key for c in plan.cells}), "runs is an input of every cell"


def _finished(folder: Path, key: str) -> None:
    folder.mkdir(parents=True)
    (folder / "report.json").write_text("{}")
    (folder / MARKER).write_text(json.dumps({"written_by": "edgekit", "kind": CELL_KIND, "key": key}))


def test_a_cell_is_done_only_with_its_key_in_a_real_folder(tmp_path):
    _finished(tmp_path / "a", "k1")
    assert cell_done(tmp_path / "a", "k1")
    assert not cell_done(tmp_path / "a", "k2"), "changed inputs: run again"
    os.symlink(tmp_path / "a", tmp_path / "link")
    assert not cell_done(tmp_path / "link", "k1"), "a symlinked cell is never trusted"
    _finished(tmp_path / "b", "k1")
    (tmp_path / "b" / "report.json").unlink()
    assert not cell_done(tmp_path / "b", "k1")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "report.json").write_text("{}")
    (tmp_path / "c" / MARKER).write_text("x" * 100_000)
    assert not cell_done(tmp_path / "c", "k1")


def test_pareto_front_and_best_under_target():
    def pt(p50, score, label, metric="accuracy"):
        return {"p50_ms": p50, "score": score, "label": label, "metric": metric}

    pts = [pt(5, 0.90, "a"), pt(3, 0.80, "b"), pt(4, 0.95, "c"), pt(8, 0.96, "d"), pt(6, 0.94, "e")]
    assert [p["label"] for p in pareto(pts)] == ["b", "c", "d"]
    rows = [{"device": "rpi4", "status": "ok", "model": "m", "model_label": "m", "recipe": "r", "metric": "accuracy",
             "variants": [{"name": "fp32", "format": "onnx", "precision": "fp32", "score": 0.9, "p50_ms": 9.0,
                           "p90_ms": 10.0, "latency_source": "estimated"},
                          {"name": "int8", "format": "onnx", "precision": "int8", "score": 0.89, "p50_ms": 4.0,
                           "p90_ms": 5.0, "latency_source": "estimated"}]},
            {"device": "rpi4", "status": "ok", "model": "x.onnx", "model_label": "x", "recipe": "r",
             "metric": "agreement", "variants": [{"name": "fp32", "format": "onnx", "precision": "fp32",
                                                  "score": 1.0, "p50_ms": 1.0, "p90_ms": 1.0,
                                                  "latency_source": "estimated"}]}]
    acc, agree = device_summaries(rows, {"rpi4": 5.0})
    assert acc["metric"] == "accuracy" and agree["metric"] == "agreement", "two scores are never one front"
    assert acc["best_under_target"]["label"] == "m r (int8)"
    assert [p["label"] for p in acc["pareto"]] == ["m r (int8)", "m fp32"]
    none = device_summaries(rows, {"rpi4": 0.5})[0]
    assert none["best_under_target"] is None


def test_cli_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path):
    other = tmp_path / "project"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    cases = [
        (["sweep"], "needs --models"),
        (["sweep", "-m", "micronet-m1", "-r", "int8", "-d", "rpi4", "--host", "rpi4"], "expected DEVICE="),
        (["sweep", "-m", "micronet-m1", "-r", "int8", "-d", "rpi4", "--out", str(other)], "not a sweep's folder"),
        (["sweep", str(tmp_path / "none.yaml")], "Sweep file not found"),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_symlinked_cells_folder_is_refused(tmp_path):
    from edgekit.sweep import sweep

    out = tmp_path / "out"
    out.mkdir()
    (out / SWEEP_MARKER).write_text("{}")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "cells")
    with pytest.raises(EdgekitError, match="not a folder edgekit made"):
        sweep(models=["micronet-m1"], recipes=["int8"], devices=["rpi4"], out=out)
    assert list((tmp_path / "elsewhere").iterdir()) == []
