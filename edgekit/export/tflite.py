"""PyTorch -> TFLite (LiteRT) with litert-torch: fp32, fp16 weights, full-integer int8.

- fp32: ``litert_torch.convert`` (torch.export -> StableHLO -> TFLite flatbuffer).
- fp16: the fp32 flatbuffer with float16 weights (ai-edge-quantizer's ``float_casting``,
  weight-only: Conv/FC/depthwise weights stored as fp16 and dequantized at load; the
  LiteRT equivalent of TFLiteConverter's ``supported_types=[tf.float16]``).
- int8: PT2E post-training quantization with litert-torch's ``PT2EQuantizer``
  (int8 symmetric per-channel weights, int8 per-tensor affine activations calibrated on
  the task's calibration split; a ReLU6 after a conv observed after its clip, as a ReLU is: ``litert_quantizer``),
  converted to a full-integer model: int8 kernels throughout
  and int8 input and output tensors (their scale / zero point are in the model;
  ``edgekit.runtime.litert`` applies them).
- ``options: {nhwc: true}``: input (and nothing else) is NHWC, as camera pipelines on
  devices deliver it; the NCHW -> NHWC transpose is folded into the model.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import EdgekitError
from ..formats import FormatUnavailable, TfliteOptions


def _quiet_litert() -> None:
    # litert-torch prints a progress tree to stdout for every conversion unless told not to.
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _prepare(model: nn.Module, input_shape: Tuple[int, ...], nhwc: bool) -> Tuple[nn.Module, torch.Tensor]:
    """The module to convert and its sample input (NHWC wrapper when asked)."""
    import litert_torch

    module = model.eval()
    for m in module.modules():  # layers whose deployed form is read from buffers fix it as constants first
        freeze = getattr(m, "freeze_for_export", None)
        if callable(freeze):
            freeze()
    sample = torch.randn(*input_shape)
    if nhwc:
        module = litert_torch.to_channel_last_io(module, args=[0]).eval()
        sample = sample.permute(0, 2, 3, 1).contiguous()
    return module, sample


def convert_fp32(model: nn.Module, path: Path, input_shape: Tuple[int, ...], nhwc: bool = False) -> Path:
    _quiet_litert()
    import litert_torch

    module, sample = _prepare(model, input_shape, nhwc)
    try:
        edge = litert_torch.convert(module, (sample,))
    except Exception as exc:  # a converter limit of this model, not a user error
        raise RuntimeError(f"litert-torch cannot convert this model: {_first_line(exc)}") from exc
    edge.export(str(path))
    return Path(path)


def fp16_weights(fp32_path: Path, out_path: Path) -> Path:
    """Store Conv / FC weights of a float TFLite model as float16 (weight-only, fp32 compute)."""
    from ai_edge_quantizer import qtyping, quantizer
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    qt = quantizer.Quantizer(str(fp32_path))
    qt.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                              algorithm_key=AlgorithmName.FLOAT_CASTING)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = qt.quantize(enable_progress_bar=False, enable_progress_report=False)
    Path(out_path).write_bytes(bytes(result.quantized_model))
    return Path(out_path)


def route_through_qdq(gm) -> int:
    """Feed quantized binary ops (add / mul / cat) the Q->DQ copy of an input that reached them in float.

    torchao's PT2E leaves the edge from one residual ``add`` into the next in float
    (both annotated, one shared observer, but the consumer keeps the float tensor);
    the TFLite converter then keeps every such ADD in float (MobileNetV2: 7 of 10).
    The quantizer annotated these inputs as int8, so the rewiring is what it asked for;
    afterwards the model is integer end to end. Returns the number of edges rewired.
    """
    qd = torch.ops.quantized_decomposed
    quant, dequant = qd.quantize_per_tensor.default, qd.dequantize_per_tensor.default
    binary = (torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor, torch.ops.aten.cat.default)
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in binary:
            continue
        for src in list(node.all_input_nodes):
            if src.op != "call_function" or src.target == dequant:
                continue
            q = next((u for u in src.users if u.op == "call_function" and u.target == quant), None)
            dq = next((u for u in q.users if u.op == "call_function" and u.target == dequant), None) if q else None
            if dq is not None:
                node.replace_input_with(src, dq)
                changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def mark_cat_sources(gm) -> int:
    """Let litert-torch's ``cat`` annotator see the ``torch.cat`` calls of a non-strict ``torch.export`` graph.

    The annotator finds concatenations by ``get_source_partitions(graph, [torch.cat])``, which
    reads ``source_fn_stack``; non-strict export (what ``torch.export.export`` does by
    default) records only ``torch_fn`` (``("cat_1", "builtin_function_or_method.cat")``),
    which the matcher compares with its function argument and never matches. Such a ``cat``
    gets no shared input/output quantization, so its inputs keep their own scales and the
    TFLite converter stops on CONCATENATION's same-scale constraint ("'tfl.concatenation' op
    quantization parameters violate the same scale constraint"). Returns the number of
    nodes marked.
    """
    marked = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.cat.default \
                and not node.meta.get("source_fn_stack"):
            node.meta["source_fn_stack"] = [(node.name, torch.cat)]
            marked += 1
    return marked


def unshare_dequantize(gm) -> int:
    """Give every consumer of a shared ``dequantize`` node its own copy (same Q input, same parameters).

    torchao's ``DuplicateDQPass`` does this only for consumers that carry a quantization
    annotation, so a dequantize feeding, e.g., both an ``add`` and a ``reshape`` stays
    shared. litert-torch's NHWC layout pass cannot lower such a node when its consumers
    want different layouts: inserting the NCHW transpose for the reshape overwrites the
    shared node's metadata (``insert_t_q_dq`` assigns ``input_dq.meta``), after which the
    NHWC consumer fails with "Attempting to convert non-NHWC compatible node to NHWC:
    dequantize_per_tensor_N". Copies compute the same values, so this changes nothing
    numerically. Returns the number of copies added.
    """
    qd = torch.ops.quantized_decomposed
    dequant = (qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor, qd.dequantize_per_channel.default)
    added = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in dequant or len(node.users) < 2:
            continue
        for user in list(node.users)[1:]:
            with gm.graph.inserting_after(node):
                copy = gm.graph.node_copy(node)
            user.replace_input_with(node, copy)
            added += 1
    if added:
        gm.graph.lint()
        gm.recompile()
    return added


_CONV = ("conv1d.default", "conv2d.default", "convolution.default")
_RELU6 = "edgekit_conv_relu6"


def _annotate_conv_relu6(gm, quantization_config, filter_fn=None):
    """conv -> ReLU6 as one quantized op whose output is observed *after* the clip, as conv -> ReLU is.

    litert-torch annotates conv+ReLU only; a ReLU6 (``hardtanh(0, 6)``) then shares the conv's observer, which
    sees the unclipped pre-activation: on EfficientNet-Lite that range is several times 6, so every ReLU6 output
    keeps a few of its 256 levels. TFLite fuses the clip into the conv (fused RELU6) and ORT drops a Clip whose
    Quantize range lies inside it, so neither runtime pays for the clip.
    """
    from litert_torch.quantize import pt2e_quantizer_utils as pu
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    found = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or str(n.target).removeprefix("aten.") not in ("hardtanh.default",
                                                                                  "hardtanh_.default"):
            continue
        lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min_val", -1.0)
        hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max_val", 1.0)
        conv = n.args[0]
        if (float(lo), float(hi)) != (0.0, 6.0) or not isinstance(conv, torch.fx.Node) \
                or conv.op != "call_function" or str(conv.target).removeprefix("aten.") not in _CONV:
            continue
        qspec = {conv.args[0]: pu.get_input_act_qspec(quantization_config),
                 conv.args[1]: pu.get_weight_qspec(quantization_config)}
        part = [n, conv, conv.args[1]]
        bias = conv.args[2] if len(conv.args) > 2 else None
        if isinstance(bias, torch.fx.Node):
            qspec[bias] = pu.get_bias_qspec(quantization_config)
            part.append(bias)
        if pu._is_annotated(part) or (filter_fn and not all(filter_fn(x) for x in part)):
            continue
        conv.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=qspec, _annotated=True)
        n.meta["quantization_annotation"] = QuantizationAnnotation(
            output_qspec=pu.get_output_act_qspec(quantization_config), _annotated=True)
        pu._mark_nodes_as_annotated(part)
        found.append(part)
    return found


_WEIGHTED = (*_CONV, "linear.default", "addmm.default", "mm.default")


def float_tail(quantizer):
    """``quantizer`` leaving unquantized every op from which no conv or linear layer is reachable (a detector's
    box decoding and scores, which one 8-bit scale over pixel boxes and 0-1 scores would crush), as the ONNX int8
    path does (:func:`edgekit.export.ptq.float_tail`). The file then ends in float ops with a float output."""
    annotate = quantizer.annotate

    def annotate_all_but_the_tail(gm):
        gm = annotate(gm)
        reaches = {}
        for n in reversed(list(gm.graph.nodes)):  # users come after their inputs
            reaches[n] = (n.op == "call_function" and str(n.target).removeprefix("aten.") in _WEIGHTED) or any(
                reaches.get(u, False) for u in n.users)
        for n in gm.graph.nodes:
            if n.op == "call_function" and not reaches[n]:
                n.meta.pop("quantization_annotation", None)
        return gm

    quantizer.annotate = annotate_all_but_the_tail
    return quantizer


def litert_quantizer(config):
    """litert-torch's ``PT2EQuantizer`` with ``config`` global, and conv+ReLU6 annotated like conv+ReLU."""
    from litert_torch.quantize import pt2e_quantizer as pq
    from litert_torch.quantize import pt2e_quantizer_utils as pu

    pu.OP_TO_ANNOTATOR.setdefault(_RELU6, _annotate_conv_relu6)
    quantizer = pq.PT2EQuantizer().set_global(config)
    ops = list(quantizer.STATIC_OPS)
    ops.insert(ops.index("conv_relu") + 1, _RELU6)  # before plain "conv" claims the conv
    quantizer.STATIC_OPS = ops
    return quantizer


