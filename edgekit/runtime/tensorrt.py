"""TensorRT runner: a serialized engine run with the tensor-name API (TensorRT 8.5+, 10.x, 11.x).

Device buffers and the CUDA stream come from torch (a core dependency, CUDA-enabled on
GPU machines and Jetson wheels). Engines are tied to the TensorRT version and GPU they
were built with; ``edgekit.export.tensorrt`` names engine files after both.
Only usable where ``tensorrt`` is importable and a CUDA GPU is visible; elsewhere
loading raises ``FormatUnavailable`` with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import EdgekitError
from ..formats import FormatUnavailable
from .base import RUNTIMES, check_input


def require_tensorrt():
    """The tensorrt module and torch with a CUDA device, or ``FormatUnavailable`` saying what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise FormatUnavailable("tensorrt is not installed here (it needs an NVIDIA GPU with CUDA: "
                                "pip install tensorrt on x86-64, JetPack on Jetson)") from None
    import torch

    if not torch.cuda.is_available():
        raise FormatUnavailable(f"tensorrt {trt.__version__} is installed but torch sees no CUDA GPU")
    return trt


@RUNTIMES.register("tensorrt")
class TensorRTRunner:
    runtime = "tensorrt"

    def __init__(self, path: Path, threads: Optional[int] = None):
        trt = require_tensorrt()
        import torch

        self.version = trt.__version__
        self.threads = int(threads or 1)  # host threads do not matter for a GPU engine; kept for the report
        self.path = Path(path)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EdgekitError(f"{path} is not an engine TensorRT {trt.__version__} can load on this GPU "
                               "(engines only load with the TensorRT version and GPU they were built with)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise EdgekitError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; "
                               "edgekit runs image classifiers with one input")
        self.input_name, self.output_name = inputs[0], outputs[0]
        self.input_shape = tuple(int(d) if d >= 0 else None for d in self.engine.get_tensor_shape(self.input_name))
        self.output_shape = tuple(int(d) if d >= 0 else None for d in self.engine.get_tensor_shape(self.output_name))
        self._dtype = {n: torch.from_numpy(np.empty(0, trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                       for n in (self.input_name, self.output_name)}
        self._stream = torch.cuda.Stream()
        self.device_name = torch.cuda.get_device_name(0)

    def _one(self, x: np.ndarray) -> np.ndarray:
        import torch

        if self.input_shape[0] is None:
            self.context.set_input_shape(self.input_name, tuple(x.shape))
        xin = torch.from_numpy(np.ascontiguousarray(x)).to("cuda", self._dtype[self.input_name])
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self._dtype[self.output_name],
                          device="cuda")
        self.context.set_tensor_address(self.input_name, xin.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        self._stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self._stream.cuda_stream):
            raise RuntimeError(f"TensorRT could not run {self.path.name}")
        self._stream.synchronize()
        return out.float().cpu().numpy()

    def run(self, x: np.ndarray) -> np.ndarray:
        check_input(x, self.input_shape, self.path.name)
        x = np.asarray(x, dtype=np.float32)
        n = self.input_shape[0]
        if n is None or len(x) == n:
            return self._one(x)
        if len(x) % n:
            raise EdgekitError(f"{self.path.name} runs batches of {n}; got {len(x)} inputs")
        return np.concatenate([self._one(x[i:i + n]) for i in range(0, len(x), n)])
