"""Deployment: the standalone device runner, bundles for a device, SSH deploys and Docker runtime images.

- :mod:`edgekit.deployment.bundle`   ``build_bundle`` / ``extract_bundle``: an offline-installable .tar.gz
- :mod:`edgekit.deployment.remote`   ``deploy``: releases on a device over SSH, ``current`` switched atomically
- :mod:`edgekit.deployment.versions` runtime versions shared by bundles and the Dockerfile
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

RUNNER_PATH = Path(__file__).resolve().parents[1] / "device" / "runner.py"
"""The standalone runner script (stdlib + numpy + a runtime; no edgekit import) that is copied to devices."""

SYSROOT_SCRIPT = Path(__file__).with_name("arm64_sysroot.sh")
"""Assembles an arm64 Debian userland with Python 3.11 to run arm64 bundles under qemu-user."""

REPO_ROOT = Path(__file__).resolve().parents[2]


def build_bundle(*args, **kw):
    """See :func:`edgekit.deployment.bundle.build_bundle`."""
    from .bundle import build_bundle as _build

    return _build(*args, **kw)


def extract_bundle(*args, **kw):
    """See :func:`edgekit.deployment.bundle.extract_bundle`."""
    from .bundle import extract_bundle as _extract

    return _extract(*args, **kw)


def deploy(*args, **kw):
    """See :func:`edgekit.deployment.remote.deploy`."""
    from .remote import deploy as _deploy

    return _deploy(*args, **kw)


def deploy_cmd(run_dir: str | Path, device: str, host: Optional[str] = None, bundle: Optional[str | Path] = None,
               ssh=None, root: Optional[str] = None, python_version: Optional[str] = None, fetch_wheels: bool = True,
               force: bool = False, bench_runs: int = 20) -> dict:
    """``edgekit deploy RUN_DIR --device D [--host user@addr] [--bundle out.tar.gz]``.

    With ``bundle`` only: write the bundle there. With ``host``: deploy over SSH (the bundle written to
    ``bundle`` first when both are given, else built in a temporary folder). ``RUN_DIR`` may also be a
    bundle .tar.gz to deploy as it is.
    """
    from ..errors import EdgekitError
    from . import versions
    from .bundle import build_bundle as _build, read_manifest, top_folder

    pv = python_version or versions.PYTHON_VERSION
    host_given = host is not None or ssh is not None
    if bundle is None and not host_given:
        raise EdgekitError("Nothing to do: pass --host user@address to deploy over SSH and/or --bundle FILE.tar.gz "
                           "to write the bundle")
    source = Path(run_dir)
    out: dict = {}
    if bundle is not None:
        if source.is_file():
            raise EdgekitError(f"{source} is already a bundle; --bundle writes a new one from a run folder")
        path = _build(source, device, bundle, python_version=pv, fetch_wheels=fetch_wheels, force=force)
        manifest, rid = read_manifest(path)
        out = {"action": "bundle", "bundle": str(path), "release": rid,
               "size_mb": round(path.stat().st_size / 2**20, 2),
               "artifact": manifest["artifact"]["path"], "fallback": (manifest.get("fallback") or {}).get("path"),
               "device": manifest["device"], "wheels": manifest["wheels"], "why": manifest["artifact"].get("why"),
               "latency": manifest["artifact"].get("latency"), "run_device": manifest.get("run_device"),
               "notes": manifest.get("notes", []), "folder": top_folder(path)}
        source = path
    if host_given:
        from .remote import DEFAULT_ROOT, deploy as _deploy

        result = _deploy(source, device, host=host, ssh=ssh, root=root or DEFAULT_ROOT, python_version=pv,
                         fetch_wheels=fetch_wheels, bench_runs=bench_runs)
        out = {**out, **result, "bundle": out.get("bundle")} if out else result
    return out


# ----------------------------------------------------------------------------- docker

DOCKER_TARGETS = {"cpu": "runtime", "jetson": "runtime-jetson"}


def docker_target(dev) -> str:
    """The Dockerfile stage for a device: Jetson (aarch64 + TensorRT) or the Debian CPU runtime."""
    if dev.arch == "aarch64" and dev.kind == "gpu" and "tensorrt" in dev.formats:
        return DOCKER_TARGETS["jetson"]
    return DOCKER_TARGETS["cpu"]


def docker_plan(device: Optional[str] = None, bundle: Optional[str | Path] = None, tag: Optional[str] = None,
                context: str | Path = ".", push: bool = False, engine: Optional[str] = "docker",
                toolkit: bool = False, local_bases: bool = False, host_pip: bool = False, cross: bool = False):
    """The :class:`~edgekit.deployment.containers.BuildPlan` of ``device``'s runtime image (or, ``toolkit``, of the
    x86_64 toolkit image) for ``engine`` (docker, podman, or auto: the one installed here).

    ``bundle``: an extracted bundle folder (or a bundle .tar.gz, extracted and verified next to itself)
    passed as the ``bundle`` build context; its runtime versions become the build args.
    """
    from ..config import load_device
    from ..errors import EdgekitError
    from . import versions
    from .containers import DOCKER_ARCH, TOOLKIT_TAG, plan_build

    common = {"engine": engine, "local_bases": local_bases, "use_host_pip": host_pip, "push": push,
              "context": str(context)}
    if toolkit:
        if device is not None or bundle is not None:
            raise EdgekitError("--toolkit builds the x86_64 toolkit image: it takes no --device or --bundle")
        if cross:
            raise EdgekitError("--cross builds a device's runtime image, not the toolkit")
        return plan_build("toolkit", "amd64", tag or TOOLKIT_TAG, {}, **common)
    if device is None:
        raise EdgekitError("Pass --device DEVICE (the runtime image of a device) or --toolkit")
    dev = load_device(device)
    if dev.arch not in versions.ARCHES:
        raise EdgekitError(f"No runtime image for {dev.name}: {dev.arch} is not a docker platform here "
                           f"({', '.join(versions.ARCHES)})")
    build_args = {"PYTHON_VERSION": versions.PYTHON_VERSION, "NUMPY_VERSION": versions.NUMPY_VERSION,
                  "ONNXRUNTIME_VERSION": versions.ONNXRUNTIME_VERSION, "LITERT_VERSION": versions.LITERT_VERSION}
    bdir = None
    if bundle is not None:
        from .bundle import safe_version

        bdir = _bundle_context(Path(bundle))
        import json

        manifest = json.loads((bdir / "manifest.json").read_text())
        if manifest.get("arch") != dev.arch:
            raise EdgekitError(f"{bundle} is a bundle for {manifest.get('device')} ({manifest.get('arch')}), "
                               f"not {dev.name} ({dev.arch})")
        mv = manifest.get("versions") or {}
        for key, name in (("ONNXRUNTIME_VERSION", "onnxruntime"), ("LITERT_VERSION", "ai-edge-litert"),
                          ("NUMPY_VERSION", "numpy")):
            if mv.get(name):  # build args reach RUN lines of the Dockerfile: plain versions only
                build_args[key] = safe_version(mv[name], f"versions.{name} in {bundle}'s manifest.json")
    return plan_build(docker_target(dev), DOCKER_ARCH[dev.arch], tag or f"edgekit-runtime:{dev.name}", build_args,
                      bundle_dir=bdir, cross=cross, **common)


def docker_command(device: str, bundle: Optional[str | Path] = None, tag: Optional[str] = None,
                   context: str | Path = ".", push: bool = False, engine: Optional[str] = "docker", **kw) -> List[str]:
    """The build command (argument list) of ``device``'s runtime image; see :func:`docker_plan`."""
    return docker_plan(device, bundle=bundle, tag=tag, context=context, push=push, engine=engine, **kw).build


