"""Latency estimated from an ONNX graph, for a device that is not measured: ``estimate(onnx, device, threads)``.

Two methods, chosen by the device profile: per-kernel regression where it ships a kernel table for the thread count
(``kernels/``, ``tables.py``), else a per-operator roofline with the profile's coefficients (``graph.py``,
``roofline.py``). Every result is labelled ``source: "estimated"``: it is a model, not a measurement. How both work
and how they were fitted: docs/latency-model.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from ..config import DeviceProfile, LatencyModel, load_device
from ..results import ESTIMATED, Latency
from .roofline import estimate_roofline
from .tables import kernel_table_for

__all__ = ["estimate"]


def estimate(onnx_path: Union[str, Path], device: Union[str, DeviceProfile], threads: Optional[int] = None, *,
             per_op: bool = False, lm: Optional[LatencyModel] = None) -> Latency:
    """The estimated batch-1 latency (ms) of an ONNX file (or an ``onnx.ModelProto``) on ``device`` at ``threads``
    (default: the profile's).

    ``extra`` holds the breakdown (``ops``, ``gmacs``, ``by_category``, ``calibration``, ``warnings`` when the kernel
    table was timed on another CPU, ``per_op`` with ``per_op=True``) and ``coefficients``, report.json's name for where
    the coefficients came from. ``lm`` replaces the profile's latency model (benchmarks compare the two methods).
    """
    dev = load_device(device) if isinstance(device, str) else device
    lm = lm or dev.latency_model
    threads = int(threads or dev.resolved_threads())
    table = kernel_table_for(lm, threads)
    if table is not None:
        from .kernels.model import estimate_from_table

        r = estimate_from_table(onnx_path, dev, table, threads, per_op)
    else:
        r = estimate_roofline(onnx_path, dev, threads, lm, per_op)
    p50, name, threads, method = r.pop("p50"), r.pop("device"), r.pop("threads"), r.pop("method")
    r.pop("source")
    return Latency(p50=p50, source=ESTIMATED, device=name, threads=threads, method=method,
                   extra={**r, "coefficients": r["calibration"]})
