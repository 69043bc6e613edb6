"""``edgekit sweep``: which model and which compression, for which device, from a grid run on Ray.

    import edgekit
    s = edgekit.run_sweep(models=["shufflenetv2", "mobilenetv3-small"], recipes=["int8", "prune50"],
                      devices=["desktop-cpu", "rpi5"], out="export/sweep")
    print(s.devices["rpi5"][0]["best_under_target"])

Modules: ``spec`` (the grid and its checks), ``plan`` (cells, shared builds, resumption keys), ``work`` (what a
Ray task does), ``engine`` (Ray and the board pool), ``results`` (sweep.json / .md / .html).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..errors import EdgekitError
from ..fsutil import atomic_write_bytes
from .spec import CheckedSweep, SweepSpec, load_sweep_file

SWEEP_MARKER = ".edgekit-sweep.json"
DEFAULT_OUT = Path("export") / "sweep"


@dataclass
class SweepResult:
    """sweep.json's content (``to_json()``), the output folder, and each device's summary by name."""

    data: Dict[str, Any]
    out_dir: Path

    @property
    def cells(self) -> List[dict]:
        return self.data["cells"]

    @property
    def devices(self) -> Dict[str, List[dict]]:
        """Per device, one summary per score (accuracy, agreement, mAP) its cells were judged by."""
        out: Dict[str, List[dict]] = {}
        for d in self.data["devices"]:
            out.setdefault(d["device"], []).append(d)
        return out

    def to_json(self) -> Dict[str, Any]:
        return self.data


def make_spec(file: Optional[str | Path] = None, **fields: Any) -> SweepSpec:
    """A sweep file's spec with the given fields replacing its own, or the fields alone; one line on a bad value."""
    from pydantic import ValidationError

    from ..config import error_message

    given = {k: v for k, v in fields.items() if v is not None and v != [] and v != {}}
    try:
        if file is not None:
            base = load_sweep_file(file)
            return SweepSpec.model_validate({**base.model_dump(), **given})
        missing = [k for k in ("models", "recipes", "devices") if k not in given]
        if missing:
            raise EdgekitError(f"A sweep needs {', '.join('--' + m for m in missing)} (comma-separated lists) or a "
                               f"sweep file")
        return SweepSpec.model_validate(given)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise EdgekitError(f"Invalid sweep: {field}: {error_message(SweepSpec, err)}") from None


def _prepare_out(out: Path) -> None:
    """The output folder is new, empty, or a sweep's (its marker): never someone else's folder. Leftovers of a
    run that was stopped (half-written cells, builds) are removed; finished cells stay."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise EdgekitError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / SWEEP_MARKER).is_file():
        raise EdgekitError(f"{out} is not empty and is not a sweep's folder (no {SWEEP_MARKER}): choose another "
                           f"--out")
    for sub in ("cells", ".work"):
        if (out / sub).is_symlink() or ((out / sub).exists() and not (out / sub).is_dir()):
            raise EdgekitError(f"{out / sub} is not a folder edgekit made: remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / SWEEP_MARKER, b'{"written_by": "edgekit", "kind": "sweep"}\n')
    (out / "cells").mkdir(exist_ok=True)
    _clean(out)


def _clean(out: Path) -> None:
    shutil.rmtree(out / ".work", ignore_errors=True)
    cells = out / "cells"
    if cells.is_dir() and not cells.is_symlink():
        for p in cells.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


def sweep(file: Optional[str | Path] = None, *, out: Optional[str | Path] = None, **fields: Any) -> SweepResult:
    """Run the grid of ``models`` x ``recipes`` x ``devices`` (or a sweep file's, ``fields`` overriding it) on Ray.

    Fields: :class:`edgekit.sweep.spec.SweepSpec`'s (``hosts``: device -> boards, ``data``, ``weights``,
    ``input_size``, ``seed``, ``runs``, ``target_ms``, ``address``). Every finished cell is an edgekit output folder
    under ``out/cells``; cells finished by an earlier run with the same inputs are skipped.
    """
    from .. import progress
    from ..measure.ssh import destination
    from .plan import make_plan
    from .results import cell_record, summary, write_results
    from .work import Settings

    try:
        import ray  # noqa: F401
    except ImportError:
        raise EdgekitError("edgekit sweep runs its cells on Ray, which is not installed here: "
                           "pip install 'edgekit[sweep]'") from None
    spec = make_spec(file, out=str(out) if out is not None else None, **fields)
    checked = CheckedSweep(spec)  # every name, file and board checked before anything is written
    out_dir = Path(spec.out) if spec.out else DEFAULT_OUT
    started = time.time()
    _prepare_out(out_dir)
    plan = make_plan(checked, out_dir)
    records: Dict[str, dict] = {}
    for c in plan.cells:
        if c.done:
            try:
                report = json.loads((c.folder / "report.json").read_text(encoding="utf-8"))
                records[c.key] = cell_record(c, {"report": report}, resumed=True)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                c.done = False  # an unreadable report: the cell runs again
    settings = Settings(spec.data, spec.weights, spec.input_size, spec.seed, spec.runs, spec.target_ms)
    engine: Dict[str, Any] = {"address": None, "note": "Ray was not started: every cell was finished already"}
    todo = plan.todo
    if todo:
        from .engine import run_cells

        try:
            with progress.task("sweep", total=len(todo), unit="cells") as bar:
                def on_done(cell, outcome):
                    records[cell.key] = rec = cell_record(cell, outcome)
                    bar.advance()
                    best = rec.get("best") or {}
                    progress.log(f"{cell.label}: {rec['status']}"
                                 + (f" ({rec.get('error')})" if rec.get("error") else
                                    f", best {best.get('name')} at {best.get('p50_ms')} ms" if best else ""))

                engine = run_cells(checked, plan, settings, (out_dir / ".work").resolve(), on_done)
        finally:
            _clean(out_dir)
    for c in plan.cells:
        records.setdefault(c.key, cell_record(c, {"error": "did not run"}))
    targets = {d.name: spec.target_ms or d.latency_target_ms for d in checked.devices.values()}
    grid = {"models": spec.models, "recipes": spec.recipes, "devices": [d.name for d in checked.devices.values()],
            "boards": {checked.devices[k].name: [destination(b) for b in v] for k, v in checked.boards.items()}}
    data = summary([records[c.key] for c in plan.cells], targets, engine, started, grid)
    write_results(data, out_dir)
    return SweepResult(data, out_dir)


__all__ = ["SweepResult", "SweepSpec", "load_sweep_file", "make_spec", "sweep"]
