"""Stages 2-5: apply the recipe's steps, export every variant, evaluate them in one streamed pass, measure them.

Each stage takes and returns plain values (models, :class:`~edgekit.results.Variant` records), so ``compress``,
``benchmark``, the bench scripts and the tests compose the same stages instead of rewiring them.
"""

from __future__ import annotations

import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from torch import nn

from .. import progress, zoo
from ..config import DeviceProfile, Recipe
from ..data import Task
from ..errors import EdgekitError, first_line
from ..formats import FORMATS, FormatUnavailable
from ..results import ESTIMATED, FAILED, MEASURED, OK, UNAVAILABLE, Latency, Variant

REFERENCE = ("baseline", "onnx", "fp32")  # every run's reference variant: speedups and agreement are against it


@dataclass(frozen=True)
class VariantSpec:
    """One artifact to make: from which model (``stage``), in which format and precision, with which options."""

    stage: str
    format: str
    precision: str
    options: Dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or (self.precision if self.stage == "baseline" else f"{self.stage}-{self.precision}")


def plan_variants(recipe: Recipe, tag: Optional[str]) -> List[VariantSpec]:
    """The reference (baseline ONNX fp32) first, then the recipe's variants of its final model."""
    specs = [VariantSpec(*REFERENCE)]
    for v in recipe.variants:
        spec = VariantSpec(tag or "baseline", v.format, v.precision, dict(v.options))
        if (spec.stage, spec.format, spec.precision) != REFERENCE:
            specs.append(spec)
    return specs


def apply_steps(baseline: nn.Module, recipe: Recipe, task: Task, device: DeviceProfile, model_name: str,
                seed: int = 0, notes: Optional[List[str]] = None,
                train_device: str = "auto") -> Tuple[Optional[nn.Module], List[dict]]:
    """The recipe's steps in order on a copy of ``baseline``; (final model or None without steps, per-step facts).
    ``train_device``: where the steps' fine-tunes train (auto, cpu, cuda)."""
    from ..steps import StepContext, validate_steps

    steps = validate_steps(recipe.steps, where=f"recipe {recipe.name}")
    if not steps:
        return None, []
    ctx = StepContext(task=task, baseline=baseline, model_name=model_name, device=device, seed=seed,
                      notes=notes if notes is not None else [], train_device=train_device)
    model, info = deepcopy(baseline), []
    for step, s in zip(steps, recipe.steps):
        t0 = time.time()
        with progress.status(f"{s.kind} ..."):
            model = step.apply(model, ctx).eval()
        info.append({"kind": s.kind, "params": step.params.model_dump(), "seconds": round(time.time() - t0, 1),
                     **ctx.info.pop(s.kind, {})})
    return model, info


@dataclass
class Trained:
    """The models a run compares and how they came to be: the fp32 baseline, the recipe's final model (None
    without steps), and their records for report.json."""

    baseline: Any
    base_info: dict
    final: Optional[nn.Module]
    step_info: List[dict]
    notes: List[str]
    training: Optional[dict]


def train_stage(source, task: Task, recipe: Recipe, device: DeviceProfile, seed: int = 0, use_cache: bool = True,
                train_device: str = "auto") -> Trained:
    """Baseline (trained, cached, pretrained or the user's) and the recipe's steps on it (:func:`apply_steps`)."""
    import torch

    from ..train import recording

    torch.manual_seed(seed)
    with recording() as trained:
        baseline, base_info = source.baseline(task, recipe, seed, use_cache, train_device)
        notes: List[str] = []
        final, step_info = apply_steps(baseline, recipe, task, device, source.label, seed, notes, train_device)
    return Trained(baseline, base_info, final, step_info, notes, trained.summary())


def export_stage(trained: Trained, recipe: Recipe, task: Task, device: DeviceProfile, folder: Path,
                 model_label: str) -> Tuple[List[Variant], Dict[str, Any], Optional[np.ndarray]]:
    """Export the recipe's variants into ``folder`` (intermediate files dropped), load a session for each and
    evaluate them all in one pass: (variants, runners, the first eval input that latency is timed on)."""
    from ..steps import step_tag

    tag = step_tag(recipe.steps)
    models = {"baseline": trained.baseline, **({tag: trained.final} if trained.final is not None else {})}
    variants = export_variants(models, plan_variants(recipe, tag), task, device, folder, model_label=model_label,
                               timer=local_timer(device))
    drop_intermediates(folder, variants)
    runners = load_runners(variants, device.resolved_threads())
    return variants, runners, evaluate(variants, runners, task)


