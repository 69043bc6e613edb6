"""The runtime registry and the small interface every runner implements."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Protocol, Tuple

import numpy as np

from ..errors import EdgekitError
from ..registry import Registry


class Runner(Protocol):
    """A loaded artifact. ``run`` takes float32 NCHW and returns logits."""

    runtime: str
    version: str
    threads: int
    input_shape: Tuple[int, ...]
    output_shape: Tuple[Optional[int], ...]  # the first output's; None where a dimension is dynamic

    def run(self, x: np.ndarray) -> np.ndarray: ...


def _load_runners() -> None:
    """Importing the runner modules fills the table (each imports its runtime library only when it loads a model)."""
    from . import litert, onnxruntime, tensorrt  # noqa: F401


RUNTIMES: Registry[Callable[..., Runner]] = Registry("runtime", loader=_load_runners)


def check_input(x: np.ndarray, expected: Tuple, artifact: str) -> None:
    """Reject wrong shapes with a clear message instead of a runtime traceback."""
    if x.ndim != len(expected) or any(e not in (None, -1) and isinstance(e, int) and e != d
                                      for e, d in zip(expected[1:], x.shape[1:])):
        raise EdgekitError(f"Input shape {tuple(x.shape)} does not match {artifact}, "
                           f"which expects {tuple(expected)}")


def load_runner(runtime: str, path: str | Path, threads: Optional[int] = None, **kw) -> Runner:
    factory = RUNTIMES.get(runtime)
    p = Path(path)
    if not p.is_file():
        raise EdgekitError(f"Model file not found: {p}")
    return factory(p, threads=threads, **kw)


def module_versions() -> Dict[str, str]:
    """Versions of everything that shapes an artifact, for report.json."""
    import importlib.metadata as md

    out = {}
    for dist in ("torch", "torchvision", "timm", "onnx", "onnxruntime", "torch-pruning", "litert-torch",
                 "ai-edge-litert", "tensorrt", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out
