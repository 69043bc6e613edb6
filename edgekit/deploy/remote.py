"""Deploy a bundle to a device over SSH: upload, verify, install a release, switch ``current``, smoke-test.

On the device (``ROOT`` defaults to ``~/edgekit``)::

    ROOT/releases/<bundle id>/     one folder per bundle (id: sha256 of its manifest.json, 16 hex digits)
    ROOT/current -> releases/<id>  switched atomically (a new symlink renamed over the old one: ln -s + mv -T)

Every step on the device is done by a small standard-library Python program (the *agent*) run with the
device's python as ``python3 -c AGENT COMMAND ARGS...``; the ssh command line quotes each argument
(``edgekit.profiling.ssh.run_ssh``), nothing is built from user input by string formatting. The agent:

1. ``status``: is this release installed, does its manifest match, where does ``current`` point;
2. ``install`` (bundle on stdin): checks the upload's sha256, extracts into a temporary folder with the
   same checks as :func:`edgekit.deploy.bundle.extract_bundle` (their source is sent along), verifies
   every manifest hash, renames it to ``releases/<id>``, runs ``install.sh`` (venv + offline wheels), runs
   ``runner.py predict`` on the bundle's samples and compares with the host's outputs, runs
   ``runner.py bench``, records the results, and only then switches ``current``. Any failure removes the
   new release folder and leaves ``current`` where it was;
3. ``activate``: point ``current`` at an already installed release.

A second deploy of the same bundle finds the release installed with a matching manifest and ``current``
pointing at it, and does nothing (it says so).
"""

from __future__ import annotations

import inspect
import json
import shlex
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..config import DeviceProfile, SSHSpec, load_device
from ..errors import EdgekitError
from . import bundle as _bundle
from . import versions

DEFAULT_ROOT = "~/edgekit"

AGENT_HEADER = '''import ast, fcntl, hashlib, json, os, shutil, struct, subprocess, sys, tarfile, tempfile, time
'''

