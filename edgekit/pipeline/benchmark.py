"""``edgekit benchmark``: every format x precision of one model, side by side (like ``yolo benchmark``).

The pipeline's stages with one variant per row of the formats table and each of its precisions: export, load,
evaluate (accuracy where the images have labels; top-1 agreement, top-5 overlap and logits SQNR against the torch
model) in one pass, then every row that runs is timed round-robin (or estimated off this machine) so speedups
against ONNX fp32 are fair. Status: ok (ran here), unavailable (a runtime or GPU this machine lacks; the reason says
which), failed (the error says why). One row never stops another.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import EdgekitError
from ..results import FAILED, OK, STATUS_MARK, UNAVAILABLE, Variant  # noqa: F401 - the status words

ORDER = ("onnx", "tflite", "tensorrt")  # table order; formats added later follow in name order
REFERENCE = ("onnx", "fp32")  # speedups are relative to this row


@dataclass
class BenchmarkResult:
    """The rows of a benchmark (one :class:`~edgekit.results.Variant` each); ``to_json()`` lists them."""

    model: str
    device: str
    variants: List[Variant] = field(default_factory=list)
    skipped_images: Optional[int] = None
    labelled: bool = True  # False: unlabelled images, judged by agreement with the fp32 torch model only
    num_eval: Optional[int] = None  # images every row was evaluated on

    def __iter__(self):
        return iter(self.variants)

    def __len__(self) -> int:
        return len(self.variants)

    def row(self, fmt: str, precision: str) -> Variant:
        return next(v for v in self.variants if v.format == fmt and v.precision == precision)

    def to_json(self) -> Dict[str, Any]:
        return {"model": self.model, "device": self.device, "variants": [v.to_json() for v in self.variants],
                **({"skipped_images": self.skipped_images} if self.skipped_images is not None else {}),
                **({"labelled": False} if not self.labelled else {}),
                **({"num_eval": self.num_eval} if self.num_eval is not None else {})}


def baseline_model(model_name: str, task, weights: Optional[str] = None, recipe=None, seed: int = 0,
                   train_device: str = "auto") -> nn.Module:
    """The trained fp32 model to benchmark: the pipeline's cached baseline (trained on ``task`` if needed)."""
    from .baseline import get_baseline

    torch.manual_seed(seed)  # the fresh model's initial weights must not depend on what ran before
    model, _info = get_baseline(model_name, task, weights=weights, recipe=recipe, seed=seed, train_device=train_device)
    return model.eval()


def benchmark(model_name: Union[str, nn.Module], recipe=None, device="desktop-cpu", *, task=None,
              data: Optional[str] = None, weights: Optional[str] = None, formats: Optional[Sequence[str]] = None,
              options: Optional[Dict[str, Dict[str, Any]]] = None, num_eval: Optional[int] = None,
              runs: int = 50, warmup: int = 5, out_dir: Optional[Union[str, Path]] = None,
              input_size: Optional[int] = None, threads: Optional[int] = None,
              seed: int = 0, skip_bad_images: bool = False, train_device: str = "auto") -> BenchmarkResult:
    """Benchmark every format x precision of a model.

    ``model_name``: any model source (:mod:`edgekit.sources`: a zoo name, ``timm:<name>``, ``file.py:Factory``, a
    .onnx file; its baseline as ``compress`` makes it) or an ``nn.Module`` used as is. ``recipe``: optional recipe
    whose steps compress the model first and whose variants' options apply to matching rows. ``device``: profile name/path/object. ``options``: extra options per ``"format"`` or
    ``"format:precision"``. ``out_dir``: keep the artifacts there (default: a temporary folder, removed after).
    ``threads``: runtime threads (default: the device profile's). ``train_device``: where training runs (auto,
    cpu, cuda). Under torchrun every rank trains; rank 0 alone exports and times, and every rank returns its rows.
    """
    from ..distributed import Session
    from ..train import training_device

    dist = Session(training_device(train_device).type)  # under torchrun: this rank joins the group; else nothing
    try:
        return _benchmark(dist, model_name, recipe, device, task=task, data=data, weights=weights, formats=formats,
                          options=options, num_eval=num_eval, runs=runs, warmup=warmup, out_dir=out_dir,
                          input_size=input_size, threads=threads, seed=seed, skip_bad_images=skip_bad_images,
                          train_device=train_device)
    except BaseException as exc:
        dist.fail(exc)  # rank 0 after training: the waiting ranks raise its error instead of waiting
        raise
    finally:
        dist.close()


def _check_out_dir(out_dir) -> None:
    if out_dir is not None and Path(out_dir).exists() and (not Path(out_dir).is_dir() or any(Path(out_dir).iterdir())):
        raise EdgekitError(f"{out_dir} already exists and is not an empty folder; give another --out")


