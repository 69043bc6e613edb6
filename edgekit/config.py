"""Recipes and device profiles: pydantic models, loaded from YAML with errors that name the field and line.

Every number in a recipe, step or device profile is finite and bounded (``.inf`` epochs or a 1e11 batch would
otherwise reach training or the latency model and hang or run out of memory there); a value outside its range is
refused at load time with the file, the field and the allowed range. A variant's ``options:`` are checked against
its format's schema (``edgekit.formats``) at load time too, before any training.
"""

from __future__ import annotations

import typing
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple

import annotated_types
import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

from .errors import EdgekitError, did_you_mean, show_value
from .formats import FORMATS, option_problem

PRECISIONS = ("fp32", "fp16", "int8")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Bounds shared by several schemas: wide enough for any real use, narrow enough that a typo cannot hang a run.
MAX_THREADS = 1024
MAX_EPOCHS = 10_000
MAX_BATCH = 65_536
MAX_LR = 10.0
MAX_ROUND_TO = 1024


# ----------------------------------------------------------------------------- recipes


class StepSpec(Strict):
    """One compression step: its kind and the parameters that kind's schema checks."""

    kind: str
    params: Dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        # `- prune: {macs: 0.5}` is the same as `- {kind: prune, params: {macs: 0.5}}`
        if isinstance(v, dict) and "kind" not in v and len(v) == 1:
            (kind, params), = v.items()
            return {"kind": kind, "params": params or {}}
        return v


class VariantSpec(Strict):
    """An artifact to export from the compressed model: a format at a precision.

    ``options`` stay the mapping the recipe wrote (reports show them as written), checked against the format's
    schema (``edgekit.formats.FORMATS[format].options``) whenever a variant is made, from YAML or in Python.
    """

    format: str = "onnx"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    options: Dict[str, Any] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _options_fit_the_format(cls, v: Dict[str, Any], info: ValidationInfo) -> Dict[str, Any]:
        name = info.data.get("format")
        if name not in FORMATS:  # an unknown format is load_recipe's to report, with close names
            return v
        fmt = FORMATS.get(name)
        try:
            fmt.options.model_validate(v)
        except ValidationError as exc:
            err = exc.errors()[0]  # "key": where parse_yaml_model looks for the line
            raise PydanticCustomError("variant_option", "{problem}", {"problem": option_problem(fmt, err),
                                                                      "key": err["loc"][0] if err["loc"] else None})
        return v


class TrainSpec(Strict):
    epochs: float = Field(4, gt=0, le=MAX_EPOCHS)
    lr: Optional[float] = Field(None, gt=0, le=MAX_LR)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH)
    # Drop-path rate while training the baseline (None: the architecture's own, e.g. 0.2 in torchvision's
    # EfficientNet-B0). The modules are the identity at inference, so this changes no exported graph.
    stochastic_depth: Optional[float] = Field(None, ge=0, lt=1)


class Recipe(Strict):
    name: str
    description: str = ""
    train: TrainSpec = Field(default_factory=TrainSpec)
    steps: List[StepSpec] = Field(default_factory=list)
    variants: List[VariantSpec] = Field(default_factory=lambda: [VariantSpec()])
    accuracy_budget_pp: float = Field(0.5, ge=0, le=100, description="allowed top-1 drop in percentage points")

    @field_validator("variants")
    @classmethod
    def _non_empty(cls, v: List[VariantSpec]) -> List[VariantSpec]:
        if not v:
            raise ValueError("a recipe exports at least one variant")
        return v


# ----------------------------------------------------------------------------- devices