def export_variants(models: Dict[str, nn.Module], specs: Sequence[VariantSpec], task: Task, device: DeviceProfile,
                    out_dir: Path, *, timer: Optional[Callable] = None, model_label: str = "the model",
                    reference_required: bool = True) -> List[Variant]:
    """Export each spec into ``out_dir``. A format this machine cannot make is ``unavailable`` (with the reason), an
    export error ``failed``; one never stops the others. A user error (EdgekitError) stops the run, and so does the
    reference's failure when ``reference_required`` (nothing can be compared without it)."""
    from ..export import ExportContext, export
    from ..export.onnx_source import OnnxModel
    from ..export.qat import is_qat

    cache: Dict[Any, Path] = {}
    variants: List[Variant] = []
    for i, spec in enumerate(specs):
        fmt, name, m = FORMATS.get(spec.format), spec.label, models[spec.stage]
        st = m.stats() if isinstance(m, OnnxModel) or is_qat(m) else zoo.model_stats(m, task.input_shape)
        ctx = ExportContext(out_dir=out_dir, task=task, device=device, input_shape=task.input_shape, name=name,
                            cache=cache, **({"timer": timer} if timer is not None else {}))
        var = Variant(name, fmt.name, spec.precision, ctx.path(fmt.suffix), spec.stage, st["params"], st["macs"])
        t0 = time.time()
        try:
            with progress.status(f"export {fmt.name} {name} ..."):
                var.path = export(fmt.name, m, spec.precision, dict(spec.options), ctx)
            var.size_mb = round(var.path.stat().st_size / 2**20, 3)
            var.export_s = round(time.time() - t0, 1)
        except EdgekitError:
            raise
        except FormatUnavailable as exc:  # e.g. TensorRT on a machine without it
            var.fail(UNAVAILABLE, str(exc))
            if exc.artifacts:
                var.info["kept"] = [Path(a).name for a in exc.artifacts]
        except ImportError as exc:
            var.fail(UNAVAILABLE, f"needs the Python module {exc.name or exc} (pip install 'edgekit[{fmt.name}]')")
        except Exception as exc:  # noqa: BLE001 - one failing variant must not stop the others
            if i == 0 and reference_required:
                raise EdgekitError(f"Cannot export {model_label} to {fmt.name} {spec.precision}: "
                                   f"{first_line(exc)}") from exc
            var.fail(FAILED, f"export: {first_line(exc)}")
        var.info.update(ctx.info)
        variants.append(var)
    return variants


def local_timer(device: DeviceProfile) -> Optional[Callable]:
    """The timer exporters may use to choose between candidates (ONNX int8 layouts): only where timing here says
    something about the device."""
    from ..measure import measures_here
    from ..measure.local import interleaved_latency

    return interleaved_latency if measures_here(device) else None


def drop_intermediates(out_dir: Path, variants: Sequence[Variant]) -> None:
    """Files an exporter left beside its artifact (the fp32 source of an int8 model ...) are not kept."""
    listed = {v.path.name for v in variants if v.status == OK and v.path is not None}
    for f in out_dir.iterdir():
        if f.is_file() and not f.name.startswith(".") and f.name not in listed:
            f.unlink()


def load_runners(variants: Sequence[Variant], threads: Optional[int]) -> Dict[str, Any]:
    """A runtime session per exported variant; one that cannot load is marked, the others go on."""
    from ..runtime import load_runner

    runners = {}
    for v in variants:
        if v.status != OK:
            continue
        try:
            runners[v.key] = load_runner(FORMATS.get(v.format).runtime, v.path, threads=threads)
            r = runners[v.key]
            v.runtime = f"{r.runtime} {r.version}"
        except FormatUnavailable as exc:
            v.fail(UNAVAILABLE, exc.reason)
        except Exception as exc:  # noqa: BLE001
            v.fail(FAILED, f"load: {first_line(exc)}")
    return runners


