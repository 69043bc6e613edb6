"""Convolution building blocks shared by edgekit's own architectures, and two drop-in convolutions.

Everything here exports to plain ONNX ``Conv`` (BatchNorm folded at export),
``Relu``/``Clip``/``HardSwish``, ``Add``, ``Concat`` and static ``Reshape``/``Transpose``,
the ops ONNX Runtime's int8 quantizer handles well.

``HetConv`` and ``DualConv`` are drop-in replacements for a ``k x k`` ``nn.Conv2d``
(same ``(in_channels, out_channels, kernel_size, stride)`` signature):

- HetConv (Singh et al., CVPR 2019, arXiv:1903.04120): each filter applies ``k x k``
  kernels to ``1/P`` of its input channels and ``1 x 1`` kernels to the rest.
- DualConv (Zhong, Chen & Mian, IEEE TNNLS 2022): a
  ``k x k`` group convolution (``G`` groups) and a ``1 x 1`` convolution over *all*
  input channels run in parallel on the same input and are summed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ConvBNAct", "ChannelShuffle", "channel_shuffle", "bn_scale_shift", "Conv2dW", "WeightArgConv2d", "HetConv",
           "DualConv"]


def _act(name: Optional[str]) -> nn.Module:
    if name is None:
        return nn.Identity()
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish}[name](inplace=True)


class ConvBNAct(nn.Sequential):
    """``Conv2d(bias=False) -> BatchNorm2d -> activation``; the exporter folds the BN into the conv."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size=1, stride=1, padding=None, groups: int = 1,
                 act: Optional[str] = "relu"):
        if padding is None:
            padding = tuple(k // 2 for k in kernel_size) if isinstance(kernel_size, tuple) else kernel_size // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            _act(act),
        )


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle (arXiv:1707.01083, Sec. 3.1): ``(g, c/g) -> (c/g, g)``.

    Exports as Reshape/Transpose/Reshape; with the static batch size edgekit exports
    with, every shape is a constant.
    """
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups) if self.groups > 1 else x

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift`` (per channel), for folding into convs."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


class Conv2dW(nn.Conv2d):
    """``nn.Conv2d`` whose forward optionally takes a replacement weight and bias (e.g. BN-folded)."""

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None,  # type: ignore[override]
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if weight is None:
            return super().forward(x)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class WeightArgConv2d(nn.Conv2d):
    """A convolution that takes its weight as a forward argument and owns no parameter.

    For layers whose executed weight is derived from another parameter (HetConv's
    zero-padded 1x1 weight, CondenseNet's condensed slice). Being an ``nn.Conv2d``, it
    is what parameter/MAC counters and the exporter see; the derived weight is
    constant-folded into one initializer at export.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=1, stride=1, padding=0, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        del self.weight
        self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class HetConv(nn.Module):
    """Heterogeneous-kernel convolution, part ``P`` (arXiv:1903.04120).

    A filter holds ``M/P`` ``k x k`` kernels and ``M - M/P`` ``1 x 1`` kernels, so a layer
    has exactly the paper's ``(k^2 M/P + M - M/P) N`` weights. It is computed as two
    standard convolutions that any runtime runs:

    - ``gwc``: a ``k x k`` group convolution with ``P`` groups (filter group ``j`` sees
      input block ``j``);
    - ``pwc``: a ``1 x 1`` convolution whose weight is zero on the block that filter
      group already covers with ``k x k`` kernels. Only the non-zero part is a
      parameter; the full ``1 x 1`` weight is assembled in ``forward`` with a static
      ``Concat`` and constant-folded into one initializer at export.

    Departures from the paper: (1) the paper places the ``k x k`` kernels in a shifted
    (strided) pattern, this layer in contiguous blocks; the two differ only by a fixed
    relabelling of input and output channels, so a network trained from scratch has
    the same function class. (2) On a standard runtime the ``1 x 1`` part runs as a
    dense ``1 x 1`` convolution with zeros, so the executed MACs are those of
    ``DualConv`` (``k^2 M N/P + M N`` per pixel); the paper's ``(k^2/P + 1 - 1/P) M N``
    assumes a kernel that skips the zeros. ``count_macs`` reports the executed figure.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, p: int = 4,
                 bias: bool = False):
        super().__init__()
        if in_channels % p or out_channels % p:
            raise ValueError(f"HetConv: P={p} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.p = in_channels, out_channels, p
        self.stride = stride
        self.gwc = Conv2dW(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=p, bias=bias)
        m, n = in_channels // p, out_channels // p
        # pwc weight of filter group j: its 1x1 kernels on every input block except block j
        self.pwc_weight = nn.Parameter(torch.empty(p, n, in_channels - m))
        nn.init.kaiming_uniform_(self.pwc_weight.view(out_channels, -1), a=5 ** 0.5)
        self.pwc = WeightArgConv2d(in_channels, out_channels, 1, stride)

    def pointwise_weight(self) -> torch.Tensor:
        """The dense ``(N, M, 1, 1)`` 1x1 weight with zeros where the kxk kernels are."""
        p, n, rest = self.pwc_weight.shape
        m = self.in_channels // p
        zeros = self.pwc_weight.new_zeros(n, m)
        rows = []
        for j in range(p):
            w = self.pwc_weight[j]
            rows.append(torch.cat([w[:, :j * m], zeros, w[:, j * m:]], dim=1))
        return torch.cat(rows, 0)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gwc(x) + self.pwc(x, self.pointwise_weight())

    def forward_bn(self, x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        """``bn(self(x))`` with an eval-mode BN folded into both convolutions (two Convs + Add at export)."""
        scale, shift = bn_scale_shift(bn)
        bias = shift if self.gwc.bias is None else shift + self.gwc.bias * scale
        s = scale[:, None, None, None]
        return self.gwc(x, self.gwc.weight * s, bias) + self.pwc(x, self.pointwise_weight() * s)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, p={self.p}, stride={self.stride}"


class DualConv(nn.Module):
    """Dual convolutional kernels with ``G`` groups (Zhong, Chen & Mian, IEEE TNNLS 2022).

    ``k x k`` group convolution (``G`` groups) + ``1 x 1`` convolution over all input
    channels, summed: ``(k^2 M/G + M) N`` weights. Both branches are standard convs, so
    a deployed DualConv is two Conv nodes and an Add (merging them into one ``k x k``
    conv would make it dense). A following BN is folded into both by ``forward_bn``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, g: int = 4,
                 bias: bool = False):
        super().__init__()
        if in_channels % g or out_channels % g:
            raise ValueError(f"DualConv: G={g} must divide in_channels={in_channels} and out_channels={out_channels}")
        self.in_channels, self.out_channels, self.g = in_channels, out_channels, g
        self.gc = Conv2dW(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=g, bias=bias)
        self.pwc = Conv2dW(in_channels, out_channels, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gc(x) + self.pwc(x)

    def forward_bn(self, x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
        """``bn(self(x))`` with an eval-mode BN folded into both convolutions (two Convs + Add at export)."""
        scale, shift = bn_scale_shift(bn)
        bias = shift if self.gc.bias is None else shift + self.gc.bias * scale
        s = scale[:, None, None, None]
        return self.gc(x, self.gc.weight * s, bias) + self.pwc(x, self.pwc.weight * s)

    def extra_repr(self) -> str:
        return f"g={self.g}"
