"""What one Ray task of a sweep does: train a baseline, build a (model, recipe, signature), or measure a cell.

Plain functions over the pipeline's public stages (``train_stage``, ``export_stage``, ``measure``,
``assemble_report``), so a sweep cell is what ``edgekit compress`` would have written for it. Each returns a plain
record; a user error (EdgekitError) or an unexpected one is returned as ``{"error": ...}`` rather than raised, so the
driver can tell a failed cell from a crashed worker.
"""

from __future__ import annotations

import os
import shutil
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import DeviceUnreachable, EdgekitError, first_line
from ..results import OK, Variant

INPUT_FILE = "input.npy"  # the first eval input, which local latency is timed on


@dataclass
class Settings:
    """The sweep-wide settings every task needs (plain values: they travel to Ray workers)."""

    data: Optional[str]
    weights: Optional[str]
    input_size: Optional[int]
    seed: int
    runs: int
    target_ms: Optional[float]


@dataclass
class TaskFacts:
    """What the report needs of the task, without its images: the build's task, carried to the measuring cell."""

    kind: str
    labelled: bool
    sizes: Dict[str, int]
    description: Dict[str, Any]

    def size(self, split: str) -> int:
        return self.sizes.get(split, 0)

    def describe(self) -> Dict[str, Any]:
        return self.description


@dataclass
class Build:
    """A built (model, recipe, signature): its variants (paths in ``folder``), evaluated, not yet timed."""

    model: str
    recipe: str
    folder: Path
    label: str
    model_info: Dict[str, Any]
    task: TaskFacts
    trained: Any  # pipeline.Trained without its models
    variants: List[Variant] = field(default_factory=list)
    seconds: float = 0.0


def _threads_for_task() -> None:
    """Torch uses as many threads as Ray gave this task CPUs (a worker process serves tasks of every size)."""
    try:
        import ray
        import torch

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            torch.set_num_threads(max(1, int(cpus)))
    except Exception:  # noqa: BLE001 - outside Ray (tests call these functions directly): keep torch's default
        pass


def _resolve(model: str, recipe: str, settings: Settings):
    from ..config import load_recipe
    from ..pipeline.source import resolve

    rec = load_recipe(recipe)
    source = resolve(model, settings.weights, settings.input_size, steps=[s.kind for s in rec.steps],
                     what=f"recipe {rec.name}")
    task = source.task(settings.data, seed=settings.seed, input_size=settings.input_size)
    return rec, source, task


def train_baseline(model: str, recipe: str, settings: Settings) -> dict:
    """Train (or load) the baseline once, into edgekit's cache, where every build of this model reads it."""
    _threads_for_task()
    t0 = time.time()
    try:
        rec, source, task = _resolve(model, recipe, settings)
        _, info = source.baseline(task, rec, settings.seed, True)
        return {"info": info, "seconds": round(time.time() - t0, 1)}
    except Exception as exc:  # noqa: BLE001
        return {"error": str(exc) if isinstance(exc, EdgekitError) else first_line(exc)}


def build(model: str, recipe: str, device: str, settings: Settings, folder: Path,
          baseline: Optional[dict] = None) -> Build | dict:
    """Steps, export and evaluation of one model and recipe for the devices sharing ``device``'s signature."""
    if baseline is not None and "error" in baseline:
        return {"error": baseline["error"]}
    _threads_for_task()
    t0 = time.time()
    try:
        from ..config import load_device
        from ..pipeline.stages import export_stage, train_stage

        dev = load_device(device)
        rec, source, task = _resolve(model, recipe, settings)
        trained = train_stage(source, task, rec, dev, settings.seed)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        variants, runners, x = export_stage(trained, rec, task, dev, folder, source.label)
        if x is not None:
            import numpy as np

            np.save(folder / INPUT_FILE, np.ascontiguousarray(x[:1]))
        trained.baseline = trained.final = None  # the files are what travels
        facts = TaskFacts(getattr(task, "kind", "classification"), task.labelled,
                          {s: task.size(s) for s in ("train", "calib", "eval")}, task.describe())
        return Build(model, recipe, folder, source.label, source.info(), facts, trained, variants,
                     round(time.time() - t0, 1))
    except Exception as exc:  # noqa: BLE001
        return {"error": str(exc) if isinstance(exc, EdgekitError) else first_line(exc)}


