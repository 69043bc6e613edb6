"""Every zoo model x {prune50, svd, edge}: MACs, measured ONNX Runtime speed and accuracy, in one run.

    python bench/compress_matrix.py [--models a,b] [--recipes prune50,svd,edge] [--rounds 100]
                                    [--size224] [--threads 1] [--markdown] [--json out.json]

For each model: the baseline trained on the default task (4 epochs, cached like
the pipeline's), exported to ONNX fp32. For each recipe its steps are applied to
a copy (``Step.apply``, in recipe order) and its last variant exported (fp32, or
int8 as ``edgekit compress`` makes it: on a local device the layout search picks
the fastest accurate int8 layout at ``--threads``). The compressed variant
and the fp32 baseline are timed round-robin in one loop (``interleaved_latency``,
batch 1, 64x64, ``--threads`` ORT threads), so the speedup is a same-run ratio.
Recipes with the same steps (``prune50`` and ``edge``) share one compressed model
per baseline, so the two rows differ only in the exported variant. ``--size224`` also times the same two torch models exported at 224x224 (fp32,
same weights): pruning saves a larger share of the time when per-operator
overhead is small next to the convolutions. Accuracy is top-1 on the 1,000-image
eval split, through ONNX Runtime. Rows where the compressed variant is slower
than fp32 are flagged.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from edgekit import zoo
from edgekit.config import Recipe, TrainSpec, load_device, load_recipe
from edgekit.data import load_task
from edgekit.export.onnx import export_onnx
from edgekit.measure.local import interleaved_latency
from edgekit.pipeline import (VariantSpec, apply_steps, evaluate, export_variants, get_baseline, load_runners,
                              local_timer, measure)
from edgekit.runtime import load_runner


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated zoo names (default: all)")
    ap.add_argument("--recipes", default="prune50,svd,edge")
    ap.add_argument("--device", default="desktop-cpu")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=float, default=4, help="baseline training epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size224", action="store_true", help="also time fp32 torch models exported at 224x224")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table too")
    ap.add_argument("--json", default="", help="write the rows to this file")
    args = ap.parse_args()
    torch.set_num_threads(max(1, args.threads))
    dev = load_device(args.device)
    dev = dev.model_copy(update={"threads": args.threads})  # the int8 search times at the bench's threads
    names = [n for n in args.models.split(",") if n] or [s.name for s in zoo.list_models()]
    recipes = {Path(r).stem if r.endswith((".yaml", ".yml")) else r: load_recipe(r)
               for r in args.recipes.split(",") if r}
    task = load_task("mnist")
    rows = []
    console = Console(width=220)
    for name in names:
        spec = zoo.get_spec(name)
        baseline, _ = get_baseline(spec.name, task, recipe=Recipe(name="bench", train=TrainSpec(epochs=args.epochs)),
                                   seed=args.seed)
        base_stats = zoo.model_stats(baseline, task.input_shape[1:])
        done = {}  # recipes with the same steps (prune50 and edge) share one compressed model
        for rname, rec in recipes.items():
            row = {"model": spec.name, "recipe": rname, "macs_fp32": base_stats["macs"],
                   "params_fp32": base_stats["params"]}
            t0 = time.time()
            try:
                key = json.dumps([s.model_dump() for s in rec.steps], sort_keys=True)
                if key not in done:
                    notes: list = []
                    model, _ = apply_steps(baseline, rec, task, dev, spec.name, args.seed, notes)
                    done[key] = (model if model is not None else baseline, notes, round(time.time() - t0, 1), rname)
                model, notes, row["step_seconds"], first = done[key]
                if first != rname:
                    row["steps_shared_with"] = first
                stats = zoo.model_stats(model, task.input_shape[1:])
                row["macs_ratio"] = stats["macs"] / base_stats["macs"]
                row["params_ratio"] = stats["params"] / base_stats["params"]
                v = rec.variants[-1]
                row["variant"] = f"{v.format} {v.precision}"
                with tempfile.TemporaryDirectory() as tmp:  # the stages compress runs, as compress runs them
                    specs = [VariantSpec("baseline", "onnx", "fp32"),
                             VariantSpec("compressed", v.format, v.precision, dict(v.options))]
                    variants = export_variants({"baseline": baseline, "compressed": model}, specs, task, dev,
                                               Path(tmp), timer=local_timer(dev), model_label=spec.name)
                    runners = load_runners(variants, args.threads)
                    x = evaluate(variants, runners, task)
                    measure(variants, runners, dev, x, runs=args.rounds)
                    ref, var = variants
                    if var.status != "ok":
                        raise RuntimeError(var.error)
                    row["int8_config"] = var.info.get("quantization", {}).get("config")
                    row.update(acc_fp32=ref.accuracy, acc=var.accuracy, ms_fp32=ref.latency.p50, ms=var.latency.p50,
                               speedup=var.speedup)
                    if args.size224:
                        d = Path(tmp)
                        shape = (1, task.in_chans, 224, 224)
                        r0, r1 = (load_runner("onnxruntime", export_onnx(m, d / f"{tag}224.onnx", shape),
                                              threads=args.threads) for m, tag in ((baseline, "b"), (model, "c")))
                        xb = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
                        lat224 = interleaved_latency({"fp32": r0.run, "variant": r1.run}, xb, warmup=5,
                                                     rounds=max(20, args.rounds // 3), description="224")
                        row["ms_fp32_224"], row["ms_224"] = lat224["fp32"]["p50"], lat224["variant"]["p50"]
                        row["speedup_224"] = row["ms_fp32_224"] / row["ms_224"]
                row["notes"] = list(notes)
                row["status"] = "ok"
            except Exception as exc:  # one failing cell must not hide the rest of the matrix
                row.update(status="failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            rows.append(row)
            console.print(_line(row))
    _print(rows, console, args.markdown, args.size224)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['model']} {r['recipe']}: FAILED {r['error']}"
    extra = f", 224: x{r['speedup_224']:.2f}" if "speedup_224" in r else ""
    return (f"{r['model']} {r['recipe']}: MACs {r['macs_ratio']:.1%}, x{r['speedup']:.2f}{extra}, "
            f"acc {r['acc_fp32']:.1%} -> {r['acc']:.1%} ({r['step_seconds']}s)")


def _print(rows, console, markdown: bool, size224: bool) -> None:
    cols = ["model", "recipe", "variant", "MACs", "params", "fp32 ms", "ms", "speedup"] + \
        (["speedup 224"] if size224 else []) + ["acc fp32", "acc", "Δ pp", "steps s", "flag"]
    table = Table(title="Compression matrix (ONNX Runtime, batch 1, 64x64, same-run ratios)")
    for c in cols:
        table.add_column(c, justify="left" if c in ("model", "recipe", "variant", "flag") else "right")
    lines = []
    for r in rows:
        if r["status"] != "ok":
            cells = [r["model"], r["recipe"], "-", "-", "-", "-", "-", "-"] + (["-"] if size224 else []) + \
                ["-", "-", "-", "-", "FAILED: " + r["error"]]
        else:
            flag = "SLOWER than fp32" if r["speedup"] < 1 else ""
            cells = [r["model"], r["recipe"], r["variant"], f"{r['macs_ratio']:.1%}", f"{r['params_ratio']:.1%}",
                     f"{r['ms_fp32']:.3f}", f"{r['ms']:.3f}", f"{r['speedup']:.2f}x"] + \
                ([f"{r['speedup_224']:.2f}x" if "speedup_224" in r else "-"] if size224 else []) + \
                [f"{r['acc_fp32']:.1%}", f"{r['acc']:.1%}", f"{100 * (r['acc'] - r['acc_fp32']):+.1f}",
                 f"{r['step_seconds']}", flag]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    if markdown:
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
