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
the folder into place. The checking functions use only the standard library: ``edgekit.deployment.remote``
sends their source to the device, so the device checks with the same code.
"""

from __future__ import annotations

import gzip
import hashlib
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
from . import versions

BUNDLE_FORMAT = "edgekit-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
FIXED_MTIME = 946684800  # 2000-01-01: entries carry no build time, so bundles are reproducible
EXECUTABLES = {"runner.py", "install.sh", "run.sh", "build_engine.py"}
PRECISION_RANK = {"int8": 0, "fp16": 1, "fp32": 2}
NUM_SAMPLES = 4
FORMAT_REQUIREMENTS = {"onnx": "onnxruntime", "tflite": "ai-edge-litert"}


# The checks (standard library only) live in edgekit/device/bundlecheck.py, which the device agent runs too.
from ..device.bundlecheck import (BundleError, bad_name, check_members, extract_members,  # noqa: E402,F401
                                  manifest_id, sha256_file, verify_tree)


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
        if v.get("status", "ok") != "ok" or not p:
            continue
        safe_file_name(p, "variant file name in report.json")  # a shared run folder may be hostile
        if (run_dir / p).is_file() and not (run_dir / p).is_symlink():
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
        src = next((f for f in files if isinstance(f, str) and f.endswith(".onnx") and _FILE_RE.match(f)
                    and (run_dir / f).is_file() and not (run_dir / f).is_symlink()), None)
        if src:
            return {"name": v["name"], "onnx": src, "precision": v["precision"], "from": "the run's tensorrt variant"}
    precision = "fp16" if "fp16" in dev.precisions else "fp32"
    return {"name": f"{chosen['name']}-{precision}", "onnx": chosen["path"], "precision": precision,
            "from": f"{chosen['path']} with TensorRT's {precision} builder flag"}


# ----------------------------------------------------------------------------- wheels


# What may reach a generated file or a pip command: a plain PEP 440 release (no markers, no spaces, no shell),
# a plain file name, a CPython "3.N". Anything else in a run folder or on the command line is refused.
_VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+){0,3}((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")
_PYTHON_RE = re.compile(r"^3\.[0-9]{1,2}$")


def safe_version(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _VERSION_RE.match(value):
        raise EdgekitError(f"Refusing {what} {value!r}: not a plain version number (like 1.22.1)")
    return value


def safe_file_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _FILE_RE.match(value) or value in (".", ".."):
        raise EdgekitError(f"Refusing {what} {value!r}: not a plain file name (letters, digits, . _ + -)")
    return value


def safe_python_version(value: Any) -> str:
    if not isinstance(value, str) or not _PYTHON_RE.match(value):
        raise EdgekitError(f"python_version must look like 3.11, not {value!r}")
    return value


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
        # the device-side files are copied as they are: nothing from the run folder is pasted into a script
        for f in ("install.sh", "run.sh") + (("build_engine.py",) if engine is not None else ()):
            shutil.copyfile(DEVICE_DIR / f, stage / f)
        if engine is not None:
            notes.append("the TensorRT engine is built on the device on first start (build_engine.py); run.sh "
                         "falls back to the ONNX with ONNX Runtime when TensorRT is absent")
        (stage / "requirements.txt").write_text("".join(r + "\n" for r in reqs))

        vers = report.get("versions") or {}
        RUNNER_VERSION = _runner_version()

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
