#!/usr/bin/env python3
"""edgekit's standalone device runner: benchmark a model or run one input through it.

This file is copied to a device and run there; it must not import edgekit.
It runs on Python 3.6+ (JetPack 4) and needs the standard library, numpy, and one runtime for the model's format:

  .onnx            onnxruntime
  .tflite          ai_edge_litert (LiteRT), else tflite_runtime, else tensorflow
  .engine / .plan  tensorrt (+ torch or cuda-python for device buffers)

Usage:
  python3 runner.py bench MODEL [--warmup N] [--runs N] [--threads N]
  python3 runner.py predict MODEL INPUT.npy OUT.npy [--threads N] [--detections [--score S --iou I --max-det N]]
  python3 runner.py info

predict on a full-integer .tflite takes float input and writes float output, converted with the
model's own input / output scale and zero point (as the host's evaluation does).

Every command prints exactly one JSON object on stdout. Exit codes:
  0 ok, 2 bad arguments or unreadable model/input, 3 no runtime for the model's format, 4 runtime failure.
"""

import argparse
import json
import os
import platform
import sys
import time

RUNNER_VERSION = 1

EXIT_OK, EXIT_USAGE, EXIT_NO_RUNTIME, EXIT_RUNTIME_FAILED = 0, 2, 3, 4

# suffix -> (runtime names in the order tried, the install hint for the device)
SUFFIX_RUNTIMES = {
    ".onnx": (("onnxruntime",), "install onnxruntime"),
    ".tflite": (("ai_edge_litert", "tflite_runtime", "tensorflow"), "install ai-edge-litert (or tflite-runtime)"),
    ".engine": (("tensorrt",), "install TensorRT's Python bindings (JetPack ships them)"),
    ".plan": (("tensorrt",), "install TensorRT's Python bindings (JetPack ships them)"),
}


class RunnerError(Exception):
    def __init__(self, message: str, code: int = EXIT_USAGE, **extra):
        super().__init__(message)
        self.code = code
        self.extra = extra


# ----------------------------------------------------------------------------- helpers


