"""Deployment bundles: one .tar.gz that installs and runs a run folder's model on a device, offline.

Layout of a bundle (no top-level folder; every file but manifest.json is hashed in it)::

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

The bundle is deterministic (sorted entries, fixed times and owners, gzip without a timestamp): the same
run folder, device and wheels give the same bytes. Its id is the sha256 of manifest.json, which covers
every file's hash; remote releases are named after it.

Extraction (:func:`extract_bundle`) checks every member before writing anything (no absolute paths, no
``..``, no links leaving the bundle, no device files, no duplicates), extracts into a temporary folder next
to the destination, verifies every manifest hash and that no unlisted file exists, and only then renames
the folder into place. The checking functions use only the standard library: ``edgekit.deploy.remote``
sends their source to the device, so the device checks with the same code.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..errors import EdgekitError
from . import versions

BUNDLE_FORMAT = "edgekit-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
FIXED_MTIME = 946684800  # 2000-01-01: entries carry no build time, so bundles are reproducible
EXECUTABLES = {"runner.py", "install.sh", "run.sh", "build_engine.py"}
PRECISION_RANK = {"int8": 0, "fp16": 1, "fp32": 2}
NUM_SAMPLES = 4
FORMAT_REQUIREMENTS = {"onnx": "onnxruntime", "tflite": "ai-edge-litert"}


# ----------------------------------------------------------------------------- checks (standard library only)
# These functions are sent to the device by edgekit.deploy.remote (inspect.getsource): they may use only the
# modules imported in remote.AGENT_HEADER (hashlib, json, os, shutil, tarfile, tempfile) and BundleError.


class BundleError(Exception):
    """A bundle that must not be installed: unsafe entry, wrong hash, missing or unlisted file."""


def _bad_name(name):
    """Why an archive member name is unsafe, or None."""
    if not name or name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "'..' in path"
    if any(ord(c) < 32 for c in name):
        return "control character in name"
    return None


def check_members(members):
    """Refuse the whole archive if any member is unsafe; called before anything is written."""
    seen = set()
    for m in members:
        name = m.name
        while name.startswith("./"):
            name = name[2:]
        if name in ("", ".") and m.isdir():
            continue
        why = _bad_name(name)
        if why is None and not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            why = "not a regular file, folder or link (device, fifo ...)"
        if why is None and (m.issym() or m.islnk()):
            target = m.linkname.replace("\\", "/")
            if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
                why = "link to an absolute path ({})".format(m.linkname)
            else:
                base = os.path.dirname(name) if m.issym() else ""
                resolved = os.path.normpath(os.path.join(base, target)).replace("\\", "/")
                if resolved == ".." or resolved.startswith("../"):
                    why = "link pointing outside the bundle ({} -> {})".format(name, m.linkname)
        norm = os.path.normpath(name).rstrip("/")
        if why is None and norm in seen and not m.isdir():
            why = "duplicate entry"
        if why is not None:
            raise BundleError("unsafe bundle entry {!r}: {}; nothing was extracted".format(m.name, why))
        seen.add(norm)


def _inside(root, path):
    root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep)


def extract_members(tar_path, into):
    """Extract a checked archive into the empty folder ``into`` (regular files, folders, links inside only)."""
    with tarfile.open(tar_path, "r:*") as tar:
        members = tar.getmembers()
        check_members(members)
        for m in members:
            name = m.name
            while name.startswith("./"):
                name = name[2:]
            if name in ("", "."):
                continue
            path = os.path.join(into, name)
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            if not _inside(into, parent):
                raise BundleError("unsafe bundle entry {!r}: its folder leaves the bundle".format(m.name))
            if m.isdir():
                os.makedirs(path, exist_ok=True)
            elif m.issym():
                os.symlink(m.linkname, path)
                if not _inside(into, path):
                    raise BundleError("unsafe bundle entry {!r}: link leaves the bundle".format(m.name))
            else:  # a regular file, or a hard link to a member already extracted (tarfile reads its data)
                src = tar.extractfile(m)
                if src is None:
                    raise BundleError("bundle entry {!r} has no data".format(m.name))
                with src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.chmod(path, 0o755 if m.mode & 0o100 else 0o644)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_tree(root, strict=True):
    """Check an extracted bundle against its manifest: every hash and size, no missing (and, when ``strict``,
    no unlisted) file. An installed release holds more (its venv), so it is checked with ``strict=False``.

    Returns the manifest (a dict).
    """
    mpath = os.path.join(root, "manifest.json")
    if not os.path.isfile(mpath) or os.path.islink(mpath):
        raise BundleError("not an edgekit bundle: manifest.json is missing")
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except ValueError as exc:
        raise BundleError("manifest.json is not valid JSON: {}".format(exc))
    if not isinstance(manifest, dict) or manifest.get("format") != "edgekit-bundle" \
            or not isinstance(manifest.get("files"), dict):
        raise BundleError("manifest.json is not an edgekit bundle manifest")
    listed = set()
    for rel, meta in sorted(manifest["files"].items()):
        why = _bad_name(rel)
        if why is not None:
            raise BundleError("manifest lists an unsafe path {!r}: {}".format(rel, why))
        path = os.path.join(root, rel)
        if os.path.islink(path) or not os.path.isfile(path):
            raise BundleError("bundle file {} is missing (or not a regular file)".format(rel))
        size = os.path.getsize(path)
        if size != meta.get("size"):
            raise BundleError("bundle file {} has {} bytes, the manifest says {}: the bundle was altered or "
                              "truncated".format(rel, size, meta.get("size")))
        digest = sha256_file(path)
        if digest != meta.get("sha256"):
            raise BundleError("sha256 mismatch for {}: the manifest says {}..., the file has {}...; the bundle was "
                              "altered or corrupted".format(rel, str(meta.get("sha256"))[:12], digest[:12]))
        listed.add(os.path.normpath(rel))
    for dirpath, dirnames, filenames in os.walk(root) if strict else ():
        for fn in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.normpath(os.path.relpath(os.path.join(dirpath, fn), root))
            if rel != "manifest.json" and rel not in listed:
                raise BundleError("bundle holds a file its manifest does not list: {}".format(rel))
    return manifest


def manifest_id(manifest_bytes):
    """The bundle id: the first 16 hex digits of manifest.json's sha256 (it covers every file's hash)."""
    return hashlib.sha256(manifest_bytes).hexdigest()[:16]


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
    """(manifest, bundle id) of a bundle, read without extracting it."""
    tar = Path(tar)
    with _open_tar(tar) as t:
        try:
            member = t.getmember(MANIFEST)
        except KeyError:
            raise EdgekitError(f"Refusing bundle {tar}: not an edgekit bundle (no manifest.json)") from None
        f = t.extractfile(member)
        data = f.read() if f is not None else b""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise EdgekitError(f"Refusing bundle {tar}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise EdgekitError(f"Refusing bundle {tar}: manifest.json is not an edgekit bundle manifest")
    return manifest, manifest_id(data)


def extract_bundle(tar: str | Path, dest: str | Path, force: bool = False) -> Path:
    """Extract and verify ``tar`` into ``dest``, which appears whole (renamed from a temporary folder) or not at all.

    Unsafe members (absolute paths, ``..``, links leaving the bundle, devices) and any hash mismatch raise
    :class:`EdgekitError` before anything is moved into place. An existing ``dest`` is replaced only with
    ``force``.
    """
    tar, dest = Path(tar), Path(dest)
    if dest.exists() and not force:
        raise EdgekitError(f"{dest} already exists; pass force=True (--force) to replace it")
    if dest.exists() and not dest.is_dir():
        raise EdgekitError(f"{dest} exists and is not a folder")
    _open_tar(tar).close()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        try:
            extract_members(str(tar), str(tmp))
            verify_tree(str(tmp))
        except BundleError as exc:
            raise _as_edgekit(exc, tar) from None
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise EdgekitError(f"Refusing bundle {tar}: cannot read it ({exc})") from None
        tmp.chmod(0o755)
        if dest.exists():
            trash = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, trash)
            os.replace(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dest)
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


# ----------------------------------------------------------------------------- choosing what to ship


def load_run(run_dir: str | Path) -> Tuple[Path, dict]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EdgekitError(f"Run folder not found: {run_dir}")
    rp = run_dir / "report.json"
    if not rp.is_file():
        raise EdgekitError(f"{run_dir} is not an edgekit run folder: it has no report.json "
                           f"(make one with `edgekit compress`)")
    try:
        report = json.loads(rp.read_text())
    except ValueError as exc:
        raise EdgekitError(f"{rp} is not valid JSON: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("variants"), list):
        raise EdgekitError(f"{rp} is not an edgekit report (no variants)")
    return run_dir, report


def _available(run_dir: Path, report: dict) -> List[dict]:
    """Variants whose artifact file is in the run folder."""
    out = []
    for v in report["variants"]:
        p = v.get("path")
        if v.get("status", "ok") == "ok" and p and (run_dir / p).is_file() and "/" not in p and "\\" not in p:
            out.append(v)
    return out


def select_variants(run_dir: str | Path, report: dict, dev) -> Tuple[dict, Optional[dict], str]:
    """(the variant to ship, the fp32 ONNX fallback or None when it is the same, why it was chosen)."""
    run_dir = Path(run_dir)
    avail = _available(run_dir, report)
    if not avail:
        raise EdgekitError(f"{run_dir} has no artifacts to deploy: none of the report's variant files "
                           f"({', '.join(str(v.get('path')) for v in report['variants']) or 'none'}) is in the folder")
    fallback = next((v for v in avail if v["format"] == "onnx" and v["precision"] == "fp32"), None)
    deployable = [v for v in avail if v["format"] in ("onnx", "tflite")]  # engines are built on the device
    rec = report.get("recommended") or {}
    chosen, why = None, ""
    if report.get("device") == dev.name and rec:
        chosen = next((v for v in deployable if v["name"] == rec.get("name") and v["format"] == rec.get("format")),
                      None)
        how = "by estimated latency" if rec.get("latency_source") == "estimated" else "measured"
        why = f"the report's recommendation for {dev.name} (fastest {how} within the accuracy budget)"
    if chosen is None:
        budget = (report.get("recipe_spec") or {}).get("accuracy_budget_pp", 0.5) / 100
        ref = report["variants"][0].get("accuracy")
        ok = [v for v in deployable if v["format"] in dev.formats and v["precision"] in dev.precisions
              and (ref is None or v.get("accuracy") is None or v["accuracy"] >= ref - budget - 1e-9)]
        if dev.kind == "cpu":  # lower precision first on CPUs that have the kernels for it (ARM: int8 pays off)
            ok.sort(key=lambda v: (dev.formats.index(v["format"]), PRECISION_RANK.get(v["precision"], 9)))
        else:  # GPUs run the engine built from ONNX; the CPU fallback is fp32
            ok.sort(key=lambda v: (PRECISION_RANK.get(v["precision"], 9) != 2, dev.formats.index(v["format"])))
        if ok:
            chosen = ok[0]
            why = (f"not measured on {dev.name}: the first of its formats ({', '.join(dev.formats)}) at the lowest "
                   f"precision it runs, within the recipe's accuracy budget" if dev.kind == "cpu" else
                   f"{dev.name} builds a TensorRT engine from the ONNX on the device")
        elif fallback is not None:
            chosen, why = fallback, f"no variant of the run fits {dev.name}'s formats and precisions; fp32 ONNX"
        else:
            raise EdgekitError(f"{run_dir} has no artifact {dev.name} can run (it runs "
                               f"{', '.join(dev.formats)} at {', '.join(dev.precisions)}; the run has "
                               f"{', '.join(v['format'] + ' ' + v['precision'] for v in avail)})")
    if fallback is not None and fallback["path"] == chosen["path"]:
        fallback = None
    return chosen, fallback, why


def _variant_block(v: Optional[dict]) -> Optional[dict]:
    if v is None:
        return None
    keys = ("name", "format", "precision", "path", "size_mb", "accuracy", "agreement", "latency_ms", "speedup")
    return {k: v.get(k) for k in keys}


def _engine_source(run_dir: Path, report: dict, dev, chosen: dict) -> Optional[dict]:
    """For TensorRT devices: which ONNX the device builds its engine from, at which precision."""
    if "tensorrt" not in dev.formats:
        return None
    for v in report["variants"]:  # a tensorrt variant of the run left its (fp16 or QDQ int8) ONNX beside it
        if v.get("format") != "tensorrt" or v.get("precision") not in dev.precisions:
            continue
        files = (v.get("details") or {}).get("files") or []
        src = next((f for f in files if f.endswith(".onnx") and (run_dir / f).is_file() and "/" not in f), None)
        if src:
            return {"name": v["name"], "onnx": src, "precision": v["precision"], "from": "the run's tensorrt variant"}
    precision = "fp16" if "fp16" in dev.precisions else "fp32"
    return {"name": f"{chosen['name']}-{precision}", "onnx": chosen["path"], "precision": precision,
            "from": f"{chosen['path']} with TensorRT's {precision} builder flag"}


# ----------------------------------------------------------------------------- wheels


def requirements_for(formats: List[str], report: dict, python_version: str) -> List[str]:
    """pip requirements the shipped formats need on the device (ONNX Runtime pinned to the run's version)."""
    vers = report.get("versions") or {}
    reqs = [versions.numpy_requirement(python_version)]
    if "onnx" in formats:
        reqs.append(f"onnxruntime=={vers.get('onnxruntime') or versions.ONNXRUNTIME_VERSION}")
    if "tflite" in formats:
        reqs.append(f"ai-edge-litert=={vers.get('ai-edge-litert') or versions.LITERT_VERSION}")
    return reqs


def wheel_cache_dir() -> Path:
    from ..pipeline import cache_dir

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
    if not python_version.replace(".", "").isdigit() or python_version.count(".") != 1:
        raise EdgekitError(f"python_version must look like 3.11, not {python_version!r}")
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


def _sample_inputs(report: dict, input_shape: List[int]) -> Tuple[Any, str]:
    """A few eval images of the run's task when it can be loaded here, else seeded random inputs."""
    import numpy as np

    task = report.get("task") or {}
    if task.get("name") == "mnist" and len(input_shape) == 4:
        try:
            from ..data import load_task

            t = load_task("mnist", input_size=int(input_shape[-1]), seed=int(report.get("seed", 0)))
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


# ----------------------------------------------------------------------------- scripts shipped in the bundle

INSTALL_SH = r"""#!/bin/sh
# Install this edgekit bundle on the device: a venv in ./venv, the runtime from ./wheels, offline.
#   sh install.sh                     PYTHON=python3.11 sh install.sh
# EDGEKIT_LAUNCHER prefixes every python call, e.g. "qemu-aarch64-static -L SYSROOT" to install into an
# emulated arm64 userland on an x86_64 machine.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE"
PYTHON="${PYTHON:-python3}"
LAUNCH="${EDGEKIT_LAUNCHER:-}"
WANT="@PYTHON_VERSION@"
REQS="@REQUIREMENTS@"
HAVE=$($LAUNCH $PYTHON -c 'import sys; print("%d.%d" % sys.version_info[:2])') || {
    echo "install.sh: cannot run $PYTHON on this device (set PYTHON=/path/to/python3)" >&2; exit 3; }
if [ -d wheels ] && [ "$HAVE" != "$WANT" ]; then
    echo "install.sh: this bundle's wheels are for Python $WANT, but $PYTHON is Python $HAVE; rebuild the" \
         "bundle with python_version=$HAVE (edgekit deploy --python $HAVE) or set PYTHON" >&2
    exit 3
fi
rm -rf venv.partial
$LAUNCH $PYTHON -m venv --without-pip @VENV_FLAGS@ venv.partial || {
    echo "install.sh: '$PYTHON -m venv' failed (Debian/Ubuntu: apt-get install python3-venv)" >&2; exit 3; }
VPY="$HERE/venv.partial/bin/python"
if [ -d wheels ]; then
    PIPWHL=$(ls wheels/pip-*.whl 2>/dev/null | head -n 1)
    [ -n "$PIPWHL" ] || { echo "install.sh: wheels/ has no pip wheel" >&2; exit 3; }
    # only the bundle's wheels: no index, and no pip configuration of this machine (extra indexes, constraints)
    PIP_CONFIG_FILE=/dev/null $LAUNCH "$VPY" "$HERE/$PIPWHL/pip" install --quiet --disable-pip-version-check \
        --no-warn-script-location --no-index --find-links "$HERE/wheels" $REQS
else
    $LAUNCH "$VPY" -m ensurepip --upgrade >/dev/null
    $LAUNCH "$VPY" -m pip install --quiet --disable-pip-version-check $REQS
fi
$LAUNCH "$VPY" "$HERE/runner.py" info > runner-info.json
rm -rf venv
mv venv.partial venv
# the venv was made as venv.partial: point its scripts (activate, entry points' shebangs) at its final place
for f in venv/bin/* venv/pyvenv.cfg; do
    if [ -f "$f" ] && [ ! -L "$f" ] && grep -q "venv[.]partial" "$f" 2>/dev/null; then
        sed "s#venv[.]partial#venv#g" "$f" > "$f.tmp" && chmod --reference="$f" "$f.tmp" 2>/dev/null
        mv "$f.tmp" "$f"
    fi
done
echo "install.sh: installed into $HERE/venv (Python $HAVE): $REQS"
"""

RUN_SH = r"""#!/bin/sh
# Run this bundle's model with its venv (after install.sh):
#   ./run.sh predict INPUT.npy OUTPUT.npy     ./run.sh bench [--runs 100] [--threads 4]     ./run.sh info
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
LAUNCH="${EDGEKIT_LAUNCHER:-}"
PY="$HERE/venv/bin/python"
[ -x "$PY" ] || { echo "run.sh: run install.sh first" >&2; exit 3; }
MODEL="$HERE/@MODEL@"
if [ -f "$HERE/build_engine.py" ]; then  # TensorRT: the engine is built on first start, ONNX if that fails
    ENGINE=$($LAUNCH "$PY" "$HERE/build_engine.py" --print-path) && MODEL="$ENGINE" || \
        echo "run.sh: no TensorRT engine (see above); running the ONNX fallback with ONNX Runtime" >&2
fi
[ $# -ge 1 ] || { echo "usage: run.sh predict IN.npy OUT.npy | bench [...] | info" >&2; exit 2; }
CMD=$1; shift
case "$CMD" in
    predict|bench) exec $LAUNCH "$PY" "$HERE/runner.py" "$CMD" "$MODEL" "$@" ;;
    *) exec $LAUNCH "$PY" "$HERE/runner.py" "$CMD" "$@" ;;
esac
"""

BUILD_ENGINE_PY = r'''#!/usr/bin/env python3
"""First start on a TensorRT device: build this bundle's engine from its ONNX, on the device.

Engines only load with the GPU and TensorRT version they were built with, so bundles ship the ONNX and
this script. It uses TensorRT's Python API when ``import tensorrt`` works (JetPack ships it), else
``trtexec`` (/usr/src/tensorrt/bin/trtexec on JetPack). The engine goes to engines/ under a name with the
TensorRT version and GPU; an existing one is reused. Prints one JSON object (or, with --print-path, the
engine's path). Exit codes: 0 ok, 3 no TensorRT here, 4 the build failed. Standard library + tensorrt only.
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


def build_with_api(trt, onnx_path, precision, engine_file, workspace_mb=1024):
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if major < 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with open(onnx_path, "rb") as f:
        if not parser.parse(f.read()):
            raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))[:500])
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if hasattr(trt.BuilderFlag, "FP16") and precision in ("fp16", "int8"):  # TensorRT < 11
        config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT could not build an engine (see its log above)")
    with open(engine_file, "wb") as f:
        f.write(plan)


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
    name = "model.{}.trt{}.{}.engine".format(spec["name"], version, slug(gpu_name()))
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
'''


# ----------------------------------------------------------------------------- building


def _write_tar(src: Path, out: Path) -> None:
    """A reproducible .tar.gz of ``src``'s files: sorted, fixed times/owners, no gzip timestamp."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in files:
            rel = p.relative_to(src).as_posix()
            info = tarfile.TarInfo(rel)
            info.size = p.stat().st_size
            info.mtime = FIXED_MTIME
            info.mode = 0o755 if rel in EXECUTABLES else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(p, "rb") as f:
                tar.addfile(info, f)


def _save_npy(path: Path, x) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.save(f, x, allow_pickle=False)


def build_bundle(run_dir: str | Path, device, out_tar: str | Path, python_version: str = versions.PYTHON_VERSION,
                 fetch_wheels: bool = True, force: bool = False, wheel_cache: Optional[str | Path] = None) -> Path:
    """Write ``out_tar``: the artifact(s) of ``run_dir`` for ``device``, the runner, wheels, install.sh, manifest.

    ``device`` is a profile name, a YAML path or a :class:`~edgekit.config.DeviceProfile`. The shipped
    model is the report's recommended variant when the run was made for this device, else the device's
    preferred format at the lowest precision it runs (within the recipe's accuracy budget); fp32 ONNX
    always comes along as the fallback. TensorRT devices get the ONNX and ``build_engine.py``.
    """
    from .. import __version__
    from ..config import DeviceProfile, load_device
    from . import RUNNER_PATH

    dev = device if isinstance(device, DeviceProfile) else load_device(str(device))
    run_dir, report = load_run(run_dir)
    out_tar = Path(out_tar)
    if out_tar.exists() and not force:
        raise EdgekitError(f"{out_tar} already exists; pass --force to replace it")
    if fetch_wheels and dev.arch not in versions.ARCHES:
        raise EdgekitError(f"No wheels can be fetched for {dev.name} ({dev.arch}); build with --no-wheels")
    chosen, fallback, why = select_variants(run_dir, report, dev)
    engine = _engine_source(run_dir, report, dev, chosen)
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
        for f in files:
            shutil.copyfile(run_dir / f, stage / f)
        shutil.copyfile(RUNNER_PATH, stage / "runner.py")
        shutil.copyfile(run_dir / "report.json", stage / "report.json")

        # smoke-test samples and what the host computes for them
        shape = _input_shape(run_dir / chosen["path"], chosen["format"])
        samples, sample_source = _sample_inputs(report, shape)
        sample_files = []
        for i in range(len(samples)):
            rel = f"sample/input_{i}.npy"
            _save_npy(stage / rel, samples[i:i + 1])
            sample_files.append(rel)
        expected, host_runtime = _host_outputs(run_dir / chosen["path"], chosen["format"], samples)
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
        venv_flags = ""
        if engine is not None:
            (stage / "build_engine.py").write_text(BUILD_ENGINE_PY)
            venv_flags = "--system-site-packages"  # JetPack's tensorrt (and torch) live in the system Python
            notes.append("the TensorRT engine is built on the device on first start (build_engine.py); run.sh "
                         "falls back to the ONNX with ONNX Runtime when TensorRT is absent")
        (stage / "install.sh").write_text(INSTALL_SH.replace("@PYTHON_VERSION@", python_version)
                                          .replace("@REQUIREMENTS@", " ".join(reqs))
                                          .replace("@VENV_FLAGS@", venv_flags))
        (stage / "run.sh").write_text(RUN_SH.replace("@MODEL@", chosen["path"]))

        vers = report.get("versions") or {}
        from .runner import RUNNER_VERSION

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
            "versions": {"onnxruntime": next((r.split("==")[1] for r in reqs if r.startswith("onnxruntime==")), None),
                         "ai-edge-litert": next((r.split("==")[1] for r in reqs if r.startswith("ai-edge-litert==")),
                                                None),
                         "numpy": next((r.split("==")[1] for r in reqs if r.startswith("numpy==")), None),
                         "runner": RUNNER_VERSION, "run": vers},
            "model": report.get("model"),
            "recipe": report.get("recipe"),
            "recipe_spec": report.get("recipe_spec"),
            "run_device": report.get("device"),
            "run_created": report.get("created"),
            "task": report.get("task"),
            "artifact": {**_variant_block(chosen), "why": why},
            "fallback": _variant_block(fallback),
            "engine": engine,
            "sample": sample,
            "entry": {"install": "install.sh", "run": "run.sh", "runner": "runner.py"},
            "notes": notes,
        }
        manifest["files"] = {p.relative_to(stage).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
                             for p in sorted(stage.rglob("*")) if p.is_file()}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        tmp_tar = Path(tmpdir) / "bundle.tar.gz"
        _write_tar(stage, tmp_tar)
        os.replace(tmp_tar, out_tar)
    return out_tar


def fetch_wheels_into(reqs: List[str], arch: str, python_version: str, dest: Path,
                      cache: Optional[str | Path] = None) -> List[str]:
    """The requirements' wheels plus pip's own (so the device venv needs no ensurepip) in ``dest``."""
    names = fetch_wheels([*reqs, f"pip=={versions.PIP_VERSION}"], arch, python_version, dest,
                         Path(cache) if cache is not None else None)
    return names
