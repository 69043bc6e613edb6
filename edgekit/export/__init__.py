"""Exporters: torch model -> artifact on disk, one function per format.

Every exporter has the signature ``export(model, precision, options, ctx) -> Path``, where ``options`` is
the format's validated options model (``edgekit.formats``), and is named in the format's row of
``edgekit.formats.FORMATS``. This package's ``__init__`` does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple, Union

if TYPE_CHECKING:
    from torch import nn

    from ..formats import Options

# timer(runs_by_name, x, warmup=, rounds=, description=) -> {name: {"p50": ms, ...}}: how an exporter times
# candidates on this machine (edgekit.measure.local.interleaved_latency); exporters never import measure.
Timer = Callable[..., Dict[str, Dict[str, float]]]


@dataclass
class ExportContext:
    out_dir: Path  # where artifacts go (the run's temporary folder until it is complete)
    task: Any  # edgekit.data.Task: calibration data for int8
    device: Any  # edgekit.config.DeviceProfile: per-device settings (int8 activation type, ...)
    input_shape: Tuple[int, ...]
    name: str  # variant name: the artifact is out_dir / f"model.{name}{suffix}"
    cache: Dict[Any, Path] = field(default_factory=dict)  # e.g. fp32 ONNX already exported for a model
    info: Dict[str, Any] = field(default_factory=dict)  # facts for report.json (quant config, ...)
    timer: Optional[Timer] = None  # None: searches that time candidates (ONNX int8 layouts) are skipped

    def path(self, suffix: str, name: str | None = None) -> Path:
        return self.out_dir / f"model.{name or self.name}{suffix}"


def export(fmt_name: str, model: "nn.Module", precision: str, options: Union[Mapping[str, Any], "Options", None],
           ctx: ExportContext) -> Path:
    """Export ``model`` as ``fmt_name`` at ``precision``; ``options`` are checked against the format's schema."""
    from ..formats import FORMATS, validate_options

    fmt = FORMATS.get(fmt_name)
    return fmt.exporter(model, precision, validate_options(fmt, options), ctx)
