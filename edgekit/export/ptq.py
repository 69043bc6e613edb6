"""Post-training quantization aids on ONNX graphs (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction"; Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training
Quantization"; AIMET's ``CrossLayerScaling``, ``BiasCorrection`` and ``Adaround``). AdaRound itself is
:mod:`edgekit.export.adaround`; it reuses this module's graph helpers.

They work on the ONNX graph rather than the torch model, so they also serve a user's ONNX file, where no torch
model exists; BatchNorm is already folded into the exported convolutions.

- :func:`equalize` (cross-layer equalization, CLE): for Conv -> (Relu | ReLU6 | nothing) -> Conv pairs, output
  channel i of the first conv is divided by s_i and input channel i of the second multiplied by s_i, with
  s_i = sqrt(r1_i / r2_i) (= r1_i / sqrt(r1_i r2_i) in AIMET's ``ScaleFactorCalculator``), r the channel's largest
  |weight|: both ranges become sqrt(r1_i r2_i). ReLU(x / s) = ReLU(x) / s for s > 0, so the fp32 function is kept.
  Depthwise convs sit in chains (conv -> dw -> conv); sweeping the pairs until the scales settle reaches AIMET's
  closed form for the triplet (every range the cube root of r1 r2 r3). ReLU6 is not positively homogeneous, so
  pairs across it are left alone by default; ``relu6=True`` does what AIMET does, turning the ReLU6
  (``Clip(0, 6)``) between equalized convs into ReLU, which changes the fp32 function wherever a pre-activation
  exceeds 6: on pretrained EfficientNet-Lite0 the fp32 logits fall to 3.9 dB SQNR against the original
  (bench/int8_ptq.py), so it is not what ``equalize`` does. SiLU / HardSwish pairs are never equalized.
- :func:`correct_bias` (empirical bias correction): after quantization, each quantized conv's bias loses the
  expected output error of its int8 weights, E[(W_q - W) x] per output channel, with x the fp32 model's input to
  that conv on the calibration data. The conv is linear, so that is the conv of the batch-mean input with
  W_q - W, averaged over positions (padding included): only one running mean per conv input is kept, memory
  flat in the number of images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..errors import EdgekitError

QUANT_SUFFIX = "_quantized"  # onnxruntime.quantization's name for a quantized initializer (TENSOR_NAME_QUANT_SUFFIX)


def _attr(node, name, default=None):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


class _Graph:
    """Initializers, constants and consumers of an ONNX graph, for pattern matching."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in self.g.node
                       if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
        self.consumers: Dict[str, list] = {}
        for n in self.g.node:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)
        self.outputs = {o.name for o in self.g.output}

    def array(self, name: str) -> Optional[np.ndarray]:
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        return self.consts.get(name)

    def set(self, name: str, value: np.ndarray) -> None:
        from onnx import numpy_helper

        self.inits[name].CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(self.inits[name]).dtype),
                                                          name))

    def only_consumer(self, tensor: str):
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None


