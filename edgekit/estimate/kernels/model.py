"""Kernel-level latency regression for ONNX Runtime on this machine (the nn-Meter approach).

A whole-model roofline misses how ONNX Runtime really runs a graph: which operators it fuses, the
NCHWc reorders and NHWC transposes it inserts, and how fast each of its kernels is on a given shape
(an int8 grouped 1x1 convolution with 4 channels per group runs at a small fraction of the rate of a
dense one). So for a *local* ONNX Runtime device the estimate is built the way nn-Meter builds its:

1. **Kernel detection.** ONNX Runtime optimizes the graph (``ORT_ENABLE_ALL``, as a session would) and
   saves it; the nodes of that graph are the kernels that will run. One untimed run on a zero input
   gives ORT's own record of every kernel's tensor shapes (exact under its layout changes).
2. **Per-kernel predictors.** For each kernel type (``nchwc:Conv/dw``, ``ms:QLinearConv/group``,
   ``Transpose.u8``, ...) a ridge regression maps shape features (log sizes, MACs, reduction depth,
   channels, channels per group and their alignment, stride, kernel, groups, fused activation) to the
   log of the kernel's time, and a random forest learns what the line misses from the same features.
   The line makes times scale as power laws of the sizes; a forest alone pulls every prediction
   towards the middle of what it saw (small networks came out too slow, large ones too fast: 62% of
   held-out random networks within 15%, against 73% with the line under it). Convolution types get one
   more feature: the log of an additive cost fit (``fit_cost_prior``: a call per group, MACs, weights,
   activations, each at a non-negative rate), which extrapolates in the group count where the line and
   the forest cannot. ORT's ``ms:FusedConv`` (its Conv with the activation in the same pass) shares the
   ``Conv`` predictor (``predictor_key``). Rare types fall back to
   one gradient-boosted model over all kernels. They
   are trained on per-node times from ONNX Runtime's profiler, on *synthetic* random networks built
   from mobile-CNN blocks (``edgekit.profiling.synthetic``) with random widths, depths, kernel sizes,
   groups and input sizes, fp32 and edgekit's int8; every fourth network is long and narrow (3-8 blocks a
   stage), so graphs of 100-270 kernels of a few µs each are covered. No zoo model is timed to train them.
   Only networks whose weights fit in cache (under the table's ``cold_mb``: a quarter of the L3, 8 MB on a
   32 MB one) train them: they predict a kernel with its weights in cache. (EfficientNetV2-B0's 192 -> 1152
   1x1 convs at 2x2 take 23 µs in small random networks and 50 µs in its 24 MB of weights.)
3. **Sum and overhead.** The profiler's per-node times include its own cost and leave out the
   executor's between kernels, and that cost weighs most on the smallest kernels (a 3 µs kernel is
   mostly profiler). So the kernels are binned by predicted time (< 3, 3-5, 5-10, 10-20, 20-50,
   >= 50 µs) and model latency = a + sum over bins of (b_bin * kernels + c_bin * their predicted µs)
   + sum over kernel categories (e * kernels of that category: ``KERNEL_CATEGORIES``)
   + d * cold MB (``cold_mb()``: the weight MB beyond the cache, which are read from memory every run;
   d is measured by ``cold_probe`` at calibration, fitted where a table has no probe; where the table has the
   probe's cold curve, each MB is weighted by the rate of the size of the kernel holding it, ``cold_column``),
   the rest fitted (least squares on relative error, a light ridge) on the random networks' wall-clock p50
   separately for fp32 and int8 graphs. The fit is *stacked*: it reads each network's kernel times as
   predicted by kernel models that never saw that network (4-fold by network), so it also absorbs what
   the kernel predictions get wrong. Held-out random networks within 15%: 76% with one a + b * kernels
   + c * sum fit on measured kernel times, 87% with four bins; on a 1-thread table timed on an AMD EPYC,
   six bins and the ridge against four bins: fp32 89.4% vs 88.5%, int8 93.9% vs 93.5% (5-fold, mean of
   10 splits). The category counts (data movement, NCHWc reorders, quantize/dequantize, quantized and float
   element-wise, convolutions) let the executor's and the profiler's cost per kernel differ by what a kernel is,
   not only by its predicted time (fitted, not measured per kind; on held-out random networks they change
   little): on the zoo bench's 32 saved runs, the mean share within 15% per run over six random states of the
   fit went from 90.3% to 91.6% (89.3-91.9% to 90.8-92.4%). The fit is done at calibration and stored in the
   table.

The table of training samples (gzip JSON, 0.3-0.5 MB) is shipped per device and thread count
(``latency_model.kernel_tables``); the models are refitted from it when first used (15-20 s for the 44,000
in-cache samples of the 46,000 in the 1-thread desktop-cpu table, on a 2-core x86 host), so
the estimate is reproducible from the table.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import EdgekitError

TABLE_VERSION = 1
CONV_LIKE = {"Conv", "FusedConv", "QLinearConv", "ConvInteger"}
POOL_LIKE = {"MaxPool", "AveragePool", "NhwcMaxPool", "QLinearAveragePool", "LpPool"}
ACTIVATION_CODES = {"": 0, "Relu": 1, "Clip": 2, "HardSigmoid": 3, "Sigmoid": 4, "LeakyRelu": 5, "Tanh": 6}
FEATURES = ("out", "in0", "in_other", "weights", "macs", "depth", "cout", "cin", "spatial", "stride", "kernel",
            "groups", "rank", "activation", "sum_input", "inner", "model_weight_bytes")
MIN_SAMPLES = 6  # a kernel type with fewer calibration samples is reported as unseen (its family carries it)
NORM_PARAMS = {"BatchNormalization", "InstanceNormalization"}
COMMUTATIVE = {"Add", "Mul", "Sum", "Max", "Min", "QLinearAdd", "QLinearMul"}
MIN_NETS_PER_PRECISION = 20  # fewer calibration networks of a precision: the shared overhead fit
AGG_EDGES_US = (3.0, 5.0, 10.0, 20.0, 50.0)  # predicted-time bins of the executor fit
AGG_FOLDS = 4
AGG_RIDGE = 0.01  # a light pull of the executor fit's coefficients to 0 (its rows are relative errors)
FOREST_TREES = 40  # trees per kernel type's residual forest
KERNEL_CATEGORIES = {  # op families counted per network by the executor fit (module docstring, point 3)
    "movement": ("Transpose", "Reshape", "Concat", "QLinearConcat", "Slice", "Gather", "Split", "Flatten"),
    "reorder": ("ReorderInput", "ReorderOutput"),
    "quantize": ("QuantizeLinear", "DequantizeLinear"),
    "quantized_elementwise": ("QLinearAdd", "QLinearMul", "QLinearSigmoid"),
    "elementwise": ("Add", "Mul", "Relu", "Sigmoid", "HardSigmoid", "QuickGelu", "BatchNormalization"),
    "conv": ("Conv", "QLinearConv"),
}
COLD_MB = 8.0  # weights beyond this do not stay in cache between inferences (a table without ``cold_mb``)


@dataclass
class Kernel:
    """One node of the graph ONNX Runtime runs, with the features its predictor reads."""

    name: str
    op: str  # domain-qualified op type, e.g. nchwc:Conv
    key: str  # predictor key: op + conv kind + 8-bit data flag
    desc: Dict[str, int] = field(default_factory=dict)  # raw sizes: see ``features``
    predicted_us: float = 0.0

    @property
    def features(self) -> List[float]:
        return features(self.desc)


LINEAR = ("stride", "rank", "activation", "sum_input")  # small integers, used as they are
CONTEXT = ("model_weight_bytes",)  # recorded, not a feature: one value per network lets the forests memorize networks


def kernel_weights(kernels: Sequence[Kernel]) -> List[float]:
    """Each kernel's weight count (``desc["weights"]``), for ``KernelModel.cold_column``."""
    return [float(k.desc.get("weights", 0)) for k in kernels]


