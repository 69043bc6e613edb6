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
                        warmup: int = 10, rounds: int = 100, description: str = "benchmark",
                        raw: bool = False) -> Dict[str, Dict]:
    """Time several variants round-robin so machine noise hits them alike; ratios stay fair.

    The order is shuffled every round (seeded), so no variant always runs right after the
    same neighbour and inherits its cache state. ``raw`` adds each variant's per-round
    times (``"times"``, paired by round) for confidence intervals on ratios.
    """
    for run in runs_by_name.values():
        for _ in range(warmup):
            run(x)
    times: Dict[str, List[float]] = {k: [] for k in runs_by_name}
    order = list(runs_by_name)
    rng = np.random.default_rng(0)
    for _ in track(range(rounds), description, total=rounds):
        rng.shuffle(order)
        for name in order:
            run = runs_by_name[name]
            t0 = time.perf_counter()
            run(x)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: {**percentiles(v), **({"times": v} if raw else {})} for k, v in times.items()}


def ratio_interval(slow: Sequence[float], fast: Sequence[float], n_boot: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """p50(slow) / p50(fast) and its 95% bootstrap interval, resampling the rounds in pairs.

    Tells a real speed difference from the machine's noise: only when the whole
    interval lies below (above) 1 is one variant slower (faster) than the other.
    """
    a, b = np.asarray(slow), np.asarray(fast)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    boot = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    return float(np.median(a) / np.median(b)), float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))
