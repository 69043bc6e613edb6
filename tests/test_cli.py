"""The CLI end to end on a short recipe, the report schema, and every bad input: exit 2, no output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgekit import zoo
from edgekit.cli import app
from edgekit.fsutil import MARKER

runner = CliRunner()
FAST = "description: fast test recipe\ntrain: {epochs: 3}\nvariants:\n  - {format: onnx, precision: fp32}\n" \
       "  - {format: onnx, precision: int8, options: {num_calib: 64}}\naccuracy_budget_pp: 1.0\n"
# The same int8 without the latency search (about 12 more quantizations, timed here): for tests about something
# else. The first run of test_compress_end_to_end_and_report_schema keeps it, as users get it.
NO_SEARCH = FAST.replace("num_calib: 64}", "num_calib: 64, search: none}")


@pytest.fixture()
def fast_recipe(tmp_path):
    p = tmp_path / "fast.yaml"
    p.write_text(FAST)
    return p


@pytest.fixture()
def no_search_recipe(tmp_path):
    p = tmp_path / "fast-no-search.yaml"
    p.write_text(NO_SEARCH)
    return p


def compress(*args):
    return runner.invoke(app, ["compress", *map(str, args)])


@pytest.mark.slow
def test_compress_end_to_end_and_report_schema(tmp_path, fast_recipe, no_search_recipe):
    out = tmp_path / "run"
    res = compress("shufflenetv2-x0.5", "--recipe", fast_recipe, "--input-size", 32, "--out", out, "--runs", 20)
    assert res.exit_code == 0, res.output
    assert "speedup" in res.output and "int8" in res.output
    assert {p.name for p in out.iterdir()} == {"model.fp32.onnx", "model.int8.onnx", "report.json", "report.md", MARKER,
                                              "report.html"}
    r = json.loads((out / "report.json").read_text())
    for key in ("edgekit_version", "model", "recipe", "device", "task", "versions", "variants", "target"):
        assert key in r
    assert r["model"] == "shufflenetv2-x0.5" and r["recipe"] == "fast" and r["device"] == "desktop-cpu"
    assert r["task"]["name"] == "mnist" and r["task"]["num_eval"] == 1000
    assert {"torch", "onnx", "onnxruntime"} <= set(r["versions"])
    assert [v["precision"] for v in r["variants"]] == ["fp32", "int8"]
    for v in r["variants"]:
        for key in ("name", "format", "precision", "path", "size_mb", "accuracy", "agreement", "latency_ms",
                    "params", "macs"):
            assert v[key] is not None, key
        assert (out / v["path"]).is_file()
        assert v["latency_ms"]["source"] == "measured" and v["latency_ms"]["p90"] >= v["latency_ms"]["p50"]
        assert v["latency_ms"]["runs"] == 20 and v["latency_ms"]["threads"] >= 1
        assert 0.5 < v["accuracy"] <= 1.0
    assert r["variants"][0]["agreement"] == 1.0
    assert set(r["target"]) >= {"latency_ms", "met"}
    assert "<svg" in (out / "report.html").read_text()
    assert "| int8 | onnx | int8 |" in (out / "report.md").read_text()
    assert len(r["variants"][1]["details"]["quantization"]["search"]) >= 2  # the int8 layouts timed here

    # An existing folder is not overwritten without --force ...
    res = compress("shufflenetv2-x0.5", "--recipe", fast_recipe, "--input-size", 32, "--out", out)
    assert res.exit_code == 2 and "--force" in res.output
    # ... and is replaced whole with it (the cached baseline makes this quick)
    (out / "stale.txt").write_text("old run")
    res = compress("shufflenetv2-x0.5", "--recipe", no_search_recipe, "--input-size", 32, "--out", out, "--force",
                   "--runs", 10)
    assert res.exit_code == 0, res.output
    assert not (out / "stale.txt").exists()
    r = json.loads((out / "report.json").read_text())
    assert r["model_info"]["baseline"]["cached"] is True
    assert "search" not in r["variants"][1]["details"]["quantization"]  # search: none


@pytest.mark.slow
def test_user_weights_flow(tmp_path, no_search_recipe):
    torch.manual_seed(0)
    w = tmp_path / "w.pth"
    torch.save(zoo.create("shufflenetv2-x0.5", num_classes=10).state_dict(), w)
    out = tmp_path / "run"
    res = compress("shufflenetv2-x0.5", "--recipe", no_search_recipe, "--input-size", 32, "--weights", w, "--out",
                   out, "--runs", 10)
    assert res.exit_code == 0, res.output
    r = json.loads((out / "report.json").read_text())
    assert r["model_info"]["baseline"]["source"] == "file"


def _bad(tmp_path, *args, match):
    out = tmp_path / "never"
    res = runner.invoke(app, ["compress", *map(str, args), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert match in res.output, res.output
    assert "Traceback" not in res.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]  # no temp folder left either
    return res


def test_bad_inputs_exit_2_without_output(tmp_path):
    _bad(tmp_path, "shufflenet", match="Did you mean")
    _bad(tmp_path, "shufflenetv2", "--recipe", "int9", match="Unknown recipe 'int9'")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("variants:\n  - format: onnx\n   precision: int8\n")
    _bad(tmp_path, "shufflenetv2", "--recipe", bad_yaml, match="line")
    _bad(tmp_path, "shufflenetv2", "--data", tmp_path / "missing", match="Data folder not found")
    _bad(tmp_path, "shufflenetv2", "--weights", tmp_path / "missing.pth", match="Weights file not found")
    _bad(tmp_path, "shufflenetv2", "--device", "rpi9", match="Unknown device")
    _bad(tmp_path, "shufflenetv2", "--target-ms", -1, match="positive")


@pytest.mark.slow
def test_corrupt_and_mismatched_weights_exit_2(tmp_path, fast_recipe):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage")
    _bad(tmp_path, "shufflenetv2-x0.5", "--recipe", fast_recipe, "--input-size", 32, "--weights", corrupt,
         match="Cannot read weights file")
    other = tmp_path / "other.pth"
    torch.save(zoo.create("squeezenet1.1", num_classes=10).state_dict(), other)
    _bad(tmp_path, "shufflenetv2-x0.5", "--recipe", fast_recipe, "--input-size", 32, "--weights", other,
         match="does not fit the model")


def test_list_commands():
    for cmd, expect in ((["zoo", "list"], "shufflenetv2-x1.0"), (["recipes", "list"], "int8"),
                        (["devices", "list"], "rpi4")):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 0, res.output
        assert expect in res.output
    res = runner.invoke(app, ["compress", "--help"])
    assert res.exit_code == 0 and "--recipe" in res.output


def test_zoo_list_shows_the_matrix_columns():
    from edgekit.zoo import matrix as zm

    res = runner.invoke(app, ["zoo", "list", "--markdown"])
    assert res.exit_code == 0, res.output
    header = res.output.splitlines()[0]
    assert all(f" {c} " in header for c in zm.COLUMNS)
    row = next(line for line in res.output.splitlines() if line.startswith("| shufflenetv2-x1.0 |"))
    entry = zm.load_matrix()["models"]["shufflenetv2-x1.0"]
    assert row.rstrip(" |").endswith(zm.cell(entry["svd"], "svd"))


def test_imagefolder_data(tmp_path):
    """--data with an ImageNet-val style tree: real PNG files decoded, resized and split."""
    np = pytest.importorskip("numpy")
    from PIL import Image

    from edgekit.data import load_task

    rng = np.random.default_rng(0)
    for cls in ("n01", "n02"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(6):
            arr = (rng.random((40, 50, 3)) * 255).astype("uint8")
            Image.fromarray(arr).save(tmp_path / "val" / cls / f"{i}.png")
    task = load_task(data=str(tmp_path / "val"), input_size=32, num_calib=4)
    assert task.num_classes == 2 and task.class_names == ["n01", "n02"]
    x, y = task.arrays("eval")
    # a single tree: calibration takes at most a quarter, half of the rest is evaluated, the other half trains;
    # no image is in two splits, and every image is in one
    assert x.shape[1:] == (3, 32, 32) and set(y) <= {0, 1}
    assert (task.size("calib"), len(x), task.size("train")) == (3, 4, 5)
    files = {k: {p for p, _ in task.splits[k].items} for k in ("train", "calib", "eval")}
    assert not (files["calib"] & files["eval"] or files["train"] & files["eval"] or files["train"] & files["calib"])
    assert len(set().union(*files.values())) == 12
    (tmp_path / "empty").mkdir()
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError, match="no class sub-folders"):
        load_task(data=str(tmp_path / "empty"))


@pytest.mark.slow
def test_a_device_that_is_not_this_machine_gets_labelled_estimates(tmp_path, fast_recipe):
    """--device rpi4 --target-ms: every ONNX variant gets an estimated p50, the target is checked on it, and the
    terminal, report.md and report.json all say it is an estimate."""
    from edgekit.estimate import estimate

    out = tmp_path / "rpi"
    res = compress("shufflenetv2-x0.5", "--recipe", fast_recipe, "--input-size", 32, "--out", out,
                   "--device", "rpi4", "--target-ms", 1000)
    assert res.exit_code == 0, res.output
    assert "ESTIMATED" in res.output
    r = json.loads((out / "report.json").read_text())
    assert r["device"] == "rpi4"
    for v in r["variants"]:
        lat = v["latency_ms"]
        assert lat["source"] == "estimated" and lat["device"] == "rpi4" and lat["threads"] == 4
        assert lat["p50"] == pytest.approx(estimate(out / v["path"], "rpi4").p50, rel=1e-3)
    fp32, int8 = (v["latency_ms"]["p50"] for v in r["variants"])
    assert r["variants"][1]["speedup"] == pytest.approx(fp32 / int8, rel=1e-2)
    assert r["target"]["met"] is True and r["target"]["source"] == "estimated"
    md = (out / "report.md").read_text()
    assert "(est.)" in md and "estimated)" in md and "ESTIMATED" in md

    out2 = tmp_path / "rpi-tight"
    res = compress("shufflenetv2-x0.5", "--recipe", fast_recipe, "--input-size", 32, "--out", out2,
                   "--device", "rpi4", "--target-ms", 0.0001)
    assert res.exit_code == 0, res.output
    t = json.loads((out2 / "report.json").read_text())["target"]
    assert t["met"] is False and t["source"] == "estimated"