def cold_mb(model_bytes: float, threshold_mb: float) -> float:
    """The executor fit's cache column: the model's weight MB, ramped in from 0 at ``threshold_mb`` to all of
    them at 3x the threshold. A model whose weights outgrow the cache reads them from memory every
    inference, which no kernel timed in a small random network shows."""
    mb = float(model_bytes) / 1e6
    return mb * min(1.0, max(0.0, (mb - threshold_mb) / (2.0 * threshold_mb)))


def _cache_threshold_mb() -> float:
    """A quarter of this CPU's last-level cache (Linux sysfs), else ``COLD_MB``: on a 32 MB L3 shared with
    other tenants, 8 MB of weights is where the zoo's kernels start to run slower than the same shapes in
    small networks (4, 8 and 12 MB tried: 8 fitted both the random networks and the zoo best)."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip().upper()
            kb = int(size.rstrip("KMB")) * (1024 if size.endswith("M") else 1)
            best = max(best, kb)
        except (OSError, ValueError):
            continue
    return best / 1024 / 4 if best >= 4096 else COLD_MB


def _align(n: int) -> float:
    """log2 of the largest power of two (up to 16) dividing n: vector kernels pad or take slow tails
    when channel counts are not multiples of their block (58 channels can run 3x slower than 64)."""
    n = int(n)
    if n <= 0:
        return 0.0
    a = 0
    while a < 4 and n % (2 << a) == 0:
        a += 1
    return float(a)


def features(desc: Dict[str, int]) -> List[float]:
    """The predictor's inputs: log2 of sizes, small integers as they are, channels per group and their
    alignment."""
    base = [float(desc.get(f, 0)) if f in LINEAR else float(np.log2(1 + desc.get(f, 0))) for f in FEATURES
            if f not in CONTEXT]
    g = max(1, int(desc.get("groups", 0) or 1))
    cin_g, cout_g = int(desc.get("cin", 0)) // g, int(desc.get("cout", 0)) // g
    return base + [float(np.log2(1 + cin_g)), float(np.log2(1 + cout_g)), _align(cin_g), _align(cout_g),
                   _align(desc.get("cout", 0))]


# ----------------------------------------------------------------------------- kernel detection


def _canonical(op_type: str, desc: Dict[str, int]) -> Dict[str, int]:
    """Operand order does not change what a commutative kernel costs: the larger input is ``in0``.

    timm's squeeze-excite multiplies ``gate * x`` where the random networks multiply ``x * gate``; with
    the order kept, EfficientNet-B0's 16 SE multiplies were predicted 3.4x too slow. A BatchNorm's four
    per-channel vectors count as weights whether they are initializers or, as ORT's quantizer leaves
    CondenseNet's, DequantizeLinear outputs: counted as other inputs, which no calibration sample has,
    those were predicted 0.1 µs each against 12-15 µs measured."""
    if op_type in COMMUTATIVE and desc.get("in_other", 0) > desc.get("in0", 0):
        desc["in0"], desc["in_other"] = desc["in_other"], desc["in0"]
    if op_type in NORM_PARAMS:  # scale, bias, mean, var: initializers or not, the same per-channel reads
        desc["weights"], desc["in_other"] = desc.get("weights", 0) + desc.get("in_other", 0), 0
    return desc


def _op_name(node) -> str:
    dom = node.domain.replace("com.microsoft.", "").replace("com.microsoft", "ms")
    return f"{dom}:{node.op_type}" if dom else node.op_type


def _numel(shape) -> int:
    if not shape or any(d is None or d <= 0 for d in shape):
        return 0 if shape is None or any(d is None or d <= 0 for d in (shape or ())) else 1
    return int(np.prod(shape))


def _conv_out(x, w, attrs) -> Optional[Tuple[int, ...]]:
    if not x or not w or len(x) < 3:
        return None
    k = list(attrs.get("kernel_shape") or w[2:])
    n = len(k)
    strides = list(attrs.get("strides") or [1] * n)
    pads = list(attrs.get("pads") or [0] * (2 * n))
    dil = list(attrs.get("dilations") or [1] * n)
    sp = []
    for i in range(n):
        if x[2 + i] is None:
            return None
        eff = dil[i] * (k[i] - 1) + 1
        sp.append((x[2 + i] + pads[i] + pads[i + n] - eff) // strides[i] + 1)
    return (x[0], int(w[0]), *sp)


def _shape_dtype(entry) -> Tuple[Optional[Tuple[int, ...]], str]:
    if not entry:
        return None, ""
    (dtype, dims), = entry.items()
    return tuple(int(d) for d in dims), dtype


def _session(path: Path, threads: int, profile_prefix: Optional[str] = None, optimized: Optional[Path] = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if optimized:
        opts.optimized_model_filepath = str(optimized)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT's messages are one line of C++ context
        raise EdgekitError(f"ONNX Runtime cannot load {Path(path).name}: {str(exc).splitlines()[0][:200]}") \
            from None


def _node_events(profile_file: str) -> Dict[str, List[dict]]:
    per: Dict[str, List[dict]] = {}
    for e in json.loads(Path(profile_file).read_text()):
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per.setdefault(e["name"][: -len("_kernel_time")], []).append(e)
    return per


def graph_kernels(model_path, threads: int, runs: int = 0, warmup: int = 10):
    """(kernels ONNX Runtime runs for an ONNX file here, "int8" or "fp32"[, median µs per kernel name]).

    Kernel detection: ONNX Runtime optimizes the graph as a session does (``ORT_ENABLE_ALL``) and saves
    it; its nodes are the kernels, their attributes and constant weights come from that graph. Tensor
    shapes and types come from ORT's node records of one untimed run on a zero input (ORT's own shape
    inference, so its layout changes (NCHWc blocks, NHWC int8) are exact); no time from that run is used.

    ``runs`` > 0 (calibration): the same session then times ``warmup`` + ``runs`` runs on a random input
    and the per-kernel medians are returned too. (It must be the same session: ORT numbers the nodes
    it inserts per session, so names do not carry over to another one.)
    """
    import onnx
    from onnx import helper

    path = Path(model_path)
    with tempfile.TemporaryDirectory(prefix="edgekit-kern-") as tmp:
        opt_path = Path(tmp) / "optimized.onnx"
        sess = _session(path, threads, profile_prefix=str(Path(tmp) / "shapes"), optimized=opt_path)
        try:
            sess.run(None, _feed(sess, zeros=True))
            feed = _feed(sess)
            for _ in range(warmup + runs if runs else 0):
                sess.run(None, feed)
        except Exception as exc:  # noqa: BLE001
            raise EdgekitError(f"ONNX Runtime cannot run {path.name}: {str(exc).splitlines()[0][:200]}") from None
        events = _node_events(sess.end_profiling())
        g = onnx.load(str(opt_path)).graph
    consts = {i.name: tuple(i.dims) for i in g.initializer}
    quantized = any(n.op_type.startswith("QLinear") or n.op_type == "QuantizeLinear" for n in g.node)
    kernels = []
    for node in g.node:
        ev = events.get(node.name)
        if not ev:
            continue  # not run (e.g. a constant ORT folded at load)
        args = ev[0].get("args", {})
        ins = [_shape_dtype(e) for e in args.get("input_type_shape", [])]
        outs = [_shape_dtype(e) for e in args.get("output_type_shape", [])]
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        op = _op_name(node)
        base = node.op_type
        xi = 2 if base == "QLinearConcat" else 0
        x, xdt = ins[xi] if len(ins) > xi else (None, "")
        y = outs[0][0] if outs else None
        w = None
        if base == "QLinearConv" and len(node.input) > 3:
            w = consts.get(node.input[3])
        elif base in CONV_LIKE and len(node.input) > 1:
            w = consts.get(node.input[1])
        weights = sum(_numel(consts[i]) for i in node.input if i in consts)
        others = sum(_numel(s) for i, (s, _) in zip(node.input, ins) if i and i not in consts and s) - _numel(x)
        macs = depth = cout = cin = groups = kernel = stride = 0
        kind = ""
        if base in CONV_LIKE and w and y:
            groups = int(a.get("group", 1))
            cout, cin_g = int(w[0]), int(w[1])
            kernel = int(np.prod(w[2:])) if len(w) > 2 else 1
            cin = cin_g * groups
            depth = cin_g * kernel
            stride = int(max(a.get("strides") or [1]))
            spatial_out = _numel(y) // max(1, y[0] * cout)
            macs = y[0] * cout * spatial_out * depth
            kind = ("dw" if cout == groups else "dwm") if groups > 1 and cin_g == 1 else \
                "group" if groups > 1 else "pw" if kernel == 1 else "dense"  # dwm: depthwise with a multiplier
            if stride > 1:
                kind += "/s2"
        elif base in ("Gemm", "QGemm", "MatMul", "MatMulInteger", "QLinearMatMul") and y:
            w_shape = next((consts[i] for i in node.input[1:] if i in consts and len(consts[i]) == 2), None)
            depth = int(w_shape[1] if a.get("transB") else w_shape[0]) if w_shape else (x[-1] if x else 0)
            cout = int(y[-1])
            macs = _numel(y) * depth
        elif base in POOL_LIKE:
            kernel = int(np.prod(a.get("kernel_shape") or [1]))
            stride = int(max(a.get("strides") or [1]))
        act = a.get("activation", b"")
        act = act.decode() if isinstance(act, bytes) else str(act)
        inner = 0
        if base == "Transpose" and x:
            perm = list(a.get("perm") or range(len(x))[::-1])
            inner = 1
            for i in range(len(perm) - 1, -1, -1):
                if perm[i] != i:
                    break
                inner *= x[i]
        n_out = _numel(y)
        if cout and y:  # conv / gemm: positions per output channel, whatever the layout (ORT's int8 is NHWC)
            spatial = n_out // max(1, y[0] * cout)
        else:
            spatial = int(np.prod(y[2:])) if y and len(y) > 2 else 1
        desc = {"out": n_out, "in0": _numel(x), "in_other": max(0, others), "weights": weights, "macs": macs,
                "depth": depth, "cout": cout, "cin": cin, "spatial": spatial, "stride": stride, "kernel": kernel,
                "groups": groups, "rank": len(x or ()), "activation": ACTIVATION_CODES.get(act, 7),
                "sum_input": int(base == "Conv" and node.domain.endswith("nchwc") and len(node.input) > 3
                                 and bool(node.input[3])), "inner": inner}
        _canonical(base, desc)
        data8 = base not in CONV_LIKE and not base.startswith("Q") and xdt in ("uint8", "int8")
        key = op + (f"/{kind}" if kind else "") + (".u8" if data8 else "")
        kernels.append(Kernel(node.name, op, key, {k: int(v) for k, v in desc.items()}))
    # The cache regime: a kernel whose model's weights all stay in L2 runs faster than the same kernel in a
    # model that streams its weights from L3 or memory every inference.
    model_bytes = sum(k.desc["weights"] * (1 if k.op.split(":")[-1].startswith(("QLinear", "QGemm")) else 4)
                      for k in kernels)
    for k in kernels:
        k.desc["model_weight_bytes"] = int(model_bytes)
    precision = "int8" if quantized else "fp32"
    if not runs:
        return kernels, precision
    times = {k.name: _middle_mean([e["dur"] for e in events[k.name][1 + warmup:]])
             for k in kernels if len(events[k.name]) > 1 + warmup}
    return kernels, precision, times


def _middle_mean(durations_us) -> float:
    """Mean of the runs between the 25th and 75th percentiles: robust like a median, but not stuck on the
    profiler's whole microseconds (most kernels here take 3-12 µs, where one step is 8-30%)."""
    d = np.sort(np.asarray(durations_us, dtype=float))
    lo, hi = len(d) // 4, len(d) - len(d) // 4
    return float(d[lo:hi].mean()) if hi > lo else float(np.median(d))


