"""Fit a device's roofline coefficients from micro-benchmarks timed on this machine (``calibrate_local``).

The micro-benchmarks (``micro.py``) are timed with ONNX Runtime, fp32 and int8 (quantized as the profile says, so the
QDQ patterns are the ones real models get); the coefficients are fitted by least squares on relative error, with the
prediction computed by the roofline itself (``graph.analyze_for`` + the same cost formula), so the fitted numbers mean
exactly what the estimator uses. They are written into the device YAML's ``latency_model:`` block, the rest of the
file kept as it is.
"""

from __future__ import annotations

import datetime as _dt
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
from .graph import analyze_for
from .host import cpu_name, host_layout, ort_version, quantize_for, time_onnx
from .micro import micro_suite, write_micro
from .roofline import cost_ops, speedup


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
    return {p: round_sig(r * headroom) for p, r in best.items()}


# ----------------------------------------------------------------------------- writing the YAML


def round_sig(x: float, sig: int = 3) -> float:
    return float(f"{x:.{sig}g}")


def latency_model_yaml(lm: LatencyModel) -> str:
    import yaml

    data = lm.model_dump()
    data["efficiency"] = {k: round_sig(v) for k, v in sorted(data["efficiency"].items())}
    data["overhead_us"] = {k: round_sig(v) for k, v in sorted(data["overhead_us"].items())}
    data["depth_half"] = {k: round_sig(v) for k, v in sorted(data["depth_half"].items())}
    data["width_half"] = {k: round_sig(v) for k, v in sorted(data["width_half"].items())}
    if data.get("memory_bandwidth_gbs"):
        data["memory_bandwidth_gbs"] = round_sig(data["memory_bandwidth_gbs"])
    for k in ("session_overhead_us", "cache_bandwidth_gbs", "default_overhead_us"):
        data[k] = round_sig(data[k])
    text = yaml.safe_dump({"latency_model": data}, sort_keys=False, default_flow_style=False, width=120)
    return "# per-operator latency model (edgekit.estimate.roofline), fitted by edgekit.estimate.calibrate\n" + text


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


def calibrate_local(device: str | DeviceProfile = "desktop-cpu", out: Optional[str | Path] = None,
                    threads: Optional[int] = None, quick: bool = False, runs: int = 100,
                    write: bool = True, workdir: Optional[str | Path] = None,
                    kinds: Optional[Sequence[str]] = None) -> dict:
    """Time the micro-benchmarks here, fit the device's latency model and (``write``) save it into a YAML.

    ``out``: the YAML to update; default: the device's own file (built-in profiles are package files).
    ``kinds``: a subset of the micro-benchmark kinds (``SUITE``); ``quick``: every other size, shorter chains.
    Returns {"latency_model", "samples": [{name, precision, measured_ms, predicted_ms, error}], "path", ...}.
    """
    from ..config import resolve_file

    dev_path = resolve_file("devices", device) if isinstance(device, str) else None
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
            fp32, shape = write_micro(micro, tmp / f"{micro.name}.fp32.onnx")
            for prec in precisions:
                path = fp32
                if prec == "int8" and micro.kind != "qdq":
                    path = quantize_for(fp32, tmp / f"{micro.name}.int8.onnx", shape, dev)
                ops = analyze_for(path, lm0)
                ms = time_onnx(path, threads, runs=runs)
                samples.append(Sample(f"{micro.name}.{prec}", micro.kind, prec, ops, ms))
    measure_s = time.perf_counter() - t0
    peaks = {**dev.peak_gops, **measured_peaks(samples)}
    # peak_gops is "all cores": a rate measured on fewer threads scales up by the same speed-up model
    scale = speedup(dev.cores, dev.cores, lm0.parallel_efficiency) / speedup(threads, dev.cores,
                                                                             lm0.parallel_efficiency)
    peaks = {p: round_sig(v * scale) if p in measured_peaks(samples) else v for p, v in peaks.items()}
    dev = dev.model_copy(update={"peak_gops": peaks})
    lm = fit_coefficients(samples, dev, threads, lm0)
    lm = lm.model_copy(update={"calibration": {
        "host": cpu_name(), "machine": platform.machine(), "threads": threads,
        "onnxruntime": ort_version(), "date": _dt.date.today().isoformat(), "micro_benchmarks": len(samples),
        "quick": quick, "peak_gops": "measured: best micro-benchmark MAC rate x 1.25, scaled to all cores"}})
    pred = _predict(samples, dev, threads, lm)
    rows = [{"name": s.name, "kind": s.kind, "precision": s.precision, "measured_ms": s.measured_ms,
             "predicted_ms": float(p), "error": float(p / s.measured_ms - 1)} for s, p in zip(samples, pred)]
    errs = np.abs([r["error"] for r in rows])
    lm.calibration.update({"micro_median_abs_error": round_sig(float(np.median(errs)), 2),
                           "micro_within_15pct": round_sig(float(np.mean(errs <= 0.15)), 2)})
    path = Path(out) if out else dev_path
    if write:
        if path is None:
            raise EdgekitError("calibrate_local: give out=PATH to write a profile that was passed as an object")
        _write_peaks(path, dev.peak_gops)
        write_latency_model(path, lm)
    return {"device": dev.name, "threads": threads, "latency_model": lm, "peak_gops": dict(dev.peak_gops),
            "samples": rows, "path": str(path) if write else None, "measure_s": measure_s,
            "median_abs_error": float(np.median(errs)), "within_15pct": float(np.mean(errs <= 0.15))}


def _write_peaks(path: Path, peaks: Dict[str, float]) -> None:
    text = Path(path).read_text()
    flow = "{" + ", ".join(f"{k}: {round_sig(v)}" for k, v in peaks.items()) + "}"
    line = f"peak_gops: {flow}   # giga-MACs/s, all cores; measured by edgekit.estimate.calibrate"
    if re.search(r"^peak_gops\s*:", text, flags=re.M):
        text = re.sub(r"^peak_gops\s*:.*$", line, text, count=1, flags=re.M)
    else:
        text = text.rstrip("\n") + "\n" + line + "\n"
    Path(path).write_text(text)