def _time_over_ssh(variants: List[Variant], ssh, device, runs: int) -> None:
    """Each variant in turn on the board (one upload, warm-up and timed runs each); a board that stops answering
    raises DeviceUnreachable, which the driver handles."""
    from ..measure.ssh import profile_remote

    threads = device.resolved_threads()
    for v in variants:
        if v.status != OK:
            continue
        try:
            lat = profile_remote(v.path, ssh, threads=threads, runs=runs)
        except DeviceUnreachable:
            raise
        except EdgekitError as exc:
            v.info["latency"] = f"not measured: {exc}"
            continue
        lat.device = device.name
        v.latency = lat
    ref = variants[0]
    if ref.latency is not None:
        for v in variants:
            if v.latency is not None:
                v.speedup = round(ref.latency.p50 / v.latency.p50, 3)


def measure_cell(built: Build | dict, device: str, settings: Settings, folder: Path, key: str,
                 board: Optional[Any] = None) -> dict:
    """Time a build's variants on one device (here, over SSH on ``board``, or estimated) and publish the cell's
    folder whole: the artifacts, report.json/md/html and the marker holding the cell's key."""
    if isinstance(built, dict):
        return {"error": built["error"], "stage": "build"}
    from ..config import load_device, load_recipe
    from ..fsutil import check_replaceable, make_temp_dir, publish
    from ..pipeline.assemble import assemble_report
    from ..pipeline.stages import load_runners, measure
    from ..report import write_reports
    from .plan import CELL_KIND

    _threads_for_task()
    t0 = time.time()
    tmp = None
    try:
        dev = load_device(device)
        rec = load_recipe(built.recipe)
        check_replaceable(folder, True, what="Cell folder")
        variants = deepcopy(built.variants)
        where = None
        if board is not None:
            from ..measure.ssh import destination

            where = destination(board)
            _time_over_ssh(variants, board, dev, settings.runs)
        else:
            import numpy as np

            x = np.load(built.folder / INPUT_FILE) if (built.folder / INPUT_FILE).is_file() else None
            # a device that is not this machine is estimated from the graph: no session is needed, only the keys
            runners = load_runners(variants, dev.resolved_threads()) if dev.local else \
                {v.key: None for v in variants if v.status == OK}
            measure(variants, runners, dev, x, runs=settings.runs)
        trained = built.trained
        notes = list(trained.notes)
        if where is not None:
            notes.append(f"Latency measured on {where} over SSH, one variant after another (not interleaved).")
        tmp = make_temp_dir(folder)
        for v in variants:
            if v.status == OK and v.path is not None:
                dest = tmp / v.path.name
                try:
                    os.link(v.path, dest)
                except OSError:
                    shutil.copy2(v.path, dest)
                v.path = dest
        report = assemble_report(built.label, built.model_info, rec, dev, built.task, trained.base_info,
                                 trained.step_info, variants, notes, settings.target_ms, settings.seed,
                                 training=trained.training)
        report["seconds"] = round(built.seconds + time.time() - t0, 1)
        report["sweep"] = {"key": key, "board": where}
        write_reports(report, tmp)
        publish(tmp, folder, kind=CELL_KIND, meta={"key": key})
        tmp = None
        return {"report": report, "board": where}
    except DeviceUnreachable as exc:
        return {"error": str(exc), "down": True, "board": board}
    except Exception as exc:  # noqa: BLE001
        return {"error": str(exc) if isinstance(exc, EdgekitError) else first_line(exc)}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
