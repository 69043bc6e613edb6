"""A bundle for another device than the run's: int8 quantized as the target's profile asks, latency of its own.

A run quantizes int8 for its own device (U8S8 with 7-bit weights on an x86 CPU without VNNI, perhaps a layout
its latency search timed there); an ARM board's profile asks for S8S8. When the shipped int8 ONNX's settings
differ from :func:`edgekit.export.onnx.device_quant_config` of the target, the run's fp32 ONNX of the same model
is re-quantized for the target, calibrated on the run's task rebuilt here (as the ONNX exporter does it, with
no latency search: the target is not this machine). When the task cannot be rebuilt, the bundle is refused with
the command that makes a run for the target. Latency in the manifest is the target's own (estimated from the
shipped graph, labelled); the run's figure stays under ``run_latency`` with the device it belongs to.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..errors import EdgekitError

# The settings that make one int8 layout differ from another on a device's kernels.
LAYOUT_KEYS = ("activation_type", "weight_type", "per_channel", "per_channel_grouped_only", "reduce_range")
AGREEMENT_IMAGES = 500  # eval images the re-quantized model is compared with fp32 on, here
DEFAULT_INPUT_SIZE = {"mnist": 64, "imagefolder": 224}  # the tasks' defaults: --input-size only when it differs


@dataclass
class Requant:
    """What re-quantizing for the target takes: the run's int8 variant it replaces, its fp32 source, the task."""

    variant: dict
    fp32: dict
    run_device: str
    run_config: str
    target: Any  # OrtQuantConfig
    calibration: str  # "auto" or a pinned method
    num_calib: int
    task: Any  # edgekit.data.Task


def run_quant_config(variant: dict) -> dict:
    return ((variant.get("details") or {}).get("quantization") or {}) if isinstance(variant, dict) else {}


def layout_label(cfg) -> str:
    """``S8S8 per-channel`` (``+ 7-bit weights``): the part of an int8 config a device profile asks for."""
    a, w = ("U8" if t == "uint8" else "S8" for t in (cfg.activation_type, cfg.weight_type))
    gran = ("per-channel depthwise" if cfg.per_channel_grouped_only else "per-channel") if cfg.per_channel \
        else "per-tensor"
    return f"{a}{w} {gran}" + (" 7-bit weights" if cfg.reduce_range else "")


def quant_differs(variant: dict, want) -> bool:
    """Whether the run's int8 ONNX was made with another layout than ``want`` (unknown counts as different)."""
    q = run_quant_config(variant)
    if not all(k in q for k in ("activation_type", "weight_type", "per_channel")):
        return True
    return any(q.get(k, False) != getattr(want, k) for k in LAYOUT_KEYS)


def rebuild_task(report: dict) -> Tuple[Optional[Any], str]:
    """(the run's task rebuilt here, or None and why not): the default MNIST task, the photos task, or an image
    folder still there, prepared with the run's own preprocessing."""
    from ..data import Preprocess, load_task

    t = report.get("task") if isinstance(report.get("task"), dict) else {}
    name, shape = str(t.get("name") or ""), t.get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[1:])):
        return None, "report.json does not say the task's input shape"
    seed = report.get("seed", 0)
    seed = seed if isinstance(seed, int) else 0
    try:
        pre = Preprocess.from_json(t["preprocess"]) if isinstance(t.get("preprocess"), dict) else None
        if name == "mnist":
            task = load_task("mnist", input_size=shape[-1], in_chans=shape[1], seed=seed)
        elif name == "photos":
            task = load_task("photos", input_size=shape[-1], preprocess=pre)
        elif name.startswith("imagefolder:"):
            src = t.get("source")
            if not isinstance(src, str) or not Path(src).is_dir():
                return None, f"its image folder {src} no longer exists"
            task = load_task(data=src, input_size=shape[-1], seed=seed, skip_bad_images="skipped_images" in t,
                             **({"preprocess": pre} if pre is not None else {}))
        else:
            return None, f"its task {name or '(unnamed)'} is not one edgekit can rebuild"
    except EdgekitError as exc:
        return None, f"its task cannot be loaded: {exc}"
    if task.num_classes != t.get("num_classes", task.num_classes) or list(task.input_shape) != shape:
        return None, f"its task {name} no longer has the run's classes or input shape"
    return task, ""