@contextlib.contextmanager
def _without_qat_conv_bn_fold():
    """``convert_pt2e`` without torchao's QAT conv-BN folding pass, for graphs made by ``prepare_pt2e``.

    That pass looks for the conv-BN patterns ``prepare_qat_pt2e`` inserts, which a post-training graph cannot
    contain (``prepare_pt2e`` has already folded every conv-BN pair). It still runs whenever any BatchNorm is
    left (pre-activation nets: CondenseNet, DenseNet-style BN-ReLU-conv), and then torch-exports 216 pattern
    graphs: 20-35 s per conversion whatever the model's size, for a graph it leaves as it was.
    ``bench/convert_speed.py`` shows the converted file is byte-identical with and without it.
    """
    try:
        from torchao.quantization.pt2e import quantize_pt2e as qp
    except ImportError:  # pragma: no cover - torchao comes with litert-torch
        yield
        return
    saved = getattr(qp, "_fold_conv_bn_qat", None)
    if saved is None or os.environ.get("EDGEKIT_TFLITE_QAT_FOLD") == "1":
        yield
        return
    qp._fold_conv_bn_qat = lambda m: m
    try:
        yield
    finally:
        qp._fold_conv_bn_qat = saved


def convert_int8(model: nn.Module, path: Path, input_shape: Tuple[int, ...], calib: np.ndarray, nhwc: bool = False,
                 per_channel: bool = True, bias_correction: Optional[bool] = None,
                 report: Optional[dict] = None, keep_tail_float: bool = False) -> int:
    """Full-integer int8 by PT2E: export, insert observers, calibrate, convert, correct biases, lower to TFLite.

    ``bias_correction`` (``pt2e_bias``): True applies it, None keeps it where the calibration logits' SQNR rises,
    False skips it; what it did goes to ``report["bias_correction"]``. ``keep_tail_float``: see :func:`float_tail`.
    Writes ``path``; returns how many float edges :func:`route_through_qdq` rewired.
    """
    _quiet_litert()
    import litert_torch
    from litert_torch.quantize import pt2e_quantizer as pq
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from .pt2e_bias import calibration_batches, correct_bias_pt2e

    if len(calib) == 0:
        raise EdgekitError("Calibration needs at least one input; the calibration split is empty")
    module, sample = _prepare(model, input_shape, nhwc)

    def attempt(shared_cat_scales: bool):
        quantizer = litert_quantizer(pq.get_symmetric_quantization_config(is_per_channel=per_channel,
                                                                           is_dynamic=False))
        if keep_tail_float:
            quantizer = float_tail(quantizer)
        graph = torch.export.export(module, (sample,)).module()
        if shared_cat_scales:
            mark_cat_sources(graph)
        prepared = prepare_pt2e(graph, quantizer)
        move_exported_model_to_eval(prepared)
        # the exported graph has the static batch of the sample input
        batches = calibration_batches(calib, input_shape[0], nhwc)
        with torch.no_grad():
            for x in batches:
                prepared(x)
        with _without_qat_conv_bn_fold():
            quantized = convert_pt2e(prepared, fold_quantize=False)
        move_exported_model_to_eval(quantized)  # eval-mode ops; the flag below is what litert-torch reads
        for sub in quantized.modules():
            sub.training = False
        if bias_correction is not False:
            try:
                done = correct_bias_pt2e(quantized, batches, auto=bias_correction is None)
            except Exception as exc:  # noqa: BLE001 - auto leaves a graph it cannot correct as it was
                if bias_correction:
                    raise EdgekitError(f"tflite int8 bias_correction failed on this model: {_first_line(exc)}; "
                                       "set bias_correction: false") from exc
                done = {"kept": False, "why": f"not applied: {_first_line(exc)}"}
            if report is not None:
                report["bias_correction"] = done
        rewired = route_through_qdq(quantized)
        unshare_dequantize(quantized)
        return litert_torch.convert(quantized, (sample,), quant_config=QuantConfig(pt2e_quantizer=quantizer)), rewired

    # First as litert-torch annotates by itself; only if the converter then refuses the model (CondenseNet's
    # concatenations: "'tfl.concatenation' op quantization parameters violate the same scale constraint") again
    # with one shared scale per torch.cat. Shared concat scales are not the default because they propagate to
    # the concatenated producers: GhostNet then fails on a PAD's same-scale constraint, and VGG16-HetConv
    # converts but collapses to chance (10.4% vs 98.0% fp32 on the 64 px baseline).
    try:
        edge, rewired = attempt(shared_cat_scales=False)
    except EdgekitError:
        raise
    except Exception as first:
        try:
            edge, rewired = attempt(shared_cat_scales=True)
        except Exception:
            raise RuntimeError(f"litert-torch cannot quantize this model (PT2E int8): {_first_line(first)}") from first
    edge.export(str(path))
    return rewired


