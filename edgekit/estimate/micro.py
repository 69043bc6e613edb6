"""Micro-benchmarks for the roofline's calibration: small ONNX graphs of one operator kind or one mobile-CNN block.

Each coefficient of the roofline is identified by graphs that isolate it (chains of one op at a few sizes and two
lengths separate per-op from fixed costs); the ``net`` kind is a whole random network (``synthetic.RandomNet``), so
ops are also seen in the context a network gives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import EdgekitError

OPSET = 17


@dataclass(frozen=True)
class Micro:
    """One synthetic graph: ``length`` repetitions of a unit of ``kind`` on a [1, C, H, H] (or [1, C]) input.

    Units are single operators (conv, pwconv, dwconv, gemm, add, mul, sigmoid, silu, maxpool, avgpool,
    reshape, qdq) and the building blocks of mobile CNNs, so that every coefficient is also seen in the
    context networks give it: stem (3->C conv, stride 2), mbblock (inverted residual), mbdown (its stride-2
    form), se (squeeze-excite), hswish (conv + HardSwish), fire (SqueezeNet), shuffle (ShuffleNetV2 unit),
    head (pool + classifier); and net, the ``synthetic.RandomNet`` of seed ``channels`` at its own input size.
    """

    kind: str
    channels: int
    size: int = 1
    kernel: int = 3
    length: int = 1
    expand: int = 1

    @property
    def name(self) -> str:
        if self.kind == "net":
            return f"net-seed{self.channels}"
        return f"{self.kind}-c{self.channels}-s{self.size}-k{self.kernel}-e{self.expand}-n{self.length}"

    @property
    def input_shape(self) -> List[int]:
        if self.kind == "gemm":
            return [1, self.channels]
        if self.kind == "net":
            raise ValueError("a random network draws its own input size: write_micro returns it")
        if self.kind == "stem":
            return [1, 3, self.size, self.size]
        return [1, self.channels, self.size, self.size]


def _he(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)


class _GraphBuilder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.inits, self.nodes = [], []

    def init(self, arr) -> str:
        from onnx import numpy_helper

        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op, ins, n_out: int = 1, **attrs):
        from onnx import helper

        outs = [f"t{len(self.nodes)}_{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op, ins, outs, name=f"{op}_{len(self.nodes)}", **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, cin, cout, k=1, stride=1, group=1, act="Relu"):
        w = self.init(_he(self.rng, (cout, cin // group, k, k), cin // group * k * k))
        b = self.init(np.zeros(cout, np.float32))
        y = self.node("Conv", [x, w, b], kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride, stride],
                      group=group)
        if act == "Relu":
            return self.node("Relu", [y])
        if act == "Relu6":
            return self.node("Clip", [y, self.init(np.array(0.0, np.float32)), self.init(np.array(6.0, np.float32))])
        if act == "HardSwish":
            return self.node("HardSwish", [y])
        if act == "HardSigmoid":
            return self.node("HardSigmoid", [y], alpha=1.0 / 6, beta=0.5)
        if act == "Sigmoid":
            return self.node("Sigmoid", [y])
        return y
def build_micro(m: Micro, seed: int = 0):
    """The fp32 ONNX graph of a micro-benchmark (not ``net``: ``write_micro`` exports that one)."""
    from onnx import TensorProto, helper

    g = _GraphBuilder(seed)
    C, H, k, t = m.channels, m.size, m.kernel, m.expand
    cur = "input"
    for i in range(m.length):
        if m.kind in ("conv", "pwconv", "dwconv"):
            kk = 1 if m.kind == "pwconv" else k
            cur = g.conv(cur, C, C, kk, group=C if m.kind == "dwconv" else 1)
        elif m.kind == "gconv":  # grouped conv, ``expand`` groups
            cur = g.conv(cur, C, C, k, group=t)
        elif m.kind == "stem":
            cur = g.conv(cur, 3, C, k, stride=2)
        elif m.kind == "gemm":
            w, b = g.init(_he(g.rng, (C, C), C)), g.init(np.zeros(C, np.float32))
            cur = g.node("Gemm", [cur, w, b], transB=1)
        elif m.kind == "add":  # residual-style: both inputs are activations
            cur = g.node("Add", [cur, "input"])
        elif m.kind == "mul":  # squeeze-excite style: broadcast over H, W
            cur = g.node("Mul", [cur, g.init(g.rng.uniform(0.5, 1.0, (1, C, 1, 1)).astype(np.float32))])
        elif m.kind == "sigmoid":
            cur = g.node("Sigmoid", [cur])
        elif m.kind == "silu":
            cur = g.node("Mul", [cur, g.node("Sigmoid", [cur])])
        elif m.kind == "maxpool":
            cur = g.node("MaxPool", [cur], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        elif m.kind == "avgpool":
            cur = g.node("AveragePool", [cur], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
        elif m.kind == "reshape":
            s1, s2 = g.init(np.array([1, C, H * H], np.int64)), g.init(np.array([1, C, H, H], np.int64))
            cur = g.node("Reshape", [g.node("Relu", [g.node("Reshape", [cur, s1])]), s2])
        elif m.kind == "qdq":  # stand-alone Q/DQ around an op ORT has no int8 kernel for
            sc, zp = g.init(np.array(0.02, np.float32)), g.init(np.array(128, np.uint8))
            q = g.node("QuantizeLinear", [cur, sc, zp])
            cur = g.node("HardSigmoid", [g.node("DequantizeLinear", [q, sc, zp])])
        elif m.kind == "mbblock":  # inverted residual: expand, depthwise, project, add
            h = g.conv(cur, C, C * t, 1, act="Relu6")
            h = g.conv(h, C * t, C * t, k, group=C * t, act="Relu6")
            cur = g.node("Add", [g.conv(h, C * t, C, 1, act=None), cur])
        elif m.kind == "mbdown":  # the stride-2 inverted residual that opens a stage
            h = g.conv(cur, C, C * t, 1, act="Relu6")
            h = g.conv(h, C * t, C * t, k, stride=2, group=C * t, act="Relu6")
            cur = g.conv(h, C * t, 2 * C, 1, act=None)
        elif m.kind == "pwpair":  # expand then project, the 1x1 shapes of inverted residuals
            cur = g.conv(g.conv(cur, C, C * t, 1), C * t, C, 1, act=None)
        elif m.kind == "hswish":
            cur = g.conv(cur, C, C, 1, act="HardSwish")
        elif m.kind == "se":  # x * hardsigmoid(fc2(relu(fc1(avgpool(x)))))
            s = g.node("GlobalAveragePool", [cur])
            s = g.conv(g.conv(s, C, max(8, C // 4), 1), max(8, C // 4), C, 1, act="HardSigmoid")
            cur = g.node("Mul", [cur, s])
        elif m.kind == "fire":  # squeeze C -> C/8, expand to C/2 (1x1) + C/2 (3x3), concat
            sq = g.conv(cur, C, C // 8, 1)
            cur = g.node("Concat", [g.conv(sq, C // 8, C // 2, 1), g.conv(sq, C // 8, C // 2, 3)], axis=1)
        elif m.kind == "shuffle":  # ShuffleNetV2 unit: split, branch (pw, dw, pw), concat, channel shuffle
            half = C // 2
            a, b = g.node("Split", [cur, g.init(np.array([half, half], np.int64))], n_out=2, axis=1)
            b = g.conv(g.conv(g.conv(b, half, half, 1), half, half, 3, group=half, act=None), half, half, 1)
            y = g.node("Concat", [a, b], axis=1)
            y = g.node("Reshape", [y, g.init(np.array([1, 2, half, H, H], np.int64))])
            y = g.node("Transpose", [y], perm=[0, 2, 1, 3, 4])
            cur = g.node("Reshape", [y, g.init(np.array([1, C, H, H], np.int64))])
        elif m.kind == "head":  # last 1x1 conv, global pool, classifier
            y = g.node("GlobalAveragePool", [g.conv(cur, C, 2 * C, 1)])
            y = g.node("Flatten", [y], axis=1)
            w, b = g.init(_he(g.rng, (10, 2 * C), 2 * C)), g.init(np.zeros(10, np.float32))
            cur = g.node("Gemm", [y, w, b], transB=1)
        else:
            raise ValueError(f"unknown micro-benchmark kind {m.kind}")
    g.nodes[-1].output[0] = "output"
    graph = helper.make_graph(g.nodes, m.name, [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                              m.input_shape)],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


# kind: [(channels, size, kernel, expand), ...] -- sizes mobile CNNs reach at a 64x64 input
SUITE = {
    "conv": [(16, 32, 3, 1), (32, 16, 3, 1), (64, 8, 3, 1), (128, 8, 3, 1), (24, 32, 3, 1)],
    "pwconv": [(16, 32, 1, 1), (32, 32, 1, 1), (64, 16, 1, 1), (96, 16, 1, 1), (144, 8, 1, 1), (256, 8, 1, 1),
               (480, 4, 1, 1), (960, 2, 1, 1), (58, 16, 1, 1), (8, 32, 1, 1), (24, 16, 1, 1), (72, 8, 1, 1),
               (120, 8, 1, 1), (30, 16, 1, 1)],
    "pwpair": [(8, 32, 1, 3), (16, 16, 1, 6), (24, 16, 1, 3), (40, 8, 1, 6), (80, 4, 1, 6), (160, 2, 1, 6)],
    "dwconv": [(32, 32, 3, 1), (96, 16, 3, 1), (144, 16, 3, 1), (240, 8, 5, 1), (480, 4, 3, 1), (960, 2, 3, 1),
               (116, 8, 3, 1), (16, 32, 3, 1), (24, 16, 3, 1), (48, 8, 5, 1), (58, 16, 3, 1), (72, 8, 3, 1),
               (120, 8, 5, 1), (30, 8, 3, 1), (232, 4, 3, 1)],
    "gconv": [(48, 16, 1, 3), (96, 8, 1, 4), (240, 8, 1, 3), (64, 16, 1, 2), (256, 4, 1, 8), (128, 8, 3, 4),
              (480, 4, 1, 3)],
    "gemm": [(128, 1, 1, 1), (512, 1, 1, 1), (1280, 1, 1, 1)],
    "add": [(16, 32, 1, 1), (64, 16, 1, 1), (256, 8, 1, 1), (1024, 2, 1, 1)],
    "mul": [(32, 32, 1, 1), (144, 16, 1, 1), (480, 4, 1, 1)],
    "sigmoid": [(16, 32, 1, 1), (96, 16, 1, 1), (480, 4, 1, 1)],
    "silu": [(32, 32, 1, 1), (144, 16, 1, 1), (480, 4, 1, 1)],
    "maxpool": [(24, 32, 3, 1), (64, 16, 3, 1), (256, 4, 3, 1)],
    "avgpool": [(24, 32, 3, 1), (64, 16, 3, 1)],
    "reshape": [(64, 16, 1, 1), (256, 4, 1, 1)],
    "qdq": [(32, 32, 1, 1), (96, 16, 1, 1), (480, 4, 1, 1)],
    "stem": [(16, 64, 3, 1), (24, 64, 3, 1), (32, 64, 3, 1), (64, 64, 3, 1), (96, 64, 7, 1)],
    "mbblock": [(16, 32, 3, 6), (24, 16, 3, 6), (40, 8, 5, 6), (80, 4, 3, 6), (112, 4, 5, 6), (160, 2, 3, 6),
                (24, 16, 3, 3), (8, 32, 3, 3), (16, 16, 5, 3), (48, 4, 3, 3)],
    "mbdown": [(16, 32, 3, 6), (24, 16, 5, 6), (40, 8, 3, 6), (80, 4, 3, 6)],
    "hswish": [(16, 32, 1, 1), (96, 8, 1, 1), (576, 2, 1, 1)],
    "se": [(72, 16, 1, 1), (120, 8, 1, 1), (480, 4, 1, 1), (960, 2, 1, 1)],
    "fire": [(128, 16, 1, 1), (256, 8, 1, 1), (512, 4, 1, 1)],
    "shuffle": [(48, 16, 1, 1), (116, 8, 1, 1), (232, 4, 1, 1), (464, 2, 1, 1)],
    "head": [(320, 2, 1, 1), (576, 2, 1, 1)],
    "net": [(seed, 0, 0, 0) for seed in range(16)],  # channels = the RandomNet's seed (it draws its own size)
}
SINGLE = {"stem", "mbdown", "head", "net"}  # no second length: the unit does not chain
FP32_ONLY = {"silu"}  # (its int8 form is sigmoid + mul, timed by those)


def micro_suite(quick: bool = False, kinds: Optional[Sequence[str]] = None) -> List[Tuple[Micro, Tuple[str, ...]]]:
    """(micro-benchmark, precisions) pairs; two chain lengths per size separate per-op from fixed costs."""
    lengths = (1, 3) if quick else (1, 4)
    unknown = set(kinds or ()) - set(SUITE)
    if unknown:
        raise EdgekitError(f"Unknown micro-benchmark kind(s) {', '.join(sorted(unknown))}; known: {', '.join(SUITE)}")
    suite = []
    for kind, sizes in SUITE.items():
        if kinds and kind not in kinds:
            continue
        for c, s, k, e in (sizes[::2] if quick else sizes):
            precs = ("fp32",) if kind in FP32_ONLY else (("int8",) if kind == "qdq" else ("fp32", "int8"))
            for n in (lengths[:1] if kind in SINGLE else lengths):
                suite.append((Micro(kind, c, s, k, n, e), precs))
    return suite


def write_micro(m: Micro, path: Path) -> Tuple[Path, Tuple[int, ...]]:
    """The fp32 ONNX file of a micro-benchmark, written to ``path``, and its input shape."""
    import onnx

    if m.kind == "net":
        from .synthetic import export_random_net

        return export_random_net(m.channels, path)
    onnx.save(build_micro(m), str(path))
    return Path(path), tuple(m.input_shape)
