"""Shared fixtures. Tests use real ONNX Runtime sessions and real files; the cache is per test session."""

from __future__ import annotations

import json
import os

import pytest
import torch

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- longest first

# pytest-xdist (``--dist loadgroup``) hands out the module groups first, largest first, then single tests in collection
# order as workers free up. The zoo cells that train for 1.5-2.5 minutes on a CI core (the two EfficientNets at their
# default 64 px, the two VGG16s, CondenseNet, IGCV3) were collected last and often ran alone at the end while the other
# worker idled; started first, the many short tests fill in behind them. (Costs: ``--durations`` of a 2-core run.)
LONG_FIRST = tuple(f"test_zoo_pipeline.py::test_trains_exports_and_quantizes[{n}]" for n in (
    "efficientnetv2-b0", "efficientnet-b0", "vgg16-dualconv-g4", "vgg16-hetconv-p4", "condensenet-g4c4", "igcv3"))


def pytest_collection_modifyitems(config, items):
    def rank(item):
        nodeid = item.nodeid.rsplit("/", 1)[-1]
        return next((i for i, p in enumerate(LONG_FIRST) if nodeid == p), len(LONG_FIRST))

    items.sort(key=rank)  # stable: everything else keeps its order


# ----------------------------------------------------------------------------- the zoo matrix

_MATRIX_ROWS: list = []
_IS_WORKER = False  # a pytest-xdist worker: its reports reach the controller, which records them


