"""The bundle's smoke test inside a built runtime image's filesystem, on a machine where containers cannot run.

``podman create`` + ``podman mount`` give a writable copy of the image's files (the image is untouched; the
container is removed afterwards). The image's own entrypoint (``python3 /opt/edgekit/runner.py``) then runs
``predict`` on every sample the bundle carries, and the outputs are compared with the host's, which the manifest
recorded when the bundle was built: same argmax, max |diff| within the manifest's atol.

An image for another architecture runs under qemu-user, either ``chroot`` into the files (the kernel starts qemu
through binfmt_misc: every path is the image's own) or, where no binfmt is registered, ``qemu-<arch>-static -L
ROOT`` (qemu looks up absolute paths under ROOT first, as tests/test_arm64.py runs a sysroot). qemu-user 7.2
shows the x86 host's /proc/cpuinfo to arm64 programs, on which ONNX Runtime's cpuinfo crashes; the copy gets a
Raspberry Pi 4's CPU description (arm64_sysroot.sh --cpu-files), which both ways read instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Dict, List

from ..errors import EdgekitError
from . import SYSROOT_SCRIPT
from .containers import QEMU_ARCH, binfmt, host_arch

LAUNCHERS = ("auto", "chroot", "qemu")


def _inspect(engine: str, image: str) -> dict:
    p = subprocess.run([engine, "image", "inspect", image], capture_output=True, text=True)
    if p.returncode != 0:
        raise EdgekitError(f"No image {image} in {engine}'s storage: {p.stderr.strip()[-300:]}")
    return json.loads(p.stdout)[0]


def _in_root(root: Path, path: str, what: str) -> Path:
    """``path`` (absolute, inside the image) under ``root``, refusing links on the way (they could leave ``root``)."""
    pp = PurePosixPath(path)
    if not pp.is_absolute() or ".." in pp.parts:
        raise EdgekitError(f"{what} {path!r} is not an absolute path inside the image")
    cur = root
    for part in pp.parts[1:]:
        cur = cur / part
        if cur.is_symlink():
            raise EdgekitError(f"{what} {path!r} goes through a link in the image ({cur.relative_to(root)})")
    return cur


def _resolve_exe(root: Path, name: str, path_env: str) -> str:
    """The image's ``name`` as its PATH finds it, symlinks followed inside ``root`` (qemu -L execs a host path)."""
    cands = [name] if "/" in name else [f"{d.rstrip('/')}/{name}" for d in path_env.split(":") if d.startswith("/")]
    for cand in cands:
        p = PurePosixPath(cand)
        for _ in range(40):
            host = root / str(p).lstrip("/")
            if not host.is_symlink():
                break
            link = PurePosixPath(os.readlink(host))
            p = PurePosixPath(os.path.normpath(str(link if link.is_absolute() else p.parent / link)))
        host = root / str(p).lstrip("/")
        if host.is_file():
            return str(host)
    raise EdgekitError(f"{name} is not in the image (PATH {path_env})")


@contextlib.contextmanager
def mounted(image: str, engine: str = "podman"):
    """A writable copy of ``image``'s files (a created, never started container, removed on exit): its root path."""
    cid = subprocess.run([engine, "create", "--pull=never", image], capture_output=True, text=True)
    if cid.returncode != 0:
        raise EdgekitError(f"{engine} create {image} failed: {cid.stderr.strip()[-300:]}")
    ctr = cid.stdout.strip().splitlines()[-1]
    try:
        m = subprocess.run([engine, "mount", ctr], capture_output=True, text=True)
        if m.returncode != 0:
            raise EdgekitError(f"{engine} mount failed: {m.stderr.strip()[-300:]}")
        yield Path(m.stdout.strip())
    finally:
        subprocess.run([engine, "rm", "-f", ctr], capture_output=True)


def chroot_argv(root: Path, native: bool) -> List[str]:
    """The command prefix that runs a program inside ``root``. A native image gets its own /proc (mounted in a
    private mount namespace, gone when the program ends); an emulated one keeps the CPU description written
    under its proc/ folder, which a real /proc would hide."""
    if native and shutil.which("unshare"):
        return ["unshare", "--mount", "--pid", "--fork", f"--mount-proc={root}/proc", "chroot", str(root)]
    return ["chroot", str(root)]


