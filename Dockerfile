# syntax=docker/dockerfile:1
# edgekit images. `edgekit docker` prints (or --run runs) the build commands for docker buildx or podman:
#
#   edgekit docker --toolkit                                     # the x86_64 toolkit image
#   edgekit deploy export/<run> --device rpi4 --bundle rpi4.tar.gz
#   edgekit docker --device rpi4 --bundle rpi4.tar.gz            # the Raspberry Pi runtime image with that bundle
#   edgekit docker --device rpi4 --bundle rpi4.tar.gz --engine podman --local-bases --run --smoke
#
# docker buildx: docker buildx build --platform linux/arm64 --target runtime --build-context bundle=DIR ... --load .
# podman without a registry: docker/make-bases.sh makes Debian amd64/arm64 bases from Debian packages, then
#   podman build --isolation chroot --pull=never --platform linux/arm64 --target runtime \
#       --build-arg PYTHON_BASE=localhost/edgekit-base:bookworm-arm64 --build-context bundle=DIR ... .
#
# The version ARG defaults below are edgekit/deployment/versions.py's values (tests/test_docker.py checks that they
# agree), so images and bundles pin the same runtime versions. The bases are ARGs too, whose defaults are the public
# images. RUN steps of a linux/arm64 build on x86_64 need QEMU binfmt on the build machine (docker run --privileged
# --rm tonistiigi/binfmt --install arm64, or docker/make-bases.sh --binfmt); without it, build `runtime-cross`,
# whose only RUN step runs on the build machine.

ARG PYTHON_VERSION=3.11
ARG DEBIAN_SUITE=bookworm
ARG PYTHON_BASE=python:${PYTHON_VERSION}-slim-${DEBIAN_SUITE}
ARG BUILD_BASE=${PYTHON_BASE}
ARG NUMPY_VERSION=2.4.6
ARG ONNXRUNTIME_VERSION=1.32.0
ARG LITERT_VERSION=2.3.0
ARG L4T_BASE=nvcr.io/nvidia/l4t-jetpack:r35.4.1

# ---- bundle: the deployment bundle (an extracted `edgekit deploy --bundle` folder) ------------------------------
# Replaced with `--build-context bundle=DIR`; without one the runtime images carry the runner only.
FROM scratch AS bundle
COPY edgekit/device/runner.py /runner.py

# ---- toolkit: the full x86_64 toolkit (compress, export, benchmark, deploy) ------------------------------------
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS: unset, pip uses PyPI; set, the build resolves as a machine
# with its own package index does (edgekit docker --host-pip passes this machine's).
FROM ${PYTHON_BASE} AS toolkit
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
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
FROM ${PYTHON_BASE} AS runtime
ARG NUMPY_VERSION
ARG ONNXRUNTIME_VERSION
ARG LITERT_VERSION
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
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

# ---- runtime-cross: the runtime image with no RUN step on the target platform (no binfmt needed) -------------
# The build machine's pip fetches the target's wheels (--platform, binary only) into /site; the target stage only
# copies files. Same runner, bundle and entrypoint as `runtime`; the packages sit on PYTHONPATH.
FROM --platform=$BUILDPLATFORM ${BUILD_BASE} AS runtime-packages
ARG TARGETARCH
ARG PYTHON_VERSION
ARG NUMPY_VERSION
ARG ONNXRUNTIME_VERSION
ARG LITERT_VERSION
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
RUN case "${TARGETARCH}" in arm64) arch=aarch64 ;; amd64) arch=x86_64 ;; \
        *) echo "no manylinux wheels for ${TARGETARCH}" >&2; exit 1 ;; esac \
 && set -- && for m in 36 35 34 33 32 31 30 29 28 27 26 25 24 23 22 21 20 19 18 17; do \
        set -- "$@" --platform manylinux_2_"$m"_"$arch"; done \
 && pip install --no-cache-dir --target /site --only-binary=:all: --implementation cp \
        --python-version "${PYTHON_VERSION}" "$@" --platform manylinux2014_"$arch" \
        "numpy==${NUMPY_VERSION}" "onnxruntime==${ONNXRUNTIME_VERSION}" "ai-edge-litert==${LITERT_VERSION}"

# --platform=$TARGETPLATFORM: buildah 1.28 otherwise looks this base up for the previous stage's platform
FROM --platform=$TARGETPLATFORM ${PYTHON_BASE} AS runtime-cross
COPY --from=runtime-packages /site /opt/edgekit/site
WORKDIR /opt/edgekit/app
COPY --from=bundle / /opt/edgekit/app/
COPY edgekit/device/runner.py /opt/edgekit/runner.py
ENV EDGEKIT_APP=/opt/edgekit/app PYTHONPATH=/opt/edgekit/site
ENTRYPOINT ["python3", "/opt/edgekit/runner.py"]
CMD ["info"]

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
