"""This machine, as calibration and checks see it: its CPU and caches, ONNX Runtime sessions and timing, and int8
graphs quantized the way a device profile says."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import DeviceProfile
from ..errors import EdgekitError
from ..hostinfo import cpu_flags, cpu_name  # noqa: F401 - the estimator reads this machine through host


def l2_kb_per_core() -> Optional[float]:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        try:
            if (idx / "level").read_text().strip() == "2":
                size = (idx / "size").read_text().strip().upper()
                return float(size[:-1]) * (1024 if size.endswith("M") else 1) if size[-1] in "KM" else float(size)
        except (OSError, ValueError):
            continue
    return None


def largest_cache_kb() -> int:
    """The largest cache of CPU 0 (Linux sysfs; its last level), in KB; 0 when sysfs does not say."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip().upper()
            kb = int(size.rstrip("KMB")) * (1024 if size.endswith("M") else 1)
            best = max(best, kb)
        except (OSError, ValueError):
            continue
    return best


def host_layout(threads: int) -> dict:
    """What ONNX Runtime does on this CPU: NCHWc block (x86: 16 with AVX-512, 8 with AVX2), int8 channel
    alignment, and the cache the threads share (L2 per core x threads)."""
    flags = cpu_flags()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686")
    block = (16 if "avx512f" in flags else 8 if ("avx2" in flags or "avx" in flags) else 0) if x86 else 0
    out = {"channel_block": block, "int8_channel_align": 16 if x86 else 0}
    l2 = l2_kb_per_core()
    if l2:
        out["cache_kb"] = l2 * max(1, min(threads, os.cpu_count() or 1))
    return out


def ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def ort_session(path: Path, threads: int, profile_prefix: Optional[str] = None, optimized: Optional[Path] = None):
    """An ONNX Runtime CPU session as edgekit's runners make one (all graph optimizations, ``threads`` intra-op);
    ``profile_prefix`` turns ORT's profiler on, ``optimized`` saves the optimized graph there."""
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


def time_onnx(path: Path, threads: int, warmup: int = 5, runs: int = 50) -> float:
    """p50 latency in ms of one ORT session on a random input (the way the runners measure)."""
    sess = ort_session(path, threads)
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


def quantize_for(fp32: Path, out: Path, shape, device: DeviceProfile) -> Path:
    """``fp32`` quantized to int8 with the device profile's settings, calibrated on four seeded random inputs of
    ``shape`` (calibration graphs have no data set)."""
    from ..export.onnx_int8 import OrtQuantConfig, quantize_onnx
    q = device.quantization
    cfg = OrtQuantConfig(activation_type=q.activation_type, weight_type=q.weight_type, per_channel=q.per_channel)
    calib = np.random.default_rng(2).standard_normal((4, *shape[1:])).astype(np.float32)
    return quantize_onnx(fp32, out, calib, cfg)
