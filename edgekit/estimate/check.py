"""Is this machine as fast as when its kernel table was timed? ``speed_check`` rebuilds some of the table's own random
networks from their seeds, re-times them and compares (``edgekit devices check``); a table whose networks no longer
rebuild into the graphs it timed is refused."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from ..errors import EdgekitError
from .host import cpu_name, quantize_for, time_onnx
from .kernels.detect import graph_kernels
from .kernels.features import COLD_MB
from .synthetic import export_random_net, is_long
from .tables import load_table, net_spans


REFERENCE_NETS = 12  # calibration networks re-timed by ``speed_check``: half fp32, half int8, weights in cache
REFERENCE_PAST_CACHE = 4  # and fp32 ones whose weights pass the cache (``cold_mb``)


def reference_records(table: dict, count: int = REFERENCE_NETS, past_cache: int = REFERENCE_PAST_CACHE,
                      min_ms: float = 0.2, max_ms: float = 3.0) -> List[dict]:
    """Calibration networks of a table for a speed check: ``count`` whose weights fit in cache, half fp32, half int8,
    and ``past_cache`` fp32 ones whose weights do not (a host slowed by another tenant on the memory bus slows those
    most), each group spread evenly over its wall times from ``min_ms`` to ``max_ms`` (the zoo's range, quick to
    re-time; the smallest networks run from cache and barely feel a slow memory), its slowest and fastest included.
    Copies of the records, with ``weights_mb`` and ``past_cache`` added."""
    spans = net_spans(table) if "kernels" in table else None
    cold = float(table.get("cold_mb", COLD_MB))
    recs = []
    for n, r in enumerate(table.get("nets", [])):
        if not r.get("name", "").startswith("net"):
            continue
        mb = table["kernels"][spans[n][0]]["desc"].get("model_weight_bytes", 0) / 1e6 if spans and spans[n] else 0.0
        recs.append({**r, "weights_mb": round(mb, 3), "past_cache": mb > cold})
    picked: List[dict] = []
    for prec, big, n in (("fp32", False, count - count // 2), ("int8", False, count // 2), ("fp32", True, past_cache)):
        mine = [r for r in recs if r.get("precision") == prec and r["past_cache"] == big]
        pool = sorted([r for r in mine if min_ms <= r.get("wall_ms", 0) <= max_ms] or mine, key=lambda r: r["wall_ms"])
        if pool and n:
            picked += [pool[int(round(i))] for i in np.linspace(0, len(pool) - 1, min(n, len(pool)))]
    return picked


def build_reference(table: dict, records: Sequence[dict], device, folder: Path) -> List[Tuple[dict, Path]]:
    """Rebuild calibration networks from the table's seeds (``net{i}`` is ``RandomNet(seed0 + i)``, exported and
    quantized as at calibration). A network whose rebuilt graph does not run the same number of kernels as the
    one timed (another ONNX Runtime or exporter) is left out: its time would not be comparable."""
    out = []
    for rec in records:
        i = int(rec["name"].split(".")[0][3:])
        fp32, shape = export_random_net(int(table["seed0"]) + i, Path(folder) / f"net{i}.fp32.onnx", long=is_long(i))
        path = fp32 if rec["precision"] == "fp32" else quantize_for(fp32, Path(folder) / f"net{i}.int8.onnx",
                                                                    shape, device)
        if len(graph_kernels(path, int(table["threads"]))[0]) == int(rec.get("kernels", -1)):
            out.append((rec, path))
    return out


def speed_ratios(pairs: Sequence[Tuple[dict, float]]) -> dict:
    """From (reference record, wall ms now) pairs: the median of now / then over the networks whose weights fit in
    cache (``ratio``), per precision among those, and over those whose weights pass it (``past_cache``)."""
    ratio = [(r["precision"], bool(r.get("past_cache")), ms / r["wall_ms"]) for r, ms in pairs]
    out = {"ratio": float(np.median([v for _, b, v in ratio if not b])) if any(not b for _, b, _ in ratio)
           else float("nan")}
    for key, pick in (("fp32", lambda p, b: p == "fp32" and not b), ("int8", lambda p, b: p == "int8" and not b),
                      ("past_cache", lambda p, b: b)):
        v = [x for p, b, x in ratio if pick(p, b)]
        if v:
            out[key] = float(np.median(v))
    return out


def speed_check(path: Path, device, count: int = REFERENCE_NETS, past_cache: int = REFERENCE_PAST_CACHE,
                rounds: int = 3, runs: int = 40, progress: bool = True) -> dict:
    """How fast this host runs now against when its kernel table was timed: ``count`` of the table's own
    calibration networks whose weights fit in cache and ``past_cache`` whose weights do not (``reference_records``),
    rebuilt from their seeds and timed here round-robin (``rounds`` p50s each, their median), against their
    calibrated wall time. The kernel table's estimates describe the host as it was then; a shared
    machine can run 10-40% slower for minutes to hours (another tenant on the cache or the memory bus), and no
    estimate made from the table can know that."""
    table = load_table(Path(path))
    threads = int(table["threads"])
    with tempfile.TemporaryDirectory(prefix="edgekit-speed-") as tmp:
        recs = reference_records(table, count, past_cache)
        items = range(len(recs))
        if progress:
            from ..progress import track
            items = track(items, description="rebuilding reference networks")
        built: List[Tuple[dict, Path]] = []
        for j in items:
            built += build_reference(table, recs[j:j + 1], device, Path(tmp))
        if not built:
            raise EdgekitError(f"None of the calibration networks of {Path(path).name} rebuilds into the graph that was "
                               f"timed ({table.get('date')}, ONNX Runtime {table.get('onnxruntime')}): edgekit's random "
                               f"networks or ONNX Runtime changed since; recalibrate (`edgekit devices calibrate`)")
        times: List[List[float]] = [[] for _ in built]
        rng = np.random.default_rng(0)
        for _ in range(rounds):
            for j in rng.permutation(len(built)):
                times[j].append(time_onnx(built[j][1], threads, warmup=5, runs=runs))
    now = [float(np.median(t)) for t in times]
    return {**speed_ratios([(r, ms) for (r, _), ms in zip(built, now)]), "table": Path(path).name,
            "table_date": table.get("date"), "table_host": table.get("host"), "host": cpu_name(), "threads": threads,
            "cold_mb": float(table.get("cold_mb", COLD_MB)),
            "nets": [{"name": r["name"], "precision": r["precision"], "kernels": r["kernels"], "weights_mb": r["weights_mb"],
                      "past_cache": r["past_cache"], "calibrated_ms": r["wall_ms"], "now_ms": ms}
                     for (r, _), ms in zip(built, now)]}