AGENT_MAIN = r'''

def fail(stage, message, code=1):
    print(json.dumps({"error": message, "stage": stage}))
    sys.exit(code)


def load_npy(path):
    """float arrays from a .npy file, with the standard library: (shape, flat list)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file")
    major = data[6]
    if major == 1:
        hlen, start = struct.unpack("<H", data[8:10])[0], 10
    else:
        hlen, start = struct.unpack("<I", data[8:12])[0], 12
    header = ast.literal_eval(data[start:start + hlen].decode("latin1"))
    codes = {"<f4": "f", "<f8": "d", "<f2": "e"}
    if header["descr"] not in codes or header["fortran_order"]:
        raise ValueError("unsupported .npy layout {}".format(header))
    n = 1
    for d in header["shape"]:
        n *= d
    code = codes[header["descr"]]
    body = data[start + hlen:start + hlen + n * struct.calcsize(code)]
    return list(header["shape"]), list(struct.unpack("<{}{}".format(n, code), body))


def paths(root, rid):
    root = os.path.abspath(os.path.expanduser(root))
    return root, os.path.join(root, "releases"), os.path.join(root, "releases", rid), os.path.join(root, "current")


def current_of(link):
    if not os.path.islink(link):
        return None
    return os.path.basename(os.readlink(link).rstrip("/"))


def release_state(rel, rid):
    """(installed, manifest matches, why not)."""
    marker = os.path.join(rel, ".edgekit-release.json")
    if not os.path.isdir(rel):
        return False, False, "absent"
    if not os.path.isfile(marker):
        return False, False, "incomplete (no install marker)"
    mpath = os.path.join(rel, "manifest.json")
    try:
        with open(mpath, "rb") as f:
            data = f.read()
    except OSError:
        return True, False, "manifest.json missing"
    if manifest_id(data) != rid:
        return True, False, "manifest differs"
    try:
        verify_tree(rel, strict=False)
    except BundleError as exc:
        return True, False, str(exc)
    return True, True, "ok"


def lock(root):
    os.makedirs(root, exist_ok=True)
    fd = os.open(os.path.join(root, ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fail("lock", "another deploy is running in {} (lock file .lock)".format(root))
    return fd


def switch(root, rid):
    """Point ROOT/current at releases/RID atomically (new symlink renamed over the old one)."""
    link = os.path.join(root, "current")
    tmp = os.path.join(root, ".current.tmp-{}".format(os.getpid()))
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.join("releases", rid), tmp)
    os.replace(tmp, link)


def run(argv, stage, env=None, timeout=None):
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=timeout)
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        payload = last_json(out)
        msg = payload.get("error") if isinstance(payload, dict) and payload.get("error") else \
            (err.strip() or out.strip())[-600:] or "no output"
        raise StageError(stage, "{} exited with {}: {}".format(os.path.basename(argv[1] if len(argv) > 1 else argv[0]),
                                                               proc.returncode, msg))
    return out, err


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


class StageError(Exception):
    def __init__(self, stage, message):
        Exception.__init__(self, message)
        self.stage = stage


def smoke_and_bench(rel, manifest, runs):
    py = os.path.join(rel, "venv", "bin", "python")
    runner = os.path.join(rel, "runner.py")
    model = os.path.join(rel, manifest["artifact"]["path"])
    notes = []
    if manifest.get("engine"):
        try:
            out, _ = run([py, os.path.join(rel, "build_engine.py"), "--print-path"], "engine")
            model = out.strip().splitlines()[-1]
        except StageError as exc:
            fb = manifest.get("fallback") or manifest["artifact"]
            model = os.path.join(rel, fb["path"])
            notes.append("no TensorRT engine ({}); smoke-tested the ONNX fallback".format(exc))
    sample = manifest.get("sample") or {}
    checks = []
    engine_used = model.endswith(".engine")
    with tempfile.TemporaryDirectory(prefix="edgekit-smoke-") as tmp:
        for i, rel_in in enumerate(sample.get("inputs") or []):
            out_path = os.path.join(tmp, "out{}.npy".format(i))
            run([py, runner, "predict", model, os.path.join(rel, rel_in), out_path], "smoke")
            _, got = load_npy(out_path)
            check = {"input": rel_in, "argmax": max(range(len(got)), key=got.__getitem__)}
            expected = (sample.get("expected") or [None] * (i + 1))[i]
            if expected is not None and not engine_used and model.endswith(sample.get("model", "")):
                diff = max(abs(a - b) for a, b in zip(got, expected)) if len(got) == len(expected) else None
                check.update({"expected_argmax": sample["expected_argmax"][i], "max_abs_diff": diff})
                if diff is None or check["argmax"] != check["expected_argmax"] or diff > sample.get("atol", 0.5):
                    raise StageError("smoke", "the device's output for {} differs from the host's: argmax {} vs {}, "
                                              "max |diff| {}".format(rel_in, check["argmax"], check["expected_argmax"],
                                                                     diff))
            checks.append(check)
    bench_out, _ = run([py, runner, "bench", model, "--runs", str(runs), "--warmup", str(min(10, runs))], "bench")
    return {"model": os.path.relpath(model, rel), "checks": checks, "matches_host": all(
        "expected_argmax" in c for c in checks) and bool(checks), "notes": notes}, last_json(bench_out)


def cmd_status(root, rid):
    root, releases, rel, link = paths(root, rid)
    installed, match, why = release_state(rel, rid)
    print(json.dumps({"release": rid, "root": root, "installed": installed, "manifest_match": match, "state": why,
                      "current": current_of(link), "path": rel}))


def cmd_activate(root, rid):
    root, releases, rel, link = paths(root, rid)
    fd = lock(root)
    installed, match, why = release_state(rel, rid)
    if not (installed and match):
        fail("activate", "release {} is not installed intact ({})".format(rid, why))
    previous = current_of(link)
    switch(root, rid)
    print(json.dumps({"action": "activated", "release": rid, "previous": previous, "current": current_of(link),
                      "path": rel, "root": root}))
    os.close(fd)


def cmd_install(root, rid, tar_sha, python, runs):
    root, releases, rel, link = paths(root, rid)
    fd = lock(root)
    os.makedirs(releases, exist_ok=True)
    incoming = tempfile.mkdtemp(prefix=".incoming-", dir=root)
    partial = None
    moved = False
    try:
        tar_path = os.path.join(incoming, "bundle.tar.gz")
        h = hashlib.sha256()
        stdin = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin
        with open(tar_path, "wb") as f:
            for block in iter(lambda: stdin.read(1 << 20), b""):
                h.update(block)
                f.write(block)
        if h.hexdigest() != tar_sha:
            raise StageError("upload", "the bundle arrived with sha256 {}..., expected {}...: the upload was "
                                       "corrupted or cut".format(h.hexdigest()[:12], tar_sha[:12]))
        partial = tempfile.mkdtemp(prefix=".{}.partial-".format(rid), dir=releases)
        try:
            extract_members(tar_path, partial)
            manifest = verify_tree(partial)
        except BundleError as exc:
            raise StageError("verify", str(exc))
        with open(os.path.join(partial, "manifest.json"), "rb") as f:
            if manifest_id(f.read()) != rid:
                raise StageError("verify", "the bundle's manifest does not have the id {}".format(rid))
        os.chmod(partial, 0o755)
        if os.path.lexists(rel):  # an incomplete earlier attempt (no marker): replace it
            if current_of(link) == rid:
                raise StageError("install", "releases/{} is current but incomplete; not touching it".format(rid))
            shutil.rmtree(rel)
        os.rename(partial, rel)
        partial, moved = None, True
        env = dict(os.environ)
        env["PYTHON"] = python
        env.pop("EDGEKIT_LAUNCHER", None)
        out, err = run(["sh", os.path.join(rel, "install.sh")], "install", env=env)
        smoke, bench = smoke_and_bench(rel, manifest, runs)
        previous = current_of(link)
        record = {"release": rid, "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": python,
                  "install_log": (out + err)[-2000:], "smoke": smoke, "bench": bench, "previous": previous}
        with open(os.path.join(rel, ".edgekit-release.json.tmp"), "w") as f:
            json.dump(record, f, indent=1)
        os.replace(os.path.join(rel, ".edgekit-release.json.tmp"), os.path.join(rel, ".edgekit-release.json"))
        switch(root, rid)
        record.update({"action": "installed", "current": current_of(link), "path": rel, "root": root})
        print(json.dumps(record))
    except StageError as exc:
        if moved:
            shutil.rmtree(rel, ignore_errors=True)
        fail(exc.stage, "{} ({} still points at {})".format(exc, os.path.join(root, "current"),
                                                             current_of(link) or "nothing"))
    except Exception as exc:  # noqa: BLE001 - whatever happened, leave no half-installed release behind
        if moved:
            shutil.rmtree(rel, ignore_errors=True)
        fail("internal", "{}: {} ({} still points at {})".format(type(exc).__name__, exc,
                                                                 os.path.join(root, "current"),
                                                                 current_of(link) or "nothing"))
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
        if partial:
            shutil.rmtree(partial, ignore_errors=True)
        os.close(fd)


def main(argv):
    cmd = argv[0] if argv else ""
    if cmd == "status" and len(argv) == 3:
        cmd_status(argv[1], argv[2])
    elif cmd == "activate" and len(argv) == 3:
        cmd_activate(argv[1], argv[2])
    elif cmd == "install" and len(argv) == 6:
        cmd_install(argv[1], argv[2], argv[3], argv[4], int(argv[5]))
    else:
        fail("usage", "usage: agent status ROOT ID | activate ROOT ID | install ROOT ID TAR_SHA PYTHON RUNS", 2)


main(sys.argv[1:])
'''


