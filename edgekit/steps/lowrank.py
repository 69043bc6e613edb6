"""Low-rank factorization: truncated SVD of 1x1 convolutions and linear layers, spatial SVD of kxk ones.

- A 1x1 convolution (or a Linear) ``W: Cout x Cin`` becomes ``Cin -> r`` then
  ``r -> Cout`` (``W ~ U_r S_r V_r^T``; the first layer keeps the stride).
- A kxk convolution (groups=1) becomes ``k x 1`` then ``1 x k`` (spatial SVD,
  as AIMET does): the weight is laid out as a ``(Cin*kh) x (Cout*kw)`` matrix
  whose rank-r factors are the two convolutions' weights.
- Depthwise and grouped convolutions are left alone, and so is every layer
  whose factorization would cost at least as many MACs as it saves.

The rank of each layer comes from an energy threshold (the share of the
squared singular values kept, ``energy: 0.9``) or from a MACs budget for the
whole model (``macs: 0.7``), met greedily: the factorization that loses the
least energy per MAC saved goes first. Ranks are multiples of ``round_to``.
Accuracy is recovered by a following ``distill`` step.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import EdgekitError
from .params import KINDS, SVDParams
from .registry import Step, StepContext, register_step


@dataclass
class Layer:
    """A layer that may be factorized, with what its factorization would cost at each rank."""

    name: str
    module: nn.Module
    kind: str  # pointwise | spatial | linear
    sv: torch.Tensor  # singular values, descending
    macs: int  # as it is
    cost_per_rank: Tuple[int, ...]  # MACs of the factorized pair = rank * cost_per_rank[0] (+ nothing else)

    def factored_macs(self, rank: int) -> int:
        return rank * self.cost_per_rank[0]

    def energy(self, rank: int) -> float:
        e = self.sv.double() ** 2
        return float(e[:rank].sum() / e.sum()) if float(e.sum()) > 0 else 1.0

    def ranks(self, round_to: int, min_saving: float) -> List[int]:
        """Ranks (multiples of round_to, descending) at which factorizing saves at least ``min_saving``."""
        full = len(self.sv)
        limit = self.macs * (1 - min_saving)
        out = [r for r in range(round_to, full + 1, round_to) if self.factored_macs(r) < limit and r < full]
        return sorted(out, reverse=True)


def _matrix(m: nn.Module, kind: str) -> torch.Tensor:
    w = m.weight.detach()
    if kind in ("pointwise", "linear"):
        return w.reshape(w.shape[0], -1)  # Cout x Cin
    cout, cin, kh, kw = w.shape
    # M[(c, i), (o, j)] = W[o, c, i, j]
    return w.permute(1, 2, 0, 3).reshape(cin * kh, cout * kw)


def _kind(m: nn.Module) -> Optional[str]:
    if type(m) is nn.Linear:
        return "linear"
    if type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple):
        if m.kernel_size == (1, 1):
            return "pointwise"
        if m.kernel_size[0] > 1 and m.kernel_size[1] > 1:
            return "spatial"
    return None


def _shapes(model: nn.Module, input_shape) -> Dict[int, Tuple[tuple, tuple]]:
    """Input and output shapes of every conv/linear in one forward pass."""
    seen: Dict[int, Tuple[tuple, tuple]] = {}

    def keep(mod, i, o):  # returns None: the output is left alone
        seen.setdefault(id(mod), (tuple(i[0].shape), tuple(o.shape)))

    hooks = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1,) + tuple(input_shape[-3:])))
    finally:
        for h in hooks:
            h.remove()
    return seen


def find_layers(model: nn.Module, input_shape, kinds, skip: List[nn.Module]) -> List[Layer]:
    shapes = _shapes(model, input_shape)
    skip_ids = {id(m) for m in skip}
    out = []
    for name, m in model.named_modules():
        kind = _kind(m)
        if kind is None or kind not in kinds or id(m) in skip_ids or id(m) not in shapes:
            continue
        (inp, outp) = shapes[id(m)]
        with torch.no_grad():
            sv = torch.linalg.svdvals(_matrix(m, kind).float())
        if kind == "linear":
            cout, cin = m.out_features, m.in_features
            pos = math.prod(outp[1:-1]) if len(outp) > 2 else 1
            macs, per = cout * cin * pos, (cin + cout) * pos
        elif kind == "pointwise":
            cout, cin = m.out_channels, m.in_channels
            pos = outp[2] * outp[3]
            macs, per = cout * cin * pos, (cin + cout) * pos
        else:
            cout, cin = m.out_channels, m.in_channels
            kh, kw = m.kernel_size
            ho, wo = outp[2], outp[3]
            w_mid = inp[3]  # the kh x 1 convolution (stride (sh, 1), padding (ph, 0)) keeps the input width
            macs = cout * cin * kh * kw * ho * wo
            per = cin * kh * ho * w_mid + cout * kw * ho * wo
        out.append(Layer(name, m, kind, sv, macs, (per,)))
    return out


def factorize(m: nn.Module, kind: str, rank: int) -> nn.Sequential:
    """Two thinner layers computing the rank-``rank`` approximation of ``m``."""
    with torch.no_grad():
        mat = _matrix(m, kind).double()
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        root = s[:rank].sqrt()
        left = u[:, :rank] * root  # rows of the matrix x rank
        right = vh[:rank].T * root  # cols of the matrix x rank
        bias = m.bias.detach().clone() if m.bias is not None else None
        if kind == "linear":
            a = nn.Linear(m.in_features, rank, bias=False)
            b = nn.Linear(rank, m.out_features, bias=bias is not None)
            a.weight.copy_(right.T)
            b.weight.copy_(left)
        elif kind == "pointwise":
            a = nn.Conv2d(m.in_channels, rank, 1, stride=m.stride, bias=False)
            b = nn.Conv2d(rank, m.out_channels, 1, bias=bias is not None)
            a.weight.copy_(right.T.reshape(rank, m.in_channels, 1, 1))
            b.weight.copy_(left.reshape(m.out_channels, rank, 1, 1))
        else:
            cout, cin, kh, kw = m.weight.shape
            (sh, sw), (ph, pw), (dh, dw) = m.stride, m.padding, m.dilation
            a = nn.Conv2d(cin, rank, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), bias=False)
            b = nn.Conv2d(rank, cout, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw),
                          bias=bias is not None)
            # left: (cin*kh) x r -> a.weight[r, c, i, 0]; right: (cout*kw) x r -> b.weight[o, r, 0, j]
            a.weight.copy_(left.reshape(cin, kh, rank).permute(2, 0, 1).unsqueeze(-1))
            b.weight.copy_(right.reshape(cout, kw, rank).permute(0, 2, 1).unsqueeze(2))
        if bias is not None:
            b.bias.copy_(bias)
    dtype, device = m.weight.dtype, m.weight.device
    return nn.Sequential(a, b).to(device=device, dtype=dtype)


def choose_ranks_energy(layers: List[Layer], energy: float, round_to: int, min_saving: float) -> Dict[str, int]:
    out = {}
    for layer in layers:
        e = (layer.sv.double() ** 2)
        cum = torch.cumsum(e, 0) / e.sum() if float(e.sum()) > 0 else torch.ones_like(e)
        r = int((cum < energy).sum()) + 1
        r = int(math.ceil(r / round_to)) * round_to
        if r < len(layer.sv) and layer.factored_macs(r) < layer.macs * (1 - min_saving):
            out[layer.name] = r
    return out


def choose_ranks_budget(layers: List[Layer], total_macs: int, target: float, round_to: int, min_saving: float
                        ) -> Tuple[Dict[str, int], int]:
    """Greedy: repeatedly take the rank step with the least energy lost per MAC saved until MACs <= target.

    Returns the ranks and the MACs they reach.
    """
    options = {l.name: l.ranks(round_to, min_saving) for l in layers}
    by_name = {l.name: l for l in layers}
    state: Dict[str, int] = {}  # name -> index into options (absent: not factorized)
    macs = total_macs

    def cost(name: str, rank_now: Optional[int], rank_next: int) -> Tuple[float, int]:
        l = by_name[name]
        before_macs = l.macs if rank_now is None else l.factored_macs(rank_now)
        before_e = 1.0 if rank_now is None else l.energy(rank_now)
        saved = before_macs - l.factored_macs(rank_next)
        lost = before_e - l.energy(rank_next)
        return lost / max(saved, 1), saved

    while macs > target:
        best = None
        for name, opts in options.items():
            i = state.get(name, -1)
            if i + 1 >= len(opts):
                continue
            now = opts[i] if i >= 0 else None
            score, saved = cost(name, now, opts[i + 1])
            if saved > 0 and (best is None or score < best[0]):
                best = (score, name, saved)
        if best is None:
            break
        _, name, saved = best
        state[name] = state.get(name, -1) + 1
        macs -= saved
    return {n: options[n][i] for n, i in state.items()}, macs


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if leaf.isdigit() and isinstance(parent, (nn.Sequential, nn.ModuleList)):
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


@register_step
class SVD(Step):
    """Truncated / spatial SVD of convolutions and linear layers."""

    name = "svd"
    Params = SVDParams

    def apply(self, model: nn.Module, ctx: StepContext) -> nn.Module:
        from ..zoo import count_macs, count_params
        from .common import find_classifier as _classifier, opaque_modules, output_layer

        p: SVDParams = self.params
        round_to = p.round_to or getattr(ctx.device, "prune_round_to", None) or 8
        shape = tuple(ctx.task.input_shape) if ctx.task is not None else (1, 3, 64, 64)
        model = model.eval()
        before = {"macs": count_macs(model, shape[1:]), "params": count_params(model)}
        skip: List[nn.Module] = []
        clf = _classifier(model, ctx.model_name)
        if clf is not None:
            skip.append(output_layer(clf))
        named = dict(model.named_modules())
        for pat in p.ignore:
            hits = [m for n, m in named.items() if n and (n == pat or fnmatch.fnmatchcase(n, pat))]
            if not hits:
                raise EdgekitError(f"svd: 'ignore' pattern {pat!r} matches no layer of the model")
            for m in hits:
                skip += list(m.modules())
        # layers inside modules Torch-Pruning's tracing seals (weights read by a custom forward) stay as they are
        sealed = opaque_modules(model, torch.zeros(shape))
        for m in sealed:
            skip += list(m.modules())
        layers = find_layers(model, shape, set(p.layers), skip)
        if p.macs is not None:
            ranks, est = choose_ranks_budget(layers, before["macs"], before["macs"] * p.macs, round_to, p.min_saving)
            rule = {"macs": p.macs}
        else:
            ranks = choose_ranks_energy(layers, p.energy, round_to, p.min_saving)
            rule = {"energy": p.energy}
        by_name = {l.name: l for l in layers}
        details = []
        for name, r in ranks.items():
            l = by_name[name]
            _set(model, name, factorize(l.module, l.kind, r))
            details.append({"layer": name, "kind": l.kind, "rank": r, "full_rank": len(l.sv),
                            "energy": round(l.energy(r), 4), "macs_ratio": round(l.factored_macs(r) / l.macs, 3)})
        model.eval()
        after = {"macs": count_macs(model, shape[1:]), "params": count_params(model)}
        reached = p.macs is None or after["macs"] <= before["macs"] * p.macs
        info = {
            "method": "truncated SVD (1x1 conv, linear) and spatial SVD kx1+1xk (kxk conv, groups=1)",
            "rule": rule, "round_to": round_to, "reached": reached,
            "candidates": len(layers), "factorized": len(details), "layers": details,
            "macs_before": before["macs"], "macs_after": after["macs"],
            "params_before": before["params"], "params_after": after["params"],
            "macs_ratio": round(after["macs"] / before["macs"], 4),
            "params_ratio": round(after["params"] / before["params"], 4),
        }
        counts = {k: sum(1 for d in details if d["kind"] == k) for k in KINDS}
        ctx.notes.append(f"svd: {len(details)} of {len(layers)} candidate layers factorized "
                         f"({', '.join(f'{v} {k}' for k, v in counts.items() if v)}) -> MACs "
                         f"{info['macs_ratio']:.1%}, params {info['params_ratio']:.1%}")
        if not reached:
            ctx.notes.append(f"svd: {ctx.model_name} reaches only {info['macs_ratio']:.0%} of its MACs "
                             f"(asked {p.macs:.0%}): depthwise and grouped convolutions are not factorized")
        from .common import record as _record

        _record(ctx, self.name, info)
        return model
