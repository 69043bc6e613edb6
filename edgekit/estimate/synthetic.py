"""Random mobile CNNs: the one random-network generator of the estimator.

The kernel tables are timed on them (``kernels/calibrate.py``), ``edgekit devices check`` rebuilds a table's own
networks from their seeds (``check.py``), and the roofline's calibration times a few (``calibrate.py``). Each is a
stem, four stages of blocks drawn from lightweight CNNs (inverted residuals with squeeze-excite, depthwise-separable,
ShuffleNet v1/v2, Fire, Ghost, SqueezeNext, dense/CondenseNet layers, grouped pairs, MicroNet-style, channel-axis
convolutions) and a head, with random widths, kernels, groups, activations and input size; no zoo architecture is
copied. Changing what a seed builds invalidates every shipped kernel table (``devices check`` refuses them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ACTS = ("relu", "relu6", "hswish", "silu")
LONG_EVERY = 4  # every fourth calibration network of a kernel table is long and narrow (``RandomNet(long=True)``)


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "hswish": nn.Hardswish(), "silu": nn.SiLU(),
            "none": nn.Identity()}[name]


def cbr(cin, cout, k=1, s=1, g=1, act="relu", kh=None, kw=None) -> nn.Sequential:
    kh, kw = kh or k, kw or k
    return nn.Sequential(nn.Conv2d(cin, cout, (kh, kw), s, (kh // 2, kw // 2), groups=g, bias=False),
                         nn.BatchNorm2d(cout), _act(act))


def shuffle(x, g: int):
    n, c, h, w = x.shape
    return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


class Shuffle(nn.Module):
    def __init__(self, g: int):
        super().__init__()
        self.g = g

    def forward(self, x):
        return shuffle(x, self.g)


class SE(nn.Module):
    def __init__(self, c, r, gate, mean):
        super().__init__()
        self.mean, self.gate = mean, gate
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True) if self.mean else F.adaptive_avg_pool2d(x, 1)
        s = self.fc2(F.relu(self.fc1(s)))
        return x * (torch.sigmoid(s) if self.gate == "sigmoid" else F.hardsigmoid(s))


class MB(nn.Module):
    def __init__(self, cin, cout, s, t, k, act, se, r):
        super().__init__()
        mid = cin * t
        self.res = s == 1 and cin == cout
        layers = ([cbr(cin, mid, 1, act=act)] if t > 1 else []) + [cbr(mid, mid, k, s, mid, act)]
        if se:
            layers.append(SE(mid, max(8, mid // 4), r.choice(["sigmoid", "hsig"]), bool(r.integers(2))))
        layers.append(cbr(mid, cout, 1, act="none"))
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        y = self.body(x)
        return x + y if self.res else y


class ShuffleV2(nn.Module):
    def __init__(self, cin, cout, s, k, act):
        super().__init__()
        self.s = s
        half = cout // 2
        bin_ = cin if s == 2 else cin - cin // 2
        self.branch = nn.Sequential(cbr(bin_, half, 1, act=act), cbr(half, half, k, s, half, "none"),
                                    cbr(half, cout - (cin // 2 if s == 1 else half), 1, act=act))
        self.proj = nn.Sequential(cbr(cin, cin, k, s, cin, "none"), cbr(cin, half, 1, act=act)) if s == 2 else None

    def forward(self, x):
        if self.s == 1:
            a, b = x.split([x.shape[1] // 2, x.shape[1] - x.shape[1] // 2], dim=1)
            y = torch.cat([a, self.branch(b)], 1)
        else:
            y = torch.cat([self.proj(x), self.branch(x)], 1)
        return shuffle(y, 2) if y.shape[1] % 2 == 0 else y


class ShuffleV1(nn.Module):
    def __init__(self, c, g, act):
        super().__init__()
        self.g = g
        self.pw1 = cbr(c, c, 1, g=g, act=act)
        self.dw = cbr(c, c, 3, 1, c, "none")
        self.pw2 = cbr(c, c, 1, g=g, act="none")

    def forward(self, x):
        return F.relu(x + self.pw2(self.dw(shuffle(self.pw1(x), self.g))))


class Fire(nn.Module):
    def __init__(self, cin, cout, act):
        super().__init__()
        sq = max(8, cin // 8)
        self.sq, self.e1, self.e3 = cbr(cin, sq, 1, act=act), cbr(sq, cout // 2, 1, act=act), \
            cbr(sq, cout - cout // 2, 3, act=act)

    def forward(self, x):
        s = self.sq(x)
        return torch.cat([self.e1(s), self.e3(s)], 1)


class Ghost(nn.Module):
    def __init__(self, cin, cout, act):
        super().__init__()
        self.cout = cout
        init = -(-cout // 2)
        self.primary, self.cheap = cbr(cin, init, 1, act=act), cbr(init, init, 3, 1, init, act)
        self.res = cin == cout

    def forward(self, x):
        p = self.primary(x)
        y = torch.cat([p, self.cheap(p)], 1)[:, : self.cout]
        return x + y if self.res else y


class SqNext(nn.Module):
    def __init__(self, c, act):
        super().__init__()
        a, b = max(8, c // 2), max(8, c // 4)
        self.body = nn.Sequential(cbr(c, a, 1, act=act), cbr(a, b, 1, act=act), cbr(b, a, kh=3, kw=1, act=act),
                                  cbr(a, a, kh=1, kw=3, act=act), cbr(a, c, 1, act="none"))

    def forward(self, x):
        return F.relu(x + self.body(x))


class DenseLayer(nn.Module):
    """BN-ReLU first (so the BN cannot fold into a conv), a channel gather, grouped convs, concat."""

    def __init__(self, cin, growth, g, r):
        super().__init__()
        keep = max(g, cin - cin // 4) // g * g
        self.register_buffer("idx", torch.as_tensor(np.sort(r.permutation(cin)[:keep]), dtype=torch.long))
        self.bn = nn.BatchNorm2d(cin)
        mid = 4 * growth // g * g or g
        self.conv1 = nn.Conv2d(keep, mid, 1, groups=g, bias=False)
        self.conv2 = cbr(mid, growth, 3, g=g if growth % g == 0 else 1)

    def forward(self, x):
        y = torch.index_select(F.relu(self.bn(x)), 1, self.idx)
        return torch.cat([x, self.conv2(shuffle(self.conv1(y), 1))], 1)


class GroupPair(nn.Module):
    """HetConv / DualConv style: a grouped kxk conv and a pointwise conv on the same input, summed."""

    def __init__(self, cin, cout, s, g):
        super().__init__()
        self.a = nn.Conv2d(cin, cout, 3, s, 1, groups=g, bias=False)
        self.b = nn.Conv2d(cin, cout, 1, s, 0, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.a(x) + self.b(x)))


class Micro(nn.Module):
    """MicroNet style: depthwise with a channel multiplier, grouped 1x1 convs with a few channels per group,
    channel shuffles; channel counts that are not multiples of 8."""

    def __init__(self, cin, cout, s, r):
        super().__init__()
        m = int(r.choice([2, 3, 4]))
        # groups from a few up to one output channel per group (MicroNet's 1152 -> 576 in 576 groups)
        # (one or two output channels per group drawn three times as often: a conv with hundreds of groups
        # costs about 0.15 µs a group, which the predictors only learn from enough of them)
        cands = [d for d in (2, 4, 8, cin * m // 4, cin * m // 2, cin * m, cout // 2, cout, cout // 2, cout,
                             cout // 2, cout)
                 if d >= 1 and (cin * m) % d == 0 and cout % d == 0]
        g1 = int(r.choice(cands or [1]))
        self.g1 = g1
        self.dw = cbr(cin, cin * m, 3, s, cin, "relu6")
        self.pw = cbr(cin * m, cout, 1, g=g1, act="none")
        self.res = s == 1 and cin == cout

    def forward(self, x):
        y = self.pw(shuffle(self.dw(x), self.g1) if self.g1 > 1 else self.dw(x))
        return x + y if self.res else y


class ChannelConv(nn.Module):
    """A 1-D convolution along the channel axis, written as a one-input-channel 2-D Conv over a
    (C, H*W) view between two Reshapes: a channel-wise convolution (``g`` filters of length ``k``
    sliding over channels with stride ``g``, so the channel count is kept), or, with ``attention``,
    ECA-style channel attention (the same kind of conv over the pooled channel descriptor, a sigmoid
    gate)."""

    def __init__(self, g, k, attention):
        super().__init__()
        self.attention = attention
        self.conv = nn.Conv2d(1, g, (k, 1), (g, 1), ((k - g) // 2, 0), bias=attention)

    def forward(self, x):
        b, c, h, w = x.shape
        if self.attention:
            s = self.conv(x.mean((2, 3)).reshape(b, 1, c, 1)).reshape(b, c, 1, 1)
            return x * torch.sigmoid(s)
        return self.conv(x.reshape(b, 1, c, h * w)).reshape(b, c, h, w)


class RandomNet(nn.Module):
    """A random mobile CNN: ``seed`` draws its architecture and input size (its weights come from torch's RNG); a
    ``long`` one has 3-8 blocks a stage at half the width (100-270 small kernels), the others 1-3."""

    def __init__(self, seed: int, long: bool = False):
        super().__init__()
        r = np.random.default_rng(seed)
        self.long = bool(long)
        self.size = int(r.choice([32, 48, 64, 64, 64, 80, 96]))
        act = str(r.choice(ACTS))
        w = self.width = float(r.choice([0.25, 0.5, 0.75, 1.0, 1.5, 2.0])) / (2.0 if self.long else 1.0)
        c = max(8, int(r.choice([8, 12, 16, 24, 32, 48, 64]) * max(w, 0.5)))
        if r.random() < 0.15:  # a narrow stem at full resolution (MicroNet: 3 -> 3, then depthwise x2)
            layers = [cbr(3, 3, 3, 2, act=act), cbr(3, 6, 3, 2, 3, act)]
            layers.append(cbr(6, c, 1, act=act))
        else:
            layers = [cbr(3, c, int(r.choice([3, 3, 5, 7])), int(r.choice([1, 2, 2])), act=act)]
        if r.random() < 0.4:
            layers.append(nn.MaxPool2d(3, 2, 1))
        widths = [int(v * w) for v in r.choice([[24, 40, 80, 160], [32, 64, 128, 256], [48, 96, 192, 384],
                                                 [16, 32, 64, 128], [64, 128, 256, 512], [40, 80, 160, 320],
                                                 [58, 116, 232, 464], [30, 60, 120, 240], [72, 144, 288, 576]])]
        self.blocks = []
        for stage in range(4):
            cout = max(8, widths[stage])
            self.blocks.append(int(r.integers(3, 9) if self.long else r.integers(1, 4)))
            for j in range(self.blocks[-1]):
                s = 2 if j == 0 and stage > 0 else 1
                kind = str(r.choice(["mb", "mb", "dwsep", "shufflev2", "shufflev1", "fire", "ghost", "sqnext",
                                     "dense", "pair", "conv", "gconv", "gconv", "micro", "micro", "chanconv"]))
                a = str(r.choice(ACTS)) if r.random() < 0.3 else act
                if kind in ("shufflev1", "sqnext", "dense") and s == 2:
                    layers.append(nn.AvgPool2d(2, 2) if r.random() < 0.5 else cbr(c, c, 3, 2, c, "none"))
                    s = 1
                if kind == "chanconv" and s == 2:
                    layers.append(cbr(c, c, 3, 2, c, "none"))
                    s = 1
                if kind == "mb":
                    blk = MB(c, cout if j == 0 else c, s, int(r.choice([1, 2, 3, 4, 6])), int(r.choice([3, 5, 7])),
                             a, r.random() < 0.4, r)
                    c = cout if j == 0 else c
                elif kind == "dwsep":
                    blk = nn.Sequential(cbr(c, c, int(r.choice([3, 5])), s, c, a), cbr(c, cout, 1, act=a))
                    c = cout
                elif kind == "shufflev2":
                    co = cout if s == 2 else c
                    blk = ShuffleV2(c, co - co % 2, s, int(r.choice([3, 5])), a)
                    c = co - co % 2
                elif kind == "shufflev1":
                    g = int(r.choice([g for g in (2, 3, 4, 8, 16) if c % g == 0] or [1]))
                    blk = ShuffleV1(c, g, a)
                elif kind == "fire":
                    blk = Fire(c, cout if s == 1 else c, a)
                    if s == 2:
                        blk = nn.Sequential(nn.MaxPool2d(3, 2, 1), blk)
                    c = cout if s == 1 else c
                elif kind == "ghost":
                    blk = Ghost(c, cout if j == 0 else c, a)
                    if s == 2:
                        blk = nn.Sequential(cbr(c, c, 3, 2, c, "none"), blk)
                    c = cout if j == 0 else c
                elif kind == "sqnext":
                    blk = SqNext(c, a)
                elif kind == "dense":
                    g = int(r.choice([1, 2, 4]))
                    growth = int(r.choice([8, 12, 16, 32]))
                    blk = DenseLayer(c, growth, g, r)
                    c += growth
                elif kind == "pair":
                    g = int(r.choice([g for g in (2, 4, 8) if c % g == 0 and cout % g == 0] or [1]))
                    blk = GroupPair(c, cout, s, g)
                    c = cout
                elif kind == "micro":
                    co = cout if j == 0 else c
                    co = co + int(r.choice([0, 0, 2, 4, 6]))  # off the 8-channel grid now and then
                    blk = Micro(c, co, s, r)
                    c = co
                elif kind == "chanconv":
                    g = int(r.choice([g for g in (1, 2, 4) if c % g == 0]))
                    k = int(r.choice([k for k in (3, 5, 4 * g, 8) if (k - g) % 2 == 0]))
                    blk = ChannelConv(g, k, r.random() < 0.3)
                    if not blk.attention:
                        blk = nn.Sequential(blk, cbr(c, c, 1, g=int(r.choice([1, 2])) if c % 2 == 0 else 1, act=a))
                elif kind == "gconv":
                    # from a few groups to a few channels per group (MicroNet, CondenseNet, IGCV), kept or
                    # changed width, a channel shuffle after a grouped 1x1 now and then
                    co = int(r.choice([cout, cout, c, c // 2])) if s == 1 else cout
                    co = max(8, co)
                    g = int(r.choice([g for g in (2, 4, 8, 16, 32, 64, c // 8, c // 4, c // 2)
                                      if g >= 2 and c % g == 0 and co % g == 0] or [1]))
                    k = int(r.choice([1, 1, 3]))
                    blk = cbr(c, co, k, s, g, a)
                    if k == 1 and g > 1 and r.random() < 0.5:
                        blk = nn.Sequential(blk, Shuffle(g))
                    c = co
                else:
                    blk = cbr(c, cout, 3, s, act=a)
                    c = cout
                layers.append(blk)
        feats = int(r.choice([c, 512, 1024, 1280]))
        layers.append(cbr(c, feats, 1, act=act))
        self.features = nn.Sequential(*layers)
        self.mean_head = bool(r.integers(2))
        self.fc = nn.Linear(feats, 10)
        for m in self.modules():  # non-trivial BN statistics: folding must not be a no-op
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)

    @property
    def input_shape(self):
        return (1, 3, self.size, self.size)

    def forward(self, x):
        y = self.features(x)
        y = y.mean((2, 3)) if self.mean_head else torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
        return self.fc(y)


def is_long(index: int) -> bool:
    """Whether a kernel table's calibration network ``net{index}`` is a long one (``LONG_EVERY``)."""
    return index % LONG_EVERY == LONG_EVERY - 1


def export_random_net(seed: int, path: Path, long: bool = False) -> Tuple[Path, Tuple[int, ...]]:
    """``RandomNet(seed, long)``, its weights drawn after ``torch.manual_seed(seed)``, exported to ONNX at its own input
    size: (the ONNX file, the input shape). The same seed always gives the same graph."""
    from ..export.onnx import export_onnx

    torch.manual_seed(seed)
    net = RandomNet(seed, long=long).eval()
    return export_onnx(net, path, net.input_shape), net.input_shape
