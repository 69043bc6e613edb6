"""Hostile bundles, built in the test: every one is refused and nothing is written outside a temporary folder.

Each archive is tried through the three readers that share edgekit/device/bundlecheck.py: the host's
``verify_bundle`` (what ``edgekit deploy BUNDLE --host`` runs first), ``edgekit docker --bundle`` (without
``--run``) and the device-side extractor run as a plain file by a Python that cannot import edgekit.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgekit.device import DEVICE_DIR
from edgekit.errors import EdgekitError

SENTINEL = "edgekit-escape-sentinel"


def _info(name, kind=tarfile.REGTYPE, link="", data=b""):
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.size, ti.mode = kind, link, len(data) if kind == tarfile.REGTYPE else 0, 0o644
    return ti, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _manifest():
    body = b"hello"
    import hashlib

    return json.dumps({"format": "edgekit-bundle", "files": {"ok.txt": {"sha256": hashlib.sha256(body).hexdigest(),
                                                                        "size": len(body)}}}).encode(), body


def under(folder: str, entries: list) -> list:
    """The entries with every name (not link targets) under ``folder``, as a bundle's top-level folder puts them."""
    if not folder:
        return entries
    for ti, _ in entries:
        ti.name = f"{folder}/{ti.name}"
    return entries


def hostile(kind: str, depth: int, folder: str = "") -> list:
    """Entries of one attack (under the top-level ``folder`` when given); ``depth`` is how many folders up the temp
    folder sits from /."""
    return under(folder, _hostile(kind, depth + (1 if folder else 0)))


def _hostile(kind: str, depth: int) -> list:
    manifest, body = _manifest()
    good = [_info("manifest.json", data=manifest), _info("ok.txt", data=body)]
    up = "/".join([".."] * (depth + 2))
    sym, hard, reg = tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.REGTYPE
    if kind == "symlink-chain":  # links whose targets are extracted later climb one level each, to /
        chain = [_info("a", sym, "."), _info("up1", sym, "a/..")]
        chain += [_info(f"up{i}", sym, f"up{i - 1}/..") for i in range(2, depth + 3)]
        return good + chain + [_info(f"up{depth + 2}/{SENTINEL}", data=b"pwned")]
    if kind == "link-then-file":  # a file written through an aliased folder link
        return good + [_info("sub", tarfile.DIRTYPE), _info("sub/x", sym, f"{up}/{SENTINEL}"), _info("s", sym, "sub"),
                       _info("s/x", data=b"pwned")]
    if kind == "dir-link":
        return good + [_info("d", sym, up), _info(f"d/{SENTINEL}", data=b"pwned")]
    if kind == "hardlink-outside":
        return good + [_info("h", hard, "/etc/passwd")]
    if kind == "hardlink-missing":
        return good + [_info("h", hard, "no-such-member")]
    if kind == "absolute":
        return good + [_info(f"/tmp/{SENTINEL}", data=b"pwned")]
    if kind == "dotdot":
        return good + [_info(f"{up}/{SENTINEL}", data=b"pwned")]
    if kind == "device":
        return good + [_info("dev", tarfile.CHRTYPE)]
    if kind == "fifo":
        return good + [_info("fifo", tarfile.FIFOTYPE)]
    if kind == "duplicate":
        return good + [_info("ok.txt", data=b"other")]
    if kind == "file-and-folder":
        return good + [_info("ok.txt/inner", data=b"x")]
    if kind == "bomb":  # more members than any bundle has
        return good + [_info(f"f/{i}", data=b"") for i in range(5000)]
    raise AssertionError(kind)


KINDS = ["symlink-chain", "link-then-file", "dir-link", "hardlink-outside", "hardlink-missing", "absolute", "dotdot",
         "device", "fifo", "duplicate", "file-and-folder", "bomb"]


def write(path: Path, entries) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for ti, data in entries:
            t.addfile(ti, data)
    return path


def snapshot(*roots: Path) -> set:
    seen = set()
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            seen.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return seen


