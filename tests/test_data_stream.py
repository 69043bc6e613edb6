"""Data is streamed, and a bad image stops a run before any work (or is skipped and counted).

Issue 26: ``Task.arrays("eval")`` held a whole split in memory (ImageNet-val at 224 px is
30 GB) and a truncated JPEG ended in a raw ``OSError`` after training and export.
bench/data_memory.py measures the peak memory of the real CLI for 1,000 and 10,000 images.
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from typer.testing import CliRunner

from edgekit import zoo
from edgekit.cli import app
from edgekit.errors import EdgekitError

runner = CliRunner()
RECIPE = ("description: int8 without the latency search\nvariants:\n  - {format: onnx, precision: fp32}\n"
          "  - {format: onnx, precision: int8, options: {num_calib: 8, calibration: minmax, search: none}}\n")


def _folder(root, n_per_class=8, bad=True):
    """An ImageFolder of small JPEGs in two classes; ``b/bad.jpg`` cut in half when ``bad``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")
    if bad:
        good = (root / "b" / "0.jpg").read_bytes()
        (root / "b" / "bad.jpg").write_bytes(good[:len(good) // 2])
    return root


@pytest.fixture()
def weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "w.pth"
    torch.save(zoo.create("shufflenetv2-x0.5", num_classes=2).state_dict(), path)
    return path


@pytest.fixture()
def recipe(tmp_path):
    path = tmp_path / "minmax.yaml"
    path.write_text(RECIPE)
    return path


def test_a_truncated_jpeg_stops_the_run_before_any_training(tmp_path, monkeypatch, recipe):
    from edgekit import pipeline
    from edgekit.pipeline import baseline

    def never(*a, **k):
        raise AssertionError("the baseline was built before the data was checked")

    monkeypatch.setattr(baseline, "get_baseline", never)
    data = _folder(tmp_path / "data")
    t0 = time.time()
    with pytest.raises(EdgekitError, match=r"Cannot read image .*bad\.jpg: OSError: image file is truncated"):
        pipeline.run("shufflenetv2-x0.5", recipe=str(recipe), data=str(data), input_size=32, out=tmp_path / "out")
    assert time.time() - t0 < 10
    assert not (tmp_path / "out").exists()


def test_cli_names_the_file_in_one_line_and_exits_2(tmp_path, recipe, weights):
    data = _folder(tmp_path / "data")
    res = runner.invoke(app, ["compress", "shufflenetv2-x0.5", "--recipe", str(recipe), "--data", str(data),
                              "--weights", str(weights), "--input-size", "32", "--out", str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.jpg" in lines[0] and "--skip-bad-images" in lines[0], res.stderr
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_skip_bad_images_completes_and_counts_them(tmp_path, recipe, weights):
    data = _folder(tmp_path / "data")
    out = tmp_path / "out"
    res = runner.invoke(app, ["compress", "shufflenetv2-x0.5", "--recipe", str(recipe), "--data", str(data),
                              "--weights", str(weights), "--input-size", "32", "--out", str(out), "--runs", "10",
                              "--skip-bad-images"])
    assert res.exit_code == 0, res.output
    assert "skipped 1 unreadable image" in res.output
    task = json.loads((out / "report.json").read_text())["task"]
    assert task["skipped_images"] == 1 and task["skipped"][0]["file"].endswith("bad.jpg")
    assert "truncated" in task["skipped"][0]["reason"]
    assert task["num_train"] + task["num_calib"] + task["num_eval"] == 16  # every readable image, none twice


def test_skip_in_the_library_and_clean_folders_unchanged(tmp_path):
    from edgekit.data import load_task

    task = load_task(data=str(_folder(tmp_path / "bad")), input_size=32, num_calib=4, skip_bad_images=True)
    assert [f.endswith("bad.jpg") for f, _ in task.skipped] == [True]
    assert all(not str(p).endswith("bad.jpg") for s in task.splits.values() for p, _ in s.items)
    clean = load_task(data=str(_folder(tmp_path / "clean", bad=False)), input_size=32, num_calib=4)
    assert clean.skipped is None and "skipped_images" not in clean.describe()  # baseline cache keys unchanged


@pytest.mark.slow
def test_a_file_broken_after_the_check_is_named_in_one_line_from_a_worker(tmp_path):
    from edgekit.data import load_task

    data = _folder(tmp_path / "data", bad=False)
    task = load_task(data=str(data), input_size=32, num_calib=4)
    task.workers = 1
    victim = task.splits["eval"].items[3][0]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(EdgekitError) as err:
        for _ in task.batches("eval", batch_size=2):
            pass
    assert str(err.value).startswith(f"Cannot read image {victim}:") and "\n" not in str(err.value)


class _Counted(Dataset):
    """N tiny images made on demand; counts how many were made."""

    def __init__(self, n: int):
        self.n, self.made = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.made += 1
        return torch.full((3, 8, 8), float(i % 7)), i % 10


class _FakeRunner:
    """An onnxruntime runner stand-in that records how far decoding ran ahead of inference."""

    runtime, version, threads, input_shape = "fake", "0", 1, (1, 3, 8, 8)

    def __init__(self, ds: _Counted):
        self.ds, self.seen, self.ahead = ds, 0, 0

    def run(self, x):
        self.seen += len(x)
        self.ahead = max(self.ahead, self.ds.made - self.seen)
        return np.eye(10, dtype=np.float32)[x[:, 0, 0, 0].astype(int) % 10]


def test_evaluation_holds_a_few_batches_not_the_split(monkeypatch, tmp_path):
    """The pipeline's evaluation of 3,000 images never has more than one batch of 64 decoded ahead."""
    from edgekit import pipeline
    from edgekit.data.tasks import Task

    ds = _Counted(3000)
    task = Task("counted", 10, 3, 8, {"train": ds, "calib": ds, "eval": ds})
    variants = [pipeline.Variant(n, "onnx", n, tmp_path / f"{n}.onnx", "baseline", 0, 0) for n in ("fp32", "int8")]
    fakes = {v.key: _FakeRunner(ds) for v in variants}
    pipeline.evaluate(variants, dict(fakes), task)
    fakes = list(fakes.values())
    assert ds.made == 3000  # each image decoded once for both variants
    assert all(f.seen >= 3000 for f in fakes) and max(f.ahead for f in fakes) <= 64
    labels = np.arange(3000) % 10
    expected = float(np.mean(np.arange(3000) % 7 == labels))
    assert [v.accuracy for v in variants] == [round(expected, 4)] * 2 and variants[1].agreement == 1.0


def test_streamed_batches_match_the_arrays(small_task):
    x, y = small_task.arrays("eval", limit=300)
    parts = list(small_task.batches("eval", batch_size=64, limit=300))
    assert np.array_equal(np.concatenate([p[0] for p in parts]), x)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), y)
    assert np.array_equal(small_task.labels("eval"), small_task.arrays("eval")[1])


def test_predict_stream_cuts_the_same_slices_as_predict_arrays():
    from edgekit.evaluate import predict_arrays, predict_stream

    x = np.random.default_rng(0).standard_normal((103, 4)).astype(np.float32)
    calls = []

    def run(b):
        calls.append(len(b))
        return b * 2

    want = predict_arrays(run, x, batch_size=8)
    want_calls, calls[:] = list(calls), []
    pred = predict_stream({"r": (run, 8)}, ((x[i:i + 30], None) for i in range(0, 103, 30)), keep_first=5)
    assert calls == want_calls and np.array_equal(pred.logits["r"], want)
    assert pred.labels is None and pred.count == 103 and np.array_equal(pred.first, x[:5])


def test_arrays_refuses_a_split_too_big_for_memory(small_task, monkeypatch):
    from edgekit.data import tasks

    monkeypatch.setattr(tasks, "ARRAYS_MAX_BYTES", 10 * 3 * 32 * 32 * 4)
    assert len(small_task.arrays("calib", limit=10)[0]) == 10
    with pytest.raises(EdgekitError, match="use at most 10"):
        small_task.arrays("calib", limit=11)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_streamed_histogram_calibration_is_byte_identical_to_ort(tmp_path, small_task, monkeypatch, method):
    """Two passes of one input each (chunks forced to one input) give ORT's one-shot histograms exactly."""
    from edgekit.export import ort_calibration as calibration
    from edgekit.export.onnx_int8 import OrtQuantConfig, quantize_onnx
    from edgekit.export.onnx import export_onnx

    torch.manual_seed(0)
    fp32 = export_onnx(zoo.create("shufflenetv2-x0.5", num_classes=10).eval(), tmp_path / "m.onnx", (1, 3, 32, 32))
    calib, _ = small_task.arrays("calib", limit=12)
    cfg = OrtQuantConfig(calibration=method)
    digest = {}
    for mode in ("0", "1", "memo"):
        monkeypatch.setenv("EDGEKIT_ORT_STREAMED_CALIBRATION", "0" if mode == "0" else "1")
        monkeypatch.setattr(calibration, "CHUNK_BYTES", 1)
        if mode != "memo":
            calibration._RANGES.clear()
        quantize_onnx(fp32, tmp_path / f"{mode}.onnx", calib, cfg)
        digest[mode] = hashlib.sha256((tmp_path / f"{mode}.onnx").read_bytes()).hexdigest()
    assert digest["0"] == digest["1"] == digest["memo"]
    assert calibration._RANGES  # the second streamed call reused the first one's ranges
