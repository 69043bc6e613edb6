"""What a kernel is to the predictors: ``Kernel`` (one node ONNX Runtime runs), its shape features and predictor key,
and the per-graph columns of the executor fit (kernels binned by predicted time, counted by category, cold MB)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import numpy as np

CONV_LIKE = {"Conv", "FusedConv", "QLinearConv", "ConvInteger"}
POOL_LIKE = {"MaxPool", "AveragePool", "NhwcMaxPool", "QLinearAveragePool", "LpPool"}
ACTIVATION_CODES = {"": 0, "Relu": 1, "Clip": 2, "HardSigmoid": 3, "Sigmoid": 4, "LeakyRelu": 5, "Tanh": 6}
FEATURES = ("out", "in0", "in_other", "weights", "macs", "depth", "cout", "cin", "spatial", "stride", "kernel",
            "groups", "rank", "activation", "sum_input", "inner", "model_weight_bytes")
NORM_PARAMS = {"BatchNormalization", "InstanceNormalization"}
COMMUTATIVE = {"Add", "Mul", "Sum", "Max", "Min", "QLinearAdd", "QLinearMul"}
AGG_EDGES_US = (3.0, 5.0, 10.0, 20.0, 50.0)  # predicted-time bins of the executor fit
KERNEL_CATEGORIES = {  # op families counted per network by the executor fit
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


def canonical(op_type: str, desc: Dict[str, int]) -> Dict[str, int]:
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


def family(key: str) -> str:
    """The op type under a predictor key: ``ms:QLinearConv/dw/s2`` -> ``QLinearConv``."""
    return key.split("/")[0].split(".")[0].split(":")[-1]


def predictor_key(key: str) -> str:
    """The predictor a kernel key is trained with. ORT's ``ms:FusedConv`` is the NCHW ``Conv`` kernel (MLAS) with
    its activation applied in the same pass (the activation is a feature): one predictor serves both, so a
    fused shape borrows the plain ones' samples (ShuffleNet v1's ReLU'd grouped 1x1 convs were 70% over
    with the two apart, having few fused samples of their size)."""
    return "Conv/" + key[len("ms:FusedConv/"):] if key.startswith("ms:FusedConv/") else key


def bin_features(kernel_us) -> np.ndarray:
    """[1, kernels in each predicted-time bin, predicted µs in each bin] (bins: ``AGG_EDGES_US``)."""
    us = np.asarray(kernel_us, dtype=float)
    edges = (0.0, *AGG_EDGES_US, np.inf)
    bins = [(us >= lo) & (us < hi) for lo, hi in zip(edges[:-1], edges[1:])]
    return np.array([1.0] + [float(b.sum()) for b in bins] + [float(us[b].sum()) for b in bins])


def category_counts(keys: Sequence[str]) -> np.ndarray:
    """Kernels of each ``KERNEL_CATEGORIES`` category among ``keys`` (the rest are counted by the bins alone)."""
    fams = [family(predictor_key(k)) for k in keys]
    return np.array([float(sum(f in members for f in fams)) for members in KERNEL_CATEGORIES.values()])


def cold_curve_rate(curve: Sequence[Sequence[float]], kernel_mb) -> np.ndarray:
    """The cold rate (µs per MB) of kernels holding ``kernel_mb`` MB of weights, interpolated in log size along a
    probe's (kernel MB, rate) curve and held at its ends."""
    c = np.asarray(sorted(curve), dtype=float)
    x = np.log2(np.maximum(np.asarray(kernel_mb, dtype=float), 1e-9))
    return np.interp(x, np.log2(c[:, 0]), c[:, 1])
