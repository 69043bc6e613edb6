"""Deployment bundles: one .tar.gz that installs and runs a run folder's model on a device, offline.

Layout of a bundle: one top-level folder, ``edgekit-<model>-<device>-<id8>/`` (so ``tar xzf`` spills nothing),
holding (every file but manifest.json is hashed in it)::

    manifest.json        sha256 + size of every file, versions, device profile, recipe, accuracy, latency
    runner.py            the standalone runner (stdlib + numpy + one runtime)
    install.sh           creates ./venv on the device and installs wheels/ offline
    run.sh               ./run.sh predict IN.npy OUT.npy | ./run.sh bench [--runs N]  (the bundle's model)
    model.<name>.onnx    the recommended artifact for the device, plus model.fp32.onnx as fallback
    wheels/*.whl         numpy + the runtime(s) + pip, for the device's platform and Python
    sample/input_*.npy   eval inputs; manifest["sample"] holds the host's outputs for them (smoke test)
    report.json          the run's report
    build_engine.py      Jetson / TensorRT devices only: builds the engine on first start (engines are
                         specific to the GPU and TensorRT version, so they are never shipped)

A run made for another device is shipped as the target's profile asks (:mod:`.retarget`): its int8 ONNX is
re-quantized for the target (or the bundle is refused with the command that makes a run for it), and the
manifest's latency is the target's own, labelled; the run's figure stays under ``run_latency``.

The bundle is deterministic (sorted entries, fixed times and owners, gzip without a timestamp): the same
run folder, device and wheels give the same bytes. Its id is the sha256 of manifest.json, which covers
every file's hash; remote releases are named after it.

Extraction (:func:`extract_bundle`) checks every member before writing anything (no absolute paths, no
``..``, no links leaving the bundle, no device files, no duplicates), drops the one top-level folder, extracts
into a temporary folder next to the destination, verifies every manifest hash and that no unlisted file exists,
and only then renames the folder into place. The checking functions use only the standard library:
``edgekit.deployment.remote`` sends their source to the device, so the device checks with the same code.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..errors import EdgekitError
from . import retarget, versions
from .select import (PRECISION_RANK, _engine_source, _variant_block, load_run, safe_file_name,  # noqa: F401
                     safe_python_version, safe_version, select_variants)

BUNDLE_FORMAT = "edgekit-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
FIXED_MTIME = 946684800  # 2000-01-01: entries carry no build time, so bundles are reproducible
EXECUTABLES = {"runner.py", "install.sh", "run.sh", "build_engine.py"}
NUM_SAMPLES = 4
FORMAT_REQUIREMENTS = {"onnx": "onnxruntime", "tflite": "ai-edge-litert"}


# The checks (standard library only) live in edgekit/device/bundlecheck.py, which the device agent runs too.
from ..device.bundlecheck import (BundleError, bad_name, check_members, extract_members,  # noqa: E402,F401
                                  manifest_id, sha256_file, strip_top, verify_tree)


# ----------------------------------------------------------------------------- reading and extracting


def _as_edgekit(exc: BundleError, tar: Path) -> EdgekitError:
    return EdgekitError(f"Refusing bundle {tar}: {exc}")


def _open_tar(tar: Path) -> tarfile.TarFile:
    if not tar.is_file():
        raise EdgekitError(f"Bundle not found: {tar}")
    try:
        return tarfile.open(tar, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise EdgekitError(f"{tar} is not a readable .tar.gz bundle: {exc}") from None


def read_manifest(tar: str | Path) -> Tuple[dict, str]:
    """(manifest, bundle id) of a bundle, read without extracting it (under its top-level folder or not)."""
    tar = Path(tar)
    with _open_tar(tar) as t:
        try:
            todo = dict(strip_top(check_members(t.getmembers())))
        except BundleError as exc:
            raise _as_edgekit(exc, tar) from None
        member = todo.get(MANIFEST)
        if member is None or not member.isreg():
            raise EdgekitError(f"Refusing bundle {tar}: not an edgekit bundle (no manifest.json)")
        f = t.extractfile(member)
        data = f.read() if f is not None else b""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise EdgekitError(f"Refusing bundle {tar}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise EdgekitError(f"Refusing bundle {tar}: manifest.json is not an edgekit bundle manifest")
    return manifest, manifest_id(data)


def top_folder(tar: str | Path) -> Optional[str]:
    """The bundle's top-level folder (None for bundles made before it had one)."""
    with _open_tar(Path(tar)) as t:
        names = [n for n in t.getnames()]
    tops = {n.split("/", 1)[0] for n in names}
    return tops.pop() if len(tops) == 1 and any("/" in n for n in names) else None


