"""The estimator's vocabulary: operator categories, ``OpCost`` (one operator that runs), small ONNX helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from ..errors import EdgekitError

SOURCE = "estimated"

CATEGORIES = ("conv", "pwconv", "dwconv", "gconv", "gemm", "elementwise", "activation", "pool", "data", "reshape", "quant",
              "layout", "conv_nchw", "pwconv_nchw", "dwconv_nchw", "gconv_nchw", "conv_tail", "pwconv_tail",
              "dwconv_tail")
CONV_OPS = {"Conv", "ConvTranspose"}
GEMM_OPS = {"Gemm", "MatMul"}
ELEMENTWISE_OPS = {"Add", "Sub", "Mul", "Div", "Relu", "Clip", "LeakyRelu", "PRelu", "Max", "Min", "Abs", "Neg",
                   "Sqrt", "Pow", "BatchNormalization", "Where", "Equal", "Less", "Greater", "Not", "And", "Or",
                   "Cast", "Floor", "Ceil", "Round", "Sign", "Sum", "Mean", "InstanceNormalization"}
ACTIVATION_OPS = {"Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Gelu", "Erf", "Exp", "Log", "Softmax",
                  "LogSoftmax", "Elu", "Selu", "Softplus", "Mish", "Swish", "QuickGelu", "Reciprocal"}
POOL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "ReduceSum",
            "ReduceMin", "LpPool", "ReduceL2"}
DATA_OPS = {"Concat", "Split", "Slice", "Transpose", "Pad", "Gather", "GatherElements", "Resize", "Upsample", "Tile",
            "Expand", "DepthToSpace", "SpaceToDepth", "ScatterND", "TopK", "ArgMax"}
RESHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"}
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
SHAPE_OPS = {"Shape", "Size"}  # constant when the input shape is static

# ORT's QDQ rules (onnxruntime/core/optimizer/qdq_transformer/selectors_actions): DQ -> op -> Q becomes ...
QLINEAR_OPS = {"Conv", "MatMul", "Gemm", "Add", "Mul", "AveragePool", "GlobalAveragePool", "LeakyRelu", "Sigmoid",
               "Softmax", "Concat", "Where"}  # ... an int8 kernel
QDQ_DROP_OPS = {"Expand", "Flatten", "Gather", "GatherElements", "Reshape", "Slice", "Squeeze", "Tile", "Transpose",
                "Unsqueeze", "MaxPool", "ReduceMax", "ReduceMin", "Resize", "Split"}  # ... the op on int8 data
CONV_ACTIVATIONS = {"Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh"}

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclass
class OpCost:
    """One operator that runs, with what it absorbed and what the model charges for it."""

    name: str
    op_type: str
    category: str
    precision: str
    macs: int = 0
    work: float = 0.0  # MACs (conv, gemm) or elements
    depth: float = 0.0  # reduction length of one output (Cin/group * kh * kw, or K of a gemm)
    width: float = 0.0  # independent outputs per position a kernel vectorizes over (Cout, or channels)
    bytes: float = 0.0  # activations + weights
    weight_bytes: float = 0.0
    fused: List[str] = field(default_factory=list)  # op types folded into this one
    output: str = ""  # the tensor the op (with what it absorbed) writes
    compute_us: float = 0.0
    memory_us: float = 0.0
    overhead_us: float = 0.0
    time_us: float = 0.0
    bound: str = ""  # compute | memory | overhead
    source: str = SOURCE


def category_of(op_type: str) -> str:
    for cat, ops in (("gemm", GEMM_OPS), ("elementwise", ELEMENTWISE_OPS), ("activation", ACTIVATION_OPS),
                     ("pool", POOL_OPS), ("data", DATA_OPS), ("reshape", RESHAPE_OPS), ("quant", QUANT_OPS)):
        if op_type in ops:
            return cat
    return "conv" if op_type in CONV_OPS else "elementwise"


def attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def numel(shape: Optional[Tuple]) -> int:
    if shape is None or any(d is None for d in shape):
        return 0
    n = 1
    for d in shape:
        n *= int(d)
    return n


def spatial(shape: Optional[Tuple]) -> int:
    return numel(shape[2:]) if shape and len(shape) > 2 else 1


def open_onnx(path, load_external_data: bool = True):
    """The ONNX model in ``path``; a missing file, another format or an unreadable file is one clear EdgekitError."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"Model file not found: {path}")
    if path.suffix.lower() != ".onnx":
        raise EdgekitError(f"Latency estimation reads ONNX graphs; {path.name} is not .onnx "
                           f"(estimate the .onnx it was converted from)")
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # noqa: BLE001 - protobuf errors are not user friendly
        raise EdgekitError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0][:200]}") from None
