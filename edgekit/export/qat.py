"""Quantization-aware training graphs and their int8 exports (the ``qat`` step's model).

One mechanism serves both formats: the model is ``torch.export``-ed, its BatchNorms folded into the convolutions,
and torchao's ``prepare_qat_pt2e`` inserts fake quantizers where litert-torch's ``PT2EQuantizer`` annotates (inputs
and outputs of conv / conv+ReLU / linear / add / mul / cat / pools, and conv+ReLU6 as edgekit's
``tflite.litert_quantizer`` adds it; not Hardswish or SiLU, which stay float between them). Weights: int8
symmetric, per output channel (axis 0) where the device asks for it, 7-bit ([-64, 64], ORT's ``reduce_range``)
where its kernels saturate. Activations: per-tensor affine int8; the ONNX file stores them as
uint8 with the zero point moved by 128 where the device runs U8S8, which is the same arithmetic. Ranges are
moving averages of what the training batches produce, frozen in eval mode.

- ONNX: ``convert_pt2e`` then the dynamo exporter (opset >= 18) writes Quantize/DequantizeLinear with the learned
  scales; :func:`finish_qdq` stores weights as int8 initializers and biases as int32 at ``s_x * s_w`` (what ORT's
  quantizer writes and what its QLinearConv / QGemm fusions need), so no ORT calibration runs.
- TFLite: the same converted graph goes to ``litert_torch.convert`` with the quantizer, as the PTQ path does.

The logits layer keeps int8 weights and input but a float output unless ``int8_logits`` (8-bit logits make
argmax ties, as ``onnx_int8.OrtQuantConfig.fp32_output_layer`` notes); ORT runs it as QGemm with a float output.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import EdgekitError

QAT_OPSET = 18  # the dynamo exporter's lowest opset for quantized_decomposed ops


class QatModel(nn.Module):
    """A fake-quantized exported graph that trains with ``fit`` like any model and knows how it was quantized.

    ``train()`` / ``eval()`` switch the graph's dropout and turn the range observers on and off: evaluating never
    moves a scale. ``scheme`` is what the exporters check their options against.
    """

    def __init__(self, graph: nn.Module, quantizer, scheme: dict, stats: dict):
        super().__init__()
        self.graph, self.quantizer, self.scheme, self._stats = graph, quantizer, scheme, stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> "QatModel":
        from torchao.quantization.pt2e import (disable_observer, enable_observer, move_exported_model_to_eval,
                                               move_exported_model_to_train)

        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
        self.graph.apply(enable_observer if mode else disable_observer)
        self.training = mode
        return self

    def stats(self) -> dict:
        """Parameters and MACs of the float model it was made from (the graph has no Conv2d modules to hook)."""
        return dict(self._stats)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[torch.Tensor]) -> None:
        """Initial ranges: observers on, dropout off."""
        from torchao.quantization.pt2e import enable_observer

        self.eval()
        self.graph.apply(enable_observer)
        for x in batches:
            self.graph(x)
        self.eval()

    def converted(self) -> nn.Module:
        """The reference int8 graph (``quantized_decomposed`` quantize/dequantize ops) with the learned scales."""
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        g = copy.deepcopy(self.eval().graph)
        for m in g.modules():  # the scales the fake quantizers computed with, not their observers' re-derivation
            if hasattr(m, "activation_post_process") and hasattr(m, "scale"):
                m.calculate_qparams = _stored_qparams(m)
        q = convert_pt2e(g, fold_quantize=False)
        move_exported_model_to_eval(q)
        for sub in q.modules():
            sub.training = False
        return q

    def output_scale(self) -> float | None:
        """The logits' quantum with ``int8_logits``, else None (float logits)."""
        out = next(n for n in self.graph.graph.nodes if n.op == "output").args[0][0]
        if out.op != "call_module":
            return None
        return float(getattr(self.graph, out.target).scale.item())


