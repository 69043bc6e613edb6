"""Stage 6: report.json's content from the run's records (rendering to Markdown and HTML is edgekit.report's)."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

from .. import __version__
from ..config import DeviceProfile, Recipe
from ..data import Task
from ..hostinfo import machine_info
from ..results import OK, UNAVAILABLE, Variant


def judged_by(variants: Sequence[Variant]) -> str:
    """``accuracy`` when the reference has one (labelled data), else ``agreement`` with fp32 (unlabelled data)."""
    return "accuracy" if variants and variants[0].accuracy is not None else "agreement"


def fallback_of(v: Variant) -> dict:
    """The int8 fallback's record of a variant (``onnx`` options min_agreement / max_drop_pp), or {}."""
    return ((v.info or {}).get("quantization") or {}).get("fallback") or {}


def recommend(variants: Sequence[Variant], budget_pp: float) -> Optional[Variant]:
    """The fastest variant with a latency whose accuracy is within the budget of the reference's.

    Without labels, top-1 agreement with fp32 stands in: a variant may disagree with fp32 on at most the budget's
    share of the images. That is stricter than the accuracy budget, never looser: an accuracy changes only where
    the top-1 class changes. An int8 variant whose fallback missed its own budget, or met it only by a step no faster
    than fp32, is never recommended: its record says fp32 is the better choice.
    """
    ref = variants[0]
    budget = budget_pp / 100
    metric = judged_by(variants)
    timed = [v for v in variants if v.status == OK and v.latency is not None
             and not fallback_of(v).get("recommend_fp32")]
    floor = None if getattr(ref, metric) is None else getattr(ref, metric) - budget - 1e-9
    within = [v for v in timed if floor is not None and getattr(v, metric) is not None and getattr(v, metric) >= floor]
    return min(within, key=lambda v: v.latency.p50) if within else None


def assemble_report(model: str, model_info: Dict[str, Any], recipe: Recipe, device: DeviceProfile, task: Task,
                    baseline_info: dict, step_info: List[dict], variants: List[Variant], notes: List[str],
                    target_ms: Optional[float], seed: int, training: Optional[dict] = None) -> dict:
    """report.json: what was made, how it scores, what it costs, what to ship; every figure says its source.
    ``training``: where the run trained (``edgekit.train.TrainingLog.summary()``; None when nothing trained)."""
    from ..runtime.base import module_versions

    target = target_ms if target_ms is not None else device.latency_target_ms
    ref = variants[0]
    budget = recipe.accuracy_budget_pp / 100
    recommended = recommend(variants, recipe.accuracy_budget_pp)
    timed = [v for v in variants if v.status == OK and v.latency is not None]
    labelled = task.labelled
    for v in [v for v in variants if v.status == OK][1:]:
        if ref.accuracy is not None and v.accuracy is not None and v.accuracy < ref.accuracy - budget - 1e-9:
            what = "COCO mAP" if getattr(task, "kind", "") == "detection" else "accuracy"
            notes.append(f"{v.name} ({v.format}) loses {100 * (ref.accuracy - v.accuracy):.2f} points of {what}, "
                         f"more than the recipe's budget of {recipe.accuracy_budget_pp} points.")
        elif not labelled and ref.agreement is not None and v.agreement is not None \
                and v.agreement < ref.agreement - budget - 1e-9:
            notes.append(f"{v.name} ({v.format}) disagrees with fp32 on {100 * (1 - v.agreement):.2f}% of the "
                         f"{task.size('eval')} unlabelled images, more than the recipe's budget of "
                         f"{recipe.accuracy_budget_pp} points.")
        fb = fallback_of(v)
        if fb:
            notes.append(f"Int8 fallback of {v.name} ({v.format}), budget {fb.get('budget_text')} on the calibration "
                         f"split: {fb.get('outcome')}.")
        if v.speedup is not None and v.speedup < 1.0:
            how = "measured" if v.latency.measured else "ESTIMATED, not measured"
            notes.append(f"{v.name} ({v.format}) is SLOWER than fp32 on {device.name} ({v.speedup:.2f}x the fp32 "
                         f"speed, {how}): it does not pay off on this device; use fp32 here.")
    for v in variants:
        if v.status != OK:
            notes.append(f"{v.name} ({v.format}) {'is not available here' if v.status == UNAVAILABLE else 'failed'}"
                         f": {v.error}")
    if any(not v.latency.measured for v in timed):
        notes.append(f"Latency on {device.name} is ESTIMATED by edgekit's per-operator latency model, not measured: "
                     f"{device.name} is not this machine. Measure on the device with `edgekit profile ARTIFACT "
                     f"--device {device.name} --host user@addr`.")
    target_block: Dict[str, Any] = {"latency_ms": target, "met": None, "source": None}
    if target is not None and timed:
        best = recommended or min(timed, key=lambda v: v.latency.p50)
        target_block = {"latency_ms": target, "met": bool(best.latency.p50 <= target), "variant": best.name,
                        "p50_ms": best.latency.p50, "source": best.latency.source}
        for v in timed:
            v.info["meets_target"] = bool(v.latency.p50 <= target)
    return {
        "edgekit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model,
        "model_info": {**model_info, "baseline": baseline_info},
        "recipe": recipe.name,
        "recipe_spec": recipe.model_dump(),
        "device": device.name,
        "device_profile": device.model_dump(),
        "task": task.describe(),
        "seed": seed,
        "training": training,
        "versions": {"edgekit": __version__, **module_versions()},
        "machine": machine_info(),
        "steps": step_info,
        "variants": [v.to_json() for v in variants],
        "recommended": {"name": recommended.name, "format": recommended.format,
                        "latency_source": recommended.latency.source} if recommended else None,
        "target": target_block,
        "notes": notes,
    }
