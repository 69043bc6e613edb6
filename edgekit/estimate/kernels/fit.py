"""The closed-form fits inside a kernel model: a convolution type's additive cost prior and the plain executor
overhead line (``wall = a + b * kernels + c * sum of kernel µs``)."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

PRIOR_COLUMNS = ("groups", "macs", "weights", "out", "in0", "in_other")


def _prior_design(descs: Sequence[Dict[str, int]]) -> np.ndarray:
    return np.array([[1.0] + [float(d.get(c, 0)) for c in PRIOR_COLUMNS] for d in descs])


def fit_cost_prior(descs: Sequence[Dict[str, int]], us) -> np.ndarray:
    """An additive cost model of a convolution kernel type, µs = c0 + c1 * groups + c2 * MACs + c3 * weights +
    c4 * outputs + c5 * inputs + c6 * other inputs, every c >= 0 (non-negative least squares on relative error).

    Each term is a resource the kernel spends: a call per group (ORT runs a grouped convolution as one GEMM per
    group), arithmetic, weight reads and activation traffic. A sum extrapolates where log-linear lines and forests
    cannot: MicroNet's 1x1 convs in 384-576 groups of 2 channels at 2x2 cost 0.12 µs a group (66 µs), the
    random networks' largest such kernels have 50-360 groups, and the line and forest alone said 26 µs. Its log
    is one more feature of the key's ridge line and forest."""
    from scipy.optimize import nnls

    A = _prior_design(descs)
    y = np.asarray(us, dtype=float)
    scale = np.maximum(A.max(axis=0), 1e-9)
    coef, _ = nnls((A / scale) / y[:, None], np.ones(len(y)))
    return coef / scale


def log_prior(descs: Sequence[Dict[str, int]], coef: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(_prior_design(descs) @ coef, 0.5))[:, None]


def fit_overhead(nets: Sequence[dict]) -> dict:
    """wall = a + b * kernels + c * sum(kernel µs), least squares on relative error."""
    n = np.array([r["kernels"] for r in nets], dtype=float)
    s = np.array([r["sum_us"] for r in nets], dtype=float)
    wall = np.array([r["wall_ms"] * 1e3 for r in nets], dtype=float)
    A = np.stack([np.ones_like(n), n, s], axis=1) / wall[:, None]
    coef, *_ = np.linalg.lstsq(A, np.ones_like(wall), rcond=None)
    return {"a_us": float(coef[0]), "b_us": float(coef[1]), "c": float(coef[2])}