def _stored_qparams(fq):
    """``calculate_qparams`` for ``convert_pt2e`` that returns the buffers the fake quantizer used.

    ``FusedMovingAvgObsFakeQuantize`` computes its scales in the fused kernel, which for symmetric per-channel
    weights divides by a slightly different range than the observer's ``calculate_qparams`` (0.8% apart at
    [-64, 64]); converting with the latter would round the weights onto a grid they were not trained on.
    """
    def qparams():
        return fq.scale.detach().clone(), fq.zero_point.detach().clone()

    return qparams


def is_qat(model) -> bool:
    return isinstance(model, QatModel)


def _config(per_channel: bool, reduce_range: bool):
    """litert-torch's QAT config, with weights fake-quantized by ``FakeQuantize`` and 7-bit where asked.

    Its weights' ``FusedMovingAvgObsFakeQuantize`` gives a per-channel "symmetric" channel whose weights all have
    one sign a zero point of +-64 (the fused kernel leaves 0 out of the range): int8 kernels (TFLite: "unsupported
    zero-point value") take symmetric weights only. ``FakeQuantize`` uses the observer's symmetric parameters.
    """
    from litert_torch.quantize import pt2e_quantizer as pq
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    cfg = pq.get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=True)
    observer = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
    weight = replace(cfg.weight, observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=observer, eps=2**-12))
    if reduce_range:  # ORT's 7-bit symmetric weights: [-64, 64]
        weight = replace(weight, quant_min=-64, quant_max=64)
    return replace(cfg, weight=weight)


