"""MicroNet-M1: micro-factorized convolutions with a static Shift-Max.

Li et al., "MicroNet: Improving Image Recognition with Extremely Low FLOPs", ICCV 2021,
arXiv:2108.05894. M1 layout and block wiring follow the authors' released
configuration (``msnx_dy6_exp6_6M_221``: 6-channel spatially separable stem, seven
micro-blocks, 960-wide head):

- micro-factorized depthwise conv: a ``k x 1`` then ``1 x k`` depthwise pair that also
  expands the width (Micro-Block-A), or keeps it (Micro-Block-B/C);
- micro-factorized pointwise conv: two grouped 1x1 convs (squeeze/expand) with channel
  shuffles between them, so every output is connected to every input.

Replacement of Dynamic Shift-Max (the paper's activation): DY-Shift-Max computes
``max_k (a_k(x) * x + b_k(x) * shift(x))`` where the coefficients come from a small
SE-style MLP on the pooled input. That input-dependent branch exports as
GlobalAveragePool/Gemm/HardSigmoid/Mul chains that int8 quantizers handle poorly, so
here the coefficients are *static* learned per-channel constants (``StaticShiftMax``):

- two branches (where the paper's block uses ReLU-like DY-Shift-Max, K = 2):
  ``y = v(x, s) + ReLU(u(x, s))``, which equals ``max(z1, z2)`` with ``u = z1 - z2``,
  ``v = z2``; initialised to ``ReLU(x)``;
- one branch (after the last 1x1 group conv of a block): ``y = a * x + b * s``,
  initialised to ``x``,

where ``s`` is the paper's shifted input (group index and in-group index both rolled
by one). ``[x, s]`` is formed by one constant-index Gather (channels interleaved) and
``u``, ``v`` are 1x1 convolutions with one group per channel, so the layer exports as
Gather, Conv, Relu and Add. The same multiply-adds as the paper's fusion are counted
as conv MACs. What is lost is only the input dependence of the coefficients (the
~0.23M parameters of the paper's coefficient MLPs are absent).

Other departures: the classifier ends in a plain Linear (the released code adds
BatchNorm1d + h-swish on the logits); the 576->960 layer is a 1x1 conv + BN on the
pooled map so BN folds into it at export. Dropout 0.05 before the classifier as in
the authors' training script.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import nn

from ..registry import ModelSpec, register_model
from .convs import ChannelShuffle, ConvBNAct

# s, n, c, ks, c1, c2, g1, g2, c3, g3, g4, y1, y2, y3, r (authors' msnx_dy6_exp6_6M_221, MicroNet-M1)
M1 = (
    (2, 1, 8, 3, 2, 2, 0, 6, 8, 2, 2, 2, 0, 1, 1),
    (2, 1, 16, 3, 2, 2, 0, 8, 16, 4, 4, 2, 2, 1, 1),
    (2, 1, 16, 5, 2, 2, 0, 16, 16, 4, 4, 2, 2, 1, 1),
    (1, 1, 32, 5, 1, 6, 4, 4, 32, 4, 4, 2, 2, 1, 1),
    (2, 1, 64, 5, 1, 6, 8, 8, 64, 8, 8, 2, 2, 1, 1),
    (1, 1, 96, 3, 1, 6, 8, 8, 96, 8, 8, 2, 2, 1, 2),
    (1, 1, 576, 3, 1, 6, 12, 12, 0, 0, 0, 2, 2, 1, 2),
)


def _shift_index(channels: int, groups: int) -> torch.Tensor:
    """The paper's circular shift: channel (i, j) of a (groups, channels/groups) view takes (i+1, j+1)."""
    gc = channels // groups
    i = torch.arange(groups).repeat_interleave(gc)
    j = torch.arange(gc).repeat(groups)
    return ((i + 1) % groups) * gc + (j + 1) % gc


class StaticShiftMax(nn.Module):
    """Shift-Max with learned static coefficients (see the module docstring)."""

    def __init__(self, channels: int, groups: int, two_branch: bool):
        super().__init__()
        self.channels, self.groups, self.two_branch = channels, groups, two_branch
        shift = _shift_index(channels, groups)
        # [x_0, s_0, x_1, s_1, ...]: one constant-index Gather
        self.register_buffer("index", torch.stack([torch.arange(channels), shift], 1).reshape(-1), persistent=False)
        self.u = nn.Conv2d(2 * channels, channels, 1, groups=channels, bias=False)
        self.v = nn.Conv2d(2 * channels, channels, 1, groups=channels, bias=False) if two_branch else None
        with torch.no_grad():  # start as ReLU (two branches) or identity (one branch)
            self.u.weight.zero_()
            self.u.weight[:, 0] = 1.0
            if self.v is not None:
                self.v.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.index_select(1, self.index)
        if self.v is None:
            return self.u(xs)
        return self.v(xs) + torch.relu(self.u(xs))

    def extra_repr(self) -> str:
        return f"{self.channels}, groups={self.groups}, two_branch={self.two_branch}"


