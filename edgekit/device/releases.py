"""A deploy root on the device: releases, the ``current``/``previous`` links, the lock, job records, recovery.

Standard library only, never imports edgekit: it is sent to the device with agent.py and bundlecheck.py (see
agent.py for the layout). Every function that changes something runs with ROOT/.lock held.
"""

import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
import time

from bundlecheck import BundleError, manifest_id, verify_tree

MARKER = ".edgekit-release.json"
LIMITS = {"upload": 1800, "verify": 600, "install": 900, "engine": 1800, "smoke": 300, "bench": 600}
HEX16 = re.compile(r"^[0-9a-f]{16}$")
KEEP_RECORDS = 20
GRACE = 60  # seconds past a stage's limit before the next deploy treats the job as stuck and kills it


class Busy(Exception):
    """Another deploy holds the lock and is within its limits."""


def write_json(path, obj):
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def link_target(root, name="current"):
    path = os.path.join(root, name)
    return os.path.basename(os.readlink(path).rstrip("/")) if os.path.islink(path) else None


def release_state(root, rid):
    """(installed, manifest matches, why not): installed = the marker exists; the hashes are checked again."""
    rel = os.path.join(root, "releases", rid)
    if not os.path.isdir(rel) or os.path.islink(rel):
        return False, False, "absent"
    if not os.path.isfile(os.path.join(rel, MARKER)):
        return False, False, "incomplete (no install marker)"
    try:
        with open(os.path.join(rel, "manifest.json"), "rb") as f:
            if manifest_id(f.read()) != rid:
                return True, False, "manifest differs"
        verify_tree(rel, strict=False)
    except (OSError, BundleError) as exc:
        return True, False, str(exc)
    return True, True, "ok"


def set_link(root, name, rid):
    """Point ROOT/NAME at releases/RID atomically: a new symlink renamed over the old one."""
    tmp = os.path.join(root, ".{}.tmp-{}".format(name, os.getpid()))
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.join("releases", rid), tmp)
    os.replace(tmp, os.path.join(root, name))


def switch(root, rid):
    old = link_target(root)
    if old and old != rid and os.path.isdir(os.path.join(root, "releases", old)):
        set_link(root, "previous", old)
    set_link(root, "current", rid)
    return old


def where(root):
    cur = link_target(root)
    return "{} still points at {}".format(os.path.join(root, "current"), "releases/" + cur if cur else "nothing")


# ----------------------------------------------------------------------------- the lock, records, recovery


