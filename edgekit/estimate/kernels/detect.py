"""Kernel detection: the kernels ONNX Runtime runs for an ONNX file on this machine, with their shapes (and, at
calibration, their times from ORT's profiler)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ...errors import EdgekitError
from ..host import ort_session
from .features import ACTIVATION_CODES, CONV_LIKE, POOL_LIKE, Kernel, canonical


def _op_name(node) -> str:
    dom = node.domain.replace("com.microsoft.", "").replace("com.microsoft", "ms")
    return f"{dom}:{node.op_type}" if dom else node.op_type


def _numel(shape) -> int:
    if not shape or any(d is None or d <= 0 for d in shape):
        return 0 if shape is None or any(d is None or d <= 0 for d in (shape or ())) else 1
    return int(np.prod(shape))


def _shape_dtype(entry) -> Tuple[Optional[Tuple[int, ...]], str]:
    if not entry:
        return None, ""
    (dtype, dims), = entry.items()
    return tuple(int(d) for d in dims), dtype


def _node_events(profile_file: str) -> Dict[str, List[dict]]:
    per: Dict[str, List[dict]] = {}
    for e in json.loads(Path(profile_file).read_text()):
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per.setdefault(e["name"][: -len("_kernel_time")], []).append(e)
    return per


def _feed(sess, zeros: bool = False) -> dict:
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
    x = np.zeros(shape, np.float32) if zeros else np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return {inp.name: x}


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
        sess = ort_session(path, threads, profile_prefix=str(Path(tmp) / "shapes"), optimized=opt_path)
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
        canonical(base, desc)
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
    times = {k.name: middle_mean([e["dur"] for e in events[k.name][1 + warmup:]])
             for k in kernels if len(events[k.name]) > 1 + warmup}
    return kernels, precision, times


def middle_mean(durations_us) -> float:
    """Mean of the runs between the 25th and 75th percentiles: robust like a median, but not stuck on the
    profiler's whole microseconds (most kernels here take 3-12 µs, where one step is 8-30%)."""
    d = np.sort(np.asarray(durations_us, dtype=float))
    lo, hi = len(d) // 4, len(d) - len(d) // 4
    return float(d[lo:hi].mean()) if hi > lo else float(np.median(d))
