"""ShuffleNet (v1): pointwise group convolutions + channel shuffle.

Zhang, Zhou, Lin & Sun, "ShuffleNet: An Extremely Efficient Convolutional Neural
Network for Mobile Devices", CVPR 2018, arXiv:1707.01083. Table 1 layout at 1.0x:
3x3/s2 stem (24 ch), 3x3/s2 max-pool, stages of 4/8/4 units, global pool, FC.
Units follow Fig. 2(b)/(c): 1x1 GConv-BN-ReLU, channel shuffle, 3x3 DWConv-BN
(stride 2 in the first unit of a stage), 1x1 GConv-BN; residual Add, or for stride 2
a 3x3/s2 average-pooled shortcut concatenated with the branch; ReLU after the merge.
Bottleneck width is 1/4 of the unit's output width; the first 1x1 of stage 2 is not
grouped (its input has only 24 channels), as in the paper.

Departure: none in structure. The shuffle is skipped after that ungrouped first
1x1, where it would only be a fixed relabelling of channels.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import ModelSpec, register_model
from .convs import ChannelShuffle, ConvBNAct

# Table 1, output channels of stages 2-4 at 1.0x for each group count g
STAGE_CHANNELS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960), 4: (272, 544, 1088),
                  8: (384, 768, 1536)}
STAGE_UNITS = (4, 8, 4)


class ShuffleUnit(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, stride: int, group_first: bool = True):
        super().__init__()
        self.stride = stride
        branch_out = out_ch - in_ch if stride == 2 else out_ch
        mid = out_ch // 4
        g1 = groups if group_first else 1
        self.branch = nn.Sequential(
            ConvBNAct(in_ch, mid, 1, groups=g1, act="relu"),
            ChannelShuffle(groups if g1 > 1 else 1),
            ConvBNAct(mid, mid, 3, stride=stride, groups=mid, act=None),
            ConvBNAct(mid, branch_out, 1, groups=groups, act=None),
        )
        self.shortcut = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        if self.stride == 2:
            return self.relu(torch.cat([self.shortcut(x), y], 1))
        return self.relu(x + y)


class ShuffleNetV1(nn.Module):
    def __init__(self, groups: int = 3, num_classes: int = 1000, width: float = 1.0):
        super().__init__()
        chans = [int(c * width) for c in STAGE_CHANNELS[groups]]
        stem = 24
        self.stem = nn.Sequential(ConvBNAct(3, stem, 3, stride=2), nn.MaxPool2d(3, 2, 1))
        layers, in_ch = [], stem
        for stage, (out_ch, units) in enumerate(zip(chans, STAGE_UNITS)):
            for i in range(units):
                layers.append(ShuffleUnit(in_ch, out_ch, groups, 2 if i == 0 else 1,
                                          group_first=not (stage == 0 and i == 0)))
                in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(self.stem(x))), 1))


def _build(groups: int, num_classes: int) -> nn.Module:
    return ShuffleNetV1(groups, num_classes)


# Paper Table 2: every 1.0x variant is ~140 MFLOPs (multiply-adds). The paper gives no
# parameter counts; ~1.9M (g=3) is the figure quoted for the authors' released model.
for _g, _ref in ((3, {"params_m": 1.9, "macs_m": 140}), (8, {"macs_m": 140})):
    register_model(ModelSpec(
        name=f"shufflenetv1-g{_g}", family="shufflenetv1", source="edgekit",
        paper="Zhang et al. 2017, arXiv:1707.01083", build=lambda n, g=_g: _build(g, n), classifier="fc",
        reference=_ref,
        notes=f"ShuffleNet 1.0x (g={_g}), Table 1 layout. MACs checked against the paper's ~140 MFLOPs "
              "(multiply-adds) within ±10%" + (", params against the released model's ~1.9M within ±10%."
                                               if _g == 3 else "; no published parameter count for g=8."),
    ))
