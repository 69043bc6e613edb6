"""Structured channel pruning with Torch-Pruning's dependency graph (DepGraph, Fang et al., CVPR 2023).

Torch-Pruning finds which layers must lose the same channels (a *group*: a
convolution's outputs, its BatchNorm, the depthwise convolution after it, the
inputs of the next layers, residual partners, squeeze-excitation convolutions,
concatenations...). edgekit uses its graph and its importance criteria, and
plans the channels itself so that it can

- aim at a MACs or parameter budget (``macs: 0.5`` keeps half the MACs): the
  pruning level is found by bisection over trial prunings of copies;
- keep every pruned layer's channel count a multiple of ``round_to`` (the
  device profile's ``prune_round_to``), group members included (Ghost modules
  concatenate a convolution with its depthwise copy, so one root channel is two
  output channels: groups whose members cannot be rounded are left alone);
- trace parts of a network when the whole cannot be traced. ShuffleNetV2's
  channel shuffle (``view -> transpose -> view``) makes Torch-Pruning's reshape
  index mapping divide by zero (upstream issue #14). There the inner channels
  of each block's ``branch2`` (1x1 -> dw3x3 -> 1x1) and the ``conv5`` channels
  are pruned, each part traced on its own, and block inputs and outputs keep
  their widths.

An iterative schedule (``iterations``) reaches the budget in geometric steps,
each followed by a short fine-tune (``edgekit.train.fit``; BatchNorm statistics
are re-estimated) or, with ``finetune_epochs: 0``, by BatchNorm recalibration only.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..errors import EdgekitError
from .steps import Step, StepContext, StepParams, register_step

CRITERIA = ("l1", "l2", "bn_scale", "taylor")


class PruneParams(StepParams):
    macs: Optional[float] = Field(None, gt=0, lt=1, description="fraction of the MACs to keep (0.5: half)")
    params: Optional[float] = Field(None, gt=0, lt=1, description="fraction of the parameters to keep")
    scope: Literal["global", "per-layer"] = Field(
        "global", description="global: rank channels of all layers together; per-layer: the same share in each")
    criterion: Literal["l1", "l2", "bn_scale", "taylor"] = "l2"
    iterations: int = Field(1, ge=1, le=20, description="prune in this many steps, fine-tuning after each")
    finetune_epochs: float = Field(1.0, ge=0, description="fine-tune after each iteration (0: BN recalibration only)")
    finetune_lr: Optional[float] = Field(None, gt=0, description="default: the model's training lr, at most 3e-3")
    finetune_alpha: float = Field(0.0, ge=0, le=1, description="weight of distillation from the baseline in fine-tunes")
    round_to: Optional[int] = Field(None, ge=1, description="default: the device profile's prune_round_to")
    ignore: List[str] = Field(default_factory=list, description="layer names or patterns whose outputs stay")
    max_layer_ratio: float = Field(0.9, gt=0, lt=1, description="at most this share of one layer's channels goes")
    taylor_batches: int = Field(4, ge=1, description="training batches whose gradients the taylor criterion uses")
    recalibrate: bool = True

    @model_validator(mode="after")
    def _one_target(self) -> "PruneParams":
        if self.macs is not None and self.params is not None:
            raise ValueError("give one budget, 'macs' or 'params', not both")
        if self.macs is None and self.params is None:
            self.macs = 0.5
        return self


# ----------------------------------------------------------------------------- what is traced


@dataclass
class Scope:
    """A part of the model that Torch-Pruning traces on its own.

    ``module`` is traced with, as example input, what ``input_of`` receives in a
    forward pass of the whole model; layers in ``ignored`` keep their output channels.
    """

    module: nn.Module
    input_of: nn.Module
    ignored: List[nn.Module] = field(default_factory=list)


@dataclass
class Adapter:
    name: str
    method: str
    matches: Callable[[nn.Module], bool]
    scopes: Callable[[nn.Module], List[Scope]]


def _convs_and_linears(module: nn.Module) -> List[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def output_layer(module: nn.Module) -> nn.Module:
    """The conv/linear that produces ``module``'s output (the last one inside a factorized Sequential)."""
    layers = _convs_and_linears(module)
    if not layers:
        return module
    return layers[-1]


