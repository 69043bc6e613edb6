"""The public Python API: what every ``edgekit`` command calls, each returning a typed result.

``edgekit/__init__.py`` re-exports these lazily, so ``import edgekit`` stays cheap (no torch until a function runs).
Each result's ``to_json()`` is what the matching command writes (report.json for ``compress``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

if TYPE_CHECKING:  # pragma: no cover - names for annotations only
    from torch import nn

    from .pipeline.benchmark import BenchmarkResult
    from .config import DeviceProfile, Recipe
    from .pipeline import CompressResult
    from .results import Latency
    from .sweep import SweepResult


def compress(model: str, recipe: "str | Recipe" = "int8", device: "str | DeviceProfile" = "desktop-cpu",
             **kwargs: Any) -> "CompressResult":
    """Compress ``model`` with ``recipe`` for ``device``: baseline, steps, export, evaluate, measure, report.

    Keyword arguments are :func:`edgekit.pipeline.compress`'s (``data``, ``weights``, ``out``, ``force``, ``seed``,
    ``target_ms``, ``input_size``, ``runs``, ``skip_bad_images``, ``train_device``: auto, cpu or cuda).
    ``result.variants["int8"].latency.p50``, ``result.recommended``, ``result.to_json()`` (report.json).
    """
    from .pipeline import compress as _compress

    return _compress(model, recipe, device, **kwargs)


def benchmark(model: "str | nn.Module", recipe: "Optional[str | Recipe]" = None,
              device: "str | DeviceProfile" = "desktop-cpu", **kwargs: Any) -> "BenchmarkResult":
    """Every format x precision of ``model``, exported, evaluated and timed side by side; one Variant per row."""
    from .pipeline.benchmark import benchmark as _benchmark

    return _benchmark(model, recipe, device, **kwargs)


@dataclass
class ComparisonResult:
    """Two artifacts run on the same inputs: per output (agreement, SQNR, cosine, max |diff|) and per layer."""

    data: Dict[str, Any]

    @property
    def outputs(self) -> List[dict]:
        return self.data["outputs"]

    @property
    def agreement(self) -> float:
        return self.outputs[0]["agreement"]

    @property
    def sqnr_db(self) -> float:
        return self.outputs[0]["sqnr_db"]

    @property
    def layers(self) -> Optional[List[dict]]:
        return self.data.get("layers")

    @property
    def first_divergence(self) -> Optional[dict]:
        return self.data.get("first_divergence")

    def to_json(self) -> Dict[str, Any]:
        return self.data


def compare(a: "str | Path", b: "str | Path", **kwargs: Any) -> ComparisonResult:
    """Run ``a`` and ``b`` (checkpoint, ONNX, TFLite) on the same inputs and compare them output by output and, for
    two ONNX graphs, layer by layer (:func:`edgekit.comparison.compare_artifacts`'s keyword arguments)."""
    from .comparison import compare_artifacts

    return ComparisonResult(compare_artifacts(a, b, **kwargs))


def profile(artifact: "str | Path", device: "str | DeviceProfile" = "desktop-cpu", host: Optional[str] = None,
            **kwargs: Any) -> "Latency":
    """Latency of an exported model, or of any model source exported to fp32 ONNX first, on ``device``: measured
    here, measured over SSH (``host``), or estimated."""
    from .pipeline.source import profile_model

    return profile_model(str(artifact), device, host=host, **kwargs)


@dataclass
class DeployResult:
    """What a deploy did: ``action`` (bundle, installed, activated, unchanged), the release id, and the message."""

    action: str
    release: Optional[str]
    message: Optional[str]
    data: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return self.data


def deploy(run_dir: "str | Path", device: str, host: Optional[str] = None, bundle: "Optional[str | Path]" = None,
           **kwargs: Any) -> DeployResult:
    """Bundle a run folder for ``device`` (``bundle``) and/or install it on ``host`` over SSH, atomically."""
    from .deployment import deploy_cmd

    out = deploy_cmd(run_dir, device, host=host, bundle=bundle, **kwargs)
    return DeployResult(out.get("action", "bundle"), out.get("release"), out.get("message"), out)


def run_sweep(file: "Optional[str | Path]" = None, **kwargs: Any) -> "SweepResult":
    """Every model x recipe x device of a grid (``models``, ``recipes``, ``devices`` or a sweep YAML) on Ray, with
    SSH boards as a pool (``hosts``); resumable; ``out/sweep.json`` (:func:`edgekit.sweep.sweep`). The package
    ``edgekit.sweep`` holds it, hence the verb."""
    from .sweep import sweep as _sweep

    return _sweep(file, **kwargs)


def create_model(name: str, num_classes: int = 1000, pretrained: bool = False, **kwargs: Any) -> "nn.Module":
    """A model from any torch source (timm's ``create_model`` style): a zoo name, ``timm:<name>``,
    ``torchvision:<name>``, ``file.py:Factory``; ``pretrained`` loads ImageNet weights available offline."""
    from . import zoo
    from .sources import parse_source
    from .zoo.external import spec_for

    spec = spec_for(parse_source(name))
    return zoo.create(spec.name, num_classes=num_classes, pretrained=pretrained, **kwargs)


def load_recipe(name_or_path: str) -> "Recipe":
    """A built-in recipe by name or a recipe YAML, checked whole (steps, variant options) before any work."""
    from .config import load_recipe as _load

    return _load(name_or_path)


def load_device(name_or_path: str) -> "DeviceProfile":
    """A built-in device profile by name or a profile YAML."""
    from .config import load_device as _load

    return _load(name_or_path)


__all__ = ["ComparisonResult", "DeployResult", "benchmark", "compare", "compress", "create_model", "deploy",
           "load_device", "load_recipe", "profile", "run_sweep"]
