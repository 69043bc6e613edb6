"""The deploy agent: runs on the device with the device's python, standard library only, never imports edgekit.

The host sends this file, releases.py and bundlecheck.py as one ``python3 -c`` program
(edgekit.deployment.remote.agent_program); as a plain file it runs as ``python3 agent.py COMMAND ...`` with the other
two beside it. Layout under ROOT::

    releases/<id>/         one folder per bundle; ``.edgekit-release.json`` marks a release that passed every check
    current, previous      symlinks to releases/<id>, each replaced atomically (new link renamed over the old)
    .lock                  flock: held by the running deploy job and every process it starts, so it dies with them
    .incoming-<job>/       a running job: bundle.tar.gz, options.json, status.json, job.log, the agent's files
    .deploys/<job>.json    the final record of a job (done / failed / cancelled), kept for the last 20 jobs

Commands: ``status ROOT ID``, ``activate ROOT ID``, ``upload ROOT OPTIONS_JSON`` (bundle on stdin: checks its
sha256, then starts ``job`` detached: new session, output to job.log, and returns), ``wait ROOT JOB SECONDS``
(returns when the job ends, or after SECONDS), ``cancel ROOT JOB``. The job runs verify, install, engine, smoke,
bench, each with its own time limit (the stage's process group is killed past it), and switches ``current`` last:
once it has started switching a cancel is ignored, and nothing after the switch can undo it. Whoever takes the
lock next cleans up after a job that died (its half-installed release, .incoming-*, .partial-*), and keeps the
newest ``keep`` releases plus ``current`` and ``previous``.
"""

import ast
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time

from bundlecheck import BundleError, extract_members, manifest_id, verify_tree
from releases import (GRACE, HEX16, LIMITS, MARKER, Busy, active_job, alive, finish, kill_job, link_target, prune,
                      read_json, record_path, recover, release_state, switch, take_lock, try_lock, where, write_json)

FILES = ("bundlecheck", "releases", "agent")  # the modules sent to the device, in import order
SOURCES = None  # set by the host's bootstrap ({name: source} of FILES) when the agent runs with python -c


class StageError(Exception):
    def __init__(self, stage, message):
        Exception.__init__(self, message)
        self.stage = stage


class Cancelled(Exception):
    pass


def fail(stage, message, code=1):
    say({"error": message, "stage": stage})
    sys.exit(code)


def say(obj):
    """Print one JSON line; the host may be gone (a closed pipe), which must never change what was done."""
    try:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def root_of(root):
    return os.path.abspath(os.path.expanduser(root))


def check_id(value, what):
    if not HEX16.match(value or ""):
        fail("usage", "invalid {} {!r}".format(what, value), 2)
    return value


def lock_or_fail(root):
    try:
        return take_lock(root)
    except Busy as exc:
        fail("lock", str(exc))


