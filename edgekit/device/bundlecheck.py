"""Safe extraction and verification of an edgekit bundle: standard library only, never imports edgekit.

The host (``verify_bundle``, ``edgekit docker``) and the device agent use this one file. A bundle never needs
links, so every symlink and hard link entry is refused, as are absolute paths, ``..``, device and fifo
entries, duplicate names, a member that is both a file and a folder, and archives past the member-count or
size caps (a tar bomb). Every member is checked before the first byte is written; then each file is created
with ``O_EXCL | O_NOFOLLOW`` inside folders that edgekit itself made, so nothing can be written through a
link, even one that appears during extraction.

Bundles keep their files under one top-level folder (``edgekit-<model>-<device>-<id>/``, so ``tar xzf`` does not
spill them); :func:`strip_top` removes exactly that one folder after the full names were checked, and bundles
made before it (files at the top) extract the same way.
"""

import hashlib
import json
import os
import stat
import tarfile

MAX_MEMBERS = 4096
MAX_BYTES = 2 << 30  # 2 GiB unpacked: wheels for two runtimes are ~100 MB
MAX_NAME = 512
HOST_MARKER = ".edgekit-output.json"  # edgekit.fsutil.MARKER: the host marks folders it extracted


class BundleError(Exception):
    """A bundle that must not be installed: unsafe entry, wrong hash, missing or unlisted file."""


def bad_name(name):
    """Why an archive member or manifest name is unsafe, or None."""
    if not name or name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if "\\" in name:
        return "backslash in path"
    if len(name) > MAX_NAME:
        return "name longer than {} characters".format(MAX_NAME)
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "control character in name"
    parts = name.split("/")
    if ".." in parts:
        return "'..' in path"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' path component"
    return None


def _clean(name):
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/") if len(name) > 1 else name


def check_members(members, max_members=MAX_MEMBERS, max_bytes=MAX_BYTES):
    """Refuse the whole archive if any member is unsafe; returns [(clean name, member)] of what to extract."""
    seen, dirs, files, out, total = set(), set(), set(), [], 0
    for i, m in enumerate(members):
        if i >= max_members:
            raise BundleError("more than {} entries: not an edgekit bundle (tar bomb?); nothing was "
                              "extracted".format(max_members))
        name = _clean(m.name)
        if name in ("", ".") and m.isdir():
            continue
        why = bad_name(name)
        if why is None and (m.issym() or m.islnk()):
            why = "links are not allowed in a bundle ({} -> {})".format("symlink" if m.issym() else "hard link",
                                                                       m.linkname)
        if why is None and not (m.isreg() or m.isdir()):
            why = "not a regular file or folder (device, fifo ...)"
        if why is None and name in seen:
            why = "duplicate entry"
        if why is None:
            parents = ["/".join(name.split("/")[:k]) for k in range(1, name.count("/") + 1)]
            if any(p in files for p in parents) or (m.isdir() and name in files) or (m.isreg() and name in dirs):
                why = "entry is both a file and a folder"
        if why is None and m.isreg():
            total += m.size
            if total > max_bytes:
                why = "the bundle unpacks to more than {} MB (tar bomb?)".format(max_bytes >> 20)
        if why is not None:
            raise BundleError("unsafe bundle entry {!r}: {}; nothing was extracted".format(m.name, why))
        seen.add(name)
        (dirs if m.isdir() else files).add(name)
        dirs.update(parents)
        out.append((name, m))
    return out


def strip_top(todo):
    """``[(name, member)]`` of checked members without the one folder every member is under, when there is one.

    The names were checked whole first (a top folder named ``..`` or ``/`` is refused there); the folder's own
    entry is dropped. Members not all under one folder (a bundle without a top folder) are returned as they are.
    """
    tops = set(name.split("/", 1)[0] for name, _ in todo)
    if len(tops) != 1:
        return todo
    top = tops.pop()
    if not any("/" in name for name, _ in todo) or any(name == top and not m.isdir() for name, m in todo):
        return todo
    return [(name[len(top) + 1:], m) for name, m in todo if name != top]


