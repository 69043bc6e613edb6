"""The step registry: torch-level compression steps applied in recipe order.

Each step declares its own parameter schema (a pydantic model in ``params.py``, torch-free, as Olive's passes do) and
implements ``apply(model, ctx) -> model``. ``STEPS`` fills itself on the first lookup by importing the step modules
(they import torch); this module does not import torch, so checking a recipe never does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Optional, Type

from pydantic import ValidationError

from ..errors import EdgekitError
from ..registry import Registry
from .params import STEP_PARAMS, StepParams

if TYPE_CHECKING:
    from torch import nn


@dataclass
class StepContext:
    """What a step may use besides the model: the task, the fp32 baseline, the device, a seed, where to train."""

    task: Any  # edgekit.data.Task
    baseline: nn.Module
    model_name: str
    device: Any  # edgekit.config.DeviceProfile
    seed: int = 0
    notes: List[str] = field(default_factory=list)  # lines for the report
    train_device: str = "auto"  # where fine-tunes and distillation train (--device-train: auto, cpu, cuda)
    info: Dict[str, Any] = field(default_factory=dict)  # per-step facts for report.json


class Step:
    name: ClassVar[str]
    Params: ClassVar[Type[StepParams]] = StepParams

    def __init__(self, params: StepParams):
        self.params = params

    def apply(self, model: nn.Module, ctx: StepContext) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError


def _load_steps() -> None:
    """Importing the step modules fills the table (each registers itself with ``register_step``)."""
    from . import distill, lowrank, prune, qat  # noqa: F401


STEPS: Registry[Type[Step]] = Registry("step", loader=_load_steps)


def register_step(cls: Type[Step]) -> Type[Step]:
    """Add a step class; its ``Params`` become the kind's schema in ``STEP_PARAMS`` (the built-in steps use the one
    already there: a different model for the same kind is an error)."""
    if cls.name not in STEP_PARAMS:
        STEP_PARAMS.add(cls.name, cls.Params)
    elif STEP_PARAMS.get(cls.name) is not cls.Params:
        raise ValueError(f"step {cls.name!r}: its Params is not edgekit.steps.params.STEP_PARAMS[{cls.name!r}]")
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
    kinds = [s.kind for s in specs]
    if "qat" in kinds[:-1]:  # the other steps change float layers, which a QAT graph no longer has
        raise EdgekitError(f"Invalid steps in {where}: 'qat' must be the last step (it is followed by "
                           f"{', '.join(kinds[kinds.index('qat') + 1:])})")
    return [build_step(s.kind, s.params, where) for s in specs]


def step_tag(specs) -> Optional[str]:
    """Short name for what the steps did (``prune-distill``), or None for no steps."""
    return "-".join(s.kind for s in specs) or None