@pytest.fixture
def arena(tmp_path):
    """A folder nested a few levels down, and a function that says whether anything escaped it."""
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    # the attacks aim at the folders above the extraction folder, up to /: none may gain the sentinel file, and
    # the test's own tree may gain nothing outside work/ (other processes may write to /tmp meanwhile)
    ancestors = [work.parent, *work.parent.parents]
    before = {p for p in snapshot(tmp_path) if not p.startswith(str(work))}

    def escaped():
        after = {p for p in snapshot(tmp_path) if not p.startswith(str(work))}
        return [str(p / SENTINEL) for p in ancestors if os.path.lexists(p / SENTINEL)] + sorted(after - before)

    return work, escaped


TOP = "edgekit-m-rpi4-0123abcd"  # bundles keep their files under one top-level folder, which extraction drops


@pytest.mark.parametrize("folder", ["", TOP])
@pytest.mark.parametrize("kind", KINDS)
def test_verify_bundle_refuses_and_writes_nothing(kind, folder, arena):
    from edgekit.deployment.bundle import verify_bundle

    work, escaped = arena
    tar = write(work / "evil.tar.gz", hostile(kind, len(work.parts), folder))
    with pytest.raises(EdgekitError, match="Refusing bundle"):
        verify_bundle(tar)
    assert escaped() == []
    assert sorted(os.listdir(work)) == ["evil.tar.gz"]


DEVICE_EXTRACT = ("import runpy, sys; g = runpy.run_path(sys.argv[1]); "
                  "assert 'edgekit' not in sys.modules\n"
                  "try:\n g['extract_members'](sys.argv[2], sys.argv[3]); g['verify_tree'](sys.argv[3])\n"
                  "except g['BundleError'] as e:\n print('REFUSED', e); sys.exit(7)\n")


