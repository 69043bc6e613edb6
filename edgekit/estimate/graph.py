"""What ONNX Runtime's CPU optimizer will run of an ONNX graph, as the roofline sees it.

``analyze`` folds constants and applies the fusions ORT applies (Conv + activation / residual Add, x * Sigmoid(x),
HardSwish, QDQ groups -> int8 kernels, the Q/DQ ORT drops), then adds the layout conversions it inserts
(``layout.py``), and returns one ``OpCost`` per operator that runs, with its work and bytes (no times yet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..config import LatencyModel
from .layout import layout_costs
from .ops import (BYTES, CONV_ACTIVATIONS, CONV_OPS, GEMM_OPS, QDQ_DROP_OPS, QLINEAR_OPS, SHAPE_OPS, OpCost, attrs,
                  category_of, numel, open_onnx)


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
    from onnx import shape_inference

    if isinstance(model, (str, Path)):
        model = open_onnx(model)
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
    a = attrs(node)
    w = shapes.get(node.input[1])
    y = shapes.get(node.output[0])
    if not w or not y or numel(y) == 0:
        return 0, "conv", 0, 0
    group = int(a.get("group", 1))
    cout, cin_g = int(w[0]), int(w[1])
    k = int(np.prod(w[2:])) if len(w) > 2 else 1
    spatial = numel(y[2:]) if len(y) > 2 else 1
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
        spatial = numel(x[2:]) if x and len(x) > 2 else spatial
    return batch * cout * spatial * cin_g * k, category, cin_g * k, cout


def _gemm_macs(node, shapes) -> Tuple[int, int, int]:
    a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
    y = shapes.get(node.output[0])
    if not a or not b or not y:
        return 0, 0, 0
    if node.op_type == "Gemm":
        k = a[0] if attrs(node).get("transA", 0) else a[-1]
    else:
        k = a[-1]
    return int(numel(y) * (k or 0)), int(k or 0), int(y[-1] or 0)


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
                (n.op_type in SHAPE_OPS and numel(shapes.get(n.input[0])) > 0):
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
                extra_bytes_elems[i] = extra_bytes_elems.get(i, 0) + numel(shapes.get(other[0]))
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
    layout_ops, plain_convs = layout_costs(nodes, status, precision, shapes, consts, graph_outputs, absorbed_into,
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
            work = float(numel(shapes.get(n.input[0])))
        elif cat in ("data", "reshape"):
            work = 0.0  # copies and views: bytes and overhead only
        else:
            work = float(max(numel(shapes.get(o)) for o in n.output if o) if n.output else 0)
        bpe = BYTES.get(p, 4)
        if n.op_type == "QuantizeLinear":
            in_b, out_b = 4, 1
        elif n.op_type == "DequantizeLinear":
            in_b, out_b = 1, 4
        else:
            in_b = out_b = bpe
        act = sum(numel(shapes.get(x)) for x in act_inputs(i))
        if i in grouped:  # int8 group: the inputs are the DQ inputs
            act = sum(numel(shapes.get(nodes[producer[x]].input[0])) for x in act_inputs(i))
        weights = sum(numel(shapes.get(x)) for x in n.input if x and x in consts and x in shapes)
        if i in grouped:
            weights = sum(numel(shapes.get(nodes[producer[x]].input[0])) for x in n.input
                          if x and x in producer and nodes[producer[x]].op_type == "DequantizeLinear"
                          and x in consts)
        outs = sum(numel(shapes.get(o)) for o in n.output if o)
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


def analyze_for(model, lm: LatencyModel) -> List[OpCost]:
    """``analyze`` with the graph-rewrite options of a latency model."""
    return analyze(model, channel_block=lm.channel_block, fuse_conv_add=lm.fuse_conv_add,
                   int8_nhwc=lm.int8_layout == "nhwc", int8_align=lm.int8_channel_align)

