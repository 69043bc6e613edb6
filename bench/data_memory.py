"""Peak memory of ``edgekit compress`` against the number of images in ``--data``: it must not grow with it.

    python bench/data_memory.py [--sizes 1000 10000] [--workdir /tmp/edgekit-data-memory] [--recipe int8]

For each size, an ImageFolder of synthetic JPEG "photos" (10 classes, 320x240 smooth noise, seeded) is
generated once under ``--workdir``, with a weights file (the state dict of ``zoo.create('mobilenetv2',
num_classes=10)``), and the CLI runs in a child process:

    edgekit compress --recipe int8 mobilenetv2 --data DIR --weights FILE --input-size 224 --out TMP

Two figures per run: the child's peak RSS (``ru_maxrss`` from ``os.wait4``: the largest single process of
its tree, DataLoader workers included) and the peak of the tree's summed PSS sampled every 0.25 s from
``/proc`` (shared pages counted once, so forked workers are not double counted). With one ImageFolder tree
the eval split is every image but the ``num_calib`` calibration ones, so the larger run evaluates 10x more.
Goal (issue 26): the two runs within 20% of each other and under 3 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def make_folder(root: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    """``root/c0..c9/*.jpg``: smooth random images (upsampled noise) that JPEG-compress like photos."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and done.read_text() == str(n):
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
    for i in range(n):
        small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((320, 240), Image.BICUBIC)
        im.save(root / f"c{i % classes}" / f"{i:06d}.jpg", quality=85)
    done.write_text(str(n))
    return root


def make_weights(path: Path) -> Path:
    import torch

    from edgekit import zoo

    if not path.is_file():
        torch.manual_seed(0)
        torch.save(zoo.create("mobilenetv2", num_classes=10).state_dict(), path)
    return path


def _tree(pid: int) -> list:
    """``pid`` and its descendants, from /proc (no psutil)."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [c for c, pp in parents.items() if pp == p]
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    except (OSError, StopIteration, ValueError):
        return 0


def measure(cmd: list, log: Path) -> dict:
    """Run ``cmd``; its ru_maxrss (MB), the peak summed PSS of its process tree (MB) and seconds."""
    peak = {"pss": 0}
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak["pss"] = max(peak["pss"], sum(_pss_kb(p) for p in _tree(proc.pid)))
                stop.wait(0.25)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        th.join()
    return {"rc": proc.returncode, "maxrss_mb": usage.ru_maxrss / 1024, "pss_mb": peak["pss"] / 1024,
            "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "edgekit-data-memory")
    ap.add_argument("--recipe", default="int8")
    ap.add_argument("--model", default="mobilenetv2")
    ap.add_argument("--input-size", type=int, default=224)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    weights = make_weights(args.workdir / f"{args.model}-10.pth")
    edgekit = [sys.executable, "-m", "edgekit.cli"]
    rows = []
    for n in args.sizes:
        t = time.time()
        data = make_folder(args.workdir / f"images-{n}", n)
        gen_s = time.time() - t
        out = args.workdir / f"out-{n}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = edgekit + ["compress", "--recipe", args.recipe, args.model, "--data", str(data), "--weights",
                         str(weights), "--input-size", str(args.input_size), "--out", str(out)]
        r = measure(cmd, args.workdir / f"log-{n}.txt")
        if r["rc"] != 0:
            sys.exit(f"run with {n} images failed (exit {r['rc']}); see {args.workdir / f'log-{n}.txt'}")
        task = json.loads((out / "report.json").read_text())["task"]
        rows.append({"images": n, "num_eval": task["num_eval"], "num_calib": task["num_calib"], **r,
                     "generate_s": gen_s})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.model} · {args.recipe} · input {args.input_size} · "
          f"`edgekit compress --recipe {args.recipe} {args.model} --data DIR --weights FILE "
          f"--input-size {args.input_size}`\n")
    print("| images | eval | calib | peak RSS (ru_maxrss) MB | peak tree PSS MB | run s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images']:,} | {r['num_eval']:,} | {r['num_calib']} | {r['maxrss_mb']:,.0f} | "
              f"{r['pss_mb']:,.0f} | {r['seconds']:.0f} |")
    if len(rows) > 1:
        lo, hi = min(r["maxrss_mb"] for r in rows), max(r["maxrss_mb"] for r in rows)
        print(f"\nlargest / smallest peak RSS: {hi / lo:.2f} (goal <= 1.20); largest {hi / 1024:.2f} GB (goal < 3)")


if __name__ == "__main__":
    main()