def pytest_configure(config):
    global _IS_WORKER
    _IS_WORKER = hasattr(config, "workerinput")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Tag the report of every ``zoo_matrix(column)`` test with its zoo entry, column and outcome.

    The tag rides in ``user_properties``, which pytest-xdist carries from a worker to the controller.
    """
    outcome = yield
    rep = outcome.get_result()
    mark = item.get_closest_marker("zoo_matrix")
    if mark is None or not hasattr(item, "callspec"):
        return
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        result = "xfailed" if hasattr(rep, "wasxfail") else rep.outcome
        rep.user_properties.append(("zoo_matrix", [item.callspec.params["name"], mark.args[0], result]))


def pytest_runtest_logreport(report):
    """Collect the tagged cells (in the controller, or in a run without workers)."""
    if _IS_WORKER:
        return
    props = dict(report.user_properties)
    if "zoo_matrix" in props:
        name, column, result = props.pop("zoo_matrix")
        _MATRIX_ROWS.append((name, column, result, props))


def pytest_sessionfinish(session, exitstatus):
    """Write the zoo matrix cells this session decided (``$EDGEKIT_ZOO_MATRIX`` or .pytest_cache/zoo-matrix.json)."""
    if _IS_WORKER or not _MATRIX_ROWS:
        return
    import datetime
    import importlib.metadata as md
    from pathlib import Path

    from edgekit.zoo import matrix as zm

    path = Path(os.environ.get("EDGEKIT_ZOO_MATRIX") or Path(session.config.rootpath) / ".pytest_cache" /
                "zoo-matrix.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"generated": datetime.date.today().isoformat(),
            "versions": ", ".join(f"{p} {md.version(p)}" for p in ("torch", "onnxruntime", "torch-pruning"))}
    data = zm.merge(zm.load_matrix(path), _MATRIX_ROWS, meta)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    shipped = zm.load_matrix().get("models", {})
    differs = sorted({f"{m}:{c}" for m, c, o, _ in _MATRIX_ROWS
                      if shipped.get(m, {}).get(c, {}).get("outcome") != o})
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"zoo matrix: {len(_MATRIX_ROWS)} cells written to {path}"
                            + (f"; differ from edgekit/zoo/matrix.json: {', '.join(differs)}" if differs else ""))


@pytest.fixture(scope="session", autouse=True)
def _edgekit_cache(tmp_path_factory):
    """Keep trained baselines of this test session out of the user's cache, shared across tests.

    Under pytest-xdist every worker has its own basetemp below one shared root: the cache goes there, so a
    baseline one worker trained is reused by the other (baselines are written atomically).
    """
    if "EDGEKIT_CACHE" not in os.environ:
        base = tmp_path_factory.getbasetemp()
        root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
        (root / "edgekit-cache").mkdir(exist_ok=True)
        os.environ["EDGEKIT_CACHE"] = str(root / "edgekit-cache")
    yield


@pytest.fixture(scope="session")
def mnist_task():
    from edgekit.data import load_task

    return load_task("mnist")


@pytest.fixture(scope="session")
def small_task():
    """A 32x32 MNIST task for fast checks (same data, smaller images)."""
    from edgekit.data import load_task

    return load_task("mnist", input_size=32)


# ----------------------------------------------------------------------------- a real OpenSSH server on 127.0.0.1

SSHD = "/usr/sbin/sshd"


class SshdServer:
    """An sshd started for this test session: keys, config and known_hosts live in ``root``."""

    def __init__(self, root, port, user, proc):
        self.root, self.port, self.user, self.proc = root, port, user, proc
        self.key = root / "user_ed25519"  # in authorized_keys
        self.wrong_key = root / "wrong_ed25519"  # a valid key the server does not know
        self.known_hosts = root / "known_hosts"  # holds this server's host key
        self.other_known_hosts = root / "known_hosts_other"  # another key for the same [127.0.0.1]:port
        self.empty_known_hosts = root / "known_hosts_empty"

    def spawn(self, name):
        """Another sshd with this one's keys on a new port (a second "board"): (process, port, log file). Its host
        key is added to ``known_hosts``; the caller stops the process."""
        proc, port = _launch_sshd(self.root, self.user, name)
        host_pub = " ".join((self.root / "host_ed25519.pub").read_text().split()[:2])
        with open(self.known_hosts, "a") as f:
            f.write(f"[127.0.0.1]:{port} {host_pub}\n")
        return proc, port, self.root / f"{name}.log"

    def spec(self, **overrides):
        from edgekit.config import SSHSpec

        fields = dict(host="127.0.0.1", port=self.port, user=self.user, key=str(self.key),
                      known_hosts=str(self.known_hosts), workdir=str(self.root / "remote"), connect_timeout=5)
        fields.update(overrides)
        return SSHSpec(**fields)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_sshd(root, user, name="sshd"):
    """Start sshd -D on a free port of 127.0.0.1 with the keys in ``root``: (process, port); log in root/<name>.log."""
    import socket
    import subprocess
    import time

    proc = port = None
    for _attempt in range(3):  # the free port may be taken between probing and binding
        port = _free_port()
        config = root / f"{name}_config"
        config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {root / 'host_ed25519'}
PidFile {root / f'{name}.pid'}
AuthorizedKeysFile {root / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {user}
StrictModes no
UsePAM no
PrintMotd no
LogLevel VERBOSE
""")
        log = open(root / f"{name}.log", "ab")
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            break
    if proc.poll() is not None:
        pytest.fail(f"sshd did not start: {(root / f'{name}.log').read_text()[-2000:]}")
    return proc, port


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH sshd on 127.0.0.1, running as the current user, public-key login only."""
    import getpass
    import shutil
    import subprocess

    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} is absent: install openssh-server to run the SSH tests")
    if shutil.which("ssh-keygen") is None or shutil.which("ssh") is None:
        pytest.skip("ssh / ssh-keygen are absent: install openssh-client to run the SSH tests")
    root = tmp_path_factory.mktemp("sshd")
    for name in ("host_ed25519", "user_ed25519", "wrong_ed25519", "other_host_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(root / name)],
                       check=True, capture_output=True)
    (root / "authorized_keys").write_text((root / "user_ed25519.pub").read_text())
    (root / "remote").mkdir()
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    user = getpass.getuser()
    proc, port = _launch_sshd(root, user)
    host_pub = " ".join((root / "host_ed25519.pub").read_text().split()[:2])
    other_pub = " ".join((root / "other_host_ed25519.pub").read_text().split()[:2])
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    (root / "known_hosts_other").write_text(f"[127.0.0.1]:{port} {other_pub}\n")
    (root / "known_hosts_empty").write_text("")
    server = SshdServer(root, port, user, proc)
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