def prepare_qat(model: nn.Module, input_shape: Tuple[int, ...], *, per_channel: bool = True,
                reduce_range: bool = False, activation_type: str = "int8", int8_logits: bool = False) -> QatModel:
    """Export ``model`` (eval mode, dynamic batch), fold its BatchNorms, insert the fake quantizers."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.utils import _fuse_conv_bn_

    from ..zoo import model_stats
    from .tflite import litert_quantizer

    stats = model_stats(model, input_shape)
    model = copy.deepcopy(model).eval()
    sample = torch.randn(2, *input_shape[1:])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.export.export(model, (sample,),
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65_536)},)).module()
    except Exception as exc:
        raise EdgekitError(f"qat: torch.export cannot capture this model: {str(exc).strip().splitlines()[0][:300]}") \
            from exc
    # Folded BatchNorm (frozen statistics, as QAT usually ends anyway): the exports see the same conv weights.
    _fuse_conv_bn_(graph)
    quantizer = litert_quantizer(_config(per_channel, reduce_range))
    # litert-torch's QAT-only conv+BN annotators fail on torchao 0.18 (they export a function); no BN is left here.
    quantizer.STATIC_QAT_ONLY_OPS = []
    prepared = prepare_qat_pt2e(graph, quantizer)
    if not int8_logits:
        _float_output(prepared)
    scheme = {"weights": "int8 symmetric " + ("per-channel (axis 0)" if per_channel else "per-tensor")
                         + (", 7-bit [-64, 64]" if reduce_range else ""),
              "activations": f"{activation_type} per-tensor affine", "per_channel": per_channel,
              "reduce_range": reduce_range, "activation_type": activation_type,
              "logits": "int8" if int8_logits else "float (int8 weights and input)"}
    return QatModel(prepared, quantizer, scheme, stats).eval()


def _float_output(prepared) -> None:
    """Drop the fake quantizer on the logits (the graph's output)."""
    out = next(n for n in prepared.graph.nodes if n.op == "output")
    vals = list(out.args[0])
    fq = vals[0]
    if fq.op == "call_module" and "activation_post_process" in str(fq.target):
        vals[0] = fq.args[0]
        out.args = (tuple(vals),)
        prepared.graph.eliminate_dead_code()
        prepared.recompile()


# ----------------------------------------------------------------------------- ONNX


def export_qat_onnx(model: QatModel, path: str | Path, input_shape: Tuple[int, ...], activation_type: str,
                    opset: int = QAT_OPSET) -> Path:
    """The QDQ graph of ``model`` with its learned scales, as ORT's int8 kernels take it."""
    import onnx

    path = Path(path)
    conv = model.converted()
    sample = torch.zeros(*input_shape)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(conv, (sample,), str(path), input_names=["input"], output_names=["logits"],
                              opset_version=max(opset, QAT_OPSET), dynamo=True, verbose=False)
    except Exception as exc:
        raise RuntimeError(f"ONNX export of the QAT graph failed: {str(exc).strip().splitlines()[0][:300]}") from exc
    proto = onnx.load(str(path))
    _strip_metadata(proto)
    finish_qdq(proto, activation_type)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    for extra in path.parent.glob(path.name + ".data"):  # the exporter's external-data file, now inlined
        extra.unlink()
    return path


def _strip_metadata(proto) -> None:
    """Drop the dynamo exporter's per-node provenance strings (a fifth of a MobileNetV3's file)."""
    g = proto.graph
    for coll in (g.node, g.input, g.output, g.value_info, g.initializer):
        for x in coll:
            del x.metadata_props[:]
            x.doc_string = ""
    del g.metadata_props[:]
    del proto.metadata_props[:]


def finish_qdq(proto, activation_type: str = "int8") -> dict:
    """Rewrite the exporter's QDQ graph into the form ORT fuses into int8 kernels; returns counts.

    - ``QuantizeLinear(float weight) [-> Clip] -> DequantizeLinear``: the weight stored as int8, rounded as
      ``quantized_decomposed.quantize_per_channel`` rounds it (``round(w * (1 / s))``, half to even);
    - a float bias of a Conv / Gemm whose input and weight are dequantized: int32 at scale ``s_x * s_w``
      (ORT's QDQ selectors fuse only that; the TFLite converter rounds biases the same way);
    - ``uint8``: every activation zero point moved by 128 (``q_u8 = q_i8 + 128``, the same real values).
    """
    from onnx import helper, numpy_helper

    g = proto.graph

    def arrays():
        return {i.name: i for i in g.initializer}, {o: n for n in g.node for o in n.output}

    inits, producer = arrays()

    def arr(name):
        return numpy_helper.to_array(inits[name])

    drop, added, counts = set(), [], {"weights": 0, "biases": 0, "activations_uint8": 0}
    for dq in g.node:
        if dq.op_type != "DequantizeLinear":
            continue
        src, clip = producer.get(dq.input[0]), None
        if src is not None and src.op_type == "Clip":
            clip, src = src, producer.get(src.input[0])
        if src is None or src.op_type != "QuantizeLinear" or src.input[0] not in inits:
            continue
        w, s, zp = arr(src.input[0]), arr(src.input[1]).astype(np.float32), arr(src.input[2])
        shape = [1] * w.ndim
        if s.ndim == 1:
            shape[next((a.i for a in src.attribute if a.name == "axis"), 1)] = -1
        q = np.round(w * (np.float32(1) / s).reshape(shape)) + zp.reshape(shape).astype(np.float32)
        lo, hi = np.iinfo(zp.dtype).min, np.iinfo(zp.dtype).max
        if clip is not None:
            lo, hi = arr(clip.input[1]).item(), arr(clip.input[2]).item()
        name = src.input[0] + "_quantized"
        added.append(numpy_helper.from_array(np.clip(q, lo, hi).astype(zp.dtype), name))
        dq.input[0] = name
        drop.update(n.output[0] for n in (src, clip) if n is not None)
        counts["weights"] += 1
    for n in [n for n in g.node if n.output[0] in drop]:
        g.node.remove(n)
    g.initializer.extend(added)
    inits, producer = arrays()
    for n in list(g.node):
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        dx, dw = producer.get(n.input[0]), producer.get(n.input[1])
        if dx is None or dw is None or dx.op_type != "DequantizeLinear" or dw.op_type != "DequantizeLinear":
            continue
        scale = (arr(dx.input[1]).astype(np.float32) * arr(dw.input[1]).astype(np.float32)).reshape(-1)
        b = arr(n.input[2]).astype(np.float64)
        if scale.size == 1:
            scale = np.full(b.shape, scale[0], np.float32)
        bq = np.clip(np.round(b / scale.astype(np.float64)), -2**31, 2**31 - 1).astype(np.int32)
        base = n.input[2]
        g.initializer.extend([numpy_helper.from_array(bq, base + "_quantized"),
                              numpy_helper.from_array(scale, base + "_scale"),
                              numpy_helper.from_array(np.zeros(bq.shape, np.int32), base + "_zero_point")])
        g.node.insert(list(g.node).index(n), helper.make_node(
            "DequantizeLinear", [base + "_quantized", base + "_scale", base + "_zero_point"], [base + "_dq"], axis=0,
            name=base + "_dq"))
        n.input[2] = base + "_dq"
        counts["biases"] += 1
    if activation_type == "uint8":
        inits, _ = arrays()
        made = set()
        for n in g.node:
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or n.input[0] in inits:
                continue
            zp = arr(n.input[2])
            if zp.dtype != np.int8:
                continue
            name = n.input[2] + "_u8"
            if name not in made:
                made.add(name)
                g.initializer.append(numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8), name))
            n.input[2] = name
            counts["activations_uint8"] += 1
        del g.value_info[:]  # the exporter's int8 types for the quantized tensors
    elif activation_type != "int8":
        raise EdgekitError(f"qat: activation_type must be uint8 or int8, not {activation_type!r}")
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return counts


