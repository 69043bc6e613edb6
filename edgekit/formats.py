"""The formats table: one row per deployable format (like Ultralytics' export formats).

A row names the format's suffix, precisions, runtime, the pydantic schema of a variant's ``options:``
(checked by ``load_recipe`` before any work, and again by ``edgekit.export.export``) and its exporter.
It drives export in the pipeline and the rows of the benchmark table. Importing this module never
imports torch (the CLI checks names before torch loads): each exporter here is a small function that
imports its module when called.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, List, Literal, Optional, Tuple, Type

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError
from pydantic_core import PydanticCustomError

from .errors import EdgekitError, did_you_mean, show_value
from .registry import Registry

DEFAULT_OPSET = 17  # ONNX opset of every exported graph unless a variant's options say otherwise
MAX_IMAGES = 100_000  # calibration images a variant may ask for


def _number(v: Any) -> Any:
    """Integers (or integral floats, as YAML may write them) only: no booleans or strings."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return v


NumCalib = Annotated[int, BeforeValidator(_number), Field(ge=1, le=MAX_IMAGES,
                                                          description="calibration images for int8")]
Opset = Annotated[int, BeforeValidator(_number), Field(ge=7, le=30, description="ONNX opset of the export")]
Calibration = Literal["auto", "minmax", "entropy", "percentile"]
# ONNX int8 has two more (edgekit.export.onnx_int8.CALIBRATIONS): mse and mean-minmax. TensorRT's symmetric
# activations keep ORT's three.
OnnxCalibration = Literal["auto", "minmax", "entropy", "percentile", "mse", "mean-minmax"]


def _real(v: Any) -> Any:
    """A number (integer or float): no booleans or strings."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return v


Fraction = Annotated[float, BeforeValidator(_real), Field(gt=0, le=1)]
Points = Annotated[float, BeforeValidator(_real), Field(ge=0, le=100)]


class Options(BaseModel):
    """Base of the option schemas: unknown keys are errors, numbers are finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class OnnxOptions(Options):
    """``onnx``: the export's opset and ONNX Runtime's static int8 quantization (int8 options apply to int8)."""

    opset: Opset = DEFAULT_OPSET
    calibration: OnnxCalibration = Field("auto", description="auto: best of minmax/percentile/mse x op scopes by "
                                                         "logits SQNR on the calibration split, then that one "
                                                         "with cross-layer equalization and/or bias correction")
    equalize: Optional[StrictBool] = Field(
        None, description="cross-layer equalization of conv pairs (across ReLU or nothing) before calibration; "
                          "None: calibration auto tries it, a named calibration leaves it off")
    bias_correction: Optional[StrictBool] = Field(
        None, description="empirical bias correction of the int8 convs on the calibration split; None: "
                          "calibration auto tries it, a named calibration leaves it off")
    adaround: Optional[StrictBool] = Field(
        False, description="AdaRound: each int8 weight rounded up or down as learned per layer on the calibration "
                           "split. Off by default: on EfficientNet-Lite0 at 224 px it adds 1.2-1.3 dB eval SQNR "
                           "over bias correction, the same top-1 agreement, and 2 minutes; on 64 px MNIST baselines "
                           "it moves SQNR by under 1 dB either way, for 1.5-3 minutes (bench/int8_ptq.py). "
                           "true: on (calibration auto applies it to its best candidate); null: calibration auto "
                           "tries it once on its best candidate and keeps it if its SQNR is higher (a named "
                           "calibration: off)")
    num_calib: NumCalib = 256
    per_channel: Optional[StrictBool] = Field(None, description="None: the device profile's")
    activation_type: Optional[Literal["uint8", "int8"]] = Field(None, description="None: the device profile's")
    weight_type: Optional[Literal["uint8", "int8"]] = Field(None, description="None: the device profile's")
    quant_format: Literal["qdq", "qoperator"] = "qdq"
    reduce_range: Optional[StrictBool] = Field(None, description="None: the device profile's (7-bit weights where int8 kernels saturate)")
    op_types: Optional[List[str]] = Field(None, description="op types to quantize; None: all ORT can")
    search: Optional[Literal["latency", "none"]] = Field(
        None, description="latency: time the int8 layouts here and keep the fastest accurate one; None: latency "
                          "where the device is this machine and no type or per_channel is given, else none")
    min_agreement: Optional[Fraction] = Field(
        None, description="int8 fallback: hand the layers that cost most back to float until top-1 agreement with "
                          "fp32 on the calibration split is at least this (0.97: 97%), each step priced in latency; "
                          "for unlabelled data too. None: off")
    max_drop_pp: Optional[Points] = Field(
        None, description="int8 fallback: as min_agreement, until top-1 accuracy on the calibration split's labels "
                          "is at most this many points below fp32's (labelled data only). None: off")


class TfliteOptions(Options):
    """``tflite``: input layout and PT2E int8 settings."""

    nhwc: StrictBool = Field(False, description="NHWC input, as camera pipelines deliver it")
    num_calib: NumCalib = 256
    per_channel: StrictBool = Field(True, description="int8 weights per output channel (else per tensor)")
    bias_correction: Optional[StrictBool] = Field(
        None, description="int8: empirical bias correction of the int8 convs on the calibration split; None: kept "
                          "where it raises the calibration logits' SQNR (torch simulation of the int8 graph)")


class TensorrtOptions(Options):
    """``tensorrt``: the QDQ/fp16 ONNX it is built from and the engine build."""

    calibration: Calibration = "auto"
    num_calib: NumCalib = 256
    workspace_mb: Annotated[int, BeforeValidator(_number), Field(ge=1, le=1 << 20)] = 1024
    opset: Opset = Field(DEFAULT_OPSET, description="raised to 13 where lower (per-channel Q/DQ)")


