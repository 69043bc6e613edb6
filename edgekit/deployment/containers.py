"""The build commands of edgekit's images for docker buildx or podman, and what this machine allows.

One Dockerfile serves both engines: its bases are build args whose defaults are the public images, so a machine
with a registry builds as before, and one without builds from the Debian bases ``docker/make-bases.sh`` imports
into podman (``--local-bases``). podman builds with ``--isolation chroot`` where containers cannot run (the probe's
error is kept as the reason). A linux/arm64 build on x86_64 runs the ``runtime`` stage's RUN step through qemu
binfmt; where none is registered, the ``runtime-cross`` target is built instead (its RUN step runs natively).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import EdgekitError
from . import versions

REPO_ROOT = Path(__file__).resolve().parents[2]
BASES_SCRIPT = REPO_ROOT / "docker" / "make-bases.sh"
LOCAL_BASE = "localhost/edgekit-base:{suite}-{arch}"
ENGINES = ("docker", "podman")
TOOLKIT_TAG = "edgekit:toolkit"
DOCKER_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "amd64": "amd64", "arm64": "arm64"}
QEMU_ARCH = {"amd64": "x86_64", "arm64": "aarch64"}
PIP_SETTINGS = ("index-url", "extra-index-url", "find-links", "cert")
# Free space a podman build needs in its storage, by target, in GB. The toolkit image is 7.7 GB (CUDA torch from
# PyPI, jaxlib, LiteRT); podman holds pip's unpacked wheels, the container's layer and the committed copy of it at
# once: with 28 GB free the build ran out (2026-12-07, this repository's CI machine kind). The runtime images are
# 0.2-0.6 GB.
STORAGE_GB = {"toolkit": 35.0}
STORAGE_GB_DEFAULT = 3.0


def host_arch() -> str:
    """This machine's architecture in docker's words (amd64, arm64)."""
    m = platform.machine().lower()
    return DOCKER_ARCH.get(m, m)


def pick_engine(engine: Optional[str]) -> str:
    """``docker`` or ``podman`` as asked; ``auto``/None: docker where it can build here (buildx and a daemon), else
    podman where installed, else docker (its commands are printed for a machine that has it)."""
    if engine not in (None, "auto"):
        if engine not in ENGINES:
            raise EdgekitError(f"Unknown engine {engine!r}: docker, podman or auto")
        return engine
    if docker_usable()[0] or not shutil.which("podman"):
        return "docker"
    return "podman"


def docker_usable() -> Tuple[bool, str]:
    """Whether docker can build here: the client, its buildx plugin and a daemon that answers."""
    if shutil.which("docker") is None:
        return False, "docker is not installed here"
    for argv, what in ((["docker", "buildx", "version"], "docker buildx is not available (the docker-buildx plugin)"),
                       (["docker", "info", "--format", "{{.ServerVersion}}"], "no Docker daemon answers")):
        try:
            if subprocess.run(argv, capture_output=True, timeout=30).returncode != 0:
                return False, what
        except subprocess.TimeoutExpired:
            return False, what
    return True, "docker buildx"


def binfmt(arch: str) -> Tuple[bool, str]:
    """Whether this machine runs ``arch`` (docker's name) programs in a chroot or container, and why (not).

    Foreign binaries need qemu registered with binfmt_misc with the F flag: the interpreter is opened when it is
    registered, so it works inside a build's chroot that has no qemu of its own.
    """
    if arch == host_arch():
        return True, "native"
    q = QEMU_ARCH.get(arch, arch)
    root = Path("/proc/sys/fs/binfmt_misc")
    if not (root / "register").exists():
        return False, f"binfmt_misc is not mounted ({root}/register is missing)"
    entry = root / f"qemu-{q}"
    if not entry.is_file():
        return False, f"qemu-{q} is not registered with binfmt_misc"
    lines = entry.read_text().splitlines()
    if "enabled" not in lines:
        return False, f"qemu-{q} is registered but disabled"
    flags = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("flags:")), "")
    if "F" not in flags:
        return False, f"qemu-{q} is registered without the F flag (flags {flags or 'none'}), so not inside chroots"
    return True, f"qemu-{q} registered with binfmt_misc (flags {flags})"


def image_exists(engine: str, image: str) -> bool:
    if shutil.which(engine) is None:
        return False
    return subprocess.run([engine, "image", "exists", image], capture_output=True).returncode == 0


def containers_run(image: str) -> Tuple[Optional[bool], str]:
    """Whether ``podman run`` works here, probed with ``image`` (None when it is not in local storage)."""
    if shutil.which("podman") is None:
        return None, "podman is not installed here"
    if not image_exists("podman", image):
        return None, f"{image} is not in podman's storage, nothing to probe with"
    p = subprocess.run(["podman", "run", "--rm", "--pull=never", "--network=none", "--entrypoint", "true", image],
                       capture_output=True, text=True, timeout=120)
    return p.returncode == 0, (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]


def host_pip() -> Tuple[Dict[str, str], List[str]]:
    """This machine's pip index settings as build args, and the local paths they name (to mount read-only).

    The build's RUN steps see no pip config, so without these the image resolves packages differently from this
    machine (or not at all, behind a proxy whose CA only this machine trusts).
    """
    p = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    return pip_settings(p.stdout)


def pip_settings(config_list: str, exists=os.path.exists) -> Tuple[Dict[str, str], List[str]]:
    """(PIP_* build args, local paths) from ``pip config list`` output; the environment's value wins, as in pip.

    A PEP 503 folder index (``.../simple``) links to its files relative to itself: its parent is mounted.
    """
    found: Dict[str, Dict[str, str]] = {}
    for line in config_list.splitlines():
        key, eq, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if eq and name in PIP_SETTINGS and section in (":env:", "global", "install"):
            found.setdefault(name, {})[section] = value.strip().strip("'\"")
    args: Dict[str, str] = {}
    paths: List[str] = []
    for name in PIP_SETTINGS:
        vals = found.get(name, {})
        value = vals.get(":env:") or vals.get("install") or vals.get("global")
        if not value:
            continue
        args["PIP_" + name.upper().replace("-", "_")] = value
        for item in value.split():
            path = item[len("file://"):] if item.startswith("file://") else item if item.startswith("/") else None
            if path:
                path = path.rstrip("/")
                local = str(Path(path).parent) if Path(path).name == "simple" else path
                if exists(local) and local not in paths:
                    paths.append(local)
    return args, paths


@dataclass
class BuildPlan:
    """The commands that build one image, in order, and what was decided on the way."""

    engine: str
    target: str
    platform: str
    tag: str
    build: List[str]
    before: List[List[str]] = field(default_factory=list)
    after: List[List[str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def commands(self) -> List[List[str]]:
        return [*self.before, self.build, *self.after]


def plan_build(target: str, arch: str, tag: str, build_args: Dict[str, str], bundle_dir: Optional[Path] = None,
               engine: Optional[str] = None, local_bases: bool = False, use_host_pip: bool = False,
               cross: bool = False, push: bool = False, context: str = ".") -> BuildPlan:
    """The build of ``target`` for ``arch`` (amd64/arm64) with ``engine``; see the module docstring."""
    engine = pick_engine(engine)
    plat = f"linux/{arch}"
    notes: List[str] = []
    before: List[List[str]] = []
    args = dict(build_args)
    volumes: List[str] = []
    if local_bases:
        if engine != "podman":
            raise EdgekitError("--local-bases needs --engine podman: docker/make-bases.sh imports the bases into "
                               "podman's storage")
        if target == "runtime-jetson":
            raise EdgekitError("No local base for Jetson: runtime-jetson builds on NVIDIA's L4T image "
                               f"({versions.L4T_BASE_IMAGE}), which needs its registry")
        arches = [arch] + ([host_arch()] if arch != host_arch() else [])
        before.append(["sh", str(BASES_SCRIPT.relative_to(REPO_ROOT))]
                      + [w for a in arches for w in ("--arch", a)] + (["--binfmt"] if arch != host_arch() else []))
        args["PYTHON_BASE"] = LOCAL_BASE.format(suite=versions.DEBIAN_SUITE, arch=arch)
    if target == "runtime" and engine == "podman" and not cross:
        ok, why = binfmt(arch)
        if not ok:
            cross = True
            notes.append(f"no RUN step can run for {plat} here ({why}): building runtime-cross, whose pip runs on "
                         f"this machine and fetches {plat} wheels")
    if cross:
        if target != "runtime":
            raise EdgekitError(f"--cross builds the CPU runtime image; {target} has no cross variant")
        target = "runtime-cross"
        if engine == "podman":  # buildx sets BUILDPLATFORM itself; buildah 1.28 does not
            args["BUILDPLATFORM"] = f"linux/{host_arch()}"
            if local_bases:
                args["BUILD_BASE"] = LOCAL_BASE.format(suite=versions.DEBIAN_SUITE, arch=host_arch())
    if use_host_pip:
        pip_args, paths = host_pip()
        if paths and engine != "podman":
            raise EdgekitError(f"--host-pip: this machine's pip reads local files ({', '.join(paths)}), which "
                               "docker buildx cannot mount into RUN steps; use --engine podman")
        args.update(pip_args)
        volumes = [f"{f}:{f}:ro" for f in paths]
        if pip_args:
            notes.append("pip in the build uses this machine's settings: "
                         + ", ".join(f"{k}={v}" for k, v in pip_args.items()))
    if engine == "docker":
        argv = ["docker", "buildx", "build", "--platform", plat, "--target", target]
    else:
        argv = ["podman", "build", "--platform", plat, "--target", target]
        base = args.get("PYTHON_BASE", versions.RUNTIME_BASE_IMAGE)
        can_run, why = containers_run(base)
        if not can_run:
            argv[2:2] = ["--isolation", "chroot"]
            notes.append(("podman cannot run containers here" if can_run is False else "podman was not probed")
                         + f" ({why}): RUN steps use --isolation chroot")
        if local_bases:
            argv.append("--pull=never")
    if bundle_dir is not None:
        argv += ["--build-context", f"bundle={bundle_dir}"]
    for k, v in args.items():
        argv += ["--build-arg", f"{k}={v}"]
    for vol in volumes:
        argv += ["--volume", vol]
    after: List[List[str]] = []
    if engine == "docker":
        argv += ["-t", tag, "--push" if push else "--load", context]
    else:
        argv += ["-t", tag, context]
        if push:
            after.append(["podman", "push", tag])
    return BuildPlan(engine, target, plat, tag, argv, before, after, notes)


def storage_free(engine: str) -> Tuple[Optional[str], Optional[float]]:
    """podman's storage folder and its free GB (None, None for docker, whose daemon may be anywhere)."""
    if engine != "podman" or shutil.which("podman") is None:
        return None, None
    p = subprocess.run(["podman", "info", "--format", "{{.Store.GraphRoot}}"], capture_output=True, text=True)
    root = p.stdout.strip()
    if p.returncode != 0 or not root:
        return None, None
    probe = Path(root)
    while not probe.exists() and probe != probe.parent:  # a first build creates the folder
        probe = probe.parent
    return root, shutil.disk_usage(probe).free / 1e9


def storage_shortfall(engine: str, target: str) -> Optional[str]:
    """Why the build would run out of disk, in one sentence, or None when it has room (or cannot tell)."""
    root, free = storage_free(engine)
    need = STORAGE_GB.get(target, STORAGE_GB_DEFAULT)
    if free is None or free >= need:
        return None
    return (f"building the {target} image needs about {need:.0f} GB free in podman's storage ({root}); "
            f"{free:.1f} GB is free: free space, or point podman's graphroot (storage.conf) at a larger disk")


def run_plan(plan: BuildPlan, only: Optional[List[List[str]]] = None) -> List[dict]:
    """Run the plan's commands (or ``only`` these) from the repository root; the first failure raises.

    Returns each command's argv, seconds and exit status.
    """
    import time

    if not (REPO_ROOT / "Dockerfile").is_file():
        raise EdgekitError(f"No Dockerfile in {REPO_ROOT}: run from a source checkout of edgekit")
    if shutil.which(plan.engine) is None:
        raise EdgekitError(f"{plan.engine} is not installed here; run the printed commands where it is")
    if plan.engine == "docker" and not docker_usable()[0]:
        raise EdgekitError(f"{docker_usable()[1]}: run the printed commands where docker builds, or use "
                           "--engine podman")
    short = storage_shortfall(plan.engine, plan.target)
    if short is not None:  # before minutes of pip: a full disk fails the build late and can fail what runs beside
        raise EdgekitError(short)
    done = []
    for argv in plan.commands if only is None else only:
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=REPO_ROOT)
        done.append({"argv": argv, "seconds": round(time.perf_counter() - t0, 1), "returncode": proc.returncode})
        if proc.returncode != 0:
            raise EdgekitError(f"{' '.join(argv[:2])} failed (exit {proc.returncode}); see its output above")
    return done


def image_size(engine: str, image: str) -> Optional[int]:
    """The image's size in bytes as the engine reports it."""
    p = subprocess.run([engine, "image", "inspect", "--format", "{{.Size}}", image], capture_output=True, text=True)
    return int(p.stdout.strip()) if p.returncode == 0 and p.stdout.strip().isdigit() else None