def _whole_model(model: nn.Module) -> List[Scope]:
    return [Scope(model, model)]


class _GlobalMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean([2, 3])


def _is_shufflenetv2(model: nn.Module) -> bool:
    try:
        from torchvision.models.shufflenetv2 import InvertedResidual
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, InvertedResidual) for m in model.modules())


def _shufflenetv2_scopes(model: nn.Module) -> List[Scope]:
    from torchvision.models.shufflenetv2 import InvertedResidual, ShuffleNetV2

    scopes = [Scope(m.branch2, m.branch2, [output_layer(m.branch2[-3])])
              for m in model.modules() if isinstance(m, InvertedResidual)]
    if isinstance(model, ShuffleNetV2) and isinstance(model.fc, (nn.Linear, nn.Sequential)):
        # conv5 -> global mean -> fc, as ShuffleNetV2.forward computes it
        tail = nn.Sequential(model.conv5, _GlobalMean(), model.fc)
        scopes.append(Scope(tail, model.conv5))
    return scopes


DEFAULT_ADAPTER = Adapter("dependency-graph", "torch-pruning DepGraph on the whole model", lambda m: True,
                          _whole_model)

# Architectures Torch-Pruning cannot trace whole, checked in order before the default.
ADAPTERS: List[Adapter] = [
    Adapter("shufflenetv2-branches",
            "torch-pruning DepGraph per ShuffleNetV2 block: inner channels of branch2 (1x1 -> dw3x3 -> 1x1) "
            "and conv5; block input/output widths fixed (the channel shuffle breaks whole-model tracing, "
            "Torch-Pruning issue #14)",
            _is_shufflenetv2, _shufflenetv2_scopes),
]


def adapter_for(model: nn.Module) -> Adapter:
    for a in ADAPTERS:
        if a.matches(model):
            return a
    return DEFAULT_ADAPTER


def _ghost_modules(model: nn.Module) -> List[nn.Module]:
    """timm GhostModules: ``cat([primary(x), cheap(primary(x))])[:, :out_chs]``."""
    return [m for m in model.modules()
            if hasattr(m, "primary_conv") and hasattr(m, "cheap_operation") and hasattr(m, "out_chs")
            and isinstance(m.out_chs, int)]


def _ghost_width(m: nn.Module) -> int:
    return output_layer(m.primary_conv).out_channels + output_layer(m.cheap_operation).out_channels


def _ghost_ignored(model: nn.Module) -> List[nn.Module]:
    """Ghost modules whose output slice drops channels cannot be pruned (the slice would drop other channels)."""
    out = []
    for m in _ghost_modules(model):
        if m.out_chs != _ghost_width(m):
            out += _convs_and_linears(m)
    return out


def _sync_ghost_modules(model: nn.Module) -> None:
    for m in _ghost_modules(model):
        width = _ghost_width(m)
        if m.out_chs > width:  # pruned: the slice keeps every channel, as before pruning
            m.out_chs = width


# ----------------------------------------------------------------------------- helpers


def _classifier(model: nn.Module, model_name: Optional[str]) -> Optional[nn.Module]:
    from .. import zoo
    from ..zoo.registry import MODELS, _get_module

    if model_name and model_name in MODELS:
        try:
            return _get_module(model, zoo.get_spec(model_name).classifier)
        except (AttributeError, IndexError, TypeError):
            pass
    order: List[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod)) for m in _convs_and_linears(model)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *_example_shape(model)))
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else None


def _example_shape(model: nn.Module) -> Tuple[int, int, int]:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return (conv.in_channels if conv is not None else 3, 64, 64)