def _percentile(sorted_values, q: float) -> float:
    """numpy's default (linear) percentile of an already sorted list."""
    if not sorted_values:
        raise ValueError("no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms) -> dict:
    s = sorted(times_ms)
    return {"p50": _percentile(s, 50), "p90": _percentile(s, 90), "mean": sum(s) / len(s), "min": s[0],
            "max": s[-1], "runs": len(s)}


def machine_info() -> dict:
    return {"machine": platform.machine(), "system": platform.system(), "node": platform.node(),
            "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "python_executable": sys.executable}


def _import_numpy():
    try:
        import numpy as np
    except ImportError:
        raise RunnerError(f"numpy is not installed for {sys.executable} on this device: install numpy",
                          EXIT_NO_RUNTIME) from None
    return np


def _missing_runtime(suffix: str) -> RunnerError:
    names, hint = SUFFIX_RUNTIMES[suffix]
    return RunnerError(f"no runtime for {suffix} on this device: {hint} "
                       f"(tried {', '.join(names)} with {sys.executable})", EXIT_NO_RUNTIME, tried=list(names))


def _dim(d) -> int:
    """A fixed dimension as int (numpy ints included: LiteRT reports int32); symbolic or unknown -> 1."""
    try:
        d = int(d)
    except (TypeError, ValueError):
        return 1
    return d if d > 0 else 1


def _random_input(np, shape, dtype, rng):
    shape = tuple(_dim(d) for d in shape)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.randint(max(info.min, -128), min(info.max, 127) + 1, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.randint(0, 2, size=shape).astype(dtype)
    raise RunnerError(f"cannot make a random input of type {dtype}")


# ----------------------------------------------------------------------------- runtimes
# Each backend: .runtime, .version, .threads, .inputs [(name, shape, numpy dtype)], .run(list of arrays) -> list


class OrtBackend:
    def __init__(self, path: str, threads: int):
        try:
            import onnxruntime as ort
        except ImportError:
            raise _missing_runtime(".onnx") from None
        np = _import_numpy()
        self.runtime, self.version = "onnxruntime", ort.__version__
        opts = ort.SessionOptions()
        self.threads = threads
        if threads:
            opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - the message is what the user needs
            raise RunnerError(f"onnxruntime cannot load {os.path.basename(path)}: {str(exc).splitlines()[0][:300]}")
        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                 "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32,
                 "tensor(int64)": np.int64, "tensor(bool)": np.bool_}
        self.inputs = [(i.name, [d if isinstance(d, int) else 1 for d in i.shape], types.get(i.type, np.float32))
                       for i in self.session.get_inputs()]

    def run(self, arrays):
        return self.session.run(None, {name: a for (name, _, _), a in zip(self.inputs, arrays)})


class LiteRTBackend:
    def __init__(self, path: str, threads: int):
        Interpreter, self.runtime, self.version = None, None, None
        for mod in SUFFIX_RUNTIMES[".tflite"][0]:
            try:
                if mod == "ai_edge_litert":
                    from ai_edge_litert.interpreter import Interpreter
                elif mod == "tflite_runtime":
                    from tflite_runtime.interpreter import Interpreter
                else:
                    import tensorflow as tf

                    Interpreter = tf.lite.Interpreter
            except ImportError:
                continue
            self.runtime = mod
            self.version = _dist_version({"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime",
                                          "tensorflow": "tensorflow"}[mod])
            break
        if Interpreter is None:
            raise _missing_runtime(".tflite")
        _import_numpy()
        self.threads = threads
        try:
            self.interp = Interpreter(model_path=path, num_threads=threads or None)
            self.interp.allocate_tensors()
        except Exception as exc:  # noqa: BLE001
            raise RunnerError(f"{self.runtime} cannot load {os.path.basename(path)}: {str(exc).splitlines()[0][:300]}")
        self.in_details = self.interp.get_input_details()
        self.out_details = self.interp.get_output_details()
        self.inputs = [(d["name"], [int(v) for v in d["shape"]], d["dtype"]) for d in self.in_details]
        # full-integer models: (scale, zero point) of the int8/uint8 input and output, (0.0, 0) when float
        self.input_quant = [tuple(d.get("quantization") or (0.0, 0)) for d in self.in_details]
        self.output_quant = [tuple(d.get("quantization") or (0.0, 0)) for d in self.out_details]

    def run(self, arrays):
        for d, a in zip(self.in_details, arrays):
            self.interp.set_tensor(d["index"], a)
        self.interp.invoke()
        return [self.interp.get_tensor(d["index"]) for d in self.out_details]


class TensorRTBackend:
    """TensorRT 8.5+/10 engine with torch CUDA tensors as buffers (JetPack and desktop installs have both)."""

    def __init__(self, path: str, threads: int):
        try:
            import tensorrt as trt
        except ImportError:
            raise _missing_runtime(os.path.splitext(path)[1]) from None
        try:
            import torch
        except ImportError:
            raise RunnerError("the TensorRT runner needs torch with CUDA for its device buffers: install torch",
                              EXIT_NO_RUNTIME) from None
        if not torch.cuda.is_available():
            raise RunnerError("no CUDA device visible to torch on this machine", EXIT_NO_RUNTIME)
        np = _import_numpy()
        self.runtime, self.version, self.threads = "tensorrt", trt.__version__, threads
        self.torch, self.np = torch, np
        logger = trt.Logger(trt.Logger.ERROR)
        with open(path, "rb") as f:
            self.engine = trt.Runtime(logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RunnerError(f"TensorRT cannot deserialize {os.path.basename(path)} (built for another "
                              f"TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs, self.outputs, self.buffers = [], [], {}
        for n in names:
            shape = [d if d > 0 else 1 for d in self.engine.get_tensor_shape(n)]
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(n)))
            if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT:
                self.context.set_input_shape(n, shape)
                self.inputs.append((n, shape, dtype))
            else:
                self.outputs.append((n, shape, dtype))
            tdtype = getattr(torch, {"float32": "float32", "float16": "float16", "int8": "int8", "int32": "int32",
                                     "int64": "int64", "bool": "bool", "uint8": "uint8"}[dtype.name])
            self.buffers[n] = torch.empty(shape, dtype=tdtype, device="cuda")
            self.context.set_tensor_address(n, self.buffers[n].data_ptr())

    def run(self, arrays):
        torch = self.torch
        for (n, _, _), a in zip(self.inputs, arrays):
            self.buffers[n].copy_(torch.from_numpy(a), non_blocking=False)
        self.context.execute_async_v3(self.stream.cuda_stream)
        self.stream.synchronize()
        return [self.buffers[n].cpu().numpy() for n, _, _ in self.outputs]


BACKENDS = {".onnx": OrtBackend, ".tflite": LiteRTBackend, ".engine": TensorRTBackend, ".plan": TensorRTBackend}


def _dist_version(dist: str):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


def load_backend(path: str, threads: int):
    if not os.path.isfile(path):
        raise RunnerError(f"model file not found: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in BACKENDS:
        raise RunnerError(f"unknown model format {suffix or '(no suffix)'}; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[suffix](path, threads)


# ----------------------------------------------------------------------------- commands


def cmd_bench(args) -> dict:
    if args.runs < 1 or args.warmup < 0 or args.threads < 0:
        raise RunnerError("--runs must be >= 1, --warmup and --threads >= 0")
    backend = load_backend(args.model, args.threads)
    np = _import_numpy()
    rng = np.random.RandomState(0)  # (not default_rng: old numpy on JetPack 4)
    arrays = [_random_input(np, shape, dtype, rng) for _, shape, dtype in backend.inputs]
    started = time.time()  # wall clock, so a pool's measurements on one board can be shown not to overlap
    try:
        for _ in range(args.warmup):
            backend.run(arrays)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            backend.run(arrays)
            times.append((time.perf_counter() - t0) * 1e3)
    except Exception as exc:  # noqa: BLE001
        raise RunnerError(f"{backend.runtime} failed while running the model: {str(exc).splitlines()[0][:300]}",
                          EXIT_RUNTIME_FAILED) from None
    return {"command": "bench", "runtime": backend.runtime, "version": backend.version,
            "threads": backend.threads or None, "warmup": args.warmup,
            "input_shapes": [list(a.shape) for a in arrays], "started": round(started, 3),
            "finished": round(time.time(), 3), **summarize(times), **machine_info()}


def cmd_predict(args) -> dict:
    if args.detections and not (0 <= args.score <= 1 and 0 <= args.iou <= 1 and args.max_det >= 1):
        raise RunnerError("--score and --iou lie in [0, 1] and --max-det is at least 1")
    backend = load_backend(args.model, args.threads)
    np = _import_numpy()
    try:
        x = np.load(args.input, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise RunnerError(f"cannot read input {args.input}: {exc}") from None
    _, shape, dtype = backend.inputs[0]
    in_q = (getattr(backend, "input_quant", None) or [(0.0, 0)])[0]
    out_q = (getattr(backend, "output_quant", None) or [(0.0, 0)])[0]
    integer_io = np.issubdtype(np.dtype(dtype), np.integer) and in_q[0] > 0
    if integer_io and np.issubdtype(x.dtype, np.floating):
        # a full-integer model fed float data (what the host's evaluation feeds): quantize with the model's
        # own input scale / zero point; a plain cast would truncate every value to 0 or +-1
        info = np.iinfo(np.dtype(dtype))
        x = np.clip(np.round(x / in_q[0]) + in_q[1], info.min, info.max)
    x = np.ascontiguousarray(x, dtype=dtype)
    try:
        out = backend.run([x])[0]
    except Exception as exc:  # noqa: BLE001
        raise RunnerError(f"{backend.runtime} failed on input of shape {list(x.shape)} (model expects {shape}): "
                          f"{str(exc).splitlines()[0][:300]}", EXIT_RUNTIME_FAILED) from None
    out = np.asarray(out)
    dequantized = np.issubdtype(out.dtype, np.integer) and out_q[0] > 0
    if dequantized:  # logits in float, comparable with every other format's
        out = ((out.astype(np.float32) - out_q[1]) * out_q[0]).astype(np.float32)
    np.save(args.output, out, allow_pickle=False)
    result = {"command": "predict", "runtime": backend.runtime, "version": backend.version,
              "input_shape": list(x.shape), "output_shape": list(np.shape(out)), "output": args.output,
              "integer_io": bool(integer_io or dequantized), **machine_info()}
    if args.detections:  # boxes, scores and classes per image, after the host's NMS
        result["detections"] = [
            [{"box": [round(float(v), 2) for v in b], "score": round(float(sc), 4), "class": int(c)}
             for b, sc, c in zip(d["boxes"], d["scores"], d["labels"])]
            for d in detections(out, args.score, args.iou, args.max_det)]
    return result


def box_iou(a, b):
    """IoU of every box of ``a`` [n, 4] with every box of ``b`` [m, 4] (x1, y1, x2, y2)."""
    np = _import_numpy()
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def nms(boxes, scores, iou: float):
    """Indices kept by greedy NMS, highest score first."""
    np = _import_numpy()
    order = np.argsort(-np.asarray(scores), kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        order = rest[box_iou(boxes[i:i + 1], boxes[rest])[0] <= iou] if rest.size else rest
    return np.asarray(keep, dtype=np.int64)


# NMS thresholds of every runner (COCO evaluation settings: a low score floor, 100 boxes per image); the host's
# edgekit.detect.metrics.NMS takes its defaults from these, so host and device cannot drift apart.
NMS_SCORE, NMS_IOU, NMS_MAX_DET, NMS_MAX_CANDIDATES = 0.01, 0.65, 100, 1000


def detections(raw, score: float = NMS_SCORE, iou: float = NMS_IOU, max_det: int = NMS_MAX_DET,
               max_candidates: int = NMS_MAX_CANDIDATES):
    """Per image {"boxes" [k, 4], "scores" [k], "labels" [k]} from a detector's raw output [B, anchors, 4 + classes]
    (boxes decoded in the graph): every (anchor, class) pair over ``score`` is a candidate, NMS per class. The host's
    evaluation runs this same function (edgekit.detect.metrics), so a device scores boxes as the host does."""
    np = _import_numpy()
    raw = np.asarray(raw)
    if raw.ndim != 3 or raw.shape[2] < 5:
        raise RunnerError("a detector's output is [batch, anchors, 4 + classes]; this one is %s" % list(raw.shape))
    out = []
    for det in raw.astype(np.float32, copy=False):
        boxes, cls = det[:, :4], det[:, 4:]
        a, c = np.nonzero(cls > score)
        s = cls[a, c]
        if s.size > max_candidates:
            top = np.argpartition(-s, max_candidates - 1)[:max_candidates]
            a, c, s = a[top], c[top], s[top]
        b = boxes[a]
        # per-class NMS in one pass: boxes of different classes are moved apart so they never overlap
        shift = c[:, None].astype(np.float32) * (float(np.abs(b).max(initial=0.0)) + 1.0)
        keep = nms(b + shift, s, iou)[:max_det]
        out.append({"boxes": b[keep].astype(np.float32), "scores": s[keep].astype(np.float32),
                    "labels": c[keep].astype(np.int64)})
    return out


def cmd_info(args) -> dict:
    from importlib.util import find_spec

    found = {}
    for mods, _ in SUFFIX_RUNTIMES.values():
        for mod in mods:
            found[mod] = find_spec(mod) is not None
    return {"command": "info", "runner_version": RUNNER_VERSION, "runtimes": found, **machine_info()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runner.py", description="edgekit device runner (standalone)")
    sub = p.add_subparsers(dest="command")
    sub.required = True  # (the keyword needs Python 3.7)
    b = sub.add_parser("bench", help="time the model on random inputs")
    b.add_argument("model")
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--runs", type=int, default=100)
    b.add_argument("--threads", type=int, default=0, help="0: the runtime's default")
    r = sub.add_parser("predict", help="run INPUT.npy through the model into OUT.npy")
    r.add_argument("model")
    r.add_argument("input")
    r.add_argument("output")
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--detections", action="store_true",
                   help="a detector: also print boxes, scores and classes per image after NMS")
    r.add_argument("--score", type=float, default=NMS_SCORE, help="detections: lowest score kept")
    r.add_argument("--iou", type=float, default=NMS_IOU, help="detections: per-class NMS IoU")
    r.add_argument("--max-det", type=int, default=NMS_MAX_DET, help="detections: most boxes per image")
    sub.add_parser("info", help="which runtimes this python can import")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage (or --help) on stderr/stdout
        if not exc.code:
            return EXIT_OK
        print(json.dumps({"error": "bad arguments (see usage on stderr)", "exit_code": EXIT_USAGE}))
        return EXIT_USAGE
    try:
        result = {"bench": cmd_bench, "predict": cmd_predict, "info": cmd_info}[args.command](args)
    except RunnerError as exc:
        print(json.dumps({"error": str(exc), "exit_code": exc.code, **exc.extra, **machine_info()}))
        return exc.code
    result["runner_version"] = RUNNER_VERSION
    print(json.dumps(result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
