"""Compression steps on the torch model (prune, distill, svd, ...); ONNX int8 is an export option (edgekit.export).

The registry (``edgekit.steps.registry``): one ``Step`` class per kind, each with its pydantic ``Params``
(``edgekit.steps.params``, torch-free). ``STEPS`` imports the step modules, and so torch, on its first lookup.
"""

from .params import STEP_PARAMS  # noqa: F401
from .registry import (STEPS, Step, StepContext, StepParams, build_step, register_step, step_tag,  # noqa: F401
                       validate_steps)