def resolve_ignored(model: nn.Module, patterns: Sequence[str], what: str = "prune") -> List[nn.Module]:
    """Modules named by ``patterns`` (exact names or fnmatch patterns), each with its sub-modules."""
    named = dict(model.named_modules())
    out: List[nn.Module] = []
    for pat in patterns:
        hits = [m for n, m in named.items() if n and (n == pat or fnmatch.fnmatchcase(n, pat))]
        if not hits:
            close = [n for n in named if n and pat.split(".")[0] in n][:3]
            hint = f" (layers named like it: {', '.join(close)})" if close else ""
            raise EdgekitError(f"{what}: 'ignore' pattern {pat!r} matches no layer of the model{hint}")
        for m in hits:
            out += list(m.modules())
    return out


def capture_inputs(model: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor) -> List[torch.Tensor]:
    """The first positional input each module receives in one forward pass of ``model``."""
    got: Dict[int, torch.Tensor] = {}
    hooks = []
    for m in {id(m): m for m in modules}.values():
        def pre(mod, args, _key=id(m)):
            if _key not in got:
                got[_key] = args[0].detach().clone()
        hooks.append(m.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    missing = [m for m in modules if id(m) not in got]
    if missing:  # pragma: no cover - an adapter naming a module that does not run
        raise EdgekitError(f"prune: {type(missing[0]).__name__} is not called in the model's forward pass")
    return [got[id(m)] for m in modules]


def _build_graphs(model: nn.Module, adapter: Adapter, x: torch.Tensor):
    import torch_pruning as tp

    scopes = adapter.scopes(model)
    inputs = capture_inputs(model, [s.input_of for s in scopes], x)
    graphs = []
    model.eval()
    for scope, inp in zip(scopes, inputs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dg = tp.DependencyGraph().build_dependency(scope.module, example_inputs=inp)
            except Exception as exc:
                raise EdgekitError(
                    f"prune: Torch-Pruning cannot trace {type(scope.module).__name__} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}). "
                    "Use the svd step, or add an adapter for this architecture to edgekit.compress.prune.ADAPTERS"
                ) from None
        graphs.append((scope, dg))
    return graphs


def _importance(criterion: str):
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
    }[criterion]()


def _channel_groups(dg, group) -> int:
    """>1 when a grouped (not depthwise) convolution ties channels in equal slices, as Torch-Pruning's pruner does."""
    n = 1
    for dep, _ in group:
        m = dep.target.module
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
            n = max(n, m.groups)
    return n


@dataclass
class Candidate:
    """One prunable channel group, named by its root layer (output channels of a conv/linear)."""

    root: str
    channels: int  # of the root layer
    importance: torch.Tensor  # per root channel, normalised to mean 1 within the group
    channel_groups: int = 1


def collect_candidates(model: nn.Module, adapter: Adapter, x: torch.Tensor, ignored: List[nn.Module],
                       criterion: str) -> Tuple[List[Candidate], int]:
    """Every group Torch-Pruning may prune, with importance; also how many fell back to the l2 criterion."""
    import torch_pruning as tp

    names = {id(m): n for n, m in model.named_modules()}
    imp, fallback = _importance(criterion), tp.importance.GroupMagnitudeImportance(p=2)
    roots = (nn.Conv2d, nn.Linear)
    ignored_ids = {id(m) for m in ignored}
    out, n_fallback = [], 0
    for scope, dg in _build_graphs(model, adapter, x):
        skip = [m for m in dg.module2node if id(m) in ignored_ids] + list(scope.ignored)
        for group in dg.get_all_groups(ignored_layers=skip, root_module_types=roots):
            root = group[0].dep.target.module
            if id(root) not in names:
                continue
            score = imp(group)
            if score is None or not torch.isfinite(score).all():
                score = fallback(group)  # e.g. bn_scale on a group without BatchNorm (SqueezeNet)
                n_fallback += 1
                if score is None or not torch.isfinite(score).all():
                    continue
            n = dg.get_out_channels(root)
            out.append(Candidate(names[id(root)], int(n), score.detach().float().cpu(), _channel_groups(dg, group)))
    return out, n_fallback


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
    """Root channel indices to remove per group at pruning ``level`` (0: none ... 1: as much as allowed)."""
    out: Dict[str, List[int]] = {}
    slices = []
    for c in cands:
        per = c.channels // c.channel_groups
        slices.append(c.importance.view(c.channel_groups, per).mean(0) if c.channel_groups > 1 else c.importance)
    thr = None
    if scope == "global" and slices:
        allimp = torch.cat(slices)
        thr = torch.quantile(allimp, min(max(level, 0.0), 1.0)) if level > 0 else None
    for c, imp in zip(cands, slices):
        per = len(imp)
        if level <= 0:
            continue
        want_drop = int((imp < thr).sum()) if scope == "global" else int(round(level * per))
        step = round_to // math.gcd(round_to, c.channel_groups)
        keep = _keep(per - want_drop, per, step, int(math.ceil(per * (1 - max_layer_ratio))))
        if keep >= per:
            continue
        order = torch.argsort(imp)[: per - keep]
        idxs = sorted(int(i) + g * per for g in range(c.channel_groups) for i in order)
        out[c.root] = idxs
    return out


def _group_ok(dg, group, round_to: int) -> bool:
    """Every layer losing output channels keeps a multiple of ``round_to`` (and at least one channel)."""
    if not dg.check_pruning_group(group):
        return False
    for dep, idxs in group:
        if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, (nn.Conv2d, nn.Linear)):
            n = dg.get_out_channels(dep.target.module)
            left = n - len(set(idxs))
            if left <= 0 or (round_to > 1 and left % round_to != 0):
                return False
    return True