def _clip_bounds(graph: _Graph, node) -> Optional[tuple]:
    if len(node.input) > 1:  # opset >= 11: min and max are inputs
        lo = graph.array(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        hi = graph.array(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        return None if lo is None or hi is None else (float(lo), float(hi))
    lo, hi = _attr(node, "min"), _attr(node, "max")
    return None if lo is None or hi is None else (float(lo), float(hi))


def _conv_weight(graph: _Graph, node) -> Optional[np.ndarray]:
    """The conv's 4-D weight when it is an initializer this conv alone uses (shared weights are left alone)."""
    if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in graph.inits:
        return None
    if len(graph.consumers.get(node.input[1], [])) != 1:
        return None
    if len(node.input) > 2 and node.input[2] and (node.input[2] not in graph.inits
                                                   or len(graph.consumers[node.input[2]]) != 1):
        return None
    w = graph.array(node.input[1])
    return w if w.ndim == 4 else None


def find_pairs(model, relu6: bool = False) -> List[tuple]:
    """(conv1, activation node or None, conv2) that CLE may scale: conv1's output reaches only conv2, through at
    most a ReLU (or a ReLU6 with ``relu6``); conv2 is dense (group 1) or depthwise."""
    graph = _Graph(model)
    pairs = []
    for c1 in graph.g.node:
        w1 = _conv_weight(graph, c1)
        if w1 is None:
            continue
        nxt, act = graph.only_consumer(c1.output[0]), None
        if nxt is not None and nxt.op_type in ("Relu", "Clip"):
            if nxt.op_type == "Clip" and not (relu6 and _clip_bounds(graph, nxt) == (0.0, 6.0)):
                continue
            act, nxt = nxt, graph.only_consumer(nxt.output[0])
        if nxt is None or nxt.input[0] != (c1 if act is None else act).output[0]:
            continue
        w2 = _conv_weight(graph, nxt)
        if w2 is None:
            continue
        group = _attr(nxt, "group", 1)
        if not (group == 1 and w2.shape[1] == w1.shape[0]) and not (w2.shape[1] == 1 and group == w1.shape[0]):
            continue
        pairs.append((c1, act, nxt))
    return pairs


def _in_ranges(w2: np.ndarray, channels: int) -> np.ndarray:
    """Largest |weight| per input channel of conv2 (depthwise: its rows, channel multiplier included)."""
    if w2.shape[1] == channels:
        return np.abs(w2).max(axis=(0, 2, 3))
    return np.abs(w2).reshape(channels, -1).max(axis=1)


def equalize_model(model, relu6: bool = False, sweeps: int = 50, tol: float = 1e-4) -> dict:
    """Cross-layer equalization of ``model`` (an onnx ModelProto, changed in place). Returns what it did."""
    graph = _Graph(model)
    pairs = find_pairs(model, relu6=relu6)
    if not pairs:
        return {"pairs": 0, "relu6_to_relu": 0, "sweeps": 0}
    weights = {n.input[1]: graph.array(n.input[1]).astype(np.float64) for p in pairs for n in (p[0], p[2])}
    biases = {n.input[2]: graph.array(n.input[2]).astype(np.float64) for p in pairs for n in (p[0], p[2])
              if len(n.input) > 2 and n.input[2]}
    before = {k: weight_range_spread(w) for k, w in weights.items()}
    done = 0
    for done in range(1, sweeps + 1):
        change = 0.0
        for c1, _, c2 in pairs:
            w1, w2 = weights[c1.input[1]], weights[c2.input[1]]
            c = w1.shape[0]
            r1, r2 = np.abs(w1).max(axis=(1, 2, 3)), _in_ranges(w2, c)
            ok = (r1 > 0) & (r2 > 0)
            s = np.where(ok, np.sqrt(np.where(ok, r1, 1) / np.where(ok, r2, 1)), 1.0)
            w1 /= s[:, None, None, None]
            if len(c1.input) > 2 and c1.input[2]:
                biases[c1.input[2]] /= s
            if w2.shape[1] == c:
                w2 *= s[None, :, None, None]
            else:
                w2 *= np.repeat(s, w2.shape[0] // c)[:, None, None, None]
            change = max(change, float(np.abs(np.log(s)).max()))
        if change < tol:
            break
    for name, w in {**weights, **biases}.items():
        graph.set(name, w)
    converted = 0
    for _, act, _ in pairs:
        if act is not None and act.op_type == "Clip":  # ReLU6 -> ReLU (AIMET's choice; see the module docstring)
            act.op_type = "Relu"
            del act.input[1:]
            del act.attribute[:]
            converted += 1
    used = {t for n in graph.g.node for t in n.input}
    kept = [i for i in graph.g.initializer if i.name in used]
    if len(kept) != len(graph.g.initializer):
        del graph.g.initializer[:]
        graph.g.initializer.extend(kept)
    after = {k: weight_range_spread(w) for k, w in weights.items()}
    return {"pairs": len(pairs), "relu6_to_relu": converted, "sweeps": done,
            "spread_before": round(float(np.median(list(before.values()))), 2),
            "spread_after": round(float(np.median(list(after.values()))), 2)}


def weight_range_spread(w: np.ndarray) -> float:
    """Largest over median per-output-channel |weight| range of a conv weight (1: equal ranges; the median, not
    the smallest, so that dead channels do not dominate). A large spread across a layer is what hurts per-tensor
    weights and the per-tensor activations of the channels it produces."""
    r = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    r = r[r > 0]
    return float(r.max() / np.median(r)) if len(r) else 1.0


def equalize(src: str | Path, dst: str | Path, relu6: bool = False) -> dict:
    """:func:`equalize_model` from file ``src`` to file ``dst``."""
    import onnx

    model = onnx.load(str(src))
    info = equalize_model(model, relu6=relu6)
    onnx.save(model, str(dst))
    return info


# ----------------------------------------------------------------------------- bias correction


def _conv_of_mean(x_mean: np.ndarray, dw: np.ndarray, node) -> Optional[np.ndarray]:
    """Mean over output positions of conv(x_mean, dw) per output channel; None for convs this does not model."""
    import torch
    import torch.nn.functional as F

    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID") or x_mean.ndim != 3:
        return None
    pads = list(_attr(node, "pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else [0, 0, 0, 0]
    x = torch.from_numpy(x_mean[None].astype(np.float64))
    x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    out = F.conv2d(x, torch.from_numpy(dw.astype(np.float64)), stride=tuple(_attr(node, "strides", [1, 1])),
                   dilation=tuple(_attr(node, "dilations", [1, 1])), groups=_attr(node, "group", 1))
    return out[0].mean(dim=(1, 2)).numpy()


def _dequantized(graph: _Graph, dq_node) -> Optional[np.ndarray]:
    q = graph.array(dq_node.input[0])
    scale = graph.array(dq_node.input[1])
    zp = graph.array(dq_node.input[2]) if len(dq_node.input) > 2 and dq_node.input[2] else None
    if q is None or scale is None:
        return None
    axis = _attr(dq_node, "axis", 1)
    shape = [1] * q.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[axis] = -1
    scale = scale.astype(np.float64).reshape(shape)
    zp = np.zeros(1) if zp is None else zp.astype(np.float64).reshape(shape)
    return (q.astype(np.float64) - zp) * scale


def tensor_session(model, tensors: List[str], threads: Optional[int] = None):
    """An ONNX Runtime session of ``model`` (not optimised, so every tensor exists) that also outputs ``tensors``;
    ``model`` is left as it was."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = type(model).FromString(model.SerializeToString())
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def input_means(fp32_path: str | Path, tensors: List[str], calib: np.ndarray) -> Dict[str, np.ndarray]:
    """Mean over the calibration inputs of each named tensor of the fp32 model (per sample: batch axis dropped),
    one input at a time."""
    import onnx

    sess = tensor_session(onnx.load(str(fp32_path)), tensors, threads=1)
    name = sess.get_inputs()[0].name
    sums: Dict[str, np.ndarray] = {}
    for i in range(len(calib)):
        outs = sess.run(tensors, {name: np.ascontiguousarray(calib[i:i + 1], dtype=np.float32)})
        for t, v in zip(tensors, outs):
            s = v.astype(np.float64).sum(axis=0)
            sums[t] = s if t not in sums else sums[t] + s
    return {t: s / len(calib) for t, s in sums.items()}


def correct_bias_model(fp32_path: str | Path, qmodel, calib: np.ndarray) -> dict:
    """Empirical bias correction of the QDQ model ``qmodel`` (changed in place), quantized from ``fp32_path``.

    A conv's int8 bias (``DequantizeLinear`` of int32 values at scale s_x * s_w) loses round(error / scale); a
    float bias loses the error itself. Convs whose weight or bias is not found are left as they are.
    """
    import onnx

    if len(calib) == 0:
        raise EdgekitError("Bias correction needs at least one calibration input")
    fp = _Graph(onnx.load(str(fp32_path)))
    q = _Graph(qmodel)
    producer = {o: n for n in q.g.node for o in n.output}
    fp_input = {n.input[1]: n.input[0] for n in fp.g.node if n.op_type == "Conv" and len(n.input) > 1}
    jobs = []  # (q conv, fp32 weight name, W_q, bias dq node or None)
    for n in q.g.node:
        if n.op_type != "Conv" or len(n.input) < 3 or not n.input[2]:
            continue
        wdq = producer.get(n.input[1])
        if wdq is None or wdq.op_type != "DequantizeLinear" or not wdq.input[0].endswith(QUANT_SUFFIX):
            continue
        wname = wdq.input[0][:-len(QUANT_SUFFIX)]
        if wname not in fp_input or fp.array(wname) is None:
            continue
        wq = _dequantized(q, wdq)
        bdq = producer.get(n.input[2])
        if wq is None or wq.ndim != 4 or (bdq is not None and bdq.op_type != "DequantizeLinear"):
            continue
        if bdq is None and n.input[2] not in q.inits:
            continue
        jobs.append((n, wname, wq, bdq))
    means = input_means(fp32_path, sorted({fp_input[j[1]] for j in jobs}), calib)
    corrected, shift = 0, []
    for node, wname, wq, bdq in jobs:
        w = fp.array(wname).astype(np.float64)
        if w.shape != wq.shape:
            continue
        err = _conv_of_mean(means[fp_input[wname]], wq - w, node)
        if err is None:
            continue
        if bdq is None:
            b = q.array(node.input[2]).astype(np.float64)
            q.set(node.input[2], b - err)
        else:
            qb, scale = q.array(bdq.input[0]), q.array(bdq.input[1])
            if qb is None or scale is None or qb.dtype != np.int32:
                continue
            scale = np.broadcast_to(scale.astype(np.float64), qb.shape)
            step = np.where(scale > 0, np.round(err / np.where(scale > 0, scale, 1)), 0)
            q.set(bdq.input[0], np.clip(qb.astype(np.int64) - step, -2**31, 2**31 - 1).astype(np.int32))
        corrected += 1
        shift.append(float(np.abs(err).mean()))
    return {"convs_corrected": corrected, "mean_abs_correction": round(float(np.mean(shift)), 6) if shift else 0.0}


def correct_bias(fp32_path: str | Path, q_path: str | Path, calib: np.ndarray,
                 out_path: Optional[str | Path] = None) -> dict:
    """:func:`correct_bias_model` on the file ``q_path``, written to ``out_path`` (default: ``q_path`` itself)."""
    import onnx

    model = onnx.load(str(q_path))
    info = correct_bias_model(fp32_path, model, calib)
    onnx.save(model, str(out_path or q_path))
    return info


WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def float_tail(graph) -> List[str]:
    """Names of the nodes from which no weighted layer (conv, gemm, matmul) is reachable: the post-processing after
    the network's last layers (a detector's decoding), which int8 would only make coarser, not faster."""
    consumers: dict = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.name)
    reaches: dict = {}  # node -> a weighted layer is it or lies downstream; ONNX lists nodes in topological order
    for n in reversed(graph.node):
        reaches[n.name] = n.op_type in WEIGHTED or any(reaches.get(c, False) for o in n.output
                                                       for c in consumers.get(o, []))
    return [n.name for n in graph.node if n.name and not reaches[n.name]]