class SSHSpec(Strict):
    """How to reach a device over SSH (the system OpenSSH client; host keys are always checked)."""

    host: str = Field(min_length=1)
    user: Optional[str] = None
    port: int = Field(22, gt=0, lt=65536)
    key: Optional[str] = Field(None, description="private key file; None: the ssh agent / ~/.ssh defaults")
    known_hosts: Optional[str] = Field(None, description="known_hosts file; None: the user's default")
    python: str = Field("python3", min_length=1, description="the device's python (with numpy and a runtime)")
    workdir: str = Field("~/.cache/edgekit-remote", min_length=1,
                         description="per-run temporary folders are made (and removed) under it")
    connect_timeout: int = Field(10, ge=1, le=3600, description="seconds")
    command_timeout: float = Field(900, gt=0, le=86_400, description="seconds for one remote benchmark")


class QuantSpec(Strict):
    """Int8 settings that run fastest on this device's int8 kernels."""

    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["uint8", "int8"] = "int8"
    per_channel: bool = True
    # 7-bit weights. None: where the int8 kernels would saturate (x86 without VNNI: this machine's flags for a local
    # profile, the profile's isa list otherwise), since a full-range model loses accuracy there (edgekit.hostinfo).
    reduce_range: Optional[StrictBool] = None  # true or false, not 1 or "yes"


# Values of the latency model's per-category tables (bounded per value, so a YAML .inf or 1e30 is refused).
Overhead = Annotated[float, Field(ge=0, le=1e6)]  # microseconds
Positive = Annotated[float, Field(gt=0, le=1e6)]


class LatencyModel(Strict):
    """Coefficients of the per-operator roofline in ``edgekit.estimate``.

    Keys of ``efficiency`` / ``overhead_us`` are op categories (conv, pwconv, dwconv, gemm, elementwise,
    activation, pool, data, reshape, quant, layout; conv kinds with ``_nchw`` / ``_tail`` for their slow
    paths), optionally with a precision (``conv.int8``), which wins. ``efficiency`` is the share of
    ``peak_gops[precision]`` an op category reaches: for conv/gemm a fraction of the MAC peak; for
    element-wise categories elements/s relative to it (which may exceed 1).
    """

    threads: Optional[int] = Field(None, ge=1, le=MAX_THREADS,
                                   description="threads the coefficients hold for; None: the profile's")
    session_overhead_us: float = Field(20.0, ge=0, le=1e6, description="fixed cost of one inference call")
    default_overhead_us: float = Field(5.0, ge=0, le=1e6, description="per operator, when overhead_us has no entry")
    overhead_us: Dict[str, Overhead] = Field(default_factory=dict)
    efficiency: Dict[str, Annotated[float, Field(gt=0, le=1000)]] = Field(default_factory=lambda: {
        "conv": 0.5, "pwconv": 0.5, "dwconv": 0.1, "gemm": 0.4, "elementwise": 0.1, "activation": 0.05,
        "pool": 0.1, "quant": 0.1})
    depth_half: Dict[str, Positive] = Field(default_factory=dict, description="per category: the reduction length "
                                         "(Cin/group*kh*kw) at which efficiency is half its value")
    width_half: Dict[str, Positive] = Field(default_factory=dict, description="per category: the output channel "
                                         "count at which efficiency is half its value")
    cache_kb: float = Field(1024, gt=0, le=1e8, description="working sets up to this size stream at cache bandwidth")
    cache_bandwidth_gbs: float = Field(50, gt=0, le=1e5)
    memory_bandwidth_gbs: Optional[float] = Field(None, gt=0, le=1e5, description="measured streaming bandwidth beyond "
                                                  "the cache; None: the profile's memory_bandwidth_gbs")
    parallel_efficiency: float = Field(0.7, ge=0, le=1, description="speed-up per extra thread, 0..1")
    channel_block: int = Field(0, ge=0, le=MAX_ROUND_TO,
                               description="channels padded to this block in fp32 convs (ORT NCHWc)")
    fuse_conv_add: bool = Field(True, description="residual Add fused into the preceding conv")
    int8_layout: Literal["nchw", "nhwc"] = Field("nhwc", description="layout int8 convs run in (ORT CPU: nhwc)")
    int8_channel_align: int = Field(0, ge=0, le=MAX_ROUND_TO,
                                    description="int8 convs whose channels are not a multiple of this "
                                    "use the *_tail coefficients (0: no distinction)")
    calibration: Dict[str, Any] = Field(default_factory=dict, description="where the coefficients came from")
    kernel_tables: Dict[Annotated[int, Field(ge=1, le=MAX_THREADS)], str] = Field(
        default_factory=dict, description="threads -> kernel-timing table "
                                          "(edgekit.estimate.kernels; a path, or a file beside the built-in "
                                          "profiles); where one exists for the threads asked, ONNX Runtime "
                                          "estimates use per-kernel regression instead of the roofline")

    @field_validator("efficiency", "depth_half", "width_half")
    @classmethod
    def _positive(cls, v: Dict[str, float]) -> Dict[str, float]:
        bad = {k: x for k, x in v.items() if not x > 0}
        if bad:
            raise ValueError(f"must be > 0: {bad}")
        return v

    @field_validator("overhead_us")
    @classmethod
    def _non_negative(cls, v: Dict[str, float]) -> Dict[str, float]:
        bad = {k: x for k, x in v.items() if x < 0}
        if bad:
            raise ValueError(f"overheads are >= 0 microseconds: {bad}")
        return v


