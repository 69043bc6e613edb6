"""TensorRT int8: the explicit-quantization (QDQ) ONNX a TensorRT engine is built from, and its checker.

int8 follows NVIDIA's rules for explicit quantization (TensorRT developer guide,
"Working with quantized types"; TensorRT Model Optimizer's ONNX int8 policy):

- symmetric int8 everywhere: every zero point is 0, Q/DQ types are int8;
- weights per channel on the output-channel axis (axis 0 of Conv and transposed
  Gemm weights), activations per tensor;
- Q/DQ on the *inputs* of quantizable ops (Conv, ConvTranspose, Gemm, MatMul, Add,
  pooling), never on their outputs: TensorRT fuses Conv+BN+ReLU and decides the output
  precision from the next op's input Q; pooling may stay in float when that is closer
  to fp32 on the calibration split (:data:`TRT_SCOPES`);
- batch-1 GEMVs (the classifier Gemm) stay in float, as Model Optimizer leaves them;
- a residual Add keeps Q/DQ on its residual (skip) input only, so that TensorRT can
  fuse the Conv that feeds the other input with the addition;
- ReLU / Clip are kept (with symmetric activations they are not redundant);
- biases stay float (TensorRT quantizes them itself); opset >= 13 (per-channel DQ).

The QDQ model is produced by ONNX Runtime's ``quantize_static`` with these options
(and ``onnx_int8``'s calibration reader and memos) and checked by :func:`check_trt_qdq`.
``tensorrt.py`` builds the engine from it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import EdgekitError
from .onnx_int8 import _Reader, memoised_weight_params
from .ort_calibration import streamed_calibration

# Op types whose inputs get Q/DQ (NVIDIA's list of quantizable TensorRT layers, minus ops absent in CNN classifiers).
TRT_QUANT_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "MaxPool", "AveragePool", "GlobalAveragePool"]
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MIN_OPSET = 13


def trt_extra_options() -> dict:
    """``extra_options`` of ``onnxruntime.quantization.quantize_static`` for a TensorRT QDQ model."""
    return {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QDQKeepRemovableActivations": True,
        "OpTypesToExcludeOutputQuantization": list(TRT_QUANT_OPS),
        "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1},
        "AddQDQPairToWeight": True,  # float weights + Q/DQ pair, as TensorRT Model Optimizer writes them
        "DedicatedQDQPair": False,
        "ForceQuantizeNoInputCheck": True,
        "QuantizeBias": False,
    }


# ----------------------------------------------------------------------------- graph helpers


def _producers(graph) -> Dict[str, object]:
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph) -> Dict[str, list]:
    out: Dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _ancestor_depths(node, producers) -> Dict[str, int]:
    """Node name -> fewest hops from ``node`` up to it (``node`` itself at 0)."""
    depth = {node.name: 0}
    queue = deque([node])
    while queue:
        cur = queue.popleft()
        for t in cur.input:
            p = producers.get(t)
            if p is not None and p.name not in depth:
                depth[p.name] = depth[cur.name] + 1
                queue.append(p)
    return depth


_PASS_THROUGH = {"BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish"}


def _backbone(node, producers):
    """The weighted op (Conv/Gemm/...) that ``node`` is, or follows through BN / activations; else None."""
    while node is not None:
        if node.op_type in WEIGHTED_OPS:
            return node
        if node.op_type not in _PASS_THROUGH:
            return None
        node = producers.get(node.input[0])
    return None


def non_residual_add_inputs(graph) -> List[Tuple[str, int]]:
    """(Add node name, input index) of each residual Add's branch input, the one TensorRT fuses with its Conv.

    As TensorRT Model Optimizer does: of the two inputs, the one with a weighted op
    behind it and the longer path to the inputs' lowest common ancestor is the
    branch; the other is the residual (skip) input.
    """
    inits = {i.name for i in graph.initializer}
    producers = _producers(graph)
    found = []
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2 or any(i in inits for i in node.input):
            continue
        p = [producers.get(i) for i in node.input]
        if any(x is None for x in p):
            continue
        b = [_backbone(x, producers) for x in p]
        if not any(b) or (all(b) and b[0].name == b[1].name):
            continue
        d = [_ancestor_depths(x, producers) for x in p]
        common = set(d[0]) & set(d[1])
        if not common:
            continue
        lca = min(common, key=lambda k: d[0][k] + d[1][k])
        if all(b):
            idx = 0 if d[0][lca] > d[1][lca] else 1
        else:
            idx = 0 if b[0] else 1
            if lca == b[idx].name:  # the Conv feeds both inputs (ConvNeXt-like): not a residual Add
                continue
        found.append((node.name, idx))
    return found


def drop_input_qdq(model, targets: List[Tuple[str, int]]) -> int:
    """Feed the given node inputs straight from the tensor their Q/DQ pair quantized; drop orphaned Q/DQ nodes."""
    g = model.graph
    producers = _producers(g)
    by_name = {n.name: n for n in g.node}
    changed = 0
    for name, idx in targets:
        node = by_name.get(name)
        if node is None or idx >= len(node.input):
            continue
        dq = producers.get(node.input[idx])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        node.input[idx] = q.input[0]
        changed += 1
    outputs = {o.name for o in g.output}
    while True:  # remove Q/DQ nodes nobody reads any more
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return changed


def gemv_nodes(model) -> List[str]:
    """Gemm / MatMul nodes that are matrix-vector products (M == 1, e.g. a classifier head at batch 1).

    TensorRT Model Optimizer leaves these unquantized: a GEMV cannot use int8 tensor
    cores, so Q/DQ would only add error (and here it keeps the logits layer in float,
    as edgekit's ONNX int8 does).
    """
    import onnx

    try:
        g = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # noqa: BLE001 - best effort: without shapes nothing is excluded
        return []
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(g.value_info) + list(g.input)}
    out = []
    for n in g.node:
        if n.op_type not in ("Gemm", "MatMul"):
            continue
        shape = shapes.get(n.input[0])
        if not shape or len(shape) < 2:
            continue
        trans_a = n.op_type == "Gemm" and any(a.name == "transA" and a.i for a in n.attribute)
        rows = [shape[-1]] if trans_a else shape[:-1]
        if all(d == 1 for d in rows):
            out.append(n.name)
    return out


# ----------------------------------------------------------------------------- QDQ for TensorRT


CALIBRATIONS = ("minmax", "entropy", "percentile")
AUTO_CANDIDATES = ("minmax", "percentile")
POOLING_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool")
# Op scopes "auto" tries: every quantizable TensorRT layer, or the same with pooling left in float. A per-tensor
# symmetric Q/DQ on the input of a (global) average pool after SiLU / hard-swish wastes half the int8 range on
# values that are nearly all positive; keeping pools in float costs TensorRT a reformat, not an int8 conv.
# Measured on the 64 px baselines (eval top-1, min-max): MobileNetV3-Small 94.8 -> 95.4, SqueezeNext
# (percentile) 89.7 -> 91.0, against 95.5 and 91.0 for edgekit's ONNX int8.
TRT_SCOPES = {"all": tuple(TRT_QUANT_OPS), "no-pool": tuple(o for o in TRT_QUANT_OPS if o not in POOLING_OPS)}


def quantize_for_tensorrt(fp32_path: str | Path, out_path: str | Path, calib: np.ndarray,
                          calibration: str = "auto") -> Tuple[Path, dict]:
    """fp32 ONNX -> TensorRT-style QDQ ONNX (see the module docstring), checked by :func:`check_trt_qdq`.

    ``calibration="auto"`` (default) quantizes with min-max and with percentile (99.999th
    percentile of |x|), each with every op scope of :data:`TRT_SCOPES`, and keeps the one
    whose logits are closest to fp32 (SQNR on the calibration split, never the eval split),
    as ``edgekit.export.onnx_int8`` does for ONNX int8: which wins varies from network to
    network and even between trainings of one network, and with symmetric activations a
    wrong pick costs up to a point of accuracy on MobileNetV2. A named calibration uses the
    full scope. Returns the path and ``{"calibration", "op_types", "calibration_sqnr_db"}``.
    """
    if calibration != "auto" and calibration not in CALIBRATIONS:
        raise EdgekitError(f"tensorrt int8: calibration must be one of auto, {', '.join(CALIBRATIONS)}, "
                           f"not {calibration!r}")
    if len(calib) == 0:
        raise EdgekitError("Calibration needs at least one input; the calibration split is empty")
    out_path = Path(out_path)
    if calibration != "auto":
        return (_quantize_trt(fp32_path, out_path, calib, calibration),
                {"calibration": calibration, "op_types": list(TRT_QUANT_OPS)})
    from ..evaluate import sqnr_db
    from ..runtime import load_runner

    def logits(path: Path, simulate_qdq: bool = True) -> np.ndarray:
        # candidates are scored as TensorRT computes them (Q/DQ in float), not with this CPU's int8 kernels, which
        # saturate on x86 without VNNI
        run = load_runner("onnxruntime", path, threads=1, simulate_qdq=simulate_qdq).run
        return np.concatenate([run(calib[i:i + 1]) for i in range(len(calib))])

    ref = logits(Path(fp32_path), simulate_qdq=False)
    scores: Dict[str, float] = {}
    failed: Dict[str, str] = {}
    best: Optional[Tuple[str, str, str, Path]] = None
    with tempfile.TemporaryDirectory(prefix="edgekit-trta-") as tmp:
        for method in AUTO_CANDIDATES:
            for scope, ops in TRT_SCOPES.items():
                key = method if scope == "all" else f"{method} {scope}"
                try:
                    p = _quantize_trt(fp32_path, Path(tmp) / f"{method}-{scope}.onnx", calib, method, ops)
                except (ValueError, AssertionError) as exc:  # a calibrator failing on this model (see onnx_int8.py)
                    failed[key] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                    continue
                scores[key] = round(sqnr_db(ref, logits(p)), 2)
                if best is None or scores[key] > scores[best[0]]:
                    best = (key, method, scope, p)
        if best is None:
            raise EdgekitError("ONNX Runtime could not quantize this model for TensorRT with any calibration: "
                               + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        shutil.move(str(best[3]), out_path)
    return out_path, {"calibration": best[1], "op_types": list(TRT_SCOPES[best[2]]), "calibration_sqnr_db": scores,
                      **({"failed": failed} if failed else {})}


def _quantize_trt(fp32_path: str | Path, out_path: Path, calib: np.ndarray, calibration: str,
                  op_types: Tuple[str, ...] = tuple(TRT_QUANT_OPS)) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    src = onnx.load(str(fp32_path))
    opset = max((o.version for o in src.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise EdgekitError(f"{fp32_path} has opset {opset}; per-channel Q/DQ for TensorRT needs opset >= {MIN_OPSET}")
    targets = non_residual_add_inputs(src.graph)
    exclude = gemv_nodes(src)
    with tempfile.TemporaryDirectory(prefix="edgekit-trtq-") as tmp:
        tmp_out = Path(tmp) / "q.onnx"
        logging.disable(logging.WARNING)  # ORT's quantizer warns per tensor on the root logger
        try:
            # calibrators print; ORT's histograms are built in bounded memory (ort_calibration.py)
            with contextlib.redirect_stdout(io.StringIO()), memoised_weight_params(), streamed_calibration():
                quantize_static(str(fp32_path), str(tmp_out), _Reader(src.graph.input[0].name, calib),
                                quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                                weight_type=QuantType.QInt8, per_channel=True, reduce_range=False,
                                calibrate_method=methods[calibration], op_types_to_quantize=list(op_types),
                                nodes_to_exclude=exclude, extra_options=trt_extra_options())
        finally:
            logging.disable(logging.NOTSET)
        q = onnx.load(str(tmp_out))
    drop_input_qdq(q, targets)
    onnx.checker.check_model(q)
    onnx.save(q, str(out_path))
    problems = check_trt_qdq(out_path)
    if problems:
        raise RuntimeError(f"the QDQ model breaks TensorRT's rules: {problems[0]} ({len(problems)} in all)")
    return out_path


def _expected_weight_axis(node) -> int:
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return 1
    return 0  # Conv: [Cout, Cin/groups, kH, kW]


def check_trt_qdq(path: str | Path) -> List[str]:
    """Violations of TensorRT's explicit-quantization rules in a QDQ ONNX model (empty: conforms).

    Checked: opset >= 13; every Q/DQ zero point is int8 and 0; activations are quantized
    per tensor (scalar scale) with a QuantizeLinear before each activation
    DequantizeLinear; every Conv / ConvTranspose weight, and the weight of every Gemm /
    MatMul whose input is quantized, is fed by a DequantizeLinear, per channel on the
    output-channel axis, and the input of a layer with quantized weights is quantized too.
    A Gemm / MatMul left wholly in float is allowed: TensorRT runs it in fp16/fp32, and
    NVIDIA's Model Optimizer leaves batch-1 GEMVs unquantized on purpose (no tensor cores).
    """
    import onnx
    from onnx import numpy_helper

    p = Path(path)
    try:
        model = onnx.load(str(p))
    except Exception as exc:
        raise EdgekitError(f"{p} is not an ONNX model: {str(exc).splitlines()[0][:200]}") from None
    g = model.graph
    problems: List[str] = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        problems.append(f"opset {opset} < {MIN_OPSET}: per-channel QuantizeLinear/DequantizeLinear need opset 13")
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    producers = _producers(g)

    def const(name: str) -> Optional[np.ndarray]:
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return None

    def is_weight_path(name: str) -> bool:
        """True when the tensor is a constant or computed from constants only (a Q of a float weight)."""
        if name in inits or name in consts:
            return True
        n = producers.get(name)
        return n is not None and n.op_type in ("QuantizeLinear", "DequantizeLinear") and is_weight_path(n.input[0])

    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if not qdq:
        problems.append("no QuantizeLinear/DequantizeLinear nodes: not an explicitly quantized model")
    for n in qdq:
        label = f"{n.op_type} {n.name or n.output[0]}"
        zp = const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is None:
            if n.op_type == "QuantizeLinear":
                problems.append(f"{label}: no zero point (defaults to uint8); TensorRT needs int8 zero points")
        else:
            if zp.dtype != np.int8:
                problems.append(f"{label}: zero point type {zp.dtype}, TensorRT needs int8")
            if np.any(zp != 0):
                problems.append(f"{label}: zero point {zp.ravel()[:4].tolist()} is not 0 (TensorRT is symmetric)")
        scale = const(n.input[1])
        weight = is_weight_path(n.input[0])
        if not weight and scale is not None and scale.size != 1:
            problems.append(f"{label}: activation quantized per channel ({scale.size} scales); "
                            "TensorRT takes per-tensor activation scales")
        if n.op_type == "DequantizeLinear" and not weight:
            src = producers.get(n.input[0])
            if src is None or src.op_type != "QuantizeLinear":
                problems.append(f"{label}: activation DequantizeLinear not fed by a QuantizeLinear")
    for n in g.node:
        if n.op_type not in WEIGHTED_OPS or len(n.input) < 2:
            continue
        w = n.input[1]
        label = f"{n.op_type} {n.name or n.output[0]}"
        if n.op_type == "MatMul" and not is_weight_path(w):
            continue  # activation x activation MatMul has no weight
        dq = producers.get(w)
        x_src = producers.get(n.input[0])
        x_quantized = x_src is not None and x_src.op_type == "DequantizeLinear"
        if dq is None or dq.op_type != "DequantizeLinear":
            if n.op_type in ("Gemm", "MatMul") and not x_quantized:
                continue  # a GEMV left in float (TensorRT runs it in fp16/fp32; see gemv_nodes)
            problems.append(f"{label}: weight {w!r} is not fed by DequantizeLinear")
            continue
        if not x_quantized:
            problems.append(f"{label}: weight quantized but input {n.input[0]!r} is not: TensorRT fuses a "
                            "quantized layer only with Q/DQ on both")
        scale = const(dq.input[1])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        want = _expected_weight_axis(n)
        if scale is None or scale.size <= 1:
            problems.append(f"{label}: weight quantized per tensor; TensorRT wants per-channel weights "
                            f"(axis {want})")
        elif axis != want:
            problems.append(f"{label}: weight per-channel axis {axis}, the output-channel axis is {want}")
    return problems