# ----------------------------------------------------------------------------- measuring kernels


def _feed(sess, zeros: bool = False) -> dict:
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    x = np.zeros(shape, np.float32) if zeros else np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return {inp.name: x}


def wall_p50_ms(path: Path, threads: int, runs: int = 100, warmup: int = 10) -> float:
    from .calibrate import time_onnx

    return time_onnx(path, threads, warmup=warmup, runs=runs)


def cold_rate(points: Sequence[Sequence[float]], threshold_mb: float) -> float:
    """µs per ``cold_mb()`` MB from a weight-streaming probe's (weight MB, µs) points: the per-MB time of the
    points under the threshold is the in-cache rate; the time past it beyond that rate, per cold MB (least
    squares through 0), is the cold rate."""
    pts = np.asarray([p[:2] for p in points], dtype=float)
    mb, us = pts[:, 0], pts[:, 1]
    warm = mb <= threshold_mb
    rate = float(np.median(us[warm] / mb[warm])) if warm.any() else float(us[np.argmin(mb)] / mb.min())
    cold = np.array([cold_mb(m * 1e6, threshold_mb) for m in mb])
    if not (cold > 0).any():
        return 0.0
    return max(0.0, float(np.sum((us - rate * mb) * cold) / np.sum(cold * cold)))


