"""IGCV3: interleaved low-rank group convolutions.

Sun, Li, Liu & Wang, "IGCV3: Interleaved Low-Rank Group Convolutions for Efficient
Deep Neural Networks", BMVC 2018, arXiv:1806.00178. IGCV3-D 1.0 (ImageNet experiments): the
MobileNetV2 skeleton (32-ch stem, widths 16-24-32-64-96-160-320, 1280-ch head) made
deeper, with [1, 4, 6, 8, 6, 6, 1] blocks instead of [1, 2, 3, 4, 3, 3, 1]. Each
block is a 1x1 group conv (G1 = 2) that expands the width 6x, a channel permutation,
a 3x3 depthwise conv and a 1x1 group conv (G2 = 2) back to the output width, with a
residual Add when shapes allow.

As in the authors' released MXNet definition (the paper finds a ReLU after the first
group conv hurts deeper nets), only the depthwise conv is followed by a nonlinearity
(ReLU6); both group convs are linear.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import ModelSpec, register_model
from .convs import ChannelShuffle, ConvBNAct

# (expansion t, output width c, blocks n, stride s) for IGCV3-D
IGCV3_D = ((1, 16, 1, 1), (6, 24, 4, 2), (6, 32, 6, 2), (6, 64, 8, 2), (6, 96, 6, 1), (6, 160, 6, 2),
           (6, 320, 1, 1))


class IGCV3Block(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int, g1: int = 2, g2: int = 2):
        super().__init__()
        mid = in_ch * expand
        self.residual = stride == 1 and in_ch == out_ch
        self.body = nn.Sequential(
            ConvBNAct(in_ch, mid, 1, groups=g1, act=None),
            ChannelShuffle(g1),
            ConvBNAct(mid, mid, 3, stride=stride, groups=mid, act="relu6"),
            ConvBNAct(mid, out_ch, 1, groups=g2, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class IGCV3(nn.Module):
    def __init__(self, num_classes: int = 1000, config=IGCV3_D, stem: int = 32, head: int = 1280):
        super().__init__()
        self.stem = ConvBNAct(3, stem, 3, stride=2, act="relu6")
        layers, in_ch = [], stem
        for t, c, n, s in config:
            for i in range(n):
                layers.append(IGCV3Block(in_ch, c, s if i == 0 else 1, t))
                in_ch = c
        self.features = nn.Sequential(*layers)
        self.head = ConvBNAct(in_ch, head, 1, act="relu6")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.head(self.features(self.stem(x)))), 1))


register_model(ModelSpec(
    name="igcv3", family="igcv3", source="edgekit", paper="Sun et al. 2018, arXiv:1806.00178",
    build=lambda n: IGCV3(n), classifier="classifier", aliases=("igcv3-d",),
    reference={"params_m": 3.5, "macs_m": 318},
    notes="IGCV3-D 1.0, G1 = G2 = 2. Checked against the paper's ImageNet figures (3.5M params, 318M MACs) "
          "within ±10%.",
))