def load_npy(path):
    """float arrays from a .npy file, with the standard library: (shape, flat list)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy file")
    hlen, start = (struct.unpack("<H", data[8:10])[0], 10) if data[6] == 1 else (struct.unpack("<I", data[8:12])[0], 12)
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


# ----------------------------------------------------------------------------- the detached job


class Job:
    """A deploy job's status file (status.json, replaced atomically), heartbeat, cancel flag and stages."""

    def __init__(self, root, jdir, status, lockfd):
        self.root, self.dir, self.status, self.lockfd = root, jdir, status, lockfd
        self.mutex = threading.Lock()
        self.cancelled = self.switching = False
        self.opts = read_json(os.path.join(jdir, "options.json")) or {}

    def update(self, **kw):
        with self.mutex:
            self.status.update(kw)
            try:
                write_json(os.path.join(self.dir, "status.json"), self.status)
            except OSError:
                pass

    def heartbeat(self, stop):
        while not stop.wait(5):
            self.update(heartbeat=time.time())

    def on_term(self, signum, frame):
        if self.switching:  # the switch has begun: it completes, and the cancel reports it
            return
        self.cancelled = True
        if self.status.get("stage_pgid"):
            try:
                os.killpg(self.status["stage_pgid"], signal.SIGTERM)
            except OSError:
                pass

    def check(self):
        if self.cancelled or os.path.exists(record_path(self.root, self.status["job"], ".cancel")):
            raise Cancelled()

    def stage(self, name):
        self.check()
        limit = float((self.opts.get("limits") or {}).get(name, LIMITS.get(name, 600)))
        self.update(stage=name, stage_started=time.time(), stage_limit=limit)
        pause = float((self.opts.get("test_pause") or {}).get(name, 0))  # tests only: hold a stage to hit it
        end = time.time() + pause
        while time.time() < end:
            self.check()
            time.sleep(0.1)
        return time.time() + limit

    def run(self, argv, stage, deadline, env=None):
        """Run one stage process in its own process group; kill the group on cancel or past ``deadline``."""
        out, err = os.path.join(self.dir, stage + ".out"), os.path.join(self.dir, stage + ".err")
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=o, stderr=e, env=env,
                                    start_new_session=True, pass_fds=(self.lockfd,))
        self.update(stage_pgid=proc.pid)
        name = os.path.basename(argv[1] if len(argv) > 1 else argv[0])
        while proc.poll() is None:
            if self.cancelled or time.time() > deadline:
                for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 30)):
                    try:
                        os.killpg(proc.pid, sig)
                    except OSError:
                        pass
                    try:
                        proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                if self.cancelled:
                    raise Cancelled()
                raise StageError(stage, "{} did not finish within the {} stage's limit of {:.0f} s; it was "
                                        "stopped".format(name, stage, self.status["stage_limit"]))
            time.sleep(0.1)
        self.update(stage_pgid=None)
        self.check()  # a cancel that killed the stage is a cancel, not the stage's failure
        with open(out, "rb") as o, open(err, "rb") as e:
            stdout, stderr = o.read().decode("utf-8", "replace"), e.read().decode("utf-8", "replace")
        if proc.returncode != 0:
            payload = last_json(stdout)
            msg = payload.get("error") if isinstance(payload, dict) and payload.get("error") else \
                (stderr.strip() or stdout.strip())[-600:] or "no output"
            raise StageError(stage, "{} exited with {}: {}".format(name, proc.returncode, msg))
        return stdout, stderr


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def smoke_and_bench(job, rel, manifest, runs):
    py, runner = os.path.join(rel, "venv", "bin", "python"), os.path.join(rel, "runner.py")
    model = os.path.join(rel, manifest["artifact"]["path"])
    notes = []
    if manifest.get("engine"):
        try:
            out, _ = job.run([py, os.path.join(rel, "build_engine.py"), "--print-path"], "engine", job.stage("engine"))
            model = out.strip().splitlines()[-1]
        except StageError as exc:
            model = os.path.join(rel, (manifest.get("fallback") or manifest["artifact"])["path"])
            notes.append("no TensorRT engine ({}); smoke-tested the ONNX fallback".format(exc))
    sample, checks, engine_used = manifest.get("sample") or {}, [], model.endswith(".engine")
    deadline = job.stage("smoke")
    for i, rel_in in enumerate(sample.get("inputs") or []):
        out_path = os.path.join(job.dir, "out{}.npy".format(i))
        job.run([py, runner, "predict", model, os.path.join(rel, rel_in), out_path], "smoke", deadline)
        _, got = load_npy(out_path)
        check = {"input": rel_in, "argmax": max(range(len(got)), key=got.__getitem__)}
        expected = (sample.get("expected") or [None] * (i + 1))[i]
        if expected is not None and not engine_used and model.endswith(sample.get("model", "")):
            diff = max(abs(a - b) for a, b in zip(got, expected)) if len(got) == len(expected) else None
            check.update({"expected_argmax": sample["expected_argmax"][i], "max_abs_diff": diff})
            if diff is None or check["argmax"] != check["expected_argmax"] or diff > sample.get("atol", 0.5):
                raise StageError("smoke", "the device's output for {} differs from the host's: argmax {} vs {}, max "
                                          "|diff| {}".format(rel_in, check["argmax"], check["expected_argmax"], diff))
        checks.append(check)
    bench_out, _ = job.run([py, runner, "bench", model, "--runs", str(runs), "--warmup", str(min(10, runs))], "bench",
                           job.stage("bench"))
    return {"model": os.path.relpath(model, rel), "checks": checks, "notes": notes,
            "matches_host": all("expected_argmax" in c for c in checks) and bool(checks)}, last_json(bench_out)


