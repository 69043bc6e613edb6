"""An ONNX file the user brings, standing where a PyTorch model stands in the pipeline.

The exporters see an :class:`OnnxModel` instead of an ``nn.Module``: the ONNX rows start from the file (its input
fixed to the run's static shape, which int8 calibration and the layout search need), TensorRT's QDQ graph is made
from it, and converters that need PyTorch (TFLite through litert-torch) say they cannot. No torch import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..errors import EdgekitError


@dataclass
class OnnxModel:
    path: Path
    input_name: str
    input_shape: Tuple[int, int, int, int]  # (1, C, H, W), static
    num_classes: int
    opset: int

    @classmethod
    def load(cls, path: str | Path, input_size: Optional[int] = None) -> "OnnxModel":
        """Read and check the file: one float NCHW image input and a (1, classes) output. ``input_size`` fixes
        spatial axes the file leaves dynamic (and must agree with static ones)."""
        import onnx

        path = Path(path)
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - not protobuf, truncated ...
            raise EdgekitError(f"Cannot read {path} as ONNX: {type(exc).__name__}: {str(exc)[:200]}") from None
        inits = {i.name for i in proto.graph.initializer}
        inputs = [i for i in proto.graph.input if i.name not in inits]
        if len(inputs) != 1:
            raise EdgekitError(f"{path.name} has {len(inputs)} inputs; edgekit runs image classifiers with one")
        inp = inputs[0]
        t = inp.type.tensor_type
        if t.elem_type != onnx.TensorProto.FLOAT:
            raise EdgekitError(f"{path.name}: input {inp.name!r} is {onnx.TensorProto.DataType.Name(t.elem_type)}, "
                               "not float32")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if len(dims) != 4:
            raise EdgekitError(f"{path.name}: input {inp.name!r} has {len(dims)} dimensions; edgekit expects NCHW")
        _, c, h, w = dims
        if c is None or c not in (1, 3, 4):
            raise EdgekitError(f"{path.name}: input {inp.name!r} has shape {dims}: the channel axis (second) must "
                               "be 1, 3 or 4 (an NHWC input is not supported)")
        if h is not None and w is not None and h != w:
            raise EdgekitError(f"{path.name}: input is {h}x{w}; edgekit's tasks feed square images")
        static = h if h is not None else w
        if static is None and input_size is None:
            raise EdgekitError(f"{path.name}: the input's height and width are dynamic ({inp.name} {dims}); "
                               "give --input-size")
        if static is not None and input_size is not None and input_size != static:
            raise EdgekitError(f"{path.name} takes {static}x{static} images, not --input-size {input_size}")
        size = int(static or input_size)
        outs = proto.graph.output
        odims = [d.dim_value if d.HasField("dim_value") else None for d in outs[0].type.tensor_type.shape.dim]
        if len(odims) != 2 or odims[1] is None:
            raise EdgekitError(f"{path.name}: first output {outs[0].name!r} has shape {odims}; edgekit evaluates "
                               "classifiers with a (batch, classes) output")
        opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
        return cls(path, inp.name, (1, int(c), size, size), int(odims[1]), int(opset))

    def save_static(self, out: str | Path, min_opset: int = 13) -> Path:
        """The graph with its input (and batch axes) fixed to ``input_shape``, shapes inferred and checked; an
        opset below ``min_opset`` is converted up (per-channel int8 Q/DQ needs 13)."""
        import onnx

        proto = onnx.load(str(self.path))
        if self.opset < min_opset:
            from onnx import version_converter

            try:
                proto = version_converter.convert_version(proto, min_opset)
            except Exception as exc:  # noqa: BLE001
                raise EdgekitError(f"{self.path.name} has opset {self.opset}; converting it to {min_opset} (what "
                                   f"int8 needs) failed: {str(exc).splitlines()[0][:200]}") from None
        for i in proto.graph.input:
            if i.name == self.input_name:
                for d, v in zip(i.type.tensor_type.shape.dim, self.input_shape):
                    d.Clear()
                    d.dim_value = v
        for o in proto.graph.output:
            dims = o.type.tensor_type.shape.dim
            if dims and not dims[0].HasField("dim_value"):
                dims[0].Clear()
                dims[0].dim_value = 1
        del proto.graph.value_info[:]  # stale dynamic shapes would contradict the static input
        try:
            proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
            onnx.checker.check_model(proto)
        except Exception as exc:  # noqa: BLE001
            raise EdgekitError(f"{self.path.name} does not run at input {list(self.input_shape)}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        onnx.save(proto, str(out))
        return Path(out)

    def stats(self) -> dict:
        """Parameters (float initializers) and multiply-accumulates of Conv / Gemm / MatMul at ``input_shape``."""
        import onnx

        proto = onnx.load(str(self.path))
        params = sum(int(np.prod(i.dims)) for i in proto.graph.initializer
                     if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
        for i in proto.graph.input:
            if i.name == self.input_name:
                for d, v in zip(i.type.tensor_type.shape.dim, self.input_shape):
                    d.Clear()
                    d.dim_value = v
        del proto.graph.value_info[:]
        try:
            proto = onnx.shape_inference.infer_shapes(proto)
        except Exception:  # noqa: BLE001 - MACs are left unknown
            return {"params": params, "macs": 0}
        shapes = {}
        for vi in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input):
            shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        for i in proto.graph.initializer:
            shapes[i.name] = list(i.dims)
        macs = 0
        for n in proto.graph.node:
            if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in shapes and n.output[0] in shapes:
                w, y = shapes[n.input[1]], shapes[n.output[0]]
                macs += int(np.prod(y)) * int(np.prod(w[1:]))
            elif n.op_type in ("Gemm", "MatMul") and n.input[1] in shapes and n.output[0] in shapes:
                w, y = shapes[n.input[1]], shapes[n.output[0]]
                k = w[0] if n.op_type == "MatMul" or not any(a.name == "transB" and a.i for a in n.attribute) else w[1]
                macs += int(np.prod(y)) * int(k)
        return {"params": params, "macs": macs}
