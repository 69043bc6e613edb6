"""Estimated vs measured latency for every zoo model x {fp32, int8, prune50} on a local device profile.

    python bench/latency_model.py [--device desktop-cpu] [--threads N] [--calibrate] [--models a,b]
                                  [--variants fp32,int8,prune50] [--rounds 12] [--runs-per-round 20]
                                  [--json out.json] [--markdown]
    python bench/latency_model.py --rescore run1.json run2.json ... [--workdir DIR] [--model-seeds N]


For each zoo model (untrained weights, seed 0, 64x64 input, batch 1): ONNX fp32 export, edgekit's
int8 (ONNX Runtime static QDQ with the device's settings, calibrated on the MNIST calibration split)
and the prune50 recipe's prune step (one shot, no fine-tune: latency depends on the structure; no prune50 row
where the pruner removed nothing, as on CondenseNet and the VGG16 variants, whose "pruned" graph is the fp32 one).
Each artifact is measured with ONNX Runtime at the given threads: all artifacts are loaded and timed
round-robin, ``--rounds`` rounds in a new shuffled order each, ``--runs-per-round`` timed runs after a
short warm-up per artifact and round (one artifact runs at a time, as on a device); the measurement is
the median of its rounds' p50s, so a slow spell of the machine touches every artifact a little instead
of the few that ran during it. It is estimated by
``edgekit.estimate.estimate`` from the same file with the profile's latency model: per-kernel regression where the profile has a kernel
table for these threads (desktop-cpu), else the roofline, which is printed beside it for comparison.
``--calibrate`` first re-times the random networks of ``edgekit.estimate.synthetic`` here and rewrites
the profile's kernel table for these threads, so fit and check see the same machine state. No zoo
model is timed to train the estimator.

The table prints the error of the estimate relative to the measurement and the share within +-15%.

``--reference N`` (default 12) of the kernel table's own calibration networks whose weights fit in cache, and four
whose weights do not, rebuilt from their seeds, are timed in the same round-robin: their time against the table's says how fast the machine ran during this run compared
with when the table was timed (``edgekit devices check``). The score is printed again against the estimates scaled
by that speed, to tell an estimator's miss from a slow spell; the first score is the estimator's.

``--rescore`` times nothing: it estimates the artifacts of earlier runs' ``--json`` files again with the current
latency model (and kernel table) and scores every run's measurements, and their median, against the same
estimates, so two versions of the estimator are compared on the same measurements rather than on two states of a
noisy machine.

``--model-seeds N`` (with ``--rescore``) also refits the estimator with the random states 1 .. N-1 of its forests and
boosted model (kernel models and the stacked executor fit, about 90 s each) and scores each the same way: the shipped
estimator is seed 0, one draw of a noisy fit, and the spread across seeds is how much of a score (or of a difference
between two versions) that draw alone can make.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from edgekit import zoo
from edgekit.export.onnx_int8 import OrtQuantConfig, quantize_onnx
from edgekit.config import load_device
from edgekit.data import load_task
from edgekit.export.onnx import export_onnx
from edgekit.progress import track
from edgekit.zoo.stats import count_macs
from edgekit.estimate import estimate
from edgekit.estimate.check import build_reference, reference_records, speed_ratios
from edgekit.estimate.kernels.detect import graph_kernels
from edgekit.estimate.kernels.model import KernelModel, fit_aggregate
from edgekit.estimate.tables import kernel_table_for, load_table

TOLERANCE = 0.15
PRUNED_MAX_MACS = 0.99  # a prune50 left with more of the fp32 MACs is the fp32 graph again: no row (counted twice)


def _prune50(model, name: str, device):
    """The prune50 recipe's prune step (blocks, then channels) in one shot, no fine-tune (BatchNorm
    re-estimated): the structure is what latency depends on."""
    from edgekit.steps import StepContext, build_step
    from edgekit.config import load_recipe

    task = load_task("mnist")
    params = next(s for s in load_recipe("prune50").steps if s.kind == "prune").params
    step = build_step("prune", {**params, "iterations": 1, "finetune_epochs": 0}, "bench")
    return step.apply(model, StepContext(task=task, baseline=model, model_name=name, device=device)).eval()


def build_artifacts(names, device, workdir: Path, num_calib: int, console: Console,
                    variants=("fp32", "int8", "prune50")) -> list:
    import copy

    import torch

    q = device.quantization
    cfg = OrtQuantConfig(activation_type=q.activation_type, weight_type=q.weight_type, per_channel=q.per_channel)
    calib, _ = load_task("mnist").arrays("calib", limit=num_calib)
    arts = []
    for name in names:
        paths = {v: workdir / f"{name}.{v}.onnx" for v in variants}
        none = workdir / f"{name}.prune50.none"  # the pruner left nothing to time here before: do not redo it all
        if not all(p.exists() or (v == "prune50" and none.exists()) for v, p in paths.items()):
            torch.manual_seed(0)
            model = zoo.create(name, num_classes=10).eval()
            fp32 = export_onnx(model, workdir / f"{name}.fp32.onnx", (1, 3, 64, 64))
            if "int8" in paths:
                quantize_onnx(fp32, paths["int8"], calib, cfg)
            if "prune50" in paths:
                paths["prune50"].unlink(missing_ok=True)
                none.unlink(missing_ok=True)
                try:
                    pruned = _prune50(copy.deepcopy(model), name, device)
                    ratio = count_macs(pruned, (1, 3, 64, 64)) / count_macs(model, (1, 3, 64, 64))
                    if ratio < PRUNED_MAX_MACS:
                        export_onnx(pruned, paths["prune50"], (1, 3, 64, 64))
                    else:
                        why = f"the pruner removed nothing: {ratio:.2f}x the MACs, the fp32 graph again"
                except Exception as exc:  # noqa: BLE001 - a model the pruner cannot take: no prune50 row
                    why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                if not paths["prune50"].exists():
                    console.log(f"{name}: no prune50 ({why})")
                    none.write_text(why + "\n")
            console.log(f"exported {name}")
        arts += [(name, v, p) for v, p in paths.items() if p.exists()]
    return arts


def measure_round_robin(paths, threads: int, rounds: int, runs: int, warmup: int = 5) -> dict:
    """Per artifact, the p50 of each round's ``runs`` timed runs (after ``warmup`` untimed ones).

    All artifacts are loaded at once and timed round-robin, in a new shuffled order each round, so a
    slow spell of the machine (another tenant, a frequency change) lands on every artifact a little
    instead of on the few that happened to run during it; each round's warm-up restores the artifact's
    own cache state, as on a device that runs one model. The measurement is the median of the rounds."""
    from edgekit.measure import _runtime_for
    from edgekit.runtime import load_runner

    runners = {}
    for p in paths:
        r = load_runner(_runtime_for(Path(p)), Path(p), threads=threads)
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in r.input_shape)
        runners[str(p)] = (r, np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    out = {k: [] for k in runners}
    order = list(runners)
    rng = np.random.default_rng(0)
    for _ in track(range(rounds), "measuring (round-robin)", total=rounds):
        rng.shuffle(order)
        for k in order:
            r, x = runners[k]
            for _ in range(warmup):
                r.run(x)
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                r.run(x)
                times.append((time.perf_counter() - t0) * 1e3)
            out[k].append(float(np.median(times)))
    return out


def reference_graphs(device, threads: int, workdir: Path, count: int) -> list:
    """(calibration record, ONNX path) of ``count`` of the device's kernel-table networks, rebuilt from their seeds
    (``edgekit.estimate.check.reference_records``), for timing beside the zoo: how fast the machine runs now
    against when the table was timed. Empty for a profile without a kernel table for these threads."""
    path = kernel_table_for(device.latency_model, threads) if count else None
    if path is None:
        return []
    table = load_table(path)
    folder = workdir / "reference"
    folder.mkdir(parents=True, exist_ok=True)
    return build_reference(table, reference_records(table, count), device, folder)


def at_speed(row: dict, speed: dict) -> float:
    """A row's error against its estimate scaled by the run's machine speed: that of the reference networks whose
    weights pass the cache for a model whose weights do, else that of its precision (prune50: fp32's)."""
    key = "past_cache" if row.get("weights_mb", 0) > speed.get("cold_mb", np.inf) and "past_cache" in speed else \
        "int8" if row["precision"] == "int8" else "fp32"
    return row["estimated_ms"] * speed.get(key, speed["ratio"]) / row["measured_p50_ms"] - 1


def run_scores(est: dict, runs: dict) -> dict:
    """How many rows of each saved run (and of the runs' median) the estimates ``{(model, variant): ms}`` are within
    +-15% of, the runs at >= 90%, and the mean share."""
    med = {k: float(np.median([r[k] for r in runs.values() if k in r])) for k in est}
    within = {name: int(sum(abs(est[k] / meas[k] - 1) <= TOLERANCE for k in est if k in meas))
              for name, meas in runs.items()}
    rows = {name: sum(k in meas for k in est) for name, meas in runs.items()}
    share = [within[n] / rows[n] for n in runs if rows[n]]
    return {"within": within, "runs_at_90": int(sum(v >= 0.9 for v in share)), "runs": len(share),
            "mean_share": float(np.mean(share)) if share else float("nan"),
            "median_run_within": int(sum(abs(est[k] / med[k] - 1) <= TOLERANCE for k in est))}


def seed_spread(runs: dict, arts: dict, device, threads: int, seeds: int, console: Console) -> list:
    """``--model-seeds``: the estimator refitted from its kernel table with random states 0 .. seeds-1 (0 is the
    shipped one, with the table's stored executor fit), each scored against the saved runs."""
    table = load_table(kernel_table_for(device.latency_model, threads))
    graphs = {k: graph_kernels(p, threads) for k, p in arts.items()}
    out = []
    for s in track(range(seeds), "refitting the estimator per random state", total=seeds):
        km = KernelModel(table if s == 0 else {**table, "aggregate": fit_aggregate(table, seed=s)}, seed=s)
        out.append({"seed": s, **run_scores({k: km.estimate_ms(ks, prec) for k, (ks, prec) in graphs.items()}, runs)})
    t = Table(title="The same estimator refitted with other random states (seed 0 ships)")
    for col in ("seed", "runs at >= 90%", "mean share within +-15%", "median of the runs: within"):
        t.add_column(col, justify="right")
    for r in out:
        t.add_row(str(r["seed"]), f"{r['runs_at_90']} of {r['runs']}", f"{r['mean_share']:.1%}",
                  f"{r['median_run_within']} of {len(graphs)}")
    console.print(t)
    m = [r["mean_share"] for r in out]
    console.print(f"mean share over {seeds} seeds {np.mean(m):.1%} (min {min(m):.1%}, max {max(m):.1%}); runs at >= 90%: "
                  + ", ".join(str(r["runs_at_90"]) for r in out), highlight=False)
    return out


def rescore(files, device, threads: int, workdir: Path, num_calib: int, console: Console, model_seeds: int = 1) -> dict:
    """Per saved run: how many of its measurements the current estimates are within +-15% of (see ``--rescore``)."""
    saved = {str(f): json.loads(Path(f).read_text()) for f in files}
    runs = {f: {(r["model"], r["precision"]): r["measured_p50_ms"] for r in d["rows"]} for f, d in saved.items()}
    speeds = {f: d.get("reference") or {} for f, d in saved.items()}
    keys = sorted(set().union(*runs.values()))
    names = list(dict.fromkeys(m for m, _ in keys))
    arts = {(n, v): p for n, v, p in build_artifacts(names, device, workdir, num_calib, console,
                                                     variants=sorted({v for _, v in keys}))}
    est = {k: estimate(arts[k], device, threads=threads).p50
           for k in track(keys, "estimating", total=len(keys)) if k in arts}
    table = Table(title=f"Current estimates vs saved measurements: {device.name}, {threads} thread(s)")
    for col in ("run", "rows", "within +-15%", "median |error|", "median measured / median of runs",
                "reference networks now / table (past the cache)"):
        table.add_column(col, justify="left" if col == "run" else "right")
    med = {k: float(np.median([r[k] for r in runs.values() if k in r])) for k in est}
    out = {"runs": {}, "estimates_ms": {f"{m}.{v}": e for (m, v), e in est.items()}}
    for name, meas in [*runs.items(), ("median of the runs", med)]:
        e = np.array([est[k] / meas[k] - 1 for k in est if k in meas])
        speed = float(np.median([meas[k] / med[k] for k in est if k in meas]))
        row = {"rows": int(len(e)), "within": int((np.abs(e) <= TOLERANCE).sum()), "median_abs_error": float(np.median(np.abs(e))),
               "slower_than_median": speed}
        out["runs"][name] = row
        ref = speeds.get(name, {})
        table.add_row(Path(name).name if name in runs else name, str(row["rows"]), f"{row['within']} ({row['within'] / len(e):.0%})",
                      f"{row['median_abs_error']:.1%}", f"{speed:.2f}",
                      (f"{ref['ratio']:.2f}" + (f" ({ref['past_cache']:.2f})" if "past_cache" in ref else "")) if ref else "-")
    console.print(table)
    sc = run_scores(est, runs)
    console.print(f"{sc['runs_at_90']} of {sc['runs']} runs with at least 90% within +-15% (mean "
                  f"{sc['mean_share']:.1%}); worst against the median: " + ", ".join(
                      f"{m} {v} {est[(m, v)] / med[(m, v)] - 1:+.0%}" for m, v in
                      sorted(est, key=lambda k: -abs(est[k] / med[k] - 1))[:6]))
    out["model_seeds"] = seed_spread(runs, arts, device, threads, model_seeds, console) if model_seeds > 1 else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="desktop-cpu")
    ap.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="default: the profile's threads")
    ap.add_argument("--rounds", type=int, default=12, help="round-robin rounds through all artifacts")
    ap.add_argument("--runs-per-round", type=int, default=20, help="timed runs of an artifact in each round")
    ap.add_argument("--num-calib", type=int, default=64, help="MNIST calibration images for int8")
    ap.add_argument("--variants", default="fp32,int8,prune50", help="comma-separated: fp32, int8, prune50")
    ap.add_argument("--calibrate", action="store_true", help="time random networks here first and rewrite the "
                    "profile's kernel table for these threads")
    ap.add_argument("--quick-calibrate", action="store_true", help="--calibrate with 30 random networks")
    ap.add_argument("--nets", type=int, default=260, help="random networks (x fp32, int8) for --calibrate")
    ap.add_argument("--workdir", default=None, help="keep the exported models here (default: a temp folder)")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table too")
    ap.add_argument("--reference", type=int, default=12, help="kernel-table calibration networks timed in the same "
                    "round-robin to measure the machine's speed against the table's (0: none)")
    ap.add_argument("--model-seeds", type=int, default=1, help="with --rescore: also refit the estimator with this "
                    "many random states (seed 0 ships) and score each, to see how much of a score is the fit's draw")
    ap.add_argument("--rescore", nargs="+", default=None, metavar="RUN_JSON",
                    help="time nothing: score these earlier runs' measurements against the current estimates")
    args = ap.parse_args()

    console = Console(width=160)
    device = load_device(args.device)
    if not device.local:
        console.print(f"[red]{device.name} is not a local profile: this benchmark measures on this machine")
        return 2
    threads = int(args.threads or device.resolved_threads())
    names = [n for n in args.models.split(",") if n] or [s.name for s in zoo.list_models()]
    load_before = os.getloadavg()
    if args.calibrate or args.quick_calibrate:
        from edgekit.estimate.kernels.calibrate import calibrate_device

        cal = calibrate_device(args.device, threads=threads, nets=30 if args.quick_calibrate else args.nets)
        console.print(f"calibrated {device.name} at {threads} thread(s): {cal['kernels']} kernel timings from "
                      f"{cal['nets']} random networks in {cal['measure_s']:.0f} s -> {cal['path']}")
        device = load_device(args.device)
    if args.rescore:
        with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
            out = rescore(args.rescore, device, threads, Path(args.workdir or tmp), args.num_calib, console,
                          args.model_seeds)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        return 0
    lm = device.latency_model
    roofline = lm.model_copy(update={"kernel_tables": {}})

    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        arts = build_artifacts(names, device, workdir, args.num_calib, console,
                               variants=[v for v in args.variants.split(",") if v])
        refs = reference_graphs(device, threads, workdir, args.reference)
        p50s = measure_round_robin([p for _, _, p in arts] + [p for _, p in refs], threads, args.rounds,
                                   args.runs_per_round)
        speed = speed_ratios([(r, float(np.median(p50s[str(p)]))) for r, p in refs]) if refs else None
        if speed:
            speed["cold_mb"] = float(load_table(kernel_table_for(device.latency_model, threads)).get("cold_mb", 8.0))
        rows = []
        for name, prec, path in arts:
            est = estimate(path, device, threads=threads).to_json()
            roof = estimate(path, device, threads=threads, lm=roofline).to_json()
            chunks = p50s[str(path)]
            measured = float(np.median(chunks))
            ks = graph_kernels(path, threads)[0]
            rows.append({"model": name, "precision": prec, "ops": est["ops"], "gmacs": est["gmacs"],
                         "weights_mb": ks[0].desc.get("model_weight_bytes", 0) / 1e6 if ks else 0.0,
                         "measured_p50_ms": measured,
                         "measured_spread": float(np.subtract(*np.percentile(chunks, [90, 10])) / measured),
                         "measured_rounds": [float(c) for c in chunks],
                         "estimated_ms": est["p50"], "error": est["p50"] / measured - 1, "source": est["source"],
                         "method": est["method"].split(":")[0], "roofline_ms": roof["p50"],
                         "roofline_error": roof["p50"] / measured - 1, "unseen": est.get("unseen_kernels", [])})
    load_after = os.getloadavg()

    table = Table(title=f"Latency model vs measurement: {device.name}, {threads} thread(s), ONNX Runtime, batch 1, "
                        f"64x64")
    for col in ("model", "precision", "kernels", "GMACs", "measured p50 ms", "spread", "estimated ms", "error", "+-15%",
                "roofline error"):
        table.add_column(col, justify="left" if col in ("model", "precision") else "right")
    for r in rows:
        ok = abs(r["error"]) <= TOLERANCE
        table.add_row(r["model"], r["precision"], str(r["ops"]), f"{r['gmacs']:.3f}", f"{r['measured_p50_ms']:.3f}",
                      f"{r['measured_spread']:.0%}", f"{r['estimated_ms']:.3f}", f"{r['error']:+.0%}",
                      "[green]yes" if ok else "[red]no", f"{r['roofline_error']:+.0%}")
    console.print(table)
    errs = np.array([abs(r["error"]) for r in rows])
    share = float(np.mean(errs <= TOLERANCE))
    by_prec = {p: float(np.mean([abs(r["error"]) <= TOLERANCE for r in rows if r["precision"] == p]))
               for p in dict.fromkeys(r["precision"] for r in rows)}
    worst = sorted(rows, key=lambda r: -abs(r["error"]))[:5]
    console.print(f"within +-15%: {share:.0%} ({int((errs <= TOLERANCE).sum())}/{len(rows)}; "
                  + ", ".join(f"{p} {v:.0%}" for p, v in by_prec.items()) + f"); median |error| {np.median(errs):.1%}; "
                  f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} cores")
    roof_share = float(np.mean([abs(r["roofline_error"]) <= TOLERANCE for r in rows]))
    console.print(f"method: {rows[0]['method'] if rows else '-'}; the roofline alone: {roof_share:.0%} within +-15%")
    console.print("worst: " + ", ".join(f"{r['model']} {r['precision']} {r['error']:+.0%}" for r in worst))
    if args.reference and not speed:
        console.print("machine speed: not measured (no kernel table for these threads, or its calibration networks no "
                      "longer rebuild into the graphs it timed: `edgekit devices check` says which)", highlight=False)
    if speed:
        speed["within_15pct_at_this_speed"] = float(np.mean([abs(at_speed(r, speed)) <= TOLERANCE for r in rows]))
        console.print(f"machine speed: {len(refs)} of the kernel table's own calibration networks, timed in the same "
                      f"round-robin, took {speed['ratio']:.2f}x their calibrated time (fp32 {speed.get('fp32', np.nan):.2f}x, "
                      f"int8 {speed.get('int8', np.nan):.2f}x; weights past the cache "
                      f"{speed.get('past_cache', np.nan):.2f}x); against estimates x those factors "
                      f"{speed['within_15pct_at_this_speed']:.0%} within +-15%. The share above is the estimator's "
                      f"score; this one says how much of its miss is the machine running at another speed than "
                      f"when the table was timed.", highlight=False)
    if args.markdown:
        print("\n| model | precision | measured p50 ms | estimated ms | error | roofline error |\n"
              "|---|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['model']} | {r['precision']} | {r['measured_p50_ms']:.3f} | {r['estimated_ms']:.3f} | "
                  f"{r['error']:+.0%} | {r['roofline_error']:+.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device.name, "threads": threads, "rows": rows,
                                               "within_15pct": share, "load": [load_before, load_after],
                                               "reference": speed and {**speed, "nets": [
                                                   {"name": r["name"], "precision": r["precision"],
                                                    "weights_mb": r["weights_mb"], "past_cache": r["past_cache"],
                                                    "calibrated_ms": r["wall_ms"],
                                                    "measured_rounds": p50s[str(p)]} for r, p in refs]}},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