def export_tflite(model: nn.Module, precision: str, options: TfliteOptions, ctx) -> Path:
    """The ``tflite`` row of the formats table (``export(model, precision, options, ctx) -> Path``)."""
    import importlib.metadata as md

    if precision not in ("fp32", "fp16", "int8"):
        raise EdgekitError(f"tflite has no {precision} variant (it supports fp32, fp16, int8)")
    from .onnx_source import OnnxModel

    if isinstance(model, OnnxModel):
        raise FormatUnavailable("TFLite is converted from a PyTorch model (litert-torch); from an ONNX file it would "
                                "need onnx2tf and TensorFlow, which edgekit does not install")
    nhwc = options.nhwc
    info = {"converter": f"litert-torch {md.version('litert-torch')}", "layout": "NHWC" if nhwc else "NCHW",
            "input_shape": list(ctx.input_shape[:1]) + (list(ctx.input_shape[2:]) + [ctx.input_shape[1]]
                                                        if nhwc else list(ctx.input_shape[1:]))}
    out = ctx.path(".tflite")
    from .qat import convert_qat_tflite, is_qat

    if is_qat(model):  # the converted QAT graph with its learned scales; no calibration
        if precision != "int8":
            raise FormatUnavailable(f"a QAT model converts to int8 only (tflite {precision}: convert the model "
                                    "before qat)")
        if options.per_channel != model.scheme["per_channel"]:
            raise EdgekitError(f"tflite int8 of a QAT model: per_channel {options.per_channel} differs from what "
                               f"the qat step trained ({model.scheme['weights']})")
        info["quantization"] = {"tool": "QAT, learned scales (torchao prepare_qat_pt2e / convert_pt2e, litert-torch)",
                                "scheme": f"full-integer int8: weights {model.scheme['weights']}, activations int8 "
                                          f"per-tensor affine, int8 input; logits {model.scheme['logits']}",
                                "calibration": "none (learned during QAT)",
                                "float_edges_rewired": convert_qat_tflite(model, out, ctx.input_shape, nhwc=nhwc)}
        ctx.info.update(info)
        return out
    if precision == "int8":
        calib, _ = ctx.task.arrays("calib", limit=options.num_calib)
        per_channel = options.per_channel
        report: dict = {}
        detector = getattr(ctx.task, "kind", "classification") == "detection"
        rewired = convert_int8(model, out, ctx.input_shape, calib, nhwc=nhwc, per_channel=per_channel,
                               bias_correction=options.bias_correction, report=report, keep_tail_float=detector)
        info["quantization"] = {
            "tool": "litert-torch PT2EQuantizer + torchao prepare_pt2e/convert_pt2e",
            "scheme": "full-integer int8: weights int8 symmetric " + ("per-channel (axis 0)" if per_channel
                                                                      else "per-tensor")
                      + ", activations int8 per-tensor affine (HistogramObserver), int8 input and output",
            "num_calib": len(calib),
            "float_edges_rewired": rewired,
            "bias_correction": report.get("bias_correction", {"kept": False, "why": "bias_correction: false"}),
        }
        if detector:
            info["quantization"]["scheme"] += "; the decoding after the last convs float, with a float output"
    else:
        key = ("tflite-fp32", id(model), nhwc)
        fp32 = ctx.cache.get(key)
        if fp32 is None or not Path(fp32).is_file():
            fp32 = out if precision == "fp32" else ctx.path(".tflite", f"{ctx.name}.fp32-src")
            convert_fp32(model, fp32, ctx.input_shape, nhwc=nhwc)
            ctx.cache[key] = fp32
        if precision == "fp32":
            if Path(fp32) != out:
                out.write_bytes(Path(fp32).read_bytes())
        else:
            fp16_weights(Path(fp32), out)
            info["quantization"] = {"tool": f"ai-edge-quantizer {md.version('ai-edge-quantizer')} float_casting",
                                    "scheme": "float16 weights (Conv/FC/depthwise), float32 activations and I/O"}
    ctx.info.update(info)
    return out
