"""Runtime versions shipped to devices: the single source for bundles and the Dockerfile's ARG defaults.

``tests/test_docker.py`` checks that every ``ARG NAME=value`` in the Dockerfile whose name is in
:data:`DOCKER_ARGS` has exactly this value (after expanding the ARGs it names), so bundles and images cannot
drift apart. A bundle pins the onnxruntime version recorded in the run's report.json (the version the artifacts were
made and checked with) and falls back to :data:`ONNXRUNTIME_VERSION` when the report has none.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

PYTHON_VERSION = "3.11"  # device Python the wheels are fetched for (Raspberry Pi OS bookworm: 3.11)
NUMPY_VERSION = "2.4.6"
ONNXRUNTIME_VERSION = "1.32.0"
LITERT_VERSION = "2.3.0"  # ai-edge-litert (LiteRT's interpreter)
PIP_VERSION = "26.3"  # shipped as a wheel so the device venv installs offline without ensurepip

DEBIAN_SUITE = "bookworm"
RUNTIME_BASE_IMAGE = f"python:{PYTHON_VERSION}-slim-{DEBIAN_SUITE}"
# JetPack 5.1.2 (L4T r35.4.1): Ubuntu 20.04, TensorRT 8.5, CUDA 11.4. JetPack 6: nvcr.io/nvidia/l4t-jetpack:r36.x
L4T_BASE_IMAGE = "nvcr.io/nvidia/l4t-jetpack:r35.4.1"

# Newest glibc the fetched manylinux wheels may need: 2.31 covers Ubuntu 20.04 (JetPack 5), Ubuntu 22.04
# (JetPack 6, 2.35) and Debian / Raspberry Pi OS bookworm (2.36).
TARGET_GLIBC: Tuple[int, int] = (2, 31)

# Dockerfile ARG name -> the value it must default to.
DOCKER_ARGS: Dict[str, str] = {
    "PYTHON_VERSION": PYTHON_VERSION,
    "NUMPY_VERSION": NUMPY_VERSION,
    "ONNXRUNTIME_VERSION": ONNXRUNTIME_VERSION,
    "LITERT_VERSION": LITERT_VERSION,
    "DEBIAN_SUITE": DEBIAN_SUITE,
    "PYTHON_BASE": RUNTIME_BASE_IMAGE,  # the Dockerfile spells it with ${PYTHON_VERSION} and ${DEBIAN_SUITE}
    "BUILD_BASE": RUNTIME_BASE_IMAGE,
    "L4T_BASE": L4T_BASE_IMAGE,
}

# Device arch -> (docker platform, manylinux arch suffix)
ARCHES: Dict[str, Tuple[str, str]] = {
    "aarch64": ("linux/arm64", "aarch64"),
    "x86_64": ("linux/amd64", "x86_64"),
}


def platform_tags(arch: str, glibc: Tuple[int, int] = TARGET_GLIBC) -> List[str]:
    """``--platform`` values for ``pip download``: every manylinux tag a glibc-``glibc`` ``arch`` machine runs.

    pip expands ``manylinux2014`` to the older tags but not ``manylinux_2_X`` to lower X, so all are listed.
    """
    if arch not in ARCHES:
        raise ValueError(f"no wheel platform for arch {arch!r}; known: {', '.join(sorted(ARCHES))}")
    suffix = ARCHES[arch][1]
    major, minor = glibc
    return [f"manylinux_{major}_{m}_{suffix}" for m in range(minor, 16, -1)] + [f"manylinux2014_{suffix}"]


def numpy_requirement(python_version: str) -> str:
    """numpy pinned for the default device Python; the newest release that supports any other Python."""
    return f"numpy=={NUMPY_VERSION}" if python_version == PYTHON_VERSION else "numpy"
