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
DETECTOR_STEPS = ("prune", "distill")  # steps that know a detector's heads and loss


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
    def detector(self) -> bool:
        return self.spec is not None and self.spec.task == "detection"

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

    def preprocess(self, input_size: Optional[int] = None):
        """The model's own eval transform (timm's data config where it carries one), at ``input_size``."""
        from ..data import Preprocess

        if self.onnx is not None:
            return Preprocess(self.onnx.input_shape[-1], source=f"ImageNet eval default ({self.onnx.path.name} "
                                                               "carries no preprocessing)")
        from .. import zoo

        return Preprocess.for_model(zoo.create(self.spec.name, num_classes=self.spec.num_classes), input_size)

    def task(self, data: Optional[str], seed: int = 0, input_size: Optional[int] = None,
             skip_bad_images: bool = False, **kw: Any):
        """The data the model is judged on.

        No ``--data``: a model with its own trained head (pretrained, the user's checkpoint for their factory, an
        ONNX file) is judged as it is on the photos task, by agreement with fp32; any other model trains on the
        default task (MNIST digits). ``--data`` with class folders is labelled (and trains when a head must be
        trained); a folder of loose images is judged by agreement, and needs a model that is already trained.
        """
        from ..data import load_task
        from ..data.folders import data_layout

        if self.detector:
            from ..detect.data import load_detection_task

            size = {"input_size": input_size} if input_size is not None else {}
            return load_detection_task("digits-detect", data=data, seed=seed, **size)
        if self.onnx is not None:
            input_size = self.onnx.input_shape[-1]
        if data is None and not self.keeps_head:
            task_kw: Dict[str, Any] = {"seed": seed, **kw}
            if input_size is not None:
                task_kw["input_size"] = input_size
            return load_task("mnist", **task_kw)
        if self.onnx is not None and self.onnx.input_shape[1] != 3:
            raise EdgekitError(f"{self.onnx.path.name} takes {self.onnx.input_shape[1]}-channel images and the "
                               "photos edgekit judges it on are RGB: export the model with a 3-channel input")
        pre = self.preprocess(input_size)
        if data is None:
            return load_task("photos", preprocess=pre, input_size=input_size, **kw)
        unlabelled = data_layout(data) == "images"
        if unlabelled and not self.keeps_head:
            raise EdgekitError(f"{data} holds images without class folders: nothing to train {self.label}'s head "
                               "on. Give --weights pretrained or --weights file.pth to judge the trained model by "
                               "agreement with fp32, or sort the images into <class> folders")
        task = load_task(data=data, preprocess=pre, input_size=input_size, seed=seed,
                         skip_bad_images=skip_bad_images, **({} if unlabelled else {"train": self._trains_on(data)}),
                         **kw)
        if self.onnx is not None and task.num_classes is not None and self.onnx.num_classes != task.num_classes:
            raise EdgekitError(f"{self.onnx.path.name} outputs {self.onnx.num_classes} classes and {data} has "
                               f"{task.num_classes} class folders: an ONNX model's head cannot be retrained; give "
                               f"images of its own classes (or a folder of loose images, judged by agreement)")
        return task

    def _trains_on(self, data: str) -> bool:
        """Whether a labelled folder must train the baseline: yes unless the model's own head already has as many
        classes as the folder (``train=False`` then evaluates on every image calibration does not use)."""
        if not self.keeps_head:
            return True
        from ..data.folders import class_count

        own = self.onnx.num_classes if self.onnx is not None else self.spec.num_classes
        return class_count(data) != own

    def baseline(self, task, recipe=None, seed: int = 0, use_cache: bool = True,
                 train_device: str = "auto") -> Tuple[Any, dict]:
        """The fp32 reference: the ONNX file as it is, or the torch model (trained, pretrained or the user's)."""
        if self.onnx is not None:
            return self.onnx, {"source": "onnx file", "path": str(self.onnx.path)}
        if task.size("train") == 0 and recipe is not None and needs_training(recipe):
            raise EdgekitError(f"recipe {recipe.name} fine-tunes ({', '.join(needs_training(recipe))}) and "
                               f"{task.name} has no labelled training images; give --data with class folders, or "
                               "a recipe without training steps (int8, fp32)")
        from .baseline import get_baseline

        return get_baseline(self.spec.name, task, self.weights, recipe, seed, use_cache, train_device)


def needs_training(recipe) -> list:
    """The recipe's steps that read the training split (fine-tunes, distillation, pruning's importance scores and
    BatchNorm re-estimation): they need labelled training images."""
    from ..steps import validate_steps

    out = []
    for step, spec in zip(validate_steps(recipe.steps, where=f"recipe {recipe.name}"), recipe.steps):
        if spec.kind in ("prune", "distill", "depth", "qat") or float(
                getattr(step.params, "finetune_epochs", 0) or 0) > 0:
            out.append(spec.kind)
    return out


def resolve(source: "str | ModelSource", weights: Optional[str] = None, input_size: Optional[int] = None,
            steps: Sequence[str] = (), what: str = "the recipe") -> ResolvedSource:
    """Parse, import and check ``source`` before any work: a bad name, file, factory or ONNX input is one line."""
    src = source if isinstance(source, ModelSource) else parse_source(str(source))
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
    other = [s for s in steps if s not in DETECTOR_STEPS]
    if spec.task == "detection" and other:
        raise EdgekitError(f"{what} has steps ({', '.join(other)}) that edgekit does not run on detectors yet; "
                           f"detectors take {' and '.join(DETECTOR_STEPS)}")
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
