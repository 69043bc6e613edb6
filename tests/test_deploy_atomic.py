"""Deploys are atomic from the user's point of view (edgekit/deployment/remote.py, edgekit/device/agent.py).

The first tests run the device agent as the plain file it is (no ssh): time limits, recovery after a dead job,
pruning, the lock. The slow ones run ``edgekit deploy`` against the real sshd of conftest.py and interrupt it at
each device stage (Ctrl-C, SIGTERM, SIGKILL, dropped connections), watching the device's status file; afterwards
``current`` points at an existing verified release, the CLI said what the device did, and the next deploy works.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

DEVICE = Path(__file__).resolve().parents[1] / "edgekit" / "device"
AGENT = DEVICE / "agent.py"


def agent(*args, stdin=None, timeout=60) -> dict:
    """Run the agent as a plain file, with edgekit not importable (-S -E: no site-packages, no PYTHON* variables)."""
    proc = subprocess.run([sys.executable, "-S", "-E", str(AGENT), *map(str, args)], stdin=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd="/")
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fake_bundle(path: Path, files: dict) -> str:
    """A bundle with ``files`` (name -> bytes) and a valid manifest; returns its release id."""
    manifest = {"format": "edgekit-bundle", "python_version": "3.11", "artifact": {"path": "model.onnx"},
                "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()}}
    data = json.dumps(manifest, sort_keys=True).encode()
    with tarfile.open(path, "w:gz") as t:
        for name, blob in {**files, "manifest.json": data}.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(blob), 0o755
            t.addfile(info, io.BytesIO(blob))
    return hashlib.sha256(data).hexdigest()[:16]


def upload(root: Path, tar: Path, rid: str, job: str, **opts) -> dict:
    with open(tar, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    options = {"job": job, "release": rid, "sha256": sha, "python": sys.executable, "runs": 1, **opts}
    with open(tar, "rb") as f:
        return agent("upload", root, json.dumps(options), stdin=f)


def lock_is_free(root: Path, within: float = 5) -> bool:
    """ROOT/.lock can be taken within a few seconds (a job writes its record, then prunes and exits)."""
    import fcntl

    end = time.monotonic() + within
    with open(root / ".lock") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                if time.monotonic() > end:
                    return False
                time.sleep(0.05)


def test_agent_runs_as_a_plain_file_and_refuses_bad_arguments(tmp_path):
    assert agent("status", tmp_path / "r", "0" * 16)["current"] is None
    assert not (tmp_path / "r").exists()  # a status check writes nothing
    for bad in (["status", tmp_path, "../../etc"], ["upload", tmp_path, "{not json"], ["wait", tmp_path, "0" * 16, "x"],
                ["cancel", "-rf", "0" * 16], ["nope"]):
        out = agent(*bad)
        assert out["stage"] == "usage" and out["error"], bad


def test_stage_time_limit_kills_the_stage_process_group(tmp_path):
    """install.sh that never ends (and leaves a child in the background): stopped at its limit, group and all."""
    root = tmp_path / "root"
    script = b'sleep 300 & echo $! > "$(dirname "$0")/../../bg.pid"\nsleep 300\n'
    rid = fake_bundle(tmp_path / "b.tar.gz", {"install.sh": script, "runner.py": b"", "model.onnx": b"x"})
    t0 = time.monotonic()
    started = upload(root, tmp_path / "b.tar.gz", rid, "a" * 16, limits={"install": 2})
    assert started["job"] == "a" * 16
    rec = agent("wait", root, "a" * 16, 60)
    assert rec["state"] == "failed" and rec["stage"] == "install", rec
    assert "did not finish within the install stage's limit of 2 s; it was stopped" in rec["message"]
    assert rec["message"].endswith("current still points at nothing)") and rec["current"] is None
    assert time.monotonic() - t0 < 30
    bg = int((root / "bg.pid").read_text())
    for _ in range(50):
        if not os.path.exists(f"/proc/{bg}") or "Z" in open(f"/proc/{bg}/stat").read().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the background child of install.sh survived the stage's time limit")
    assert lock_is_free(root)  # flock: released when the job and everything it started are gone
    assert sorted(p.name for p in (root / "releases").iterdir()) == []
    assert not list(root.glob(".incoming-*")) and (root / ".deploys" / ("a" * 16 + ".json")).is_file()


def _release(root: Path, rid: str, age: float, marker: bool = True) -> None:
    d = root / "releases" / rid
    d.mkdir(parents=True)
    if marker:
        (d / ".edgekit-release.json").write_text("{}")
        os.utime(d / ".edgekit-release.json", (time.time() - age, time.time() - age))


def test_dead_job_is_recovered_and_releases_are_pruned(tmp_path):
    """A job that died mid-install (its pid is gone, so is its lock) leaves a half release, an .incoming folder and
    a .partial folder: the next deploy's lock holder cleans them; releases/ keeps the newest N plus current and
    previous."""
    root = tmp_path / "root"
    ids = [f"{i:016x}" for i in range(1, 7)]
    for i, rid in enumerate(ids[:5]):
        _release(root, rid, age=1000 - i * 100)  # ids[4] is the newest
    _release(root, ids[5], age=0, marker=False)  # the dead job's half-installed release
    (root / "current").symlink_to(f"releases/{ids[0]}")  # the oldest is current, the next oldest previous
    (root / "previous").symlink_to(f"releases/{ids[1]}")
    (root / "releases" / f".{'d' * 16}.partial-xyz").mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    jdir = root / f".incoming-{'d' * 16}"
    jdir.mkdir()
    (jdir / "status.json").write_text(json.dumps({"job": "d" * 16, "release": ids[5], "state": "running",
                                                  "stage": "install", "pid": dead.pid, "created_release": True}))
    rec = agent("wait", root, "d" * 16, 0)
    assert rec["state"] == "failed" and rec["stage"] == "install"
    assert "stopped during install without finishing" in rec["message"]
    assert f"current still points at releases/{ids[0]}" in rec["message"]
    # keep=3 (the default): the three newest, plus current and previous; the half release and .partial are gone
    assert sorted(p.name for p in (root / "releases").iterdir()) == sorted([ids[0], ids[1], ids[2], ids[3], ids[4]])
    assert not jdir.exists()
    job = "e" * 16
    rid = fake_bundle(tmp_path / "b.tar.gz", {"install.sh": b"exit 7\n", "runner.py": b"", "model.onnx": b"x"})
    upload(root, tmp_path / "b.tar.gz", rid, job, keep=1)
    rec = agent("wait", root, job, 60)
    assert rec["state"] == "failed" and rec["stage"] == "install" and "install.sh exited with 7" in rec["message"]
    assert sorted(p.name for p in (root / "releases").iterdir()) == sorted([ids[0], ids[1], ids[4]])
    assert os.readlink(root / "current") == f"releases/{ids[0]}"


@pytest.mark.slow
def test_a_second_deploy_is_refused_while_one_runs_and_cancel_stops_it(tmp_path):
    root = tmp_path / "root"
    rid = fake_bundle(tmp_path / "b.tar.gz", {"install.sh": b"sleep 300\n", "runner.py": b"", "model.onnx": b"x"})
    upload(root, tmp_path / "b.tar.gz", rid, "1" * 16)
    for _ in range(100):
        if json.loads((root / f".incoming-{'1' * 16}" / "status.json").read_text()).get("stage") == "install":
            break
        time.sleep(0.05)
    busy = upload(root, tmp_path / "b.tar.gz", rid, "2" * 16)
    assert busy["stage"] == "lock" and f"release {rid} (job {'1' * 16}), at stage install" in busy["error"]
    rec = agent("cancel", root, "1" * 16)
    assert rec["state"] == "cancelled" and rec["stage"] == "install", rec
    assert rec["message"] == f"cancelled during install ({root}/current still points at nothing)"
    assert lock_is_free(root) and not (root / "releases" / rid).exists()
    assert not subprocess.run(["pgrep", "-f", str(root)], capture_output=True).stdout


@pytest.mark.slow
def test_a_job_stuck_past_its_limit_is_killed_by_the_next_deploy(tmp_path):
    """The backstop when a job's own time limits did not stop it: the next deploy kills it and takes the lock."""
    root = tmp_path / "root"
    (root / "releases").mkdir(parents=True)
    stuck = "5" * 16
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print(1, flush=True); "
                               "time.sleep(300)", str(root / ".lock"), stuck], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "1"
    (root / f".incoming-{stuck}").mkdir()
    (root / f".incoming-{stuck}" / "status.json").write_text(json.dumps(
        {"job": stuck, "release": "6" * 16, "state": "running", "stage": "install", "pid": holder.pid,
         "stage_started": time.time() - 1000, "stage_limit": 10}))
    rid = fake_bundle(tmp_path / "b.tar.gz", {"install.sh": b"exit 5\n", "runner.py": b"", "model.onnx": b"x"})
    assert upload(root, tmp_path / "b.tar.gz", rid, "7" * 16)["job"] == "7" * 16
    assert holder.wait(timeout=10) == -signal.SIGTERM
    old = agent("wait", root, stuck, 0)
    assert old["state"] == "failed" and "outlived its time limit" in old["message"]
    assert agent("wait", root, "7" * 16, 60)["message"].startswith("install.sh exited with 5")


