"""Models from outside the zoo (timm, torchvision, the user's own factory) as :class:`ModelSpec` entries.

A spec made here is what the zoo's own entries are, so the baseline, the steps (their classifier and learning-rate
lookups) and the report treat ``timm:lcnet_050`` like ``shufflenetv2``. They live in their own table, not in the zoo
registry: ``edgekit zoo list`` lists the zoo, not what a run happened to resolve.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable, Dict, Optional
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import EdgekitError, did_you_mean
from ..sources import ModelSource, file_sha256
from .registry import ModelSpec, torch_hub_file

EXTERNAL: Dict[str, ModelSpec] = {}


def spec_for(source: ModelSource) -> ModelSpec:
    """The spec of a parsed source (made once per process); zoo names return the zoo's own entry."""
    from .registry import get_spec

    if source.kind == "zoo":
        return get_spec(source.name)
    if source.kind == "onnx":
        raise EdgekitError(f"{source.ref} is an ONNX graph, not a PyTorch model")
    key = source.name if source.path is None else f"{source.name}@{file_sha256(source.path)[:16]}"
    if key not in EXTERNAL:
        make = {"timm": _timm_spec, "torchvision": _torchvision_spec, "python": _python_spec}[source.kind]
        EXTERNAL[key] = make(source)
    return EXTERNAL[key]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------- timm

def timm_cached_weights(arch: str) -> Callable[[], Dict[str, torch.Tensor]]:
    """A loader of timm's pretrained weights from the local Hugging Face or torch hub cache (never downloads)."""

    def load() -> Dict[str, torch.Tensor]:
        import timm

        cfg = timm.get_pretrained_cfg(arch)
        tried = []
        if cfg is not None and cfg.hf_hub_id:
            try:
                from huggingface_hub import hf_hub_download

                for fname in ("model.safetensors", "pytorch_model.bin"):
                    try:
                        path = hf_hub_download(cfg.hf_hub_id, fname, local_files_only=True)
                    except Exception:  # noqa: BLE001 - not in the cache
                        continue
                    if fname.endswith(".safetensors"):
                        from safetensors.torch import load_file

                        return load_file(path)
                    return torch.load(path, map_location="cpu", weights_only=True)
            except ImportError:
                pass
            tried.append(f"Hugging Face cache ({cfg.hf_hub_id})")
        if cfg is not None and cfg.url:
            try:
                return torch_hub_file(Path(urlparse(cfg.url).path).name)()
            except FileNotFoundError:
                tried.append(f"torch hub cache ({Path(urlparse(cfg.url).path).name})")
        raise FileNotFoundError(f"not in {' or '.join(tried) or 'any known place'} (no download here)")

    return load


def _timm_spec(source: ModelSource) -> ModelSpec:
    import timm

    arch = source.arch
    if not timm.is_model(arch):
        names = timm.list_models()
        raise EdgekitError(f"timm has no model {arch!r}.{did_you_mean(arch, names)} "
                           f"(timm {timm.__version__}: timm.list_models() lists {len(names)})")
    cfg = timm.get_pretrained_cfg(arch)
    size = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
    classes = int(cfg.num_classes) if cfg is not None and cfg.num_classes else 1000

    def build(num_classes: int) -> nn.Module:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)

    model = build(classes)
    return ModelSpec(name=source.name, family="timm", source="timm", paper=f"timm {timm.__version__} {arch}",
                     build=build, input_size=size, classifier=_head_path(model, getattr(cfg, "classifier", "")),
                     pretrained=(("timm", timm_cached_weights(arch)),), notes=f"timm {arch}")


# ----------------------------------------------------------------------------- torchvision

def _torchvision_spec(source: ModelSource) -> ModelSpec:
    import torchvision
    from torchvision import models

    arch = source.arch
    names = models.list_models()
    if arch not in names:
        raise EdgekitError(f"torchvision has no model {arch!r}.{did_you_mean(arch, names)} "
                           f"(torchvision {torchvision.__version__})")
    builder = models.get_model_builder(arch)
    sources = ()
    size = 224
    try:
        default = models.get_model_weights(arch).DEFAULT
        sources = (("torchvision", torch_hub_file(Path(urlparse(default.url).path).name)),)
        crop = getattr(default.transforms, "keywords", {}).get("crop_size")
        size = int(crop) if isinstance(crop, int) else size
    except (ValueError, AttributeError, KeyError):  # an architecture without published weights
        pass

    def build(num_classes: int) -> nn.Module:
        return builder(weights=None, num_classes=num_classes)

    return ModelSpec(name=source.name, family="torchvision", source="torchvision",
                     paper=f"torchvision {torchvision.__version__} {arch}", build=build, input_size=size,
                     classifier=_head_path(build(1000)), pretrained=sources, notes=f"torchvision {arch}")


