"""ONNX Runtime's static-quantization calibration in bounded memory, with its ranges remembered.

``HistogramCalibrater.collect_data`` (the entropy and percentile methods) keeps every
intermediate tensor of every calibration input before it builds one histogram per tensor:
50 MB per image for MobileNetV2 at 224 px, 12 GB for the default 256 images (the 10 GB
peak of ``edgekit compress --data ... --input-size 224`` in issue 26). Inside
:func:`streamed_calibration`, ``quantize_static`` gets a stand-in calibrator that makes two
passes over the inputs instead, holding one input's tensors at a time:

1. each tensor's min and max (and of ``|x|`` for symmetric percentile), exactly as ORT
   takes them over all inputs at once;
2. each input's ``np.histogram`` over the range ORT would give ``np.histogram`` for all of
   them, added up. ``np.histogram`` places every element on its own from the range and
   bin count, so the sums are ORT's counts, and ORT's own collector and ``compute_data``
   turn them into the same ranges (``tests/test_data_stream.py`` checks byte-identical models).

Ranges depend on the model, the op types, the method and the inputs, not on the int8
layout, so they are remembered per process: the latency search's layouts and TensorRT's
calibrations stop recomputing them. ``EDGEKIT_ORT_STREAMED_CALIBRATION=0`` turns this off.

It also adds a method ORT lacks, ``mse`` (:func:`mse_range`): per tensor, the range whose 8-bit grid loses the
least squared error on the calibration histogram, clipping a long tail where that costs less than the coarser
steps it would otherwise force (the "MSE" range estimator of NNCF/OpenVINO and TensorRT's calibrators).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np

_RANGES: Dict[Any, Any] = {}  # (model, op types, method, options, inputs) -> TensorsData
_RANGES_MAX = 32


class _Fallback(Exception):
    """Data this streamed pass does not reproduce exactly (an empty tensor): ORT's own pass runs instead."""


