"""ONNX Runtime runner (CPU by default; CUDA when the profile asks and the provider exists)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import EdgekitError
from .base import RUNTIMES, check_input


@RUNTIMES.register("onnxruntime")
class OrtRunner:
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                 simulate_qdq: bool = False):
        """``simulate_qdq`` runs a QDQ graph's quantize/dequantize pairs as written, in float (no fused int8
        kernels): what a TensorRT QDQ model computes, without the CPU's own int8 arithmetic."""
        import onnxruntime as ort

        self.version = ort.__version__
        opts = ort.SessionOptions()
        self.threads = int(threads or os.cpu_count() or 1)
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if simulate_qdq else \
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # Stop the pool's spinning when a Run ends: idle sessions beside the timed one (variants timed round-robin)
        # otherwise spin on its cores; identical sessions then gave p50s from 2.2 to 5.9 ms, and 1.5-1.6 ms with
        # this (bench/ort_spinning.py; onnxruntime#5363, #11841).
        opts.add_session_config_entry("session.force_spinning_stop", "1")
        avail = ort.get_available_providers()
        want = [p for p in (providers or ["CPUExecutionProvider"]) if p in avail] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=want)
        except Exception as exc:
            raise EdgekitError(f"{path} is not a model ONNX Runtime can load: {str(exc).splitlines()[0][:200]}") \
                from None
        self.providers = self.session.get_providers()
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inp.shape)
        self.output_shape = tuple(d if isinstance(d, int) else None for d in self.session.get_outputs()[0].shape)
        self.path = Path(path)

    def run(self, x: np.ndarray) -> np.ndarray:
        check_input(x, self.input_shape, self.path.name)
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
