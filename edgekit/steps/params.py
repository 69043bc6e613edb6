"""Every step's parameter schema (pydantic), torch-free: recipes are checked against these before any work.

``STEP_PARAMS`` maps a step kind to its ``Params`` model; the step classes (``STEPS``, which import torch) use the
same models, and ``register_step`` refuses a step whose ``Params`` differs from the one here. A distillation
``teacher`` is checked against the zoo's index (torch-free); only a name not in it loads the zoo registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional, Type

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import did_you_mean
from ..registry import Registry

KINDS = ("pointwise", "spatial", "linear")  # the layers svd may factorize


class StepParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


STEP_PARAMS: Registry[Type[StepParams]] = Registry("step")


@STEP_PARAMS.register("prune")
class PruneParams(StepParams):
    macs: Optional[float] = Field(None, gt=0, lt=1, allow_inf_nan=False,
                                  description="fraction of the MACs to keep (0.5: half)")
    params: Optional[float] = Field(None, gt=0, lt=1, allow_inf_nan=False,
                                    description="fraction of the parameters to keep")
    scope: Literal["global", "per-layer"] = Field(
        "global", description="global: rank channels of all layers together; per-layer: the same share in each")
    criterion: Literal["l1", "l2", "bn_scale", "taylor"] = "l2"
    iterations: int = Field(1, ge=1, le=20, description="prune in this many steps, fine-tuning after each")
    finetune_epochs: float = Field(1.0, ge=0, le=10_000, allow_inf_nan=False,
                                   description="fine-tune after each iteration (0: BN recalibration only)")
    finetune_lr: Optional[float] = Field(None, gt=0, le=10, allow_inf_nan=False,
                                         description="default: the model's training lr, at most 3e-3")
    finetune_alpha: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                                  description="weight of distillation from the baseline in fine-tunes")
    round_to: Optional[int] = Field(None, ge=1, le=1024, description="default: the device profile's prune_round_to")
    ignore: List[str] = Field(default_factory=list, description="layer names or patterns whose outputs stay")
    max_layer_ratio: float = Field(0.9, gt=0, lt=1, allow_inf_nan=False,
                                   description="at most this share of one layer's channels goes")
    taylor_batches: int = Field(4, ge=1, le=100_000,
                                description="training batches whose gradients the taylor criterion uses")
    recalibrate: bool = True
    blocks: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False, description=(
        "share of the removable blocks (residual blocks, ShuffleNetV2 stride-1 units) to remove before channels "
        "are pruned, least harmful first; the rest of the budget is met by channel pruning"))
    block_samples: int = Field(128, ge=8, le=100_000, description="calibration images that rank the blocks")

    @model_validator(mode="after")
    def _one_target(self) -> "PruneParams":
        if self.macs is not None and self.params is not None:
            raise ValueError("give one budget, 'macs' or 'params', not both")
        if self.macs is None and self.params is None:
            self.macs = 0.5
        return self


@STEP_PARAMS.register("distill")
class DistillParams(StepParams):
    teacher: Optional[str] = Field(None, description="zoo model to learn from (default: the fp32 baseline)")
    teacher_weights: Optional[str] = Field(None, description="state dict for the named teacher (skips its training)")
    teacher_epochs: float = Field(4, gt=0, le=10_000, allow_inf_nan=False,
                                  description="training of a named teacher on the task")
    teacher_lr: Optional[float] = Field(None, gt=0, le=10, allow_inf_nan=False,
                                        description="default: the teacher's zoo training lr, else 1e-2")
    epochs: float = Field(2, gt=0, le=10_000, allow_inf_nan=False)
    lr: Optional[float] = Field(None, gt=0, le=10, allow_inf_nan=False,
                                description="default: the student's training lr, at most 3e-3")
    temperature: float = Field(4.0, gt=0, le=1000, allow_inf_nan=False)
    alpha: float = Field(0.7, ge=0, le=1, allow_inf_nan=False,
                         description="weight of the soft-target loss (1 - alpha: labels)")
    feature_weight: float = Field(0.0, ge=0, le=1000, allow_inf_nan=False,
                                  description="weight of the pooled last-stage feature MSE (0: off)")
    batch_size: int = Field(64, ge=1, le=65_536)
    evaluate: bool = Field(True, description="record accuracy and teacher agreement before and after")

    @field_validator("teacher")
    @classmethod
    def _in_zoo(cls, v: Optional[str]) -> Optional[str]:
        from ..zoo.index import all_names

        if v is None or v.lower() in all_names():  # the zoo's torch-free index answers for the built-in models
            return v
        from ..zoo.registry import MODELS  # a model registered by user code

        if v not in MODELS:
            names = [s for s, _ in MODELS.items()]
            raise ValueError(f"{v!r} is not a zoo model.{did_you_mean(v, names)} Known: {', '.join(sorted(names))}")
        return v

    @model_validator(mode="after")
    def _weights_need_teacher(self) -> "DistillParams":
        if self.teacher_weights is not None:
            if self.teacher is None:
                raise ValueError("'teacher_weights' needs 'teacher' (the zoo model they belong to)")
            if not Path(self.teacher_weights).expanduser().is_file():
                raise ValueError(f"teacher_weights file not found: {self.teacher_weights}")
        return self


@STEP_PARAMS.register("svd")
class SVDParams(StepParams):
    energy: Optional[float] = Field(None, gt=0, lt=1, allow_inf_nan=False,
                                    description="share of squared singular values kept per layer")
    macs: Optional[float] = Field(None, gt=0, lt=1, allow_inf_nan=False,
                                  description="fraction of the model's MACs to keep")
    round_to: Optional[int] = Field(None, ge=1, le=1024,
                                    description="ranks are multiples of this (default: device prune_round_to)")
    layers: List[Literal["pointwise", "spatial", "linear"]] = Field(
        default_factory=lambda: list(KINDS), description="which layers may be factorized")
    ignore: List[str] = Field(default_factory=list, description="layer names or patterns left alone")
    min_saving: float = Field(0.1, ge=0, lt=1, allow_inf_nan=False,
                              description="factorize a layer only if it saves this share of its MACs")

    @model_validator(mode="after")
    def _one_target(self) -> "SVDParams":
        if self.energy is not None and self.macs is not None:
            raise ValueError("give one rank rule, 'energy' or 'macs', not both")
        if self.energy is None and self.macs is None:
            self.energy = 0.9
        return self


@STEP_PARAMS.register("qat")
class QatParams(StepParams):
    epochs: float = Field(1, gt=0, le=10_000, allow_inf_nan=False)
    lr: Optional[float] = Field(None, gt=0, le=10, allow_inf_nan=False,
                                description="default: a tenth of the fine-tune lr (the model's training lr, at most "
                                            "3e-3)")
    teacher: Literal["baseline", "none"] = Field(
        "baseline", description="baseline: distil from the fp32 model the recipe started from; none: labels only")
    alpha: float = Field(1.0, ge=0, le=1, allow_inf_nan=False,
                         description="weight of the soft-target loss from the teacher (1 - alpha: labels)")
    temperature: float = Field(4.0, gt=0, le=1000, allow_inf_nan=False)
    num_calib: int = Field(256, ge=1, le=100_000, description="calibration images that set the initial ranges")
    batch_size: int = Field(64, ge=1, le=65_536)
    int8_logits: bool = Field(False, description="quantize the logits too (default: float logits from int8 "
                                                 "weights and input, as the ONNX int8 export keeps them)")
    evaluate: bool = Field(True, description="record accuracy and agreement with the fp32 baseline before and after")