@contextlib.contextmanager
def streamed_calibration(method: Optional[str] = None):
    """Within it, ``quantize_static`` calibrates in bounded memory and reuses ranges it computed before.

    ``method="mse"``: ``quantize_static`` must be called with the Percentile method (whose calibrator exposes the
    raw tensors); the ranges are :func:`mse_range`'s instead. That one cannot be turned off by the variable.
    """
    try:
        qz = importlib.import_module("onnxruntime.quantization.quantize")
    except ImportError:  # pragma: no cover - onnxruntime is a core dependency
        yield
        return
    original = getattr(qz, "create_calibrator", None)
    if method == "mse" and original is None:  # pragma: no cover - every supported ORT has it
        raise RuntimeError("this onnxruntime has no create_calibrator for edgekit's mse calibration to replace")
    if original is None or (os.environ.get("EDGEKIT_ORT_STREAMED_CALIBRATION") == "0" and method is None):
        yield
        return
    sig = inspect.signature(original)

    def create(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        return _Calibrator(lambda: original(*args, **kwargs), dict(bound.arguments), method)

    qz.create_calibrator = create
    try:
        yield
    finally:
        qz.create_calibrator = original


class _Calibrator:
    """Stands in for ORT's calibrator in ``quantize_static``: ``collect_data(reader)`` then ``compute_data()``."""

    def __init__(self, make: Callable[[], Any], args: Dict[str, Any], method: Optional[str] = None):
        self._make, self._args, self._method, self._result = make, args, method, None

    def _key(self, reader) -> Optional[tuple]:
        fingerprint = getattr(reader, "fingerprint", None)
        model = Path(str(self._args.get("model")))
        if fingerprint is None or not model.is_file() or self._args.get("use_external_data_format"):
            return None
        import onnx
        from onnx.external_data_helper import uses_external_data

        proto = onnx.load(str(model), load_external_data=False)
        if any(uses_external_data(t) for t in proto.graph.initializer):
            return None  # the weights live in other files: the model file alone does not name them
        ops = self._args.get("op_types_to_calibrate")
        options = json.dumps(self._args.get("extra_options") or {}, sort_keys=True, default=str)
        return (hashlib.blake2b(model.read_bytes(), digest_size=16).digest(), tuple(ops) if ops else None,
                self._method or str(self._args.get("calibrate_method")), options, fingerprint)

    def collect_data(self, reader) -> None:
        if self._result is not None:
            raise RuntimeError("edgekit's streamed calibration collects once (no CalibStridedMinMax); "
                               "set EDGEKIT_ORT_STREAMED_CALIBRATION=0 to use ORT's")
        key = self._key(reader)
        hit = _RANGES.get(key) if key is not None else None
        if hit is None:
            cal = self._make()
            hit = None
            if self._method == "mse":
                hit = _mse_ranges(cal, reader)
            elif getattr(cal, "method", None) in ("entropy", "percentile") and hasattr(reader, "fingerprint"):
                try:
                    hit = _histogram_ranges(cal, reader)
                except _Fallback:
                    reader.rewind()
            if hit is None:
                cal.collect_data(reader)
                hit = cal.compute_data()
            del cal
            if key is not None:
                if len(_RANGES) >= _RANGES_MAX:
                    _RANGES.clear()
                _RANGES[key] = hit
        self._result = hit

    def compute_data(self):
        return copy.deepcopy(self._result)  # the quantizer adjusts ranges in place


CHUNK_BYTES = 128 * 2**20  # intermediate tensors gathered before each min/max or histogram step


def _outputs(cal, reader, description: str):
    """The tensors to calibrate, by name, for a few inputs at a time (at most about ``CHUNK_BYTES``).

    Gathering inputs keeps the number of NumPy calls near ORT's (one per tensor) on small inputs.
    """
    names = [o.name for o in cal.infer_session.get_outputs()]
    wanted = [i for i, n in enumerate(names) if n in cal.tensors_to_calibrate]
    reader.rewind(description)
    chunk, size = [], 0
    while True:
        inputs = reader.get_next()
        if inputs:
            outs = cal.infer_session.run(None, inputs)
            chunk.append({names[i]: outs[i] for i in wanted})
            size += sum(outs[i].nbytes for i in wanted)
        if chunk and (not inputs or size >= CHUNK_BYTES):
            yield {n: np.concatenate([c[n].ravel() for c in chunk]) for n in chunk[0]}
            chunk, size = [], 0
        if not inputs:
            return


def _histogram_ranges(cal, reader):
    """ORT's HistogramCalibrater result (entropy, percentile), computed in two passes of one input each."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    absolute = cal.method == "percentile" and cal.symmetric  # ORT's collect_absolute_value, else collect_value
    lo: Dict[str, Any] = {}
    hi: Dict[str, Any] = {}
    alo: Dict[str, Any] = {}
    ahi: Dict[str, Any] = {}
    dtypes: Dict[str, Any] = {}
    seen = 0
    for outs in _outputs(cal, reader, "calibrate (ranges)"):  # pass 1
        seen += 1
        for name, flat in outs.items():
            if flat.size == 0 or flat.dtype == np.float64:
                raise _Fallback(name)
            mn, mx = np.nanmin(flat), np.nanmax(flat)
            lo[name] = mn if name not in lo else min(lo[name], mn)
            hi[name] = mx if name not in hi else max(hi[name], mx)
            dtypes[name] = flat.dtype
            if absolute:
                a = np.absolute(flat)
                amn, amx = a.min(), a.max()
                alo[name] = amn if name not in alo else min(alo[name], amn)
                ahi[name] = amx if name not in ahi else max(ahi[name], amx)
    if not seen:
        raise ValueError("No data is collected.")
    ranges = {}
    for name in lo:
        if absolute:
            ranges[name] = (alo[name], ahi[name])
        else:  # as collect_value: a symmetric range around 0 in the tensor's own dtype
            threshold = np.array(max(abs(lo[name]), abs(hi[name])), dtype=dtypes[name])
            ranges[name] = (-threshold, threshold)
    hists: Dict[str, Any] = {}
    for outs in _outputs(cal, reader, "calibrate (histograms)"):  # pass 2
        for name, flat in outs.items():
            counts, edges = np.histogram(np.absolute(flat) if absolute else flat, bins=cal.num_bins,
                                         range=ranges[name])
            if name in hists:
                hists[name][0] += counts
            else:
                hists[name] = [counts, edges]
    collector = HistogramCollector(method=cal.method, symmetric=cal.symmetric, num_bins=cal.num_bins,
                                   num_quantized_bins=cal.num_quantized_bins, percentile=cal.percentile,
                                   scenario=getattr(cal, "scenario", "same"))
    for name, (counts, edges) in hists.items():
        if absolute:
            collector.histogram_dict[name] = (counts, edges.astype(dtypes[name]), lo[name], hi[name])
        else:
            collector.histogram_dict[name] = (counts, edges, lo[name], hi[name], ranges[name][1])
    cal.collector = collector
    return cal.compute_data()


MSE_BINS = 2048  # histogram bins per tensor, as ORT's histogram calibrators use
LEVELS = 256  # an 8-bit activation grid, unsigned or signed alike


def mse_range(counts: np.ndarray, edges: np.ndarray, levels: int = LEVELS) -> tuple:
    """The range [lo, hi] (lo <= 0 <= hi) whose ``levels``-step grid has the least expected squared error.

    Error model per histogram bin of centre c and width w: inside the grid, rounding noise s^2 / 12 (s the step);
    clipped, (c - bound)^2 + w^2 / 12. The zero point is rounded to an integer as ORT does, so 0 stays exact.
    Searched coarse to fine: both ends shrunk by one factor, then the upper end, then the lower end alone.
    """
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    lo0, hi0 = min(float(edges[0]), 0.0), max(float(edges[-1]), 0.0)
    if counts.sum() <= 0 or hi0 - lo0 <= 0:
        return lo0, hi0
    centres, width = (edges[:-1] + edges[1:]) / 2, float(edges[1] - edges[0])
    weights = counts / counts.sum()

    def cost(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:  # lo, hi: (K,) candidates -> (K,) expected error
        s = np.maximum(hi - lo, 1e-30) / (levels - 1)
        zp = np.round(-lo / s)
        qlo, qhi = (-zp * s)[:, None], ((levels - 1 - zp) * s)[:, None]
        c = centres[None, :]
        clipped = np.clip(c, qlo, qhi)
        err = np.where((c < qlo) | (c > qhi), (c - clipped) ** 2 + width ** 2 / 12, (s ** 2 / 12)[:, None])
        return err @ weights

    grid = np.linspace(0.01, 1.0, 100)
    k = int(np.argmin(cost(lo0 * grid, hi0 * grid)))
    lo, hi = lo0 * grid[k], hi0 * grid[k]
    for _ in range(2):
        fine = np.linspace(0.5, 1.5, 101)
        if hi0 > 0:
            his = np.minimum(hi * fine, hi0)
            hi = float(his[int(np.argmin(cost(np.full_like(his, lo), his)))])
        if lo0 < 0:
            los = np.maximum(lo * fine, lo0)
            lo = float(los[int(np.argmin(cost(los, np.full_like(los, hi))))])
    return lo, hi


def _mse_ranges(cal, reader):
    """Per tensor the :func:`mse_range` of its histogram over [min, max], in two passes of bounded memory."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

    lo: Dict[str, Any] = {}
    hi: Dict[str, Any] = {}
    dtypes: Dict[str, Any] = {}
    for outs in _outputs(cal, reader, "calibrate (ranges)"):
        for name, flat in outs.items():
            if flat.size == 0:
                continue  # no values to place on a grid; ORT leaves such a tensor alone too
            mn, mx = float(np.nanmin(flat)), float(np.nanmax(flat))
            lo[name] = mn if name not in lo else min(lo[name], mn)
            hi[name] = mx if name not in hi else max(hi[name], mx)
            dtypes[name] = np.float16 if flat.dtype == np.float16 else np.float32
    if not lo:
        raise ValueError("No data is collected.")
    hists: Dict[str, Any] = {}
    for outs in _outputs(cal, reader, "calibrate (histograms)"):
        for name, flat in outs.items():
            if name not in lo:
                continue
            rng = (min(lo[name], 0.0), max(hi[name], 0.0))
            if rng[1] - rng[0] <= 0:
                continue
            counts, edges = np.histogram(flat.astype(np.float64, copy=False), bins=MSE_BINS, range=rng)
            if name in hists:
                hists[name][0] += counts
            else:
                hists[name] = [counts, edges]
    data = {}
    for name in lo:
        a, b = mse_range(*hists[name]) if name in hists else (min(lo[name], 0.0), max(hi[name], 0.0))
        data[name] = TensorData(lowest=np.array(a, dtype=dtypes[name]), highest=np.array(b, dtype=dtypes[name]))
    return TensorsData(CalibrationMethod.Percentile, data)