def evaluate(variants: Sequence[Variant], runners: Dict[str, Any], task: Task,
             reference: Optional[Callable[[np.ndarray], np.ndarray]] = None, num_eval: Optional[int] = None,
             batch_size: int = 64) -> Optional[np.ndarray]:
    """Accuracy (labelled tasks only) and fidelity to fp32 of every loaded variant, in one streamed pass of the eval
    split: top-1 agreement, top-5 overlap and logits SQNR.

    The reference is ``reference`` (e.g. the torch model) when given, else the first variant (the run's fp32 ONNX),
    whose own SQNR is then left empty. An unlabelled task (``task.labelled`` false) gets no accuracy: its variants
    are judged by agreement alone. Returns the first eval input, which latency is timed on.
    """
    from ..evaluate import agreement, predict_stream, sqnr_db, top1, topk_overlap

    if getattr(task, "kind", "classification") == "detection":
        from ..detect.evaluate import evaluate_variants

        return evaluate_variants(variants, runners, task, num_eval=num_eval, batch_size=min(batch_size, 16))
    live = [v for v in variants if v.status == OK and v.key in runners]
    if not live:
        return None
    feeds = {"__ref__": (reference, batch_size)} if reference is not None else {}
    for v in live:
        r = runners[v.key]
        feeds[v.key] = (r.run, r.input_shape[0] if isinstance(r.input_shape[0], int) else batch_size)
    pred = predict_stream(feeds, task.batches("eval", batch_size=batch_size, limit=num_eval),
                          total=task.num_batches("eval", batch_size, num_eval),
                          description=f"evaluate {', '.join(v.name for v in live)}")
    if "__ref__" in pred.errors:
        raise pred.errors["__ref__"]
    ref = pred.logits.get("__ref__")
    labelled = getattr(task, "labelled", True) and pred.labels is not None
    for v in live:
        err = pred.errors.get(v.key)
        if err is not None:
            v.fail(FAILED, f"run: {first_line(err)}")
            runners.pop(v.key, None)
            continue
        logits = pred.logits[v.key]
        itself = ref is None
        if itself:
            ref = logits
        v.accuracy = round(top1(logits, pred.labels), 4) if labelled else None
        v.agreement = round(agreement(ref, logits), 4)
        top5 = topk_overlap(ref, logits)
        v.top5_overlap = None if top5 is None else round(top5, 4)
        v.sqnr_db = None if itself else round(sqnr_db(ref, logits), 2)
    return pred.first


def measure(variants: Sequence[Variant], runners: Dict[str, Any], device: DeviceProfile, x: Optional[np.ndarray],
            runs: int = 100, warmup: int = 10) -> None:
    """Latency of every variant that ran, decided in one place: measured here side by side (a ``local`` profile), or
    estimated from the ONNX graph (any other device; labelled). Speedups are against the first timed variant when
    it is the run's reference."""
    from ..measure import measures_here

    live = [v for v in variants if v.status == OK and v.key in runners]
    if not live:
        return
    if measures_here(device):
        _time_side_by_side(live, runners, device, x, runs, warmup)
    else:
        from ..estimate import estimate

        threads = device.resolved_threads()
        for v in live:
            if Path(v.path).suffix.lower() != ".onnx":
                v.info["latency"] = f"not measured: {device.name} is not this machine, and only ONNX graphs are " \
                                    f"estimated (measure with `edgekit profile {v.path.name} --host ...`)"
                continue
            lat = estimate(v.path, device, threads=threads)
            v.latency = Latency(round(lat.p50, 4), ESTIMATED, device.name, threads=threads, method=lat.method,
                                extra={"coefficients": lat.extra.get("coefficients")})
    timed = [v for v in variants if v.status == OK and v.latency is not None]
    ref = variants[0] if variants and (variants[0].stage, variants[0].format, variants[0].precision) == REFERENCE \
        else None
    if timed and ref is not None and ref.latency is not None:
        for v in timed:
            v.speedup = round(ref.latency.p50 / v.latency.p50, 3)


def _time_side_by_side(live: List[Variant], runners, device: DeviceProfile, x, runs: int, warmup: int) -> None:
    """Round-robin timing; a variant whose run fails is marked and the rest are timed again without it."""
    from ..measure.local import interleaved_latency

    x1 = np.ascontiguousarray(x[:1])
    pending = {v.key: v for v in live}
    while pending:
        try:
            lat = interleaved_latency({k: runners[k].run for k in pending}, x1, warmup=warmup, rounds=runs,
                                      description="benchmark")
            break
        except Exception as exc:  # noqa: BLE001 - find the culprit, drop it, time the rest
            bad = []
            for k in pending:
                try:
                    runners[k].run(x1)
                except Exception as err:  # noqa: BLE001
                    bad.append((k, err))
            if not bad:
                for v in pending.values():
                    v.info["latency"] = f"not measured: {first_line(exc)}"
                return
            for k, err in bad:
                pending.pop(k).fail(FAILED, f"timing: {first_line(err)}")
    for k, v in pending.items():
        r, stats = runners[k], lat[k]
        v.latency = Latency(round(stats["p50"], 4), MEASURED, device.name, p90=round(stats["p90"], 4),
                            threads=r.threads, runtime=r.runtime, runtime_version=r.version, runs=stats["runs"],
                            extra={"mean": round(stats["mean"], 4), "min": round(stats["min"], 4)})