def apply_plan(model: nn.Module, adapter: Adapter, x: torch.Tensor, plan_: Dict[str, List[int]],
               round_to: int) -> int:
    """Prune ``model`` in place; returns how many groups were pruned."""
    if not plan_:
        return 0
    names = {id(m): n for n, m in model.named_modules()}
    done = 0
    for _scope, dg in _build_graphs(model, adapter, x):
        for module in list(dg.module2node):
            name = names.get(id(module))
            if name not in plan_:
                continue
            pruner = dg.get_pruner_of_module(module)
            group = dg.get_pruning_group(module, pruner.prune_out_channels, list(plan_[name]))
            if _group_ok(dg, group, round_to):
                group.prune()
                done += 1
    _sync_ghost_modules(model)
    return done


# ----------------------------------------------------------------------------- the step


def _metric(kind: str, model: nn.Module, input_shape) -> int:
    from ..zoo import count_macs, count_params

    return count_macs(model, input_shape) if kind == "macs" else count_params(model)


def _taylor_gradients(model: nn.Module, task, batches: int, seed: int) -> None:
    if task is None:
        raise EdgekitError("prune: the taylor criterion needs a task (labelled batches for gradients)")
    model.eval()
    model.zero_grad(set_to_none=True)
    for i, (xb, yb) in enumerate(task.loader("train", batch_size=64, shuffle=True, seed=seed)):
        if i >= batches:
            break
        F.cross_entropy(model(xb), yb).backward()


def prune_to(model: nn.Module, target: float, kind: str, x: torch.Tensor, cands: List[Candidate],
             adapter: Adapter, scope: str, round_to: int, max_layer_ratio: float, search_steps: int = 14):
    """Bisect the pruning level so that ``kind`` (macs | params) falls to ``target`` or just below.

    Returns (pruned copy, its metric, whether the target was reached, level).
    """
    shape = tuple(x.shape[1:])
    cache: Dict[tuple, Tuple[nn.Module, int]] = {}

    def trial(level: float):
        p = plan(cands, level, scope, round_to, max_layer_ratio)
        key = tuple(sorted((k, len(v)) for k, v in p.items()))
        if key not in cache:
            m = copy.deepcopy(model)
            apply_plan(m, adapter, x, p, round_to)
            cache[key] = (m, _metric(kind, m, shape))
        return cache[key]

    hi_model, hi_val = trial(1.0)
    if hi_val > target:
        return hi_model, hi_val, False, 1.0
    lo, hi = 0.0, 1.0
    for _ in range(search_steps):
        mid = (lo + hi) / 2
        m, v = trial(mid)
        if v <= target:
            hi, hi_model, hi_val = mid, m, v
        else:
            lo = mid
    return hi_model, hi_val, True, hi


