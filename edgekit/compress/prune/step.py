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

With ``blocks`` the step first removes whole blocks (``edgekit.compress.depth``:
residual blocks and ShuffleNetV2 stride-1 units, least harmful first), then prunes
channels for the rest of the budget: at small inputs a block's fixed per-kernel
costs are a large part of its latency, and thinning channels keeps them all.

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

from ...errors import EdgekitError
from ..steps import Step, StepContext, StepParams, register_step


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
    from ... import zoo
    from ...zoo.registry import MODELS, _get_module

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


TRACE_SIZE = 32


def trace_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A small input for tracing (channel dependencies do not depend on the image size).

    Torch-Pruning's index mapping through reshapes grows with the spatial size
    (ChannelNet's channel-wise convolution reshapes to ``(C, H*W)``); 32x32 keeps
    it cheap. The full-size input is used when the model cannot run at 32x32.
    """
    if x.shape[-1] <= TRACE_SIZE and x.shape[-2] <= TRACE_SIZE:
        return x
    small = torch.randn(x.shape[0], x.shape[1], TRACE_SIZE, TRACE_SIZE, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model.eval()(small)
    except Exception:
        return x
    return small


# Torch-Pruning pruners for custom layer types (``tp.pruner.function.BasePruningFunc`` instances), one table:
# a type listed here is traced as a prunable layer instead of being sealed. Empty by default.
CUSTOM_PRUNERS: Dict[type, object] = {}

_STANDARD = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
             nn.modules.instancenorm._InstanceNorm, nn.PReLU, nn.Embedding)


def opaque_modules(model: nn.Module, x: torch.Tensor) -> List[nn.Module]:
    """Modules whose channels Torch-Pruning cannot follow; they are traced as sealed boxes and kept whole.

    - a module owning parameters itself that is not a standard layer (HetConv's 1x1 weight blocks);
    - the parent of a conv/linear called with extra arguments (a weight passed in, e.g. BN folded on the fly);
    - the parent of a parameterised layer that the forward pass never calls (that BN, used through its parent).
    """
    parent_of = {id(c): m for m in model.modules() for c in m.children()}
    called, extra = set(), set()

    def pre(mod, args, kwargs):
        called.add(id(mod))
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and (len(args) > 1 or kwargs):
            extra.add(id(mod))

    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    marked = {}
    for m in model.modules():
        if m is model:
            continue
        own = [p for p in m._parameters.values() if p is not None]
        if own and not isinstance(m, _STANDARD):
            marked[id(m)] = m
        has_params = any(p is not None for p in m._parameters.values())
        if (id(m) in extra or (has_params and id(m) not in called)) and id(m) in parent_of:
            parent = parent_of[id(m)]
            if parent is not model:
                marked[id(parent)] = parent
    # keep the outermost ones
    out = []
    for m in marked.values():
        if type(m) in CUSTOM_PRUNERS:
            continue
        a, inside = parent_of.get(id(m)), False
        while a is not None:
            if id(a) in marked:
                inside = True
                break
            a = parent_of.get(id(a))
        if not inside:
            out.append(m)
    return out


class _Link(torch.autograd.Function):
    """``y`` with a gradient edge from ``x``: what Torch-Pruning sees of a sealed box."""

    @staticmethod
    def forward(ctx, x, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - only traced, never differentiated
        return None, g


def _barrier_pruner(shapes: Dict[int, Tuple[int, int]]):
    import torch_pruning as tp

    class Sealed(tp.pruner.function.BasePruningFunc):
        """A sealed box: its widths are known, it is never pruned (groups touching it are dropped)."""

        def prune_out_channels(self, layer, idxs):
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer):
            return shapes[id(layer)][1]

        def get_in_channels(self, layer):
            return shapes[id(layer)][0]

    return Sealed()


def _build_graphs(model: nn.Module, adapter: Adapter, x: torch.Tensor):
    """Torch-Pruning graphs of the adapter's scopes, with opaque modules sealed; also the sealed modules."""
    import torch_pruning as tp

    x = trace_input(model, x)
    scopes = adapter.scopes(model)
    sealed = opaque_modules(model, x)
    shapes: Dict[int, Tuple[int, int]] = {}
    patched = []
    if sealed:
        def widths(mod, a, o):
            shapes.setdefault(id(mod), (a[0].shape[1], o.shape[1]))

        hooks = [m.register_forward_hook(widths) for m in sealed]
        with torch.no_grad():
            model.eval()(x)
        for h in hooks:
            h.remove()
        for m in sealed:
            def fwd(inp, *a, _orig=m.forward, **k):
                with torch.no_grad():
                    y = _orig(inp, *a, **k)
                return _Link.apply(inp, y)
            m.forward = fwd
            patched.append(m)
    custom = {**CUSTOM_PRUNERS, **{type(m): _barrier_pruner(shapes) for m in sealed}}
    graphs = []
    try:
        inputs = capture_inputs(model, [s.input_of for s in scopes], x)
        model.eval()
        for scope, inp in zip(scopes, inputs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    dg = tp.DependencyGraph().build_dependency(scope.module, example_inputs=inp,
                                                               customized_pruners=custom or None)
                except Exception as exc:
                    raise EdgekitError(
                        f"prune: Torch-Pruning cannot trace {type(scope.module).__name__} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}). "
                        "Use the svd step, or add an adapter for this architecture to edgekit.compress.prune.ADAPTERS"
                    ) from None
            graphs.append((scope, dg))
    finally:
        for m in patched:
            del m.forward  # back to the class's forward
    return graphs, sealed


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
class Op:
    """One layer's share of a group, recorded from the dependency graph so that it can be replayed on copies.

    ``pairs`` holds ``(index in this layer, root channel)`` for every channel of the group.
    """

    name: str  # module (or, with ``param``, parameter) name in the model
    handler: Callable  # Torch-Pruning's pruning function for this layer and dimension
    dim: int
    out: bool  # prunes output channels
    param: bool
    pairs: List[Tuple[int, int]]

    def idxs(self, roots: set) -> List[int]:
        return sorted({i for i, r in self.pairs if r in roots})


def _record_ops(dg, group, names: Dict[int, str]) -> Optional[List[Op]]:
    """The group's layers with their index mapping; None when a mapping lost its root channel."""
    import torch_pruning as tp

    ops = []
    for k, (dep, idxs) in enumerate(group):
        target = dep.target
        if target.type == tp.ops.OPTYPE.PARAMETER:
            name, param = dg._param_to_name.get(target.module), True
        else:
            name, param = names.get(id(target.module)), False
        if name is None:  # Torch-Pruning's own bookkeeping nodes (concat, split, reshape, elementwise)
            continue
        roots = getattr(group[k], "root_idxs", None)
        if roots is None or len(roots) != len(idxs):
            return None
        pairs = list(zip((int(i) for i in idxs), roots))
        if any(r is None for _, r in pairs):
            return None
        ops.append(Op(name, dep.handler, target.pruning_dim, dg.is_out_channel_pruning_fn(dep.handler), param,
                      [(i, int(r)) for i, r in pairs]))
    return ops


@dataclass
class Candidate:
    """One prunable channel group, named by its root layer (output channels of a conv/linear).

    ``classes``: root channels that can only go together (a Ghost module's channel
    and its depthwise copy sit at ``j`` and ``j + n/2`` of the concatenation);
    None when every root channel stands alone.
    """

    root: str
    channels: int  # of the root layer
    importance: torch.Tensor  # per root channel, normalised to mean 1 within the group
    ops: List["Op"]
    channel_groups: int = 1
    classes: Optional[List[List[int]]] = None

    def units(self) -> Tuple[torch.Tensor, List[List[int]]]:
        """Importance per pruning unit and the root channels of each unit."""
        if self.classes is not None:
            return torch.stack([self.importance[c].mean() for c in self.classes]), self.classes
        per = self.channels // self.channel_groups
        imp = self.importance.view(self.channel_groups, per).mean(0) if self.channel_groups > 1 else self.importance
        return imp, [[i + g * per for g in range(self.channel_groups)] for i in range(per)]


def _tied_root_channels(dg, group, root: nn.Module, n: int) -> Optional[List[List[int]]]:
    """Classes of root channels that Torch-Pruning's closure removes together, when members differ in width."""
    widths = {dg.get_out_channels(dep.target.module) for dep, _ in group
              if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, (nn.Conv2d, nn.Linear))}
    if widths <= {n}:
        return None
    fn = dg.get_pruner_of_module(root).prune_out_channels

    def tied(j: int) -> List[int]:
        out = {j}
        for dep, idxs in dg.get_pruning_group(root, fn, [j]):
            if dep.target.module is root and dg.is_out_channel_pruning_fn(dep.handler):
                out.update(int(i) for i in idxs if 0 <= int(i) < n)
        return sorted(out)

    # Usually channel j is tied to j + k*d (a concatenation of equal parts): guess from channel 0,
    # check on a few others, and probe every channel only when the guess fails.
    first = tied(0)
    offsets = [i - first[0] for i in first]
    period = offsets[1] if len(offsets) > 1 else 0
    if period > 0 and n % len(offsets) == 0 and period * len(offsets) == n and offsets == [k * period for k in range(len(offsets))]:
        probes = sorted({period - 1, period // 2, 1 % period})
        if all(tied(j) == [j + k * period for k in range(len(offsets))] for j in probes):
            return [[j + k * period for k in range(len(offsets))] for j in range(period)]
    owner = [-1] * n
    classes: List[List[int]] = []
    for j in range(n):
        if owner[j] >= 0:
            continue
        members = [i for i in tied(j) if owner[i] < 0]
        for i in members:
            owner[i] = len(classes)
        classes.append(members)
    return classes if len(classes) < n else None


def _score(imp, group, n: int) -> Optional[torch.Tensor]:
    """A finite importance per root channel, or None when the criterion has none for this group.

    Torch-Pruning's BN-scale and Taylor scores mis-map some concatenations (a
    Ghost module's depthwise copy gets twice its channels or an index past the
    end); such groups are scored by the fallback instead.
    """
    try:
        score = imp(group)
    except Exception:  # e.g. Torch-Pruning reading the gradient of a layer the loss did not reach
        return None
    if score is None or score.numel() != n or not torch.isfinite(score).all():
        return None
    return score


def collect_candidates(model: nn.Module, adapter: Adapter, x: torch.Tensor, ignored: List[nn.Module],
                       criterion: str) -> Tuple[List[Candidate], int]:
    """Every group Torch-Pruning may prune, with importance; also how many fell back to the l2 criterion."""
    import torch_pruning as tp

    names = {id(m): n for n, m in model.named_modules()}
    imp, fallback = _importance(criterion), tp.importance.GroupMagnitudeImportance(p=2)
    roots = (nn.Conv2d, nn.Linear)
    ignored_ids = {id(m) for m in ignored}
    out, n_fallback = [], 0
    graphs, sealed = _build_graphs(model, adapter, x)
    sealed_ids = {id(m) for m in sealed}
    for scope, dg in graphs:
        skip = [m for m in dg.module2node if id(m) in ignored_ids] + list(scope.ignored)
        for group in dg.get_all_groups(ignored_layers=skip, root_module_types=roots):
            root = group[0].dep.target.module
            if id(root) not in names or any(id(dep.target.module) in sealed_ids for dep, _ in group):
                continue
            n = int(dg.get_out_channels(root))
            score = _score(imp, group, n)
            if score is None:  # e.g. bn_scale on a group without BatchNorm (SqueezeNet)
                score = _score(fallback, group, n)
                n_fallback += 1
                if score is None:
                    continue
            ops = _record_ops(dg, group, names)
            if ops is None:
                continue
            classes = _tied_root_channels(dg, group, root, n)
            out.append(Candidate(names[id(root)], n, score.detach().float().cpu(), ops,
                                 1 if classes else _channel_groups(dg, group), classes))
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


# ----------------------------------------------------------------------------- the step


def _metric(kind: str, model: nn.Module, input_shape) -> int:
    from ...zoo import count_macs, count_params

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

        from ...train import FitConfig, fit, recalibrate_bn
        from ...zoo import count_macs, count_params

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
        log, fallbacks, reached, rejected, unprunable = [], 0, True, set(), False
        depth_info = None
        if p.blocks > 0:  # on a copy: the caller's model (often the teacher) stays whole
            model = copy.deepcopy(model)
            depth_info = self._remove_blocks(model, ctx, kind, int(base * keep), shape)
        for it in range(1, p.iterations + 1):
            target = base * keep ** (it / p.iterations)
            clf = _classifier(model, ctx.model_name)
            names = {id(m): n for n, m in model.named_modules()}
            probe = names.get(id(clf)) if clf is not None else None
            ignored = ([output_layer(clf)] if clf is not None else []) + resolve_ignored(model, p.ignore) \
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
                             "edgekit.compress.prune.CUSTOM_PRUNERS, or use the svd step")
        if not reached:
            ctx.notes.append(f"prune: {ctx.model_name} could only be pruned to "
                             f"{after[kind] / before[kind]:.0%} of its {kind} (asked {keep:.0%}); "
                             f"method: {adapter.method}")
        ctx.notes.append(f"prune: {kind} {keep:.0%} target -> MACs {after['macs'] / before['macs']:.1%}, "
                         f"params {after['params'] / before['params']:.1%} ({adapter.name}, {p.criterion}, "
                         f"{p.scope}, round_to {round_to})")
        _record(ctx, self.name, info)
        return model

    def _remove_blocks(self, model: nn.Module, ctx: StepContext, kind: str, floor: int, shape) -> dict:
        """Depth pruning (``edgekit.compress.depth``), in place, before the channel pruning."""
        from .. import depth

        p: PruneParams = self.params
        if ctx.task is not None:
            xb, _ = next(iter(ctx.task.loader("train", batch_size=p.block_samples, shuffle=True, seed=ctx.seed)))
        else:
            xb = torch.randn((min(p.block_samples, 64),) + tuple(shape[1:]))
        clf = _classifier(model, ctx.model_name)
        keep = ([clf] if clf is not None else []) + resolve_ignored(model, p.ignore)
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


def _default_lr(model_name: Optional[str]) -> float:
    from ...zoo.registry import MODELS

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
