"""Output folders that appear whole or not at all, and that ``--force`` may replace only when edgekit wrote them.

Every folder edgekit publishes carries a marker file (:data:`MARKER`). ``--force`` replaces a folder only if it
holds that marker (or is a run folder of an edgekit version from before the marker), so ``--out ~/project
--force`` can never delete a project. The swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux, so the
destination is never missing; elsewhere it is two renames, and a swap cut between them is undone by
:func:`recover` at the next run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .errors import EdgekitError

MARKER = ".edgekit-output.json"
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def written_by_edgekit(folder: Path) -> bool:
    """True for a folder edgekit published: its marker is a regular file, or (older runs) report.json says so."""
    marker = folder / MARKER
    if marker.is_file() and not marker.is_symlink():
        return True
    report = folder / "report.json"
    if report.is_file() and not report.is_symlink() and all(p.is_file() and not p.is_symlink() for p in
                                                             folder.iterdir()):
        try:
            return "edgekit_version" in json.loads(report.read_text())
        except (ValueError, OSError, UnicodeDecodeError):
            return False
    return False


def _old_copies(out: Path):
    return sorted(out.parent.glob(f".{out.name}.old-*")) if out.parent.is_dir() else []


def recover(out: Path) -> None:
    """Finish or undo a swap an interrupt cut short: restore the old copy if ``out`` is missing, else drop it."""
    for old in _old_copies(out):
        if not written_by_edgekit(old):
            continue
        if not out.exists():
            os.replace(old, out)
        else:
            shutil.rmtree(old, ignore_errors=True)


def check_replaceable(out: Path, force: bool, what: str = "Output folder") -> None:
    """Refuse before any work: ``out`` exists and ``--force`` is not given, or it is not edgekit's to replace."""
    out = Path(out)
    recover(out)
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise EdgekitError(f"{what} {out} already exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise EdgekitError(f"{out} exists and is not a folder; --force replaces only folders edgekit wrote")
    if not written_by_edgekit(out):
        raise EdgekitError(f"Refusing to replace {out}: it is not a folder edgekit wrote (no {MARKER}); "
                           f"choose another --out, or remove it yourself")


def make_temp_dir(out: Path) -> Path:
    """A temporary folder beside ``out`` (same file system, so the final rename is atomic), usual permissions."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the published folder gets the usual permissions
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    return rc == 0


def publish(tmp: Path, out: Path, kind: str = "run", meta: Optional[dict] = None) -> None:
    """Mark ``tmp`` as edgekit's and move it to ``out``, replacing an edgekit folder there without a gap."""
    from . import __version__

    (tmp / MARKER).write_text(json.dumps({"written_by": "edgekit", "version": __version__, "kind": kind,
                                          **(meta or {})}) + "\n")
    if not out.exists():
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):  # out now holds the new tree, tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    trash = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, trash)
    os.replace(tmp, out)  # an interrupt between the two renames is undone by recover() at the next run
    shutil.rmtree(trash, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file under a unique temporary name in its folder, then rename: no reader sees half a file, and two
    processes (even two containers whose PIDs are both 1) never share a temporary name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