def _mkdir_inside(root, rel):
    """Create folder ``rel`` under ``root`` one component at a time, refusing any component that is not a real
    folder made here (a link planted during extraction is never followed)."""
    path = root
    for part in rel.split("/"):
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise BundleError("unsafe bundle entry {!r}: {} is not a folder".format(rel, part))
    return path


def extract_members(tar_path, into, max_members=MAX_MEMBERS, max_bytes=MAX_BYTES):
    """Extract a checked archive into the empty folder ``into``: regular files and folders only, without the
    bundle's top-level folder (the files land in ``into`` itself)."""
    into = os.path.realpath(into)
    if os.listdir(into):
        raise BundleError("extraction folder {} is not empty".format(into))
    with tarfile.open(tar_path, "r:*") as tar:
        members = []
        for m in tar:  # stop reading headers at the cap instead of loading a bomb's member list
            members.append(m)
            if len(members) > max_members:
                break
        todo = strip_top(check_members(members, max_members, max_bytes))
        for name, m in todo:
            if m.isdir():
                _mkdir_inside(into, name)
                continue
            parent = _mkdir_inside(into, name.rsplit("/", 1)[0]) if "/" in name else into
            path = os.path.join(parent, name.rsplit("/", 1)[-1])
            src = tar.extractfile(m)
            if src is None:
                raise BundleError("bundle entry {!r} has no data".format(m.name))
            mode = 0o755 if m.mode & 0o100 else 0o644
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
            written = 0
            with src, os.fdopen(fd, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    written += len(block)
                    if written > m.size:
                        raise BundleError("bundle entry {!r} holds more data than its header says".format(m.name))
                    dst.write(block)
            os.chmod(path, mode, **({"follow_symlinks": False} if os.chmod in os.supports_follow_symlinks else {}))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_tree(root, strict=True):
    """Check an extracted bundle against its manifest: every hash and size, no missing (and, when ``strict``,
    no unlisted) file, no links. An installed release holds more (its venv), so it is checked with
    ``strict=False``. Returns the manifest (a dict).
    """
    mpath = os.path.join(root, "manifest.json")
    if os.path.islink(mpath) or not os.path.isfile(mpath):
        raise BundleError("not an edgekit bundle: manifest.json is missing")
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except ValueError as exc:
        raise BundleError("manifest.json is not valid JSON: {}".format(exc))
    if not isinstance(manifest, dict) or manifest.get("format") != "edgekit-bundle" \
            or not isinstance(manifest.get("files"), dict):
        raise BundleError("manifest.json is not an edgekit bundle manifest")
    listed = set()
    for rel, meta in sorted(manifest["files"].items()):
        why = bad_name(rel) if isinstance(rel, str) else "not a string"
        if why is None and not isinstance(meta, dict):
            why = "no sha256/size record"
        if why is not None:
            raise BundleError("manifest lists an unsafe path {!r}: {}".format(rel, why))
        path = root
        for part in rel.split("/"):  # no component of a listed file may be a link
            path = os.path.join(path, part)
            if os.path.islink(path):
                raise BundleError("bundle file {} is reached through a link".format(rel))
        if not os.path.isfile(path):
            raise BundleError("bundle file {} is missing (or not a regular file)".format(rel))
        size = os.path.getsize(path)
        if size != meta.get("size"):
            raise BundleError("bundle file {} has {} bytes, the manifest says {}: the bundle was altered or "
                              "truncated".format(rel, size, meta.get("size")))
        digest = sha256_file(path)
        if digest != meta.get("sha256"):
            raise BundleError("sha256 mismatch for {}: the manifest says {}..., the file has {}...; the bundle was "
                              "altered or corrupted".format(rel, str(meta.get("sha256"))[:12], digest[:12]))
        listed.add(rel)
    for dirpath, dirnames, filenames in os.walk(root) if strict else ():
        for fn in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/")
            if rel not in ("manifest.json", HOST_MARKER) and rel not in listed:
                raise BundleError("bundle holds a file its manifest does not list: {}".format(rel))
    return manifest


def manifest_id(manifest_bytes):
    """The bundle id: the first 16 hex digits of manifest.json's sha256 (it covers every file's hash)."""
    return hashlib.sha256(manifest_bytes).hexdigest()[:16]
