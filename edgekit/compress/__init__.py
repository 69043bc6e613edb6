"""Compression steps on the torch model (prune, distill, svd, ...); ONNX int8 is an export option (edgekit.export).

Importing ``edgekit.compress.steps`` (or this package) registers every step.
"""

from .steps import STEPS, Step, StepContext, build_step, register_step, validate_steps  # noqa: F401