def verify_timeout(signum, frame):
    raise StageError("verify", "unpacking and checking the bundle took longer than the verify stage's limit")


def cmd_job(root, jid, lockfd):
    """The detached install: verify, install, engine, smoke, bench, switch. Writes status.json all along."""
    jdir = os.path.join(root, ".incoming-" + jid)
    status = read_json(os.path.join(jdir, "status.json"))
    job = Job(root, jdir, dict(status, pid=os.getpid(), state="running", heartbeat=time.time()), lockfd)
    signal.signal(signal.SIGTERM, job.on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = threading.Event()
    threading.Thread(target=job.heartbeat, args=(stop,), daemon=True).start()
    rid, opts = status["release"], job.opts
    rel = os.path.join(root, "releases", rid)
    state, stage, message, result = "failed", None, None, None
    try:
        job.update()
        deadline = job.stage("verify")
        signal.signal(signal.SIGALRM, verify_timeout)
        signal.alarm(max(1, int(deadline - time.time())))
        partial = tempfile.mkdtemp(prefix=".{}.partial-".format(jid), dir=os.path.join(root, "releases"))
        try:
            extract_members(os.path.join(jdir, "bundle.tar.gz"), partial)
            manifest = verify_tree(partial)
            with open(os.path.join(partial, "manifest.json"), "rb") as f:
                if manifest_id(f.read()) != rid:
                    raise StageError("verify", "the bundle's manifest does not have the id {}".format(rid))
        except BundleError as exc:
            raise StageError("verify", str(exc))
        finally:
            signal.alarm(0)
            os.remove(os.path.join(jdir, "bundle.tar.gz"))  # the job folder holds no second copy of the bundle
        os.chmod(partial, 0o755)
        job.check()
        if os.path.lexists(rel):  # an earlier attempt that never got its marker
            if link_target(root) == rid:
                raise StageError("verify", "releases/{} is current but incomplete; not touching it".format(rid))
            shutil.rmtree(rel)
        job.update(created_release=True)
        os.rename(partial, rel)
        env = dict(os.environ, PYTHON=opts["python"])
        env.pop("EDGEKIT_LAUNCHER", None)
        out, err = job.run(["sh", os.path.join(rel, "install.sh")], "install", job.stage("install"), env=env)
        smoke, bench = smoke_and_bench(job, rel, manifest, int(opts["runs"]))
        job.stage("switch")
        record = {"release": rid, "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": opts["python"],
                  "install_log": (out + err)[-2000:], "smoke": smoke, "bench": bench, "previous": link_target(root)}
        write_json(os.path.join(rel, MARKER), record)
        installed, ok, why = release_state(root, rid)
        if not ok:
            raise StageError("switch", "the installed release does not verify: {}".format(why))
        job.switching = True  # from here a cancel is ignored: the switch is the last step
        job.check()
        previous = switch(root, rid)
        state, stage = "done", "switch"
        result = dict(record, action="installed", previous=previous, path=rel, root=root)
        message = "installed release {}; current -> releases/{}".format(rid, rid)
    except Cancelled:
        state, stage = "cancelled", job.status.get("stage")
    except StageError as exc:
        stage, message = exc.stage, str(exc)
    except Exception as exc:  # noqa: BLE001 - whatever happened, leave no half-installed release behind
        stage, message = "internal", "{}: {}".format(type(exc).__name__, exc)
    stop.set()
    try:
        if state != "done" and job.status.get("created_release") and link_target(root) != rid:
            shutil.rmtree(rel, ignore_errors=True)
        for name in os.listdir(os.path.join(root, "releases")):
            if name.startswith(".{}.partial-".format(jid)):
                shutil.rmtree(os.path.join(root, "releases", name), ignore_errors=True)
        if state == "cancelled":
            message = "cancelled during {} ({})".format(stage, where(root))
        elif state == "failed":
            message = "{} ({})".format(message, where(root))
        finish(root, job.status, state, stage, message, result)
        prune(root, int(opts.get("keep", 3)))
    except Exception:  # noqa: BLE001 - after the switch nothing may undo it; the next deploy's recovery tidies up
        pass


# ----------------------------------------------------------------------------- commands run over ssh


def cmd_upload(root, opts):
    """Receive the bundle on stdin, check its sha256, start the detached job, say its id, return."""
    jid, rid = check_id(str(opts.get("job")), "job id"), check_id(str(opts.get("release")), "release id")
    try:
        limits = dict(LIMITS, **{k: float(v) for k, v in (opts.get("limits") or {}).items() if k in LIMITS})
        assert all(0 < v <= 7 * 86400 for v in limits.values()) and isinstance(opts.get("python"), str)
        assert int(opts.get("runs", 0)) >= 1 and int(opts.get("keep", 3)) >= 1
    except (AssertionError, TypeError, ValueError, AttributeError):
        fail("usage", "upload: invalid options", 2)
    os.makedirs(os.path.join(root, "releases"), exist_ok=True)
    lockfd = lock_or_fail(root)
    recover(root, int(opts.get("keep", 3)))
    jdir = os.path.join(root, ".incoming-" + jid)
    if os.path.lexists(jdir) or os.path.exists(record_path(root, jid)):
        fail("upload", "job {} already exists on this device".format(jid))
    os.mkdir(jdir, 0o700)
    status = {"job": jid, "release": rid, "state": "running", "stage": "upload", "pid": os.getpid(),
              "started": time.time(), "stage_started": time.time(), "stage_limit": limits["upload"],
              "previous_current": link_target(root)}
    write_json(os.path.join(jdir, "options.json"), dict(opts, limits=limits))
    write_json(os.path.join(jdir, "status.json"), status)
    signal.alarm(int(limits["upload"]))  # a stalled upload ends (the next deploy cleans up after it)
    time.sleep(min(float((opts.get("test_pause") or {}).get("upload", 0)), 120))  # tests only: hold the upload
    import hashlib

    h, stdin = hashlib.sha256(), getattr(sys.stdin, "buffer", sys.stdin)
    with open(os.path.join(jdir, "bundle.tar.gz"), "wb") as f:
        for block in iter(lambda: stdin.read(1 << 20), b""):
            h.update(block)
            f.write(block)
    signal.alarm(0)
    if h.hexdigest() != opts.get("sha256"):
        fail("upload", finish(root, status, "failed", "upload", "the bundle arrived with sha256 {}..., expected {}...: "
                                                                "the upload was corrupted or cut ({})".format(
            h.hexdigest()[:12], str(opts.get("sha256"))[:12], where(root)))["message"])
    if os.path.exists(record_path(root, jid, ".cancel")):
        fail("upload", finish(root, status, "cancelled", "upload", "cancelled during upload ({})".format(
            where(root)))["message"])
    here = os.path.dirname(os.path.abspath(__file__)) if SOURCES is None else None
    for name in FILES:
        src = SOURCES[name] if SOURCES else open(os.path.join(here, name + ".py")).read()
        with open(os.path.join(jdir, name + ".py"), "w") as f:
            f.write(src)
    with open(os.path.join(jdir, "job.log"), "ab") as log:
        proc = subprocess.Popen([sys.executable, os.path.join(jdir, "agent.py"), "job", root, jid, str(lockfd)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=jdir,
                                start_new_session=True, pass_fds=(lockfd,))
    say({"job": jid, "release": rid, "pid": proc.pid, "root": root})


def job_view(root, jid):
    """The job's final record, or its live status; a job whose processes are all gone is recovered first."""
    rec = read_json(record_path(root, jid))
    if rec:
        return rec
    st = read_json(os.path.join(root, ".incoming-" + jid, "status.json"))
    fd = try_lock(root) if os.path.isdir(root) else None
    if fd is None:
        if st and st.get("state") == "running" and (not alive(st.get("pid")) or time.time() > (
                st.get("stage_started") or time.time()) + (st.get("stage_limit") or 0) + GRACE):
            kill_job(st, signal.SIGKILL)  # its own limits did not stop it (or it died and left a stage running)
        return st or {"job": jid, "state": "unknown"}
    try:
        rec = read_json(record_path(root, jid))  # it may have ended between the two reads
        if rec is None and st is not None:
            recover(root)
            rec = read_json(record_path(root, jid))
        return rec or {"job": jid, "state": "unknown"}
    finally:
        os.close(fd)


def cmd_wait(root, jid, seconds):
    end = time.time() + seconds
    while True:
        view = job_view(root, jid)
        if view.get("state") != "running" or time.time() >= end:
            break
        time.sleep(0.25)
    say(dict(view, current=link_target(root)))


def cmd_cancel(root, jid):
    """Stop job JID before it switches (a cancel marker, SIGTERM, then SIGKILL), and say how it ended."""
    os.makedirs(os.path.join(root, ".deploys"), exist_ok=True)
    open(record_path(root, jid, ".cancel"), "a").close()
    signalled, start = set(), time.time()
    while True:
        view = job_view(root, jid)
        if view.get("state") != "running" or time.time() - start > 40:
            break
        sig = signal.SIGKILL if time.time() - start > 20 else signal.SIGTERM
        if (view.get("pid"), sig) not in signalled:
            signalled.add((view.get("pid"), sig))
            kill_job(view, sig)
        time.sleep(0.1)
    say(dict(view, current=link_target(root)))


def cmd_status(root, rid):
    installed, match, why = release_state(root, rid)
    job = None
    if os.path.isdir(root):
        fd = try_lock(root)
        if fd is None:
            job = active_job(root)
        else:
            os.close(fd)
    say({"release": rid, "root": root, "installed": installed, "manifest_match": match, "state": why,
         "current": link_target(root), "path": os.path.join(root, "releases", rid), "job": job})


def cmd_activate(root, rid):
    fd = lock_or_fail(root)
    installed, match, why = release_state(root, rid)
    if not (installed and match):
        fail("activate", "release {} is not installed intact ({})".format(rid, why))
    previous = switch(root, rid)
    say({"action": "activated", "release": rid, "previous": previous, "current": link_target(root),
         "path": os.path.join(root, "releases", rid), "root": root})
    os.close(fd)


def main(argv):
    cmd, args = (argv[0] if argv else ""), argv[1:]
    if not args or not args[0] or args[0].startswith("-"):
        fail("usage", "usage: agent status|activate ROOT ID | upload ROOT OPTIONS | wait ROOT JOB SECONDS | "
                      "cancel ROOT JOB", 2)
    root = root_of(args[0])
    if cmd in ("status", "activate") and len(args) == 2:
        (cmd_status if cmd == "status" else cmd_activate)(root, check_id(args[1], "release id"))
    elif cmd == "upload" and len(args) == 2:
        try:
            opts = json.loads(args[1])
        except ValueError:
            opts = None
        if not isinstance(opts, dict):
            fail("usage", "upload: OPTIONS is not a JSON object", 2)
        cmd_upload(root, opts)
    elif cmd == "wait" and len(args) == 3 and re.match(r"^\d{1,3}(\.\d+)?$", args[2]):
        cmd_wait(root, check_id(args[1], "job id"), min(float(args[2]), 300.0))
    elif cmd == "cancel" and len(args) == 2:
        cmd_cancel(root, check_id(args[1], "job id"))
    elif cmd == "job" and len(args) == 3 and args[2].isdigit():
        cmd_job(root, check_id(args[1], "job id"), int(args[2]))
    else:
        fail("usage", "usage: agent status|activate ROOT ID | upload ROOT OPTIONS | wait ROOT JOB SECONDS | "
                      "cancel ROOT JOB", 2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
