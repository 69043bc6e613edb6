"""Stage 0: what the MODEL argument resolves to, the task it is judged on, and its fp32 baseline.

One resolver for ``compress`` and ``benchmark`` (``compare`` and ``profile`` take files and build sources with
:func:`load_torch_model`). A torch source becomes a zoo-like spec; an ONNX file stays an :class:`OnnxModel`, on which
the steps that change PyTorch weights are refused before any work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from ..errors import EdgekitError
from ..sources import ModelSource, describe, parse_source

TORCH_ONLY = "prune, distill, svd and depth change PyTorch weights"


@dataclass
class ResolvedSource:
    source: ModelSource
    weights: Optional[str] = None
    spec: Any = None  # zoo.ModelSpec for a torch source
    onnx: Any = None  # export.onnx_source.OnnxModel for an ONNX file

    @property
    def label(self) -> str:
        return self.spec.name if self.spec is not None else self.source.name

    @property
    def keeps_head(self) -> bool:
        """The model comes with its own trained classifier (pretrained weights, the user's checkpoint for their
        own factory, an ONNX file): it is judged as it is, never given a new head for the default task."""
        if self.onnx is not None or self.weights == "pretrained":
            return True
        return self.source.kind == "python" and self.weights is not None

    def info(self) -> Dict[str, Any]:
        """report.json's model_info: the form, the exact name and the hashes of every file involved."""
        base = {"source": self.spec.source if self.spec is not None else "onnx",
                "paper": self.spec.paper if self.spec is not None else f"ONNX file (opset {self.onnx.opset})"}
        return {**base, "origin": describe(self.source, self.weights)}

    def task(self, data: Optional[str], seed: int = 0, input_size: Optional[int] = None,
             skip_bad_images: bool = False, **kw: Any):
        """The data the model is judged on: ``--data``, else the default task (MNIST digits, trained on)."""
        from ..data import load_task

        task_kw: Dict[str, Any] = {"seed": seed, **kw}
        if self.onnx is not None:
            task_kw["input_size"] = self.onnx.input_shape[-1]
            if data is None:
                task_kw["in_chans"] = self.onnx.input_shape[1]
        elif input_size is not None:
            task_kw["input_size"] = input_size
        task = load_task("mnist", data=data, skip_bad_images=skip_bad_images, **task_kw)
        if self.onnx is not None:
            if task.in_chans != self.onnx.input_shape[1]:
                raise EdgekitError(f"{self.onnx.path.name} takes {self.onnx.input_shape[1]}-channel images; "
                                   f"{task.name} has {task.in_chans}")
            if self.onnx.num_classes != task.num_classes:
                raise EdgekitError(f"{self.onnx.path.name} outputs {self.onnx.num_classes} classes and {task.name} "
                                   f"has {task.num_classes}: give --data with the model's own classes")
        return task

    def baseline(self, task, recipe=None, seed: int = 0, use_cache: bool = True) -> Tuple[Any, dict]:
        """The fp32 reference: the ONNX file as it is, or the torch model (trained, pretrained or the user's)."""
        if self.onnx is not None:
            return self.onnx, {"source": "onnx file", "path": str(self.onnx.path)}
        from .baseline import get_baseline

        return get_baseline(self.spec.name, task, self.weights, recipe, seed, use_cache)


def resolve(source: "str | ModelSource", weights: Optional[str] = None, input_size: Optional[int] = None,
            steps: Sequence[str] = (), what: str = "the recipe") -> ResolvedSource:
    """Parse, import and check ``source`` before any work: a bad name, file, factory or ONNX input is one line."""
    src = parse_source(source) if isinstance(source, str) else source
    if input_size is not None and input_size < 8:
        raise EdgekitError(f"--input-size {input_size} is too small")
    if src.kind == "onnx":
        from ..export.onnx_source import OnnxModel

        if steps:
            raise EdgekitError(f"{what} has steps ({', '.join(steps)}) that need the PyTorch model: {TORCH_ONLY}. "
                               f"An ONNX file can be quantized (--recipe int8), benchmarked, profiled and deployed; "
                               f"for the other steps give the model as timm:<name>, torchvision:<name> or "
                               f"file.py:Factory")
        if weights is not None:
            raise EdgekitError(f"--weights does not apply to {src.path.name}: an ONNX file carries its weights")
        return ResolvedSource(src, None, onnx=OnnxModel.load(src.path, input_size))
    from ..zoo.external import spec_for

    spec = spec_for(src)
    if weights == "pretrained" and not spec.pretrained:
        raise EdgekitError(f"{spec.name} has no pretrained weights edgekit knows of; give --weights file.pth")
    return ResolvedSource(src, weights, spec=spec)


def load_torch_model(source: "str | ModelSource", num_classes: Optional[int] = None, in_chans: int = 3,
                     weights: Optional[str] = None):
    """A torch model from any torch source (for ``compare``/``profile``): the source's own head unless
    ``num_classes`` asks for another; ``weights`` a state-dict file or 'pretrained'."""
    from .. import zoo

    r = resolve(source, weights)
    if r.onnx is not None:
        raise EdgekitError(f"{r.source.ref} is already an ONNX file")
    classes = num_classes if num_classes is not None else r.spec.num_classes
    pretrained = weights == "pretrained"
    return zoo.create(r.spec.name, num_classes=classes, in_chans=in_chans, pretrained=pretrained,
                      weights=None if pretrained else weights), r



ARTIFACT_SUFFIXES = (".onnx", ".tflite", ".engine")


def profile_model(model: str, device, input_size: Optional[int] = None, **kwargs: Any):
    """Latency of any model source: an artifact file as it is; a torch source exported to fp32 ONNX first (at
    ``input_size``, default the model's own), with random weights, which latency does not depend on."""
    import shutil
    import tempfile

    from ..measure import profile_artifact

    if model.lower().endswith(ARTIFACT_SUFFIXES):
        return profile_artifact(model, device, **kwargs)
    r = resolve(model, None, input_size)
    from .. import zoo
    from ..export.onnx import export_onnx

    size = input_size or r.spec.input_size
    tmp = Path(tempfile.mkdtemp(prefix="edgekit-profile-"))
    try:
        path = export_onnx(zoo.create(r.spec.name, num_classes=r.spec.num_classes), tmp / f"{r.source.slug}.onnx",
                           (1, 3, size, size))
        lat = profile_artifact(path, device, **kwargs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lat.extra["model"] = {"source": describe(r.source), "exported": f"fp32 ONNX at (1, 3, {size}, {size})"}
    return lat