# ----------------------------------------------------------------------------- the user's own factory

def load_factory(source: ModelSource) -> Callable[..., nn.Module]:
    """The class or function ``source`` names, imported from the user's file or module."""
    if source.path is not None:
        name = f"edgekit_user_{file_sha256(source.path)[:12]}"
        mod = sys.modules.get(name)
        if mod is None:
            spec = importlib.util.spec_from_file_location(name, source.path)
            mod = importlib.util.module_from_spec(spec)
            sys.path.insert(0, str(source.path.parent))  # the file's sibling modules import as they do beside it
            try:
                sys.modules[name] = mod
                spec.loader.exec_module(mod)
            except BaseException as exc:
                sys.modules.pop(name, None)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                raise EdgekitError(f"Importing {source.path} failed: {_first_line(exc)}") from None
            finally:
                sys.path.remove(str(source.path.parent))
        where = str(source.path)
    else:
        sys.path.insert(0, str(Path.cwd()))  # `pkg.mod:Factory` finds the packages of the folder it runs in
        try:
            mod = importlib.import_module(source.module)
        except ModuleNotFoundError as exc:
            raise EdgekitError(f"Cannot import {source.module!r} (from {source.ref!r}): {_first_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
            raise EdgekitError(f"Importing {source.module} failed: {_first_line(exc)}") from None
        finally:
            sys.path.remove(str(Path.cwd()))
        where = source.module
    factory = getattr(mod, source.arch, None)
    if factory is None or not callable(factory):
        found = sorted(k for k, v in vars(mod).items() if not k.startswith("_") and callable(v)
                       and getattr(v, "__module__", None) == mod.__name__)
        raise EdgekitError(f"{where} has no class or function {source.arch!r}.{did_you_mean(source.arch, found)}"
                           f" It defines: {', '.join(found) or 'nothing callable'}.")
    return factory


def _call_factory(source: ModelSource, factory: Callable[..., nn.Module], num_classes: Optional[int]) -> nn.Module:
    kwargs = {}
    try:
        params = inspect.signature(factory).parameters
        takes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        takes = False
    if num_classes is not None and takes:
        kwargs["num_classes"] = num_classes
    try:
        model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's code
        raise EdgekitError(f"{source.ref} raised {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise EdgekitError(f"{source.ref} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _code_hash(source: ModelSource, factory) -> str:
    """The factory's file, hashed: a cached baseline trained on older code is not reused."""
    try:
        path = source.path or Path(inspect.getfile(sys.modules[factory.__module__]))
        return file_sha256(path)[:16]
    except (TypeError, KeyError, OSError):
        return "unknown"


def _python_spec(source: ModelSource) -> ModelSpec:
    factory = load_factory(source)
    probe = _call_factory(source, factory, None)
    head = _head_path(probe)
    cfg = getattr(probe, "pretrained_cfg", None) or getattr(probe, "default_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1] if isinstance(cfg, dict) else 224

    def build(num_classes: int) -> nn.Module:
        model = _call_factory(source, factory, num_classes)
        if head and _out_features(model, head) not in (None, num_classes):
            from .registry import replace_head

            replace_head(model, spec, num_classes)  # a factory without num_classes: its head is swapped
        return model

    spec = ModelSpec(name=source.name, family="user", source="python", paper=f"user code: {source.ref}", build=build,
                     input_size=int(size), classifier=head,
                     notes=f"{source.ref} (sha256 {_code_hash(source, factory)})",
                     num_classes=_out_features(probe, head) or 1000 if head else 1000)
    return spec


def _out_features(model: nn.Module, head: str) -> Optional[int]:
    from .registry import _get_module

    try:
        mod = _get_module(model, head)
    except (AttributeError, IndexError, TypeError):
        return None
    return getattr(mod, "out_features", None) or getattr(mod, "out_channels", None)


def _head_path(model: nn.Module, hint: str = "") -> str:
    """The dotted name of the classifier: the library's own name when it points at a layer, else the last
    Linear (or 1x1 Conv after the last Linear-free body) in definition order."""
    from .registry import _get_module

    if hint:
        try:
            if isinstance(_get_module(model, hint), (nn.Linear, nn.Conv2d)):
                return hint
        except (AttributeError, IndexError, TypeError):
            pass
    last = ""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    if not last:
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Conv2d):
                last = name
    return last