def compress_command(report: dict, dev) -> str:
    """The ``edgekit compress`` command that makes the run again, for ``dev``."""
    t = report.get("task") if isinstance(report.get("task"), dict) else {}
    argv = ["edgekit", "compress", str(report.get("model")), "--recipe", str(report.get("recipe")),
            "--device", dev.name]
    kind = "imagefolder" if str(t.get("name", "")).startswith("imagefolder:") else "mnist"
    if kind == "imagefolder":
        argv += ["--data", str(t.get("source"))]
    shape = t.get("input_shape") or []
    if shape and shape[-1] != DEFAULT_INPUT_SIZE[kind]:
        argv += ["--input-size", str(shape[-1])]
    base = ((report.get("model_info") or {}).get("baseline") or {}) if isinstance(report.get("model_info"), dict) \
        else {}
    if base.get("source") == "file" and base.get("path"):
        argv += ["--weights", str(base["path"])]
    elif str(base.get("source", "")).startswith("pretrained"):
        argv += ["--weights", "pretrained"]
    if report.get("seed") not in (None, 0):
        argv += ["--seed", str(report.get("seed"))]
    return " ".join(shlex.quote(a) for a in argv)


def plan_requant(run_dir: Path, report: dict, dev, chosen: dict) -> Optional[Requant]:
    """A :class:`Requant` when ``chosen`` is an int8 ONNX the run made for another device with another layout than
    ``dev`` asks for; None when it ships as it is. Refuses (EdgekitError) when it cannot be re-quantized here."""
    from ..export.onnx import device_quant_config

    if chosen.get("format") != "onnx" or chosen.get("precision") != "int8" or report.get("device") == dev.name:
        return None
    want = device_quant_config(dev)
    if not quant_differs(chosen, want):
        return None
    q = run_quant_config(chosen)
    run_config = q.get("config") or "a layout report.json does not record"
    opts = next((v.get("options") or {} for v in (report.get("recipe_spec") or {}).get("variants") or []
                 if isinstance(v, dict) and v.get("format") == "onnx" and v.get("precision") == "int8"), {})
    fp32 = next((v for v in report["variants"] if v.get("format") == "onnx" and v.get("precision") == "fp32"
                 and v.get("stage", "baseline") == chosen.get("stage", "baseline") and v.get("status", "ok") == "ok"
                 and v.get("path") and (run_dir / v["path"]).is_file() and not (run_dir / v["path"]).is_symlink()),
                None)
    task, reason = (None, f"the run has no fp32 ONNX of its {chosen.get('stage', 'baseline')} model to quantize "
                          f"again") if fp32 is None else rebuild_task(report)
    if task is None:
        raise EdgekitError(
            f"{run_dir} was made for {report.get('device')}: its int8 model is {run_config}, but {dev.name}'s profile "
            f"asks for {layout_label(want)}, and it cannot be re-quantized here: {reason}. Make a run for {dev.name}: "
            f"`{compress_command(report, dev)}`")
    # the recipe's own options where it set them (report.json may come from someone else: plain values only), else
    # the exporter's defaults: calibration auto, QDQ, every op ORT quantizes, 256 calibration images
    pinned = opts.get("calibration")
    method = pinned if pinned in ("minmax", "entropy", "percentile") else "auto"
    ops = opts.get("op_types")
    ops = list(ops) if isinstance(ops, list) and ops and all(isinstance(o, str) and o.isalnum() for o in ops) else None
    fmt = opts.get("quant_format") if opts.get("quant_format") in ("qdq", "qoperator") else "qdq"
    target = replace(want, quant_format=fmt, op_types=ops, calibration="minmax" if method == "auto" else method)
    kept = q.get("nodes_to_exclude")  # the run's int8 fallback kept these layers in float: so does the target's
    if isinstance(kept, list) and kept and all(isinstance(n, str) for n in kept):
        target = replace(target, nodes_to_exclude=tuple(kept))
    num = next((n for n in (opts.get("num_calib"), q.get("num_calib")) if isinstance(n, int) and n > 0), 256)
    return Requant(chosen, fp32, str(report.get("device")), run_config, target, method, num, task)