def smoke_image(image: str, engine: str = "podman", launcher: str = "auto", timeout: float = 300) -> dict:
    """Run the bundle's smoke test in ``image``; raises EdgekitError when an output differs from the host's."""
    from ..device.bundlecheck import BundleError, verify_tree

    if engine != "podman":
        raise EdgekitError("The in-image smoke test mounts the image with podman; use --engine podman")
    if launcher not in LAUNCHERS:
        raise EdgekitError(f"launcher {launcher!r}: one of {', '.join(LAUNCHERS)}")
    if os.geteuid() != 0:
        raise EdgekitError("The in-image smoke test mounts the image's files and chroots: run it as root")
    info = _inspect(engine, image)
    cfg = info.get("Config") or {}
    arch = info.get("Architecture") or host_arch()
    env: Dict[str, str] = dict(e.split("=", 1) for e in cfg.get("Env") or [] if "=" in e)
    entry = list(cfg.get("Entrypoint") or [])
    if len(entry) < 2:
        raise EdgekitError(f"{image} has no runner entrypoint (got {entry}): not an edgekit runtime image")
    emulated = arch != host_arch()
    if launcher == "auto" or not emulated:
        launcher = "chroot" if not emulated or binfmt(arch)[0] else "qemu"
    qemu = None
    if launcher == "qemu" and emulated:
        q = QEMU_ARCH.get(arch, arch)
        qemu = shutil.which(f"qemu-{q}-static") or shutil.which(f"qemu-{q}")
        if qemu is None:
            raise EdgekitError(f"qemu-{q}-static is not installed (apt-get install qemu-user-static)")
    elif launcher == "chroot" and emulated and not binfmt(arch)[0]:
        raise EdgekitError(f"chroot into a {arch} image needs qemu binfmt: {binfmt(arch)[1]}")

    t0 = time.perf_counter()
    with mounted(image, engine) as root:
        app = env.get("EDGEKIT_APP", "/opt/edgekit/app")
        try:
            manifest = verify_tree(str(_in_root(root, app, "EDGEKIT_APP")))
        except BundleError as exc:
            raise EdgekitError(f"The bundle in {image} fails its own manifest: {exc}") from None
        sample = manifest.get("sample") or {}
        files = manifest.get("files") or {}
        inputs: List[str] = sample.get("inputs") or []
        model = sample.get("model")
        if not inputs or model not in files or any(i not in files for i in inputs):
            raise EdgekitError(f"The bundle in {image} has no smoke-test samples listed in its manifest")
        if emulated and arch == "arm64" and host_arch() != "arm64":
            p = subprocess.run(["sh", str(SYSROOT_SCRIPT), "--cpu-files", str(root)], capture_output=True, text=True)
            if p.returncode != 0:
                raise EdgekitError(f"cannot write the emulated CPU description: {p.stderr.strip()[-300:]}")
        work = Path(tempfile.mkdtemp(prefix="edgekit-smoke-", dir=root / "tmp" if (root / "tmp").is_dir() else root))
        inside = "/" + str(work.relative_to(root))

        def run(args: List[str]) -> str:
            if launcher == "chroot":
                argv = [*chroot_argv(root, not emulated), *entry, *args]
            else:
                exe = _resolve_exe(root, entry[0], env.get("PATH", "/usr/local/bin:/usr/bin:/bin"))
                argv = [qemu, "-L", str(root), exe, *entry[1:], *args]
            p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(root))
            if p.returncode != 0:
                raise EdgekitError(f"{' '.join(args[:1])} in {image} failed (exit {p.returncode}): "
                                   f"{(p.stderr or p.stdout).strip()[-600:]}")
            return p.stdout.strip().splitlines()[-1]

        def path(rel_in_image: str) -> str:  # qemu -L: a host path under root works for files not yet there too
            return rel_in_image if launcher == "chroot" else str(root) + rel_in_image

        runner_info = json.loads(run(["info"]))
        checks = []
        expected = sample.get("expected") or []
        atol = float(sample.get("atol", 0.5))
        import numpy as np

        for i, rel in enumerate(inputs):
            out = f"{inside}/out{i}.npy"
            res = json.loads(run(["predict", path(f"{app}/{model}"), path(f"{app}/{rel}"), path(out),
                                  "--threads", "1"]))
            result = root / out.lstrip("/")
            if result.is_symlink() or not result.is_file():  # read from outside the image: its own file only
                raise EdgekitError(f"predict in {image} left no output file {out}")
            got = np.load(result, allow_pickle=False).reshape(-1)
            check = {"input": rel, "argmax": int(got.argmax()), "machine": res.get("machine"),
                     "runtime": f"{res.get('runtime')} {res.get('version')}"}
            if i < len(expected) and expected[i] is not None:
                want = np.asarray(expected[i], dtype=np.float32).reshape(-1)
                diff = float(np.abs(got - want).max()) if got.shape == want.shape else None
                check.update({"expected_argmax": int(want.argmax()), "max_abs_diff": diff})
                if diff is None or check["argmax"] != check["expected_argmax"] or diff > atol:
                    raise EdgekitError(f"{image}: the output for {rel} differs from the host's (argmax "
                                       f"{check['argmax']} vs {check['expected_argmax']}, max |diff| {diff}, "
                                       f"atol {atol})")
            checks.append(check)
        return {"image": image, "arch": arch, "launcher": launcher if emulated else "chroot (native)",
                "model": model, "atol": atol, "expected_by": sample.get("expected_by"), "info": runner_info,
                "checks": checks, "matches_host": bool(expected) and all("expected_argmax" in c for c in checks),
                "seconds": round(time.perf_counter() - t0, 1)}

