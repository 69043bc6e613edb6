"""Scoring a detector's runner on a detection task: mAP with labels, agreement with fp32 (mAP against the fp32
model's own detections) without them. Every runner's raw output goes through the same
:func:`~edgekit.detect.metrics.postprocess`."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import first_line
from ..progress import track
from ..results import FAILED, OK
from .metrics import NMS, coco_map, detection_agreement, postprocess

Detections = List[Dict[str, np.ndarray]]


def torch_runner(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x))).numpy()

    return run


def detect(run: Callable[[np.ndarray], np.ndarray], task, split: str = "eval", limit: Optional[int] = None,
           batch_size: int = 16, settings: NMS = NMS(), description: str = "detect") -> Tuple[Detections, Detections]:
    """(detections, ground truth) of ``run`` over the split, streamed in batches."""
    dets: Detections = []
    gts: Detections = []
    batches = task.batches(split, batch_size=batch_size, limit=limit)
    for x, targets in track(batches, description, total=task.num_batches(split, batch_size, limit)):
        dets += postprocess(run(x), settings)
        gts += list(targets)
    return dets, gts


def score(dets: Detections, gts: Detections, task, reference: Optional[Detections] = None) -> Dict[str, object]:
    """``map`` / ``map50`` against the labels (labelled tasks) and ``agreement`` (mAP against ``reference``)."""
    out: Dict[str, object] = {}
    if getattr(task, "labelled", True):
        out.update({k: round(v, 4) for k, v in coco_map(dets, gts, task.num_classes, task.input_size).items()})
    if reference is not None:
        a = detection_agreement(reference, dets, task.num_classes, task.input_size)
        out["agreement"] = None if a is None else round(a, 4)
    return out


def _run_in(run: Callable[[np.ndarray], np.ndarray], batch: Optional[int], x: np.ndarray) -> np.ndarray:
    """``run`` over ``x`` in the runner's fixed batch (None: any batch)."""
    if batch is None or batch == len(x):
        return run(x)
    return np.concatenate([run(x[i:i + batch]) for i in range(0, len(x), batch)])


def evaluate_variants(variants, runners: Dict[str, object], task, num_eval: Optional[int] = None,
                      batch_size: int = 16, settings: NMS = NMS()) -> Optional[np.ndarray]:
    """The pipeline's evaluate stage for detectors: one streamed pass of the eval split through every loaded
    variant, each output post-processed as it comes (memory holds detections, never raw outputs).

    ``accuracy`` is COCO mAP@[.5:.95] (labelled data), ``metrics`` mAP and mAP@.5, ``agreement`` the mAP against
    the first variant's (the run's fp32 reference) own detections, ``sqnr_db`` the raw output's SQNR against it.
    Returns the first eval input, which latency is timed on.
    """
    live = [v for v in variants if v.status == OK and v.key in runners]
    if not live:
        return None
    dets: Dict[str, Detections] = {v.key: [] for v in live}
    power: Dict[str, List[float]] = {v.key: [0.0, 0.0] for v in live}  # reference energy, noise energy
    gts: Detections = []
    first = None
    batches = task.batches("eval", batch_size=batch_size, limit=num_eval)
    names = ", ".join(v.name for v in live)
    for x, targets in track(batches, f"evaluate {names}", total=task.num_batches("eval", batch_size, num_eval)):
        first = x[:1].copy() if first is None else first
        gts += list(targets)
        ref = None
        for v in live:
            if v.key not in dets:
                continue
            r = runners[v.key]
            fixed = r.input_shape[0] if isinstance(r.input_shape[0], int) else None
            try:
                raw = _run_in(r.run, fixed, x)
            except Exception as exc:  # noqa: BLE001 - one runner failing never stops the others
                v.fail(FAILED, f"run: {first_line(exc)}")
                runners.pop(v.key, None)
                dets.pop(v.key)
                continue
            ref = raw.astype(np.float64) if ref is None else ref
            power[v.key][0] += float((ref ** 2).sum())
            power[v.key][1] += float(((ref - raw) ** 2).sum())
            dets[v.key] += postprocess(raw, settings)
    reference = next((dets[v.key] for v in live if v.key in dets), None)
    for i, v in enumerate(live):
        if v.key not in dets:
            continue
        s = score(dets[v.key], gts, task, reference=None if i == 0 else reference)
        v.metrics = {k: s[k] for k in ("map", "map50") if k in s}
        v.accuracy = s.get("map")
        v.agreement = 1.0 if i == 0 else s.get("agreement")
        sig, noise = power[v.key]
        v.sqnr_db = None if i == 0 else (round(10 * np.log10(sig / noise), 2) if noise > 0 else float("inf"))
    return first
