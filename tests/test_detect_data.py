"""Detection data: the generated digits-detect task and a user's COCO folder, hostile ones included (real files)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgekit.data.tasks import TASKS
from edgekit.detect import data as dd
from edgekit.detect.data import DetectionTask, coco_detection_task, digits_detect_task, is_coco_folder, \
    load_detection_task
from edgekit.errors import EdgekitError


@pytest.fixture(scope="module")
def digits() -> DetectionTask:
    return digits_detect_task(num_train=40, num_calib=16, num_eval=60)


def _gt_coco(gt: dict):
    from pycocotools.coco import COCO

    c = COCO()
    c.dataset = gt
    c.createIndex()
    return c


# ----------------------------------------------------------------------------- digits-detect

def test_digits_detect_is_registered_and_described(digits):
    assert "digits-detect" in TASKS
    assert load_detection_task().describe()["kind"] == "detection"
    info = digits.describe()
    assert info["name"] == "digits-detect" and info["num_classes"] == 10 and info["input_shape"] == [1, 3, 128, 128]
    assert (info["num_train"], info["num_calib"], info["num_eval"]) == (40, 16, 60)
    assert digits.kind == "detection" and digits.workers == 0 and digits.class_names == [str(i) for i in range(10)]


def test_digits_detect_is_deterministic(digits):
    again = digits_detect_task(num_train=40, num_calib=16, num_eval=60)
    for split, i in (("eval", 0), ("eval", 37), ("train", 5), ("calib", 3)):
        (x1, t1), (x2, t2) = digits.splits[split][i], again.splits[split][i]
        assert x1.dtype == x2.dtype and x1.shape == (3, 128, 128) and str(x1.dtype) == "torch.float32"
        assert np.array_equal(x1.numpy(), x2.numpy())
        assert np.array_equal(t1["boxes"].numpy(), t2["boxes"].numpy())
        assert np.array_equal(t1["labels"].numpy(), t2["labels"].numpy())
        assert 0 <= float(x1.min()) and float(x1.max()) <= 1
    a, b = digits.splits["eval"][0][0].numpy(), digits.splits["eval"][1][0].numpy()
    assert not np.array_equal(a, b)
    assert not np.array_equal(digits.splits["train"][0][0].numpy(), a)  # same index, other split: other image
    other_seed = digits_detect_task(num_train=1, num_calib=1, num_eval=1, seed=1)
    assert not np.array_equal(other_seed.splits["eval"][0][0].numpy(), a)


def test_digits_detect_pools_are_disjoint(digits):
    pools = {k: set(digits.splits[k].pool.tolist()) for k in ("train", "calib", "eval")}
    assert [len(pools[k]) for k in ("eval", "calib", "train")] == [1000, 500, 3500]
    assert not pools["train"] & pools["eval"] and not pools["train"] & pools["calib"]
    assert not pools["calib"] & pools["eval"]
    # the digits themselves differ too (MNIST holds no exact repeats across these pools)
    ev = {digits.splits["eval"].digits[i].tobytes() for i in range(1000)}
    assert not any(digits.splits["train"].digits[i].tobytes() in ev for i in range(3500))


def test_digits_detect_boxes_are_tight_and_visible(digits):
    ds, s = digits.splits["eval"], 128
    counts = []
    for i in range(len(ds)):
        img, objs = ds.render(i)
        bg = ds.background(i)
        t = ds.targets(i + 1)[i]
        assert 1 <= len(objs) <= 4 and t["boxes"].shape == (len(objs), 4) and t["labels"].dtype == np.int64
        counts.append(len(objs))
        for j, o in enumerate(objs):
            assert 0 <= o.label <= 9
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= s and 0 <= y0 < y1 <= s
            assert 0.06 * s <= y1 - y0 <= 0.5 * s  # 12%-45% of the side for a 20 px MNIST digit; a few are shorter
            m = 100  # margin: the cell may reach past the image; the ink may not
            ink = np.zeros((s + 2 * m, s + 2 * m), bool)
            ink[o.y + m:o.y + m + o.alpha.shape[0], o.x + m:o.x + m + o.alpha.shape[1]] = o.alpha > dd.INK
            ys, xs = np.nonzero(ink)
            assert (xs.min() - m, ys.min() - m, xs.max() - m + 1, ys.max() - m + 1) == o.box  # tight
            inside = ink[m:m + s, m:m + s]
            assert inside.sum() == ink.sum()
            # the ink is drawn in a colour that stands out from the background under it
            assert np.abs(img - bg)[:, inside].mean() > 0.15
            for k in range(j):
                assert dd._clear(o.box, objs[k].box)
    assert set(counts) >= {1, 2, 3, 4}


def test_digits_detect_batches_arrays_and_coco(digits):
    from pycocotools.cocoeval import COCOeval

    got = list(digits.batches("eval", batch_size=8, limit=20))
    assert len(got) == digits.num_batches("eval", 8, 20) == 3
    x, ts = got[0]
    assert x.dtype == np.float32 and x.shape == (8, 3, 128, 128) and x.flags.c_contiguous
    assert ts[0]["boxes"].dtype == np.float32 and ts[0]["labels"].dtype == np.int64
    targets = [t for _, b in got for t in b]
    assert all(np.array_equal(a["boxes"], b["boxes"]) for a, b in zip(targets, digits.targets("eval", 20)))
    xs, ts2 = digits.arrays("calib", limit=5)
    assert xs.shape == (5, 3, 128, 128) and len(ts2) == 5
    assert np.array_equal(xs[2], digits.splits["calib"][2][0].numpy())
    gt = digits.coco("eval", limit=20)
    c = _gt_coco(gt)
    assert len(c.getImgIds()) == 20 and len(c.getAnnIds()) == sum(len(t["labels"]) for t in targets)
    assert sorted(c.getCatIds()) == list(range(10))
    dets = c.loadRes([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
                      for a in gt["annotations"]])
    ev = COCOeval(c, dets, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # the ground truth scores itself perfectly: ids and boxes are sound


def test_digits_detect_refuses_bad_settings(digits):
    with pytest.raises(EdgekitError, match="input_size"):
        digits_detect_task(input_size=16)
    with pytest.raises(EdgekitError, match="GB in memory"):
        digits_detect_task(num_eval=30000).arrays("eval")
    with pytest.raises(EdgekitError, match="classification"):
        load_detection_task("mnist")


# ----------------------------------------------------------------------------- COCO folders

def _png(path: Path, size, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _folder(root: Path, n: int = 10, sub: str = "", ann_edit=None) -> Path:
    """n images (the first 200x100 red, the others 60x80), categories 7 "dog" and 3 "cat", boxes on each."""
    d = root / sub if sub else root
    images, anns = [], []
    for i in range(n):
        size = (200, 100) if i == 0 else (60, 80)
        _png(d / "img" / f"{i}.png", size)
        images.append({"id": 100 + i, "file_name": f"img/{i}.png", "width": size[0], "height": size[1]})
        anns.append({"id": 1 + 2 * i, "image_id": 100 + i, "category_id": 7 if i % 2 else 3,
                     "bbox": [50, 20, 50, 20] if i == 0 else [5, 6, 20, 30], "iscrowd": 0})
    anns.append({"id": 999, "image_id": 100, "category_id": 7, "bbox": [0, 0, 10, 10], "iscrowd": 1})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]}
    if ann_edit is not None:
        data = ann_edit(data) if callable(ann_edit) else ann_edit  # or the file's whole text
    (d / "annotations.json").write_bytes(data if isinstance(data, bytes) else
                                         (data if isinstance(data, str) else json.dumps(data)).encode())
    return root


def _find(task: DetectionTask, name: str):
    for split, ds in task.splits.items():
        for i, it in enumerate(ds.items):
            if it[0].name == name:
                return split, i
    raise AssertionError(name)


def test_coco_folder_loads_letterboxed(tmp_path):
    root = _folder(tmp_path / "ds")
    assert is_coco_folder(root) and not is_coco_folder(tmp_path) and not is_coco_folder(tmp_path / "nope")
    task = load_detection_task(data=str(root), input_size=64)
    assert task.kind == "detection" and task.class_names == ["cat", "dog"] and task.num_classes == 2
    assert [task.size(k) for k in ("eval", "calib", "train")] == [2, 1, 7]
    assert task.notes and any("crowd" in n for n in task.notes)
    split, i = _find(task, "0.png")
    t = task.targets(split)[i]
    # 200x100 -> 64x32 (scale 0.32); bbox [50, 20, 50, 20] xywh -> xyxy [16, 6.4, 32, 12.8]; crowd box left out
    np.testing.assert_allclose(t["boxes"], [[16, 6.4, 32, 12.8]], rtol=1e-6)
    assert t["labels"].tolist() == [0]  # category 3 "cat" -> 0: contiguous labels in category-id order
    x, tt = task.splits[split][i]
    x = x.numpy()
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 32:, :], 114 / 255, atol=1e-6)  # padded below
    np.testing.assert_allclose(x[:, :32, :].reshape(3, -1).mean(1), np.array([200, 30, 30]) / 255, atol=1e-6)
    assert np.array_equal(tt["boxes"].numpy(), t["boxes"])
    split2, j = _find(task, "1.png")  # 60x80 -> 48x64: padded on the right
    np.testing.assert_allclose(task.splits[split2][j][0].numpy()[:, :, 48:], 114 / 255, atol=1e-6)
    np.testing.assert_allclose(task.targets(split2)[j]["boxes"], [[4, 4.8, 20, 28.8]], rtol=1e-6)
    xs, ts = task.arrays("train")
    assert xs.shape == (7, 3, 64, 64) and len(ts) == 7
    c = _gt_coco(task.coco("train"))
    assert len(c.getAnnIds()) == 7 and {a["category_id"] for a in c.dataset["annotations"]} <= {0, 1}
    again = coco_detection_task(root, input_size=64)
    assert [it[0] for it in again.splits["eval"].items] == [it[0] for it in task.splits["eval"].items]
    assert task.describe()["origin"]["layout"] == "annotations.json"


def test_coco_train_val_layout(tmp_path):
    root = tmp_path / "tv"
    _folder(root, n=3, sub="train")
    _folder(root, n=8, sub="val")
    task = coco_detection_task(root, input_size=64, num_calib=256)
    assert [task.size(k) for k in ("train", "calib", "eval")] == [3, 2, 6]
    assert all("train" in str(it[0]) for it in task.splits["train"].items)
    assert all("val" in str(it[0]) for k in ("calib", "eval") for it in task.splits[k].items)

    def other_cats(d):
        d["categories"][0]["name"] = "wolf"
        return d

    _folder(root, n=8, sub="val", ann_edit=other_cats)
    with pytest.raises(EdgekitError, match="different categories"):
        coco_detection_task(root)
    with pytest.raises(EdgekitError, match="not a COCO detection folder"):
        load_detection_task(data=str(tmp_path))


def _set(path, value):
    """An edit of the annotations dict: ``path`` like "images.0.file_name"."""
    def edit(d):
        *keys, last = path.split(".")
        obj = d
        for k in keys:
            obj = obj[int(k)] if k.isdigit() else obj[k]
        obj[int(last) if last.isdigit() else last] = value
        return d
    return edit


HOSTILE = {
    "invalid-json": ("{not json", "not valid JSON"),
    "deep-json": ("[" * 200000 + "]" * 200000, "nested too deeply"),
    "not-utf8": (b'{"images": "\xff"}', "not valid JSON"),
    "not-object": ("[1, 2]", "must hold a JSON object"),
    "images-not-list": (_set("images", {"a": 1}), r'"images" must be a list'),
    "no-categories-key": (lambda d: {k: v for k, v in d.items() if k != "categories"}, r'has no "categories" list'),
    "surrogate-file": (_set("images.0.file_name", "img/\ud800.png"), "must be a non-empty file name"),
    "image-not-object": (_set("images.1", "img/1.png"), r"images\[1\] must be an object"),
    "image-id-text": (_set("images.1.id", "101"), r"images\[1\]\.id must be a whole number"),
    "no-images": (_set("images", []), "lists no images"),
    "duplicate-image-id": (_set("images.2.id", 100), r"images\[2\] repeats image id 100"),
    "absolute-file": (_set("images.0.file_name", "/etc/passwd"), "is absolute"),
    "windows-absolute": (_set("images.0.file_name", "C:\\x.png"), "is absolute"),
    "dotdot": (_set("images.0.file_name", "img/../../outside.png"), r"contains '\.\.'"),
    "missing-image": (_set("images.3.file_name", "img/nope.png"), r"images\[3\] file .*nope.png is missing"),
    "directory-image": (_set("images.3.file_name", "img"), "not a regular file"),
    "bbox-three": (_set("annotations.0.bbox", [1, 2, 3]), r"annotations\[0\]\.bbox must be 4 finite numbers"),
    "bbox-nan": (_set("annotations.0.bbox", [1, 2, float("nan"), 3]), "4 finite numbers"),
    "bbox-text": (_set("annotations.0.bbox", [1, 2, "3", 4]), "4 finite numbers"),
    "bbox-zero-w": (_set("annotations.1.bbox", [1, 2, 0, 3]), r"width, height > 0"),
    "bbox-negative": (_set("annotations.1.bbox", [-1, 2, 5, 3]), r"x, y >= 0"),
    "unknown-image": (_set("annotations.2.image_id", 5), r"annotations\[2\] names image_id 5, which no image has"),
    "unknown-category": (_set("annotations.2.category_id", 1), r"category_id 1, which no category has"),
    "duplicate-category": (_set("categories.1.id", 7), "repeats category id 7"),
    "size-mismatch": (_set("images.1.width", 61), r"declares 61x80 but .*1.png is 60x80"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_coco_hostile_annotations_are_one_clear_line(tmp_path, case):
    edit, message = HOSTILE[case]
    root = _folder(tmp_path / "ds", n=4, ann_edit=edit)
    (tmp_path / "outside.png").write_bytes(b"")  # what img/../../outside.png would reach
    with pytest.raises(EdgekitError, match=message) as err:
        load_detection_task(data=str(root))
    text = str(err.value)
    assert "\n" not in text and "annotations.json" in text and len(text) < 400


def test_coco_refuses_symlinks_out_of_the_folder(tmp_path):
    root = _folder(tmp_path / "ds", n=4)
    _png(tmp_path / "secret.png", (10, 10))
    os.remove(root / "img" / "2.png")
    os.symlink(tmp_path / "secret.png", root / "img" / "2.png")
    with pytest.raises(EdgekitError, match=r"images\[2\]\.file_name 'img/2.png' leads outside"):
        coco_detection_task(root)
    os.remove(root / "img" / "2.png")
    os.symlink(root / "img" / "1.png", root / "img" / "2.png")  # a link inside the folder is fine
    coco_detection_task(root)
    outside = tmp_path / "elsewhere"
    _folder(outside, n=4)
    os.remove(root / "annotations.json")
    os.symlink(outside / "annotations.json", root / "annotations.json")
    with pytest.raises(EdgekitError, match="leads outside"):
        coco_detection_task(root)


def test_coco_refuses_huge_annotations_unread(tmp_path):
    root = _folder(tmp_path / "ds", n=4)
    with open(root / "annotations.json", "r+b") as f:
        f.truncate(513 * 2**20)  # sparse: takes no disk, and a read of it would show up as a JSON error
    with pytest.raises(EdgekitError, match=r"annotations.json is 513 MB; annotation files over 512 MB are refused"):
        coco_detection_task(root)


def _bomb_png(path: Path, side: int = 100_000) -> None:
    """A PNG header claiming side x side pixels (10 gigapixels), with no image data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_coco_bad_image_files(tmp_path):
    root = _folder(tmp_path / "ds", n=4)
    _bomb_png(root / "img" / "1.png")
    with pytest.raises(EdgekitError, match=r"Cannot read image .*1.png: DecompressionBomb") as err:
        coco_detection_task(root)
    assert "\n" not in str(err.value)
    (root / "img" / "1.png").write_text("not an image")
    with pytest.raises(EdgekitError, match=r"Cannot read image .*1.png: UnidentifiedImageError"):
        coco_detection_task(root)
    # corrupt past its header: the task is made, decoding it names the file in one line
    _png(root / "img" / "1.png", (60, 80))
    Image.effect_noise((60, 80), 50).convert("RGB").save(root / "img" / "1.png")
    raw = (root / "img" / "1.png").read_bytes()
    (root / "img" / "1.png").write_bytes(raw[:len(raw) // 2])
    task = coco_detection_task(root, input_size=64)
    split, i = _find(task, "1.png")
    with pytest.raises(EdgekitError, match=r"Cannot read image .*1.png") as err:
        task.splits[split][i]
    assert "\n" not in str(err.value)
    with pytest.raises(EdgekitError, match=r"Cannot read image .*1.png") as err:
        task.arrays(split)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)