def agent_source() -> str:
    """The device-side program: edgekit/device/bundlecheck.py (the same checks the host runs) + the commands above."""
    from ..device import DEVICE_DIR

    return "\n\n".join([AGENT_HEADER, (DEVICE_DIR / "bundlecheck.py").read_text(), AGENT_MAIN])


# ----------------------------------------------------------------------------- the host side


def _spec_for(dev: DeviceProfile, host: Optional[str], ssh: Optional[SSHSpec]) -> SSHSpec:
    from ..profiling.ssh import spec_for_target

    base = ssh if ssh is not None else dev.ssh
    if host:
        return spec_for_target(host, base)
    if base is None:
        raise EdgekitError(f"No host to deploy to: pass --host user@address, or set ssh.host in the {dev.name} "
                           f"device profile")
    return base


def _agent(spec: SSHSpec, args, stdin_path: Optional[Path] = None, what: str = "deploy") -> dict:
    from ..profiling.ssh import destination, run_ssh

    python = shlex.split(spec.python)
    proc = run_ssh(spec, [*python, "-c", agent_source(), *map(str, args)], stdin_path=stdin_path,
                   timeout=spec.command_timeout, what=what)
    payload = None
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            payload = json.loads(line)
            break
        except ValueError:
            continue
    dest = destination(spec)
    if proc.returncode == 127 or (payload is None and "not found" in proc.stderr):
        raise EdgekitError(f"The device python {spec.python!r} was not found on {dest}: set ssh.python in the "
                           f"device profile")
    if isinstance(payload, dict) and "error" in payload:
        raise EdgekitError(f"Deploy to {dest} failed at {payload.get('stage', '?')}: {payload['error']}")
    if proc.returncode != 0 or not isinstance(payload, dict):
        tail = (proc.stderr.strip() or proc.stdout.strip())[-500:] or "no output"
        raise EdgekitError(f"Deploy to {dest} failed (exit {proc.returncode}): {tail}")
    return payload


_PREFLIGHT = ("import json, platform, sys; print(json.dumps({'machine': platform.machine(), "
              "'python': '%d.%d' % sys.version_info[:2], 'system': platform.system()}))")
