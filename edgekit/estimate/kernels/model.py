"""The per-kernel latency model of a kernel table: ``KernelModel`` predicts each kernel's time from its shape and
adds the executor fit; ``estimate_from_table`` is the estimate of an ONNX file from it (docs/latency-model.md)."""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ...config import DeviceProfile
from ...errors import EdgekitError
from ..host import cpu_name
from ..ops import SOURCE, open_onnx
from ..tables import load_table, net_spans
from .detect import graph_kernels
from .features import (AGG_EDGES_US, COLD_MB, CONV_LIKE, KERNEL_CATEGORIES, Kernel, bin_features, canonical,
                       category_counts, cold_curve_rate, cold_mb, family, features, kernel_weights, predictor_key)
from .fit import fit_cost_prior, fit_overhead, log_prior

MIN_SAMPLES = 6  # a kernel type with fewer calibration samples is reported as unseen (its family carries it)
MIN_NETS_PER_PRECISION = 20  # fewer calibration networks of a precision: the shared overhead fit
AGG_FOLDS = 4
AGG_RIDGE = 0.01  # a light pull of the executor fit's coefficients to 0 (its rows are relative errors)
FOREST_TREES = 40  # trees per kernel type's residual forest


class KernelModel:
    """Per-kernel-type ridge line plus a random forest on its residuals, on log(µs); kernel types with
    fewer than ``MIN_SAMPLES`` calibration samples are predicted by one gradient-boosted model over all
    kernels (features + kernel type + op family one-hot, so a rare type borrows from its family); then
    the executor-overhead fit for the graph's precision."""

    def __init__(self, table: dict, seed: int = 0):
        from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
        from sklearn.linear_model import Ridge

        self.table = table
        self.seed = int(seed)  # the forests' and the boosted model's random state (``model_seeds`` in the bench)
        self.cold_mb = float(table.get("cold_mb", COLD_MB))
        self.cold_curve = table.get("cold_curve") if table.get("cold_us_per_mb") else None
        samples = table["kernels"]
        warm = [s for s in samples if s["desc"].get("model_weight_bytes", 0) < self.cold_mb * 1e6]
        if len(warm) >= len(samples) // 2:  # the kernels as they run with their weights in cache
            samples = warm
        self.keys = sorted({predictor_key(s["key"]) for s in samples})
        self.families = sorted({family(k) for k in self.keys})
        keys = np.array([predictor_key(s["key"]) for s in samples])
        feats = np.array([features(canonical(family(s["key"]), dict(s["desc"]))) for s in samples], dtype=float)
        us = np.array([s["us"] for s in samples], dtype=float)
        y = np.log(np.maximum(us, 0.5))
        self.pooled = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, min_samples_leaf=10,
                                                    random_state=self.seed).fit(self._design(keys, feats), y)
        self.forests = {}
        self.counts = {}
        self.priors: Dict[str, np.ndarray] = {}
        for k in self.keys:
            m = keys == k
            self.counts[k] = int(m.sum())
            if m.sum() >= MIN_SAMPLES:
                x = feats[m]
                if family(k) in CONV_LIKE:
                    rows = [samples[i]["desc"] for i in np.flatnonzero(m)]
                    self.priors[k] = fit_cost_prior(rows, us[m])
                    x = np.hstack([x, log_prior(rows, self.priors[k])])
                line = Ridge(alpha=1.0).fit(x, y[m])
                rf = None
                if m.sum() >= 2 * MIN_SAMPLES:
                    rf = RandomForestRegressor(n_estimators=FOREST_TREES, min_samples_leaf=2, random_state=self.seed, n_jobs=1)
                    rf.fit(x, y[m] - line.predict(x))
                self.forests[k] = (line, rf)
        self.overhead = table["overhead"]
        agg = table.get("aggregate") or {}
        # an executor fit with category columns (``categories``: they must be today's), or one without (older tables)
        self.agg_categories = "categories" in agg
        n_cat = len(KERNEL_CATEGORIES) if self.agg_categories else 0
        self.aggregate = {p: np.asarray(agg[p], dtype=float) for p in ("fp32", "int8")
                          if p in agg and list(agg.get("edges_us", ())) == list(AGG_EDGES_US)
                          and agg.get("cold_mb") == self.cold_mb and len(agg[p]) == 2 * len(AGG_EDGES_US) + 4 + n_cat
                          and agg.get("categories", list(KERNEL_CATEGORIES)) == list(KERNEL_CATEGORIES)}
        nets = table.get("nets", [])
        self.overhead_by_precision = {p: fit_overhead([r for r in nets if r.get("precision") == p])
                                      for p in ("fp32", "int8")
                                      if sum(r.get("precision") == p for r in nets) >= MIN_NETS_PER_PRECISION}

    def _design(self, keys: Sequence[str], feats: np.ndarray) -> np.ndarray:
        kx = {k: i for i, k in enumerate(self.keys)}
        fx = {f: i for i, f in enumerate(self.families)}
        onehot = np.zeros((len(keys), len(kx) + len(fx)))
        for i, k in enumerate(keys):
            if k in kx:
                onehot[i, kx[k]] = 1.0
            if family(k) in fx:
                onehot[i, len(kx) + fx[family(k)]] = 1.0
        return np.hstack([feats.reshape(len(keys), -1), onehot])

    def predict_us(self, kernels: Sequence[Kernel]) -> np.ndarray:
        if not kernels:
            return np.zeros(0)
        keys = [predictor_key(k.key) for k in kernels]
        feats = np.array([k.features for k in kernels], dtype=float)
        out = np.exp(self.pooled.predict(self._design(keys, feats)))
        for key, (line, rf) in self.forests.items():
            m = np.array([k == key for k in keys])
            if m.any():
                x = feats[m]
                if key in self.priors:
                    x = np.hstack([x, log_prior([kernels[i].desc for i in np.flatnonzero(m)], self.priors[key])])
                out[m] = np.exp(line.predict(x) + (rf.predict(x) if rf is not None else 0.0))
        return out

    def estimate_ms(self, kernels: Sequence[Kernel], precision: Optional[str] = None, kernel_us=None) -> float:
        """Model latency (ms) of a graph's kernels (``graph_kernels``): their predicted times (``kernel_us``, else
        ``predict_us``), then the executor fit."""
        us = self.predict_us(kernels) if kernel_us is None else kernel_us
        return self.total_ms(us, precision, kernels[0].desc.get("model_weight_bytes", 0) if kernels else 0,
                             kernel_weights(kernels), [k.key for k in kernels])

    def trained_on(self, key: str) -> int:
        """Calibration samples behind the predictor of a kernel key."""
        return self.counts.get(predictor_key(key), 0)

    def overhead_for(self, precision: Optional[str] = None) -> dict:
        return self.overhead_by_precision.get(precision or "", self.overhead)

    def cold_column(self, model_bytes: float, kernel_weights: Optional[Sequence[float]] = None) -> float:
        """The executor fit's cache column: ``cold_mb()``, scaled where the table has a cold curve by how the
        model's weights are spread over kernels (the weight-weighted cold rate of its kernels, relative to the
        table's ``cold_us_per_mb``): 8 MB in 0.1 MB 1x1 convs cost more than 8 MB in 2 MB ones."""
        cold = cold_mb(model_bytes, self.cold_mb)
        w = np.asarray(kernel_weights if kernel_weights is not None else [], dtype=float)
        if cold <= 0 or not self.cold_curve or w.sum() <= 0:
            return cold
        kernel_mb = w[w > 0] * (float(model_bytes) / 1e6) / w.sum()
        rate = float(np.sum(kernel_mb * cold_curve_rate(self.cold_curve, kernel_mb)) / kernel_mb.sum())
        return cold * rate / float(self.table["cold_us_per_mb"])

    def total_ms(self, kernel_us: np.ndarray, precision: Optional[str] = None, model_bytes: float = 0,
                 kernel_weights: Optional[Sequence[float]] = None, kernel_keys: Optional[Sequence[str]] = None) -> float:
        """Model latency from predicted kernel times (and the model's weight bytes, each kernel's weight count,
        ``desc["weights"]``, and its key): the table's stacked, binned executor fit for the graph's precision when it
        has one, else a + b * kernels + c * sum. An executor fit with category columns needs ``kernel_keys``."""
        if precision in self.aggregate:
            x = bin_features(kernel_us)
            if self.agg_categories:
                if kernel_keys is None or len(kernel_keys) != len(kernel_us):
                    raise ValueError("this kernel table's executor fit counts kernels by category: pass kernel_keys")
                x = np.append(x, category_counts(kernel_keys))
            x = np.append(x, self.cold_column(model_bytes, kernel_weights))
            ms = float(self.aggregate[precision] @ x) / 1e3
            if ms > 0:
                return ms
        o = self.overhead_for(precision)
        return (o["a_us"] + o["b_us"] * len(kernel_us) + o["c"] * float(np.sum(kernel_us))) / 1e3