def extract_bundle(tar: str | Path, dest: str | Path, force: bool = False) -> Path:
    """Extract and verify ``tar`` into ``dest``, which appears whole (renamed from a temporary folder) or not at all.

    Unsafe members (absolute paths, ``..``, links leaving the bundle, devices) and any hash mismatch raise
    :class:`EdgekitError` before anything is moved into place. An existing ``dest`` is replaced only with
    ``force``.
    """
    from ..fsutil import check_replaceable, make_temp_dir, publish

    tar, dest = Path(tar), Path(dest)
    check_replaceable(dest, force, "Folder")
    _open_tar(tar).close()
    tmp = make_temp_dir(dest)
    try:
        try:
            extract_members(str(tar), str(tmp))
            verify_tree(str(tmp))
        except BundleError as exc:
            raise _as_edgekit(exc, tar) from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise EdgekitError(f"Refusing bundle {tar}: cannot read it ({exc})") from None
        tmp.chmod(0o755)
        publish(tmp, dest, kind="bundle")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def verify_bundle(tar: str | Path) -> Tuple[dict, str]:
    """Check a bundle completely (members, every hash) in a temporary folder; (manifest, id)."""
    with tempfile.TemporaryDirectory(prefix="edgekit-verify-") as tmp:
        extract_bundle(tar, Path(tmp) / "b")
        data = (Path(tmp) / "b" / MANIFEST).read_bytes()
        return json.loads(data), manifest_id(data)


# ----------------------------------------------------------------------------- wheels


def requirements_for(formats: List[str], report: dict, python_version: str) -> List[str]:
    """pip requirements the shipped formats need on the device (ONNX Runtime pinned to the run's version).

    The versions come from the run folder's report.json, which may come from someone else: each must be a
    plain release number, or the bundle is refused before anything is written.
    """
    vers = report.get("versions") or {}
    if not isinstance(vers, dict):
        raise EdgekitError("Refusing report.json: 'versions' is not a mapping")
    reqs = [versions.numpy_requirement(safe_python_version(python_version))]
    if "onnx" in formats:
        v = vers.get("onnxruntime") or versions.ONNXRUNTIME_VERSION
        reqs.append(f"onnxruntime=={safe_version(v, 'versions.onnxruntime in report.json')}")
    if "tflite" in formats:
        v = vers.get("ai-edge-litert") or versions.LITERT_VERSION
        reqs.append(f"ai-edge-litert=={safe_version(v, 'versions.ai-edge-litert in report.json')}")
    return reqs


def wheel_cache_dir() -> Path:
    from ..cache import cache_dir

    return cache_dir() / "wheels"


