"""Detection post-processing and COCO mAP: the evaluator is wired right (perfect = 1, shifted < 1, wrong class = 0)
and NMS keeps what it should, per class."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.detect.metrics import NMS, coco_map, detection_agreement, postprocess
from edgekit.device.runner import box_iou, nms
from edgekit.errors import EdgekitError

SIZE = 128


def _targets():
    rng = np.random.default_rng(0)
    out = []
    for _ in range(12):
        n = int(rng.integers(1, 4))
        xy = rng.uniform(0, 80, (n, 2))
        wh = rng.uniform(12, 40, (n, 2))
        out.append({"boxes": np.concatenate([xy, xy + wh], 1).astype(np.float32),
                    "labels": rng.integers(0, 5, n).astype(np.int64)})
    return out


def _as_dets(targets, shift=0.0, label_offset=0):
    return [{"boxes": t["boxes"] + shift, "scores": np.full(len(t["labels"]), 0.9, np.float32),
             "labels": (t["labels"] + label_offset) % 5} for t in targets]


def test_perfect_shifted_and_wrong_class():
    gt = _targets()
    assert coco_map(_as_dets(gt), gt, 5, SIZE) == {"map": 1.0, "map50": 1.0}
    shifted = coco_map(_as_dets(gt, shift=4.0), gt, 5, SIZE)
    assert 0.0 < shifted["map"] < 0.9 and shifted["map50"] > shifted["map"]
    assert coco_map(_as_dets(gt, label_offset=1), gt, 5, SIZE) == {"map": 0.0, "map50": 0.0}
    assert coco_map([{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}] * len(gt), gt, 5,
                    SIZE) == {"map": 0.0, "map50": 0.0}


def test_agreement_with_itself_is_one():
    gt = _targets()
    dets = _as_dets(gt)
    assert detection_agreement(dets, dets, 5, SIZE) == 1.0
    assert detection_agreement(dets, _as_dets(gt, shift=6.0), 5, SIZE) < 0.8
    none = [{"boxes": d["boxes"], "scores": d["scores"] * 0.1, "labels": d["labels"]} for d in dets]
    assert detection_agreement(none, dets, 5, SIZE) is None  # the reference is confident about nothing


def test_nms_is_per_class_and_keeps_the_best():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    assert nms(boxes[:2], np.array([0.5, 0.9]), 0.5).tolist() == [1]
    raw = np.zeros((1, 4, 4 + 3), np.float32)
    raw[0, :, :4] = boxes
    raw[0, 0, 4], raw[0, 1, 4], raw[0, 2, 5], raw[0, 3, 6] = 0.6, 0.8, 0.7, 0.3  # two overlap in class 0
    (d,) = postprocess(raw, NMS(score=0.05, iou=0.5))
    got = sorted((c, round(s, 2)) for c, s in zip(d["labels"].tolist(), d["scores"].tolist()))
    assert got == [(0, 0.8), (1, 0.7), (2, 0.3)]
    assert box_iou(boxes[:1], boxes[2:3])[0, 0] == pytest.approx(1.0)


def test_postprocess_caps_and_refuses_other_shapes():
    raw = np.random.default_rng(1).uniform(0, 1, (2, 5000, 4 + 2)).astype(np.float32)
    raw[..., 2:4] += raw[..., :2] + 1
    dets = postprocess(raw, NMS(score=0.0, iou=1.0, max_det=100))
    assert all(len(d["scores"]) == 100 for d in dets)
    with pytest.raises(EdgekitError, match="anchors, 4 \\+ classes"):
        postprocess(np.zeros((2, 10)))


def test_fidelity_ranks_by_the_detections_not_the_background_boxes():
    """int8 candidates are ranked on what NMS keeps: noise on background anchors' boxes costs nothing, noise on
    the scores does."""
    from edgekit.detect.metrics import fidelity

    rng = np.random.default_rng(0)
    raw = np.zeros((6, 300, 4 + 3), np.float32)
    xy = rng.uniform(0, 90, (6, 300, 2))
    raw[..., :2], raw[..., 2:4] = xy, xy + rng.uniform(10, 30, (6, 300, 2))
    raw[..., 4:] = rng.uniform(0, 0.02, (6, 300, 3))
    raw[:, :5, 4] = 0.9  # five confident anchors per image
    f = fidelity(3, SIZE)
    assert f(raw, raw) == (float("inf"), 1.0)
    background = raw.copy()
    background[:, 5:, :4] += rng.normal(0, 40, (6, 295, 4))
    scores = raw.copy()
    scores[..., 4:] = np.clip(scores[..., 4:] + rng.normal(0, 0.05, scores[..., 4:].shape), 0, 1)
    assert f(raw, background)[0] == float("inf") and f(raw, scores)[0] < 25
