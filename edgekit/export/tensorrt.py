"""TensorRT: an explicit-quantization (QDQ) or fp16 ONNX, a ``trtexec.sh``, and the engine where TensorRT exists.

The int8 QDQ ONNX follows NVIDIA's rules (``tensorrt_qdq.py``); fp16 is an fp16 ONNX with float32 I/O.
The ONNX files and ``trtexec.sh`` are written on every machine; the engine is built only where ``tensorrt``
is importable and a GPU is visible, by the same builder the device runs (``edgekit/device/build_engine.py``),
otherwise :class:`~edgekit.formats.FormatUnavailable` says why.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Dict

from torch import nn

from ..device.build_engine import build_with_api, engine_name, slug
from ..errors import EdgekitError
from ..formats import FormatUnavailable, TensorrtOptions
from .tensorrt_qdq import MIN_OPSET, quantize_for_tensorrt, trt_extra_options

# ----------------------------------------------------------------------------- fp16 ONNX


def _toposort(graph) -> None:
    avail = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                ordered.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise RuntimeError("graph has a cycle or an undefined input")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> Path:
    """fp32 ONNX -> fp16 ONNX with float32 input and output (what strongly typed TensorRT 11 builds as fp16)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    _toposort(model.graph)  # the converter appends its input / output Casts at the end
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return Path(out_path)


# ----------------------------------------------------------------------------- engine


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def engine_path(out_dir: Path, name: str, trt_version: str, gpu: str) -> Path:
    """``model.<variant>.trt<version>.<gpu>.engine`` (the device builder's naming): it loads only there."""
    return Path(out_dir) / engine_name(name, trt_version, gpu)


TRTEXEC_HEADER = """#!/bin/sh
# Build the TensorRT engines of this folder on the target device (written by edgekit).
# Engines only load with the TensorRT version and GPU they were built with, hence the names.
# TensorRT 11 removed --fp16/--int8: its networks are strongly typed and take precision from the ONNX.
set -e
cd "$(dirname "$0")"
TRT_VERSION=$(python3 -c 'import tensorrt; print(tensorrt.__version__)')
GPU=$(python3 -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null \\
      || nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
GPU=$(printf '%s' "$GPU" | sed 's/[^A-Za-z0-9.-][^A-Za-z0-9.-]*/_/g; s/^_//; s/_$//')
if [ "${TRT_VERSION%%.*}" -ge 11 ]; then FP16=""; INT8=""; else FP16="--fp16"; INT8="--int8 --fp16"; fi
"""


def trtexec_line(onnx_name: str, name: str, precision: str, workspace_mb: int = 1024) -> str:
    flags = "$INT8" if precision == "int8" else "$FP16"
    return (f"trtexec --onnx={shlex.quote(onnx_name)} {flags} "
            f"--saveEngine=\"model.{slug(name)}.trt${{TRT_VERSION}}.${{GPU}}.engine\" "
            f"--timingCacheFile=\"timing.trt${{TRT_VERSION}}.${{GPU}}.cache\" "
            f"--memPoolSize=workspace:{int(workspace_mb)}")


def write_trtexec(out_dir: Path, name: str, onnx_name: str, precision: str, workspace_mb: int = 1024) -> Path:
    """Add (or replace) this variant's command in ``out_dir/trtexec.sh``."""
    script = Path(out_dir) / "trtexec.sh"
    tag = f"# edgekit variant: {name}"
    blocks: Dict[str, str] = {}
    if script.is_file():
        lines = script.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("# edgekit variant: ") and i + 1 < len(lines):
                blocks[line] = lines[i + 1]
    blocks[tag] = trtexec_line(onnx_name, name, precision, workspace_mb)
    body = "".join(f"{k}\n{v}\n" for k, v in blocks.items())
    script.write_text(TRTEXEC_HEADER + body)
    script.chmod(0o755)
    return script


# ----------------------------------------------------------------------------- the formats-table exporter


def export_tensorrt(model: nn.Module, precision: str, options: TensorrtOptions, ctx) -> Path:
    """The ``tensorrt`` row: ONNX (fp16 or QDQ int8) + trtexec.sh always; the engine where TensorRT runs."""
    from .onnx import fp32_onnx

    if precision not in ("fp16", "int8"):
        raise EdgekitError(f"tensorrt has no {precision} variant (it supports fp16, int8)")
    workspace_mb = options.workspace_mb
    key = ("onnx-fp32", id(model))
    fp32 = ctx.cache.get(key)
    if fp32 is None or not Path(fp32).is_file():
        fp32 = ctx.path(".onnx", f"{ctx.name}.fp32-src")
        fp32_onnx(model, fp32, ctx.input_shape, opset=max(MIN_OPSET, options.opset))
        ctx.cache[key] = fp32
    src = ctx.path(".onnx", f"{ctx.name}.trt")
    if precision == "int8":
        calib, _ = ctx.task.arrays("calib", limit=options.num_calib)
        _, chosen = quantize_for_tensorrt(fp32, src, calib, calibration=options.calibration)
        ctx.info["quantization"] = {
            "tool": "onnxruntime.quantization.quantize_static (QDQ) with TensorRT rules",
            "scheme": "int8 symmetric; weights per-channel on the output-channel axis, activations per-tensor; "
                      "Q/DQ on inputs of the op_types below, residual input of Add only",
            "extra_options": trt_extra_options(), "num_calib": len(calib), **chosen}
    else:
        convert_fp16(fp32, src)
        ctx.info["onnx_fp16"] = "onnxruntime.transformers.float16 (float32 input/output)"
    script = write_trtexec(ctx.out_dir, ctx.name, src.name, precision, workspace_mb)
    ctx.info["files"] = [src.name, script.name]
    from ..runtime.tensorrt import require_tensorrt

    try:
        trt = require_tensorrt()
    except FormatUnavailable as exc:
        raise FormatUnavailable(exc.reason, artifacts=[src, script]) from None
    gpu = gpu_name()
    engine = engine_path(ctx.out_dir, ctx.name, trt.__version__, gpu)
    cache = Path(ctx.out_dir) / f"timing.trt{trt.__version__}.{slug(gpu)}.cache"
    build_with_api(trt, src, precision, engine, workspace_mb=workspace_mb, timing_cache=cache)
    ctx.info.update({"tensorrt": trt.__version__, "gpu": gpu, "timing_cache": cache.name})
    ctx.info["files"] += [engine.name, cache.name]
    return engine
