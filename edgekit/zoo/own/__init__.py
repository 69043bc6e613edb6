"""edgekit's own implementations of seed architectures (``source="edgekit"`` zoo entries).

One module per family, each written from its paper and registering its entries on
import:

=====================  =====================================  ====================
entry                  module                                 paper
=====================  =====================================  ====================
shufflenetv1-g3 / -g8  :mod:`.shufflenetv1`                   arXiv:1707.01083
squeezenext-1.0-23     :mod:`.squeezenext`                    arXiv:1803.10615
igcv3                  :mod:`.igcv3`                          arXiv:1806.00178
channelnet-v1          :mod:`.channelnet`                     arXiv:1809.01330
micronet-m1            :mod:`.micronet` (static Shift-Max)    arXiv:2108.05894
condensenet-g4c4       :mod:`.condensenet`                    arXiv:1711.09224
vgg16-hetconv-p4       :mod:`.vgg` with :class:`.convs.HetConv`   arXiv:1903.04120
vgg16-dualconv-g4      :mod:`.vgg` with :class:`.convs.DualConv`  IEEE TNNLS 2022
=====================  =====================================  ====================

All build for any ``num_classes``, run at 64x64 (stride-32 nets end on 2x2 maps),
export with :func:`edgekit.export.onnx.export_onnx` to Conv/BN(folded)/ReLU(6)/HardSwish/
Add/Concat/static Reshape-Transpose/pooling/Gemm graphs (plus constant-index Gather
in CondenseNet and MicroNet) and match torch in ONNX Runtime.

Not implemented, on purpose:

- AdderNet (Chen et al., CVPR 2020, arXiv:1912.13200) replaces the multiply-accumulate
  of a convolution by a negative L1 distance, ``-sum |x - w|``. ONNX has no such
  operator: the only exportable form is im2col + Sub + Abs + ReduceSum over a
  ``(N, C_out, C_in*k*k, H*W)`` broadcast tensor, which ONNX Runtime, TFLite and
  TensorRT run as generic elementwise kernels, orders of magnitude slower and more
  memory-hungry than the convolution it replaces, and which their int8 quantizers
  cannot turn into an integer adder kernel (there is none). The energy saving the
  paper targets needs adder hardware, which none of edgekit's targets has.
- Mitchell's approximate multiplication (Mitchell 1962; the logarithm-based
  multiplier surveyed by the seed post) approximates ``p*q`` as
  ``2^(log2~p + log2~q)`` with piecewise-linear logarithms computed from the binary
  representation. Emulating it in a graph needs bit-level integer ops on the float
  representation (BitShift/BitwiseAnd/Cast per weight and activation) around every
  product, so no runtime edgekit targets executes it faster than a real multiply,
  and the int8 path (QLinearConv / QDQ Conv, TensorRT int8, TFLite int8) always uses
  exact integer multiplies; an approximated model would only lose accuracy.
"""

from . import channelnet, condensenet, igcv3, micronet, shufflenetv1, squeezenext, vgg  # noqa: F401
from .convs import DualConv, HetConv  # noqa: F401
