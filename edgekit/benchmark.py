"""``edgekit benchmark``: every format x precision of one model, side by side (like ``yolo benchmark``).

One row per row of the formats table and each of its precisions: export, load, evaluate
(accuracy, top-1 agreement with the fp32 model), then all loaded variants are timed
round-robin in one run (``interleaved_latency``) so speedups against ONNX fp32 are fair.
Status: ✅ ran here; ❎ not available here (a runtime or GPU this machine lacks; the
reason says which); ❌ failed (the error says why). One row failing never stops the others.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from copy import deepcopy
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import progress
from .errors import EdgekitError

OK, UNAVAILABLE, FAILED = "✅", "❎", "❌"
ORDER = ("onnx", "tflite", "tensorrt")  # table order; formats added later follow in name order
REFERENCE = ("onnx", "fp32")  # speedups are relative to this row


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {(text.splitlines()[0] if text else '')[:300]}".rstrip(": ")


def baseline_model(model_name: str, task, weights: Optional[str] = None, recipe=None, seed: int = 0) -> nn.Module:
    """The trained fp32 model to benchmark: the pipeline's cached baseline (trained on ``task`` if needed)."""
    from .pipeline import get_baseline

    torch.manual_seed(seed)  # the fresh model's initial weights must not depend on what ran before
    model, _info = get_baseline(model_name, task, weights=weights, recipe=recipe, seed=seed)
    return model.eval()


def _row(fmt: str, precision: str, **kw) -> Dict[str, Any]:
    row = {"format": fmt, "precision": precision, "status": FAILED, "reason": None, "runtime": None,
           "path": None, "size_mb": None, "accuracy": None, "agreement": None, "p50_ms": None, "p90_ms": None,
           "speedup": None, "export_s": None, "info": {}}
    row.update(kw)
    return row


