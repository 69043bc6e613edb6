"""Deploy a bundle to a device over SSH, atomically from the user's point of view.

On the device (``ROOT`` defaults to ``~/edgekit``): ``releases/<id>/`` (id: sha256 of the bundle's manifest.json,
16 hex digits), ``current`` and ``previous`` symlinks, and the deploy agent's bookkeeping; the agent is
``edgekit/device/agent.py`` (with ``releases.py`` and ``bundlecheck.py``, standard library only), sent as one
``python3 -c`` program whose arguments are quoted one by one (``run_ssh``), never built from user input.

Why detached: an ssh session can die at any moment (Ctrl-C, a dropped link, a closed laptop), and a process tied
to it must neither go on silently nor stop half-way. So:

1. ``status``: is this release installed and verified, where does ``current`` point, is a job running;
2. ``upload`` (one ssh call, the bundle on stdin): the device checks its sha256, then starts the install as a
   detached job (new session, output to a log) that writes a status file, and returns. The job verifies every
   hash, installs (``install.sh``), builds the engine (Jetson), smoke-tests against the host's outputs and
   benchmarks, each stage under its own time limit, writes the install marker, and switches ``current`` last;
3. the host follows the job with ``wait`` calls over fresh connections (reconnecting when one drops, for
   ``LOST_S`` at most), and reports the job's final record: what the device did, not what the host expected.

The choice on interrupt: Ctrl-C or SIGTERM on the host *cancels* the job (a fresh connection sends ``cancel``,
which stops it before it switches and removes its half-installed release), then reports what the device says:
stopped (``current`` unchanged), or already finished (it had switched, or failed) — a cancel that arrives once the
switch has begun is ignored, and the message says so. If the device cannot be reached, the message says that the
job may still be running and that the same ``edgekit deploy`` again reports how it ended (it follows a job that
is still running for the same release). ``current`` only ever points at a release with an install marker whose
files match its manifest; the one it points at and the previous one are never removed; dead jobs' leftovers are
cleaned by the next deploy, and ``releases/`` keeps the newest ``keep`` (3) releases besides those two.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shlex
import tempfile
import time
from pathlib import Path
from typing import Optional

from .. import progress
from ..config import DeviceProfile, SSHSpec, load_device
from ..errors import EdgekitError
from . import bundle as _bundle
from . import versions

DEFAULT_ROOT = "~/edgekit"
AGENT_FILES = ("bundlecheck", "releases", "agent")  # edgekit/device/*.py, in import order
STAGE_LIMITS = {"upload": 1800, "verify": 600, "install": 900, "engine": 1800, "smoke": 300, "bench": 600}
WAIT_S = 20  # one ``wait`` call returns after this long if the job is still running
LOST_S = 120  # how long the host keeps reconnecting before it gives up following the job
TEST_PAUSE_ENV = "EDGEKIT_DEPLOY_TEST_PAUSE"  # tests only: "stage=seconds,..." holds a device stage open

_BOOT = """import sys, types
SOURCES = %s
for name in %r:
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    exec(compile(SOURCES[name], name + ".py", "exec"), mod.__dict__)
mod.SOURCES = SOURCES
sys.exit(mod.main(sys.argv[1:]))
"""


class DeployInterrupted(EdgekitError):
    """The host was interrupted; the message says what the device did."""

    exit_code = 130


class _Lost(EdgekitError):
    """The ssh call failed: the device's state is unknown until it is asked again."""


def agent_program() -> str:
    """The device-side agent as one ``python3 -c`` program: its three files, imported as modules."""
    from ..device import DEVICE_DIR

    sources = {name: (DEVICE_DIR / f"{name}.py").read_text() for name in AGENT_FILES}
    return _BOOT % (repr(sources), AGENT_FILES)


# ----------------------------------------------------------------------------- the host side


def _spec_for(dev: DeviceProfile, host: Optional[str], ssh: Optional[SSHSpec]) -> SSHSpec:
    from ..measure.ssh import spec_for_target

    base = ssh if ssh is not None else dev.ssh
    if host:
        return spec_for_target(host, base)
    if base is None:
        raise EdgekitError(f"No host to deploy to: pass --host user@address, or set ssh.host in the {dev.name} "
                           f"device profile")
    return base


