"""Run a recipe end to end and write the output folder atomically.

baseline (trained / pretrained / user weights) -> steps in recipe order ->
export each variant -> evaluate (accuracy, agreement with fp32) -> latency
(measured on this machine side by side, or not measured) -> report.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from . import __version__, progress, zoo
from .config import DeviceProfile, Recipe, load_device, load_recipe
from .data import Task, load_task
from .errors import EdgekitError
from .fsutil import atomic_write_bytes, check_replaceable, make_temp_dir, publish
from .evaluate import agreement, predict_stream, top1
from .export import ExportContext, export
from .formats import FORMATS, FormatUnavailable
from .profiling.local import interleaved_latency
from .runtime import load_runner
from .runtime.base import module_versions
from .train import FitConfig, fit, set_stochastic_depth

TRAIN_VERSION = 1  # bump when the baseline training recipe changes, to invalidate caches


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("EDGEKIT_CACHE") or user_cache_dir("edgekit"))


def default_out_dir(model: str, recipe: str, device: Optional[str]) -> Path:
    name = f"{model}-{recipe}" + (f"-{device}" if device and device != "desktop-cpu" else "")
    return Path("export") / name


# ----------------------------------------------------------------------------- baseline


def baseline_fit_config(spec: zoo.ModelSpec, recipe: Optional[Recipe], seed: int) -> FitConfig:
    tr = recipe.train if recipe is not None else None
    lr = (tr.lr if tr is not None and tr.lr else None) or spec.train.get("lr", 1e-2)
    return FitConfig(epochs=tr.epochs if tr else 4, lr=lr, batch_size=tr.batch_size if tr else 64, seed=seed)


def get_baseline(model_name: str, task: Task, weights: Optional[str] = None, recipe: Optional[Recipe] = None,
                 seed: int = 0, use_cache: bool = True) -> tuple[nn.Module, dict]:
    """The fp32 model every variant is compared with, and how it was obtained.

    ``weights``: None trains on the task (cached per model/task/config), ``"pretrained"``
    loads ImageNet weights (fine-tuning the new head when the task has other classes),
    any other value is a state-dict file for exactly this task's head.
    """
    spec = zoo.get_spec(model_name)
    cfg = baseline_fit_config(spec, recipe, seed)
    if weights not in (None, "pretrained"):
        model = zoo.create(spec.name, num_classes=task.num_classes, in_chans=task.in_chans, weights=weights)
        return model, {"source": "file", "path": str(Path(weights).resolve())}
    if weights == "pretrained":
        model = zoo.create(spec.name, num_classes=task.num_classes, in_chans=task.in_chans, pretrained=True)
        if task.num_classes == 1000:
            return model, {"source": "pretrained"}
    else:
        model = None
    torch.manual_seed(seed)  # fresh weights must not depend on what ran before in this process
    stochastic_depth = recipe.train.stochastic_depth if recipe is not None else None
    key = json.dumps({"model": spec.name, "task": task.describe(), "fit": vars(cfg), "pretrained": model is not None,
                      "v": TRAIN_VERSION, "torch": torch.__version__.split("+")[0],
                      **({"stochastic_depth": stochastic_depth} if stochastic_depth is not None else {})},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / "baselines" / f"{spec.name}-{task.name.replace(':', '_')}-{digest}.pt"
    info = {"source": "pretrained+finetuned" if model is not None else "trained", "cache": str(path),
            "epochs": cfg.epochs, "lr": cfg.lr, "seed": seed}
    if model is None:
        model = zoo.create(spec.name, num_classes=task.num_classes, in_chans=task.in_chans)
    if use_cache and path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval(), {**info, "cached": True}
        except Exception:  # a stale or corrupt cache entry is retrained, never fatal
            path.unlink(missing_ok=True)
    if stochastic_depth is not None:
        info["stochastic_depth"] = set_stochastic_depth(model, stochastic_depth)
    t0 = time.time()
    fit(model, task, cfg, description=f"train {spec.name}")
    info["train_seconds"] = round(time.time() - t0, 1)
    if use_cache:
        import io

        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        atomic_write_bytes(path, buf.getvalue())  # a unique temp name: caches shared by containers (all PID 1)
    return model.eval(), {**info, "cached": False}


# ----------------------------------------------------------------------------- run


@dataclass
class Variant:
    name: str
    format: str
    precision: str
    path: Path
    stage: str  # "baseline" | the step tag
    params: int
    macs: int
    info: Dict[str, Any] = field(default_factory=dict)
    size_mb: float = 0.0
    accuracy: Optional[float] = None
    agreement: Optional[float] = None
    latency_ms: Optional[Dict[str, Any]] = None
    speedup: Optional[float] = None
    status: str = "ok"
    error: Optional[str] = None

    def to_json(self, root: Path) -> dict:
        return {"name": self.name, "format": self.format, "precision": self.precision, "stage": self.stage,
                "path": self.path.name if self.status == "ok" else None, "size_mb": self.size_mb,
                "accuracy": self.accuracy, "agreement": self.agreement, "latency_ms": self.latency_ms,
                "speedup": self.speedup, "params": self.params, "macs": self.macs,
                "status": self.status, "error": self.error, **({"details": self.info} if self.info else {})}


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"system": platform.system(), "machine": platform.machine(), "cpu": cpu,
            "cores": os.cpu_count(), "python": platform.python_version()}


def run(model: str, recipe: str | Recipe = "int8", device: str | DeviceProfile = "desktop-cpu",
        data: Optional[str] = None, weights: Optional[str] = None, out: Optional[str | Path] = None,
        force: bool = False, seed: int = 0, target_ms: Optional[float] = None, input_size: Optional[int] = None,
        runs: int = 100, use_cache: bool = True, skip_bad_images: bool = False) -> dict:
    """Run ``recipe`` on zoo ``model`` for ``device``; returns report.json's content.

    Everything the user can get wrong is checked before any work starts (every image of
    ``data`` is decoded once; ``skip_bad_images`` leaves unreadable ones out and counts them).
    """
    spec = zoo.get_spec(model)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    dev = device if isinstance(device, DeviceProfile) else load_device(device)
    from .compress.steps import step_tag, validate_steps

    steps = validate_steps(rec.steps, where=f"recipe {rec.name}")
    if data is not None and not Path(data).is_dir():
        raise EdgekitError(f"Data folder not found: {data}")
    if weights not in (None, "pretrained") and not Path(weights).is_file():
        raise EdgekitError(f"Weights file not found: {weights}")
    if target_ms is not None and target_ms <= 0:
        raise EdgekitError("--target-ms must be positive")
    out_dir = Path(out) if out is not None else default_out_dir(spec.name, rec.name, dev.name)
    check_replaceable(out_dir, force)

    task_kw: Dict[str, Any] = {"seed": seed}
    if input_size is not None:
        task_kw["input_size"] = input_size
    task = load_task("mnist", data=data, skip_bad_images=skip_bad_images, **task_kw)
    tmp = make_temp_dir(out_dir)
    try:
        report = _run_in(tmp, spec, rec, steps, step_tag(rec.steps), dev, task, weights, seed, target_ms, runs,
                         use_cache)
        from .report import write_reports

        write_reports(report, tmp)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["out_dir"] = str(out_dir)
    return report


def _run_in(tmp: Path, spec, rec: Recipe, steps, tag, dev: DeviceProfile, task: Task, weights, seed, target_ms,
            runs, use_cache) -> dict:
    t_start = time.time()
    torch.manual_seed(seed)
    baseline, base_info = get_baseline(spec.name, task, weights, rec, seed, use_cache)
    shape = task.input_shape
    models: Dict[str, nn.Module] = {"baseline": baseline}
    step_info: List[dict] = []
    notes: List[str] = []
    if steps:
        from copy import deepcopy

        from .compress.steps import StepContext

        ctx = StepContext(task=task, baseline=baseline, model_name=spec.name, device=dev, seed=seed, notes=notes)
        model = deepcopy(baseline)
        for step, s in zip(steps, rec.steps):
            t0 = time.time()
            with progress.status(f"{s.kind} ..."):
                model = step.apply(model, ctx).eval()
            step_info.append({"kind": s.kind, "params": step.params.model_dump(), "seconds": round(time.time() - t0, 1),
                              **ctx.info.pop(s.kind, {})})
        models[tag] = model

    # Variants: the baseline fp32 ONNX is always the reference; the recipe's variants come from the final model.
    wanted = [("baseline", "onnx", "fp32", {})]
    for v in rec.variants:
        item = (tag or "baseline", v.format, v.precision, v.options)
        if item[:3] != wanted[0][:3]:
            wanted.append(item)
    cache: Dict[Any, Path] = {}
    variants: List[Variant] = []
    for stage, fmt, precision, options in wanted:
        name = precision if stage == "baseline" else f"{stage}-{precision}"
        m = models[stage]
        st = zoo.model_stats(m, shape)
        ectx = ExportContext(out_dir=tmp, task=task, device=dev, input_shape=shape, name=name, cache=cache)
        var = Variant(name, fmt, precision, ectx.path(FORMATS.get(fmt).suffix), stage, st["params"], st["macs"])
        try:
            with progress.status(f"export {fmt} {name} ..."):
                var.path = export(fmt, m, precision, dict(options), ectx)
            var.info.update(ectx.info)
            var.size_mb = round(var.path.stat().st_size / 2**20, 3)
        except EdgekitError:
            raise
        except FormatUnavailable as exc:  # e.g. TensorRT on a machine without it: ❎ with the reason
            var.status, var.error = "unavailable", str(exc)
        except Exception as exc:  # one failing variant must not stop the others
            if stage == "baseline" and fmt == "onnx" and precision == "fp32":
                raise EdgekitError(f"Cannot export {spec.name} to ONNX: {type(exc).__name__}: {exc}") from exc
            var.status, var.error = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        variants.append(var)

    listed = {v.path.name for v in variants if v.status == "ok"}
    for f in tmp.iterdir():  # intermediate files (e.g. the fp32 source of an int8 variant) are not kept
        if f.is_file() and f.name not in listed:
            f.unlink()

    _evaluate(variants, task, dev, runs)
    report = _assemble(spec, rec, dev, task, base_info, step_info, variants, notes, target_ms, seed, tmp)
    report["seconds"] = round(time.time() - t_start, 1)
    return report


def _evaluate(variants: List[Variant], task: Task, dev: DeviceProfile, runs: int) -> None:
    """Accuracy and agreement of every variant in one streamed pass over the eval split, then latency."""
    ok = [v for v in variants if v.status == "ok"]
    threads = dev.resolved_threads()
    runners = {}
    for v in ok:
        try:
            runners[v.name + v.format] = load_runner(FORMATS.get(v.format).runtime, v.path, threads=threads)
        except Exception as exc:
            v.status, v.error = "failed", f"load: {exc}"
    ok = [v for v in ok if v.status == "ok"]
    if not ok:
        return
    feeds = {}
    for v in ok:
        r = runners[v.name + v.format]
        feeds[v.name + v.format] = (r.run, r.input_shape[0] if isinstance(r.input_shape[0], int) else 64)
    pred = predict_stream(feeds, task.batches("eval", batch_size=64), total=task.num_batches("eval", 64),
                          description=f"evaluate {', '.join(v.name for v in ok)}")
    ref_logits = None
    for v in ok:
        err = pred.errors.get(v.name + v.format)
        if err is not None:  # one variant failing must not stop the others
            v.status, v.error = "failed", f"run: {type(err).__name__}: {str(err).strip()[:300]}"
            continue
        logits = pred.logits[v.name + v.format]
        v.accuracy = round(top1(logits, pred.labels), 4)
        if ref_logits is None:
            ref_logits = logits
        v.agreement = round(agreement(ref_logits, logits), 4)
    ok = [v for v in ok if v.status == "ok"]
    if dev.local and ok:
        x1 = np.ascontiguousarray(pred.first[:1])
        lat = interleaved_latency({v.name + v.format: runners[v.name + v.format].run for v in ok}, x1,
                                  warmup=10, rounds=runs, description="benchmark")
        for v in ok:
            r = runners[v.name + v.format]
            v.latency_ms = {k: round(val, 4) if isinstance(val, float) else val
                            for k, val in lat[v.name + v.format].items()}
            v.latency_ms.update({"source": "measured", "device": dev.name, "runtime": r.runtime,
                                 "runtime_version": r.version, "threads": r.threads, "batch": 1})
    elif ok:
        _estimate(ok, dev)
    timed = [v for v in ok if v.latency_ms]
    if timed and timed[0] is ok[0]:
        base = ok[0].latency_ms["p50"]
        for v in timed:
            v.speedup = round(base / v.latency_ms["p50"], 3)


def _estimate(variants: List[Variant], dev: DeviceProfile) -> None:
    """Latency on a device that is not this machine: edgekit's per-operator latency model, labelled ``estimated``.

    Only ONNX graphs can be estimated; other formats keep no latency. Measuring on the device is
    ``edgekit profile ARTIFACT --device D --host user@addr``.
    """
    from dataclasses import replace

    from .estimate import estimate

    threads = dev.resolved_threads()
    for v in variants:
        if Path(v.path).suffix.lower() != ".onnx":
            continue
        lat = estimate(v.path, dev, threads=threads)
        # report.json keeps the figure and where its coefficients came from; the breakdown is `edgekit profile`'s
        v.latency_ms = replace(lat, p50=round(lat.p50, 4), extra={"coefficients": lat.extra["coefficients"]}).to_json()


def _assemble(spec, rec: Recipe, dev: DeviceProfile, task: Task, base_info, step_info, variants: List[Variant],
              notes: List[str], target_ms, seed, root: Path) -> dict:
    target = target_ms if target_ms is not None else dev.latency_target_ms
    ref = variants[0]
    budget = rec.accuracy_budget_pp / 100
    ok = [v for v in variants if v.status == "ok"]
    measured = [v for v in ok if v.latency_ms and v.latency_ms.get("p50") is not None]
    within = [v for v in measured if ref.accuracy is not None and v.accuracy >= ref.accuracy - budget - 1e-9]
    recommended = min(within, key=lambda v: v.latency_ms["p50"]) if within else None
    for v in ok[1:]:
        if ref.accuracy is not None and v.accuracy is not None and v.accuracy < ref.accuracy - budget - 1e-9:
            notes.append(f"{v.name} ({v.format}) loses {100 * (ref.accuracy - v.accuracy):.2f} points of accuracy, "
                         f"more than the recipe's budget of {rec.accuracy_budget_pp} points.")
        if v.speedup is not None and v.speedup < 1.0:
            how = "measured" if v.latency_ms.get("source") == "measured" else "ESTIMATED, not measured"
            notes.append(f"{v.name} ({v.format}) is SLOWER than fp32 on {dev.name} ({v.speedup:.2f}x the fp32 speed, "
                         f"{how}): it does not pay off on this device; use fp32 here.")
    for v in variants:
        if v.status != "ok":
            notes.append(f"{v.name} ({v.format}) {'is not available here' if v.status == 'unavailable' else 'failed'}"
                         f": {v.error}")
    if not dev.local:
        notes.append(f"Latency on {dev.name} is ESTIMATED by edgekit's per-operator latency model, not measured: "
                     f"{dev.name} is not this machine. Measure on the device with `edgekit profile ARTIFACT "
                     f"--device {dev.name} --host user@addr`.")
    target_block: Dict[str, Any] = {"latency_ms": target, "met": None, "source": None}
    if target is not None and measured:
        best = recommended or min(measured, key=lambda v: v.latency_ms["p50"])
        target_block = {"latency_ms": target, "met": bool(best.latency_ms["p50"] <= target),
                        "variant": best.name, "p50_ms": best.latency_ms["p50"], "source": best.latency_ms["source"]}
        for v in measured:
            v.info["meets_target"] = bool(v.latency_ms["p50"] <= target)
    return {
        "edgekit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": spec.name,
        "model_info": {"source": spec.source, "paper": spec.paper, "baseline": base_info},
        "recipe": rec.name,
        "recipe_spec": rec.model_dump(),
        "device": dev.name,
        "device_profile": dev.model_dump(),
        "task": task.describe(),
        "seed": seed,
        "versions": {"edgekit": __version__, **module_versions()},
        "machine": machine_info(),
        "steps": step_info,
        "variants": [v.to_json(root) for v in variants],
        "recommended": {"name": recommended.name, "format": recommended.format,
                        "latency_source": recommended.latency_ms["source"]} if recommended else None,
        "target": target_block,
        "notes": notes,
    }