def _act(channels: int, mode: int, g: Tuple[int, int], expansion: bool) -> nn.Module:
    """``mode`` (the released config's y-codes): 0 -> ReLU6, 1 -> one-branch, 2 -> two-branch Shift-Max.

    After the squeezing 1x1 conv the released code always uses the one-branch form.
    """
    if mode == 0:
        return nn.ReLU6(inplace=True)
    groups = g[1]
    if groups != 1 and expansion:
        groups = channels // groups
    return StaticShiftMax(channels, groups, two_branch=mode == 2)


def _depth_sep(in_ch: int, c1: int, c2: int, k: int, stride: int) -> nn.Sequential:
    """Micro-factorized depthwise conv: k x 1 (width x c1) then 1 x k (width x c2), both depthwise."""
    mid, out = in_ch * c1, in_ch * c1 * c2
    return nn.Sequential(
        ConvBNAct(in_ch, mid, (k, 1), stride=(stride, 1), groups=in_ch, act=None),
        ConvBNAct(mid, out, (1, k), stride=(1, stride), groups=mid, act=None),
    )


class MicroBlock(nn.Module):
    def __init__(self, inp: int, oup: int, k: int, stride: int, exp: Sequence[int], gs1: Sequence[int],
                 gs2: Sequence[int], dy: Sequence[int]):
        super().__init__()
        c1, c2 = exp
        _, pg1, pg2 = gs2
        y1, y2, y3 = dy
        hidden = inp * c1 * c2
        self.identity = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if gs1[0] == 0:  # Micro-Block-A: depthwise expansion, then a grouped 1x1 squeeze
            layers += [_depth_sep(inp, c1, c2, k, stride), _act(hidden, y2, gs1, False), ChannelShuffle(gs1[1])]
            if y2:
                layers.append(ChannelShuffle(hidden // 2))
            layers += [ConvBNAct(hidden, oup, 1, groups=pg1, act=None),
                       _act(oup, 1, (pg1, pg2), False) if y3 else nn.Identity(), ChannelShuffle(pg2)]
            if oup % 2 == 0 and y3:
                layers.append(ChannelShuffle(oup // 2))
        elif pg2 == 0:  # last block: grouped 1x1 expansion only
            layers += [ConvBNAct(inp, hidden, 1, groups=gs1[0], act=None)]
            if y3:
                layers.append(_act(hidden, 1, gs1, False))
        else:  # Micro-Block-B/C: grouped 1x1 expand, depthwise pair, grouped 1x1 squeeze
            layers += [ConvBNAct(inp, hidden, 1, groups=gs1[0], act=None), _act(hidden, y1, gs1, False),
                       ChannelShuffle(gs1[1]), _depth_sep(hidden, 1, 1, k, stride), _act(hidden, y2, gs1, True)]
            if y1 and y2:
                layers.append(ChannelShuffle(hidden // 4))
            elif y1 or y2:
                layers.append(ChannelShuffle(hidden // 2))
            layers += [ConvBNAct(hidden, oup, 1, groups=pg1, act=None),
                       _act(oup, 1, (pg1, pg2), False) if y3 else nn.Identity(), ChannelShuffle(pg2)]
            if y3:
                layers.append(ChannelShuffle(oup // 2))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return x + y if self.identity else y


class MicroNet(nn.Module):
    def __init__(self, num_classes: int = 1000, config=M1, stem_groups=(3, 2), head: int = 960,
                 dropout: float = 0.05):
        super().__init__()
        g1, g2 = stem_groups
        self.stem = nn.Sequential(  # spatially separable stem: 3x1 conv, 1x3 depthwise expansion, shuffle
            ConvBNAct(3, g1, (3, 1), stride=(2, 1), act=None),
            ConvBNAct(g1, g1 * g2, (1, 3), stride=(1, 2), groups=g1, act=None),
            ChannelShuffle(g1),
            nn.ReLU6(inplace=True),
        )
        blocks, in_ch = [], g1 * g2
        for s, n, c, k, c1, c2, gg1, gg2, c3, g3, g4, y1, y2, y3, _r in config:
            for i in range(n):
                blocks.append(MicroBlock(in_ch, c, k, s if i == 0 else 1, (c1, c2), (gg1, gg2), (c3, g3, g4),
                                         (y1, y2, y3)))
                in_ch = c
        self.features = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.ReLU6(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Hardswish(inplace=True))
        self.head = ConvBNAct(in_ch, head, 1, act="hswish")
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.pool(self.features(self.stem(x))))
        return self.classifier(self.dropout(torch.flatten(x, 1)))


register_model(ModelSpec(
    name="micronet-m1", family="micronet", source="edgekit", paper="Li et al. 2021, arXiv:2108.05894",
    build=lambda n: MicroNet(n), classifier="classifier", aliases=("micronet",),
    reference={"params_m": 1.8, "macs_m": 6},
    notes="MicroNet-M1 with a static Shift-Max in place of Dynamic Shift-Max (learned per-channel "
          "coefficients instead of an input-dependent MLP; exports as Gather/Conv/Relu/Add). MACs checked "
          "against the paper's 6M within ±10%. Params checked against the paper's 1.8M within -20%/+5%: the "
          "static variant drops the ~0.23M parameters of the dynamic coefficient MLPs (expect ~1.55M).",
))
