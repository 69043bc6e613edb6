"""Detections from a detector's raw output, and COCO mAP with pycocotools.

Every detector edgekit exports ends in one tensor ``[batch, anchors, 4 + classes]``: boxes ``x1, y1, x2, y2`` in
input pixels, then one score per class, decoded inside the graph. NMS stays outside the graph and is this one
numpy function for every runtime (ONNX Runtime, LiteRT, TensorRT, the device runner's copy), so each format is
scored with the same thresholds and the int8 graph has no data-dependent ops to quantize.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..device import runner
from ..errors import EdgekitError
from ..evaluate import energy_db


@dataclass(frozen=True)
class NMS:
    """The thresholds of every runner's post-processing (COCO evaluation settings: a low score floor, 100 per
    image). ``max_candidates`` bounds the boxes that reach NMS per image, highest scores first."""

    score: float = runner.NMS_SCORE
    iou: float = runner.NMS_IOU
    max_det: int = runner.NMS_MAX_DET
    max_candidates: int = runner.NMS_MAX_CANDIDATES


def postprocess(raw: np.ndarray, settings: NMS = NMS()) -> List[Dict[str, np.ndarray]]:
    """Per image ``{"boxes" [k, 4], "scores" [k], "labels" [k]}`` from ``raw`` [B, N, 4 + C]: every (anchor, class)
    pair over the score floor is a candidate (as torchvision's and mmdetection's evaluation), NMS per class. The
    code is the device runner's (:func:`edgekit.device.runner.detections`): host and device keep the same boxes."""
    try:
        return runner.detections(raw, settings.score, settings.iou, settings.max_det, settings.max_candidates)
    except runner.RunnerError as exc:
        raise EdgekitError(str(exc)) from None


def coco_ground_truth(targets: Sequence[Dict[str, np.ndarray]], num_classes: int, size: int,
                      names: Optional[Sequence[str]] = None) -> dict:
    """COCO's ground-truth dict of ``targets`` (image id = position; every image ``size`` x ``size``; category id =
    label, named by ``names``; annotation ids from 1, as COCOeval treats id 0 as unmatched)."""
    images, anns = [], []
    for i, t in enumerate(targets):
        images.append({"id": i, "width": size, "height": size})
        for box, label in zip(np.asarray(t["boxes"], np.float64).reshape(-1, 4), np.asarray(t["labels"]).ravel()):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(label), "iscrowd": 0,
                         "bbox": [float(box[0]), float(box[1]), w, h], "area": max(w, 0.0) * max(h, 0.0)})
    return {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": str(names[c]) if names else str(c)} for c in range(num_classes)]}


def coco_map(detections: Sequence[Dict[str, np.ndarray]], targets: Sequence[Dict[str, np.ndarray]],
             num_classes: int, size: int) -> Dict[str, float]:
    """COCO mAP@[.5:.95] and mAP@.5 (pycocotools' COCOeval, 0-1) of ``detections`` against ``targets``.

    Classes absent from the ground truth do not count (COCOeval's rule); no detection at all scores 0.
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:  # pragma: no cover - a core dependency
        raise EdgekitError("detection metrics need pycocotools: pip install pycocotools") from None
    if len(detections) != len(targets):
        raise EdgekitError(f"{len(detections)} images of detections for {len(targets)} of ground truth")
    gt = COCO()
    gt.dataset = coco_ground_truth(targets, num_classes, size)
    if not gt.dataset["annotations"]:
        raise EdgekitError("the ground truth has no boxes: mAP is undefined")
    results = []
    for i, d in enumerate(detections):
        for box, s, c in zip(np.asarray(d["boxes"], np.float64).reshape(-1, 4), d["scores"], d["labels"]):
            results.append({"image_id": i, "category_id": int(c), "score": float(s),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    if not results:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval prints its whole table
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": max(float(ev.stats[0]), 0.0), "map50": max(float(ev.stats[1]), 0.0)}


def reference_targets(detections: Sequence[Dict[str, np.ndarray]], score: float = 0.3) -> List[Dict[str, np.ndarray]]:
    """The fp32 model's own confident detections as ground truth: a variant's mAP against them is its agreement
    with fp32 where the data has no labels (1.0 when it finds the same boxes with the same classes)."""
    out = []
    for d in detections:
        m = np.asarray(d["scores"]) >= score
        out.append({"boxes": np.asarray(d["boxes"])[m], "labels": np.asarray(d["labels"])[m]})
    return out


def detection_agreement(reference: Sequence[Dict[str, np.ndarray]], detections: Sequence[Dict[str, np.ndarray]],
                        num_classes: int, size: int, score: float = 0.3) -> Optional[float]:
    """mAP@[.5:.95] of ``detections`` against the reference's detections scored ``score`` or more; None when the
    reference is confident about nothing."""
    gt = reference_targets(reference, score)
    if not any(len(t["labels"]) for t in gt):
        return None
    return coco_map(detections, gt, num_classes, size)["map"]


def fidelity(num_classes: int, size: int, settings: NMS = NMS(), candidate: float = 0.05):
    """int8 candidates of a detector against fp32 on the calibration split, as ``calibration: auto`` and the layout
    search rank them: (SQNR of what the detections are made of, mAP against fp32's detections).

    The SQNR covers every class score and the boxes (in units of the input size) of the anchors fp32 scores
    ``candidate`` or more: the raw output's SQNR would be the boxes of thousands of background anchors, which NMS
    never keeps. With no confident fp32 detection the agreement is 1 for every candidate and the SQNR decides.
    """
    def score(ref: np.ndarray, out: np.ndarray):
        signal, noise = detection_energy(ref, out, size, candidate)
        agree = detection_agreement(postprocess(ref, settings), postprocess(out, settings), num_classes, size)
        return energy_db(signal, noise), 1.0 if agree is None else agree

    return score


def detection_energy(ref: np.ndarray, out: np.ndarray, size: int, candidate: float = 0.05):
    """(signal, noise) energy of what detections are made of: every class score, and the boxes (in units of the
    input size) of the anchors ``ref`` scores ``candidate`` or more. Sums over batches give one SQNR."""
    keep = ref[..., 4:].max(-1) >= candidate
    r, o = (np.concatenate([a[..., 4:].ravel(), (a[..., :4][keep] / size).ravel()]).astype(np.float64)
            for a in (ref, out))
    return float((r ** 2).sum()), float(((r - o) ** 2).sum())