# ----------------------------------------------------------------------------- edgekit deploy over the real sshd

from test_deploy import desktop_bundle, run_dir, wheel_cache  # noqa: E402,F401  (module fixtures, reused)

@pytest.fixture(scope="module")
def variant_bundle(run_dir, tmp_path_factory):  # noqa: F811
    """Another release of the same run (a report.json that differs): another bundle id."""
    import shutil

    from edgekit.deployment.bundle import build_bundle

    other = tmp_path_factory.mktemp("variant") / "run"
    shutil.copytree(run_dir, other)
    report = json.loads((other / "report.json").read_text())
    report["recommended"] = {"name": "fp32", "format": "onnx"}
    (other / "report.json").write_text(json.dumps(report))
    return build_bundle(other, "desktop-cpu", other.parent / "fp32.tar.gz", wheel_cache=wheel_cache())


@pytest.fixture(scope="module")
def third_bundle(run_dir, tmp_path_factory):  # noqa: F811
    import shutil

    from edgekit.deployment.bundle import build_bundle

    other = tmp_path_factory.mktemp("third") / "run"
    shutil.copytree(run_dir, other)
    report = json.loads((other / "report.json").read_text())
    report["description"] = "the same run, shipped again"
    (other / "report.json").write_text(json.dumps(report))
    return build_bundle(other, "desktop-cpu", other.parent / "third.tar.gz", wheel_cache=wheel_cache())