def try_lock(root):
    """An fd holding ROOT/.lock, or None while a job (or any process it started) holds it."""
    fd = os.open(os.path.join(root, ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


def job_dirs(root):
    return sorted(n[len(".incoming-"):] for n in os.listdir(root) if n.startswith(".incoming-"))


def active_job(root):
    jobs = [s for s in (read_json(os.path.join(root, ".incoming-" + j, "status.json")) for j in job_dirs(root)) if s]
    return max(jobs, key=lambda s: s.get("started", 0)) if jobs else None


def record_path(root, job, ext=".json"):
    return os.path.join(root, ".deploys", job + ext)


def finish(root, status, state, stage, message, result=None):
    """Write the job's final record (what the host reports), keep its log, drop the job folder."""
    rec = dict(status)
    rec.update({"state": state, "stage": stage, "message": message, "result": result, "ended": time.time(),
                "current": link_target(root), "previous": link_target(root, "previous")})
    jdir = os.path.join(root, ".incoming-" + status["job"])
    try:
        os.makedirs(os.path.join(root, ".deploys"), exist_ok=True)
        write_json(record_path(root, status["job"]), rec)
        if os.path.isfile(os.path.join(jdir, "job.log")):
            os.replace(os.path.join(jdir, "job.log"), record_path(root, status["job"], ".log"))
    finally:
        shutil.rmtree(jdir, ignore_errors=True)
    return rec


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except (OSError, TypeError):
        return False


def kill_job(status, sig):
    """Signal a job's process and its current stage's process group (only a pid that is still this job's)."""
    pid = status.get("pid")
    try:
        with open("/proc/{}/cmdline".format(pid), "rb") as f:
            ours = status["job"].encode() in f.read()
    except (OSError, TypeError):
        ours = alive(pid)
    for target, group in ((pid, False), (status.get("stage_pgid"), True)):
        if target and (ours or group):
            try:
                (os.killpg if group else os.kill)(target, sig)
            except OSError:
                pass


def recover(root, keep=3):
    """With the lock held (so no job is alive): give every dead job a final record, remove its half-installed
    release (never the one ``current`` points to), .partial-* and temporary links, then prune releases/."""
    for job in job_dirs(root):
        jdir = os.path.join(root, ".incoming-" + job)
        st = read_json(os.path.join(jdir, "status.json")) or {"job": job, "stage": "upload", "release": None}
        rid = st.get("release")
        if rid and link_target(root) == rid and release_state(root, rid)[1]:
            marker = read_json(os.path.join(root, "releases", rid, MARKER)) or {}
            finish(root, st, "done", "switch", "release {} is installed and current".format(rid),
                   dict(marker, action="installed", path=os.path.join(root, "releases", rid), root=root))
            continue
        if rid and st.get("created_release") and link_target(root) != rid and not release_state(root, rid)[0]:
            shutil.rmtree(os.path.join(root, "releases", rid), ignore_errors=True)
        if os.path.exists(record_path(root, job, ".cancel")):
            finish(root, st, "cancelled", st.get("stage"), "cancelled during {} ({})".format(st.get("stage"),
                                                                                          where(root)))
        else:
            finish(root, st, "failed", st.get("stage"), "the deploy job stopped during {} without finishing (it was "
                                                        "killed, outlived its time limit, or the device restarted) "
                                                        "({})".format(st.get("stage"), where(root)))
    releases = os.path.join(root, "releases")
    for name in os.listdir(releases) if os.path.isdir(releases) else ():
        if ".partial-" in name:
            shutil.rmtree(os.path.join(releases, name), ignore_errors=True)
    for name in os.listdir(root):
        if re.match(r"^\.(current|previous)\.tmp-\d+$", name):
            os.remove(os.path.join(root, name))
    prune(root, keep)


def prune(root, keep):
    """Keep the newest ``keep`` installed releases and always ``current`` and ``previous``; drop incomplete ones."""
    releases = os.path.join(root, "releases")
    names = [n for n in os.listdir(releases) if HEX16.match(n)] if os.path.isdir(releases) else []
    done = sorted((n for n in names if os.path.isfile(os.path.join(releases, n, MARKER))),
                  key=lambda n: os.path.getmtime(os.path.join(releases, n, MARKER)), reverse=True)
    kept = set(done[:max(keep, 1)]) | {link_target(root), link_target(root, "previous")}
    for n in names:
        if n not in kept:
            shutil.rmtree(os.path.join(releases, n), ignore_errors=True)
    recs = os.path.join(root, ".deploys")
    newest = {}
    for r in os.listdir(recs) if os.path.isdir(recs) else ():
        j = r.split(".")[0]
        newest[j] = max(newest.get(j, 0), os.path.getmtime(os.path.join(recs, r)))
    old = set(sorted(newest, key=newest.get)[:-KEEP_RECORDS]) if len(newest) > KEEP_RECORDS else set()
    for r in os.listdir(recs) if old else ():
        if r.split(".")[0] in old:
            os.remove(os.path.join(recs, r))


def take_lock(root):
    """The lock for a new deploy; a job that outlived its stage limit (or whose process died while a stage it
    started holds the lock) is killed first. Anything else running: refuse."""
    for _ in range(30):  # status probes hold it for a moment
        fd = try_lock(root)
        if fd is not None:
            return fd
        time.sleep(0.1)
    st = active_job(root) or {}
    now = time.time()
    limit_end = (st.get("stage_started") or now) + (st.get("stage_limit") or LIMITS["upload"]) + GRACE
    if st and (now > limit_end or not alive(st.get("pid"))):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            kill_job(st, sig)
            for _ in range(50):
                fd = try_lock(root)
                if fd is not None:
                    return fd
                time.sleep(0.1)
    raise Busy("another deploy is running on this device" + (": release {} (job {}), at stage {} for {:.0f} s".format(
        st.get("release"), st.get("job"), st.get("stage"), now - (st.get("stage_started") or now)) if st else ""))
