"""Which layers lose channels together: architecture adapters and Torch-Pruning dependency graphs.

An ``Adapter`` says what to trace (the whole model, or parts of it when the whole
cannot be traced); ``collect_candidates`` builds the graphs, seals what Torch-Pruning
cannot follow, and records every prunable group as a ``Candidate`` whose per-layer
``Op``s can be replayed on copies (``plan.apply_plan``) without re-tracing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...errors import EdgekitError
from ..common import CUSTOM_PRUNERS, convs_and_linears, forward_with_hooks, opaque_modules, output_layer


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
    """How to trace one family of architectures: ``matches`` picks the model, ``scopes`` lists what is traced."""

    name: str
    method: str
    matches: Callable[[nn.Module], bool]
    scopes: Callable[[nn.Module], List[Scope]]


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
    """Channels of the concatenation before the slice."""
    return output_layer(m.primary_conv).out_channels + output_layer(m.cheap_operation).out_channels


def _ghost_ignored(model: nn.Module) -> List[nn.Module]:
    """Ghost modules whose output slice drops channels cannot be pruned (the slice would drop other channels)."""
    out = []
    for m in _ghost_modules(model):
        if m.out_chs != _ghost_width(m):
            out += convs_and_linears(m)
    return out


def _sync_ghost_modules(model: nn.Module) -> None:
    """After pruning, make each Ghost module's output slice keep every channel again."""
    for m in _ghost_modules(model):
        width = _ghost_width(m)
        if m.out_chs > width:  # pruned: the slice keeps every channel, as before pruning
            m.out_chs = width


# ----------------------------------------------------------------------------- tracing


def capture_inputs(model: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor) -> List[torch.Tensor]:
    """The first positional input each module receives in one forward pass of ``model``."""
    got: Dict[int, torch.Tensor] = {}

    def pre(mod, args):
        if id(mod) not in got:
            got[id(mod)] = args[0].detach().clone()

    forward_with_hooks(model, x, list({id(m): m for m in modules}.values()), pre, pre=True)
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

        forward_with_hooks(model, x, sealed, widths)
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
                        "Use the svd step, or add an adapter for this architecture to edgekit.steps.prune.ADAPTERS"
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