def layer_widths(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    return {n: ((m.in_channels, m.out_channels) if isinstance(m, nn.Conv2d) else (m.in_features, m.out_features))
            for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@register_step
class Prune(Step):
    """Structured channel pruning to a MACs or parameter budget (Torch-Pruning DepGraph)."""

    name = "prune"
    Params = PruneParams

    def apply(self, model: nn.Module, ctx: StepContext) -> nn.Module:
        import torch_pruning as tp

        from ..train import FitConfig, fit, recalibrate_bn
        from ..zoo import count_macs, count_params

        p: PruneParams = self.params
        kind = "macs" if p.macs is not None else "params"
        keep = p.macs if p.macs is not None else p.params
        round_to = p.round_to or getattr(ctx.device, "prune_round_to", None) or 8
        shape = tuple(ctx.task.input_shape) if ctx.task is not None else (1,) + _example_shape(model)
        torch.manual_seed(ctx.seed)
        x = torch.randn(shape)
        model = model.eval()
        adapter = adapter_for(model)
        before = {"macs": count_macs(model, shape[1:]), "params": count_params(model)}
        widths_before = layer_widths(model)
        base = before[kind]
        log, fallbacks, reached = [], 0, True
        for it in range(1, p.iterations + 1):
            target = base * keep ** (it / p.iterations)
            clf = _classifier(model, ctx.model_name)
            ignored = ([output_layer(clf)] if clf is not None else []) + resolve_ignored(model, p.ignore) \
                + _ghost_ignored(model)
            if p.criterion == "taylor":
                _taylor_gradients(model, ctx.task, p.taylor_batches, ctx.seed + it)
            cands, nf = collect_candidates(model, adapter, x, ignored, p.criterion)
            model.zero_grad(set_to_none=True)
            fallbacks += nf
            if not cands:
                raise EdgekitError(f"prune: no prunable channel group in {ctx.model_name} "
                                   "(every layer is ignored or fixed)")
            model, value, ok, level = prune_to(model, target, kind, x, cands, adapter, p.scope, round_to,
                                               p.max_layer_ratio)
            reached = reached and ok
            step_log = {"iteration": it, "target": int(target), kind: int(value), "level": round(level, 4)}
            if ctx.task is not None:
                if p.finetune_epochs > 0:
                    lr = p.finetune_lr or _default_lr(ctx.model_name)
                    cfg = FitConfig(epochs=p.finetune_epochs, lr=lr, seed=ctx.seed + it, alpha=p.finetune_alpha)
                    fit(model, ctx.task, cfg, teacher=ctx.baseline if p.finetune_alpha > 0 else None,
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
        }
        if fallbacks:
            info["criterion_fallbacks"] = fallbacks
            ctx.notes.append(f"prune: {fallbacks} channel group(s) had no {p.criterion} score "
                             "(no BatchNorm) and were ranked by l2 magnitude")
        if not reached:
            ctx.notes.append(f"prune: {ctx.model_name} could only be pruned to "
                             f"{after[kind] / before[kind]:.0%} of its {kind} (asked {keep:.0%}); "
                             f"method: {adapter.method}")
        ctx.notes.append(f"prune: {kind} {keep:.0%} target -> MACs {after['macs'] / before['macs']:.1%}, "
                         f"params {after['params'] / before['params']:.1%} ({adapter.name}, {p.criterion}, "
                         f"{p.scope}, round_to {round_to})")
        _record(ctx, self.name, info)
        return model


def _default_lr(model_name: Optional[str]) -> float:
    from ..zoo.registry import MODELS

    lr = 3e-3
    if model_name and model_name in MODELS:
        lr = min(lr, float(MODELS.get(model_name).train.get("lr", lr)))
    return lr


def _record(ctx: StepContext, key: str, info: dict) -> None:
    """Facts for report.json under the step's kind (a second step of the same kind gets ``kind#2``)."""
    k, i = key, 2
    while k in ctx.info:
        k, i = f"{key}#{i}", i + 1
    ctx.info[k] = info