def cold_curve_rate(curve: Sequence[Sequence[float]], kernel_mb) -> np.ndarray:
    """The cold rate (µs per MB) of kernels holding ``kernel_mb`` MB of weights, interpolated in log size along a
    probe's (kernel MB, rate) curve and held at its ends."""
    c = np.asarray(sorted(curve), dtype=float)
    x = np.log2(np.maximum(np.asarray(kernel_mb, dtype=float), 1e-9))
    return np.interp(x, np.log2(c[:, 0]), c[:, 1])


class _Block:
    """``depth`` inverted residual bodies at 2x2 (1x1 conv c -> 6c, 3x3 depthwise, 1x1 conv 6c -> c, no skip): each
    run reads every weight once with next to nothing to compute around it, in kernels of the sizes of a mobile
    CNN's last stages (EfficientNetV2-B0's 192 -> 1152 1x1 convs hold 0.9 MB each)."""

    @staticmethod
    def build(channels: int, depth: int):
        import torch.nn as nn

        mid = 6 * channels
        layers = []
        for _ in range(depth):
            layers += [nn.Conv2d(channels, mid, 1), nn.ReLU(), nn.Conv2d(mid, mid, 3, 1, 1, groups=mid), nn.ReLU(),
                       nn.Conv2d(mid, channels, 1)]
        return nn.Sequential(*layers).eval()

    @staticmethod
    def mb(channels: int) -> float:
        """Weight MB of one body (fp32, biases included)."""
        mid = 6 * channels
        return 4 * (2 * channels * mid + 9 * mid + 2 * mid + channels) / 1e6

    @staticmethod
    def kernel_mb(channels: int) -> float:
        """Weight MB of each of its 1x1 convs, the kernels that hold its weights."""
        return 4 * 6 * channels * channels / 1e6


PROBE_WIDTHS = (64, 128, 256)  # 1x1 convs of 0.1, 0.4 and 1.6 MB


def cold_probe(threads: int, threshold_mb: float, widths: Sequence[int] = PROBE_WIDTHS, rounds: int = 3,
               runs: int = 200) -> dict:
    """Measure what weights past the cache cost here, by the size of the kernels that hold them: for each width,
    stacks of inverted residual bodies at 2x2 (``_Block``) holding 1/4 to 5x the threshold in weights, all timed
    round-robin (``rounds`` p50s each, their median); ``cold_rate`` of each width is one point of the cold curve
    (kernel MB, µs per cold MB). Smaller kernels pay more per MB, each restarting the stream from memory (on a
    2-vCPU AMD EPYC: 62, 33 and 23 µs per cold MB with 0.1, 0.4 and 1.6 MB 1x1 convs). ``cold_us_per_mb`` is the
    rate of the largest. The executor fit uses these instead of fitting them: the few calibration networks past
    the threshold keep their weights in a few large kernels and under-state it (a fitted 5 µs per MB)."""
    import torch

    from ..export.onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="edgekit-cold-") as tmp:
        graphs: Dict[Tuple[int, int], Tuple[Path, List[float]]] = {}
        for c in widths:
            for d in sorted({max(1, int(round(f * threshold_mb / _Block.mb(c)))) for f in (0.25, 0.5, 1, 2, 3, 4, 5)}):
                torch.manual_seed(d)
                graphs[(c, d)] = (export_onnx(_Block.build(c, d), Path(tmp) / f"block{c}x{d}.onnx", (1, c, 2, 2)), [])
        order = list(graphs)
        rng = np.random.default_rng(0)
        for _ in range(rounds):
            rng.shuffle(order)
            for key in order:
                graphs[key][1].append(wall_p50_ms(graphs[key][0], threads, runs=runs, warmup=20) * 1e3)
    points = [[round(d * _Block.mb(c), 3), round(float(np.median(t)), 2), c] for (c, d), (_, t) in sorted(graphs.items())]
    curve = [[round(_Block.kernel_mb(c), 4), round(cold_rate([p for p in points if p[2] == c], threshold_mb), 3)]
             for c in widths]
    return {"cold_us_per_mb": curve[-1][1] if curve else 0.0, "cold_curve": curve, "points": points}


# ----------------------------------------------------------------------------- the regression