def fit_aggregate(table: dict, folds: int = AGG_FOLDS, seed: int = 0) -> Optional[dict]:
    """The stacked executor fit: per precision, least squares on relative error
    of wall ~ a + sum over bins (b * kernels + c * µs) + sum over ``KERNEL_CATEGORIES`` (e * kernels) + d * cold MB,
    on out-of-fold kernel predictions (kernel models with random state ``seed``). None when the table cannot say which samples belong to which network or
    has too few networks."""
    spans = net_spans(table)
    nets = table.get("nets", [])
    precisions = [p for p in ("fp32", "int8") if sum(r.get("precision") == p for r in nets) >= MIN_NETS_PER_PRECISION]
    if spans is None or not precisions:
        return None
    fold = np.random.default_rng(0).permutation(len(nets)) % folds
    rows: List[Optional[np.ndarray]] = [None] * len(nets)
    for f in range(folds):
        train = [r for n, r in enumerate(nets) if fold[n] != f]
        sub = {**table, "nets": train, "aggregate": None,
               "kernels": [table["kernels"][j] for n in range(len(nets)) if fold[n] != f for j in spans[n]]}
        km = KernelModel(sub, seed=seed)
        for n in np.flatnonzero(fold == f):
            ks = [Kernel("", "", table["kernels"][j]["key"], table["kernels"][j]["desc"]) for j in spans[n]]
            mbytes = ks[0].desc.get("model_weight_bytes", 0) if ks else 0
            rows[n] = np.concatenate([bin_features(km.predict_us(ks)), category_counts([k.key for k in ks]),
                                      [km.cold_column(mbytes, kernel_weights(ks))]])
    out = {"edges_us": list(AGG_EDGES_US), "folds": folds, "cold_mb": float(table.get("cold_mb", COLD_MB)),
           "categories": list(KERNEL_CATEGORIES)}
    probe = table.get("cold_us_per_mb")  # measured by ``cold_probe``: the cold column's rate is not fitted
    if probe is not None:
        out["cold_us_per_mb"] = float(probe)
    for p in precisions:
        ix = [n for n, r in enumerate(nets) if r.get("precision") == p]
        wall = np.array([nets[n]["wall_ms"] * 1e3 for n in ix])
        R = np.array([rows[n] for n in ix])
        target = np.ones(len(ix))
        if probe is not None:
            target = 1.0 - float(probe) * R[:, -1] / wall
            R = R[:, :-1]
        X = R / wall[:, None]
        X = np.vstack([X, AGG_RIDGE * np.eye(X.shape[1])])
        coef, *_ = np.linalg.lstsq(X, np.concatenate([target, np.zeros(X.shape[1])]), rcond=None)
        out[p] = [float(c) for c in coef] + ([float(probe)] if probe is not None else [])
    return out


