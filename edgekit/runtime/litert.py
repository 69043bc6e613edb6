"""LiteRT (TFLite) runner: ai_edge_litert's Interpreter (XNNPACK on CPU), tflite_runtime as fallback.

``run`` takes float32 NCHW like every runner. NHWC models get the input
transposed; int8 / uint8 models get it quantized with the input tensor's scale and
zero point, and their output dequantized, so callers never see the difference.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from ..errors import EdgekitError
from .base import RUNTIMES, check_input


def _interpreter_class():
    """(Interpreter class, library label): ai_edge_litert first, tflite_runtime on devices without it."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, f"ai-edge-litert {md.version('ai-edge-litert')}"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, f"tflite-runtime {md.version('tflite-runtime')}"
    except ImportError:
        raise EdgekitError("Running .tflite models needs ai-edge-litert (pip install ai-edge-litert) "
                           "or, on a device, tflite-runtime") from None


def _is_nhwc(shape: Tuple[int, ...]) -> bool:
    """A 4-D image input whose last axis is the channel axis (1-4 channels, larger spatial axes)."""
    return len(shape) == 4 and shape[3] <= 4 < min(shape[1], shape[2])


def _quantize(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


@RUNTIMES.register("litert")
class LiteRTRunner:
    runtime = "litert"

    def __init__(self, path: Path, threads: Optional[int] = None, layout: Optional[str] = None):
        Interpreter, self.library = _interpreter_class()
        self.version = self.library.split()[-1]
        self.threads = int(threads or os.cpu_count() or 1)
        self.path = Path(path)
        try:
            # The default op resolver applies the XNNPACK delegate (CPU) with num_threads.
            self.interpreter = Interpreter(model_path=str(path), num_threads=self.threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EdgekitError(f"{path} is not a model LiteRT can load: {first[:200]}") from None
        inp = self.interpreter.get_input_details()
        out = self.interpreter.get_output_details()
        if len(inp) != 1:
            raise EdgekitError(f"{path} has {len(inp)} inputs; edgekit runs image classifiers with one input")
        self._in, self._out = inp[0], out[0]
        shape = tuple(int(d) for d in self._in["shape"])
        self.nhwc = (layout == "NHWC") if layout else _is_nhwc(shape)
        self.input_shape = (shape[0], shape[3], shape[1], shape[2]) if self.nhwc else shape
        self.output_shape = tuple(int(d) for d in self._out["shape"])
        self.input_dtype = np.dtype(self._in["dtype"])
        self.output_dtype = np.dtype(self._out["dtype"])
        self.input_quant = tuple(self._in["quantization"]) if self.input_dtype.kind in "iu" else None
        self.output_quant = tuple(self._out["quantization"]) if self.output_dtype.kind in "iu" else None

    def _one(self, x: np.ndarray) -> np.ndarray:
        if self.nhwc:
            x = x.transpose(0, 2, 3, 1)
        if self.input_quant is not None:
            x = _quantize(x, self.input_quant[0], self.input_quant[1], self.input_dtype)
        self.interpreter.set_tensor(self._in["index"], np.ascontiguousarray(x, dtype=self.input_dtype))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self._out["index"])
        if self.output_quant is not None:
            y = (y.astype(np.float32) - self.output_quant[1]) * np.float32(self.output_quant[0])
        return y.astype(np.float32, copy=False)

    def run(self, x: np.ndarray) -> np.ndarray:
        check_input(x, self.input_shape, self.path.name)
        x = np.asarray(x, dtype=np.float32)
        n = self.input_shape[0]
        if len(x) == n:
            return self._one(x)
        # Converted graphs have a static batch (often reshapes baked for batch 1): run in chunks of it.
        if len(x) % n:
            raise EdgekitError(f"{self.path.name} runs batches of {n}; got {len(x)} inputs")
        return np.concatenate([self._one(x[i:i + n]) for i in range(0, len(x), n)])