class DeviceProfile(Strict):
    name: str
    description: str = ""
    # Names people type for this device (raspberrypi4, pi4): an unknown --device close to one is answered with this
    # profile's name. Suggestions only, never resolved silently; left out of report.json.
    aliases: List[str] = Field(default_factory=list, exclude=True)
    kind: Literal["cpu", "gpu"] = "cpu"
    arch: Literal["x86_64", "aarch64", "armv7l"] = "x86_64"
    local: bool = Field(False, description="this machine itself: latency is measured here")
    cores: int = Field(1, ge=1, le=MAX_THREADS)
    clock_ghz: Optional[float] = Field(None, gt=0, le=100)
    isa: List[str] = Field(default_factory=list)
    gpu: Optional[str] = None
    peak_gops: Dict[str, Annotated[float, Field(gt=0, le=1e8)]] = Field(default_factory=dict,
                                                                      description="per precision, giga-MACs/s")
    memory_bandwidth_gbs: Optional[float] = Field(None, gt=0, le=1e5)
    precisions: List[Literal["fp32", "fp16", "int8"]] = Field(default_factory=lambda: ["fp32", "int8"])
    formats: List[str] = Field(default_factory=lambda: ["onnx"], description="preferred formats, in order")
    runtimes: List[str] = Field(default_factory=lambda: ["onnxruntime"])
    threads: Optional[int] = Field(None, ge=1, le=MAX_THREADS, description="None: all cores")
    quantization: QuantSpec = Field(default_factory=QuantSpec)
    prune_round_to: int = Field(8, ge=1, le=MAX_ROUND_TO)
    latency_target_ms: Optional[float] = Field(None, gt=0, le=1e6)
    ssh: Optional[SSHSpec] = None
    latency_model: LatencyModel = Field(default_factory=LatencyModel)

    def resolved_threads(self) -> int:
        import os

        return self.threads or (os.cpu_count() or 1 if self.local else self.cores)


# ----------------------------------------------------------------------------- loading


