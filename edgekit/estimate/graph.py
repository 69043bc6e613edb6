"""Latency estimated from an ONNX graph: a per-operator roofline with per-device coefficients.

For every operator that runs (after the fusions a runtime applies) the model takes

    time = overhead[category] + max(work / (peak[precision] * efficiency[category] * depth / (depth + half)
                                            * width / (width + whalf)), bytes / bandwidth)

and adds a per-inference session overhead. ``work`` is multiply-accumulates for convolutions and
matrix products and elements for everything else; ``bytes`` is activations in + out + weights at
the operator's precision. Activations move at cache bandwidth (they were just written); weights do too
when all of the model's weights fit in the cache, and at memory bandwidth when they do not (every
inference then streams them again). Categories: conv (dense k>1), pwconv (1x1), dwconv (depthwise),
gemm, elementwise, activation (transcendental), pool, data (copies), reshape (views), quant (stand-alone
QuantizeLinear / DequantizeLinear). A coefficient named ``conv.int8`` overrides ``conv`` for int8 ops.

Graph rewrites mirror ONNX Runtime's CPU optimizer, which is what edge CPUs run here:
constant folding; Conv + (Relu|Clip|Sigmoid|HardSigmoid|LeakyRelu|Tanh) and Conv + Add (+ activation)
fusion; x * Sigmoid(x) -> one op; QDQ groups -> QLinear* int8 ops (Conv, MatMul, Gemm, Add, Mul,
pools, Sigmoid, LeakyRelu, Concat, Softmax) whose Q/DQ cost nothing, and the ops whose Q/DQ ORT drops
(Reshape, Transpose, MaxPool, Slice, ...) run on int8 data. Q/DQ left outside those groups are costed.

Every result says ``"source": "estimated"``: it is a model, not a measurement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..config import DeviceProfile, LatencyModel, load_device
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

_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


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


# ----------------------------------------------------------------------------- graph analysis


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _numel(shape: Optional[Tuple]) -> int:
    if shape is None or any(d is None for d in shape):
        return 0
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _basic_rewrites(model):
    """Runtime-neutral rewrites (constant folding, Conv+BatchNorm/Pad folding) by ORT's *basic* level.

    Exporters leave shape arithmetic (Shape -> Gather -> ... -> Pad/Slice) in graphs with static
    shapes; folding it lets ONNX shape inference see every tensor. Hardware-specific rewrites (the
    extended/layout levels) are not applied: the fusions the estimate assumes are in ``analyze``.
    """
    import tempfile

    import onnx

    try:
        import onnxruntime as ort
    except ImportError:
        return model
    with tempfile.TemporaryDirectory(prefix="edgekit-est-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "basic.onnx"
        onnx.save(model, str(src))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(dst)
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1
        try:
            ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
            return onnx.load(str(dst))
        except Exception:  # noqa: BLE001 - an op ORT lacks: estimate the graph as it is
            return model


def _load(model, rewrite: bool = True):
    import onnx
    from onnx import shape_inference

    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise EdgekitError(f"Model file not found: {path}")
        if path.suffix.lower() != ".onnx":
            raise EdgekitError(f"Latency estimation reads ONNX graphs; {path.name} is not .onnx "
                               f"(estimate the .onnx it was converted from)")
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # noqa: BLE001 - protobuf errors are not user friendly
            raise EdgekitError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0][:200]}") from None
    if rewrite:
        model = _basic_rewrites(model)
    try:
        return shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - fall back to the shapes the file carries
        return model


def _shapes(graph) -> Dict[str, Tuple]:
    out: Dict[str, Tuple] = {}
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    for init in graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


def _conv_macs(node, shapes, round_to: int = 0) -> Tuple[int, str, int, int]:
    a = _attrs(node)
    w = shapes.get(node.input[1])
    y = shapes.get(node.output[0])
    if not w or not y or _numel(y) == 0:
        return 0, "conv", 0, 0
    group = int(a.get("group", 1))
    cout, cin_g = int(w[0]), int(w[1])
    k = int(np.prod(w[2:])) if len(w) > 2 else 1
    spatial = _numel(y[2:]) if len(y) > 2 else 1
    if group > 1 and cin_g == 1:
        category = "dwconv"
    elif group > 1:
        category = "gconv"  # grouped (ShuffleNetV1, CondenseNet, IGCV3): a small GEMM per group
    elif k == 1:
        category = "pwconv"
    else:
        category = "conv"
    if round_to > 1:  # blocked kernels (e.g. ORT's NCHWc) pad channels up to the vector block
        r = lambda c: -(-c // round_to) * round_to  # noqa: E731
        cout = r(cout)
        if category != "dwconv" and cin_g * group >= round_to:
            cin_g = r(cin_g * group) // group
    batch = int(y[0]) if y[0] else 1
    if node.op_type == "ConvTranspose":
        x = shapes.get(node.input[0])
        spatial = _numel(x[2:]) if x and len(x) > 2 else spatial
    return batch * cout * spatial * cin_g * k, category, cin_g * k, cout


def _gemm_macs(node, shapes) -> Tuple[int, int, int]:
    a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
    y = shapes.get(node.output[0])
    if not a or not b or not y:
        return 0, 0, 0
    if node.op_type == "Gemm":
        k = a[0] if _attrs(node).get("transA", 0) else a[-1]
    else:
        k = a[-1]
    return int(_numel(y) * (k or 0)), int(k or 0), int(y[-1] or 0)


def category_of(op_type: str) -> str:
    for cat, ops in (("gemm", GEMM_OPS), ("elementwise", ELEMENTWISE_OPS), ("activation", ACTIVATION_OPS),
                     ("pool", POOL_OPS), ("data", DATA_OPS), ("reshape", RESHAPE_OPS), ("quant", QUANT_OPS)):
        if op_type in ops:
            return cat
    return "conv" if op_type in CONV_OPS else "elementwise"


def _spatial(shape: Optional[Tuple]) -> int:
    return _numel(shape[2:]) if shape and len(shape) > 2 else 1


_BLOCKED_UNARY = {"Relu", "Sigmoid", "Tanh", "BatchNormalization"}  # keep ORT's NCHWc layout (fp32)
_LAYOUT_SENSITIVE = {"Reshape", "Flatten", "Transpose", "Gemm", "MatMul", "Squeeze", "Unsqueeze", "Resize",
                     "DepthToSpace", "SpaceToDepth", "Gather", "Expand", "Tile"}  # need NCHW (int8 NHWC)


NCHWC_ALIGN = 4  # ORT 1.2x-1.3x pads channels to the block when they are a multiple of 4 (checked empirically)


def _nchwc_conv(node, shapes, block: int) -> Tuple[bool, bool]:
    """(runs as ORT NCHWc conv, reads a blocked input), following ORT's NchwcTransformer."""
    w = shapes.get(node.input[1]) if len(node.input) > 1 else None
    if node.op_type != "Conv" or not w or len(w) != 4:
        return False, False
    cout, cin = int(w[0]), int(w[1])
    group = int(_attrs(node).get("group", 1))
    if group > 1:
        if cin == 1 and cout == group:  # depthwise
            return cout % NCHWC_ALIGN == 0, True
        return (cin % block == 0 and cout % group == 0 and (cout // group) % block == 0), True
    if cin < block:
        return True, False  # small inputs (the stem) are read in NCHW directly
    return cin % NCHWC_ALIGN == 0, True


def _layout_costs(nodes, status, precision, shapes, consts, graph_outputs, host, block: int,
                  int8_nhwc: bool) -> Tuple[List["OpCost"], set]:
    """Data-layout conversions a CPU runtime inserts, and the convs that miss the fast layout.

    fp32 with ``block`` (ORT on x86): convs run in NCHWc (channels blocked by ``block``); Relu, Sigmoid,
    same-shape Add/Mul, Concat, pools and x*Sigmoid(x) keep the blocked layout; any other consumer needs a
    ReorderOutput, and a blocked conv fed by a plain tensor a ReorderInput. int8 (``int8_nhwc``): QLinearConv
    runs NHWC; element-wise ops, pools, Concat/Split/Slice follow; Reshape/Transpose/Flatten/Gemm need a
    Transpose back (free for 1x1 spatial tensors). Each tensor is converted once however many use it.
    Returns (conversion ops, indices of fp32 convs on the slow plain path).
    """
    layout: Dict[str, str] = {}
    converted: Dict[Tuple[str, str], bool] = {}
    extra: List[OpCost] = []
    plain_convs = set()

    def bpe(t, p):
        return 1 if p == "int8" else _BYTES.get(p, 4)

    def convert(t, to, p):
        key = (t, to)
        if key in converted:
            return
        converted[key] = True
        shape = shapes.get(t)
        n = _numel(shape)
        if n == 0 or (layout.get(t) == "nhwc" or to == "nhwc") and _spatial(shape) <= 1:
            return
        if layout.get(t) == "blocked" or to == "blocked":
            c = int(shape[1]) if shape and len(shape) > 1 else 1
            n = n // max(c, 1) * (-(-c // block) * block)
        op = {"blocked": "ReorderInput", "nhwc": "Transpose"}.get(to) or \
            ("ReorderOutput" if layout.get(t) == "blocked" else "Transpose")
        extra.append(OpCost(name=f"{op}({t})", op_type=op, category="layout", precision=p,
                            bytes=float(2 * n * bpe(t, p)), fused=["inserted by the runtime"]))

    def acts(i):
        return [x for x in nodes[i].input if x and x not in consts]

    for i, n in enumerate(nodes):
        if status[i] == "folded":
            continue
        ins = acts(i)
        if status[i] == "absorbed":  # part of a fused group: passes its host's layout on
            src = next((layout[x] for x in ins if x in layout), None)
            for o in n.output:
                if src:
                    layout[o] = src
            continue
        p = precision[i]
        op = n.op_type
        out_layout = None
        if int8_nhwc and (p == "int8" or any(layout.get(x) == "nhwc" for x in ins)):
            if op == "Conv":
                for x in ins[:1]:
                    if layout.get(x) != "nhwc":
                        convert(x, "nhwc", p)
                out_layout = "nhwc"
            elif op in _LAYOUT_SENSITIVE:
                for x in ins:
                    if layout.get(x) == "nhwc":
                        convert(x, "plain", p)
            else:  # layout-agnostic: runs in NHWC, converting a plain input once (ORT's transpose optimizer)
                out_layout = "nhwc"
                for x in ins:
                    if layout.get(x) != "nhwc" and _spatial(shapes.get(x)) > 1 and x in shapes:
                        convert(x, "nhwc", p)
        elif block and p == "fp32":
            blocked_in = [x for x in ins if layout.get(x) == "blocked"]
            same = len({shapes.get(x) for x in ins}) == 1
            if op == "Conv":
                ok, reads_blocked = _nchwc_conv(n, shapes, block)
                if ok:
                    if reads_blocked and ins and layout.get(ins[0]) != "blocked":
                        convert(ins[0], "blocked", p)
                    for x in blocked_in[1:] if reads_blocked else blocked_in:
                        convert(x, "plain", p)
                    out_layout = "blocked"
                else:
                    plain_convs.add(i)
                    for x in blocked_in:
                        convert(x, "plain", p)
            elif op in ("MaxPool", "AveragePool") and ins and (shapes.get(ins[0]) or (0, 1))[1] % block == 0:
                if layout.get(ins[0]) != "blocked":
                    convert(ins[0], "blocked", p)
                out_layout = "blocked"
            elif op in ("GlobalAveragePool", "GlobalMaxPool") and blocked_in and \
                    (shapes.get(ins[0]) or (0, 1))[1] % block == 0:
                out_layout = "blocked"
            elif ins and len(blocked_in) == len(ins) and (
                    op in _BLOCKED_UNARY or (op in ("Add", "Sum", "Mul") and same) or
                    (op == "Concat" and all((shapes.get(x) or (0, 1))[1] % block == 0 for x in ins))):
                out_layout = "blocked"
            else:
                for x in blocked_in:
                    convert(x, "plain", p)
        for o in n.output:
            if out_layout:
                layout[o] = out_layout
    for o in graph_outputs:  # results leave in NCHW
        if layout.get(o):
            convert(o, "plain", "fp32" if layout[o] == "blocked" else "int8")
    return extra, plain_convs


def _group_output(i, nodes, absorbed_into) -> str:
    """The last tensor a fused group writes (its final absorbed activation / add / Q)."""
    out = nodes[i].output[0] if nodes[i].output else ""
    for j in absorbed_into.get(i, []):
        if nodes[j].op_type != "DequantizeLinear" and j > i and nodes[j].output:
            out = nodes[j].output[0]
    return out


def analyze(model, channel_block: int = 0, fuse_conv_add: bool = True, int8_nhwc: bool = True,
            int8_align: int = 0) -> List[OpCost]:
    """The operators that run, after constant folding and runtime fusions, with work and bytes (no times)."""
    graph = _load(model).graph
    shapes = _shapes(graph)
    nodes = list(graph.node)
    consts = {i.name for i in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    producer: Dict[str, int] = {}
    consumers: Dict[str, List[int]] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            producer[o] = i
        for x in n.input:
            if x:
                consumers.setdefault(x, []).append(i)

    status = ["run"] * len(nodes)  # run | folded | absorbed
    precision = ["fp32"] * len(nodes)
    elem_types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input)}
    for i, n in enumerate(nodes):
        if n.output and elem_types.get(n.output[0]) == 10:  # FLOAT16
            precision[i] = "fp16"
    absorbed_into: Dict[int, List[int]] = {}
    extra_bytes_elems: Dict[int, int] = {}

    # 1. constant folding (Shape of a static tensor is a constant too)
    for i, n in enumerate(nodes):
        ins = [x for x in n.input if x]
        if n.op_type == "Constant" or (ins and all(x in consts for x in ins)) or \
                (n.op_type in SHAPE_OPS and _numel(shapes.get(n.input[0])) > 0):
            status[i] = "folded"
            consts.update(n.output)

    def act_inputs(i):
        return [x for x in nodes[i].input if x and x not in consts]

    def only_consumer(name) -> Optional[int]:
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 and name not in graph_outputs else None

    # 2. QDQ groups -> int8 kernels
    grouped = set()
    for i, n in enumerate(nodes):
        if status[i] != "run" or n.op_type not in QLINEAR_OPS | QDQ_DROP_OPS:
            continue
        ins = act_inputs(i)
        if not ins or not all(x in producer and nodes[producer[x]].op_type == "DequantizeLinear" for x in ins):
            continue
        outs = [o for o in n.output if o]
        q_out = all(o not in graph_outputs and consumers.get(o) and
                    all(nodes[c].op_type == "QuantizeLinear" for c in consumers[o]) for o in outs)
        if not q_out and not (n.op_type in ("MatMul", "Gemm")):  # MatMul without Q: MatMulIntegerToFloat
            continue
        grouped.add(i)
        precision[i] = "int8"
        absorbed_into[i] = []
        if q_out:
            for o in outs:
                for c in consumers[o]:
                    status[c] = "absorbed"
                    absorbed_into[i].append(c)
    for i, n in enumerate(nodes):  # a DQ is free when every consumer is an int8 group
        if n.op_type == "DequantizeLinear" and status[i] == "run":
            cs = consumers.get(n.output[0], [])
            if cs and all(c in grouped for c in cs):
                status[i] = "absorbed"
                absorbed_into.setdefault(cs[0], []).append(i)

    # 3a. HardSwish written out as x * HardSigmoid(x) (ORT inlines the function) is one op again
    hardswish = set()
    for i, n in enumerate(nodes):
        if status[i] != "run" or n.op_type != "HardSigmoid" or precision[i] == "int8":
            continue
        x = n.input[0]
        muls = [c for c in consumers.get(n.output[0], []) if nodes[c].op_type == "Mul" and x in nodes[c].input]
        if len(consumers.get(n.output[0], [])) == 1 and muls and status[muls[0]] == "run" \
                and precision[muls[0]] != "int8":
            m = muls[0]
            status[m] = "absorbed"
            absorbed_into.setdefault(i, []).append(m)
            hardswish.add(i)
            consumers[x] = [c for c in consumers.get(x, []) if c != m]
            # the HardSwish's output is the Mul's: let later passes see one node
            for o in nodes[m].output:
                producer[o] = i
            consumers[n.output[0]] = consumers.get(nodes[m].output[0], [])
            n.output[0], nodes[m].output[0] = nodes[m].output[0], n.output[0]

    # 3b. fusions into convolutions / matrix products (the activation after a conv, the residual add)
    for i, n in enumerate(nodes):
        if status[i] != "run" or n.op_type not in CONV_OPS | GEMM_OPS or precision[i] == "int8":
            continue
        cur = i
        took_add = False
        while True:
            c = only_consumer(nodes[cur].output[0])
            if c is None or status[c] != "run" or precision[c] != precision[i]:
                break
            op = nodes[c].op_type
            other = [x for x in nodes[c].input if x and x != nodes[cur].output[0]]
            if op in CONV_ACTIVATIONS and (op != "Clip" or all(x in consts for x in other)):
                pass
            elif op in ("BatchNormalization",) or (op in ("Add", "Mul") and other and all(x in consts for x in other)):
                pass  # folded into the weights / bias
            elif op == "Add" and fuse_conv_add and not took_add and n.op_type in CONV_OPS and len(other) == 1 and \
                    shapes.get(other[0]) == shapes.get(nodes[cur].output[0]):
                took_add = True
                extra_bytes_elems[i] = extra_bytes_elems.get(i, 0) + _numel(shapes.get(other[0]))
            else:
                break
            status[c] = "absorbed"
            absorbed_into.setdefault(i, []).append(c)
            cur = c

    # 4. x * Sigmoid(x) -> one activation (ORT: QuickGelu)
    for i, n in enumerate(nodes):
        if status[i] != "run" or n.op_type != "Sigmoid" or precision[i] == "int8":
            continue
        c = only_consumer(n.output[0])
        if c is not None and status[c] == "run" and nodes[c].op_type == "Mul" and precision[c] != "int8" and \
                n.input[0] in nodes[c].input:
            status[c] = "absorbed"
            absorbed_into.setdefault(i, []).append(c)

    # 5. layout conversions (NCHWc for fp32 convs on x86, NHWC for int8 convs)
    layout_ops, plain_convs = _layout_costs(nodes, status, precision, shapes, consts, graph_outputs, absorbed_into,
                                            channel_block, int8_nhwc)

    # 6. work and bytes of what runs
    out: List[OpCost] = []
    for i, n in enumerate(nodes):
        if status[i] != "run":
            continue
        p = precision[i]
        cat = category_of(n.op_type)
        macs, depth, width = 0, 0, 0
        if n.op_type in CONV_OPS:
            macs, cat, depth, width = _conv_macs(n, shapes, channel_block if p != "int8" and i not in plain_convs else 0)
            work = float(macs)
            if i in plain_convs:
                cat += "_nchw"  # missed the blocked layout: a slower kernel (falls back to the base coefficient)
            elif p == "int8" and int8_align and width % int8_align and cat != "gconv":
                cat += "_tail"  # int8 kernels vectorize channels in blocks; a remainder takes a slow path
        elif n.op_type in GEMM_OPS:
            macs, depth, width = _gemm_macs(n, shapes)
            work = float(macs)
        elif cat == "pool":
            work = float(_numel(shapes.get(n.input[0])))
        elif cat in ("data", "reshape"):
            work = 0.0  # copies and views: bytes and overhead only
        else:
            work = float(max(_numel(shapes.get(o)) for o in n.output if o) if n.output else 0)
        bpe = _BYTES.get(p, 4)
        if n.op_type == "QuantizeLinear":
            in_b, out_b = 4, 1
        elif n.op_type == "DequantizeLinear":
            in_b, out_b = 1, 4
        else:
            in_b = out_b = bpe
        act = sum(_numel(shapes.get(x)) for x in act_inputs(i))
        if i in grouped:  # int8 group: the inputs are the DQ inputs
            act = sum(_numel(shapes.get(nodes[producer[x]].input[0])) for x in act_inputs(i))
        weights = sum(_numel(shapes.get(x)) for x in n.input if x and x in consts and x in shapes)
        if i in grouped:
            weights = sum(_numel(shapes.get(nodes[producer[x]].input[0])) for x in n.input
                          if x and x in producer and nodes[producer[x]].op_type == "DequantizeLinear"
                          and x in consts)
        outs = sum(_numel(shapes.get(o)) for o in n.output if o)
        nbytes = (act + extra_bytes_elems.get(i, 0)) * in_b + outs * out_b + weights * (1 if p == "int8" else bpe)
        if cat == "reshape":
            nbytes = 0.0  # views: no data moves
        out.append(OpCost(name=n.name or f"{n.op_type}_{i}", op_type=n.op_type, category=cat, precision=p,
                          macs=int(macs), work=work, depth=float(depth), width=float(width),
                          bytes=float(nbytes),
                          weight_bytes=float(weights * (1 if p == "int8" else bpe)) if cat != "reshape" else 0.0,
                          fused=[nodes[j].op_type for j in absorbed_into.get(i, [])],
                          output=_group_output(i, nodes, absorbed_into)))
    return out + layout_ops


# ----------------------------------------------------------------------------- the latency model


def _coef(table: Dict[str, float], category: str, precision: str, default: float) -> float:
    """``cat.precision``, else ``cat``, else the same category at another precision, else the base category
    (``dwconv`` for ``dwconv_nchw``), else ``conv`` for a missing conv kind, else ``default``."""
    base = category.split("_")[0]
    for cat in dict.fromkeys((category, base, "conv" if base in ("gconv", "pwconv", "dwconv") else base)):
        for key in (f"{cat}.{precision}", cat, f"{cat}.fp32"):
            if key in table:
                return float(table[key])
        same = [v for k, v in table.items() if k.split(".")[0] == cat]
        if same:
            return float(same[0])
    return float(default)


def _speedup(threads: int, cores: int, parallel_efficiency: float) -> float:
    t = max(1, min(int(threads), int(cores)))
    return 1.0 + (t - 1) * parallel_efficiency


def cost_ops(ops: Sequence[OpCost], device: DeviceProfile, threads: Optional[int] = None,
             lm: Optional[LatencyModel] = None) -> List[OpCost]:
    """Fill compute/memory/overhead/time of each op from the device's roofline coefficients."""
    lm = lm or device.latency_model
    threads = int(threads or device.resolved_threads())
    cal_threads = int(lm.threads or device.resolved_threads())
    scale = _speedup(threads, device.cores, lm.parallel_efficiency) / _speedup(cal_threads, device.cores,
                                                                               lm.parallel_efficiency)
    dram = float(lm.memory_bandwidth_gbs or device.memory_bandwidth_gbs or lm.cache_bandwidth_gbs)
    cache_bytes = lm.cache_kb * 1024.0
    # Inference runs again and again: activations were just written and stay in the cache, weights stay
    # there only when all of the model's weights fit; otherwise every op streams its weights from memory.
    weights_fit = sum(o.weight_bytes for o in ops) <= cache_bytes
    for op in ops:
        peak = device.peak_gops.get(op.precision) or device.peak_gops.get("fp32")
        if not peak:
            raise EdgekitError(f"Device {device.name} has no peak_gops for {op.precision} (or fp32)")
        eff = _coef(lm.efficiency, op.category, op.precision, 0.0)
        half = _coef(lm.depth_half, op.category, op.precision, 0.0) if lm.depth_half else 0.0
        if half > 0 and op.depth > 0:  # short reductions (the RGB stem, small groups) keep the units idle
            eff *= op.depth / (op.depth + half)
        whalf = _coef(lm.width_half, op.category, op.precision, 0.0) if lm.width_half else 0.0
        if whalf > 0 and op.width > 0:  # few output channels fill few vector lanes
            eff *= op.width / (op.width + whalf)
        op.compute_us = op.work / (peak * 1e3 * eff * scale) if eff > 0 and op.work else 0.0
        act_bytes = op.bytes - op.weight_bytes
        act_bw = lm.cache_bandwidth_gbs if act_bytes <= cache_bytes else dram
        op.memory_us = act_bytes / (act_bw * 1e3) + op.weight_bytes / ((lm.cache_bandwidth_gbs if weights_fit
                                                                           else dram) * 1e3)
        op.overhead_us = _coef(lm.overhead_us, op.category, op.precision, lm.default_overhead_us)
        op.time_us = op.overhead_us + max(op.compute_us, op.memory_us)
        op.bound = ("compute" if op.compute_us >= op.memory_us else "memory") \
            if max(op.compute_us, op.memory_us) >= op.overhead_us else "overhead"
    return list(ops)


def analyze_for(model, lm: LatencyModel) -> List[OpCost]:
    """``analyze`` with the graph-rewrite options of a latency model."""
    return analyze(model, channel_block=lm.channel_block, fuse_conv_add=lm.fuse_conv_add,
                   int8_nhwc=lm.int8_layout == "nhwc", int8_align=lm.int8_channel_align)


def estimate_latency(model, device: DeviceProfile | str, threads: Optional[int] = None,
                     per_op: bool = False, lm: Optional[LatencyModel] = None) -> dict:
    """Estimated batch latency (ms) of an ONNX model on ``device``; ``source`` is always ``"estimated"``."""
    if isinstance(device, str):
        device = load_device(device)
    lm = lm or device.latency_model
    table = kernel_table_for(lm, int(threads or device.resolved_threads()))
    if table is not None:
        return _estimate_from_kernels(model, device, table, int(threads or device.resolved_threads()), per_op)
    ops = cost_ops(analyze_for(model, lm), device, threads, lm)
    total_us = lm.session_overhead_us + sum(o.time_us for o in ops)
    by_cat: Dict[str, dict] = {}
    for o in ops:
        row = by_cat.setdefault(f"{o.category}.{o.precision}", {"ops": 0, "ms": 0.0, "gmacs": 0.0})
        row["ops"] += 1
        row["ms"] += o.time_us / 1e3
        row["gmacs"] += o.macs / 1e9
    precisions = sorted({o.precision for o in ops})
    result = {
        "source": SOURCE,
        "method": "per-operator roofline: overhead + max(work / (peak x efficiency), bytes / bandwidth)",
        "device": device.name,
        "threads": int(threads or device.resolved_threads()),
        "p50": total_us / 1e3,
        "mean": total_us / 1e3,
        "estimate_ms": total_us / 1e3,
        "session_overhead_ms": lm.session_overhead_us / 1e3,
        "ops": len(ops),
        "gmacs": sum(o.macs for o in ops) / 1e9,
        "precisions": precisions,
        "bound": {b: sum(1 for o in ops if o.bound == b) for b in ("compute", "memory", "overhead")},
        "by_category": {k: {**v, "source": SOURCE} for k, v in sorted(by_cat.items())},
        "calibration": dict(lm.calibration) if lm.calibration else None,
    }
    if isinstance(model, (str, Path)):
        result["artifact"] = str(model)
    if per_op:
        result["per_op"] = [asdict(o) for o in ops]
    return result


# ----------------------------------------------------------------------------- kernel regression


def kernel_table_for(lm: LatencyModel, threads: int) -> Optional[Path]:
    """The kernel-timing table for ``threads``, when the profile has one and ONNX Runtime is importable."""
    name = lm.kernel_tables.get(int(threads))
    if not name:
        return None
    try:
        import onnxruntime  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        return None
    p = Path(name).expanduser()
    if not p.is_absolute() and not p.is_file():
        p = Path(__file__).resolve().parent.parent / "devices" / name
    if not p.is_file():
        raise EdgekitError(f"Kernel latency table {name} (latency_model.kernel_tables[{threads}]) not found")
    return p


def _estimate_from_kernels(model, device: DeviceProfile, table: Path, threads: int, per_op: bool) -> dict:
    import tempfile

    import onnx

    from .calibrate import cpu_name
    from .kernels import estimate_kernels, kernel_model

    with tempfile.TemporaryDirectory(prefix="edgekit-est-") as tmp:
        path = model
        if not isinstance(model, (str, Path)):
            path = Path(tmp) / "model.onnx"
            onnx.save(model, str(path))
        path = Path(path)
        if not path.is_file():
            raise EdgekitError(f"Model file not found: {path}")
        if path.suffix.lower() != ".onnx":
            raise EdgekitError(f"Latency estimation reads ONNX graphs; {path.name} is not .onnx "
                               f"(estimate the .onnx it was converted from)")
        try:
            onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf errors are not user friendly
            raise EdgekitError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0][:200]}") from None
        est = estimate_kernels(path, table, threads)
    km = kernel_model(table)
    t = km.table
    kernels = est["kernels"]
    result = {
        "source": SOURCE,
        "method": "per-kernel regression: ONNX Runtime's optimized graph, each kernel's time predicted from "
                  "its shape by a ridge line and a forest trained on profiled random networks, plus executor overhead",
        "device": device.name,
        "threads": threads,
        "p50": est["ms"],
        "mean": est["ms"],
        "estimate_ms": est["ms"],
        "session_overhead_ms": km.overhead_for(est["precision"])["a_us"] / 1e3,
        "ops": len(kernels),
        "gmacs": sum(k.desc.get("macs", 0) for k in kernels) / 1e9,
        "precisions": [est["precision"]],
        "by_category": {k: {"ops": v["kernels"], "ms": v["ms"], "trained_on": v["trained_on"], "source": SOURCE}
                        for k, v in sorted(est["by_kernel"].items())},
        "unseen_kernels": est["unseen"],
        "calibration": {"host": t.get("host"), "date": t.get("date"), "threads": t.get("threads"),
                        "onnxruntime": t.get("onnxruntime"), "random_networks": len(t.get("nets", [])),
                        "kernel_samples": len(t["kernels"]), "table": table.name},
    }
    here = cpu_name()
    if device.local and t.get("host") and t["host"] != here:  # a kernel table only holds for the CPU it timed
        result["warnings"] = [f"{table.name} was timed on {t['host']} ({t.get('date')}), not on this machine "
                              f"({here}): estimates for this machine can be far off until it is re-timed here "
                              f"(`edgekit devices calibrate {device.name}`)"]
    if isinstance(model, (str, Path)):
        result["artifact"] = str(model)
    if per_op:
        result["per_op"] = [{"name": k.name, "op_type": k.op, "category": k.key, "time_us": k.predicted_us,
                             **k.desc, "source": SOURCE} for k in kernels]
    return result
