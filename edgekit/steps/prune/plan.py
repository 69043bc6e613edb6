"""How much to prune where: rank channel units, bisect the pruning level to the budget, replay the plan.

A plan maps each group's root layer to the root channels it loses. ``prune_to``
finds the level whose plan meets a MACs or parameter budget, trying each level
in place and undoing it (``_Scratch``) rather than copying the model.
"""

from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .graph import Candidate, Op, _ghost_modules, _sync_ghost_modules


def _keep(want: int, n: int, step: int, min_keep: int) -> int:
    """Channels kept per slice: ``want`` rounded to a multiple of ``step``, at least ``min_keep``, at most ``n``."""
    keep = max(want, min_keep)
    keep = int(round(keep / step)) * step
    if keep < min_keep:
        keep += step
    keep = max(keep, step)
    return n if keep >= n else keep


def plan(cands: List[Candidate], level: float, scope: str, round_to: int, max_layer_ratio: float
         ) -> Dict[str, List[int]]:
    """Root channel indices to remove per group at pruning ``level`` (0: none ... 1: as much as allowed).

    Units are single channels, slices of grouped convolutions or tied channels;
    the units kept per group are a multiple of ``round_to`` (over the channel groups).
    """
    out: Dict[str, List[int]] = {}
    if level <= 0 or not cands:
        return out
    units = [c.units() for c in cands]
    drops = None
    if scope == "global":
        # global rank of every unit (stable, so tied scores, e.g. the unit BN scales of a fresh model, still
        # give a drop count that grows smoothly with the level)
        allimp = torch.cat([u[0] for u in units])
        rank = torch.empty(len(allimp), dtype=torch.long)
        rank[torch.sort(allimp, stable=True).indices] = torch.arange(len(allimp))
        dropped = rank < int(round(min(level, 1.0) * len(allimp)))
        drops = [int(d.sum()) for d in torch.split(dropped, [len(u[0]) for u in units])]
    for i, (c, (imp, members)) in enumerate(zip(cands, units)):
        per = len(imp)
        want_drop = drops[i] if drops is not None else int(round(level * per))
        step = round_to // math.gcd(round_to, c.channel_groups)
        keep = _keep(per - want_drop, per, step, int(math.ceil(per * (1 - max_layer_ratio))))
        if keep >= per:
            continue
        order = torch.sort(imp, stable=True).indices[: per - keep]
        out[c.root] = sorted(i for u in order.tolist() for i in members[u])
    return out


def _widths(m: nn.Module) -> Optional[int]:
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return None


def _group_ok(model: nn.Module, ops: List[Op], roots: set, round_to: int) -> bool:
    """Every conv/linear losing output channels keeps a positive multiple of ``round_to``, and every
    grouped conv keeps input and output counts its groups divide (a mis-mapped dependency, e.g. through
    a channel shuffle whose neighbours were removed, can otherwise take a group an uneven share)."""
    for op in ops:
        if op.param:
            continue
        m = model.get_submodule(op.name)
        if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels:  # depthwise convs lose groups with channels
            n = m.out_channels if op.out else m.in_channels
            if (n - len(op.idxs(roots))) % m.groups != 0:
                return False
        if not op.out:
            continue
        n = _widths(m)
        if n is None:
            continue
        left = n - len(op.idxs(roots))
        if left <= 0 or (round_to > 1 and left % round_to != 0 and left != n):
            return False
    return True


def _run_op(model: nn.Module, op: Op, idxs: List[int]) -> None:
    pruner = op.handler.__self__
    pruner.pruning_dim = op.dim
    if op.param:
        parent_name, _, leaf = op.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, op.handler(getattr(parent, leaf), idxs))
    else:
        op.handler(model.get_submodule(op.name), idxs)


def apply_plan(model: nn.Module, cands: Dict[str, Candidate], plan_: Dict[str, List[int]], round_to: int
               ) -> List[str]:
    """Prune ``model`` in place by replaying each planned group's recorded layer operations.

    Groups share no channel dimension, so each group's indices stay valid whatever
    was pruned before it. Returns the roots of the groups pruned.
    """
    done = []
    for root, idxs in plan_.items():
        ops, roots = cands[root].ops, set(idxs)
        if not _group_ok(model, ops, roots, round_to):
            continue
        for op in ops:
            sel = op.idxs(roots)
            if sel:
                _run_op(model, op, sel)
        done.append(root)
    _sync_ghost_modules(model)
    return done


class _Scratch:
    """Undo in-place pruning or zeroing of some modules: far cheaper than deep-copying the model per check."""

    def __init__(self, model: nn.Module, names):
        self.saved = []
        for n in sorted(set(names)):
            m = model.get_submodule(n) if n else model
            tensors = {k: v.detach().clone() for k, v in [*m._parameters.items(), *m._buffers.items()]
                       if v is not None}
            self.saved.append((m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), tensors))

    def restore(self) -> None:
        for m, attrs, params, bufs, tensors in self.saved:
            m.__dict__.update(attrs)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(bufs)
            with torch.no_grad():
                for k, v in tensors.items():
                    (params[k] if k in params else bufs[k]).copy_(v)


def _touched(model: nn.Module, cands: Dict[str, Candidate], plan_: Dict[str, List[int]],
             probe: Optional[str]) -> List[str]:
    names = {op.name.rpartition(".")[0] if op.param else op.name for r in plan_ for op in cands[r].ops}
    mods = {id(m): n for n, m in model.named_modules()}
    names.update(mods[id(m)] for m in _ghost_modules(model))
    if probe:
        names.update(n for n, _ in model.named_modules() if n == probe or n.startswith(probe + "."))
    return list(names)


def _metric(kind: str, model: nn.Module, input_shape) -> int:
    from ...zoo import count_macs, count_params

    return count_macs(model, input_shape) if kind == "macs" else count_params(model)


def prune_to(model: nn.Module, target: float, kind: str, x: torch.Tensor, cands: List[Candidate],
             scope: str, round_to: int, max_layer_ratio: float, search_steps: int = 12):
    """Bisect the pruning level so that ``kind`` (macs | params) falls to ``target`` or just below.

    Returns (pruned copy, its metric, whether the target was reached, level, plan).
    """
    shape = tuple(x.shape[1:])
    by_root = {c.root: c for c in cands}
    cache: Dict[tuple, Tuple[int, dict]] = {}

    def trial(level: float):
        p = plan(cands, level, scope, round_to, max_layer_ratio)
        key = tuple(sorted((k, len(v)) for k, v in p.items()))
        if key not in cache:
            scratch = _Scratch(model, _touched(model, by_root, p, None))
            try:
                apply_plan(model, by_root, p, round_to)
                cache[key] = (_metric(kind, model, shape), p)
            finally:
                scratch.restore()
        return cache[key]

    def pruned(p):
        m = copy.deepcopy(model)
        apply_plan(m, by_root, p, round_to)
        return m.eval()

    hi_val, hi_plan = trial(1.0)
    if hi_val > target:
        return pruned(hi_plan), hi_val, False, 1.0, hi_plan
    lo, hi = 0.0, 1.0
    for _ in range(search_steps):
        mid = (lo + hi) / 2
        v, p = trial(mid)
        if v <= target:
            hi, hi_val, hi_plan = mid, v, p
        else:
            lo = mid
    return pruned(hi_plan), hi_val, True, hi, hi_plan