class KernelModel:
    """Per-kernel-type ridge line plus a random forest on its residuals, on log(µs); kernel types with
    fewer than ``MIN_SAMPLES`` calibration samples are predicted by one gradient-boosted model over all
    kernels (features + kernel type + op family one-hot, so a rare type borrows from its family); then
    the executor-overhead fit for the graph's precision."""

    def __init__(self, table: dict, seed: int = 0):
        from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
        from sklearn.linear_model import Ridge

        self.table = table
        self.seed = int(seed)  # the forests' and the boosted model's random state (``model_seeds`` in the bench)
        self.cold_mb = float(table.get("cold_mb", COLD_MB))
        self.cold_curve = table.get("cold_curve") if table.get("cold_us_per_mb") else None
        samples = table["kernels"]
        warm = [s for s in samples if s["desc"].get("model_weight_bytes", 0) < self.cold_mb * 1e6]
        if len(warm) >= len(samples) // 2:  # the kernels as they run with their weights in cache
            samples = warm
        self.keys = sorted({predictor_key(s["key"]) for s in samples})
        self.families = sorted({_family(k) for k in self.keys})
        keys = np.array([predictor_key(s["key"]) for s in samples])
        feats = np.array([features(_canonical(_family(s["key"]), dict(s["desc"]))) for s in samples], dtype=float)
        us = np.array([s["us"] for s in samples], dtype=float)
        y = np.log(np.maximum(us, 0.5))
        self.pooled = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, min_samples_leaf=10,
                                                    random_state=self.seed).fit(self._design(keys, feats), y)
        self.forests = {}
        self.counts = {}
        self.priors: Dict[str, np.ndarray] = {}
        for k in self.keys:
            m = keys == k
            self.counts[k] = int(m.sum())
            if m.sum() >= MIN_SAMPLES:
                x = feats[m]
                if _family(k) in CONV_LIKE:
                    rows = [samples[i]["desc"] for i in np.flatnonzero(m)]
                    self.priors[k] = fit_cost_prior(rows, us[m])
                    x = np.hstack([x, _log_prior(rows, self.priors[k])])
                line = Ridge(alpha=1.0).fit(x, y[m])
                rf = None
                if m.sum() >= 2 * MIN_SAMPLES:
                    rf = RandomForestRegressor(n_estimators=FOREST_TREES, min_samples_leaf=2, random_state=self.seed, n_jobs=1)
                    rf.fit(x, y[m] - line.predict(x))
                self.forests[k] = (line, rf)
        self.overhead = table["overhead"]
        agg = table.get("aggregate") or {}
        # an executor fit with category columns (``categories``: they must be today's), or one without (older tables)
        self.agg_categories = "categories" in agg
        n_cat = len(KERNEL_CATEGORIES) if self.agg_categories else 0
        self.aggregate = {p: np.asarray(agg[p], dtype=float) for p in ("fp32", "int8")
                          if p in agg and list(agg.get("edges_us", ())) == list(AGG_EDGES_US)
                          and agg.get("cold_mb") == self.cold_mb and len(agg[p]) == 2 * len(AGG_EDGES_US) + 4 + n_cat
                          and agg.get("categories", list(KERNEL_CATEGORIES)) == list(KERNEL_CATEGORIES)}
        nets = table.get("nets", [])
        self.overhead_by_precision = {p: fit_overhead([r for r in nets if r.get("precision") == p])
                                      for p in ("fp32", "int8")
                                      if sum(r.get("precision") == p for r in nets) >= MIN_NETS_PER_PRECISION}

    def _design(self, keys: Sequence[str], feats: np.ndarray) -> np.ndarray:
        kx = {k: i for i, k in enumerate(self.keys)}
        fx = {f: i for i, f in enumerate(self.families)}
        onehot = np.zeros((len(keys), len(kx) + len(fx)))
        for i, k in enumerate(keys):
            if k in kx:
                onehot[i, kx[k]] = 1.0
            if _family(k) in fx:
                onehot[i, len(kx) + fx[_family(k)]] = 1.0
        return np.hstack([feats.reshape(len(keys), -1), onehot])

    def predict_us(self, kernels: Sequence[Kernel]) -> np.ndarray:
        if not kernels:
            return np.zeros(0)
        keys = [predictor_key(k.key) for k in kernels]
        feats = np.array([k.features for k in kernels], dtype=float)
        out = np.exp(self.pooled.predict(self._design(keys, feats)))
        for key, (line, rf) in self.forests.items():
            m = np.array([k == key for k in keys])
            if m.any():
                x = feats[m]
                if key in self.priors:
                    x = np.hstack([x, _log_prior([kernels[i].desc for i in np.flatnonzero(m)], self.priors[key])])
                out[m] = np.exp(line.predict(x) + (rf.predict(x) if rf is not None else 0.0))
        return out

    def estimate_ms(self, kernels: Sequence[Kernel], precision: Optional[str] = None, kernel_us=None) -> float:
        """Model latency (ms) of a graph's kernels (``graph_kernels``): their predicted times (``kernel_us``, else
        ``predict_us``), then the executor fit."""
        us = self.predict_us(kernels) if kernel_us is None else kernel_us
        return self.total_ms(us, precision, kernels[0].desc.get("model_weight_bytes", 0) if kernels else 0,
                             kernel_weights(kernels), [k.key for k in kernels])

    def trained_on(self, key: str) -> int:
        """Calibration samples behind the predictor of a kernel key."""
        return self.counts.get(predictor_key(key), 0)

    def overhead_for(self, precision: Optional[str] = None) -> dict:
        return self.overhead_by_precision.get(precision or "", self.overhead)

    def cold_column(self, model_bytes: float, kernel_weights: Optional[Sequence[float]] = None) -> float:
        """The executor fit's cache column: ``cold_mb()``, scaled where the table has a cold curve by how the
        model's weights are spread over kernels (the weight-weighted cold rate of its kernels, relative to the
        table's ``cold_us_per_mb``): 8 MB in 0.1 MB 1x1 convs cost more than 8 MB in 2 MB ones."""
        cold = cold_mb(model_bytes, self.cold_mb)
        w = np.asarray(kernel_weights if kernel_weights is not None else [], dtype=float)
        if cold <= 0 or not self.cold_curve or w.sum() <= 0:
            return cold
        kernel_mb = w[w > 0] * (float(model_bytes) / 1e6) / w.sum()
        rate = float(np.sum(kernel_mb * cold_curve_rate(self.cold_curve, kernel_mb)) / kernel_mb.sum())
        return cold * rate / float(self.table["cold_us_per_mb"])

    def total_ms(self, kernel_us: np.ndarray, precision: Optional[str] = None, model_bytes: float = 0,
                 kernel_weights: Optional[Sequence[float]] = None, kernel_keys: Optional[Sequence[str]] = None) -> float:
        """Model latency from predicted kernel times (and the model's weight bytes, each kernel's weight count,
        ``desc["weights"]``, and its key): the table's stacked, binned executor fit for the graph's precision when it
        has one, else a + b * kernels + c * sum. An executor fit with category columns needs ``kernel_keys``."""
        if precision in self.aggregate:
            x = bin_features(kernel_us)
            if self.agg_categories:
                if kernel_keys is None or len(kernel_keys) != len(kernel_us):
                    raise ValueError("this kernel table's executor fit counts kernels by category: pass kernel_keys")
                x = np.append(x, category_counts(kernel_keys))
            x = np.append(x, self.cold_column(model_bytes, kernel_weights))
            ms = float(self.aggregate[precision] @ x) / 1e3
            if ms > 0:
                return ms
        o = self.overhead_for(precision)
        return (o["a_us"] + o["b_us"] * len(kernel_us) + o["c"] * float(np.sum(kernel_us))) / 1e3


def predictor_key(key: str) -> str:
    """The predictor a kernel key is trained with. ORT's ``ms:FusedConv`` is the NCHW ``Conv`` kernel (MLAS) with
    its activation applied in the same pass (the activation is a feature): one predictor serves both, so a
    fused shape borrows the plain ones' samples (ShuffleNet v1's ReLU'd grouped 1x1 convs were 70% over
    with the two apart, having few fused samples of their size)."""
    return "Conv/" + key[len("ms:FusedConv/"):] if key.startswith("ms:FusedConv/") else key


PRIOR_COLUMNS = ("groups", "macs", "weights", "out", "in0", "in_other")


def _prior_design(descs: Sequence[Dict[str, int]]) -> np.ndarray:
    return np.array([[1.0] + [float(d.get(c, 0)) for c in PRIOR_COLUMNS] for d in descs])


def fit_cost_prior(descs: Sequence[Dict[str, int]], us) -> np.ndarray:
    """An additive cost model of a convolution kernel type, µs = c0 + c1 * groups + c2 * MACs + c3 * weights +
    c4 * outputs + c5 * inputs + c6 * other inputs, every c >= 0 (non-negative least squares on relative error).

    Each term is a resource the kernel spends: a call per group (ORT runs a grouped convolution as one GEMM per
    group), arithmetic, weight reads and activation traffic. A sum extrapolates where log-linear lines and forests
    cannot: MicroNet's 1x1 convs in 384-576 groups of 2 channels at 2x2 cost 0.12 µs a group (66 µs), the
    random networks' largest such kernels have 50-360 groups, and the line and forest alone said 26 µs. Its log
    is one more feature of the key's ridge line and forest."""
    from scipy.optimize import nnls

    A = _prior_design(descs)
    y = np.asarray(us, dtype=float)
    scale = np.maximum(A.max(axis=0), 1e-9)
    coef, _ = nnls((A / scale) / y[:, None], np.ones(len(y)))
    return coef / scale


def _log_prior(descs: Sequence[Dict[str, int]], coef: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(_prior_design(descs) @ coef, 0.5))[:, None]