def _agent(spec: SSHSpec, args, stdin_path: Optional[Path] = None, what: str = "deploy",
           timeout: Optional[float] = None) -> dict:
    """Run one agent command; its JSON answer, EdgekitError for what the device refused, _Lost when ssh failed."""
    from ..measure.ssh import destination, last_json_line, run_ssh

    python = shlex.split(spec.python)
    try:
        proc = run_ssh(spec, [*python, "-c", agent_program(), *map(str, args)], stdin_path=stdin_path,
                       timeout=timeout or spec.command_timeout, what=what)
    except EdgekitError as exc:
        raise _Lost(str(exc)) from None
    payload = last_json_line(proc.stdout)
    dest = destination(spec)
    if proc.returncode == 127 or (payload is None and "not found" in proc.stderr):
        raise EdgekitError(f"The device python {spec.python!r} was not found on {dest}: set ssh.python in the "
                           f"device profile")
    if isinstance(payload, dict) and "error" in payload:
        raise EdgekitError(f"Deploy to {dest} failed at {payload.get('stage', '?')}: {payload['error']}")
    if proc.returncode < 0:
        raise _Lost(f"the ssh client was stopped (signal {-proc.returncode})")
    if proc.returncode != 0 or not isinstance(payload, dict):
        tail = (proc.stderr.strip() or proc.stdout.strip())[-500:] or "no output"
        raise EdgekitError(f"Deploy to {dest} failed (exit {proc.returncode}): {tail}")
    return payload


_PREFLIGHT = ("import json, platform, sys; print(json.dumps({'machine': platform.machine(), "
              "'python': '%d.%d' % sys.version_info[:2], 'system': platform.system()}))")
_MACHINES = {"arm64": "aarch64", "aarch64": "aarch64", "x86_64": "x86_64", "amd64": "x86_64", "armv7l": "armv7l"}


def preflight(spec: SSHSpec, dev: DeviceProfile) -> dict:
    """One cheap SSH call: the host answers, its python runs, and its CPU is the device profile's arch."""
    from ..measure.ssh import destination, run_ssh

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