def benchmark(model_name: Union[str, nn.Module], recipe=None, device="desktop-cpu", *, task=None,
              data: Optional[str] = None, weights: Optional[str] = None, formats: Optional[Sequence[str]] = None,
              options: Optional[Dict[str, Dict[str, Any]]] = None, num_eval: Optional[int] = None,
              runs: int = 50, warmup: int = 5, out_dir: Optional[Union[str, Path]] = None,
              input_size: Optional[int] = None, threads: Optional[int] = None,
              seed: int = 0, skip_bad_images: bool = False) -> List[Dict[str, Any]]:
    """Benchmark every format x precision of a model; returns one dict per row.

    ``model_name``: a zoo name (its trained baseline comes from :func:`baseline_model`)
    or an ``nn.Module`` used as is. ``recipe``: optional recipe name/path/Recipe whose
    steps compress the model first and whose variants' options apply to matching rows.
    ``device``: profile name/path (threads, int8 types; latency is measured only for a
    local profile). ``options``: extra options per ``"format"`` or ``"format:precision"``.
    ``out_dir``: keep the artifacts there (default: a temporary folder, removed after).
    ``threads``: runtime threads (default: the device profile's).
    """
    from .config import DeviceProfile, Recipe, load_device, load_recipe
    from .data import load_task
    from .export import ExportContext, export
    from .formats import FORMATS, FormatUnavailable
    from .profiling.local import interleaved_latency
    from .runtime import load_runner

    dev = device if isinstance(device, DeviceProfile) else load_device(device)
    rec = recipe if recipe is None or isinstance(recipe, Recipe) else load_recipe(recipe)
    names = list(formats) if formats is not None else sorted(FORMATS, key=lambda n: (n not in ORDER,
                                                                                 ORDER.index(n) if n in ORDER else 0,
                                                                                 n))
    for n in names:
        FORMATS.get(n)  # unknown format names fail here, before any work
    if out_dir is not None and Path(out_dir).exists() and (not Path(out_dir).is_dir() or any(Path(out_dir).iterdir())):
        raise EdgekitError(f"{out_dir} already exists and is not an empty folder; give another --out")
    if task is None:
        kw: Dict[str, Any] = {"seed": seed}
        if input_size is not None:
            kw["input_size"] = input_size
        task = load_task("mnist", data=data, skip_bad_images=skip_bad_images, **kw)
    if isinstance(model_name, nn.Module):
        model, label = model_name.eval(), type(model_name).__name__
    else:
        model, label = baseline_model(model_name, task, weights=weights, recipe=rec, seed=seed), model_name
    if rec is not None and rec.steps:
        from .compress.steps import StepContext, validate_steps

        steps = validate_steps(rec.steps, where=f"recipe {rec.name}")
        ctx = StepContext(task=task, baseline=model, model_name=label, device=dev, seed=seed)
        model = deepcopy(model)
        for step in steps:
            model = step.apply(model, ctx).eval()
    variant_opts: Dict[str, Dict[str, Any]] = {}
    for v in (rec.variants if rec is not None else []):
        variant_opts[f"{v.format}:{v.precision}"] = dict(v.options)
    for k, v in (options or {}).items():
        variant_opts[k] = {**variant_opts.get(k, {}), **v}

    threads = int(threads or dev.resolved_threads())
    keep = out_dir is not None
    root = Path(out_dir) if keep else Path(tempfile.mkdtemp(prefix="edgekit-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: List[Dict[str, Any]] = []
    runners: Dict[int, Any] = {}
    cache: Dict[Any, Path] = {}
    try:
        for fmt_name in names:
            fmt = FORMATS.get(fmt_name)
            for precision in fmt.precisions:
                row = _row(fmt.name, precision, runtime=fmt.runtime)
                rows.append(row)
                opts = {**variant_opts.get(fmt.name, {}), **variant_opts.get(f"{fmt.name}:{precision}", {})}
                ectx = ExportContext(out_dir=root, task=task, device=dev, input_shape=task.input_shape,
                                     name=f"{fmt.name}-{precision}", cache=cache)
                t0 = time.time()
                try:
                    with progress.status(f"export {fmt.name} {precision} ..."):
                        path = export(fmt.name, model, precision, opts, ectx)
                except FormatUnavailable as exc:
                    kept = [Path(a).name for a in exc.artifacts] if keep else []
                    row.update(status=UNAVAILABLE, info=dict(ectx.info),
                               reason=exc.reason + (f" (kept {', '.join(kept)} to build on the device)" if kept
                                                    else ""))
                    continue
                except ImportError as exc:
                    row.update(status=UNAVAILABLE, reason=f"needs the Python module {exc.name or exc} "
                                                          f"(pip install 'edgekit[{fmt.name}]')")
                    continue
                except Exception as exc:  # noqa: BLE001 - one format failing never stops the others
                    row.update(reason=f"export: {_first_line(exc)}", info=dict(ectx.info))
                    continue
                row.update(export_s=round(time.time() - t0, 1), info=dict(ectx.info),
                           size_mb=round(path.stat().st_size / 2**20, 3), path=str(path) if keep else None)
                try:
                    runner = load_runner(fmt.runtime, path, threads=threads)
                except FormatUnavailable as exc:
                    row.update(status=UNAVAILABLE, reason=exc.reason)
                    continue
                except Exception as exc:  # noqa: BLE001
                    row.update(reason=f"load: {_first_line(exc)}")
                    continue
                runners[len(rows) - 1] = runner
        x1 = _evaluate_rows(rows, runners, model, task, num_eval) if runners else None
        if dev.local and runners:
            _time_rows(rows, runners, x1, warmup, runs, interleaved_latency)
        elif runners:
            for i in runners:
                rows[i]["info"]["latency"] = f"not measured: {dev.name} is not this machine"
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    if task.skipped is not None:  # asked for: every row says how many unreadable images were left out
        for row in rows:
            row["info"]["skipped_images"] = len(task.skipped)
    return rows


@torch.no_grad()
def _evaluate_rows(rows, runners, model, task, num_eval) -> np.ndarray:
    """Accuracy and agreement with the torch model of every loaded row, in one pass over the eval split.

    A row whose runtime fails turns ❌ and leaves ``runners``; the others go on. Returns the first input.
    """
    from .evaluate import agreement, predict_stream, top1

    feeds = {"ref": (lambda b: model(torch.from_numpy(b)).numpy(), 128)}
    for i, r in runners.items():
        feeds[str(i)] = (r.run, r.input_shape[0] if isinstance(r.input_shape[0], int) else 64)
    pred = predict_stream(feeds, task.batches("eval", batch_size=128, limit=num_eval),
                          total=task.num_batches("eval", 128, num_eval), description="evaluate")
    if "ref" in pred.errors:
        raise pred.errors["ref"]
    for i in list(runners):
        err = pred.errors.get(str(i))
        if err is not None:
            rows[i].update(reason=f"run: {_first_line(err)}")
            del runners[i]
            continue
        r, logits = runners[i], pred.logits[str(i)]
        rows[i].update(status=OK, runtime=f"{r.runtime} {r.version}", accuracy=round(top1(logits, pred.labels), 4),
                       agreement=round(agreement(pred.logits["ref"], logits), 4))
    return pred.first


def _time_rows(rows, runners, x1, warmup, runs, interleaved_latency) -> None:
    """p50/p90 of every ✅ row, timed round-robin; a row whose timing fails turns ❌ and the rest are retimed."""
    live = dict(runners)
    lat = None
    while live:
        try:
            lat = interleaved_latency({str(i): r.run for i, r in live.items()}, np.ascontiguousarray(x1),
                                      warmup=warmup, rounds=runs, description="benchmark")
            break
        except Exception as exc:  # noqa: BLE001 - find the culprit, drop it, time the rest
            bad = []
            for i, r in live.items():
                try:
                    r.run(x1)
                except Exception as err:  # noqa: BLE001
                    bad.append((i, err))
            if not bad:
                for i in live:
                    rows[i]["info"]["latency"] = f"not measured: {_first_line(exc)}"
                return
            for i, err in bad:
                rows[i].update(status=FAILED, reason=f"timing: {_first_line(err)}", accuracy=None, agreement=None)
                del live[i]
    if lat is None:
        return
    base = next((lat[str(i)]["p50"] for i in live if (rows[i]["format"], rows[i]["precision"]) == REFERENCE), None)
    for i, r in live.items():
        stats = lat[str(i)]
        rows[i].update(p50_ms=round(stats["p50"], 4), p90_ms=round(stats["p90"], 4),
                       speedup=round(base / stats["p50"], 3) if base else None)
        rows[i]["info"]["threads"] = r.threads


def _cell(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def benchmark_table(rows: List[Dict[str, Any]], title: Optional[str] = None):
    """A rich Table of benchmark rows (the CLI prints it)."""
    from rich.table import Table

    table = Table(title=title, header_style="bold")
    for c, j in (("format", "left"), ("precision", "left"), ("status", "center"), ("size MB", "right"),
                 ("accuracy", "right"), ("agreement", "right"), ("p50 ms", "right"), ("p90 ms", "right"),
                 ("speedup", "right"), ("note", "left")):
        table.add_column(c, justify=j, overflow="fold")
    for r in rows:
        note = r["reason"] or (r["runtime"] if r["status"] == OK else "")
        table.add_row(r["format"], r["precision"], r["status"], _cell(r["size_mb"], ".2f"),
                      _cell(r["accuracy"], ".4f"), _cell(r["agreement"], ".4f"), _cell(r["p50_ms"], ".3f"),
                      _cell(r["p90_ms"], ".3f"), "-" if r["speedup"] is None else f"{r['speedup']:.2f}x", note or "")
    return table
