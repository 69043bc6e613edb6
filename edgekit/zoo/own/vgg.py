"""VGG-16 with HetConv or DualConv layers, as both papers evaluated them.

HetConv (arXiv:1903.04120, Sec. 4.1) and DualConv (Zhong, Chen & Mian, IEEE TNNLS
2022) report VGG-16 on CIFAR-10 with every 3x3 convolution except the first replaced
by their layer (HetConv P = 4 and DualConv G = 4 are among the settings reported).
This is that CIFAR-style VGG-16: the 13 conv layers (64-64-M-128-128-M-256x3-M-512x3-M
-512x3-M), each followed by BN-ReLU, then global average pooling and one Linear
classifier (the ImageNet VGG's 4096-wide FC layers are not used). In eval mode
(and so at export) each BN is folded into both convolutions of the layer before it.

The papers give figures for these networks at 32x32 (CIFAR) only, so no 224x224
reference is recorded; the tests check each layer's weight count against the papers'
formulas instead: HetConv ``(9/P + 1 - 1/P) M N``, DualConv ``(9/G + 1) M N``.
At 224x224 the body costs ~5 GMACs, far from the other lightweight entries; at the
default 64x64 task size it is ~0.45 GMACs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..registry import ModelSpec, register_model
from .convs import DualConv, HetConv

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class ConvBNReLU(nn.Module):
    """A HetConv/DualConv, BN and ReLU; in eval mode the BN is folded into both of the layer's convs."""

    def __init__(self, conv: nn.Module, out_ch: int):
        super().__init__()
        self.conv, self.bn, self.relu = conv, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn.training:
            return self.relu(self.bn(self.conv(x)))
        return self.relu(self.conv.forward_bn(x, self.bn))


class VGG(nn.Module):
    def __init__(self, conv: Callable[[int, int], nn.Module], num_classes: int = 1000, config=VGG16):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            if in_ch == 3:  # the first conv stays standard in both papers
                layers += [nn.Conv2d(in_ch, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers.append(ConvBNReLU(conv(in_ch, v), v))
            in_ch = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


register_model(ModelSpec(
    name="vgg16-hetconv-p4", family="hetconv", source="edgekit", paper="Singh et al. 2019, arXiv:1903.04120",
    build=lambda n: VGG(lambda i, o: HetConv(i, o, 3, p=4), n), classifier="classifier",
    notes="CIFAR-style VGG-16 (BN, global pool, one FC) with HetConv P=4 in all but the first conv. "
          "Exact HetConv weight count; executed MACs include the zero 1x1 positions (see HetConv). "
          "No 224 reference: the paper reports this net at 32x32 only.",
))
register_model(ModelSpec(
    name="vgg16-dualconv-g4", family="dualconv", source="edgekit", paper="Zhong, Chen & Mian 2022, IEEE TNNLS",
    build=lambda n: VGG(lambda i, o: DualConv(i, o, 3, g=4), n), classifier="classifier",
    notes="CIFAR-style VGG-16 (BN, global pool, one FC) with DualConv G=4 in all but the first conv. "
          "No 224 reference: the paper reports this net at 32x32 only.",
))
