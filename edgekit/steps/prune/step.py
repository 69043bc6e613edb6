"""The registered ``prune`` step: its pydantic parameters and the schedule (blocks, then channels in
``iterations`` steps, each checked, then fine-tuned or BatchNorm-recalibrated), with facts for the report."""

from __future__ import annotations

import copy
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import EdgekitError
from ..common import (default_lr, detection_outputs, example_shape, find_classifier, output_layer, record,
                      resolve_ignored)
from ..params import PruneParams
from ..registry import Step, StepContext, register_step
from .check import find_bad_groups
from .graph import _ghost_ignored, adapter_for, collect_candidates
from .plan import _metric, plan, prune_to


def _taylor_gradients(model: nn.Module, task, batches: int, seed: int) -> None:
    """Leave the gradients of a few training batches in ``model``: the taylor criterion reads them."""
    if task is None:
        raise EdgekitError("prune: the taylor criterion needs a task (labelled batches for gradients)")
    model.eval()
    model.zero_grad(set_to_none=True)
    detector = detection_outputs(model) is not None
    for i, (xb, yb) in enumerate(task.loader("train", batch_size=64, shuffle=True, seed=seed)):
        if i >= batches:
            break
        (model.loss(xb, yb)["loss"] if detector else F.cross_entropy(model(xb), yb)).backward()


