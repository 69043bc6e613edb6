"""Runtimes: load an artifact, run a batch. One table, keyed by runtime name."""

from .base import RUNTIMES, Runner, load_runner  # noqa: F401

# Importing a runner module registers it; each imports its runtime library lazily.
from . import onnxruntime as _onnxruntime  # noqa: E402,F401
from . import litert as _litert  # noqa: E402,F401
from . import tensorrt as _tensorrt  # noqa: E402,F401
