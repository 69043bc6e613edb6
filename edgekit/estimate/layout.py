"""The data-layout conversions ONNX Runtime's CPU provider inserts around convolutions (NCHWc fp32, NHWC int8).

The roofline charges them as ``layout`` operators, and a conv that misses the fast blocked layout as its ``_nchw`` kind.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from .ops import BYTES, OpCost, attrs, numel, spatial

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
    group = int(attrs(node).get("group", 1))
    if group > 1:
        if cin == 1 and cout == group:  # depthwise
            return cout % NCHWC_ALIGN == 0, True
        return (cin % block == 0 and cout % group == 0 and (cout // group) % block == 0), True
    if cin < block:
        return True, False  # small inputs (the stem) are read in NCHW directly
    return cin % NCHWC_ALIGN == 0, True


def layout_costs(nodes, status, precision, shapes, consts, graph_outputs, host, block: int,
                 int8_nhwc: bool) -> Tuple[List[OpCost], set]:
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
        return 1 if p == "int8" else BYTES.get(p, 4)

    def convert(t, to, p):
        key = (t, to)
        if key in converted:
            return
        converted[key] = True
        shape = shapes.get(t)
        n = numel(shape)
        if n == 0 or (layout.get(t) == "nhwc" or to == "nhwc") and spatial(shape) <= 1:
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
                    if layout.get(x) != "nhwc" and spatial(shapes.get(x)) > 1 and x in shapes:
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
