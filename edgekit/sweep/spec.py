"""What a sweep is: models x recipes x devices, the boards behind each device, and the run's settings.

Given on the command line or as a YAML sweep file with the same fields. Everything is checked before Ray starts:
every model source, recipe and device profile is loaded, every board address parsed, a board listed twice or a
board of a device the sweep does not measure is refused. Relative paths in a sweep file (data, weights, out, model
files, recipe and device YAMLs) are relative to the sweep file's folder, so a sweep file can travel with its data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from pydantic import Field

from ..config import DeviceProfile, Recipe, Strict, load_device, load_recipe, parse_yaml_model
from ..errors import EdgekitError
from ..sources import ModelSource, parse_source

MAX_CELLS = 10_000


class SweepSpec(Strict):
    models: List[str] = Field(min_length=1, description="model sources, as `edgekit compress` takes them")
    recipes: List[str] = Field(min_length=1, description="recipe names or YAML paths")
    devices: List[str] = Field(min_length=1, description="device profile names or YAML paths")
    hosts: Dict[str, List[str]] = Field(default_factory=dict,
                                        description="device -> its boards (user@addr[:port]); a device with "
                                                    "boards is measured on them over SSH, one run per board at a "
                                                    "time")
    data: Optional[str] = None
    weights: Optional[str] = None
    input_size: Optional[int] = Field(None, ge=8, le=4096)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    runs: int = Field(100, ge=10, le=100_000, description="timed runs per variant")
    target_ms: Optional[float] = Field(None, gt=0, le=1e6, description="default: each device's latency target")
    gpus_per_build: float = Field(0, ge=0, le=64, description="GPUs each baseline and build task asks Ray for; "
                                                                "0: they train on CPUs (Ray hides GPUs from tasks "
                                                                "that ask for none)")
    address: Optional[str] = Field(None, description="a Ray cluster (ray://host:port or auto); None: a local "
                                                     "Ray instance started and stopped by edgekit")
    out: Optional[str] = None


_PATH_SUFFIXES = (".yaml", ".yml", ".onnx", ".pth", ".pt")


def _file_part(ref: str) -> str:
    """The file a reference names: ``net.py`` of ``net.py:Factory``, else the reference itself."""
    return ref.split(":", 1)[0] if ".py:" in ref else ref


def _relative_to(base: Path, value: str) -> str:
    """A path written in a sweep file, resolved against the file's folder (names and absolute paths unchanged)."""
    head = _file_part(value)
    looks_like_path = "/" in head or head.endswith(_PATH_SUFFIXES) or head.endswith(".py")
    if not looks_like_path or Path(head).is_absolute():
        return value
    return str(base / head) + value[len(head):]


def load_sweep_file(path: str | Path) -> SweepSpec:
    """A sweep file, checked field by field (line numbers in the message) and with its paths made absolute."""
    path = Path(path)
    if not path.is_file():
        raise EdgekitError(f"Sweep file not found: {path}")
    spec = parse_yaml_model(SweepSpec, path)
    base = path.resolve().parent
    fix = lambda v: None if v is None else _relative_to(base, v)  # noqa: E731
    return spec.model_copy(update={
        "models": [fix(m) for m in spec.models], "recipes": [fix(r) for r in spec.recipes],
        "devices": [fix(d) for d in spec.devices], "data": fix(spec.data),
        "weights": spec.weights if spec.weights in (None, "pretrained") else fix(spec.weights),
        "out": None if spec.out is None else str(base / spec.out) if not Path(spec.out).is_absolute() else spec.out,
    })


def _unique(kind: str, items: List[str]) -> None:
    seen = set()
    for x in items:
        if x in seen:
            raise EdgekitError(f"The sweep lists {kind} {x!r} twice")
        seen.add(x)


def _absolute(ref: str) -> str:
    """A path-like reference made absolute (Ray workers need not share this process's folder); names unchanged."""
    head = _file_part(ref)
    if Path(head).exists() and not Path(head).is_absolute():
        return str(Path(head).resolve()) + ref[len(head):]
    return ref


def absolute_paths(spec: SweepSpec) -> SweepSpec:
    return spec.model_copy(update={
        "models": [_absolute(m) for m in spec.models], "recipes": [_absolute(r) for r in spec.recipes],
        "devices": [_absolute(d) for d in spec.devices],
        "hosts": {_absolute(k): v for k, v in spec.hosts.items()},
        "data": None if spec.data is None else str(Path(spec.data).resolve()),
        "weights": spec.weights if spec.weights in (None, "pretrained") else str(Path(spec.weights).resolve())})


class CheckedSweep:
    """A sweep whose every name resolved: sources, recipes and profiles loaded; boards parsed (no torch yet)."""

    def __init__(self, spec: SweepSpec):
        from ..measure.ssh import destination, spec_for_target

        spec = absolute_paths(spec)
        _unique("model", spec.models)
        _unique("recipe", spec.recipes)
        _unique("device", spec.devices)
        self.spec = spec
        self.sources: Dict[str, ModelSource] = {m: parse_source(m) for m in spec.models}
        self.recipes: Dict[str, Recipe] = {r: load_recipe(r) for r in spec.recipes}
        self.devices: Dict[str, DeviceProfile] = {d: load_device(d) for d in spec.devices}
        names = {}
        for key, dev in self.devices.items():
            if dev.name in names:
                raise EdgekitError(f"Devices {names[dev.name]!r} and {key!r} are both profiles named {dev.name!r}: "
                                   "rename one (its `name:` field)")
            names[dev.name] = key
        for ref, rec in self.recipes.items():
            from ..steps import validate_steps

            validate_steps(rec.steps, where=f"recipe {ref}")
        if spec.data is not None and not Path(spec.data).is_dir():
            raise EdgekitError(f"Data folder not found: {spec.data}")
        if spec.weights not in (None, "pretrained") and not Path(spec.weights).is_file():
            raise EdgekitError(f"Weights file not found: {spec.weights}")
        self.boards: Dict[str, list] = {}  # device key -> [SSHSpec]
        seen: Dict[str, str] = {}
        for dev_key, hosts in spec.hosts.items():
            if dev_key not in self.devices:
                by_name = {d.name: k for k, d in self.devices.items()}
                if dev_key not in by_name:
                    raise EdgekitError(f"hosts: {dev_key!r} is not one of the sweep's devices "
                                       f"({', '.join(spec.devices)})")
                dev_key = by_name[dev_key]
            dev = self.devices[dev_key]
            if dev.local:
                raise EdgekitError(f"hosts: {dev.name} is this machine (local: true); its latency is measured "
                                   "here, not over SSH")
            if not hosts:
                raise EdgekitError(f"hosts: {dev.name} lists no boards")
            for h in hosts:
                ssh = spec_for_target(h, dev.ssh)
                where = destination(ssh)
                if where in seen:
                    raise EdgekitError(f"hosts: board {where} is listed for {seen[where]} and {dev.name}: one "
                                       "board measures one device profile")
                seen[where] = dev.name
                self.boards.setdefault(dev_key, []).append(ssh)
        for dev_key, dev in self.devices.items():  # a profile with its own ssh: block is a pool of one board
            if dev_key not in self.boards and dev.ssh is not None and not dev.local:
                self.boards[dev_key] = [dev.ssh]
        cells = len(spec.models) * len(spec.recipes) * len(spec.devices)
        if cells > MAX_CELLS:
            raise EdgekitError(f"The sweep has {cells} cells; at most {MAX_CELLS} are allowed")
