"""Fit a device's latency-model coefficients from micro-benchmarks run on this machine.

``calibrate_local`` builds small synthetic ONNX graphs (chains of one operator kind: dense conv,
1x1 conv, depthwise conv, gemm, elementwise add, activations, pooling, copies, reshapes and stand-alone
Q/DQ), each at a few sizes and two chain lengths, fp32 and int8 (quantized with edgekit's own
quantizer, so the QDQ patterns are the ones real models get), times them with ONNX Runtime, and fits
the coefficients of ``edgekit.profiling.estimate`` by least squares on relative error:

    measured(graph) ~= session_overhead + sum over the graph's ops of
                       overhead[cat] + max(work / (peak * efficiency[cat]), bytes / bandwidth)

The prediction for a micro-benchmark is computed by the estimator itself (same graph analysis), so
the fitted numbers mean exactly what the estimator uses. The result is written into a device YAML
(the ``latency_model:`` block; the rest of the file is kept as it is).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..config import DeviceProfile, LatencyModel, load_device
from ..errors import EdgekitError
from .estimate import _speedup, analyze_for, cost_ops

OPSET = 17


# ----------------------------------------------------------------------------- micro-benchmark graphs


@dataclass(frozen=True)
class Micro:
    """One synthetic graph: ``length`` repetitions of a unit of ``kind`` on a [1, C, H, H] (or [1, C]) input.

    Units are single operators (conv, pwconv, dwconv, gemm, add, mul, sigmoid, silu, maxpool, avgpool,
    reshape, qdq) and the building blocks of mobile CNNs, so that every coefficient is also seen in the
    context networks give it: stem (3->C conv, stride 2), mbblock (inverted residual), mbdown (its stride-2
    form), se (squeeze-excite), hswish (conv + HardSwish), fire (SqueezeNet), shuffle (ShuffleNetV2 unit),
    head (pool + classifier).
    """

    kind: str
    channels: int
    size: int = 1
    kernel: int = 3
    length: int = 1
    expand: int = 1

    @property
    def name(self) -> str:
        return f"{self.kind}-c{self.channels}-s{self.size}-k{self.kernel}-e{self.expand}-n{self.length}"

    @property
    def input_shape(self) -> List[int]:
        if self.kind == "gemm":
            return [1, self.channels]
        if self.kind in ("stem", "net"):
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


def _random_net(g: "_GraphBuilder", x: str, seed: int) -> str:
    """A synthetic network in the style of the zoo (64x64 input): every op sits in realistic context,
    with cold caches between different layers, which chains of one op do not show."""
    r = np.random.default_rng(seed)
    pick = lambda seq: seq[int(r.integers(len(seq)))]  # noqa: E731
    C = pick([8, 16, 24, 32])
    x = g.conv(x, 3, C, 3, stride=2, act=pick(["Relu", "Relu6", "HardSwish"]))
    H = 32
    for stage in range(4):
        cout = min((40, 80, 160, 320)[stage], max(8, int(C * pick([1.5, 2, 2.5])) // 8 * 8))
        for j in range(int(r.integers(1, 4))):
            kind = pick(["mb", "mb", "mbse", "fire", "shuffle", "dwsep", "gshuffle"])
            stride = 2 if j == 0 else 1
            act = pick(["Relu", "Relu6", "HardSwish"])
            if kind in ("mb", "mbse"):
                t, k = min(pick([1, 3, 4, 6]), max(1, 960 // C)), pick([3, 5])
                h = g.conv(x, C, C * t, 1, act=act) if t > 1 else x
                h = g.conv(h, C * t, C * t, k, stride=stride, group=C * t, act=act)
                if kind == "mbse":
                    s = g.node("GlobalAveragePool", [h])
                    s = g.conv(g.conv(s, C * t, max(8, C * t // 4), 1), max(8, C * t // 4), C * t, 1,
                               act=pick(["HardSigmoid", "Sigmoid"]))
                    h = g.node("Mul", [h, s])
                out_c = cout if stride == 2 or j == 0 else C
                h = g.conv(h, C * t, out_c, 1, act=None)
                x = g.node("Add", [h, x]) if stride == 1 and out_c == C else h
                C = out_c
            elif kind == "dwsep":
                h = g.conv(x, C, C, 3, stride=stride, group=C, act=act)
                x, C = g.conv(h, C, cout, 1, act=act), cout
            elif kind == "gshuffle" and stride == 1 and C % 8 == 0:  # ShuffleNetV1 unit: grouped 1x1 convs
                grp = pick([2, 4, 8])
                h = g.conv(x, C, C, 1, group=grp, act=act)
                h = g.node("Reshape", [h, g.init(np.array([1, grp, C // grp, H, H], np.int64))])
                h = g.node("Reshape", [g.node("Transpose", [h], perm=[0, 2, 1, 3, 4]),
                                       g.init(np.array([1, C, H, H], np.int64))])
                h = g.conv(g.conv(h, C, C, 3, group=C, act=None), C, C, 1, group=grp, act=None)
                x = g.node("Add", [h, x])
            elif kind == "fire" and stride == 1:
                sq = g.conv(x, C, max(8, C // 8), 1)
                e = C // 2
                x = g.node("Concat", [g.conv(sq, max(8, C // 8), e, 1), g.conv(sq, max(8, C // 8), C - e, 3)], axis=1)
            else:  # shuffle unit (or a strided conv where a fire module cannot downsample)
                if stride == 2 or C % 2:
                    h = g.conv(x, C, C, 3, stride=stride, group=C, act=None)
                    x, C = g.conv(h, C, cout, 1, act=act), cout
                    H //= stride
                    continue
                half = C // 2
                a, b = g.node("Split", [x, g.init(np.array([half, half], np.int64))], n_out=2, axis=1)
                b = g.conv(g.conv(g.conv(b, half, half, 1), half, half, 3, group=half, act=None), half, half, 1)
                y = g.node("Reshape", [g.node("Concat", [a, b], axis=1),
                                       g.init(np.array([1, 2, half, H, H], np.int64))])
                y = g.node("Transpose", [y], perm=[0, 2, 1, 3, 4])
                x = g.node("Reshape", [y, g.init(np.array([1, C, H, H], np.int64))])
            if stride == 2:
                H //= 2
    feats = pick([512, 768, 1024])
    y = g.node("GlobalAveragePool", [g.conv(x, C, feats, 1, act=pick(["Relu", "HardSwish"]))])
    y = g.node("Flatten", [y], axis=1)
    w, b = g.init(_he(g.rng, (10, feats), feats)), g.init(np.zeros(10, np.float32))
    return g.node("Gemm", [y, w, b], transB=1)


def build_micro(m: Micro, seed: int = 0):
    """The fp32 ONNX graph of a micro-benchmark."""
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
        elif m.kind == "net":  # a random mobile network: stem, mixed blocks over 4 stages, head
            cur = _random_net(g, cur, seed=m.channels)
            break
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
    "net": [(seed, 64, 1, 1) for seed in range(16)],  # (channels = the random network's seed)
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


# ----------------------------------------------------------------------------- measuring


def _session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_onnx(path: Path, threads: int, warmup: int = 5, runs: int = 50) -> float:
    """p50 latency in ms of one ORT session on a random input (the way the runners measure)."""
    sess = _session(path, threads)
    inp = sess.get_inputs()[0]
    x = np.random.default_rng(1).standard_normal([d if isinstance(d, int) else 1 for d in inp.shape]) \
        .astype(np.float32)
    feed = {inp.name: x}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(times, 50))


def _quantize(fp32: Path, out: Path, shape, device: DeviceProfile) -> Path:
    from ..compress.quantize import OrtQuantConfig, quantize_onnx
    q = device.quantization
    cfg = OrtQuantConfig(activation_type=q.activation_type, weight_type=q.weight_type, per_channel=q.per_channel)
    calib = np.random.default_rng(2).standard_normal((4, *shape[1:])).astype(np.float32)
    return quantize_onnx(fp32, out, calib, cfg)


# ----------------------------------------------------------------------------- fitting


@dataclass
class Sample:
    name: str
    kind: str
    precision: str
    ops: list  # OpCost of the graph (no times yet)
    measured_ms: float


WORKLESS = ("data", "reshape", "layout")  # memory / overhead only: no efficiency coefficient
DEPTH_CATEGORIES = ("conv", "pwconv", "dwconv", "gconv", "gemm", "conv_nchw", "pwconv_nchw", "dwconv_nchw",
                    "gconv_nchw", "conv_tail", "pwconv_tail", "dwconv_tail")


def _param_keys(samples: Sequence[Sample]) -> Tuple[List[str], List[str], List[str]]:
    """(efficiency keys, overhead keys, depth keys) that the samples can identify."""
    keys = sorted({f"{o.category}.{o.precision}" for s in samples for o in s.ops})
    eff = [k for k in keys if k.split(".")[0] not in WORKLESS]
    return eff, keys, [k for k in eff if k.split(".")[0] in DEPTH_CATEGORIES]


def _predict(samples, device, threads, lm) -> np.ndarray:
    out = []
    for s in samples:
        ops = cost_ops([replace(o) for o in s.ops], device, threads, lm)
        out.append((lm.session_overhead_us + sum(o.time_us for o in ops)) / 1e3)
    return np.array(out)


def _lm_from_vector(theta, keys, base: LatencyModel, threads: int) -> LatencyModel:
    eff_keys, ovh_keys, depth_keys = keys
    ne, no, nd = len(eff_keys), len(ovh_keys), len(depth_keys)
    eff = {k: float(np.exp(v)) for k, v in zip(eff_keys, theta[:ne])}
    ovh = {k: float(np.exp(v)) for k, v in zip(ovh_keys, theta[ne:ne + no])}
    half = {k: float(np.exp(v)) for k, v in zip(depth_keys, theta[ne + no:ne + no + nd])}
    whalf = {k: float(np.exp(v)) for k, v in zip(depth_keys, theta[ne + no + nd:ne + no + 2 * nd])}
    rest = theta[ne + no + 2 * nd:]
    # (model_copy skips validation: cheap inside the fit; the bounds keep values valid)
    return base.model_copy(update={
        "efficiency": eff, "overhead_us": ovh, "depth_half": half, "width_half": whalf,
        "session_overhead_us": float(np.exp(rest[0])),
        "cache_bandwidth_gbs": float(np.exp(rest[1])), "memory_bandwidth_gbs": float(np.exp(rest[2])),
        "threads": threads})


class _Design:
    """The micro-benchmarks' ops as flat arrays, so one evaluation of the model over all of them is a few
    numpy operations (the least-squares fit evaluates it thousands of times). Mirrors ``cost_ops``."""

    def __init__(self, samples: Sequence[Sample], keys, device: DeviceProfile, cache_bytes: float):
        eff_keys, ovh_keys, depth_keys = keys
        e_ix = {k: i for i, k in enumerate(eff_keys)}
        o_ix = {k: i for i, k in enumerate(ovh_keys)}
        d_ix = {k: i for i, k in enumerate(depth_keys)}
        rows = []
        for si, s in enumerate(samples):
            fits = sum(o.weight_bytes for o in s.ops) <= cache_bytes
            for o in s.ops:
                key = f"{o.category}.{o.precision}"
                peak = device.peak_gops.get(o.precision) or device.peak_gops.get("fp32")
                rows.append((si, e_ix.get(key, -1), o_ix[key], d_ix.get(key, -1), o.work, o.depth, o.width,
                             o.bytes - o.weight_bytes, o.weight_bytes, peak, fits))
        a = np.array(rows, dtype=float).reshape(-1, 11)
        self.sample = a[:, 0].astype(int)
        self.e, self.o, self.d = a[:, 1].astype(int), a[:, 2].astype(int), a[:, 3].astype(int)
        self.work, self.depth, self.width, self.act, self.wb, self.peak = (a[:, i] for i in range(4, 10))
        self.fits = a[:, 10] > 0
        self.act_in_cache = self.act <= cache_bytes
        self.n = len(samples)

    def predict_ms(self, lm: LatencyModel, keys) -> np.ndarray:
        eff_keys, ovh_keys, depth_keys = keys
        eff = np.array([lm.efficiency[k] for k in eff_keys] + [1.0])[self.e]
        ovh = np.array([lm.overhead_us[k] for k in ovh_keys])[self.o]
        half = np.array([lm.depth_half.get(k, 0.0) for k in depth_keys] + [0.0])[self.d]
        whalf = np.array([lm.width_half.get(k, 0.0) for k in depth_keys] + [0.0])[self.d]
        f = eff * np.where((half > 0) & (self.depth > 0), self.depth / (self.depth + half + 1e-30), 1.0)
        f = f * np.where((whalf > 0) & (self.width > 0), self.width / (self.width + whalf + 1e-30), 1.0)
        compute = np.where((self.e >= 0) & (self.work > 0), self.work / (self.peak * 1e3 * f), 0.0)
        mem_bw = lm.memory_bandwidth_gbs or lm.cache_bandwidth_gbs
        memory = self.act / (np.where(self.act_in_cache, lm.cache_bandwidth_gbs, mem_bw) * 1e3) + \
            self.wb / (np.where(self.fits, lm.cache_bandwidth_gbs, mem_bw) * 1e3)
        per_op = ovh + np.maximum(compute, memory)
        return (lm.session_overhead_us + np.bincount(self.sample, per_op, minlength=self.n)) / 1e3


def fit_coefficients(samples: Sequence[Sample], device: DeviceProfile, threads: int,
                     base: Optional[LatencyModel] = None) -> LatencyModel:
    """Least squares on relative error over all micro-benchmarks (log-parameters keep everything positive)."""
    from scipy.optimize import least_squares

    base = base or LatencyModel()
    keys = _param_keys(samples)
    eff_keys, ovh_keys, depth_keys = keys
    design = _Design(samples, keys, device, base.cache_kb * 1024.0)
    measured = np.array([s.measured_ms for s in samples])
    n_e, n_o, n_d = len(eff_keys), len(ovh_keys), len(depth_keys)
    x0 = np.log(np.concatenate([[0.5 if k.split(".")[0] in DEPTH_CATEGORIES else 0.05 for k in eff_keys],
                                [3.0] * n_o, [16.0] * n_d, [4.0] * n_d,
                                [15.0, base.cache_bandwidth_gbs, device.memory_bandwidth_gbs or 20.0]]))
    lo = np.log(np.concatenate([[1e-4] * n_e, [0.01] * n_o, [0.1] * n_d, [0.1] * n_d, [0.5, 1.0, 0.5]]))
    # MAC efficiencies are fractions of the (measured) peak; element-wise rates relative to it may exceed 1
    hi = np.log(np.concatenate([[1.0 if k.split(".")[0] in DEPTH_CATEGORIES else 50.0 for k in eff_keys],
                                [500.0] * n_o, [4096.0] * n_d, [4096.0] * n_d, [2000.0, 5000.0, 2000.0]]))
    # The random networks carry the context single-op chains lack (cold caches between different layers);
    # weight them so that they count as much as all the chains together.
    nets = np.array([s.kind == "net" for s in samples])
    weight = np.where(nets, np.sqrt(max(1, (~nets).sum()) / max(1, nets.sum())), 1.0)

    def residuals(theta):
        lm = _lm_from_vector(theta, keys, base, threads)
        return weight * (design.predict_ms(lm, keys) - measured) / measured

    res = least_squares(residuals, np.clip(x0, lo + 1e-9, hi - 1e-9), bounds=(lo, hi), diff_step=1e-4,
                        max_nfev=3000)
    return _lm_from_vector(res.x, keys, base, threads)


PEAK_KINDS = ("conv", "pwconv", "pwpair", "mbblock", "fire")  # compute-heavy micro-benchmarks


def measured_peaks(samples: Sequence[Sample], headroom: float = 1.25) -> Dict[str, float]:
    """Per precision: the best MAC rate any compute-heavy micro-benchmark reached (GMAC/s, with fixed costs
    included) times ``headroom`` -- the peak that MAC efficiencies are fractions of. Measured every time,
    so recalibrating does not compound."""
    best: Dict[str, float] = {}
    for s in samples:
        if s.kind in PEAK_KINDS and s.measured_ms > 0:
            rate = sum(o.macs for o in s.ops) / (s.measured_ms * 1e6)
            best[s.precision] = max(best.get(s.precision, 0.0), rate)
    return {p: _round_sig(r * headroom) for p, r in best.items()}


# ----------------------------------------------------------------------------- writing the YAML


def _round_sig(x: float, sig: int = 3) -> float:
    return float(f"{x:.{sig}g}")


def latency_model_yaml(lm: LatencyModel) -> str:
    import yaml

    data = lm.model_dump()
    data["efficiency"] = {k: _round_sig(v) for k, v in sorted(data["efficiency"].items())}
    data["overhead_us"] = {k: _round_sig(v) for k, v in sorted(data["overhead_us"].items())}
    data["depth_half"] = {k: _round_sig(v) for k, v in sorted(data["depth_half"].items())}
    data["width_half"] = {k: _round_sig(v) for k, v in sorted(data["width_half"].items())}
    if data.get("memory_bandwidth_gbs"):
        data["memory_bandwidth_gbs"] = _round_sig(data["memory_bandwidth_gbs"])
    for k in ("session_overhead_us", "cache_bandwidth_gbs", "default_overhead_us"):
        data[k] = _round_sig(data[k])
    text = yaml.safe_dump({"latency_model": data}, sort_keys=False, default_flow_style=False, width=120)
    return "# per-operator latency model (edgekit.profiling.estimate), fitted by edgekit.profiling.calibrate\n" + text


def write_latency_model(path: Path, lm: LatencyModel) -> None:
    """Replace (or append) the top-level ``latency_model:`` block of a device YAML, keeping the rest as it is."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    out, skip = [], False
    for line in lines:
        if re.match(r"^latency_model\s*:", line) or line.startswith("# per-operator latency model"):
            skip = True
            continue
        if skip and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skip = False
        out.append(line)
    while out and not out[-1].strip():
        out.pop()
    text = "\n".join(out) + ("\n" if out else "") + latency_model_yaml(lm)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ----------------------------------------------------------------------------- entry point


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibrate_local(device: str | DeviceProfile = "desktop-cpu", out: Optional[str | Path] = None,
                    threads: Optional[int] = None, quick: bool = False, runs: int = 100,
                    write: bool = True, workdir: Optional[str | Path] = None,
                    kinds: Optional[Sequence[str]] = None) -> dict:
    """Time the micro-benchmarks here, fit the device's latency model and (``write``) save it into a YAML.

    ``out``: the YAML to update; default: the device's own file (built-in profiles are package files).
    ``kinds``: a subset of the micro-benchmark kinds (``SUITE``); ``quick``: every other size, shorter chains.
    Returns {"latency_model", "samples": [{name, precision, measured_ms, predicted_ms, error}], "path", ...}.
    """
    import onnx

    from ..config import _resolve

    dev_path = _resolve("devices", device) if isinstance(device, str) else None
    dev = load_device(device) if isinstance(device, str) else device
    if not dev.local:
        raise EdgekitError(f"calibrate_local measures this machine; device {dev.name} is not local: true")
    threads = int(threads or dev.resolved_threads())
    lm0 = dev.latency_model.model_copy(update={**host_layout(threads), "threads": threads})
    samples: List[Sample] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgekit-cal-", dir=workdir) as tmp:
        tmp = Path(tmp)
        for micro, precisions in micro_suite(quick, kinds):
            fp32 = tmp / f"{micro.name}.fp32.onnx"
            model = build_micro(micro)
            onnx.save(model, str(fp32))
            for prec in precisions:
                path = fp32
                if prec == "int8" and micro.kind != "qdq":
                    path = _quantize(fp32, tmp / f"{micro.name}.int8.onnx", micro.input_shape, dev)
                ops = analyze_for(path, lm0)
                ms = time_onnx(path, threads, runs=runs)
                samples.append(Sample(f"{micro.name}.{prec}", micro.kind, prec, ops, ms))
    measure_s = time.perf_counter() - t0
    peaks = {**dev.peak_gops, **measured_peaks(samples)}
    # peak_gops is "all cores": a rate measured on fewer threads scales up by the same speed-up model
    scale = _speedup(dev.cores, dev.cores, lm0.parallel_efficiency) / _speedup(threads, dev.cores,
                                                                               lm0.parallel_efficiency)
    peaks = {p: _round_sig(v * scale) if p in measured_peaks(samples) else v for p, v in peaks.items()}
    dev = dev.model_copy(update={"peak_gops": peaks})
    lm = fit_coefficients(samples, dev, threads, lm0)
    lm = lm.model_copy(update={"calibration": {
        "host": cpu_name(), "machine": platform.machine(), "threads": threads,
        "onnxruntime": _ort_version(), "date": _dt.date.today().isoformat(), "micro_benchmarks": len(samples),
        "quick": quick, "peak_gops": "measured: best micro-benchmark MAC rate x 1.25, scaled to all cores"}})
    pred = _predict(samples, dev, threads, lm)
    rows = [{"name": s.name, "kind": s.kind, "precision": s.precision, "measured_ms": s.measured_ms,
             "predicted_ms": float(p), "error": float(p / s.measured_ms - 1)} for s, p in zip(samples, pred)]
    errs = np.abs([r["error"] for r in rows])
    lm.calibration.update({"micro_median_abs_error": _round_sig(float(np.median(errs)), 2),
                           "micro_within_15pct": _round_sig(float(np.mean(errs <= 0.15)), 2)})
    path = Path(out) if out else dev_path
    if write:
        if path is None:
            raise EdgekitError("calibrate_local: give out=PATH to write a profile that was passed as an object")
        _write_peaks(path, dev.peak_gops)
        write_latency_model(path, lm)
    return {"device": dev.name, "threads": threads, "latency_model": lm, "peak_gops": dict(dev.peak_gops),
            "samples": rows, "path": str(path) if write else None, "measure_s": measure_s,
            "median_abs_error": float(np.median(errs)), "within_15pct": float(np.mean(errs <= 0.15))}


