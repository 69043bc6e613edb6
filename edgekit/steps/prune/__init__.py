"""Structured channel pruning with Torch-Pruning's dependency graph (DepGraph, Fang et al., CVPR 2023).

Torch-Pruning finds which layers must lose the same channels (a *group*: a
convolution's outputs, its BatchNorm, the depthwise convolution after it, the
inputs of the next layers, residual partners, squeeze-excitation convolutions,
concatenations...) and scores channels (l1, l2, BN scale, Taylor). edgekit
builds the graph once, records each group's per-layer pruning operations, and
plans the channels itself so that it can

- aim at a MACs or parameter budget (``macs: 0.5`` keeps half the MACs): the
  pruning level is found by bisection, each trial replaying the recorded
  operations (and undoing them) instead of re-tracing the model;
- keep every pruned layer's width a multiple of ``round_to`` (the device
  profile's ``prune_round_to``), group members included: a Ghost module's
  channel and its depthwise copy (``j`` and ``j + n/2`` of the concatenation)
  are one unit;
- check the graph: a group is pruned only if the pruned model computes what the
  unpruned one computes with those channels zeroed. Ops Torch-Pruning maps
  wrongly (channel permutations such as ShuffleNetV1's or IGCV3's shuffles,
  gathers) fail that check and their groups stay whole;
- seal what it cannot follow: custom modules with their own weights, or whose
  layers are called with a weight passed in (BN folded on the fly), are traced
  as boxes and kept whole (``CUSTOM_PRUNERS`` takes pruners for such types);
- trace parts of a network when the whole cannot be traced. ShuffleNetV2's
  channel shuffle makes Torch-Pruning's reshape index mapping divide by zero
  (upstream issue #14). There the inner channels of each block's ``branch2``
  (1x1 -> dw3x3 -> 1x1) and the ``conv5`` channels are pruned, each part traced
  on its own, and block inputs and outputs keep their widths (``ADAPTERS``).

With ``blocks`` the step first removes whole blocks (``edgekit.steps.depth``:
residual blocks and ShuffleNetV2 stride-1 units, least harmful first), then prunes
channels for the rest of the budget: at small inputs a block's fixed per-kernel
costs are a large part of its latency, and thinning channels keeps them all.

An iterative schedule (``iterations``) reaches the budget in geometric steps,
each followed by a short fine-tune (``edgekit.train.fit``; BatchNorm statistics
are re-estimated) or, with ``finetune_epochs: 0``, by BatchNorm recalibration only.

Modules: ``step`` (the registered step and its parameters), ``graph`` (adapters,
tracing, groups), ``plan`` (how much to prune where), ``check`` (the dependency
check). Helpers other steps share live in ``edgekit.steps.common``.
"""

from ..common import CUSTOM_PRUNERS
from .check import check_plan, find_bad_groups
from .graph import ADAPTERS, DEFAULT_ADAPTER, Adapter, Candidate, Op, Scope, adapter_for, collect_candidates
from .plan import apply_plan, prune_to  # the function ``plan`` stays in ``.plan``: the module keeps its name
from .step import Prune, PruneParams, layer_widths

__all__ = [
    "ADAPTERS", "CUSTOM_PRUNERS", "DEFAULT_ADAPTER", "Adapter", "Candidate", "Op", "Prune", "PruneParams", "Scope",
    "adapter_for", "apply_plan", "check_plan", "collect_candidates", "find_bad_groups", "layer_widths", "prune_to",
]
