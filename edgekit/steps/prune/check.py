"""Checks after pruning: a plan is kept only if the pruned model computes what the unpruned one
computes with the removed channels zeroed (the semantic check of a dependency graph)."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .graph import Candidate, Op, trace_input
from .plan import _group_ok, _Scratch, _touched, apply_plan


def _zero_channels(ref: nn.Module, ops: List[Op], roots: set) -> None:
    """In ``ref``, make the channels the group removes output exact zeros."""
    for op in ops:
        if not op.out or op.param:
            continue
        r = ref.get_submodule(op.name)
        idx = torch.as_tensor(op.idxs(roots), dtype=torch.long)
        if len(idx) == 0:
            continue
        with torch.no_grad():
            if isinstance(r, (nn.Conv2d, nn.Linear)):
                r.weight[idx] = 0
                if r.bias is not None:
                    r.bias[idx] = 0
            elif isinstance(r, nn.modules.batchnorm._BatchNorm):
                if r.affine:
                    r.weight[idx] = 0
                    r.bias[idx] = 0
                if r.running_mean is not None:
                    r.running_mean[idx] = 0


def _outputs(model: nn.Module, x: torch.Tensor, probe: Optional[str]) -> List[torch.Tensor]:
    """The logits, with the classifier's biases (``probe``) zeroed so that they show the features alone.

    (A freshly initialised deep network can have features far smaller than its classifier bias.)
    """
    if probe:
        with torch.no_grad():
            for m in model.get_submodule(probe).modules():
                if isinstance(getattr(m, "bias", None), torch.Tensor):
                    m.bias.zero_()
    with torch.no_grad():
        return [model.eval()(x)]


def _same(a: List[torch.Tensor], b: List[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if u.shape != v.shape or not torch.isfinite(v).all():
            return False
        scale = float(u.abs().max())
        if float((u - v).abs().max()) > 1e-3 * scale + 1e-30:
            return False
    return True


def check_plan(model: nn.Module, cands: Dict[str, Candidate], x: torch.Tensor, plan_: Dict[str, List[int]],
               round_to: int, probe: Optional[str]) -> bool:
    """Does pruning compute what the unpruned model computes with the removed channels zeroed?

    This is the semantic check of a dependency graph: a layer whose channels are
    mis-mapped (an unsupported reshape, gather or custom op) gives other outputs
    or fails to run. ``model`` is changed in place and restored.
    """
    x = trace_input(model, x)
    scratch = _Scratch(model, _touched(model, cands, plan_, probe))
    try:
        for root, idxs in plan_.items():
            ops, roots = cands[root].ops, set(idxs)
            if _group_ok(model, ops, roots, round_to):
                _zero_channels(model, ops, roots)
        ref = _outputs(model, x, probe)
        scratch.restore()
        apply_plan(model, cands, plan_, round_to)
        return _same(ref, _outputs(model, x, probe))
    except Exception:  # a mis-pruned layer that no longer runs
        return False
    finally:
        scratch.restore()


def find_bad_groups(model: nn.Module, cands: Dict[str, Candidate], x: torch.Tensor, plan_: Dict[str, List[int]],
                    round_to: int, probe: Optional[str]) -> List[str]:
    """Roots of planned groups whose pruning fails the check, by splitting the plan in halves."""
    keys = list(plan_)
    if not keys or check_plan(model, cands, x, plan_, round_to, probe):
        return []
    if len(keys) == 1:
        return keys
    half = len(keys) // 2
    bad = []
    for part in (keys[:half], keys[half:]):
        bad += find_bad_groups(model, cands, x, {k: plan_[k] for k in part}, round_to, probe)
    return bad or keys[half:]  # each half passes alone: drop the second half, to be safe
