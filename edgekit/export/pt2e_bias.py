"""Empirical bias correction of a converted PT2E int8 graph (the TFLite int8 path), as ``ptq.correct_bias`` does
for ONNX: each conv / linear bias loses the expected output error of its int8 weights, E[(W_q - W) x] per output
channel, with x the float graph's input to that layer on the calibration data (one running mean per layer input:
memory flat in the number of images).

The converted graph (``convert_pt2e(fold_quantize=False)``) is the reference int8 model: float weights through
quantize -> dequantize, BatchNorm already folded. Its float twin is the same graph with every quantize /
dequantize bypassed, so both have the same layers under the same names. The corrected biases are bound to the
graph before litert-torch rounds them to int32 (never written into the tensors it shares with the user's model);
whether the correction is kept is decided on the calibration split by the torch simulation's logits SQNR against
the float twin (``auto``).
"""

from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch

from ..evaluate import sqnr_db

_QDQ = ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel")


def _op(node) -> str:
    return str(node.target).split(".")[-2] if node.op == "call_function" and "." in str(node.target) else ""


def _is_qdq(node) -> bool:
    return node.op == "call_function" and "quantized_decomposed" in str(node.target) and _op(node) in _QDQ


def _layers(gm) -> List:
    """conv / linear nodes whose weight is dequantized and whose bias is a float parameter."""
    out = []
    for n in gm.graph.nodes:
        if _op(n) not in ("conv1d", "conv2d", "convolution", "linear") or len(n.args) < 3:
            continue
        w, b = n.args[1], n.args[2]
        if isinstance(w, torch.fx.Node) and _is_qdq(w) and isinstance(b, torch.fx.Node) and b.op == "get_attr":
            out.append(n)
    return out


def _attr(gm, target: str) -> torch.Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(gm, target: str, value: torch.Tensor) -> None:
    """Rebind rather than edit in place: the exported graph shares its tensors with the user's model."""
    *path, name = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part)
    old = getattr(owner, name)
    setattr(owner, name, torch.nn.Parameter(value, requires_grad=False) if isinstance(old, torch.nn.Parameter)
            else value)


def _eval_chain(gm, node) -> torch.Tensor:
    """The value of a constant subgraph (get_attr -> quantize -> dequantize) at ``node``."""
    if node.op == "get_attr":
        return _attr(gm, node.target).detach()
    args = [_eval_chain(gm, a) if isinstance(a, torch.fx.Node) else a for a in node.args]
    return node.target(*args, **node.kwargs)


def float_twin(gm):
    """``gm`` with every quantize / dequantize node bypassed: the float model the int8 graph approximates."""
    twin = copy.deepcopy(gm)
    for n in list(twin.graph.nodes):
        if _is_qdq(n):
            n.replace_all_uses_with(n.args[0])
            twin.graph.erase_node(n)
    twin.graph.lint()
    twin.recompile()
    return twin


class _InputMeans(torch.fx.Interpreter):
    """Runs the graph and sums each named layer's input over the batch."""

    def __init__(self, gm, names):
        super().__init__(gm)
        self.names, self.sums, self.count = set(names), {}, {}

    def run_node(self, n):
        if n.name in self.names:
            x = self.env[n.args[0]].detach().double()
            self.sums[n.name] = self.sums.get(n.name, 0) + x.sum(0)
            self.count[n.name] = self.count.get(n.name, 0) + x.shape[0]
        return super().run_node(n)


def _bias_delta(node, x_mean: torch.Tensor, dw: torch.Tensor) -> Optional[torch.Tensor]:
    """E[(W_q - W) x] per output channel: the layer applied to the mean input with the weight error, averaged
    over positions (padding included, as the ONNX correction does). None for a layer it does not cover."""
    if _op(node) == "linear":
        return (x_mean.reshape(-1, x_mean.shape[-1]).mean(0) @ dw.double().t()).reshape(-1)
    args = list(node.args) + [None] * (9 - len(node.args))
    if _op(node) == "convolution":
        if args[6]:  # transposed
            return None
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    else:
        stride, padding, dilation, groups = args[3] or 1, args[4] or 0, args[5] or 1, args[6] or 1
    conv = {2: torch.nn.functional.conv1d, 3: torch.nn.functional.conv2d}.get(x_mean.dim())
    if conv is None or isinstance(padding, str):
        return None
    y = conv(x_mean.unsqueeze(0), dw.double(), None, stride, padding, dilation, groups)
    return y.mean(dim=tuple(range(2, y.dim()))).reshape(-1)


def _logits(out) -> np.ndarray:
    """The graph's first output (exported graphs return a tuple)."""
    return (out[0] if isinstance(out, (tuple, list)) else out).numpy()


def _correct(gm, layers, means, saved: Dict[str, torch.Tensor]) -> None:
    """Each layer's bias minus its weights' expected error; the original biases go to ``saved``."""
    for n in layers:
        if n.name not in means.sums:
            continue
        x_mean = means.sums[n.name] / means.count[n.name]
        w_node = n.args[1]
        w_q = _eval_chain(gm, w_node)
        root = w_node
        while root.op != "get_attr":
            root = root.args[0]
        dw = w_q - _eval_chain(gm, root)
        delta = _bias_delta(n, x_mean, dw)
        target = n.args[2].target
        bias = _attr(gm, target).detach()
        if delta is None or delta.shape != bias.shape:
            continue
        saved[target] = bias
        _set_attr(gm, target, bias - delta.to(bias.dtype))


@torch.no_grad()
def correct_bias_pt2e(gm, batches: Iterable[torch.Tensor], auto: bool = True) -> Dict:
    """Correct ``gm``'s biases in place; with ``auto`` keep the correction only if the simulated calibration
    logits get closer to the float twin's. Returns what was done (layers, SQNR before / after, kept)."""
    batches = list(batches)
    layers = _layers(gm)
    if not layers:
        return {"layers": 0, "kept": False, "why": "no conv or linear with a float bias and int8 weights"}
    twin = float_twin(gm)
    means = _InputMeans(twin, [n.name for n in layers])
    ref = np.concatenate([_logits(means.run(x)) for x in batches])

    def simulated() -> np.ndarray:
        return np.concatenate([_logits(gm(x)) for x in batches])

    before = sqnr_db(ref, simulated()) if auto else None
    saved: Dict[str, torch.Tensor] = {}
    try:
        _correct(gm, layers, means, saved)
    except Exception:
        for target, value in saved.items():  # never a half-corrected graph
            _set_attr(gm, target, value)
        raise
    info: Dict = {"layers": len(saved)}
    if auto:
        after = sqnr_db(ref, simulated())
        info.update(calib_sqnr_db_before=round(before, 2), calib_sqnr_db_after=round(after, 2))
        if not after > before:
            for target, value in saved.items():
                _set_attr(gm, target, value)
            info["kept"] = False
            return info
    info["kept"] = True
    return info


def calibration_batches(calib: np.ndarray, n: int, nhwc: bool) -> List[torch.Tensor]:
    """The calibration images as the exported graph's static batch of ``n``."""
    out = []
    for i in range(0, len(calib) - n + 1, n):
        x = torch.from_numpy(np.ascontiguousarray(calib[i:i + n]))
        out.append(x.permute(0, 2, 3, 1).contiguous() if nhwc else x)
    return out
