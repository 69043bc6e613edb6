"""Issue 28: honest splits. Train, calibration and evaluation never share an image; their sizes are in the task's
description; one class is refused; a folder of loose images is evaluated without labels.

Before, one ImageFolder tree trained on ``rest[len(rest)//2:]`` and evaluated all of ``rest``: half of the
evaluation images were training images, and a one-class folder scored 100% with no warning.
"""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from edgekit.data import Preprocess, load_task
from edgekit.data.folders import data_layout
from edgekit.errors import EdgekitError


def _images(folder, n, seed=0, size=(36, 44)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _files(task):
    return {k: {p for p, _ in task.splits[k].items} for k in ("train", "calib", "eval")}


def _disjoint(files):
    return not (files["train"] & files["calib"] or files["train"] & files["eval"] or files["calib"] & files["eval"])


def test_one_tree_splits_three_ways_without_overlap(tmp_path):
    for i, cls in enumerate(("a", "b", "c")):
        _images(tmp_path / "d" / cls, 10, seed=i)
    task = load_task(data=str(tmp_path / "d"), input_size=32, num_calib=4)
    files = _files(task)
    assert _disjoint(files) and len(set().union(*files.values())) == 30  # every image in exactly one split
    info = task.describe()
    assert (info["num_calib"], info["num_eval"], info["num_train"]) == (4, 13, 13) and info["layout"] == "classes"
    assert "labelled" not in info and info["preprocess"]["input_size"] == 32
    # nothing to train (a pretrained head, a weights file): every image not calibrating is evaluated
    no_train = load_task(data=str(tmp_path / "d"), input_size=32, num_calib=4, train=False)
    assert no_train.size("train") == 0 and no_train.size("eval") == 26 and _disjoint(_files(no_train))


def test_train_val_layout_evaluates_val_and_splits_train(tmp_path):
    for i, cls in enumerate(("a", "b")):
        _images(tmp_path / "d" / "train" / cls, 12, seed=i)
        _images(tmp_path / "d" / "val" / cls, 5, seed=10 + i)
    task = load_task(data=str(tmp_path / "d"), input_size=32, num_calib=100)
    files = _files(task)
    assert _disjoint(files)
    assert all(p.parent.parent.name == "val" for p in files["eval"]) and len(files["eval"]) == 10
    assert all(p.parent.parent.name == "train" for p in files["train"] | files["calib"])
    assert (task.size("calib"), task.size("train")) == (6, 18)  # calibration takes at most a quarter of train
    assert task.describe()["layout"] == "train-val" and task.class_names == ["a", "b"]


@pytest.mark.parametrize("layout", ["one", "empty-second", "train-val"])
def test_one_class_is_refused_with_what_to_give(tmp_path, layout):
    root = tmp_path / "d"
    if layout == "train-val":
        _images(root / "train" / "cat", 8)
        _images(root / "val" / "cat", 4)
    else:
        _images(root / "cat", 8)
        if layout == "empty-second":
            (root / "dog").mkdir()
    with pytest.raises(EdgekitError, match=r"1 class folder \(cat\): top-1 accuracy on one class says nothing") as e:
        load_task(data=str(root), input_size=32)
    assert "two or more class folders" in str(e.value) and "\n" not in str(e.value)


def test_one_class_folder_stops_the_cli_in_one_line(tmp_path):
    from edgekit.cli import app

    _images(tmp_path / "d" / "cat", 6)
    res = CliRunner().invoke(app, ["compress", "shufflenetv2-x0.5", "--data", str(tmp_path / "d"), "--out",
                                   str(tmp_path / "out")])
    assert res.exit_code == 2 and "one class says nothing" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_folder_of_images_is_an_unlabelled_task(tmp_path):
    root = _images(tmp_path / "photos", 12)
    assert data_layout(root) == "images"
    pre = Preprocess.from_timm({"input_size": (3, 40, 40), "crop_pct": 0.95, "interpolation": "bicubic"})
    task = load_task(data=str(root), num_calib=3, preprocess=pre)
    files = _files(task)
    assert _disjoint(files) and (len(files["calib"]), len(files["eval"]), len(files["train"])) == (3, 9, 0)
    assert task.labelled is False and task.num_classes is None and set(task.labels("eval")) == {-1}
    x, y = task.arrays("eval")
    assert x.shape == (9, 3, 40, 40) and set(y) == {-1}
    info = task.describe()
    assert info["labelled"] is False and info["layout"] == "images" and info["num_eval"] == 9
    assert info["preprocess"]["crop_pct"] == 0.95 and info["preprocess"]["interpolation"] == "bicubic"
    # class sub-folders keep a folder labelled, loose images beside them are not classes
    _images(root / "a", 3)
    _images(root / "b", 3, seed=1)
    assert data_layout(root) == "classes" and load_task(data=str(root), input_size=32, num_calib=1).labelled


def test_a_folder_without_images_says_what_to_give(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgekitError, match="no class sub-folders and no images") as e:
        load_task(data=str(tmp_path / "empty"))
    assert "agreement with fp32 without labels" in str(e.value)
    _images(tmp_path / "one", 1)
    with pytest.raises(EdgekitError, match="calibration and evaluation each need their own"):
        load_task(data=str(tmp_path / "one"))


def test_compare_on_unlabelled_images_feeds_no_labels(tmp_path):
    """``edgekit compare --data DIR`` of loose images: inputs without labels, so no accuracy of 0% from label -1."""
    from edgekit.comparison import _inputs

    root = _images(tmp_path / "photos", 8)
    batches, n, source = _inputs((3, 32, 32), None, str(root), None)
    got = list(batches)
    assert n == 6 and sum(len(x) for x, _ in got) == 6 and all(y is None for _, y in got)
    assert "unlabelled" in source
    labelled = tmp_path / "classes"
    _images(labelled / "a", 4)
    _images(labelled / "b", 4, seed=1)
    assert all(y is not None for _, y in _inputs((3, 32, 32), None, str(labelled), None)[0])


def test_class_folders_without_images_are_named(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "d" / cls).mkdir(parents=True)
    with pytest.raises(EdgekitError, match=r"has no images in its class folders \(a, b;"):
        load_task(data=str(tmp_path / "d"))
