"""Timing a kernel table on this machine: random networks profiled kernel by kernel (``calibrate_kernels``,
``calibrate_device``), and the probe of what weights past the cache cost (``cold_probe``, ``reprobe_cold``)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import EdgekitError
from ..calibrate import write_latency_model
from ..host import cpu_name, largest_cache_kb, ort_version, quantize_for, time_onnx
from ..synthetic import export_random_net, is_long
from ..tables import DEVICES_DIR, TABLE_VERSION, load_table, save_table
from .detect import graph_kernels
from .features import COLD_MB, cold_mb
from .fit import fit_overhead
from .model import clear_model_cache, fit_aggregate


def measure_net(path: Path, threads: int, runs: int = 60) -> Tuple[List[dict], dict]:
    """Per-kernel samples and the whole-graph record of one ONNX file timed here."""
    kernels, precision, times = graph_kernels(path, threads, runs=runs)
    samples = [{"key": k.key, "desc": k.desc, "us": times[k.name]}
               for k in kernels if k.name in times]
    wall = time_onnx(path, threads, warmup=10, runs=max(100, runs))
    return samples, {"name": Path(path).stem, "precision": precision, "kernels": len(kernels), "samples": len(samples),
                     "sum_us": float(sum(times.get(k.name, 0.0) for k in kernels)), "wall_ms": wall}


def cache_threshold_mb() -> float:
    """A quarter of this CPU's last-level cache, else ``COLD_MB``: on a 32 MB L3 shared with other tenants, 8 MB of
    weights is where the zoo's kernels start to run slower than the same shapes in small networks (4, 8 and 12 MB
    tried: 8 fitted both the random networks and the zoo best)."""
    best = largest_cache_kb()
    return best / 1024 / 4 if best >= 4096 else COLD_MB


def calibrate_kernels(device, threads: int, nets: int = 60, out: Optional[Path] = None, seed0: int = 1000,
                      runs: int = 60, progress: bool = True, wall_passes: int = 3) -> dict:
    """Time ``nets`` random networks (fp32 and int8) kernel by kernel here and write the kernel table.

    Every ``LONG_EVERY``-th network is long and narrow (3-8 blocks a stage at half width): 100-270 kernels
    of a few µs each, the regime of ShuffleNetV2-x0.5 and MicroNet, where the executor's cost per kernel
    decides the total and which the 1-3 blocks a stage of the others (37-86 kernels) never reach.

    Each graph's wall-clock p50 is the median of the one taken right after its kernels were profiled and
    ``wall_passes`` more, taken afterwards round-robin over all graphs in shuffled orders: a slow spell of a
    shared machine during one stretch of the calibration otherwise labels a run of networks slow that their
    kernels do not explain (one such run left 15% of the random networks' own fits off by more than 15%).

    Then ``cold_probe`` measures what weights past the cache cost per MB; the executor fit's cold column
    uses that rate."""
    from ...progress import track

    samples: List[dict] = []
    records: List[dict] = []
    graphs: List[Path] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgekit-kcal-") as tmp:
        for i in (track(range(nets), description="timing random networks") if progress else range(nets)):
            fp32, shape = export_random_net(seed0 + i, Path(tmp) / f"net{i}.fp32.onnx", long=is_long(i))
            int8 = quantize_for(fp32, Path(tmp) / f"net{i}.int8.onnx", shape, device)
            for p in (fp32, int8):
                s, rec = measure_net(p, threads, runs=runs)
                samples += s
                records.append(rec)
                graphs.append(p)
        walls = [[r["wall_ms"]] for r in records]
        rng = np.random.default_rng(seed0)
        passes = range(wall_passes)
        for _ in (track(passes, description="re-timing whole networks") if progress else passes):
            for j in rng.permutation(len(graphs)):
                walls[j].append(time_onnx(graphs[j], threads, warmup=5, runs=max(20, runs // 2)))
        for r, w in zip(records, walls):
            r["wall_ms"] = float(np.median(w))
            r["wall_passes_ms"] = [round(v, 5) for v in w]
    table = {"version": TABLE_VERSION, "threads": int(threads), "seed0": int(seed0), "host": cpu_name(),
             "machine": platform.machine(),
             "onnxruntime": ort_version(), "date": _dt.date.today().isoformat(), "nets": records,
             "measure_s": round(time.perf_counter() - t0, 1), "wall_passes": 1 + int(wall_passes), "kernels": samples,
             "cold_mb": cache_threshold_mb()}
    set_cold_probe(table, cold_probe(threads, table["cold_mb"], rounds=3 if runs >= 30 else 1, runs=max(20, 3 * runs)))
    table["overhead"] = fit_overhead(records)
    table["aggregate"] = fit_aggregate(table)
    if out:
        save_table(table, Path(out))
    return table


def set_cold_probe(table: dict, probe: dict) -> None:
    table["cold_us_per_mb"], table["cold_curve"], table["cold_probe"] = (probe["cold_us_per_mb"], probe["cold_curve"],
                                                                        probe["points"])
    table["cold_probe_date"] = _dt.date.today().isoformat()


def reprobe_cold(path: Path, rounds: int = 5) -> dict:
    """Re-measure only the cold curve of a kernel table here (``cold_probe``, about a minute) and refit its
    executor fit (15-20 s), keeping every kernel sample: for a machine whose cache, not its kernels, changed."""
    path = Path(path)
    table = load_table(path)
    set_cold_probe(table, cold_probe(int(table["threads"]), float(table.get("cold_mb", COLD_MB)), rounds=rounds))
    table["aggregate"] = fit_aggregate(table)
    tmp = path.with_name(".tmp-" + path.name)
    save_table(table, tmp)
    tmp.replace(path)
    clear_model_cache()
    return {"path": str(path), "cold_us_per_mb": table["cold_us_per_mb"], "cold_curve": table["cold_curve"]}


def calibrate_device(device: str = "desktop-cpu", threads: Optional[int] = None, nets: int = 260,
                     runs: int = 60, progress: bool = True) -> dict:
    """Recalibrate a local profile's kernel table for ``threads`` and point its YAML at it.

    The table is written beside the profile's YAML as ``<profile>.kernels-t<threads>.json.gz`` (a user
    profile's YAML names it by absolute path: table names resolve against edgekit's own devices folder).
    """
    from ...config import load_device, resolve_file

    path = resolve_file("devices", device)
    dev = load_device(device)
    if not dev.local:
        raise EdgekitError(f"Kernel calibration measures this machine; device {dev.name} is not local: true")
    threads = int(threads or dev.resolved_threads())
    out = path.parent / f"{path.stem}.kernels-t{threads}.json.gz"
    if not os.access(path.parent, os.W_OK):  # say so before minutes of timing, not after
        raise EdgekitError(f"Cannot write the kernel table beside {path} (no write permission): copy the profile "
                           f"YAML somewhere writable and calibrate the copy (`edgekit devices calibrate my.yaml`)")
    tmp = out.with_name(".tmp-" + out.name)
    table = calibrate_kernels(dev, threads, nets=nets, out=tmp, runs=runs, progress=progress)
    tmp.replace(out)
    builtin = out.parent.resolve() == DEVICES_DIR
    lm = dev.latency_model.model_copy(update={"kernel_tables": {**dev.latency_model.kernel_tables,
                                                                 threads: out.name if builtin else str(out.resolve())}})
    write_latency_model(path, lm)
    clear_model_cache()
    return {"path": str(out), "yaml": str(path), "threads": threads, "nets": nets,
            "kernels": len(table["kernels"]), "measure_s": table["measure_s"], "overhead": table["overhead"]}


# ----------------------------------------------------------------------------- what weights past the cache cost


def cold_rate(points: Sequence[Sequence[float]], threshold_mb: float) -> float:
    """µs per ``cold_mb()`` MB from a weight-streaming probe's (weight MB, µs) points: the per-MB time of the
    points under the threshold is the in-cache rate; the time past it beyond that rate, per cold MB (least
    squares through 0), is the cold rate."""
    pts = np.asarray([p[:2] for p in points], dtype=float)
    mb, us = pts[:, 0], pts[:, 1]
    warm = mb <= threshold_mb
    rate = float(np.median(us[warm] / mb[warm])) if warm.any() else float(us[np.argmin(mb)] / mb.min())
    cold = np.array([cold_mb(m * 1e6, threshold_mb) for m in mb])
    if not (cold > 0).any():
        return 0.0
    return max(0.0, float(np.sum((us - rate * mb) * cold) / np.sum(cold * cold)))


class _Block:
    """``depth`` inverted residual bodies at 2x2 (1x1 conv c -> 6c, 3x3 depthwise, 1x1 conv 6c -> c, no skip): each
    run reads every weight once with next to nothing to compute around it, in kernels of the sizes of a mobile
    CNN's last stages (EfficientNetV2-B0's 192 -> 1152 1x1 convs hold 0.9 MB each)."""

    @staticmethod
    def build(channels: int, depth: int):
        import torch.nn as nn

        mid = 6 * channels
        layers = []
        for _ in range(depth):
            layers += [nn.Conv2d(channels, mid, 1), nn.ReLU(), nn.Conv2d(mid, mid, 3, 1, 1, groups=mid), nn.ReLU(),
                       nn.Conv2d(mid, channels, 1)]
        return nn.Sequential(*layers).eval()

    @staticmethod
    def mb(channels: int) -> float:
        """Weight MB of one body (fp32, biases included)."""
        mid = 6 * channels
        return 4 * (2 * channels * mid + 9 * mid + 2 * mid + channels) / 1e6

    @staticmethod
    def kernel_mb(channels: int) -> float:
        """Weight MB of each of its 1x1 convs, the kernels that hold its weights."""
        return 4 * 6 * channels * channels / 1e6


PROBE_WIDTHS = (64, 128, 256)  # 1x1 convs of 0.1, 0.4 and 1.6 MB


def cold_probe(threads: int, threshold_mb: float, widths: Sequence[int] = PROBE_WIDTHS, rounds: int = 3,
               runs: int = 200) -> dict:
    """Measure what weights past the cache cost here, by the size of the kernels that hold them: for each width,
    stacks of inverted residual bodies at 2x2 (``_Block``) holding 1/4 to 5x the threshold in weights, all timed
    round-robin (``rounds`` p50s each, their median); ``cold_rate`` of each width is one point of the cold curve
    (kernel MB, µs per cold MB). Smaller kernels pay more per MB, each restarting the stream from memory (on a
    2-vCPU AMD EPYC: 62, 33 and 23 µs per cold MB with 0.1, 0.4 and 1.6 MB 1x1 convs). ``cold_us_per_mb`` is the
    rate of the largest. The executor fit uses these instead of fitting them: the few calibration networks past
    the threshold keep their weights in a few large kernels and under-state it (a fitted 5 µs per MB)."""
    import torch

    from ...export.onnx import export_onnx

    with tempfile.TemporaryDirectory(prefix="edgekit-cold-") as tmp:
        graphs: Dict[Tuple[int, int], Tuple[Path, List[float]]] = {}
        for c in widths:
            for d in sorted({max(1, int(round(f * threshold_mb / _Block.mb(c)))) for f in (0.25, 0.5, 1, 2, 3, 4, 5)}):
                torch.manual_seed(d)
                graphs[(c, d)] = (export_onnx(_Block.build(c, d), Path(tmp) / f"block{c}x{d}.onnx", (1, c, 2, 2)), [])
        order = list(graphs)
        rng = np.random.default_rng(0)
        for _ in range(rounds):
            rng.shuffle(order)
            for key in order:
                graphs[key][1].append(time_onnx(graphs[key][0], threads, warmup=20, runs=runs) * 1e3)
    points = [[round(d * _Block.mb(c), 3), round(float(np.median(t)), 2), c] for (c, d), (_, t) in sorted(graphs.items())]
    curve = [[round(_Block.kernel_mb(c), 4), round(cold_rate([p for p in points if p[2] == c], threshold_mb), 3)]
             for c in widths]
    return {"cold_us_per_mb": curve[-1][1] if curve else 0.0, "cold_curve": curve, "points": points}