# An exporter: (model, precision, validated options, edgekit.export.ExportContext) -> the artifact's path.
Exporter = Callable[[Any, str, Options, Any], Path]


def export_onnx_row(model, precision: str, options: OnnxOptions, ctx) -> Path:
    """``onnx`` row: :func:`edgekit.export.onnx.export_variant`."""
    from .export.onnx import export_variant

    return export_variant(model, precision, options, ctx)


def export_tflite_row(model, precision: str, options: TfliteOptions, ctx) -> Path:
    """``tflite`` row: :func:`edgekit.export.tflite.export_tflite`."""
    from .export.tflite import export_tflite

    return export_tflite(model, precision, options, ctx)


def export_tensorrt_row(model, precision: str, options: TensorrtOptions, ctx) -> Path:
    """``tensorrt`` row: :func:`edgekit.export.tensorrt.export_tensorrt`."""
    from .export.tensorrt import export_tensorrt

    return export_tensorrt(model, precision, options, ctx)


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    precisions: Tuple[str, ...]
    runtime: str  # key in edgekit.runtime.RUNTIMES
    requires: Tuple[str, ...]  # python modules needed to export + run on this machine
    exporter: Exporter
    options: Type[Options]  # schema of a variant's options: for this format
    gpu: bool = False
    description: str = ""


FORMATS: Registry[Format] = Registry("format")

FORMATS.add("onnx", Format("onnx", ".onnx", ("fp32", "int8"), "onnxruntime", ("onnx", "onnxruntime"),
                           export_onnx_row, OnnxOptions,
                           description="ONNX; int8 by ONNX Runtime static quantization (QDQ)"))
FORMATS.add("tflite", Format("tflite", ".tflite", ("fp32", "fp16", "int8"), "litert",
                             ("litert_torch", "ai_edge_litert"), export_tflite_row, TfliteOptions,
                             description="TFLite (LiteRT) by litert-torch; fp16 weights; full-integer int8 by PT2E"))
FORMATS.add("tensorrt", Format("tensorrt", ".engine", ("fp16", "int8"), "tensorrt", ("tensorrt",),
                               export_tensorrt_row, TensorrtOptions, gpu=True,
                               description="TensorRT engine from ONNX (fp16, or int8 from a TensorRT-style QDQ ONNX); "
                                           "the ONNX and a trtexec.sh are written even where tensorrt is absent"))


# ----------------------------------------------------------------------------- option errors


def _bounds(schema: Type[Options], key: str) -> Optional[Tuple[Any, Any]]:
    field = schema.model_fields.get(key)
    if field is None or typing.get_origin(field.annotation) is not None or field.annotation is not int:
        return None
    lo = next((m.ge for m in field.metadata if hasattr(m, "ge")), None)
    hi = next((m.le for m in field.metadata if hasattr(m, "le")), None)
    return (lo, hi) if lo is not None and hi is not None else None


_NUMBER_ERRORS = {"int_type", "int_parsing", "int_from_float", "finite_number", "greater_than_equal",
                  "less_than_equal", "greater_than", "less_than"}


def option_problem(fmt: Format, err: Dict[str, Any]) -> str:
    """One pydantic error of ``fmt.options`` in words: the key, what it must be, what was given."""
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "options"
    got = show_value(err.get("input"))
    if err["type"] == "extra_forbidden":
        known = sorted(fmt.options.model_fields)
        return (f"Unknown {fmt.name} option {key!r}.{did_you_mean(key, known)} "
                f"Known {fmt.name} options: {', '.join(known)}")
    bounds = _bounds(fmt.options, loc[0]) if len(loc) == 1 else None
    if bounds and err["type"] in _NUMBER_ERRORS:
        return f"{key} must be an integer from {bounds[0]} to {bounds[1]}, got {got}"
    if err["type"] == "bool_type":
        return f"{key} must be true or false, got {got}"
    if err["type"] == "literal_error":
        return f"{key} must be {err['ctx']['expected']}, got {got}"
    return f"{key}: {err['msg']}, got {got}"


def validate_options(fmt: Format, options: Any) -> Options:
    """``options`` checked against ``fmt.options`` (a dict, or an already validated model of that schema)."""
    if isinstance(options, fmt.options):
        return options
    try:
        return fmt.options.model_validate(dict(options or {}))
    except ValidationError as exc:
        raise EdgekitError(option_problem(fmt, exc.errors()[0])) from None


# ----------------------------------------------------------------------------- availability


class FormatUnavailable(Exception):
    """A format that cannot be produced or run on this machine (❎ in benchmark rows), with the reason.

    Not a failure of the model: e.g. TensorRT is not installed here. ``artifacts`` are
    the files the exporter still wrote (a TensorRT exporter writes the ONNX it would
    build from and a ``trtexec.sh``, so the engine can be built on the device).
    It is deliberately not an ``EdgekitError``: callers that stop on user errors keep going.
    """

    def __init__(self, reason: str, artifacts: Tuple = ()):
        self.reason = reason
        self.artifacts = list(artifacts)
        wrote = ", ".join(getattr(a, "name", str(a)) for a in self.artifacts)
        super().__init__(f"{reason}; wrote {wrote}" if wrote else reason)


def missing_requirements(fmt: Format) -> list[str]:
    """Python modules this format needs that are not importable here (for ❎ rows)."""
    from importlib.util import find_spec

    return [m for m in fmt.requires if find_spec(m) is None]
