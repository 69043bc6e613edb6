"""Latency measured on a device over SSH, with the system OpenSSH client.

Three connections per run: (1) make a per-run temporary folder under the
profile's workdir and unpack the model + the standalone runner into it (a tar
stream on stdin), (2) run ``runner.py bench`` with the device's python, (3)
remove the folder (always, also after failures). Every ssh call is an argument
list (no local shell); the one remote command string is built with
``shlex.quote`` on each argument. Host keys are always checked
(``StrictHostKeyChecking=yes``, ``BatchMode=yes``): an unknown or changed host
key is an error, never a prompt and never silently accepted.

A remote command without a tty is not stopped when its ssh session dies, so the
runner starts in a process group of its own and writes its id to ``pgid`` in the
run folder; when the benchmark is interrupted (Ctrl-C, SIGTERM) or times out,
step (3) first kills that group over a fresh connection.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..config import SSHSpec
from ..errors import DeviceUnreachable, EdgekitError
from ..results import MEASURED_SSH, Latency

REMOTE_MODEL_STEM = "model"
EXIT_NO_RUNTIME = 3
_SSH_FAILED = 255
_TARGET = re.compile(r"^(?:(?P<user>[^@\s/]+)@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^@:\s/\[\]]+)(?::(?P<port>\d+))?$")


# ----------------------------------------------------------------------------- targets


def parse_target(target: str) -> Tuple[Optional[str], str, Optional[int]]:
    """``user@addr[:port]`` (IPv6 as ``user@[::1]:22``) -> (user or None, host, port or None)."""
    m = _TARGET.match(target.strip())
    if not m or m.group("host").startswith("-"):
        raise EdgekitError(f"Cannot parse host {target!r}: expected user@address or user@address:port "
                           f"(IPv6 in brackets, e.g. pi@[::1]:22)")
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port < 65536:
        raise EdgekitError(f"Port {port} in {target!r} is out of range (1-65535)")
    return m.group("user"), m.group("host").strip("[]"), port


def spec_for_target(target: str, base: Optional[SSHSpec] = None) -> SSHSpec:
    """The device profile's SSH settings (key, python, known_hosts ...) with host/user/port from ``target``."""
    user, host, port = parse_target(target)
    fields = base.model_dump() if base is not None else {}
    fields["host"] = host
    if user is not None:
        fields["user"] = user
    if port is not None:
        fields["port"] = port
    return SSHSpec.model_validate(fields)


def destination(spec: SSHSpec) -> str:
    host = f"[{spec.host}]" if ":" in spec.host else spec.host
    where = f"{spec.user}@{host}" if spec.user else host
    return where if spec.port == 22 else f"{where}:{spec.port}"


# ----------------------------------------------------------------------------- ssh invocation


def _ssh_config_path(path: str) -> str:
    """A path as an ssh -o value: % tokens escaped, quoted when it has spaces."""
    p = str(Path(path).expanduser()).replace("%", "%%")
    return f'"{p}"' if any(c.isspace() for c in p) else p


def ssh_command(spec: SSHSpec, remote_command: str) -> List[str]:
    """The argument list for one ssh call; ``remote_command`` is already quoted for the remote shell."""
    exe = shutil.which("ssh")
    if exe is None:
        raise EdgekitError("The OpenSSH client (ssh) is not installed here: install openssh-client")
    if spec.host.startswith("-") or any(c.isspace() for c in spec.host) or (spec.user or "").startswith("-"):
        raise EdgekitError(f"Invalid SSH host or user: {destination(spec)!r}")
    args = [exe, "-T", "-p", str(spec.port),
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no",
            "-o", f"ConnectTimeout={spec.connect_timeout}", "-o", "ServerAliveInterval=15",
            "-o", "ServerAliveCountMax=4", "-o", "ForwardAgent=no", "-o", "ForwardX11=no",
            "-o", "ClearAllForwardings=yes", "-o", "LogLevel=ERROR"]
    if spec.known_hosts:
        kh = Path(spec.known_hosts).expanduser()
        if not kh.is_file():
            raise EdgekitError(f"known_hosts file not found: {kh} (host keys are always checked; "
                               f"create it with the device's verified host key)")
        args += ["-o", f"UserKnownHostsFile={_ssh_config_path(str(kh))}"]
    if spec.key:
        key = Path(spec.key).expanduser()
        if not key.is_file():
            raise EdgekitError(f"SSH key not found: {key}")
        args += ["-i", str(key).replace("%", "%%"), "-o", "IdentitiesOnly=yes"]
    if spec.user:
        args += ["-l", spec.user]
    return args + ["--", spec.host, remote_command]