def _bundle_context(bundle: Path) -> Path:
    from ..errors import EdgekitError
    from .bundle import extract_bundle as _extract

    if bundle.is_dir():
        from ..device.bundlecheck import BundleError, verify_tree

        try:  # a folder is checked like a tarball: every hash, nothing unlisted, no links
            verify_tree(str(bundle))
        except BundleError as exc:
            raise EdgekitError(f"Refusing bundle folder {bundle}: {exc}") from None
        return bundle.resolve()
    if not bundle.is_file():
        raise EdgekitError(f"Bundle not found: {bundle}")
    name = bundle.name[:-len(".tar.gz")] if bundle.name.endswith(".tar.gz") else bundle.stem
    dest = bundle.with_name(f"{name}.docker-context")
    _extract(bundle, dest, force=True)
    return dest.resolve()


def docker_cmd(device: Optional[str] = None, bundle: Optional[str | Path] = None, run: bool = False,
               tag: Optional[str] = None, push: bool = False, engine: Optional[str] = "docker", smoke: bool = False,
               **kw) -> dict:
    """``edgekit docker``: the build commands for the engine, printed or (``run``) run from the repository root.

    Run, the bases are made first and the build planned again (registering binfmt can change the target).
    ``smoke``: then the bundle's smoke test runs inside the built image (:mod:`.imagecheck`).
    """
    from ..errors import EdgekitError
    from .containers import pick_engine, run_plan

    if smoke and not (run and bundle is not None):
        raise EdgekitError("--smoke runs the bundle's smoke test in the image it builds: pass --run and --bundle")
    if smoke and pick_engine(engine) != "podman":
        raise EdgekitError("--smoke mounts the built image with podman: pass --engine podman")
    plan = docker_plan(device, bundle=bundle, tag=tag, push=push, engine=engine, **kw)
    out = _plan_dict(plan)
    if run:
        steps = []
        if plan.before:
            steps += run_plan(plan, only=plan.before)
            plan = docker_plan(device, bundle=bundle, tag=tag, push=push, engine=engine, **kw)
            out = _plan_dict(plan)
        steps += run_plan(plan, only=[plan.build, *plan.after])
        out.update({"ran": True, "steps": steps})
        if smoke:
            from .imagecheck import smoke_image

            out["smoke"] = smoke_image(plan.tag, engine=plan.engine)
    return out


def _plan_dict(plan) -> dict:
    import shlex

    return {"engine": plan.engine, "target": plan.target, "platform": plan.platform, "tag": plan.tag,
            "argv": plan.build, "command": " ".join(shlex.quote(a) for a in plan.build),
            "commands": [" ".join(shlex.quote(a) for a in c) for c in plan.commands], "notes": plan.notes,
            "cwd": str(REPO_ROOT), "ran": False}