def layer_widths(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    """(in, out) channels of every conv/linear, by name: the report counts the layers that changed."""
    return {n: ((m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features))
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@register_step
class Prune(Step):
    """Structured channel pruning to a MACs or parameter budget (Torch-Pruning DepGraph)."""

    name = "prune"
    Params = PruneParams

    def apply(self, model: nn.Module, ctx: StepContext) -> nn.Module:
        import torch_pruning as tp

        from ...detect.train import fit_detector
        from ...train import FitConfig, fit, recalibrate_bn
        from ...zoo import count_macs, count_params

        p: PruneParams = self.params
        kind = "macs" if p.macs is not None else "params"
        keep = p.macs if p.macs is not None else p.params
        round_to = p.round_to or getattr(ctx.device, "prune_round_to", None) or 8
        shape = tuple(ctx.task.input_shape) if ctx.task is not None else (1,) + example_shape(model)
        torch.manual_seed(ctx.seed)
        x = torch.randn(shape)
        model = model.eval()
        adapter = adapter_for(model)
        before = {"macs": count_macs(model, shape[1:]), "params": count_params(model)}
        widths_before = layer_widths(model)
        base = before[kind]
        log, fallbacks, reached, rejected, unprunable = [], 0, True, set(), False
        depth_info = None
        if p.blocks > 0:  # on a copy: the caller's model (often the teacher) stays whole
            model = copy.deepcopy(model)
            depth_info = self._remove_blocks(model, ctx, kind, int(base * keep), shape)
        for it in range(1, p.iterations + 1):
            target = base * keep ** (it / p.iterations)
            heads = detection_outputs(model)  # a detector's prediction convs keep their channels
            clf = find_classifier(model, ctx.model_name) if heads is None else None
            names = {id(m): n for n, m in model.named_modules()}
            probe = names.get(id(clf)) if clf is not None else None
            ignored = (heads or ([output_layer(clf)] if clf is not None else [])) + resolve_ignored(model, p.ignore) \
                + _ghost_ignored(model)
            if p.criterion == "taylor":
                _taylor_gradients(model, ctx.task, p.taylor_batches, ctx.seed + it)
            cands, nf = collect_candidates(model, adapter, x, ignored, p.criterion)
            model.zero_grad(set_to_none=True)
            fallbacks += nf
            # Keep only groups whose pruning computes what the model computes with those channels zeroed.
            by_root = {c.root: c for c in cands}
            bad = find_bad_groups(model, by_root, x, plan(cands, 1.0, "per-layer", round_to, p.max_layer_ratio),
                                  round_to, probe)
            for _attempt in range(3):
                rejected.update(bad)
                cands = [c for c in cands if c.root not in bad]
                pruned, value, ok, level, final = prune_to(model, target, kind, x, cands, p.scope, round_to,
                                                           p.max_layer_ratio)
                bad = find_bad_groups(model, by_root, x, final, round_to, probe)
                if not bad:
                    break
            else:
                raise EdgekitError(f"prune: {ctx.model_name}: pruned models keep failing the dependency check")
            if not cands:
                unprunable = True
            model = pruned
            reached = reached and ok
            step_log = {"iteration": it, "target": int(target), kind: int(value), "level": round(level, 4)}
            if ctx.task is not None:
                if p.finetune_epochs > 0:
                    lr = p.finetune_lr or default_lr(ctx.model_name)
                    cfg = FitConfig(epochs=p.finetune_epochs, lr=lr, seed=ctx.seed + it, alpha=p.finetune_alpha,
                                    device=ctx.train_device)
                    train = fit if heads is None else fit_detector
                    train(model, ctx.task, cfg, teacher=ctx.baseline if p.finetune_alpha > 0 else None,
                          description=f"prune fine-tune {it}/{p.iterations}")
                    step_log["finetune_epochs"] = p.finetune_epochs
                elif p.recalibrate:
                    recalibrate_bn(model, ctx.task, seed=ctx.seed)
            log.append(step_log)
        model.eval()
        after = {"macs": count_macs(model, shape[1:]), "params": count_params(model)}
        widths_after = layer_widths(model)
        changed = sum(1 for n, w in widths_after.items() if widths_before.get(n) != w)
        info = {
            "method": adapter.method, "adapter": adapter.name, "criterion": p.criterion, "scope": p.scope,
            "target": {kind: keep}, "reached": reached, "round_to": round_to, "iterations": log,
            "macs_before": before["macs"], "macs_after": after["macs"],
            "params_before": before["params"], "params_after": after["params"],
            "macs_ratio": round(after["macs"] / before["macs"], 4),
            "params_ratio": round(after["params"] / before["params"], 4),
            "layers_changed": changed, "torch_pruning": tp.__version__,
            "groups_rejected": sorted(rejected),
        }
        if depth_info is not None:
            info["blocks"] = depth_info
        if fallbacks:
            info["criterion_fallbacks"] = fallbacks
            ctx.notes.append(f"prune: {fallbacks} channel group(s) had no usable {p.criterion} score "
                             "(no BatchNorm, or a concatenation Torch-Pruning mis-maps) and were ranked by l2 magnitude")
        if rejected:
            ctx.notes.append(f"prune: {len(rejected)} channel group(s) left whole: pruning them did not compute what "
                             "the model computes with those channels zeroed (an op Torch-Pruning maps wrongly)")
        if unprunable:
            info["prunable_groups"] = 0
            ctx.notes.append(f"prune: no channel group of {ctx.model_name} can be pruned safely (its layers are "
                             "custom modules Torch-Pruning cannot follow, sealed and kept whole, or every group "
                             "failed the dependency check); register a pruner for them in "
                             "edgekit.steps.prune.CUSTOM_PRUNERS, or use the svd step")
        if not reached:
            ctx.notes.append(f"prune: {ctx.model_name} could only be pruned to "
                             f"{after[kind] / before[kind]:.0%} of its {kind} (asked {keep:.0%}); "
                             f"method: {adapter.method}")
        ctx.notes.append(f"prune: {kind} {keep:.0%} target -> MACs {after['macs'] / before['macs']:.1%}, "
                         f"params {after['params'] / before['params']:.1%} ({adapter.name}, {p.criterion}, "
                         f"{p.scope}, round_to {round_to})")
        record(ctx, self.name, info)
        return model

    def _remove_blocks(self, model: nn.Module, ctx: StepContext, kind: str, floor: int, shape) -> dict:
        """Depth pruning (``edgekit.steps.depth``), in place, before the channel pruning."""
        from .. import depth

        p: PruneParams = self.params
        if ctx.task is not None:
            xb, _ = next(iter(ctx.task.loader("train", batch_size=p.block_samples, shuffle=True, seed=ctx.seed)))
        else:
            xb = torch.randn((min(p.block_samples, 64),) + tuple(shape[1:]))
        heads = detection_outputs(model)
        clf = find_classifier(model, ctx.model_name) if heads is None else None
        keep = (heads or ([clf] if clf is not None else [])) + resolve_ignored(model, p.ignore)
        blocks = depth.removable_blocks(model, xb[:2], keep)
        count = int(round(p.blocks * len(blocks)))
        chosen = depth.select_blocks(model, blocks, count, xb, lambda m: _metric(kind, m, shape[1:]), floor)
        depth.remove(model, [b.name for b, _ in chosen])
        info = {"removable": len(blocks), "asked": count, "removed": [b.name for b, _ in chosen],
                "kinds": sorted({b.kind for b, _ in chosen}), "kl_after": [round(kl, 5) for _, kl in chosen],
                "ranked_on": "task train images" if ctx.task is not None else "random inputs"}
        if not blocks:
            ctx.notes.append(f"prune: {ctx.model_name} has no block that can be removed (no residual block or "
                             "ShuffleNetV2 stride-1 unit); 'blocks' did nothing, channels alone meet the budget")
        else:
            ctx.notes.append(f"prune: removed {len(chosen)} of {len(blocks)} removable blocks "
                             f"({', '.join(info['removed']) or 'none'}), least harmful first"
                             + ("" if len(chosen) == count else
                                f"; stopped at {len(chosen)} of {count}: one more would take it below the {kind} "
                                "budget"))
        return info
