# syntax=docker/dockerfile:1
# edgekit images, built with docker buildx (no Docker engine runs on the development machines):
#
#   docker buildx build --target toolkit -t edgekit:toolkit --load .
#   edgekit deploy export/<run> --device rpi4 --bundle rpi4.tar.gz
#   edgekit docker --device rpi4 --bundle rpi4.tar.gz          # prints the command below (--run runs it)
#   docker buildx build --platform linux/arm64 --target runtime --build-context bundle=rpi4.docker-context \
#       --build-arg ONNXRUNTIME_VERSION=1.32.0 ... -t edgekit-runtime:rpi4 --load .
#   docker buildx build --platform linux/arm64 --target runtime-jetson --build-context bundle=DIR \
#       --build-arg L4T_BASE=nvcr.io/nvidia/l4t-jetpack:r35.4.1 -t edgekit-runtime:jetson --load .
#
# The ARG defaults below are edgekit/deployment/versions.py's values (tests/test_docker.py checks that they agree),
# so images and bundles pin the same runtime versions. Cross-building for linux/arm64 on x86_64 needs QEMU
# binfmt on the build machine (docker run --privileged --rm tonistiigi/binfmt --install arm64).

ARG PYTHON_VERSION=3.11
ARG DEBIAN_SUITE=bookworm
ARG NUMPY_VERSION=2.4.6
ARG ONNXRUNTIME_VERSION=1.32.0
ARG LITERT_VERSION=2.3.0
ARG L4T_BASE=nvcr.io/nvidia/l4t-jetpack:r35.4.1

# ---- bundle: the deployment bundle (an extracted `edgekit deploy --bundle` folder) ------------------------------
# Replaced with `--build-context bundle=DIR`; without one the runtime images carry the runner only.
FROM scratch AS bundle
COPY edgekit/device/runner.py /runner.py

# ---- toolkit: the full x86_64 toolkit (compress, export, benchmark, deploy) ------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_SUITE} AS toolkit
RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-client \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/edgekit
COPY pyproject.toml README.md constraints.txt ./
COPY edgekit ./edgekit
RUN pip install --no-cache-dir ".[all]" -c constraints.txt
WORKDIR /work
ENTRYPOINT ["edgekit"]

# ---- runtime: CPU devices (Raspberry Pi 4/5 with --platform linux/arm64; x86_64 with linux/amd64) -------------
# numpy + ONNX Runtime + LiteRT, no torch; the bundle's model, runner and samples in /opt/edgekit/app.
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_SUITE} AS runtime
ARG NUMPY_VERSION
ARG ONNXRUNTIME_VERSION
ARG LITERT_VERSION
RUN pip install --no-cache-dir "numpy==${NUMPY_VERSION}" "onnxruntime==${ONNXRUNTIME_VERSION}" \
        "ai-edge-litert==${LITERT_VERSION}"
WORKDIR /opt/edgekit/app
COPY --from=bundle / /opt/edgekit/app/
COPY edgekit/device/runner.py /opt/edgekit/runner.py
ENV EDGEKIT_APP=/opt/edgekit/app
ENTRYPOINT ["python3", "/opt/edgekit/runner.py"]
CMD ["info"]

# ---- runtime-arm64: the Raspberry Pi image name used in README (same as runtime) -----------------------------
FROM runtime AS runtime-arm64

# ---- runtime-jetson: NVIDIA Jetson (L4T base with CUDA + TensorRT; build with --platform linux/arm64) ----------
# Engines are specific to the GPU and TensorRT version, so the image carries the ONNX and the bundle's
# build_engine.py, which builds the engine on first start (docker run --runtime nvidia -v engines:/opt/edgekit/app/engines).
FROM ${L4T_BASE} AS runtime-jetson
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-numpy \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/edgekit/app
COPY --from=bundle / /opt/edgekit/app/
COPY edgekit/device/runner.py /opt/edgekit/runner.py
ENV EDGEKIT_APP=/opt/edgekit/app
CMD ["sh", "-c", "if [ -f build_engine.py ]; then ENGINE=$(python3 build_engine.py --print-path) && exec python3 /opt/edgekit/runner.py bench \"$ENGINE\"; else exec python3 /opt/edgekit/runner.py info; fi"]