_MACHINES = {"arm64": "aarch64", "aarch64": "aarch64", "x86_64": "x86_64", "amd64": "x86_64", "armv7l": "armv7l"}


def preflight(spec: SSHSpec, dev: DeviceProfile) -> dict:
    """One cheap SSH call: the host answers, its python runs, and its CPU is the device profile's arch."""
    from ..profiling.ssh import destination, run_ssh

    dest = destination(spec)
    proc = run_ssh(spec, [*shlex.split(spec.python), "-c", _PREFLIGHT], timeout=spec.command_timeout,
                   what="preflight")
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        info = None
    if proc.returncode != 0 or not isinstance(info, dict):
        tail = (proc.stderr.strip() or proc.stdout.strip())[-300:] or "no output"
        raise EdgekitError(f"The device python {spec.python!r} does not run on {dest} (exit {proc.returncode}: "
                           f"{tail}); set ssh.python in the device profile")
    machine = _MACHINES.get(str(info.get("machine")).lower(), info.get("machine"))
    if machine != dev.arch:
        raise EdgekitError(f"{dest} is a {info.get('machine')} machine, but the {dev.name} profile is {dev.arch}: "
                           f"wrong host or wrong --device")
    return info


def deploy(source: str | Path, device: str | DeviceProfile, host: Optional[str] = None,
           ssh: Optional[SSHSpec] = None, root: str = DEFAULT_ROOT, python_version: str = versions.PYTHON_VERSION,
           bench_runs: int = 20, fetch_wheels: bool = True, wheel_cache: Optional[str | Path] = None) -> dict:
    """Deploy a run folder (a bundle is built for ``device``) or a bundle .tar.gz to ``host`` over SSH.

    ``host`` is ``user@address[:port]``; key, known_hosts and python come from ``ssh`` or the device
    profile's ``ssh`` block. Returns the agent's JSON plus ``action``: ``installed``, ``activated`` (the
    release was installed before; ``current`` now points at it) or ``unchanged``.
    """
    from ..profiling.ssh import destination

    dev = device if isinstance(device, DeviceProfile) else load_device(str(device))
    spec = _spec_for(dev, host, ssh)
    if bench_runs < 1:
        raise EdgekitError("bench_runs must be >= 1")
    if not root or root.startswith("-"):
        raise EdgekitError(f"Invalid remote root {root!r}")
    src = Path(source)
    if not src.exists():
        raise EdgekitError(f"Nothing to deploy at {src}: give a run folder or a bundle .tar.gz")
    t0 = time.perf_counter()
    device_info = preflight(spec, dev)  # reachable, python runs, right architecture: before building anything
    with tempfile.TemporaryDirectory(prefix="edgekit-deploy-") as tmp:
        if src.is_dir():
            tar = _bundle.build_bundle(src, dev, Path(tmp) / "bundle.tar.gz", python_version=python_version,
                                       fetch_wheels=fetch_wheels, wheel_cache=wheel_cache)
        elif src.is_file():
            tar = src
        else:
            raise EdgekitError(f"Nothing to deploy at {src}: give a run folder or a bundle .tar.gz")
        manifest, rid = _bundle.verify_bundle(tar)  # every check, here, before anything is sent
        if manifest.get("arch") != dev.arch:
            raise EdgekitError(f"{tar} was built for {manifest.get('device')} ({manifest.get('arch')}), not for "
                               f"{dev.name} ({dev.arch})")
        dest = destination(spec)
        status = _agent(spec, ["status", root, rid], what="status check")
        base = {"release": rid, "host": dest, "device": dev.name, "bundle_device": manifest.get("device"),
                "artifact": manifest.get("artifact", {}).get("path"), "device_info": device_info}
        if status.get("installed") and status.get("manifest_match") and status.get("current") == rid:
            return {**base, **status, "action": "unchanged",
                    "message": f"release {rid} is already installed on {dest} with a matching manifest and is "
                               f"current: nothing to do"}
        if status.get("installed") and status.get("manifest_match"):
            result = _agent(spec, ["activate", root, rid], what="activate")
            return {**base, **result, "message": f"release {rid} was already installed on {dest}; current now "
                                                 f"points at it (was {result.get('previous')})"}
        result = _agent(spec, ["install", root, rid, _bundle.sha256_file(tar), spec.python, bench_runs],
                        stdin_path=tar, what="install")
    result.update(base)
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    result["message"] = (f"installed release {rid} on {dest} at {result.get('path')}; current -> releases/{rid}"
                         + (f" (was {result['previous']})" if result.get("previous") else ""))
    return result