@lru_cache(maxsize=4)
def _model_for(path: str, mtime: float) -> KernelModel:
    return KernelModel(load_table(Path(path)))


def kernel_model(path: Path) -> KernelModel:
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"Kernel latency table not found: {path}")
    return _model_for(str(path.resolve()), path.stat().st_mtime)


def clear_model_cache() -> None:
    """Forget the kernel models fitted so far (after a table file was rewritten in place)."""
    _model_for.cache_clear()


def estimate_kernels(model_path, table_path: Path, threads: int) -> dict:
    """Estimated latency of an ONNX file from its ONNX Runtime kernels, with each kernel's prediction."""
    km = kernel_model(table_path)
    if int(km.table.get("threads", threads)) != int(threads):
        raise EdgekitError(f"The kernel table {Path(table_path).name} was measured at {km.table['threads']} "
                           f"thread(s), not {threads}")
    kernels, precision = graph_kernels(model_path, threads)
    us = km.predict_us(kernels)
    for k, t in zip(kernels, us):
        k.predicted_us = float(t)
    total = km.estimate_ms(kernels, precision, us)
    by_key: Dict[str, dict] = {}
    for k in kernels:
        row = by_key.setdefault(k.key, {"kernels": 0, "ms": 0.0, "trained_on": km.trained_on(k.key)})
        row["kernels"] += 1
        row["ms"] += k.predicted_us / 1e3
    return {"ms": total, "kernels": kernels, "precision": precision, "by_kernel": by_key,
            "unseen": sorted(k for k, v in by_key.items() if v["trained_on"] < MIN_SAMPLES)}