def quote_command(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def _explain_ssh_failure(stderr: str, spec: SSHSpec) -> str:
    """One clear sentence for the ways an ssh connection fails (exit status 255)."""
    dest = destination(spec)
    kh = spec.known_hosts or "~/.ssh/known_hosts"
    low = stderr.lower()
    last = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), "no message from ssh").rstrip(".")
    keyscan = f"ssh-keyscan -p {spec.port} {spec.host}"
    entry = spec.host if spec.port == 22 else f"[{spec.host}]:{spec.port}"
    if "remote host identification has changed" in low or "host key for" in low and "has changed" in low:
        return (f"SSH host key mismatch for {dest}: the key the device sent differs from the one in {kh}. "
                f"This is what a man-in-the-middle looks like; if the device was reinstalled, verify its new key "
                f"and replace the entry (ssh-keygen -R '{entry}' -f {kh}).")
    if "host key verification failed" in low or "host key is known for" in low:
        return (f"SSH host key of {dest} is unknown: {kh} has no entry for it and host keys are always checked. "
                f"Add the device's key after checking its fingerprint, e.g. `{keyscan} >> {kh}`, "
                f"or connect once with plain ssh.")
    if "permission denied" in low or "too many authentication failures" in low:
        how = f"key {spec.key}" if spec.key else "your ssh agent / default keys"
        return (f"SSH authentication failed for {dest} with {how}: {last}. Check the user name and that the "
                f"public key is in the device's ~/.ssh/authorized_keys.")
    if "connection refused" in low:
        return f"Cannot reach {dest}: connection refused (is sshd running and listening on port {spec.port}?)"
    for pattern, why in (("timed out", "connection timed out"), ("no route to host", "no route to host"),
                         ("network is unreachable", "network is unreachable"),
                         ("could not resolve hostname", "unknown host name"),
                         ("name or service not known", "unknown host name"),
                         ("connection closed", "the connection was closed"),
                         ("connection reset", "the connection was reset")):
        if pattern in low:
            return f"Cannot reach {dest}: {why} ({last})"
    return f"SSH to {dest} failed: {last}"


def run_ssh(spec: SSHSpec, argv: Sequence[str] | str, stdin_path: Optional[Path] = None, timeout: Optional[float] = None,
            what: str = "command") -> subprocess.CompletedProcess:
    """Run ``argv`` on the device: a list is quoted argument by argument; a string must already be quoted.

    ssh's own failures (exit status 255: unreachable, authentication, host key) become EdgekitError.
    """
    cmd = ssh_command(spec, quote_command(argv) if not isinstance(argv, str) else argv)
    limit = timeout or spec.command_timeout
    try:
        if stdin_path is not None:
            with open(stdin_path, "rb") as stdin:
                proc = subprocess.run(cmd, stdin=stdin, capture_output=True, timeout=limit)
        else:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise DeviceUnreachable(f"SSH {what} on {destination(spec)} did not finish within {limit:.0f} s") from None
    proc.stdout = proc.stdout.decode("utf-8", "replace")
    proc.stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode == _SSH_FAILED:
        why = _explain_ssh_failure(proc.stderr, spec)
        raise (DeviceUnreachable if why.startswith("Cannot reach") else EdgekitError)(why)
    return proc


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt inside the block (main thread only), so a run stopped by a service manager
    or ``kill`` cleans up on the device the same way as Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# The runner's launcher on the device: a process group of its own, its id in ``pgid``, then exec the runner.
# Fixed code; the folder and the command come in as arguments.
_LAUNCH = ("import os, sys\ntry:\n    os.setpgid(0, 0)\nexcept OSError:\n    pass\n"
           "open('pgid', 'w').write(str(os.getpgid(0)))\nos.execvp(sys.argv[1], sys.argv[1:])")
# Kill the group recorded in DIR/pgid (only if its leader still runs in DIR), then remove DIR.
_STOP = ("import os, shutil, signal, sys, time\nd = sys.argv[1]\n"
         "try:\n    g = int(open(os.path.join(d, 'pgid')).read())\n"
         "    same = os.path.realpath('/proc/%d/cwd' % g) == os.path.realpath(d) if os.path.isdir('/proc') else True\n"
         "except (OSError, ValueError):\n    g, same = None, False\n"
         "for sig in (signal.SIGTERM, signal.SIGKILL) if g and same else ():\n"
         "    try:\n        os.killpg(g, sig)\n    except OSError:\n        break\n    time.sleep(1)\n"
         "shutil.rmtree(d, ignore_errors=True)")


def _remote_workdir(workdir: str) -> str:
    """``~/x`` -> ``x``: the remote shell starts in the home folder and quoted ``~`` would not expand."""
    if workdir in ("~", "~/"):
        return "."
    if workdir.startswith("~/"):
        return workdir[2:]
    if workdir.startswith("~"):
        raise EdgekitError(f"ssh.workdir {workdir!r}: use ~/... or an absolute path")
    return workdir


def _bundle(artifact: Path, runner: Path, into: Path) -> Path:
    out = into / "bundle.tar"
    with tarfile.open(out, "w") as tar:
        tar.add(str(runner), arcname="runner.py")
        tar.add(str(artifact), arcname=REMOTE_MODEL_STEM + artifact.suffix.lower())
    return out