def device_extract(tar: Path, into: Path, cwd: Path) -> subprocess.CompletedProcess:
    """bundlecheck.py's extract_members + verify_tree as the device agent runs them: a plain file, no edgekit."""
    return subprocess.run([sys.executable, "-I", "-S", "-c", DEVICE_EXTRACT, str(DEVICE_DIR / "bundlecheck.py"),
                           str(tar), str(into)], capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.mark.parametrize("folder", ["", TOP])
@pytest.mark.parametrize("kind", KINDS)
def test_device_side_extractor_refuses_without_edgekit(kind, folder, arena):
    """The device agent's extractor is bundlecheck.py run as a plain file, with edgekit not importable."""
    work, escaped = arena
    tar = write(work / "evil.tar.gz", hostile(kind, len(work.parts), folder))
    into = work / "into"
    into.mkdir()
    proc = device_extract(tar, into, work)
    assert proc.returncode == 7, proc.stdout + proc.stderr
    assert os.listdir(into) == []  # checked before anything was created
    assert escaped() == []


@pytest.mark.parametrize("folder", ["..", "/", "../..", "a/..", "/tmp", "..\\x"])
def test_hostile_top_folder_is_refused(folder, arena):
    """A top-level folder is dropped only after the whole names were checked: ``..`` or ``/`` never lands outside."""
    from edgekit.deployment.bundle import verify_bundle

    work, escaped = arena
    manifest, body = _manifest()
    entries = [_info(f"{folder}/{SENTINEL}", data=manifest), _info(f"{folder}/manifest.json", data=manifest),
               _info(f"{folder}/ok.txt", data=body)]
    tar = write(work / "evil.tar.gz", entries)
    with pytest.raises(EdgekitError, match="Refusing bundle.*unsafe bundle entry"):
        verify_bundle(tar)
    into = work / "into"
    into.mkdir()
    proc = device_extract(tar, into, work)
    assert proc.returncode == 7 and "unsafe bundle entry" in proc.stdout, proc.stdout + proc.stderr
    assert os.listdir(into) == [] and escaped() == []
    assert sorted(os.listdir(work)) == ["evil.tar.gz", "into"]


@pytest.mark.parametrize("folder", [TOP, "", "./" + TOP])
def test_bundles_with_and_without_a_top_folder_extract_alike(folder, tmp_path):
    """The top folder is dropped (host and device alike); bundles made before it, with files at the top, still
    extract; a folder with the folder's own entry too."""
    from edgekit.deployment.bundle import read_manifest, verify_bundle

    manifest, body = _manifest()
    entries = ([_info(folder, tarfile.DIRTYPE)] if folder else []) + under(
        folder, [_info("manifest.json", data=manifest), _info("ok.txt", data=body)])
    tar = write(tmp_path / "b.tar.gz", entries)
    assert verify_bundle(tar)[0]["files"] == json.loads(manifest)["files"]
    assert read_manifest(tar)[0]["format"] == "edgekit-bundle"
    into = tmp_path / "into"
    into.mkdir()
    proc = device_extract(tar, into, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(os.listdir(into)) == ["manifest.json", "ok.txt"]


def test_a_single_file_is_not_taken_for_a_top_folder():
    from edgekit.device.bundlecheck import check_members, strip_top

    one = [_info("manifest.json", data=b"{}")[0]]
    assert [n for n, _ in strip_top(check_members(one))] == ["manifest.json"]
    mixed = [_info("a/x", data=b"1")[0], _info("b", data=b"2")[0]]
    assert [n for n, _ in strip_top(check_members(mixed))] == ["a/x", "b"]


@pytest.mark.parametrize("kind", ["symlink-chain", "link-then-file", "hardlink-missing", "bomb"])
def test_edgekit_docker_refuses_with_one_line(kind, arena):
    work, escaped = arena
    tar = write(work / "evil.tar.gz", hostile(kind, len(work.parts)))
    proc = subprocess.run([sys.executable, "-m", "edgekit", "docker", "--device", "rpi4", "--bundle", str(tar)],
                          capture_output=True, text=True, cwd=work, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Refusing bundle" in lines[0], proc.stderr
    assert escaped() == []
    assert sorted(os.listdir(work)) == ["evil.tar.gz"]


def test_size_cap_is_checked_from_the_headers():
    from edgekit.device.bundlecheck import BundleError, check_members

    big = tarfile.TarInfo("big.bin")
    big.size = 3 << 30
    with pytest.raises(BundleError, match="tar bomb"):
        check_members([big])


def test_docker_context_never_replaces_a_folder_edgekit_did_not_write(tmp_path):
    """``edgekit docker --bundle X.tar.gz`` extracts to X.docker-context: a folder of the user's there is kept."""
    from edgekit.deployment import _bundle_context

    manifest, body = _manifest()
    tar = write(tmp_path / "x.tar.gz", [_info("manifest.json", data=manifest), _info("ok.txt", data=body)])
    mine = tmp_path / "x.docker-context"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(EdgekitError, match="not a folder edgekit wrote"):
        _bundle_context(tar)
    assert (mine / "precious.txt").read_text() == "keep me"
    mine.joinpath("precious.txt").unlink()
    mine.rmdir()
    assert (_bundle_context(tar) / "ok.txt").read_bytes() == body
    assert (_bundle_context(tar) / "ok.txt").read_bytes() == body  # its own folder is replaced


@pytest.mark.parametrize("folder, stage", [(TOP, "install"), ("..", "verify")])
def test_device_agent_takes_a_bundle_under_its_top_folder(folder, stage, tmp_path):
    """The agent (a plain file, no edgekit) verifies a bundle whose files sit under one top folder and goes on to
    install it (install.sh here exits 7); a top folder named ``..`` stops it at verify."""
    import hashlib

    from test_deploy_atomic import agent, upload

    files = {"install.sh": b"exit 7\n", "runner.py": b"", "model.onnx": b"x"}
    manifest = json.dumps({"format": "edgekit-bundle", "python_version": "3.11", "artifact": {"path": "model.onnx"},
                           "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                                     for n, d in files.items()}}, sort_keys=True).encode()
    entries = [_info(folder, tarfile.DIRTYPE)] + [_info(f"{folder}/{n}", data=d)
                                                  for n, d in {**files, "manifest.json": manifest}.items()]
    tar = write(tmp_path / "b.tar.gz", entries)
    root = tmp_path / "root"
    upload(root, tar, hashlib.sha256(manifest).hexdigest()[:16], "b" * 16)
    rec = agent("wait", root, "b" * 16, 60)
    assert rec["state"] == "failed" and rec["stage"] == stage, rec
    if stage == "install":
        assert rec["message"].startswith("install.sh exited with 7"), rec
    else:
        assert "unsafe bundle entry" in rec["message"], rec
    assert not (tmp_path / SENTINEL).exists() and sorted(os.listdir(tmp_path)) == ["b.tar.gz", "root"]
