"""Zoo registry: ``ModelSpec`` entries and the ``create`` factory."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from ..errors import EdgekitError
from ..registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """One zoo entry.

    ``build(num_classes)`` returns the architecture with random weights and a
    ``num_classes``-way head. ``pretrained`` names ImageNet weight sources in the
    order they are tried; each is a callable returning a 1000-class state dict or
    raising ``FileNotFoundError`` with a hint.
    """

    name: str
    family: str
    source: str  # "torchvision" | "timm" | "edgekit"
    paper: str
    build: Callable[[int], nn.Module]
    input_size: int = 224
    classifier: str = ""  # dotted path of the final layer (for head replacement)
    pretrained: Tuple[Tuple[str, Callable[[], Dict[str, torch.Tensor]]], ...] = ()
    aliases: Tuple[str, ...] = ()
    notes: str = ""
    reference: Dict[str, float] = field(default_factory=dict)  # paper figures at 224: params_m, macs_m
    train: Dict[str, float] = field(default_factory=dict)  # FitConfig overrides for this architecture
    num_classes: int = 1000  # the head as the source builds it: what pretrained weights or a factory's default carry
    # "classification" | "detection". A detector's ``build(num_classes, input_size)`` also takes the input size (its
    # default boxes or grids are fixed by it) and returns a module whose output is [B, anchors, 4 + classes]
    task: str = "classification"


def _load_families() -> None:
    """Importing the family modules fills the table (they import timm and torchvision: only when needed)."""
    from . import detection, own, timm_models, torchvision_models  # noqa: F401


MODELS: Registry[ModelSpec] = Registry("model", loader=_load_families)


def register_model(spec: ModelSpec) -> ModelSpec:
    MODELS.add(spec.name, spec)
    for alias in spec.aliases:
        MODELS.add(alias, spec)
    return spec


def get_spec(name: str) -> ModelSpec:
    """A zoo entry, or a model from outside the zoo resolved earlier in this process (``timm:lcnet_050``)."""
    from .external import EXTERNAL

    for key, spec in EXTERNAL.items():
        if name in (key, spec.name):
            return spec
    return MODELS.get(name)


def find_spec(name: Optional[str]) -> Optional[ModelSpec]:
    """Like :func:`get_spec`, None for a name that is neither in the zoo nor resolved (an nn.Module's label)."""
    from .external import EXTERNAL

    if not name:
        return None
    if name in MODELS:
        return MODELS.get(name)
    return next((s for k, s in EXTERNAL.items() if name in (k, s.name)), None)


def list_models(task: Optional[str] = "classification") -> list[ModelSpec]:
    """Each entry of ``task`` (every entry with None) once (aliases folded), in name order."""
    seen: Dict[str, ModelSpec] = {}
    for _, spec in MODELS.items():
        if task is None or spec.task == task:
            seen.setdefault(spec.name, spec)
    return sorted(seen.values(), key=lambda s: s.name)


def _get_module(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = _get_module(model, parent_path) if parent_path else model
    if leaf.isdigit():
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def replace_head(model: nn.Module, spec: ModelSpec, num_classes: int) -> nn.Module:
    """Swap the final classifier layer for a fresh ``num_classes``-way one."""
    head = _get_module(model, spec.classifier)
    if isinstance(head, nn.Linear):
        new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    elif isinstance(head, nn.Conv2d):
        new = nn.Conv2d(head.in_channels, num_classes, head.kernel_size, head.stride, head.padding,
                        bias=head.bias is not None)
    else:  # pragma: no cover - a registration error, caught by the zoo tests
        raise TypeError(f"{spec.name}: classifier {spec.classifier!r} is a {type(head).__name__}")
    _set_module(model, spec.classifier, new)
    return model


def first_conv(model: nn.Module) -> Tuple[str, nn.Conv2d]:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            return name, mod
    raise TypeError("model has no Conv2d")  # pragma: no cover


def adapt_in_chans(model: nn.Module, in_chans: int) -> nn.Module:
    """Give the stem convolution ``in_chans`` inputs, keeping pretrained filters meaningful.

    As timm's ``adapt_input_conv``: 1 channel sums the RGB filters; other counts
    repeat them and rescale so activations keep their magnitude.
    """
    name, conv = first_conv(model)
    if conv.in_channels == in_chans:
        return model
    if conv.groups != 1:  # pragma: no cover
        raise EdgekitError(f"cannot change input channels of a grouped stem ({name})")
    w = conv.weight.detach()
    if in_chans == 1:
        new_w = w.sum(dim=1, keepdim=True)
    else:
        reps = -(-in_chans // w.shape[1])
        new_w = w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)
    # a copy, not a fresh nn.Conv2d: a subclass such as timm's Conv2dSame (TF 'SAME' padding) pads in forward
    new = copy.deepcopy(conv)
    new.in_channels = in_chans
    new.weight = nn.Parameter(new_w.clone(), requires_grad=conv.weight.requires_grad)
    _set_module(model, name, new)
    return model


def load_checkpoint(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """A state dict from a user file, loaded with ``weights_only=True``."""
    p = Path(path)
    if not p.is_file():
        raise EdgekitError(f"Weights file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgekitError(f"Cannot read weights file {p}: {first[:200]}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise EdgekitError(f"Weights file {p} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state(model: nn.Module, state: Dict[str, torch.Tensor], what: str) -> None:
    """Strict load with a one-line explanation of what does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (first: {k} is {tuple(state[k].shape)}, "
                         f"model wants {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
        raise EdgekitError(f"{what} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state)


def create(
    name: str,
    num_classes: Optional[int] = None,
    in_chans: int = 3,
    pretrained: bool = False,
    weights: Optional[str | os.PathLike] = None,
    input_size: Optional[int] = None,
) -> nn.Module:
    """Build a zoo model.

    ``pretrained=True`` loads ImageNet weights from the first available source of
    the entry and then replaces the head when ``num_classes != 1000``.
    ``weights=path`` loads a user state dict saved for exactly this
    (``num_classes``, ``in_chans``) configuration. ``input_size`` is for detectors (default: the entry's).
    ``num_classes`` defaults to the entry's own head (1000 ImageNet classes for every classifier).
    """
    spec = get_spec(name)
    num_classes = spec.num_classes if num_classes is None else num_classes
    if weights is not None and pretrained:
        raise EdgekitError("Give either pretrained weights or a weights file, not both")
    if spec.task == "detection":
        build = lambda n: spec.build(n, input_size or spec.input_size)  # noqa: E731
        if pretrained and num_classes != spec.num_classes:
            raise EdgekitError(f"{spec.name}'s pretrained weights detect {spec.num_classes} classes; edgekit does not "
                               f"re-head a pretrained detector yet: train it on your {num_classes} classes instead")
    else:
        build = spec.build
    if pretrained:
        model = build(spec.num_classes)
        state, hints = None, []
        for source, loader in spec.pretrained:
            try:
                state = loader()
                break
            except FileNotFoundError as exc:
                hints.append(f"{source}: {exc}")
        if state is None:
            tried = "; ".join(hints) if hints else "this entry has no known pretrained source"
            raise EdgekitError(
                f"No pretrained weights for {spec.name} are reachable offline ({tried}). "
                "Options: pass --weights path/to/file.pth, or train on your task without --weights."
            )
        load_state(model, state, f"Pretrained weights for {spec.name}")
        if num_classes != spec.num_classes:
            replace_head(model, spec, num_classes)
    else:
        model = build(num_classes)
    if in_chans != 3:
        adapt_in_chans(model, in_chans)
    if weights is not None:
        load_state(model, load_checkpoint(weights), f"Weights file {weights}")
    return model.eval()


def torch_hub_file(filename: str) -> Callable[[], Dict[str, torch.Tensor]]:
    """A loader for a file already in torch hub's checkpoint cache (never downloads)."""

    def load() -> Dict[str, torch.Tensor]:
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not path.is_file():
            raise FileNotFoundError(f"{filename} is not in {path.parent} (no download here)")
        return torch.load(path, map_location="cpu", weights_only=True)

    return load

