"""How well a kernel table predicts random networks it was not fitted on (no timing: the table alone).

    python bench/kernel_heldout.py [--table edgekit/devices/desktop-cpu.kernels-t1.json.gz] [--folds 5]
                                   [--seed 1] [--json out.json]

The table's calibration networks are split into ``--folds`` outer folds by network. For each fold, the kernel
predictors and the stacked executor fit (``fit_aggregate``, with the table's measured cold rate when it has one)
are trained on the other networks only, and the held-out networks' wall-clock p50 is predicted from their
kernels, as ``edgekit profile`` predicts a model. It prints the share within +-15% per precision and the median
|error|. About 7 minutes for the 520 graphs of the 1-thread desktop-cpu table on a 2-core x86 host.

This is the check of the estimator that no zoo model takes part in (the zoo bench, ``latency_model.py``, also
times the machine, and its numbers move with the machine's state).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edgekit.estimate.kernels.features import COLD_MB, Kernel
from edgekit.estimate.kernels.model import KernelModel, fit_aggregate
from edgekit.estimate.tables import load_table, net_spans

DEFAULT = Path(__file__).resolve().parent.parent / "edgekit" / "devices" / "desktop-cpu.kernels-t1.json.gz"


def heldout_errors(table: dict, folds: int = 5, seed: int = 1, progress=None) -> np.ndarray:
    """Relative error of every calibration network's estimate from models fitted without it."""
    spans = net_spans(table)
    if spans is None:
        raise SystemExit("the table does not say which samples belong to which network")
    nets = table["nets"]
    fold = np.random.default_rng(seed).permutation(len(nets)) % folds
    err = np.zeros(len(nets))
    for f in range(folds):
        train = [n for n in range(len(nets)) if fold[n] != f]
        sub = {**table, "nets": [nets[n] for n in train], "kernels": [table["kernels"][j] for n in train for j in spans[n]]}
        sub["aggregate"] = fit_aggregate(sub)
        km = KernelModel(sub)
        for n in np.flatnonzero(fold == f):
            ks = [Kernel("", "", table["kernels"][j]["key"], table["kernels"][j]["desc"]) for j in spans[n]]
            err[n] = km.estimate_ms(ks, nets[n]["precision"]) / nets[n]["wall_ms"] - 1
        if progress:
            progress(f + 1, folds)
    return err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", type=Path, default=DEFAULT)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    console = Console()
    table = load_table(args.table)
    t0 = time.perf_counter()
    err = heldout_errors(table, args.folds, args.seed,
                         progress=lambda f, n: console.print(f"fold {f}/{n} ({time.perf_counter() - t0:.0f} s)"))
    prec = np.array([r["precision"] for r in table["nets"]])
    out = Table(title=f"held-out random networks, {args.table.name} ({table.get('host', '?')}, "
                      f"{table.get('threads')} thread(s)), {args.folds} folds")
    out.add_column("precision")
    for col in ("graphs", "within +-15%", "median |error|", "worst"):
        out.add_column(col, justify="right")
    rows = {}
    for p in ("fp32", "int8", "all"):
        e = err if p == "all" else err[prec == p]
        if not len(e):
            continue
        rows[p] = {"graphs": int(len(e)), "within_15": float(np.mean(np.abs(e) <= 0.15)),
                   "median_abs_error": float(np.median(np.abs(e))), "worst": float(e[np.argmax(np.abs(e))])}
        r = rows[p]
        out.add_row(p, str(r["graphs"]), f"{r['within_15']:.1%}", f"{r['median_abs_error']:.1%}", f"{r['worst']:+.0%}")
    console.print(out)
    console.print(f"cold rate: {'measured ' + str(table['cold_us_per_mb']) if 'cold_us_per_mb' in table else 'fitted'}"
                  f" µs per MB past {table.get('cold_mb', COLD_MB)} MB"
                  + (f" (by kernel MB: {table['cold_curve']})" if table.get("cold_curve") else "")
                  + f"; {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"table": str(args.table), "folds": args.folds, "seed": args.seed,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
