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


def missing_requirements(fmt: Format) -> list[str]:
    """Python modules this format needs that are not importable here (for ❎ rows)."""
    from importlib.util import find_spec

    return [m for m in fmt.requires if find_spec(m) is None]
