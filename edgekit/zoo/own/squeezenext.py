"""SqueezeNext: two-stage squeeze, separable 3x1/1x3 convolutions, residual blocks.

Gholami et al., "SqueezeNext: Hardware-Aware Neural Network Design", CVPR-W 2018,
arXiv:1803.10615. 1.0-SqNxt-23 (the paper's baseline design): 7x7/s2 stem
with 64 channels (no padding), 3x3/s2 max-pool, four stages of [6, 6, 8, 1] blocks
with 32/64/128/256 output channels (stride 2 in the first block of stages 2-4),
a 1x1 conv to 128 channels, global average pool and the classifier.

Each block: 1x1 (C/2), 1x1 (C/4), 3x1 (C/2), 1x3 (C/2), 1x1 (C), each Conv-BN-ReLU,
added to the input (a 1x1 projection when the width or stride changes) and ReLU'd.
As in the authors' released Caffe definition, consecutive blocks alternate the order
of the 3x1 and 1x3 convolutions and the first 1x1 carries the block's stride.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import ModelSpec, register_model
from .convs import ConvBNAct


class SqnxtBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, flip: bool):
        super().__init__()
        half, quarter = out_ch // 2, out_ch // 4
        sep = [ConvBNAct(quarter, half, (3, 1)), ConvBNAct(half, half, (1, 3))]
        if flip:  # the separable pair in the other order: 1x3 then 3x1
            sep = [ConvBNAct(quarter, half, (1, 3)), ConvBNAct(half, half, (3, 1))]
        self.body = nn.Sequential(
            ConvBNAct(in_ch, half, 1, stride=stride),
            ConvBNAct(half, quarter, 1),
            *sep,
            ConvBNAct(half, out_ch, 1),
        )
        self.shortcut = (ConvBNAct(in_ch, out_ch, 1, stride=stride)
                         if stride != 1 or in_ch != out_ch else nn.Identity())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class SqueezeNext(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0, blocks=(6, 6, 8, 1)):
        super().__init__()
        stem = int(64 * width)
        self.stem = nn.Sequential(ConvBNAct(3, stem, 7, stride=2, padding=0), nn.MaxPool2d(3, 2))
        layers, in_ch, k = [], stem, 0
        for stage, n in enumerate(blocks):
            out_ch = int(32 * width) * 2 ** stage
            for i in range(n):
                layers.append(SqnxtBlock(in_ch, out_ch, 2 if (i == 0 and stage > 0) else 1, flip=k % 2 == 1))
                in_ch, k = out_ch, k + 1
        self.features = nn.Sequential(*layers)
        self.head = ConvBNAct(in_ch, int(128 * width), 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(int(128 * width), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.head(self.features(self.stem(x)))), 1))


register_model(ModelSpec(
    name="squeezenext-1.0-23", family="squeezenext", source="edgekit", paper="Gholami et al. 2018, arXiv:1803.10615",
    build=lambda n: SqueezeNext(n), classifier="fc", aliases=("squeezenext",),
    reference={"params_m": 0.72},
    notes="1.0-SqNxt-23, blocks [6, 6, 8, 1]. Params checked against the paper's 0.72M within ±10% "
          "(0.718M here); 269M MACs at 224 (conv + linear), not compared.",
))