def _cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _l2_kb_per_core() -> Optional[float]:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        try:
            if (idx / "level").read_text().strip() == "2":
                size = (idx / "size").read_text().strip().upper()
                return float(size[:-1]) * (1024 if size.endswith("M") else 1) if size[-1] in "KM" else float(size)
        except (OSError, ValueError):
            continue
    return None


def host_layout(threads: int) -> dict:
    """What ONNX Runtime does on this CPU: NCHWc block (x86: 16 with AVX-512, 8 with AVX2), int8 channel
    alignment, and the cache the threads share (L2 per core x threads)."""
    flags = _cpu_flags()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    block = (16 if "avx512f" in flags else 8 if ("avx2" in flags or "avx" in flags) else 0) if x86 else 0
    out = {"channel_block": block, "int8_channel_align": 16 if x86 else 0}
    l2 = _l2_kb_per_core()
    if l2:
        out["cache_kb"] = l2 * max(1, min(threads, os.cpu_count() or 1))
    return out


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def _write_peaks(path: Path, peaks: Dict[str, float]) -> None:
    text = Path(path).read_text()
    flow = "{" + ", ".join(f"{k}: {_round_sig(v)}" for k, v in peaks.items()) + "}"
    line = f"peak_gops: {flow}   # giga-MACs/s, all cores; measured by edgekit.profiling.calibrate"
    if re.search(r"^peak_gops\s*:", text, flags=re.M):
        text = re.sub(r"^peak_gops\s*:.*$", line, text, count=1, flags=re.M)
    else:
        text = text.rstrip("\n") + "\n" + line + "\n"
    Path(path).write_text(text)
