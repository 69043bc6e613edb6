"""Compression: torch-level steps (prune, distill, svd) and format-level quantization.

Importing ``edgekit.compress.steps`` (or this package) registers every step.
"""

from .steps import STEPS, Step, StepContext, build_step, register_step, validate_steps  # noqa: F401