def _limits(limits: Optional[dict]) -> dict:
    out = dict(STAGE_LIMITS)
    for k, v in (limits or {}).items():
        if k not in STAGE_LIMITS:
            raise EdgekitError(f"Unknown deploy stage {k!r} in limits (stages: {', '.join(STAGE_LIMITS)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 86400:
            raise EdgekitError(f"The time limit of the {k} stage must be 1 s to 86400 s, not {v!r}")
        out[k] = float(v)
    return out


def _test_pause() -> dict:
    """``EDGEKIT_DEPLOY_TEST_PAUSE=install=3,switch=5``: tests hold a device stage open to interrupt it there."""
    raw = os.environ.get(TEST_PAUSE_ENV, "")
    out = {}
    for item in filter(None, raw.split(",")):
        stage, _, secs = item.partition("=")
        try:
            out[stage] = float(secs)
        except ValueError:
            raise EdgekitError(f"{TEST_PAUSE_ENV}: {item!r} is not stage=seconds") from None
        if stage not in (*STAGE_LIMITS, "switch") or not 0 <= out[stage] <= 120:
            raise EdgekitError(f"{TEST_PAUSE_ENV}: {item!r} is not stage=seconds (0-120)")
    return out


def _where(root: str, current: Optional[str]) -> str:
    return f"{root}/current points at " + (f"releases/{current}" if current else "nothing")


def _follow(spec: SSHSpec, root: str, job: str, budget: float, seen: dict) -> dict:
    """Poll the job over fresh connections until it ends; reconnect for LOST_S when calls fail."""
    from ..measure.ssh import destination

    start = last_ok = time.monotonic()
    misses = unknown = 0
    while True:
        try:
            view = _agent(spec, ["wait", root, job, WAIT_S], timeout=WAIT_S + spec.connect_timeout + 30, what="status")
            last_ok, misses = time.monotonic(), 0
        except _Lost as exc:
            misses += 1
            if time.monotonic() - last_ok > LOST_S:
                raise EdgekitError(
                    f"Lost contact with {destination(spec)} for {LOST_S} s ({exc}) while the deploy job {job} was at "
                    f"stage {seen.get('stage', 'upload')}. The device goes on by itself and switches current only "
                    f"after every check passes; run the same `edgekit deploy` again to see how it ended.") from None
            time.sleep(min(2 ** misses, 10))
            continue
        if view.get("state") != "unknown":
            if view.get("stage") != seen.get("stage"):
                progress.log(f"device: {view.get('stage')}")
            seen.update(view)
        if view.get("state") in ("done", "failed", "cancelled"):
            return view
        if view.get("state") == "unknown":
            unknown += 1
            if unknown >= 3:
                return view
            time.sleep(1)
        elif time.monotonic() - start > budget:
            raise EdgekitError(f"The deploy job {job} on {destination(spec)} has run for {budget:.0f} s, past the sum "
                               f"of its stage limits (stage {view.get('stage')}); the next deploy stops it.")


def _interrupted(spec: SSHSpec, root: str, rid: str, job: Optional[str], seen: dict) -> str:
    """Ctrl-C / SIGTERM: stop the device's job before it switches, and say what the device did."""
    from ..measure.ssh import destination

    dest = destination(spec)
    cur = seen.get("current")
    if job is None:
        try:
            cur = _agent(spec, ["status", root, rid], timeout=30, what="status check").get("current")
        except (EdgekitError, KeyboardInterrupt) as exc:
            return (f"Interrupted before a deploy job was started on {dest}; nothing was installed there (where "
                    f"current points could not be read: {exc or 'interrupted again'})")
        return f"Interrupted before a deploy job was started on {dest}; {_where(root, cur)}"
    try:
        view = _agent(spec, ["cancel", root, job], timeout=60 + spec.connect_timeout, what="cancel")
    except (EdgekitError, KeyboardInterrupt) as exc:
        why = str(exc) or "interrupted again"
        return (f"Interrupted; could not reach {dest} to stop the deploy ({why}). The device may still be installing "
                f"release {rid} (job {job}, last seen at stage {seen.get('stage', 'upload')}); it switches current "
                f"only after every check passes" + (f" ({_where(root, cur)} when last seen)" if cur else "")
                + ". Run the same `edgekit deploy` again to see how it ended.")
    state, stage, cur = view.get("state"), view.get("stage"), view.get("current")
    if state == "done":
        return (f"Interrupted, but the device had already finished: release {rid} is installed on {dest}; "
                f"{_where(root, cur)}" + (f" (previous: releases/{view['previous']})" if view.get("previous") else ""))
    if state == "cancelled":
        return f"Interrupted: the deploy of release {rid} was stopped on {dest} during {stage}; {_where(root, cur)}"
    if state == "failed":
        return f"Interrupted; the deploy to {dest} had already failed at {stage}: {view.get('message')}"
    if state == "unknown":
        return f"Interrupted before the upload reached {dest}: nothing was installed; {_where(root, cur)}"
    return (f"Interrupted; {dest} did not confirm the stop: job {job} is at stage {stage} (release {rid}); it switches "
            f"current only after every check passes. Run the same `edgekit deploy` again to see how it ended.")


def deploy(source: str | Path, device: str | DeviceProfile, host: Optional[str] = None,
           ssh: Optional[SSHSpec] = None, root: str = DEFAULT_ROOT, python_version: str = versions.PYTHON_VERSION,
           bench_runs: int = 20, fetch_wheels: bool = True, wheel_cache: Optional[str | Path] = None,
           keep: int = 3, limits: Optional[dict] = None) -> dict:
    """Deploy a run folder (a bundle is built for ``device``) or a bundle .tar.gz to ``host`` over SSH.

    ``host`` is ``user@address[:port]``; key, known_hosts and python come from ``ssh`` or the device
    profile's ``ssh`` block. ``keep``: installed releases kept besides ``current`` and ``previous``;
    ``limits``: seconds per device stage (upload, verify, install, engine, smoke, bench). Returns the device's
    record plus ``action``: ``installed``, ``activated`` (installed before; ``current`` now points at it) or
    ``unchanged``. Interrupted (Ctrl-C, SIGTERM): DeployInterrupted (exit 130) saying what the device did.
    """
    from ..measure.ssh import destination, sigterm_as_interrupt

    dev = device if isinstance(device, DeviceProfile) else load_device(str(device))
    spec = _spec_for(dev, host, ssh)
    if isinstance(bench_runs, bool) or not isinstance(bench_runs, int) or bench_runs < 1:
        raise EdgekitError("bench_runs must be an integer >= 1")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= 1000:
        raise EdgekitError(f"keep must be an integer from 1 to 1000, not {keep!r}")
    if not root or root.startswith("-"):
        raise EdgekitError(f"Invalid remote root {root!r}")
    stage_limits, pause = _limits(limits), _test_pause()
    src = Path(source)
    if not src.exists():
        raise EdgekitError(f"Nothing to deploy at {src}: give a run folder or a bundle .tar.gz")
    t0 = time.perf_counter()
    device_info = preflight(spec, dev)  # reachable, python runs, right architecture: before building anything
    dest = destination(spec)
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
        base = {"release": rid, "host": dest, "device": dev.name, "bundle_device": manifest.get("device"),
                "artifact": manifest.get("artifact", {}).get("path"), "device_info": device_info}
        job, seen, attached, upload_error = None, {}, False, None
        with sigterm_as_interrupt():
            try:
                status = _agent(spec, ["status", root, rid], what="status check")
                seen["current"] = status.get("current")
                if status.get("installed") and status.get("manifest_match") and status.get("current") == rid:
                    return {**base, **status, "action": "unchanged",
                            "message": f"release {rid} is already installed on {dest} with a matching manifest and "
                                       f"is current: nothing to do"}
                if status.get("installed") and status.get("manifest_match"):
                    result = _agent(spec, ["activate", root, rid], what="activate")
                    return {**base, **result, "message": f"release {rid} was already installed on {dest}; current "
                                                         f"now points at it (was {result.get('previous')})"}
                running = status.get("job") or {}
                attached = running.get("release") == rid and running.get("state") == "running"
                if attached:  # an earlier deploy of this release, still running: follow it
                    job = running["job"]
                else:
                    job = secrets.token_hex(8)
                    options = {"job": job, "release": rid, "sha256": _bundle.sha256_file(tar), "python": spec.python,
                               "runs": bench_runs, "keep": keep, "limits": stage_limits, "test_pause": pause}
                    try:
                        _agent(spec, ["upload", root, json.dumps(options)], stdin_path=tar, what="upload")
                    except _Lost as exc:  # the bundle may have arrived whole, or not at all: ask the device
                        upload_error = exc
                view = _follow(spec, root, job, sum(stage_limits.values()) + 120, seen)
            except KeyboardInterrupt:
                raise DeployInterrupted(_interrupted(spec, root, rid, job, seen)) from None
    state, stage = view.get("state"), view.get("stage")
    if state == "unknown":
        why = f"the upload failed ({upload_error})" if upload_error else "the device has no record of it"
        raise EdgekitError(f"Deploy to {dest} did not start: {why}; nothing was installed, "
                           f"{_where(root, view.get('current'))}")
    if state == "failed":
        raise EdgekitError(f"Deploy to {dest} failed at {stage}: {view.get('message')}")
    if state == "cancelled":
        raise EdgekitError(f"Deploy to {dest} was cancelled on the device: {view.get('message')}")
    result = {**(view.get("result") or {}), **base, "job": job, "current": view.get("current"),
              "wall_s": round(time.perf_counter() - t0, 2)}
    result["message"] = (f"installed release {rid} on {dest} at {result.get('path')}; current -> releases/{rid}"
                         + (f" (was {result['previous']})" if result.get("previous") else "")
                         + (f"; followed the deploy job {job} that was already running there" if attached else ""))
    return result