# ----------------------------------------------------------------------------- measurement


def profile_remote(artifact: str | Path, ssh: SSHSpec, threads: Optional[int] = None, warmup: int = 10,
                   runs: int = 100) -> Latency:
    """Benchmark ``artifact`` on the device ``ssh`` points at: p50/p90 in ms; mean/min, the host and what ran it in
    ``extra`` (the runner's whole JSON line)."""
    artifact = Path(artifact)
    if not artifact.is_file():
        raise EdgekitError(f"Model file not found: {artifact}")
    if runs < 1 or warmup < 0:
        raise EdgekitError("runs must be >= 1 and warmup >= 0")
    dest = destination(ssh)
    workdir = _remote_workdir(ssh.workdir)
    python = shlex.split(ssh.python)
    t_start = time.perf_counter()
    with sigterm_as_interrupt():
        return _profile(artifact, ssh, python, workdir, dest, t_start, threads, warmup, runs)


def _profile(artifact: Path, ssh: SSHSpec, python, workdir: str, dest: str, t_start: float, threads, warmup: int,
             runs: int) -> Latency:
    from ..deployment import RUNNER_PATH

    with tempfile.TemporaryDirectory(prefix="edgekit-ssh-") as tmp:
        bundle = _bundle(artifact, RUNNER_PATH, Path(tmp))
        setup = (f"mkdir -p -- {shlex.quote(workdir)} && d=$(mktemp -d {shlex.quote(workdir + '/run.XXXXXXXX')}) "
                 f"&& {{ (cd -- \"$d\" && tar -xf - && pwd) || {{ rm -rf -- \"$d\"; exit 1; }}; }}")
        proc = run_ssh(ssh, setup, stdin_path=bundle, timeout=ssh.command_timeout, what="upload")
        remote_dir = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode != 0 or not Path(remote_dir).name.startswith("run."):
            raise EdgekitError(f"Could not create a temporary folder under {ssh.workdir} on {dest} and unpack the "
                               f"model there: {(proc.stderr.strip() or proc.stdout.strip())[-300:] or 'no message'}")
    finished = False
    try:
        model_name = REMOTE_MODEL_STEM + artifact.suffix.lower()
        remote = (f"cd -- {shlex.quote(remote_dir)} && "
                  + quote_command([*python, "-c", _LAUNCH, *python, "runner.py", "bench", model_name, "--warmup",
                                   str(warmup), "--runs", str(runs), "--threads", str(int(threads or 0))]))
        proc = run_ssh(ssh, remote, timeout=ssh.command_timeout, what="benchmark")
        finished = True
    finally:
        _cleanup(ssh, remote_dir, python=None if finished else python)
    result = _parse_runner_output(proc, ssh)
    result.update({"source": MEASURED_SSH, "host": dest, "artifact": str(artifact),
                   "artifact_bytes": artifact.stat().st_size, "remote_python": ssh.python,
                   "wall_s": round(time.perf_counter() - t_start, 3)})
    return Latency.from_json({**result, "runtime_version": result.get("version")})


def _cleanup(ssh: SSHSpec, remote_dir: str, python: Optional[List[str]] = None) -> None:
    """Remove the per-run folder; with ``python`` (the benchmark did not finish) first kill the runner's process
    group. A failure here must not hide the benchmark's own outcome."""
    if not Path(remote_dir).name.startswith("run."):
        return
    argv = [*python, "-c", _STOP, remote_dir] if python else ["rm", "-rf", "--", remote_dir]
    try:
        run_ssh(ssh, argv, timeout=60, what="cleanup")
    except (EdgekitError, KeyboardInterrupt):
        pass


def last_json_line(text: str):
    """The last line of a remote program's stdout that parses as JSON (what it answered), or None."""
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _parse_runner_output(proc: subprocess.CompletedProcess, ssh: SSHSpec) -> dict:
    dest = destination(ssh)
    payload = last_json_line(proc.stdout)
    if proc.returncode == 127 or (payload is None and "not found" in proc.stderr and proc.returncode != 0):
        raise EdgekitError(f"The device python {ssh.python!r} was not found on {dest}: set ssh.python in the "
                           f"device profile ({proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else ''})")
    if isinstance(payload, dict) and "error" in payload:
        if proc.returncode == EXIT_NO_RUNTIME:
            raise EdgekitError(f"{dest}: {payload['error']}")
        raise EdgekitError(f"The runner on {dest} failed (exit {proc.returncode}): {payload['error']}")
    if proc.returncode != 0 or not isinstance(payload, dict):
        tail = (proc.stderr.strip() or proc.stdout.strip())[-400:] or "no output"
        raise EdgekitError(f"The runner on {dest} failed (exit {proc.returncode}): {tail}")
    return payload
