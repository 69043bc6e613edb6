"""A 2 models x 2 recipes x 2 devices grid two ways: a shell-style loop of `edgekit compress` (one process per
cell), and one `edgekit sweep` on a local Ray instance. Wall time of each on this machine, one after the other.

    python bench/sweep_speed.py [--pairs 2] [--out bench/results/sweep_speed.txt]

Each way starts from an empty baseline cache of its own, so both train the two baselines; both time every
variant with the same number of runs (desktop-cpu measured here, rpi4 estimated). The sweep shares what the loop
repeats: the SVD build (steps, export, evaluation) serves both devices, and one set of Ray workers imports torch
once instead of once per cell.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = ["micronet-m1", "shufflenetv2-x0.5"]
RECIPES = ["int8", "svd"]
DEVICES = ["desktop-cpu", "rpi4"]


def _edgekit(*args: str, cache: str) -> float:
    exe = str(Path(sys.executable).with_name("edgekit"))
    t0 = time.perf_counter()
    subprocess.run([exe, *args], check=True, env={**os.environ, "EDGEKIT_CACHE": cache},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _loop(tmp: Path, tag: str, runs: int) -> tuple[float, dict]:
    cells, t0 = {}, time.perf_counter()
    for m in MODELS:
        for r in RECIPES:
            for d in DEVICES:
                cells[f"{m} {r} {d}"] = _edgekit("compress", m, "--recipe", r, "--device", d, "--runs", str(runs),
                                                 "--out", str(tmp / tag / f"{m}-{r}-{d}"),
                                                 cache=str(tmp / f"cache-{tag}"))
    return time.perf_counter() - t0, cells


def _sweep(tmp: Path, tag: str, runs: int) -> float:
    return _edgekit("sweep", "-m", ",".join(MODELS), "-r", ",".join(RECIPES), "-d", ",".join(DEVICES), "--runs",
                    str(runs), "--out", str(tmp / tag), cache=str(tmp / f"cache-{tag}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=2, help="loop/sweep pairs, run in ABBA order (loop, sweep, sweep, "
                                                          "loop, ...) so a slow spell of the machine hits both")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sweep_speed.txt")
    args = ap.parse_args()
    loops, sweeps, cells = [], [], {}
    with tempfile.TemporaryDirectory(prefix="sweep-speed-") as tmp:
        tmp = Path(tmp)
        for i in range(args.pairs):
            order = ("loop", "sweep") if i % 2 == 0 else ("sweep", "loop")
            for what in order:
                if what == "loop":
                    t, cells = _loop(tmp, f"loop{i}", args.runs)
                    loops.append(t)
                else:
                    sweeps.append(_sweep(tmp, f"sweep{i}", args.runs))
        again_s = _sweep(tmp, "sweep0", args.runs)
        s = json.loads((tmp / "sweep0" / "sweep.json").read_text())
    ratios = [a / b for a, b in zip(loops, sweeps)]
    lines = [f"# {len(MODELS)} models x {len(RECIPES)} recipes x {len(DEVICES)} devices, --runs {args.runs}, "
             f"{args.pairs} pairs in ABBA order, each from an empty baseline cache; {time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} CPUs, Ray {s['ray_version']}", "",
             *[f"pair {i + 1}: loop of edgekit compress (8 processes) {a:7.1f} s, edgekit sweep (local Ray) {b:7.1f} s"
               f" -> sweep {a / b:.2f}x faster" for i, (a, b) in enumerate(zip(loops, sweeps))],
             f"median ratio: {statistics.median(ratios):.2f}x", "", "last loop, per cell (baselines train in the first "
             "cell of each model):", *[f"    {k:40s} {v:6.1f} s" for k, v in cells.items()],
             f"edgekit sweep again (every cell done): {again_s:.1f} s", f"sweep cells: {json.dumps(s['counts'])}"]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
