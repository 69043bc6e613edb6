"""Helpers the compression steps share, kept once: a forward pass with hooks, the classifier and output
layers, ``ignore`` patterns, modules whose weights are not plain layers, the fine-tune lr, report facts."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import EdgekitError

if TYPE_CHECKING:  # pragma: no cover
    from .registry import StepContext


def forward_with_hooks(model: nn.Module, x: torch.Tensor, modules: Sequence[nn.Module], hook: Callable, *,
                       pre: bool = False, with_kwargs: bool = False) -> torch.Tensor:
    """One eval-mode, no-grad forward pass of ``model`` with ``hook`` on each of ``modules``.

    A forward hook, or with ``pre`` a forward pre-hook (``with_kwargs`` as in torch);
    the hooks are removed afterwards, even when the pass fails.
    """
    if pre:
        handles = [m.register_forward_pre_hook(hook, with_kwargs=with_kwargs) for m in modules]
    else:
        handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            return model.eval()(x)
    finally:
        for h in handles:
            h.remove()


def convs_and_linears(module: nn.Module) -> List[nn.Module]:
    """Every Conv2d and Linear inside ``module``, in definition order."""
    return [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def output_layer(module: nn.Module) -> nn.Module:
    """The conv/linear that produces ``module``'s output (the last one inside a factorized Sequential)."""
    layers = convs_and_linears(module)
    if not layers:
        return module
    return layers[-1]


def detection_outputs(model: nn.Module) -> Optional[List[nn.Module]]:
    """A detector's prediction convs (its ``output_layers()``: their channels are boxes and classes), None for a
    classifier."""
    layers = getattr(model, "output_layers", None)
    return list(layers()) if callable(layers) else None


def example_shape(model: nn.Module) -> Tuple[int, int, int]:
    """An input shape (C, S, S) for models used without a task: C the model's ``in_chans`` (a space-to-depth stem
    widens its first conv's input), else from the first convolution; S its fixed ``input_size`` (a detector's
    default boxes), else 64."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    size = getattr(model, "input_size", None)
    size = size if isinstance(size, int) else 64
    return (getattr(model, "in_chans", None) or (conv.in_channels if conv is not None else 3), size, size)


def find_classifier(model: nn.Module, model_name: Optional[str]) -> Optional[nn.Module]:
    """The classifier: the zoo spec's ``classifier`` module, else the last conv/linear the forward pass calls."""
    from ..zoo.registry import _get_module, find_spec

    spec = find_spec(model_name)
    if spec is not None and spec.classifier:
        try:
            return _get_module(model, spec.classifier)
        except (AttributeError, IndexError, TypeError):
            pass
    order: List[nn.Module] = []
    forward_with_hooks(model, torch.zeros(1, *example_shape(model)), convs_and_linears(model),
                       lambda mod, i, o: order.append(mod))
    return order[-1] if order else None


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


# Torch-Pruning pruners for custom layer types (``tp.pruner.function.BasePruningFunc`` instances), one table:
# a type listed here is traced as a prunable layer instead of being sealed. Empty by default.
CUSTOM_PRUNERS: Dict[type, object] = {}

_STANDARD = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
             nn.modules.instancenorm._InstanceNorm, nn.PReLU, nn.Embedding)


def opaque_modules(model: nn.Module, x: torch.Tensor) -> List[nn.Module]:
    """Modules whose channels Torch-Pruning cannot follow: prune traces them as sealed boxes, svd leaves them whole.

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

    forward_with_hooks(model, x, list(model.modules()), pre, pre=True, with_kwargs=True)
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


def default_lr(model_name: Optional[str]) -> float:
    """Fine-tune learning rate: the zoo model's training lr, at most 3e-3."""
    from ..zoo.registry import find_spec

    lr, spec = 3e-3, find_spec(model_name)
    if spec is not None:
        lr = min(lr, float(spec.train.get("lr", lr)))
    return lr


def record(ctx: "StepContext", key: str, info: dict) -> None:
    """Facts for report.json under the step's kind (a second step of the same kind gets ``kind#2``)."""
    k, i = key, 2
    while k in ctx.info:
        k, i = f"{key}#{i}", i + 1
    ctx.info[k] = info