def estimate_from_table(model, device: DeviceProfile, table: Path, threads: int, per_op: bool = False) -> dict:
    """The per-kernel regression's estimate (ms) of an ONNX model (a path or a ModelProto) on ``device`` from the kernel
    table ``table``, with its breakdown; a warning when the table was timed on another CPU than this local one."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="edgekit-est-") as tmp:
        path = model
        if not isinstance(model, (str, Path)):
            path = Path(tmp) / "model.onnx"
            onnx.save(model, str(path))
        open_onnx(path, load_external_data=False)
        est = estimate_kernels(path, table, threads)
    km = kernel_model(table)
    t = km.table
    kernels = est["kernels"]
    result = {
        "source": SOURCE,
        "method": "per-kernel regression: ONNX Runtime's optimized graph, each kernel's time predicted from "
                  "its shape by a ridge line and a forest trained on profiled random networks, plus executor overhead",
        "device": device.name,
        "threads": threads,
        "p50": est["ms"],
        "mean": est["ms"],
        "estimate_ms": est["ms"],
        "session_overhead_ms": km.overhead_for(est["precision"])["a_us"] / 1e3,
        "ops": len(kernels),
        "gmacs": sum(k.desc.get("macs", 0) for k in kernels) / 1e9,
        "precisions": [est["precision"]],
        "by_category": {k: {"ops": v["kernels"], "ms": v["ms"], "trained_on": v["trained_on"], "source": SOURCE}
                        for k, v in sorted(est["by_kernel"].items())},
        "unseen_kernels": est["unseen"],
        "calibration": {"host": t.get("host"), "date": t.get("date"), "threads": t.get("threads"),
                        "onnxruntime": t.get("onnxruntime"), "random_networks": len(t.get("nets", [])),
                        "kernel_samples": len(t["kernels"]), "table": table.name},
    }
    here = cpu_name()
    if device.local and t.get("host") and t["host"] != here:  # a kernel table only holds for the CPU it timed
        result["warnings"] = [f"{table.name} was timed on {t['host']} ({t.get('date')}), not on this machine "
                              f"({here}): estimates for this machine can be far off until it is re-timed here "
                              f"(`edgekit devices calibrate {device.name}`)"]
    if isinstance(model, (str, Path)):
        result["artifact"] = str(model)
    if per_op:
        result["per_op"] = [{"name": k.name, "op_type": k.op, "category": k.key, "time_us": k.predicted_us,
                             **k.desc, "source": SOURCE} for k in kernels]
    return result
