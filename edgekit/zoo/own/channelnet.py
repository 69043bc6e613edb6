"""ChannelNet-v1: group modules fused by group channel-wise convolutions.

Gao, Wang & Ji, "ChannelNets: Compact and Efficient Convolutional Neural Networks via
Channel-Wise Convolutions", NeurIPS 2018, arXiv:1809.01330. ChannelNet-v1 (Table 1)
is MobileNet v1 with the five 14x14x512 depthwise-separable layers replaced by one
group module (GM) and two group channel-wise modules (GCWM), all with g = 2:

- GM: two depthwise-separable layers whose 1x1 convolutions have 2 groups;
- GCWM: a group channel-wise convolution (g = 2 filters of size d_c = 8 sliding over
  the channel axis with stride 2, so each output group is computed from every input
  group) followed by a GM.

Skip connections as in the authors' code: around the GM and from the first GCWM's
output to the second's. Depthwise-separable layers are ``dw3x3 -> 1x1 -> BN -> ReLU6``
(no BN between the two convolutions), also as in the authors' code.

Export form: the channel-wise convolution is a 1-D convolution along channels; it is
written as a 2-D ``Conv`` with one input channel over a ``(C, H*W)`` view (kernel
``(8, 1)``, stride ``(2, 1)``) between two static Reshapes, instead of the paper's 3-D
convolution, so it runs and quantizes as an ordinary Conv.

Departure: the paper's 407M FLOPs cannot be reproduced from its own Table 1
(MobileNet's 569M minus the replaced layers gives ~468M); the parameter count (3.7M)
matches. The MAC check therefore uses a wider tolerance, see ``notes``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import ModelSpec, register_model
from .convs import ConvBNAct


class DWSConv(nn.Sequential):
    """Depthwise 3x3 (linear, no BN) then 1x1 conv (optionally grouped) + BN + ReLU6."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False),
            ConvBNAct(in_ch, out_ch, 1, groups=groups, act="relu6"),
        )


class ChannelWiseConv(nn.Module):
    """``groups`` filters of length ``kernel`` sliding over channels with stride ``groups``.

    Output channel ``f * C/g + i`` is filter ``f`` applied at channel ``g*i`` (padding
    ``(kernel - g) // 2``): ``g * kernel`` weights for any number of channels.
    """

    def __init__(self, groups: int = 2, kernel: int = 8):
        super().__init__()
        self.groups = groups
        self.conv = nn.Conv2d(1, groups, (kernel, 1), (groups, 1), ((kernel - groups) // 2, 0), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.conv(x.reshape(b, 1, c, h * w))  # (b, g, c/g, h*w)
        return y.reshape(b, c, h, w)


class GroupModule(nn.Sequential):
    def __init__(self, ch: int, groups: int = 2, layers: int = 2):
        super().__init__(*[DWSConv(ch, ch, groups=groups) for _ in range(layers)])


class GCWModule(nn.Sequential):
    def __init__(self, ch: int, groups: int = 2, layers: int = 2):
        super().__init__(ChannelWiseConv(groups, 4 * groups), GroupModule(ch, groups, layers))


class ChannelNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, groups: int = 2):
        super().__init__()
        self.stem = ConvBNAct(3, 32, 3, stride=2, act="relu6")
        self.features = nn.Sequential(
            DWSConv(32, 64), DWSConv(64, 128, 2), DWSConv(128, 128), DWSConv(128, 256, 2), DWSConv(256, 256),
            DWSConv(256, 512, 2),
        )
        self.gm = GroupModule(512, groups)
        self.gcwm1 = GCWModule(512, groups)
        self.gcwm2 = GCWModule(512, groups)
        self.tail = nn.Sequential(DWSConv(512, 1024, 2), DWSConv(1024, 1024))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        x = x + self.gm(x)
        y = self.gcwm1(x)
        x = y + self.gcwm2(y)
        return self.fc(torch.flatten(self.pool(self.tail(x)), 1))


register_model(ModelSpec(
    name="channelnet-v1", family="channelnet", source="edgekit", paper="Gao et al. 2018, arXiv:1809.01330",
    build=lambda n: ChannelNetV1(n), classifier="fc", aliases=("channelnet",),
    reference={"params_m": 3.7, "macs_m": 407},
    notes="ChannelNet-v1 (g=2, d_c=8). Params checked against the paper's 3.7M within ±10%; MACs against its "
          "407M within ±20%, because Table 1's own layers give ~468M (569M of MobileNet v1 minus the five "
          "replaced 512-ch layers plus the GM/GCWMs); the published FLOPs figure is not reproducible.",
))
