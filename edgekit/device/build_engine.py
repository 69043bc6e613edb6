#!/usr/bin/env python3
"""First start on a TensorRT device: build this bundle's engine from its ONNX, on the device.

Engines only load with the GPU and TensorRT version they were built with, so bundles ship the ONNX and
this script. It uses TensorRT's Python API when ``import tensorrt`` works (JetPack ships it), else
``trtexec`` (/usr/src/tensorrt/bin/trtexec on JetPack). The engine goes to engines/ under a name with the
TensorRT version and GPU; an existing one is reused. Prints one JSON object (or, with --print-path, the
engine's path). Exit codes: 0 ok, 3 no TensorRT here, 4 the build failed. Standard library + tensorrt only.
The host's exporter (edgekit/export/tensorrt.py) imports build_with_api and engine_name from this file, so
there is one engine builder and one engine naming; this file never imports edgekit.
"""
import json
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def gpu_name():
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace").strip("\x00 \n")
        except OSError:
            pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30)
        return out.stdout.decode().strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "gpu"


def slug(text):
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "gpu"


def engine_name(name, version, gpu):
    """model.<variant>.trt<version>.<gpu>.engine: an engine only loads with that TensorRT and GPU."""
    return "model.{}.trt{}.{}.engine".format(slug(name), slug(version), slug(gpu))


def build_with_api(trt, onnx_path, precision, engine_file, workspace_mb=1024, timing_cache=None):
    """Build and serialize an engine with TensorRT's Python API (ONNX parser -> builder config -> plan).

    TensorRT < 11: FP16 flag (and INT8 for a QDQ model: explicit quantization). TensorRT 11 has no such
    flags: networks are strongly typed and take precision from the ONNX. ``timing_cache`` (a file) is read
    before and written after the build, so later builds on the same GPU are faster.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if major < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError("TensorRT's ONNX parser rejected {}: {}".format(os.path.basename(str(onnx_path)),
                                                                             errors[:500]))
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if hasattr(trt.BuilderFlag, "FP16") and precision in ("fp16", "int8"):  # TensorRT < 11
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    cache = None
    if timing_cache is not None:
        data = b""
        if os.path.isfile(str(timing_cache)):
            with open(str(timing_cache), "rb") as f:
                data = f.read()
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT could not build an engine from {} (see its log above)".format(
            os.path.basename(str(onnx_path))))
    with open(str(engine_file), "wb") as f:
        f.write(plan)
    if cache is not None:
        with open(str(timing_cache), "wb") as f:
            f.write(config.get_timing_cache().serialize())
    return engine_file


def build_with_trtexec(trtexec, onnx_path, precision, engine_file):
    cmd = [trtexec, "--onnx=" + onnx_path, "--saveEngine=" + engine_file]
    if precision == "fp16":
        cmd.append("--fp16")
    elif precision == "int8":
        cmd += ["--int8", "--fp16"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout.decode("utf-8", "replace")[-500:])


def main(argv):
    with open(os.path.join(HERE, "manifest.json")) as f:
        spec = json.load(f)["engine"]
    onnx_path = os.path.join(HERE, spec["onnx"])
    try:
        import tensorrt as trt
        version, how = trt.__version__, "tensorrt API"
    except ImportError:
        trt = None
        trtexec = shutil.which("trtexec") or ("/usr/src/tensorrt/bin/trtexec"
                                              if os.path.exists("/usr/src/tensorrt/bin/trtexec") else None)
        if trtexec is None:
            print(json.dumps({"error": "TensorRT is not installed here (neither `import tensorrt` nor trtexec): "
                                       "install JetPack's TensorRT", "exit_code": 3}))
            return 3
        version, how = "exec", "trtexec"
    name = engine_name(spec["name"], version, gpu_name())
    engine = os.path.join(HERE, "engines", name)
    built = False
    if not os.path.isfile(engine):
        os.makedirs(os.path.dirname(engine), exist_ok=True)
        tmp = engine + ".partial"
        try:
            if trt is not None:
                build_with_api(trt, onnx_path, spec["precision"], tmp)
            else:
                build_with_trtexec(trtexec, onnx_path, spec["precision"], tmp)
        except Exception as exc:  # noqa: BLE001
            if os.path.exists(tmp):
                os.remove(tmp)
            print(json.dumps({"error": "engine build failed ({}): {}".format(how, exc), "exit_code": 4}))
            return 4
        os.replace(tmp, engine)
        built = True
    if "--print-path" in argv:
        print(engine)
    else:
        print(json.dumps({"engine": engine, "built": built, "how": how, "precision": spec["precision"],
                          "onnx": spec["onnx"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