def requantize(plan: Requant, run_dir: Path, out: Path, dev) -> Tuple[dict, str]:
    """Write the target's int8 ONNX to ``out``; (what was done and how close it is to fp32, the manifest's why)."""
    from ..export.onnx_int8 import AUTO_CANDIDATES, AUTO_SCOPES, quantize_onnx, quantize_onnx_auto

    src = run_dir / plan.fp32["path"]
    calib, _ = plan.task.arrays("calib", limit=plan.num_calib)
    details: Dict[str, Any] = {}
    if plan.calibration == "auto":
        _, cfg, details = quantize_onnx_auto(src, out, calib, plan.target, candidates=AUTO_CANDIDATES,
                                             scopes=AUTO_SCOPES)
    else:
        quantize_onnx(src, out, calib, plan.target)
        cfg = plan.target
    from ..export.fallback import fallback_label

    info = {"from": plan.fp32["path"], "config": cfg.label() + fallback_label(cfg), "run_config": plan.run_config,
            "run_device": plan.run_device, "tool": "onnxruntime.quantization.quantize_static",
            "calibration": {"method": plan.calibration, "split": "calib", "images": len(calib),
                            **({"sqnr_db": details["calibration_sqnr_db"]} if "calibration_sqnr_db" in details
                               else {})},
            **_agreement(src, out, plan.task)}
    why = (f"re-quantized for {dev.name}: {info['config']}, from the run's fp32 ONNX {plan.fp32['path']} (the run's "
           f"{plan.variant.get('path')} is {plan.run_config}, made for {plan.run_device})")
    return info, why


def _agreement(fp32: Path, int8: Path, task) -> dict:
    """Top-1 agreement of the int8 model with fp32 (and both accuracies) on the task's eval images, here."""
    from ..evaluate import agreement, predict_stream, top1
    from ..runtime import load_runner

    n = min(AGREEMENT_IMAGES, task.size("eval"))
    feeds = {}
    for key, path in (("fp32", fp32), ("int8", int8)):
        r = load_runner("onnxruntime", path, threads=1)
        feeds[key] = (r.run, r.input_shape[0] if isinstance(r.input_shape[0], int) else 32)
    try:
        pred = predict_stream(feeds, task.batches("eval", batch_size=32, limit=n),
                              total=task.num_batches("eval", 32, n), description="compare int8 with fp32")
    except Exception as exc:  # noqa: BLE001 - the figure is informative; the bundle still ships
        return {"agreement_with_fp32": None, "agreement_note": f"not computed: {type(exc).__name__}: {exc}"}
    if pred.errors:
        return {"agreement_with_fp32": None, "agreement_note": f"not computed: {next(iter(pred.errors.values()))}"}
    a, b = pred.logits["fp32"], pred.logits["int8"]
    out = {"agreement_with_fp32": round(agreement(a, b), 4), "eval_images": int(len(a))}
    if pred.labels is not None and getattr(task, "labelled", True):  # unlabelled images carry -1: no accuracy
        out.update(accuracy=round(top1(b, pred.labels), 4), fp32_accuracy=round(top1(a, pred.labels), 4))
    return out


def target_latency(path: Path, fmt: str, dev, report: dict, variant: Optional[dict],
                   requantized: bool) -> Tuple[Optional[dict], Optional[str]]:
    """(the target's latency for the shipped file, labelled; or None and why): the run's own figure when the run was
    made for this device, else the per-operator estimate of the shipped ONNX on the target."""
    run_lat = (variant or {}).get("latency_ms")
    if report.get("device") == dev.name and isinstance(run_lat, dict) and not requantized:
        return {**run_lat, "device": dev.name, "of": "the run's figure (the run was made for this device)"}, None
    if fmt != "onnx":
        return None, (f"not estimated: only ONNX graphs are; measure on the device with "
                      f"`edgekit deploy RUN --device {dev.name} --host user@addr`")
    from ..estimate import estimate

    try:
        lat = estimate(path, dev, threads=dev.resolved_threads())
    except Exception as exc:  # noqa: BLE001 - a graph the estimator cannot read still ships, without a figure
        return None, f"not estimated: {type(exc).__name__}: {str(exc)[:200]}"
    return {"p50": round(lat.p50, 4), "source": lat.source, "device": dev.name, "threads": lat.threads,
            "method": lat.method, "coefficients": lat.extra.get("coefficients"),
            "of": f"estimated for {dev.name} from the shipped graph, not measured on it"}, None


def run_latency(report: dict, variant: Optional[dict]) -> Optional[dict]:
    """The run's figure for the variant it made, under its own device's name (never the target's)."""
    lat = (variant or {}).get("latency_ms")
    if not isinstance(lat, dict):
        return None
    return {**lat, "device": lat.get("device") or report.get("device"), "variant": (variant or {}).get("name"),
            "speedup": (variant or {}).get("speedup")}