def bin_features(kernel_us) -> np.ndarray:
    """[1, kernels in each predicted-time bin, predicted µs in each bin] (bins: ``AGG_EDGES_US``)."""
    us = np.asarray(kernel_us, dtype=float)
    edges = (0.0, *AGG_EDGES_US, np.inf)
    bins = [(us >= lo) & (us < hi) for lo, hi in zip(edges[:-1], edges[1:])]
    return np.array([1.0] + [float(b.sum()) for b in bins] + [float(us[b].sum()) for b in bins])


def category_counts(keys: Sequence[str]) -> np.ndarray:
    """Kernels of each ``KERNEL_CATEGORIES`` category among ``keys`` (the rest are counted by the bins alone)."""
    fams = [_family(predictor_key(k)) for k in keys]
    return np.array([float(sum(f in members for f in fams)) for members in KERNEL_CATEGORIES.values()])


def _net_spans(table: dict) -> Optional[List[range]]:
    """Each calibration network's run of samples in ``table["kernels"]`` (they are stored net by net)."""
    spans, i = [], 0
    for r in table.get("nets", []):
        n = int(r.get("samples", r.get("kernels", 0)))
        spans.append(range(i, i + n))
        i += n
    return spans if spans and i == len(table["kernels"]) else None


def fit_aggregate(table: dict, folds: int = AGG_FOLDS, seed: int = 0) -> Optional[dict]:
    """The stacked executor fit (module docstring, point 3): per precision, least squares on relative error
    of wall ~ a + sum over bins (b * kernels + c * µs) + sum over ``KERNEL_CATEGORIES`` (e * kernels) + d * cold MB,
    on out-of-fold kernel predictions (kernel models with random state ``seed``). None when the table cannot say which samples belong to which network or
    has too few networks."""
    spans = _net_spans(table)
    nets = table.get("nets", [])
    precisions = [p for p in ("fp32", "int8") if sum(r.get("precision") == p for r in nets) >= MIN_NETS_PER_PRECISION]
    if spans is None or not precisions:
        return None
    fold = np.random.default_rng(0).permutation(len(nets)) % folds
    rows: List[Optional[np.ndarray]] = [None] * len(nets)
    for f in range(folds):
        train = [r for n, r in enumerate(nets) if fold[n] != f]
        sub = {**table, "nets": train, "aggregate": None,
               "kernels": [table["kernels"][j] for n in range(len(nets)) if fold[n] != f for j in spans[n]]}
        km = KernelModel(sub, seed=seed)
        for n in np.flatnonzero(fold == f):
            ks = [Kernel("", "", table["kernels"][j]["key"], table["kernels"][j]["desc"]) for j in spans[n]]
            mbytes = ks[0].desc.get("model_weight_bytes", 0) if ks else 0
            rows[n] = np.concatenate([bin_features(km.predict_us(ks)), category_counts([k.key for k in ks]),
                                      [km.cold_column(mbytes, kernel_weights(ks))]])
    out = {"edges_us": list(AGG_EDGES_US), "folds": folds, "cold_mb": float(table.get("cold_mb", COLD_MB)),
           "categories": list(KERNEL_CATEGORIES)}
    probe = table.get("cold_us_per_mb")  # measured by ``cold_probe``: the cold column's rate is not fitted
    if probe is not None:
        out["cold_us_per_mb"] = float(probe)
    for p in precisions:
        ix = [n for n, r in enumerate(nets) if r.get("precision") == p]
        wall = np.array([nets[n]["wall_ms"] * 1e3 for n in ix])
        R = np.array([rows[n] for n in ix])
        target = np.ones(len(ix))
        if probe is not None:
            target = 1.0 - float(probe) * R[:, -1] / wall
            R = R[:, :-1]
        X = R / wall[:, None]
        X = np.vstack([X, AGG_RIDGE * np.eye(X.shape[1])])
        coef, *_ = np.linalg.lstsq(X, np.concatenate([target, np.zeros(X.shape[1])]), rcond=None)
        out[p] = [float(c) for c in coef] + ([float(probe)] if probe is not None else [])
    return out


def _family(key: str) -> str:
    """The op type under a predictor key: ``ms:QLinearConv/dw/s2`` -> ``QLinearConv``."""
    return key.split("/")[0].split(".")[0].split(":")[-1]


def fit_overhead(nets: Sequence[dict]) -> dict:
    """wall = a + b * kernels + c * sum(kernel µs), least squares on relative error."""
    n = np.array([r["kernels"] for r in nets], dtype=float)
    s = np.array([r["sum_us"] for r in nets], dtype=float)
    wall = np.array([r["wall_ms"] * 1e3 for r in nets], dtype=float)
    A = np.stack([np.ones_like(n), n, s], axis=1) / wall[:, None]
    coef, *_ = np.linalg.lstsq(A, np.ones_like(wall), rcond=None)
    return {"a_us": float(coef[0]), "b_us": float(coef[1]), "c": float(coef[2])}


def save_table(table: dict, path: Path) -> None:
    """Write a kernel table (gzip JSON when the name ends in .gz); kernel samples as compact rows."""
    import gzip

    keys = sorted({k["key"] for k in table["kernels"]})
    ix = {k: i for i, k in enumerate(keys)}
    out = {**table, "keys": keys, "fields": list(FEATURES),
           "kernels": [[ix[k["key"]], k["us"]] + [k["desc"].get(f, 0) for f in FEATURES] for k in table["kernels"]]}
    data = json.dumps(out, separators=(",", ":")).encode()
    Path(path).write_bytes(gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)


def load_table(path: Path) -> dict:
    import gzip

    try:
        raw = Path(path).read_bytes()
        table = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
        if table.get("version") != TABLE_VERSION or not {"kernels", "overhead", "keys", "fields"} <= set(table):
            raise ValueError("not a version-%d edgekit kernel table" % TABLE_VERSION)
        keys, fields = table["keys"], table["fields"]
        table["kernels"] = [{"key": keys[int(r[0])], "us": float(r[1]), "desc": dict(zip(fields, r[2:]))}
                            for r in table["kernels"]]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise EdgekitError(f"Kernel latency table {path} is unreadable ({exc}); recalibrate it with "
                           f"`python bench/latency_model.py --calibrate`") from None
    return table


@lru_cache(maxsize=4)
def _model_for(path: str, mtime: float) -> KernelModel:
    return KernelModel(load_table(Path(path)))


def kernel_model(path: Path) -> KernelModel:
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"Kernel latency table not found: {path}")
    return _model_for(str(path.resolve()), path.stat().st_mtime)


def estimate_kernels(model_path, table_path: Path, threads: int) -> dict:
    """Estimated latency of an ONNX file from its ONNX Runtime kernels (see the module docstring)."""
    km = kernel_model(table_path)
    if int(km.table.get("threads", threads)) != int(threads):
        raise EdgekitError(f"The kernel table {Path(table_path).name} was measured at {km.table['threads']} "
                           f"thread(s), not {threads}")
    kernels, precision = graph_kernels(model_path, threads)
    us = km.predict_us(kernels)
    for k, t in zip(kernels, us):
        k.predicted_us = float(t)
    total = km.estimate_ms(kernels, precision, us)
    by_key: Dict[str, dict] = {}
    for k in kernels:
        row = by_key.setdefault(k.key, {"kernels": 0, "ms": 0.0, "trained_on": km.trained_on(k.key)})
        row["kernels"] += 1
        row["ms"] += k.predicted_us / 1e3
    return {"ms": total, "kernels": kernels, "precision": precision, "by_kernel": by_key,
            "unseen": sorted(k for k, v in by_key.items() if v["trained_on"] < MIN_SAMPLES)}


