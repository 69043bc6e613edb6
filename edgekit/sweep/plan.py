"""The sweep's work, planned before anything runs: cells, the builds they share, and which cells are already done.

A cell is (model, recipe, device). Cells share work in two ways:

- one **baseline** per model and training recipe (trained once, then read from edgekit's cache by every build);
- one **build** (steps, export, evaluation) per model, recipe and *export signature*: the device fields the
  recipe's steps and exporters read (:func:`export_signature`). Devices with equal signatures measure the same
  files: every device shares an fp32 or SVD build, while an x86 and an ARM device get their own int8 files,
  because one int8 file is not right for both.

Every cell has a key: a hash of everything its result depends on (model files, recipe, device profile, data
files, seed, runs, edgekit's version). A finished cell is a folder with edgekit's marker holding that key; a sweep
started again skips it and redoes only cells whose inputs changed or that never finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from .. import __version__
from ..fsutil import MARKER
from .spec import CheckedSweep

CELL_KIND = "sweep-cell"
_MARKER_MAX_BYTES = 64 * 1024


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "-", text).strip("-.") or "x"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def export_signature(device, recipe) -> dict:
    """The fields of a device profile that change what ``recipe``'s steps and exporters write for it.

    ONNX int8 reads most of the profile (int8 types and 7-bit weights, the latency search on this machine, and the
    estimator's tables when its fallback prices layers for another device), QAT its int8 types: for those the whole
    profile but its name, description, target and SSH address. Pruning and SVD read the channel granularity. An
    fp32 or TFLite export reads nothing of the device, so every device of the sweep measures the same files.
    """
    from ..export.onnx import int8_reduce_range

    steps = {s.kind for s in recipe.steps}
    if "qat" in steps or any(v.format == "onnx" and v.precision == "int8" for v in recipe.variants):
        fields = device.model_dump(exclude={"name", "description", "aliases", "latency_target_ms", "ssh"})
        fields["reduce_range"] = int8_reduce_range(device)
        fields["threads"] = device.resolved_threads() if device.local else None
        return fields
    return {"prune_round_to": device.prune_round_to} if steps & {"prune", "svd"} else {}


def data_fingerprint(data: Optional[str]) -> Optional[dict]:
    """Every file of the data folder by relative path, size and modification time: a changed image is a new
    input without reading every image."""
    if data is None:
        return None
    root = Path(data).resolve()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return {"path": str(root), "files": _digest(files), "count": len(files)}


@dataclass
class Cell:
    model: str
    recipe: str
    device: str  # the device key (name or YAML path as given)
    device_name: str
    key: str
    folder: Path
    build: str  # the build this cell measures
    baseline: str  # the baseline its build reads
    done: bool = False

    @property
    def label(self) -> str:
        return f"{self.model} · {self.recipe} · {self.device_name}"


@dataclass
class Plan:
    cells: List[Cell]
    builds: Dict[str, dict] = field(default_factory=dict)  # build id -> {model, recipe, device (representative)}
    baselines: Dict[str, dict] = field(default_factory=dict)  # baseline id -> {model, recipe}

    @property
    def todo(self) -> List[Cell]:
        return [c for c in self.cells if not c.done]


def cell_done(folder: Path, key: str) -> bool:
    """The folder is a finished cell of these inputs: a real folder (no symlink), edgekit's marker naming this key,
    and its report.json."""
    marker = folder / MARKER
    try:
        if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
            return False
        if marker.stat().st_size > _MARKER_MAX_BYTES:
            return False
        meta = json.loads(marker.read_text(encoding="utf-8"))
        report = folder / "report.json"
        return (isinstance(meta, dict) and meta.get("kind") == CELL_KIND and meta.get("key") == key
                and report.is_file() and not report.is_symlink())
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def make_plan(sweep: CheckedSweep, out: Path) -> Plan:
    from ..sources import describe

    spec = sweep.spec
    common = {"edgekit": __version__, "data": data_fingerprint(spec.data), "weights": spec.weights,
              "input_size": spec.input_size, "seed": spec.seed}
    if spec.weights not in (None, "pretrained"):
        from ..sources import file_sha256

        common["weights_sha256"] = file_sha256(Path(spec.weights))
    plan = Plan(cells=[])
    used: Dict[str, int] = {}
    for m in spec.models:
        model_info = describe(sweep.sources[m], spec.weights)
        for r in spec.recipes:
            rec = sweep.recipes[r]
            baseline = _digest({"model": model_info, "train": rec.train.model_dump() if rec.train else None,
                                **common})[:16]
            plan.baselines.setdefault(baseline, {"model": m, "recipe": r})
            for d in spec.devices:
                dev = sweep.devices[d]
                build = _digest({"model": model_info, "recipe": rec.model_dump(), "sig": export_signature(dev, rec),
                                 **common})[:16]
                plan.builds.setdefault(build, {"model": m, "recipe": r, "device": d})
                key = _digest({"model": model_info, "recipe": rec.model_dump(), "device": dev.model_dump(),
                               "runs": spec.runs, "target_ms": spec.target_ms, **common})
                name = f"{sweep.sources[m].slug}-{_slug(rec.name)}-{_slug(dev.name)}"
                used[name] = used.get(name, 0) + 1
                if used[name] > 1:  # two sources with one slug (a.onnx in two folders): keep both cells apart
                    name += f"-{key[:8]}"
                folder = out / "cells" / name
                plan.cells.append(Cell(m, r, d, dev.name, key, folder, build, baseline,
                                       done=cell_done(folder, key)))
    return plan
