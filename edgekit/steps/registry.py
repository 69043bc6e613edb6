"""The step registry: torch-level compression steps applied in recipe order.

Each step declares its own parameter schema (a pydantic model, as Olive's
passes do) and implements ``apply(model, ctx) -> model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Type

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from ..errors import EdgekitError
from ..registry import Registry


class StepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class StepContext:
    """What a step may use besides the model: the task, the fp32 baseline, the device, a seed."""

    task: Any  # edgekit.data.Task
    baseline: nn.Module
    model_name: str
    device: Any  # edgekit.config.DeviceProfile
    seed: int = 0
    notes: List[str] = field(default_factory=list)  # lines for the report
    info: Dict[str, Any] = field(default_factory=dict)  # per-step facts for report.json


class Step:
    name: ClassVar[str]
    Params: ClassVar[Type[StepParams]] = StepParams

    def __init__(self, params: StepParams):
        self.params = params

    def apply(self, model: nn.Module, ctx: StepContext) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError


STEPS: Registry[Type[Step]] = Registry("step")


def register_step(cls: Type[Step]) -> Type[Step]:
    STEPS.add(cls.name, cls)
    return cls


def build_step(kind: str, params: Dict[str, Any], where: str = "recipe") -> Step:
    cls = STEPS.get(kind)
    try:
        return cls(cls.Params.model_validate(params))
    except ValidationError as exc:
        err = exc.errors()[0]
        field_name = ".".join(str(p) for p in err["loc"]) or kind
        raise EdgekitError(f"Invalid {kind} step in {where}: '{field_name}': {err['msg']}") from None


def validate_steps(specs, where: str = "recipe") -> List[Step]:
    return [build_step(s.kind, s.params, where) for s in specs]


def step_tag(specs) -> Optional[str]:
    """Short name for what the steps did (``prune-distill``), or None for no steps."""
    return "-".join(s.kind for s in specs) or None


# The step modules register themselves; importing them here means any user of the
# registry (config validation, the pipeline) sees every step.
from . import distill as _distill, lowrank as _lowrank, prune as _prune  # noqa: E402,F401
