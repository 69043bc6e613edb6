"""``compress``: the stages end to end, into an output folder that appears whole or not at all."""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional


from ..config import DeviceProfile, Recipe, load_device, load_recipe
from ..errors import EdgekitError
from ..fsutil import check_replaceable, make_temp_dir, publish
from ..results import Latency, Variant
from .assemble import assemble_report
from ..sources import ModelSource, parse_source
from .source import resolve
from .stages import export_stage, measure, train_stage


@dataclass
class CompressResult:
    """What ``edgekit.steps`` returns: the report (``to_json()`` is report.json) and typed variants by name."""

    report: Dict[str, Any]
    variants: Dict[str, Variant] = field(default_factory=dict)
    out_dir: Optional[Path] = None

    @property
    def recommended(self) -> Optional[str]:
        rec = self.report.get("recommended")
        return rec["name"] if rec else None

    def to_json(self) -> Dict[str, Any]:
        return self.report

    def __getitem__(self, key: str) -> Any:  # report["variants"] etc.: code written against the dict keeps working
        return self.report[key]


def default_out_dir(model: str, recipe: str, device: Optional[str], data: Optional[str] = None) -> Path:
    """export/<model>-<recipe>[-<device>][-<data folder>]: a run on --data never lands in the MNIST run's folder."""
    name = re.sub(r"[^\w.-]+", "-", model).strip("-.") + f"-{recipe}" + (
        f"-{device}" if device and device != "desktop-cpu" else "")
    if data is not None:
        folder = re.sub(r"[^\w.-]+", "-", Path(data).resolve().name).strip("-.") or "data"
        name += f"-{folder}"
    return Path("export") / name


def compress(model: "str | ModelSource", recipe: str | Recipe = "int8", device: str | DeviceProfile = "desktop-cpu",
             data: Optional[str] = None, weights: Optional[str] = None, out: Optional[str | Path] = None,
             force: bool = False, seed: int = 0, target_ms: Optional[float] = None,
             input_size: Optional[int] = None, runs: int = 100, use_cache: bool = True,
             skip_bad_images: bool = False, train_device: str = "auto") -> CompressResult:
    """Compress ``model`` (a zoo name, ``timm:<name>``, ``file.py:Factory``, a .onnx file: :mod:`edgekit.sources`)
    with ``recipe`` for ``device``: baseline, steps, export, evaluate, measure, report.

    Everything the user can get wrong is checked before any work starts (every image of ``data`` is decoded once;
    ``skip_bad_images`` leaves unreadable ones out and counts them). ``train_device``: where the baseline and the
    steps train (auto, cpu, cuda). Under torchrun every rank trains; rank 0 alone exports, evaluates, times and
    writes the output folder, and every rank returns its result.
    """
    src = model if isinstance(model, ModelSource) else parse_source(str(model))
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    dev = device if isinstance(device, DeviceProfile) else load_device(device)
    from ..steps import validate_steps

    validate_steps(rec.steps, where=f"recipe {rec.name}")
    if data is not None and not Path(data).is_dir():
        raise EdgekitError(f"Data folder not found: {data}")
    if weights not in (None, "pretrained") and not Path(weights).is_file():
        raise EdgekitError(f"Weights file not found: {weights}")
    if target_ms is not None and target_ms <= 0:
        raise EdgekitError("--target-ms must be positive")
    source = resolve(src, weights, input_size, steps=[s.kind for s in rec.steps], what=f"recipe {rec.name}")
    out_dir = Path(out) if out is not None else default_out_dir(source.label, rec.name, dev.name, data)
    from ..distributed import Session
    from ..train import training_device

    dist = Session(training_device(train_device).type)  # under torchrun: this rank joins the group; else nothing
    tmp = None
    try:
        dist.on_main(check_replaceable, out_dir, force)  # the folder is rank 0's; its refusal stops every rank
        task = source.task(data, seed=seed, input_size=input_size, skip_bad_images=skip_bad_images)
        tmp = make_temp_dir(out_dir) if dist.is_main else None
        t_start = time.time()
        trained = train_stage(source, task, rec, dev, seed, use_cache, train_device)
        if not dist.main_only():  # the other ranks wait for rank 0's result (or its error) and return it
            return dist.result()
        variants, runners, x = export_stage(trained, rec, task, dev, tmp, source.label)
        measure(variants, runners, dev, x, runs=runs)
        report = assemble_report(source.label, source.info(), rec, dev, task, trained.base_info, trained.step_info,
                                 variants, trained.notes, target_ms, seed, training=trained.training)
        report["seconds"] = round(time.time() - t_start, 1)
        from ..report import write_reports

        write_reports(report, tmp)
        publish(tmp, out_dir)
        report["out_dir"] = str(out_dir)
        for v in variants:
            if v.path is not None and v.status == "ok":
                v.path = out_dir / v.path.name
        return dist.share(CompressResult(report, {v.name if v.format == "onnx" else f"{v.name}-{v.format}": v
                                                  for v in variants}, out_dir))
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.fail(exc)  # rank 0 after training: the waiting ranks raise its error instead of waiting
        raise
    finally:
        dist.close()


def run(*args, **kwargs) -> dict:
    """report.json's content of :func:`compress` (and ``out_dir``): the dict the CLI and older callers use."""
    return compress(*args, **kwargs).report


__all__ = ["CompressResult", "Latency", "compress", "default_out_dir", "run"]
