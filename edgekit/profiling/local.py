"""Latency measured on this machine: warm-up, then percentiles over timed runs."""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence

import numpy as np

from ..progress import track


def percentiles(times_ms: Sequence[float]) -> Dict[str, float]:
    t = np.asarray(times_ms)
    return {"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90)),
            "mean": float(t.mean()), "min": float(t.min()), "runs": int(len(t))}


def measure_latency(run: Callable[[np.ndarray], object], x: np.ndarray, warmup: int = 10, runs: int = 100,
                    description: str = "benchmark") -> Dict[str, float]:
    """Batch latency in milliseconds for ``run(x)``."""
    for _ in range(warmup):
        run(x)
    times: List[float] = []
    for _ in track(range(runs), description, total=runs):
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return percentiles(times)


def interleaved_latency(runs_by_name: Dict[str, Callable[[np.ndarray], object]], x: np.ndarray,
                        warmup: int = 10, rounds: int = 100, description: str = "benchmark") -> Dict[str, Dict]:
    """Time several variants round-robin so machine noise hits them alike; ratios stay fair."""
    for run in runs_by_name.values():
        for _ in range(warmup):
            run(x)
    times: Dict[str, List[float]] = {k: [] for k in runs_by_name}
    for _ in track(range(rounds), description, total=rounds):
        for name, run in runs_by_name.items():
            t0 = time.perf_counter()
            run(x)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: percentiles(v) for k, v in times.items()}