def _benchmark(dist, model_name, recipe, device, *, task, data, weights, formats, options, num_eval, runs, warmup,
               out_dir, input_size, threads, seed, skip_bad_images, train_device) -> BenchmarkResult:
    from ..config import DeviceProfile, Recipe, load_device, load_recipe
    from ..data import load_task
    from ..formats import FORMATS
    from .stages import (VariantSpec, apply_steps, evaluate, export_variants, load_runners, local_timer,
                           measure)

    dev = device if isinstance(device, DeviceProfile) else load_device(device)
    rec = recipe if recipe is None or isinstance(recipe, Recipe) else load_recipe(recipe)
    names = list(formats) if formats is not None else sorted(
        FORMATS, key=lambda n: (n not in ORDER, ORDER.index(n) if n in ORDER else 0, n))
    for n in names:
        FORMATS.get(n)  # unknown format names fail here, before any work
    dist.on_main(_check_out_dir, out_dir)  # the folder is rank 0's; its refusal stops every rank
    source = None
    if not isinstance(model_name, nn.Module):
        from .source import resolve

        source = resolve(model_name, weights, input_size, steps=[s.kind for s in rec.steps] if rec else (),
                         what=f"recipe {rec.name}" if rec else "the recipe")
    if task is None:
        if source is not None:
            task = source.task(data, seed=seed, input_size=input_size, skip_bad_images=skip_bad_images)
        else:
            kw: Dict[str, Any] = {"seed": seed}
            if input_size is not None:
                kw["input_size"] = input_size
            task = load_task("mnist", data=data, skip_bad_images=skip_bad_images, **kw)
    if source is None:
        model, label = model_name.eval(), type(model_name).__name__
    else:
        torch.manual_seed(seed)  # the fresh model's initial weights must not depend on what ran before
        model, _info = source.baseline(task, rec, seed, train_device=train_device)
        label = source.label
    if rec is not None and (source is None or source.onnx is None):
        final, _ = apply_steps(model, rec, task, dev, label, seed, train_device=train_device)
        model = final if final is not None else model
    if not dist.main_only():  # the other ranks wait for rank 0's rows (or its error) and return them
        return dist.result()
    reference = None if source is not None and source.onnx is not None else (
        lambda b: model(torch.from_numpy(b)).numpy())
    variant_opts: Dict[str, Dict[str, Any]] = {}
    for v in (rec.variants if rec is not None else []):
        variant_opts[f"{v.format}:{v.precision}"] = dict(v.options)
    for k, v in (options or {}).items():
        variant_opts[k] = {**variant_opts.get(k, {}), **v}
    specs = [VariantSpec("baseline", f, p, {**variant_opts.get(f, {}), **variant_opts.get(f"{f}:{p}", {})},
                         name=f"{f}-{p}") for f in names for p in FORMATS.get(f).precisions]
    specs.sort(key=lambda s: (s.format, s.precision) != REFERENCE)  # the reference first: speedups are against it

    keep = out_dir is not None
    root = Path(out_dir) if keep else Path(tempfile.mkdtemp(prefix="edgekit-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        variants = export_variants({"baseline": model}, specs, task, dev, root, model_label=label,
                                   reference_required=False, timer=local_timer(dev))
        runners = load_runners(variants, int(threads or dev.resolved_threads()))
        with torch.no_grad():
            x = evaluate(variants, runners, task, reference=reference, num_eval=num_eval, batch_size=128)
        measure(variants, runners, dev, x, runs=runs, warmup=warmup)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    for v in variants:
        if not keep:
            v.path = None
        if v.status == UNAVAILABLE and v.info.get("kept") and keep:
            v.error += f" (kept {', '.join(v.info['kept'])} to build on the device)"
    order = {(f, p): i for i, (f, p) in enumerate((f, p) for f in names for p in FORMATS.get(f).precisions)}
    variants.sort(key=lambda v: order[(v.format, v.precision)])
    skipped = len(task.skipped) if getattr(task, "skipped", None) is not None else None
    n_eval = task.size("eval") if num_eval is None else min(num_eval, task.size("eval"))
    return dist.share(BenchmarkResult(label, dev.name, variants, skipped, getattr(task, "labelled", True), n_eval))


def _cell(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def benchmark_table(result: BenchmarkResult | List[Variant], title: Optional[str] = None):
    """A rich Table of benchmark rows (the CLI prints it): accuracy and agreement as percentages; on unlabelled
    images agreement, top-5 overlap and logits SQNR against the fp32 torch model instead of accuracy."""
    from rich.table import Table

    free = not getattr(result, "labelled", True)
    n = getattr(result, "num_eval", None)
    caption = f"agreement with fp32 (the torch model) on {n if n is not None else 'the'} unlabelled images" \
        if free else None
    table = Table(title=title, header_style="bold", caption=caption)
    scores = ("agreement %", "top-5 overlap %", "SQNR dB") if free else ("accuracy %", "agreement %")
    for c, j in (("format", "left"), ("precision", "left"), ("status", "left"), ("size MB", "right"),
                 *((c, "right") for c in scores), ("p50 ms", "right"), ("p90 ms", "right"),
                 ("speedup", "right"), ("note", "left")):
        table.add_column(c, justify=j, overflow="fold")
    for v in result:
        lat = v.latency
        note = v.error or (v.runtime if v.status == OK else "") or ""
        if lat is not None and not lat.measured:
            note = f"{note}; latency estimated".lstrip("; ")
        agree = _cell(None if v.agreement is None else 100 * v.agreement, ".2f")
        cells = (agree, _cell(None if v.top5_overlap is None else 100 * v.top5_overlap, ".2f"),
                 "∞" if v.sqnr_db == float("inf") else _cell(v.sqnr_db, ".1f")) if free else \
            (_cell(None if v.accuracy is None else 100 * v.accuracy, ".2f"), agree)
        table.add_row(v.format, v.precision, f"{STATUS_MARK[v.status]} {v.status}", _cell(v.size_mb, ".2f"),
                      *cells, _cell(lat.p50 if lat else None, ".3f"), _cell(lat.p90 if lat else None, ".3f"),
                      "-" if v.speedup is None else f"{v.speedup:.2f}x", note)
    return table
