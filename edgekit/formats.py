"""The formats table: one row per deployable format (like Ultralytics' export formats).

It drives export in the pipeline and the rows of the benchmark table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from .registry import Registry


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    precisions: Tuple[str, ...]
    runtime: str  # key in edgekit.runtime.RUNTIMES
    requires: Tuple[str, ...]  # python modules needed to export + run on this machine
    exporter: str  # "module:function" with the signature of edgekit.export.export
    gpu: bool = False
    description: str = ""


FORMATS: Registry[Format] = Registry("format")

FORMATS.add("onnx", Format("onnx", ".onnx", ("fp32", "int8"), "onnxruntime", ("onnx", "onnxruntime"),
                           "edgekit.export.onnx:export_variant",
                           description="ONNX; int8 by ONNX Runtime static quantization (QDQ)"))
FORMATS.add("tflite", Format("tflite", ".tflite", ("fp32", "fp16", "int8"), "litert",
                             ("litert_torch", "ai_edge_litert"), "edgekit.export.tflite:export_tflite",
                             description="TFLite (LiteRT) by litert-torch; fp16 weights; full-integer int8 by PT2E"))
FORMATS.add("tensorrt", Format("tensorrt", ".engine", ("fp16", "int8"), "tensorrt", ("tensorrt",),
                               "edgekit.export.tensorrt:export_tensorrt", gpu=True,
                               description="TensorRT engine from ONNX (fp16, or int8 from a TensorRT-style QDQ ONNX); "
                                           "the ONNX and a trtexec.sh are written even where tensorrt is absent"))


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
