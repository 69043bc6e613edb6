"""A 2 models x 2 recipes x 2 devices grid two ways: a shell-style loop of `edgekit compress` (one process per
cell), and one `edgekit sweep` on a local Ray instance. Wall time of each on this machine, one after the other.

    python bench/sweep_speed.py [--out bench/results/sweep_speed.txt]

Each way starts from an empty baseline cache of its own, so both train the two baselines; both time every
variant with the same number of runs (desktop-cpu measured here, rpi4 estimated). The sweep shares what the loop
repeats: the SVD build (steps, export, evaluation) serves both devices, and one set of Ray workers imports torch
once instead of once per cell.
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sweep_speed.txt")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sweep-speed-") as tmp:
        tmp = Path(tmp)
        loop_cells = {}
        t0 = time.perf_counter()
        for m in MODELS:
            for r in RECIPES:
                for d in DEVICES:
                    loop_cells[f"{m} {r} {d}"] = _edgekit("compress", m, "--recipe", r, "--device", d, "--runs",
                                                          str(args.runs), "--out", str(tmp / "loop" / f"{m}-{r}-{d}"),
                                                          cache=str(tmp / "cache-loop"))
        loop_s = time.perf_counter() - t0
        sweep_s = _edgekit("sweep", "-m", ",".join(MODELS), "-r", ",".join(RECIPES), "-d", ",".join(DEVICES),
                           "--runs", str(args.runs), "--out", str(tmp / "sweep"), cache=str(tmp / "cache-sweep"))
        again_s = _edgekit("sweep", "-m", ",".join(MODELS), "-r", ",".join(RECIPES), "-d", ",".join(DEVICES),
                           "--runs", str(args.runs), "--out", str(tmp / "sweep"), cache=str(tmp / "cache-sweep"))
        s = json.loads((tmp / "sweep" / "sweep.json").read_text())
    lines = [f"# {len(MODELS)} models x {len(RECIPES)} recipes x {len(DEVICES)} devices, --runs {args.runs}; "
             f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, Ray {s['ray_version']}", "",
             f"loop of edgekit compress (8 processes): {loop_s:7.1f} s",
             *[f"    {k:40s} {v:6.1f} s" for k, v in loop_cells.items()],
             f"edgekit sweep (local Ray):              {sweep_s:7.1f} s  ({loop_s / sweep_s:.2f}x faster)",
             f"edgekit sweep again (every cell done):  {again_s:7.1f} s",
             f"sweep cells: {json.dumps(s['counts'])}"]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