# ----------------------------------------------------------------------------- calibration


def measure_net(path: Path, threads: int, runs: int = 60) -> Tuple[List[dict], dict]:
    """Per-kernel samples and the whole-graph record of one ONNX file timed here."""
    kernels, precision, times = graph_kernels(path, threads, runs=runs)
    samples = [{"key": k.key, "desc": k.desc, "us": times[k.name]}
               for k in kernels if k.name in times]
    wall = wall_p50_ms(path, threads, runs=max(100, runs))
    return samples, {"name": Path(path).stem, "precision": precision, "kernels": len(kernels), "samples": len(samples),
                     "sum_us": float(sum(times.get(k.name, 0.0) for k in kernels)), "wall_ms": wall}


LONG_EVERY = 4  # every fourth calibration network is a long, narrow one (``RandomNet(long=True)``)


def calibrate_kernels(device, threads: int, nets: int = 60, out: Optional[Path] = None, seed0: int = 1000,
                      runs: int = 60, progress: bool = True, wall_passes: int = 3) -> dict:
    """Time ``nets`` random networks (fp32 and int8) kernel by kernel here and write the kernel table.

    Every ``LONG_EVERY``-th network is long and narrow (3-8 blocks a stage at half width): 100-270 kernels
    of a few µs each, the regime of ShuffleNetV2-x0.5 and MicroNet, where the executor's cost per kernel
    decides the total and which the 1-3 blocks a stage of the others (37-86 kernels) never reach.

    Each graph's wall-clock p50 is the median of the one taken right after its kernels were profiled and
    ``wall_passes`` more, taken afterwards round-robin over all graphs in shuffled orders: a slow spell of a
    shared machine during one stretch of the calibration otherwise labels a run of networks slow that their
    kernels do not explain (one such run left 15% of the random networks' own fits off by more than 15%).

    Then ``cold_probe`` measures what weights past the cache cost per MB; the executor fit's cold column
    uses that rate."""
    import platform
    import datetime as _dt

    import torch

    from ..export.onnx import export_onnx
    from ..progress import track
    from .calibrate import _ort_version, _quantize, cpu_name
    from .synthetic import RandomNet

    samples: List[dict] = []
    records: List[dict] = []
    graphs: List[Path] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgekit-kcal-") as tmp:
        for i in (track(range(nets), description="timing random networks") if progress else range(nets)):
            torch.manual_seed(seed0 + i)
            net = RandomNet(seed0 + i, long=i % LONG_EVERY == LONG_EVERY - 1).eval()
            fp32 = export_onnx(net, Path(tmp) / f"net{i}.fp32.onnx", net.input_shape)
            int8 = _quantize(fp32, Path(tmp) / f"net{i}.int8.onnx", net.input_shape, device)
            for p in (fp32, int8):
                s, rec = measure_net(p, threads, runs=runs)
                samples += s
                records.append(rec)
                graphs.append(p)
        walls = [[r["wall_ms"]] for r in records]
        rng = np.random.default_rng(seed0)
        passes = range(wall_passes)
        for _ in (track(passes, description="re-timing whole networks") if progress else passes):
            for j in rng.permutation(len(graphs)):
                walls[j].append(wall_p50_ms(graphs[j], threads, runs=max(20, runs // 2), warmup=5))
        for r, w in zip(records, walls):
            r["wall_ms"] = float(np.median(w))
            r["wall_passes_ms"] = [round(v, 5) for v in w]
    table = {"version": TABLE_VERSION, "threads": int(threads), "seed0": int(seed0), "host": cpu_name(),
             "machine": platform.machine(),
             "onnxruntime": _ort_version(), "date": _dt.date.today().isoformat(), "nets": records,
             "measure_s": round(time.perf_counter() - t0, 1), "wall_passes": 1 + int(wall_passes), "kernels": samples,
             "cold_mb": _cache_threshold_mb()}
    _set_cold_probe(table, cold_probe(threads, table["cold_mb"], rounds=3 if runs >= 30 else 1, runs=max(20, 3 * runs)))
    table["overhead"] = fit_overhead(records)
    table["aggregate"] = fit_aggregate(table)
    if out:
        save_table(table, Path(out))
    return table


def _set_cold_probe(table: dict, probe: dict) -> None:
    table["cold_us_per_mb"], table["cold_curve"], table["cold_probe"] = (probe["cold_us_per_mb"], probe["cold_curve"],
                                                                        probe["points"])
    table["cold_probe_date"] = __import__("datetime").date.today().isoformat()


def reprobe_cold(path: Path, rounds: int = 5) -> dict:
    """Re-measure only the cold curve of a kernel table here (``cold_probe``, about a minute) and refit its
    executor fit (15-20 s), keeping every kernel sample: for a machine whose cache, not its kernels, changed."""
    path = Path(path)
    table = load_table(path)
    _set_cold_probe(table, cold_probe(int(table["threads"]), float(table.get("cold_mb", COLD_MB)), rounds=rounds))
    table["aggregate"] = fit_aggregate(table)
    tmp = path.with_name(".tmp-" + path.name)
    save_table(table, tmp)
    tmp.replace(path)
    _model_for.cache_clear()
    return {"path": str(path), "cold_us_per_mb": table["cold_us_per_mb"], "cold_curve": table["cold_curve"]}


REFERENCE_NETS = 12  # calibration networks re-timed by ``speed_check``: half fp32, half int8, weights in cache
REFERENCE_PAST_CACHE = 4  # and fp32 ones whose weights pass the cache (``cold_mb``)


def reference_records(table: dict, count: int = REFERENCE_NETS, past_cache: int = REFERENCE_PAST_CACHE,
                      min_ms: float = 0.2, max_ms: float = 3.0) -> List[dict]:
    """Calibration networks of a table for a speed check: ``count`` whose weights fit in cache, half fp32, half int8,
    and ``past_cache`` fp32 ones whose weights do not (a host slowed by another tenant on the memory bus slows those
    most), each group spread evenly over its wall times from ``min_ms`` to ``max_ms`` (the zoo's range, quick to
    re-time; the smallest networks run from cache and barely feel a slow memory), its slowest and fastest included.
    Copies of the records, with ``weights_mb`` and ``past_cache`` added."""
    spans = _net_spans(table) if "kernels" in table else None
    cold = float(table.get("cold_mb", COLD_MB))
    recs = []
    for n, r in enumerate(table.get("nets", [])):
        if not r.get("name", "").startswith("net"):
            continue
        mb = table["kernels"][spans[n][0]]["desc"].get("model_weight_bytes", 0) / 1e6 if spans and spans[n] else 0.0
        recs.append({**r, "weights_mb": round(mb, 3), "past_cache": mb > cold})
    picked: List[dict] = []
    for prec, big, n in (("fp32", False, count - count // 2), ("int8", False, count // 2), ("fp32", True, past_cache)):
        mine = [r for r in recs if r.get("precision") == prec and r["past_cache"] == big]
        pool = sorted([r for r in mine if min_ms <= r.get("wall_ms", 0) <= max_ms] or mine, key=lambda r: r["wall_ms"])
        if pool and n:
            picked += [pool[int(round(i))] for i in np.linspace(0, len(pool) - 1, min(n, len(pool)))]
    return picked


def build_reference(table: dict, records: Sequence[dict], device, folder: Path) -> List[Tuple[dict, Path]]:
    """Rebuild calibration networks from the table's seeds (``net{i}`` is ``RandomNet(seed0 + i)``, exported and
    quantized as at calibration). A network whose rebuilt graph does not run the same number of kernels as the
    one timed (another ONNX Runtime or exporter) is left out: its time would not be comparable."""
    import torch

    from ..export.onnx import export_onnx
    from .calibrate import _quantize
    from .synthetic import RandomNet

    out = []
    for rec in records:
        i = int(rec["name"].split(".")[0][3:])
        torch.manual_seed(int(table["seed0"]) + i)
        net = RandomNet(int(table["seed0"]) + i, long=i % LONG_EVERY == LONG_EVERY - 1).eval()
        fp32 = export_onnx(net, Path(folder) / f"net{i}.fp32.onnx", net.input_shape)
        path = fp32 if rec["precision"] == "fp32" else _quantize(fp32, Path(folder) / f"net{i}.int8.onnx",
                                                                net.input_shape, device)
        if len(graph_kernels(path, int(table["threads"]))[0]) == int(rec.get("kernels", -1)):
            out.append((rec, path))
    return out


def speed_ratios(pairs: Sequence[Tuple[dict, float]]) -> dict:
    """From (reference record, wall ms now) pairs: the median of now / then over the networks whose weights fit in
    cache (``ratio``), per precision among those, and over those whose weights pass it (``past_cache``)."""
    ratio = [(r["precision"], bool(r.get("past_cache")), ms / r["wall_ms"]) for r, ms in pairs]
    out = {"ratio": float(np.median([v for _, b, v in ratio if not b])) if any(not b for _, b, _ in ratio)
           else float("nan")}
    for key, pick in (("fp32", lambda p, b: p == "fp32" and not b), ("int8", lambda p, b: p == "int8" and not b),
                      ("past_cache", lambda p, b: b)):
        v = [x for p, b, x in ratio if pick(p, b)]
        if v:
            out[key] = float(np.median(v))
    return out


def speed_check(path: Path, device, count: int = REFERENCE_NETS, past_cache: int = REFERENCE_PAST_CACHE,
                rounds: int = 3, runs: int = 40, progress: bool = True) -> dict:
    """How fast this host runs now against when its kernel table was timed: ``count`` of the table's own
    calibration networks whose weights fit in cache and ``past_cache`` whose weights do not (``reference_records``),
    rebuilt from their seeds and timed here round-robin (``rounds`` p50s each, their median), against their
    calibrated wall time. The kernel table's estimates describe the host as it was then; a shared
    machine can run 10-40% slower for minutes to hours (another tenant on the cache or the memory bus), and no
    estimate made from the table can know that."""
    from .calibrate import cpu_name

    table = load_table(Path(path))
    threads = int(table["threads"])
    with tempfile.TemporaryDirectory(prefix="edgekit-speed-") as tmp:
        recs = reference_records(table, count, past_cache)
        items = range(len(recs))
        if progress:
            from ..progress import track
            items = track(items, description="rebuilding reference networks")
        built: List[Tuple[dict, Path]] = []
        for j in items:
            built += build_reference(table, recs[j:j + 1], device, Path(tmp))
        if not built:
            raise EdgekitError(f"None of the calibration networks of {Path(path).name} rebuilds into the graph that was "
                               f"timed ({table.get('date')}, ONNX Runtime {table.get('onnxruntime')}): edgekit's random "
                               f"networks or ONNX Runtime changed since; recalibrate (`edgekit devices calibrate`)")
        times: List[List[float]] = [[] for _ in built]
        rng = np.random.default_rng(0)
        for _ in range(rounds):
            for j in rng.permutation(len(built)):
                times[j].append(wall_p50_ms(built[j][1], threads, runs=runs, warmup=5))
    now = [float(np.median(t)) for t in times]
    return {**speed_ratios([(r, ms) for (r, _), ms in zip(built, now)]), "table": Path(path).name,
            "table_date": table.get("date"), "table_host": table.get("host"), "host": cpu_name(), "threads": threads,
            "cold_mb": float(table.get("cold_mb", COLD_MB)),
            "nets": [{"name": r["name"], "precision": r["precision"], "kernels": r["kernels"], "weights_mb": r["weights_mb"],
                      "past_cache": r["past_cache"], "calibrated_ms": r["wall_ms"], "now_ms": ms}
                     for (r, _), ms in zip(built, now)]}


def calibrate_device(device: str = "desktop-cpu", threads: Optional[int] = None, nets: int = 260,
                     runs: int = 60, progress: bool = True) -> dict:
    """Recalibrate a local profile's kernel table for ``threads`` and point its YAML at it.

    The table is written beside the profile's YAML as ``<profile>.kernels-t<threads>.json.gz`` (a user
    profile's YAML names it by absolute path: table names resolve against edgekit's own devices folder).
    """
    from ..config import _resolve, load_device
    from .calibrate import write_latency_model

    path = _resolve("devices", device)
    dev = load_device(device)
    if not dev.local:
        raise EdgekitError(f"Kernel calibration measures this machine; device {dev.name} is not local: true")
    threads = int(threads or dev.resolved_threads())
    out = path.parent / f"{path.stem}.kernels-t{threads}.json.gz"
    if not os.access(path.parent, os.W_OK):  # say so before minutes of timing, not after
        raise EdgekitError(f"Cannot write the kernel table beside {path} (no write permission): copy the profile "
                           f"YAML somewhere writable and calibrate the copy (`edgekit devices calibrate my.yaml`)")
    tmp = out.with_name(".tmp-" + out.name)
    table = calibrate_kernels(dev, threads, nets=nets, out=tmp, runs=runs, progress=progress)
    tmp.replace(out)
    builtin = out.parent.resolve() == Path(__file__).resolve().parent.parent / "devices"
    lm = dev.latency_model.model_copy(update={"kernel_tables": {**dev.latency_model.kernel_tables,
                                                                 threads: out.name if builtin else str(out.resolve())}})
    write_latency_model(path, lm)
    _model_for.cache_clear()
    return {"path": str(out), "yaml": str(path), "threads": threads, "nets": nets,
            "kernels": len(table["kernels"]), "measure_s": table["measure_s"], "overhead": table["overhead"]}