def _pip_download(args: List[str], timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
           "--progress-bar", "off", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EdgekitError(f"pip download did not finish within {timeout:.0f} s") from None


def fetch_wheels(requirements: List[str], arch: str, python_version: str, dest: Path,
                 cache: Optional[Path] = None) -> List[str]:
    """Put the wheels of ``requirements`` and their dependencies for ``arch`` / CPython ``python_version`` in ``dest``.

    Resolved offline from the cache folder first; only what is missing there is downloaded (into the cache).
    """
    if arch not in versions.ARCHES:
        raise EdgekitError(f"No wheels can be fetched for {arch} devices (known: {', '.join(versions.ARCHES)}); "
                           f"build the bundle with fetch_wheels=False (--no-wheels) and install the runtime on "
                           f"the device yourself")
    safe_python_version(python_version)
    key = f"cp{python_version.replace('.', '')}-{arch}"
    cache = Path(cache) if cache is not None else wheel_cache_dir()
    cache = cache / key
    cache.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    target = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for tag in versions.platform_tags(arch):
        target += ["--platform", tag]
    offline = ["--no-index", "--find-links", str(cache), *target, "--dest", str(dest), *requirements]
    proc = _pip_download(offline)
    if proc.returncode != 0:
        online = [*target, "--dest", str(cache), *requirements]
        proc = _pip_download(online)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines()
                     if ln.strip() and not ln.startswith("WARNING: Location")]
            raise EdgekitError(f"Cannot fetch wheels of {' '.join(requirements)} for {arch} / Python "
                               f"{python_version}: {(lines[-1] if lines else 'pip download failed').strip()} "
                               f"(no network, or no wheel for that platform and Python?)")
        proc = _pip_download(offline)
        if proc.returncode != 0:
            raise EdgekitError(f"pip could not resolve {' '.join(requirements)} from the wheel cache {cache}: "
                               f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no message'}")
    return sorted(p.name for p in dest.glob("*.whl"))


# ----------------------------------------------------------------------------- sample inputs


def _sample_inputs(report: dict, input_shape: List[int], task=None) -> Tuple[Any, str]:
    """A few eval images of the run's task (``task`` when it was rebuilt already) when it can be loaded here, else
    seeded random inputs."""
    import numpy as np

    info = report.get("task") or {}
    if (task is not None or info.get("name") == "mnist") and len(input_shape) == 4:
        try:
            from ..data import load_task

            t = task or load_task("mnist", input_size=int(input_shape[-1]), seed=int(report.get("seed", 0)))
            x, _ = t.arrays("eval", limit=NUM_SAMPLES)
            if list(x.shape[1:]) == list(input_shape[1:]):
                return np.ascontiguousarray(x[:NUM_SAMPLES], dtype=np.float32), "the run's eval split"
        except Exception:  # noqa: BLE001 - a sample from the task is a nicety; random inputs still smoke-test
            pass
    rng = np.random.default_rng(0)
    shape = [NUM_SAMPLES, *[int(d) if isinstance(d, int) and d > 0 else 1 for d in input_shape[1:]]]
    return rng.standard_normal(shape).astype(np.float32), "seeded random inputs"


def _host_outputs(path: Path, fmt: str, samples) -> Tuple[Optional[list], Optional[str]]:
    """The host's logits for each sample with the artifact's runtime (None when it cannot run here)."""
    import numpy as np

    from ..formats import FORMATS
    from ..runtime import load_runner

    try:
        r = load_runner(FORMATS.get(fmt).runtime, path, threads=1)
        outs = [np.asarray(r.run(samples[i:i + 1]), dtype=np.float32).reshape(-1) for i in range(len(samples))]
        return [o.tolist() for o in outs], f"{r.runtime} {r.version}"
    except Exception:  # noqa: BLE001 - e.g. LiteRT absent here: the device smoke test then only checks it runs
        return None, None


def _input_shape(path: Path, fmt: str) -> List[int]:
    if fmt == "onnx":
        import onnx

        m = onnx.load(str(path), load_external_data=False)
        dims = m.graph.input[0].type.tensor_type.shape.dim
        return [d.dim_value if d.dim_value > 0 else 1 for d in dims]
    from ..formats import FORMATS
    from ..runtime import load_runner

    return [d if isinstance(d, int) and d > 0 else 1 for d in load_runner(FORMATS.get(fmt).runtime, path).input_shape]


# ----------------------------------------------------------------------------- building


def _write_tar(src: Path, out: Path, top: str) -> None:
    """A reproducible .tar.gz of ``src``'s files under the folder ``top``: sorted, fixed times/owners, no gzip
    timestamp."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo(top)
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
        folder.uid = folder.gid = 0
        folder.uname = folder.gname = ""
        tar.addfile(folder)
        for p in files:
            rel = p.relative_to(src).as_posix()
            info = tarfile.TarInfo(f"{top}/{rel}")
            info.size = p.stat().st_size
            info.mtime = FIXED_MTIME
            info.mode = 0o755 if rel in EXECUTABLES else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(p, "rb") as f:
                tar.addfile(info, f)


def folder_name(model: Any, device: str, bundle_id: str) -> str:
    """``edgekit-<model>-<device>-<id8>``: the bundle's top-level folder, a plain name whatever the report says."""
    def plain(x: Any) -> str:
        return re.sub(r"[^A-Za-z0-9._+-]+", "-", str(x)).strip("-.")[:60] or "x"

    return f"edgekit-{plain(model)}-{plain(device)}-{bundle_id[:8]}"


def _runner_version() -> int:
    """The runner's version, read from its file (it is a device-side script, not an edgekit module)."""
    from . import RUNNER_PATH

    m = re.search(r"^RUNNER_VERSION = (\d+)$", RUNNER_PATH.read_text(), re.M)
    return int(m.group(1)) if m else 0


def _save_npy(path: Path, x) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.save(f, x, allow_pickle=False)


def _artifact_block(v: dict, why: str, path: Path, dev, report: dict, requant: Optional[dict]) -> dict:
    """The manifest's record of a shipped file: what it is, why, its latency on the target, the run's figure."""
    block = {**_variant_block(v), "why": why}
    block["size_mb"] = round(path.stat().st_size / 2**20, 3)
    if requant is not None:  # the run's accuracy and agreement were of another model: the host's, here
        block.update(accuracy=requant.get("accuracy"), agreement=requant.get("agreement_with_fp32"),
                     requantized=requant)
    lat, note = retarget.target_latency(path, v["format"], dev, report, v, requant is not None)
    block["latency"] = lat
    if note:
        block["latency_note"] = note
    block["run_latency"] = retarget.run_latency(report, v)
    if requant is not None and block["run_latency"]:
        block["run_latency"]["of"] = f"the run's {v.get('path')} ({requant['run_config']}), not the shipped model"
    return block


def build_bundle(run_dir: str | Path, device, out_tar: str | Path, python_version: str = versions.PYTHON_VERSION,
                 fetch_wheels: bool = True, force: bool = False, wheel_cache: Optional[str | Path] = None) -> Path:
    """Write ``out_tar``: the artifact(s) of ``run_dir`` for ``device``, the runner, wheels, install.sh, manifest.

    ``device`` is a profile name, a YAML path or a :class:`~edgekit.config.DeviceProfile`. The shipped
    model is the report's recommended variant when the run was made for this device, else the device's
    preferred format at the lowest precision it runs (within the recipe's accuracy budget), an int8 ONNX
    re-quantized as the device's profile asks when the run's differs; fp32 ONNX always comes along as the
    fallback. TensorRT devices get the ONNX and ``build_engine.py``. Nothing is written when it is refused.
    """
    from .. import __version__
    from ..config import DeviceProfile, load_device
    from ..device import DEVICE_DIR
    from . import RUNNER_PATH

    dev = device if isinstance(device, DeviceProfile) else load_device(str(device))
    run_dir, report = load_run(run_dir)
    out_tar = Path(out_tar)
    if out_tar.exists() and not force:
        raise EdgekitError(f"{out_tar} already exists; pass --force to replace it")
    if fetch_wheels and dev.arch not in versions.ARCHES:
        raise EdgekitError(f"No wheels can be fetched for {dev.name} ({dev.arch}); build with --no-wheels")
    safe_python_version(python_version)
    chosen, fallback, why = select_variants(run_dir, report, dev)
    plan = retarget.plan_requant(run_dir, report, dev, chosen)  # refuses here, before anything is written
    engine = _engine_source(run_dir, report, dev, chosen)
    if engine is not None:
        safe_file_name(engine["name"], "engine name")
        safe_file_name(engine["onnx"], "engine source file name")
    shipped = [v for v in (chosen, fallback) if v is not None]
    files = [v["path"] for v in shipped] + ([engine["onnx"]] if engine and engine["onnx"] not in
                                             [v["path"] for v in shipped] else [])
    formats = sorted({v["format"] for v in shipped})
    reqs = requirements_for(formats, report, python_version)
    out_tar.parent.mkdir(parents=True, exist_ok=True)
    notes: List[str] = []
    with tempfile.TemporaryDirectory(prefix="edgekit-bundle-", dir=out_tar.parent) as tmpdir:
        stage = Path(tmpdir) / "bundle"
        stage.mkdir()
        requant = None
        for f in files:
            if plan is not None and f == chosen["path"]:
                requant, why = retarget.requantize(plan, run_dir, stage / f, dev)
                notes.append(f"{why}; agreement with fp32 on {requant.get('eval_images', 0)} eval images here: "
                             f"{requant.get('agreement_with_fp32')}")
            else:
                shutil.copyfile(run_dir / f, stage / f)
        shutil.copyfile(RUNNER_PATH, stage / "runner.py")
        shutil.copyfile(run_dir / "report.json", stage / "report.json")

        # smoke-test samples and what the host computes for them
        shape = _input_shape(stage / chosen["path"], chosen["format"])
        samples, sample_source = _sample_inputs(report, shape, plan.task if plan is not None else None)
        sample_files = []
        for i in range(len(samples)):
            rel = f"sample/input_{i}.npy"
            _save_npy(stage / rel, samples[i:i + 1])
            sample_files.append(rel)
        expected, host_runtime = _host_outputs(stage / chosen["path"], chosen["format"], samples)
        sample = {"inputs": sample_files, "source": sample_source, "model": chosen["path"],
                  "expected": expected, "expected_by": host_runtime,
                  "expected_argmax": [int(max(range(len(o)), key=o.__getitem__)) for o in expected]
                  if expected else None,
                  "atol": 0.05 if chosen["precision"] == "fp32" else 0.5}

        wheels: List[str] = []
        if fetch_wheels:
            wheels = fetch_wheels_into(reqs, dev.arch, python_version, stage / "wheels", wheel_cache)
        else:
            notes.append("no wheels: install.sh installs the requirements from the package index (online)")
        # the device-side files are copied as they are: nothing from the run folder is pasted into a script
        for f in ("install.sh", "run.sh") + (("build_engine.py",) if engine is not None else ()):
            shutil.copyfile(DEVICE_DIR / f, stage / f)
        if engine is not None:
            notes.append("the TensorRT engine is built on the device on first start (build_engine.py); run.sh "
                         "falls back to the ONNX with ONNX Runtime when TensorRT is absent")
        (stage / "requirements.txt").write_text("".join(r + "\n" for r in reqs))

        artifact = _artifact_block(chosen, why, stage / chosen["path"], dev, report, requant)
        lat = artifact["latency"]
        if report.get("device") != dev.name:
            notes.append(f"latency on {dev.name}: " + (f"{lat['p50']} ms {lat['of']}" if lat else
                                                        artifact.get("latency_note", "none")) +
                         f"; the run's figure (on {report.get('device')}) is under run_latency")
        vers = report.get("versions") or {}
        pin = {r.split("==")[0]: r.split("==")[1] for r in reqs if "==" in r}
        manifest = {
            "format": BUNDLE_FORMAT,
            "bundle_version": BUNDLE_VERSION,
            "edgekit_version": __version__,
            "device": dev.name,
            "arch": dev.arch,
            "device_profile": dev.model_dump(),
            "python_version": python_version,
            "platforms": versions.platform_tags(dev.arch) if dev.arch in versions.ARCHES else [],
            "requirements": reqs,
            "wheels": wheels,
            "versions": {"onnxruntime": pin.get("onnxruntime"), "ai-edge-litert": pin.get("ai-edge-litert"),
                         "numpy": pin.get("numpy"), "runner": _runner_version(), "run": vers},
            "model": report.get("model"),
            "recipe": report.get("recipe"),
            "recipe_spec": report.get("recipe_spec"),
            "run_device": report.get("device"),
            "run_created": report.get("created"),
            "task": report.get("task"),
            "artifact": artifact,
            "fallback": _artifact_block(fallback, "fp32 ONNX fallback", stage / fallback["path"], dev, report, None)
            if fallback is not None else None,
            "engine": engine,
            "sample": sample,
            "entry": {"install": "install.sh", "run": "run.sh", "runner": "runner.py"},
            "notes": notes,
        }
        manifest["files"] = {p.relative_to(stage).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
                             for p in sorted(stage.rglob("*")) if p.is_file()}
        data = (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()
        (stage / MANIFEST).write_bytes(data)
        tmp_tar = Path(tmpdir) / "bundle.tar.gz"
        _write_tar(stage, tmp_tar, folder_name(report.get("model"), dev.name, manifest_id(data)))
        os.replace(tmp_tar, out_tar)
    return out_tar


def fetch_wheels_into(reqs: List[str], arch: str, python_version: str, dest: Path,
                      cache: Optional[str | Path] = None) -> List[str]:
    """The requirements' wheels plus pip's own (so the device venv needs no ensurepip) in ``dest``."""
    names = fetch_wheels([*reqs, f"pip=={versions.PIP_VERSION}"], arch, python_version, dest,
                         Path(cache) if cache is not None else None)
    return names