def _yaml_error(path: Path, exc: yaml.YAMLError) -> EdgekitError:
    mark = getattr(exc, "problem_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return EdgekitError(f"Malformed YAML in {path}{where}: {problem}")


def _field_line(text: str, loc: tuple) -> str:
    """' (line N)' for a pydantic error location, found by walking the composed YAML nodes."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return ""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == key), None)
            if match is None:
                break
            line, node = match[0].start_mark.line, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line
        else:
            break
    return "" if line is None else f" (line {line + 1})"


# pydantic error types that mean "not a number in range": their message is replaced by the field's allowed range
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                 "int_parsing", "int_from_float", "int_type", "float_parsing", "float_type"}


def _num(x: float) -> str:
    return f"{x:g}" if abs(x) >= 1e6 or x != int(x) else str(int(x))


def _unwrap(ann: Any) -> Tuple[Any, list]:
    """Strip Optional and Annotated from a type, collecting the constraints Annotated carried."""
    meta: list = []
    while True:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            ann, *extra = typing.get_args(ann)
            for m in extra:
                meta += list(getattr(m, "metadata", [m]))
        elif origin is typing.Union or type(ann).__name__ == "UnionType":
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return ann, meta
            ann = args[0]
        else:
            return ann, meta


def _field_type(cls: type, loc: tuple) -> Tuple[Any, list]:
    """(type, constraints) of the value at a pydantic error location, walking nested models, dicts and lists."""
    if len(loc) >= 2 and loc[-1] == "[key]":  # pydantic names a bad dict key as (..., key, "[key]")
        loc = (*loc[:-2], "[key]")
    ann, meta = cls, []
    for part in loc:
        ann, extra = _unwrap(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            info = ann.model_fields.get(part) if isinstance(part, str) else None
            if info is None:
                return None, []
            ann, meta = info.annotation, list(info.metadata)
            continue
        origin = typing.get_origin(ann)
        if origin is dict:
            key, value = typing.get_args(ann)
            ann = key if part == "[key]" else value
        elif origin is list:
            ann = typing.get_args(ann)[0]
        else:
            return None, []
        meta = []
    ann, extra = _unwrap(ann)
    return ann, meta + extra


def allowed_range(cls: type, loc: tuple) -> Optional[str]:
    """'an integer from 1 to 1024', 'a finite number > 0 and <= 10000': the range a numeric field accepts."""
    ann, meta = _field_type(cls, loc)
    if ann not in (int, float):
        return None
    lo = hi = None
    for m in meta:
        if isinstance(m, annotated_types.Gt):
            lo = f"> {_num(m.gt)}"
        elif isinstance(m, annotated_types.Ge):
            lo = f">= {_num(m.ge)}"
        elif isinstance(m, annotated_types.Lt):
            hi = f"< {_num(m.lt)}"
        elif isinstance(m, annotated_types.Le):
            hi = f"<= {_num(m.le)}"
    kind = "an integer" if ann is int else "a finite number"
    if lo and hi and lo.startswith(">=") and hi.startswith("<="):
        return f"{kind} from {lo[3:]} to {hi[3:]}"
    return " ".join([kind] + [" and ".join(b for b in (lo, hi) if b)]).strip()


def error_message(cls: type, err: dict) -> str:
    """One pydantic error in words: for a number out of range, the range the field allows and the value given."""
    if err["type"] in _RANGE_ERRORS:
        rng = allowed_range(cls, tuple(err["loc"]))
        if rng:
            return f"{err['msg']}; allowed: {rng}, got {show_value(err.get('input'))}"
    return err["msg"]


def _kind_name(cls: type) -> str:
    return {"DeviceProfile": "device profile", "SweepSpec": "sweep file"}.get(cls.__name__, cls.__name__.lower())


def _read_yaml(path: Path) -> Tuple[str, dict]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise EdgekitError(f"Cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    if not isinstance(data, dict):
        raise EdgekitError(f"{path} must hold a YAML mapping, not {type(data).__name__}")
    return text, data


def parse_yaml_model(cls, path: Path, defaults: Optional[dict] = None):
    text, data = _read_yaml(path)
    data = {**(defaults or {}), **data}
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        key = (err.get("ctx") or {}).get("key")  # a variant option: the line of its key
        line = _field_line(text, (*err["loc"], *([key] if key is not None else [])))
        raise EdgekitError(f"Invalid {_kind_name(cls)} {path}: field '{field}'{line}: "
                           f"{error_message(cls, err)}") from None


def _check_step_params(recipe: Recipe, path: Path) -> None:
    """Step params checked against each step's schema (torch-free: ``edgekit.steps.params``), with the file's line."""
    from .steps.params import STEP_PARAMS

    text, data = _read_yaml(path)
    raw_steps = data.get("steps") or []
    for i, spec in enumerate(recipe.steps):
        params_model = STEP_PARAMS.get(spec.kind)
        try:
            params_model.model_validate(spec.params)
        except ValidationError as exc:
            err = exc.errors()[0]
            raw = raw_steps[i] if i < len(raw_steps) else {}
            key = "params" if isinstance(raw, dict) and "kind" in raw else spec.kind
            field = ".".join(map(str, err["loc"])) or spec.kind
            raise EdgekitError(f"Invalid {spec.kind} step in {path}: '{field}'"
                               f"{_field_line(text, ('steps', i, key, *err['loc']))}: "
                               f"{error_message(params_model, err)}") from None


def _builtin_dir(kind: str) -> Path:
    return Path(str(resources.files("edgekit") / kind))


def builtin_names(kind: str) -> List[str]:
    return sorted(p.stem for p in _builtin_dir(kind).glob("*.yaml"))


def _resolve(kind: str, name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise EdgekitError(f"{kind[:-1].capitalize()} file not found: {p}")
        return p
    builtin = _builtin_dir(kind) / f"{name_or_path}.yaml"
    if not builtin.is_file():
        names = builtin_names(kind)
        close = did_you_mean(name_or_path, names)
        if kind == "devices":
            near = _devices_by_alias(name_or_path)
            if near:
                close = f" Did you mean: {', '.join(near)}?"
        raise EdgekitError(f"Unknown {kind[:-1]} {name_or_path!r}.{close} "
                           f"Built in: {', '.join(names)}; or give a path to a .yaml file.")
    return builtin


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _devices_by_alias(name: str) -> List[str]:
    """Built-in devices whose name or ``aliases`` are close to ``name`` (raspberrypi -> rpi4, rpi5): close by
    difflib, or containing it (3 characters or more). The YAMLs are read raw: an error path, no validation."""
    import difflib

    key, scores = _norm(name), {}
    for stem in builtin_names("devices"):
        try:
            aliases = (yaml.safe_load((_builtin_dir("devices") / f"{stem}.yaml").read_text()) or {}).get("aliases")
        except (OSError, yaml.YAMLError, AttributeError):
            aliases = None
        words = [_norm(w) for w in [stem, *(aliases or [])] if isinstance(w, str)]
        best = max((difflib.SequenceMatcher(None, key, w).ratio() for w in words), default=0.0)
        if best >= 0.75 or (len(key) >= 3 and any(key in w for w in words)):
            scores[stem] = best
    exact = [s for s, v in scores.items() if v == 1.0]  # an alias of these: the others are only near
    return exact or sorted(scores, key=lambda s: (-scores[s], s))


def resolve_file(kind: str, name_or_path: str) -> Path:
    """The YAML file a recipe or device name means ("recipes" | "devices"); EdgekitError with close names."""
    return _resolve(kind, name_or_path)


def _check_variants(recipe: Recipe, path: Path) -> None:
    """Each variant's format exists and has its precision (the options were checked with the variant)."""
    for i, v in enumerate(recipe.variants):
        fmt = FORMATS.get(v.format)
        if v.precision not in fmt.precisions:
            raise EdgekitError(f"Invalid recipe {path}: variants.{i}: {v.format} has no {v.precision} "
                               f"(it supports {', '.join(fmt.precisions)})")


def load_recipe(name_or_path: str) -> Recipe:
    """The recipe, with every step's params and every variant's options checked: nothing runs on a bad one."""
    path = _resolve("recipes", name_or_path)
    recipe = parse_yaml_model(Recipe, path, {"name": path.stem})
    _check_variants(recipe, path)
    _check_step_params(recipe, path)
    return recipe


def load_device(name_or_path: str) -> DeviceProfile:
    path = _resolve("devices", name_or_path)
    return parse_yaml_model(DeviceProfile, path, {"name": path.stem})
