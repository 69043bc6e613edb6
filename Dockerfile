# syntax=docker/dockerfile:1
# edgekit images. No Docker engine runs on the development machines; build elsewhere with buildx:
#   docker buildx build --target toolkit -t edgekit:toolkit .
#   docker buildx build --platform linux/arm64 --target runtime-arm64 -t edgekit:rpi --build-arg BUNDLE=bundle .
ARG PYTHON_VERSION=3.11

# ---- toolkit: the full x86_64 toolkit (compress, export, benchmark) --------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS toolkit
RUN apt-get update && apt-get install -y --no-install-recommends openssh-client && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/edgekit
COPY pyproject.toml README.md ./
COPY edgekit ./edgekit
RUN pip install --no-cache-dir ".[all]"
WORKDIR /work
ENTRYPOINT ["edgekit"]

# ---- runtime-arm64: what runs on a Raspberry Pi (numpy + ONNX Runtime + LiteRT, no torch) ------------------------
FROM --platform=$TARGETPLATFORM python:${PYTHON_VERSION}-slim-bookworm AS runtime-arm64
ARG ONNXRUNTIME_VERSION=1.32.0
ARG LITERT_VERSION=2.3.0
RUN pip install --no-cache-dir numpy "onnxruntime==${ONNXRUNTIME_VERSION}" "ai-edge-litert==${LITERT_VERSION}"
WORKDIR /opt/edgekit
COPY edgekit/deploy/runner.py ./runner.py
ENTRYPOINT ["python3", "/opt/edgekit/runner.py"]
