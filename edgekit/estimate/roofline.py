"""The per-operator roofline: a device's coefficients turn ``graph.analyze``'s operators into times.

Each operator that runs costs ``overhead[category] + max(work / (peak[precision] * efficiency[category] * depth /
(depth + half) * width / (width + whalf)), bytes / bandwidth)``, plus one session overhead per inference. It is the
estimate for devices without a kernel table (docs/latency-model.md); its coefficients live in the device YAML.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..config import DeviceProfile, LatencyModel
from ..errors import EdgekitError
from .graph import analyze_for
from .ops import SOURCE, OpCost


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


def speedup(threads: int, cores: int, parallel_efficiency: float) -> float:
    t = max(1, min(int(threads), int(cores)))
    return 1.0 + (t - 1) * parallel_efficiency


def cost_ops(ops: Sequence[OpCost], device: DeviceProfile, threads: Optional[int] = None,
             lm: Optional[LatencyModel] = None) -> List[OpCost]:
    """Fill compute/memory/overhead/time of each op from the device's roofline coefficients."""
    lm = lm or device.latency_model
    threads = int(threads or device.resolved_threads())
    cal_threads = int(lm.threads or device.resolved_threads())
    scale = speedup(threads, device.cores, lm.parallel_efficiency) / speedup(cal_threads, device.cores,
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


def estimate_roofline(model, device: DeviceProfile, threads: int, lm: LatencyModel, per_op: bool = False) -> dict:
    """The roofline's estimate (ms) of an ONNX model (a path or a ModelProto) on ``device``, with its breakdown."""
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
        "threads": int(threads),
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
