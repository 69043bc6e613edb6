"""Depth pruning: remove whole blocks whose output can fall back to their input.

Thinning channels leaves every kernel of a block in place. At the small inputs
edge models often run at, a block's fixed costs (one kernel launch per conv,
split, concat, shuffle and layout reorder) are a large part of its time, so
removing a few whole blocks saves more latency per MAC than removing channels.
(ShuffleNetV2 x1.0 at 64x64 in ONNX Runtime: each stride-1 unit removed saves
about 4.5% of the latency for 1.9% of the MACs.)

A block can go when the network still works without it:

- ``residual``: it returns ``x + f(x)`` (or ``relu(x + f(x))``) with ``x`` its own
  input: MobileNetV2/V3, MnasNet and EfficientNet inverted residuals with a skip,
  GhostNet and ShuffleNetV1 units with an identity shortcut, IGCV3. Removed, it
  returns ``x``: what stochastic depth trains the network to survive.
- ``shufflenetv2-unit``: a ShuffleNetV2 stride-1 unit (split, branch, concat,
  channel shuffle). Removed, it passes its input on unchanged.

Blocks are found by tracing each module with ``torch.fx`` (``BLOCK_KINDS``), and
only where a forward pass shows the same input and output shape. They are ranked
greedily by how far the model's outputs move (KL divergence from the unpruned
model's softmax on a calibration batch) when each is removed on top of those
already removed, and the least harmful go first.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

_ADD = (operator.add, operator.iadd, torch.add, "add", "add_")
_RELU = (F.relu, torch.relu, "relu", "relu_")


def _traced(m: nn.Module):
    import torch.fx as fx

    try:
        gm = fx.symbolic_trace(m)
    except Exception:  # data-dependent control flow etc.: not a candidate
        return None
    return gm


def _unwrap(gm, node):
    """Follow identity modules (an ``nn.Identity`` shortcut is a module call in the trace)."""
    import torch.fx as fx

    while isinstance(node, fx.Node) and node.op == "call_module" and isinstance(gm.get_submodule(node.target),
                                                                                 nn.Identity):
        node = node.args[0]
    return node


def _is_residual(m: nn.Module) -> bool:
    import torch.fx as fx

    if isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) != 1 or not any(True for _ in m.children()):
        return False
    gm = _traced(m)
    if gm is None:
        return False
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    out = next(n for n in nodes if n.op == "output").args[0]
    if len(inputs) != 1 or not isinstance(out, fx.Node):
        return False
    if (out.op == "call_module" and isinstance(gm.get_submodule(out.target), nn.ReLU)) or out.target in _RELU:
        out = out.args[0]
    if not isinstance(out, fx.Node) or out.op not in ("call_function", "call_method") or out.target not in _ADD:
        return False
    return any(_unwrap(gm, a) is inputs[0] for a in out.args[:2])


def _is_shufflenetv2_unit(m: nn.Module) -> bool:
    try:
        from torchvision.models.shufflenetv2 import InvertedResidual
    except ImportError:  # pragma: no cover
        return False
    return isinstance(m, InvertedResidual) and m.stride == 1


@dataclass(frozen=True)
class BlockKind:
    name: str
    matches: Callable[[nn.Module], bool]
    removed: str  # what the network computes where the block was


BLOCK_KINDS: List[BlockKind] = [
    BlockKind("shufflenetv2-unit", _is_shufflenetv2_unit, "its input, unshuffled"),
    BlockKind("residual", _is_residual, "its input (the skip connection)"),
]


@dataclass
class Block:
    name: str
    kind: str


def _get(model: nn.Module, path: str) -> nn.Module:
    from ..zoo.registry import _get_module

    return _get_module(model, path)


def _put(model: nn.Module, path: str, new: nn.Module) -> None:
    from ..zoo.registry import _set_module

    _set_module(model, path, new)


def remove(model: nn.Module, names: Sequence[str]) -> None:
    for n in names:
        _put(model, n, nn.Identity())


def removable_blocks(model: nn.Module, x: torch.Tensor, keep: Sequence[nn.Module] = ()) -> List[Block]:
    """Blocks of ``model`` that could be replaced by their input, innermost first, none containing ``keep``."""
    found: Dict[str, str] = {}
    for name, m in model.named_modules():
        if not name:
            continue
        for kind in BLOCK_KINDS:
            if kind.matches(m):
                found[name] = kind.name
                break
    # a Sequential wrapping one residual block traces as residual too: keep the innermost
    names = [n for n in found if not any(o.startswith(n + ".") for o in found)]
    keep_ids = {id(k) for k in keep}
    names = [n for n in names if not any(id(s) in keep_ids for s in _get(model, n).modules())]
    shapes: Dict[str, Tuple[tuple, tuple]] = {}
    hooks = []
    for n in names:
        def hook(mod, args, out, _n=n):
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                shapes[_n] = (tuple(args[0].shape), tuple(out.shape))
        hooks.append(_get(model, n).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return [Block(n, found[n]) for n in names if n in shapes and shapes[n][0] == shapes[n][1]]


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean"))


def select_blocks(model: nn.Module, blocks: List[Block], count: int, x: torch.Tensor,
                  macs_of: Callable[[nn.Module], int], min_macs: Optional[int] = None, rerank: int = 6,
                  ) -> List[Tuple[Block, float]]:
    """Greedily pick up to ``count`` blocks to remove, each time the one that moves the outputs least.

    The first round scores every block; later rounds re-score only the ``rerank`` best of the last scores
    (removing one block seldom reorders the far tail, and a full re-score per round costs a forward pass per
    block per round: minutes on IGCV3's 25 blocks). Stops early rather than take the model below
    ``min_macs``. Returns (block, KL after its removal) in order; ``model`` itself is left as it was.
    """
    import copy

    chosen: List[Tuple[Block, float]] = []
    with torch.no_grad():
        ref = model.eval()(x)
        work = copy.deepcopy(model).eval()
        last: Dict[str, float] = {b.name: 0.0 for b in blocks}
        left = list(blocks)
        while left and len(chosen) < count:
            left.sort(key=lambda b: last[b.name])
            for b in left if len(chosen) == 0 else left[:rerank]:
                orig = _get(work, b.name)
                remove(work, [b.name])
                last[b.name] = _kl(ref, work(x))
                _put(work, b.name, orig)
            best = min(left[:len(left) if len(chosen) == 0 else rerank], key=lambda b: last[b.name])
            orig = _get(work, best.name)
            remove(work, [best.name])
            if min_macs is not None and macs_of(work) < min_macs:
                _put(work, best.name, orig)
                break
            chosen.append((best, last[best.name]))
            left.remove(best)
    return chosen