@pytest.fixture(scope="module")
def device(sshd, variant_bundle, tmp_path_factory):
    """A device profile pointing at the sshd, and a root whose current release is the variant bundle."""
    from edgekit.deployment import deploy

    dev = tmp_path_factory.mktemp("dev") / "sshdev.yaml"
    text = (Path(__file__).resolve().parents[1] / "devices" / "desktop-cpu.yaml").read_text()
    spec = sshd.spec(python=sys.executable)
    dev.write_text(text + "\nssh:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in spec.model_dump().items()
                                               if v is not None))
    root = sshd.root / "remote" / "atomic"
    first = deploy(variant_bundle, "desktop-cpu", ssh=spec, root=str(root), bench_runs=2)
    assert first["action"] == "installed"
    return {"yaml": dev, "root": root, "host": f"{sshd.user}@127.0.0.1:{sshd.port}", "base": first["release"]}


# the `edgekit` command, with Ctrl-C restored in case the test runner ignores SIGINT (a background job's children do)
_EDGEKIT = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); sys.argv[0] = 'edgekit'; "
            "from edgekit.cli import main; main()")


def cli(device, bundle, *extra, pause=""):
    """``edgekit deploy BUNDLE`` in its own process group; ``pause`` holds a device stage (the test-only hook)."""
    env = dict(os.environ, EDGEKIT_DEPLOY_TEST_PAUSE=pause)
    return subprocess.Popen([sys.executable, "-c", _EDGEKIT, "deploy", str(bundle), "--device", str(device["yaml"]),
                             "--host", device["host"], "--root", str(device["root"]), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def device_stage(root: Path):
    for st in root.glob(".incoming-*/status.json"):
        try:
            return json.loads(st.read_text())
        except ValueError:
            pass
    return None


def wait_for_stage(root: Path, stage: str, proc, timeout=240) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = device_stage(root)
        if st and st.get("stage") == stage:
            return st
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.03)
    pytest.fail(f"the device never reached stage {stage}")


def verified_current(root: Path) -> str:
    """``current`` points at an existing release with its marker, whose files match its manifest."""
    from edgekit.device.bundlecheck import manifest_id, verify_tree

    rel = (root / "current").resolve()
    assert rel.is_dir() and (rel / ".edgekit-release.json").is_file(), rel
    assert manifest_id((rel / "manifest.json").read_bytes()) == rel.name
    verify_tree(str(rel), strict=False)
    return rel.name


def assert_tidy(root: Path):
    """No job folder, no .partial folder, and (after a moment for a status call to return) no device process."""
    assert not list(root.glob(".incoming-*")) and not list((root / "releases").glob(".*partial*"))
    for _ in range(50):
        left = subprocess.run(["pgrep", "-af", str(root)], capture_output=True, text=True).stdout
        if not left:
            return
        time.sleep(0.1)
    pytest.fail(f"device processes are left: {left}")


def record(root: Path, job: str) -> dict:
    return json.loads((root / ".deploys" / f"{job}.json").read_text())


@pytest.mark.parametrize("stage, sig, pause", [
    pytest.param("upload", signal.SIGINT, "upload=60", id="upload-ctrl-c"),
    pytest.param("install", signal.SIGTERM, "switch=60", id="install-sigterm"),
    pytest.param("smoke", signal.SIGINT, "switch=60", id="smoke-ctrl-c"),
    pytest.param("bench", signal.SIGTERM, "switch=60", id="bench-sigterm"),
    pytest.param("switch", signal.SIGINT, "switch=60", id="switch-ctrl-c"),
])
@pytest.mark.slow
@pytest.mark.xdist_group("wheel-cache")
def test_interrupted_deploy_says_what_the_device_did(device, desktop_bundle, stage, sig, pause):  # noqa: F811
    """Ctrl-C (SIGINT to the whole process group, ssh client included) or SIGTERM while the device is at STAGE:
    the job is stopped before it switches, ``current`` still points at the verified base release, nothing is left
    running or half-written, and the CLI's message names the stage and release the device reports."""
    root = device["root"]
    proc = cli(device, desktop_bundle, "--runs", "3000" if stage == "bench" else "3", pause=pause)
    st = wait_for_stage(root, stage, proc)
    if stage in ("install", "bench"):  # let the stage's own processes start: the cancel kills their group
        time.sleep(0.3)
    (os.killpg if sig == signal.SIGINT else os.kill)(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    rec = record(root, st["job"])
    assert proc.returncode == 130, (out, err)
    assert rec["state"] == "cancelled", rec
    msg = " ".join(err.split())
    assert (f"Interrupted: the deploy of release {st['release']} was stopped on {device['host']} during "
            f"{rec['stage']}; {root}/current points at releases/{device['base']}") in msg, msg
    order = ["upload", "verify", "install", "smoke", "bench", "switch"]
    assert order.index(rec["stage"]) >= order.index(stage), rec  # where the cancel found it: here or one on
    assert verified_current(root) == device["base"] and rec["current"] == device["base"]
    assert not (root / "releases" / st["release"]).exists()
    assert_tidy(root)


@pytest.mark.slow
@pytest.mark.xdist_group("wheel-cache")
def test_dropped_connections_and_a_killed_host(device, desktop_bundle, third_bundle, sshd):  # noqa: F811
    """The connection drops (sshd's session processes killed) during the upload: the device refuses the cut
    upload; during install and smoke: the host reconnects and reports the install. Then the host is killed
    outright (SIGKILL, no chance to cancel) during install: the device finishes by itself, and the next deploy
    follows it or finds it installed. A deploy of what is current changes nothing."""
    root = device["root"]

    def drop_connections():
        for pid in subprocess.run(["pgrep", "-P", str(sshd.proc.pid)], capture_output=True, text=True).stdout.split():
            os.kill(int(pid), signal.SIGKILL)

    proc = cli(device, desktop_bundle, "--runs", "3", pause="upload=3")
    st = wait_for_stage(root, "upload", proc)
    drop_connections()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and record(root, st["job"])["state"] == "failed", (out, err)
    assert re.search(rf"failed at upload: .*current still points at releases/{device['base']}\)",
                     " ".join(err.split())), err  # (here: "the bundle arrived with sha256 ...: ... cut")
    assert verified_current(root) == device["base"]

    proc = cli(device, desktop_bundle, "--runs", "3")
    for stage in ("install", "smoke"):
        wait_for_stage(root, stage, proc)
        drop_connections()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out, err)
    new = verified_current(root)
    assert new != device["base"] and f"installed: installed release {new}" in " ".join(out.split()), out
    assert os.readlink(root / "previous") == f"releases/{device['base']}"
    assert_tidy(root)

    proc = cli(device, third_bundle, "--runs", "3")
    st = wait_for_stage(root, "install", proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its ssh client, gone without a word
    proc.communicate()
    again = cli(device, third_bundle, "--runs", "3")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, (out, err)
    out = " ".join(out.split())
    assert (f"followed the deploy job {st['job']} that was already running there" in out
            or f"release {st['release']} is already installed" in out), out
    assert verified_current(root) == st["release"] and record(root, st["job"])["state"] == "done"
    out, _ = cli(device, third_bundle).communicate(timeout=120)
    assert "unchanged" in out and "nothing to do" in out
    assert_tidy(root)
    assert {p.name for p in (root / "releases").iterdir()} == {device["base"], new, st["release"]}
