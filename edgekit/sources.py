"""Where a model comes from: one parser for every command's MODEL argument.

Forms, checked without importing torch (so a typo is answered at once):

- ``shufflenetv2``: a zoo name or alias;
- ``timm:lcnet_050`` (also ``timm/lcnet_050``, the Hugging Face spelling) and ``torchvision:mobilenet_v3_small``:
  any model those libraries build;
- ``path/to/mynet.py:MyNet`` or ``package.module:make_net``: a class or function returning an ``nn.Module``;
- ``model.onnx``: an exported graph; steps that change PyTorch weights cannot run on it.

:func:`describe` is what the report records: the form, the exact name, and SHA-256 of every file involved.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import EdgekitError

KINDS = ("zoo", "timm", "torchvision", "python", "onnx")
FORMS = ("a zoo name (edgekit zoo list), timm:<name>, torchvision:<name>, path/to/file.py:Factory, "
         "package.module:Factory, or a .onnx file")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_LIB_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A parsed MODEL argument. ``name`` labels the model in reports; ``slug`` in folder names."""

    kind: str
    ref: str  # what the user wrote
    name: str  # zoo canonical name, "timm:<arch>", "torchvision:<arch>", "<file stem>:<Factory>", "<file stem>"
    arch: str = ""  # timm / torchvision architecture, or the factory's name
    path: Optional[Path] = None  # the .py or .onnx file
    module: str = ""  # package.module of a module factory

    @property
    def slug(self) -> str:
        return re.sub(r"[^\w.-]+", "-", self.name).strip("-.") or "model"

    @property
    def torch(self) -> bool:
        """Whether a PyTorch model exists for the steps (prune, distill, SVD) to work on."""
        return self.kind != "onnx"


def parse_source(text: str) -> ModelSource:
    """The source ``text`` names; an EdgekitError (one line, with what to write instead) when it names none."""
    ref = text.strip()
    if not ref:
        raise EdgekitError(f"No model given; give {FORMS}")
    low = ref.lower()
    for lib in ("timm", "torchvision"):
        for sep in (":", "/"):
            if low.startswith(lib + sep):
                arch = ref[len(lib) + 1:]
                if not arch or not _LIB_NAME.match(arch):
                    raise EdgekitError(f"{ref!r}: write {lib}:<model name>, e.g. "
                                       f"{'timm:lcnet_050' if lib == 'timm' else 'torchvision:mobilenet_v3_small'}")
                return ModelSource(lib, ref, f"{lib}:{arch}", arch=arch)
    if low.endswith(".onnx"):
        path = Path(ref)
        if not path.is_file():
            raise EdgekitError(f"ONNX file not found: {ref}" if not path.exists() else f"Not a file: {ref}")
        return ModelSource("onnx", ref, path.stem, path=path.resolve())
    if ":" in ref:
        left, _, factory = ref.rpartition(":")
        if not _IDENT.match(factory):
            raise EdgekitError(f"{ref!r}: after ':' comes the name of a class or function in {left!r} "
                               f"(e.g. {left}:MyNet)")
        if left.endswith(".py") or "/" in left or "\\" in left:
            path = Path(left)
            if not path.is_file():
                raise EdgekitError(f"Python file not found: {left} (from {ref!r})")
            if path.suffix != ".py":
                raise EdgekitError(f"{left} is not a .py file (from {ref!r})")
            return ModelSource("python", ref, f"{path.stem}:{factory}", arch=factory, path=path.resolve())
        if not _MODULE.match(left):
            raise EdgekitError(f"{ref!r}: write path/to/file.py:{factory} or package.module:{factory}")
        return ModelSource("python", ref, f"{left}:{factory}", arch=factory, module=left)
    if low.endswith(".py"):
        raise EdgekitError(f"{ref!r}: name the class or function that builds the model, e.g. {ref}:MyNet")
    from .zoo.index import canonical_name

    try:
        return ModelSource("zoo", ref, canonical_name(ref))
    except EdgekitError as exc:
        raise EdgekitError(f"{exc} For a model outside the zoo write timm:{ref}, torchvision:{ref}, "
                           f"path/to/file.py:Factory or a .onnx file.") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe(source: ModelSource, weights: Optional[str] = None) -> dict:
    """What report.json says of the model's origin: form, exact name, versions, and hashes of the files."""
    info: dict = {"kind": source.kind, "ref": source.ref, "name": source.name}
    if source.kind in ("timm", "torchvision"):
        import importlib.metadata as md

        info.update(arch=source.arch, package=f"{source.kind} {md.version(source.kind)}")
    if source.kind == "python":
        info["factory"] = source.arch
        if source.module:
            info["module"] = source.module
    if source.path is not None:
        info.update(file=str(source.path), file_sha256=file_sha256(source.path))
    if weights not in (None, "pretrained") and Path(weights).is_file():
        info.update(weights=str(Path(weights).resolve()), weights_sha256=file_sha256(Path(weights)))
    elif weights == "pretrained":
        info["weights"] = "pretrained"
    return info
