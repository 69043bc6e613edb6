"""Exporters: torch model -> artifact on disk, one function per format.

Every exporter has the signature ``export(model, precision, options, ctx) -> Path``
and is named in the format's row of ``edgekit.formats.FORMATS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Tuple

from torch import nn


@dataclass
class ExportContext:
    out_dir: Path  # where artifacts go (the run's temporary folder until it is complete)
    task: Any  # edgekit.data.Task: calibration data for int8
    device: Any  # edgekit.config.DeviceProfile: per-device settings (int8 activation type, ...)
    input_shape: Tuple[int, ...]
    name: str  # variant name: the artifact is out_dir / f"model.{name}{suffix}"
    cache: Dict[Any, Path] = field(default_factory=dict)  # e.g. fp32 ONNX already exported for a model
    info: Dict[str, Any] = field(default_factory=dict)  # facts for report.json (quant config, ...)

    def path(self, suffix: str, name: str | None = None) -> Path:
        return self.out_dir / f"model.{name or self.name}{suffix}"


def export(fmt_name: str, model: nn.Module, precision: str, options: Dict[str, Any], ctx: ExportContext) -> Path:
    from importlib import import_module

    from ..formats import FORMATS

    fmt = FORMATS.get(fmt_name)
    module, _, func = fmt.exporter.partition(":")
    return getattr(import_module(module), func)(model, precision, options, ctx)