# ----------------------------------------------------------------------------- TFLite


def convert_qat_tflite(model: QatModel, path: Path, input_shape: Tuple[int, ...], nhwc: bool = False) -> int:
    """The converted QAT graph through litert-torch, as ``tflite.convert_int8`` does after calibration."""
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    from .tflite import route_through_qdq, unshare_dequantize

    quantized = model.converted()
    rewired = route_through_qdq(quantized)
    unshare_dequantize(quantized)
    sample = torch.randn(*input_shape)
    module = quantized
    if nhwc:
        module = litert_torch.to_channel_last_io(quantized, args=[0])
        module.training = False  # .eval() would reach the exported graph, which refuses it (already in eval)
        sample = sample.permute(0, 2, 3, 1).contiguous()
    try:
        edge = litert_torch.convert(module, (sample,), quant_config=QuantConfig(pt2e_quantizer=model.quantizer))
    except Exception as exc:
        raise RuntimeError(f"litert-torch cannot convert this QAT model: {str(exc).strip().splitlines()[0][:300]}") \
            from exc
    edge.export(str(path))
    return rewired


# ----------------------------------------------------------------------------- the format rows


def _fixed_by_training(model: QatModel, fmt: str, **asked) -> None:
    """Options that would change what the training simulated are the user's mistake, said in one line."""
    wrong = [f"{k}: {v}" for k, v in asked.items() if v is not None and v != model.scheme[k]]
    if wrong:
        raise EdgekitError(f"{fmt} int8 of a QAT model: {', '.join(wrong)} differs from what the qat step trained "
                           f"({model.scheme['weights']}; {model.scheme['activations']}); the device profile sets it")


def export_qat_onnx_variant(model: QatModel, precision: str, options, ctx) -> Path:
    """The ``onnx`` row for a QAT model: int8 is its QDQ graph with the learned scales; no fp32 of it is made."""
    from ..formats import FormatUnavailable

    if precision != "int8":
        raise FormatUnavailable(f"a QAT model exports int8 only (onnx {precision}: export the model before qat)")
    _fixed_by_training(model, "onnx", per_channel=options.per_channel, reduce_range=options.reduce_range)
    if options.weight_type not in (None, "int8"):
        raise EdgekitError("onnx int8 of a QAT model: its weights are int8 (weight_type: uint8 was asked)")
    if options.quant_format != "qdq" or options.op_types:
        raise EdgekitError("onnx int8 of a QAT model is the QDQ graph of the ops it trained quantized; "
                           "quant_format: qoperator and op_types do not apply")
    act = options.activation_type or model.scheme["activation_type"]
    out = export_qat_onnx(model, ctx.path(".onnx"), ctx.input_shape, act, opset=options.opset)
    ctx.info["quantization"] = {"tool": "QAT, learned scales (torchao prepare_qat_pt2e / convert_pt2e, "
                                        "torch.onnx dynamo exporter)",
                                "config": f"QDQ {'U8' if act == 'uint8' else 'S8'}S8 {model.scheme['weights']}",
                                "calibration": "none (learned during QAT)", "activation_type": act,
                                "opset": max(options.opset, QAT_OPSET), **model.scheme}
    return out
