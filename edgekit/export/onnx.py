"""PyTorch -> ONNX (fp32), checked and runnable by ONNX Runtime; int8 by ``onnx_int8`` (the ``onnx`` row)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Tuple

import torch
from torch import nn

from ..errors import EdgekitError
from ..formats import DEFAULT_OPSET, OnnxOptions


def fold_constants_to_initializers(model_proto) -> None:
    """Turn ``Constant`` nodes into initializers and drop ``Identity`` nodes that forward them.

    The TorchScript exporter emits convolution biases as Constant nodes;
    ORT's quantizer only quantizes biases that are initializers.
    """
    from onnx import numpy_helper

    g = model_proto.graph
    keep, rename = [], {}
    outputs = {o.name for o in g.output}
    for node in g.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0])
            g.initializer.append(t)
            continue
        keep.append(node)
    inits = {i.name for i in g.initializer}
    final = []
    for node in keep:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            rename[node.output[0]] = node.input[0]
            continue
        final.append(node)
    for node in final:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del g.node[:]
    g.node.extend(final)


def device_quant_config(device, **overrides):
    """The int8 settings a device profile asks for (activation/weight types, per-channel, 7-bit weights where its
    kernels saturate), as an :class:`OrtQuantConfig`."""
    from .onnx_int8 import OrtQuantConfig

    q = device.quantization
    return OrtQuantConfig(activation_type=q.activation_type, weight_type=q.weight_type, per_channel=q.per_channel,
                          reduce_range=int8_reduce_range(device), **overrides)


def int8_reduce_range(device) -> bool:
    """7-bit weights where the device's int8 kernels would saturate with 8-bit ones: x86 CPUs without VNNI (this
    machine's flags for a local profile; the profile's isa list for another x86 device). ARM kernels accumulate in
    32 bits and keep full-range weights."""
    from ..hostinfo import VNNI_FLAGS, x86_int8_saturates

    q = device.quantization
    if q.reduce_range is not None:
        return q.reduce_range
    if device.local:
        return x86_int8_saturates()
    return device.arch in ("x86_64", "amd64") and not (set(device.isa) & VNNI_FLAGS)


def export_onnx(model: nn.Module, path: str | Path, input_shape: Tuple[int, ...], opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False) -> Path:
    """Export with the TorchScript-based exporter (its graphs quantize cleanly in ORT).

    The batch axis is static by default (batch 1 is what edge devices run, and
    static shapes let the channel shuffle's Reshape fold to constants).
    """
    import onnx

    path = Path(path)
    model = model.eval()
    dummy = torch.randn(*input_shape)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (dummy,), str(path), input_names=["input"], output_names=["logits"],
                              opset_version=opset, dynamic_axes=axes, do_constant_folding=True, dynamo=False)
        except Exception as exc:
            raise EdgekitError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    proto = onnx.load(str(path))
    fold_constants_to_initializers(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def fp32_onnx(model, path: str | Path, input_shape: Tuple[int, ...], opset: int = DEFAULT_OPSET) -> Path:
    """The fp32 graph every ONNX-based row starts from: exported from PyTorch, or the user's ONNX file at the run's
    static input shape (its own opset kept)."""
    from .onnx_source import OnnxModel
    from .qat import is_qat

    if isinstance(model, OnnxModel):
        return model.save_static(path, min_opset=13)
    if is_qat(model):
        from ..formats import FormatUnavailable

        raise FormatUnavailable("a QAT model has no fp32 ONNX graph; its int8 is the onnx int8 variant")
    return export_onnx(model, path, input_shape, opset=opset)


def export_variant(model: nn.Module, precision: str, options: OnnxOptions, ctx) -> Path:
    """fp32: export. int8: export fp32 once per model, then ORT static quantization with the device's types."""
    from .onnx_int8 import (AUTO_CANDIDATES, AUTO_SCOPES, SEARCH_NEEDS_TIMER, OrtQuantConfig, quantize_onnx,
                            quantize_onnx_auto)
    from .qat import export_qat_onnx_variant, is_qat

    if is_qat(model):  # the QDQ graph with the scales it learned; ORT calibrates nothing
        return export_qat_onnx_variant(model, precision, options, ctx)
    key = ("onnx-fp32", id(model))
    fp32 = ctx.cache.get(key)
    if fp32 is None:
        fp32 = ctx.path(".onnx", ctx.name if precision == "fp32" else f"{ctx.name}.fp32-src")
        fp32_onnx(model, fp32, ctx.input_shape, opset=options.opset)
        ctx.cache[key] = fp32
    if precision == "fp32":
        return fp32
    if precision != "int8":
        raise EdgekitError(f"onnx has no {precision} variant here")
    if options.max_drop_pp is not None and not getattr(ctx.task, "labelled", True):
        raise EdgekitError(f"int8 option max_drop_pp is top-1 points on the calibration labels, and {ctx.task.name} "
                           f"has none: use min_agreement (top-1 agreement with fp32) instead")
    detector = getattr(ctx.task, "kind", "classification") == "detection"
    if detector and (options.min_agreement is not None or options.max_drop_pp is not None):
        raise EdgekitError("int8 options min_agreement / max_drop_pp score top-1 classes; the layer fallback is not "
                           "built for detectors yet: leave them out for a detection model")
    q = ctx.device.quantization
    pinned = [k for k in ("activation_type", "weight_type", "per_channel") if getattr(options, k) is not None]
    cfg = OrtQuantConfig(
        activation_type=options.activation_type or q.activation_type,
        weight_type=options.weight_type or q.weight_type,
        per_channel=q.per_channel if options.per_channel is None else options.per_channel,
        calibration=options.calibration,
        quant_format=options.quant_format,
        reduce_range=int8_reduce_range(ctx.device) if options.reduce_range is None else options.reduce_range,
        op_types=options.op_types,
        equalize=bool(options.equalize),
        bias_correction=bool(options.bias_correction),
        adaround=bool(options.adaround),
        fp32_tail=detector,
    )
    calib, _ = ctx.task.arrays("calib", limit=options.num_calib)
    # search: latency (default where the device is this machine) times the int8 layouts here and keeps the
    # fastest accurate one; none keeps the device profile's layout. Explicit types/per_channel turn it off.
    search = options.search or ("latency" if ctx.device.local and not pinned else "none")
    if search == "latency" and not ctx.device.local:
        raise EdgekitError(f"int8 option search: latency times candidates on this machine, but device "
                           f"{ctx.device.name} is not this machine; use search: none")
    skipped = None
    if search == "latency" and ctx.timer is None:  # nothing to time with: the profile's layout, and say so
        search, skipped = "none", SEARCH_NEEDS_TIMER
    details = None
    if cfg.calibration == "auto" or search == "latency":
        auto = cfg.calibration == "auto"  # auto: edgekit picks the calibration method and the op scope
        out, cfg, details = quantize_onnx_auto(fp32, ctx.path(".onnx"), calib, cfg,
                                               candidates=AUTO_CANDIDATES if auto else (cfg.calibration,),
                                               scopes=AUTO_SCOPES if auto else (None,),
                                               latency_threads=ctx.device.resolved_threads()
                                               if search == "latency" else None, timer=ctx.timer,
                                               # None: auto tries CLE / bias correction (/ AdaRound) as extra
                                               # candidates
                                               equalize=options.equalize if auto else cfg.equalize,
                                               bias_correction=options.bias_correction if auto else cfg.bias_correction,
                                               adaround=options.adaround if auto else cfg.adaround,
                                               fidelity=detection_fidelity(ctx.task) if detector else None)
    else:
        out = quantize_onnx(fp32, ctx.path(".onnx"), calib, cfg)
    ctx.info["quantization"] = {"tool": "onnxruntime.quantization.quantize_static", "config": cfg.label(),
                                "num_calib": len(calib), **{k: v for k, v in vars(cfg).items() if k != "extra_options"}}
    if details is not None:  # logits SQNR vs fp32 on the calibration split; the layouts timed here
        details.pop("ptq_search_seconds", None)  # a timing: the same model and data must give the same info
        ctx.info["quantization"].update(details)
    if skipped:
        ctx.info["quantization"]["search_skipped"] = skipped
    if detector and details is not None:
        ctx.info["quantization"]["scored_by"] = ("detections: SQNR of the class scores and of the boxes fp32 scores "
                                                 "0.05 or more; agreement is mAP against fp32's detections")
    if options.min_agreement is not None or options.max_drop_pp is not None:
        out = _fallback(fp32, out, calib, cfg, options, ctx)
    return out


def detection_fidelity(task):
    from ..detect.metrics import fidelity

    return fidelity(task.num_classes, task.input_size)


def _fallback(fp32: Path, out: Path, calib, cfg, options: OnnxOptions, ctx) -> Path:
    """min_agreement / max_drop_pp: layers back to float until the budget holds on the calibration split, each step
    priced by the export's timer where the device is this machine, else estimated (``fallback.py``)."""
    from .fallback import Budget, estimated_pricer, fallback_label, int8_fallback, timed_pricer

    labelled = getattr(ctx.task, "labelled", True)
    labels = ctx.task.labels("calib")[:len(calib)] if labelled else None
    threads = ctx.device.resolved_threads()
    price = timed_pricer(ctx.timer, threads, calib[:1]) if ctx.timer is not None else \
        estimated_pricer(ctx.device, threads)
    out, cfg, record = int8_fallback(fp32, out, calib, labels, cfg, Budget.from_options(options), price)
    ctx.info["quantization"].update(config=cfg.label() + fallback_label(cfg), fallback=record,
                                    nodes_to_exclude=list(cfg.nodes_to_exclude))
    return out
