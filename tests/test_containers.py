"""The Dockerfile built for real with podman, from Debian bases made on this machine, and the images proven to work.

``docker/make-bases.sh --binfmt`` makes Debian bookworm amd64 and arm64 bases with mmdebstrap (the arm64 one through
qemu binfmt, registered where the machine allows) and imports them into podman; no registry is involved. Then the
commands ``edgekit docker --engine podman --local-bases --host-pip --run`` runs:

- the Raspberry Pi ``runtime`` image (linux/arm64) with a real bundle from ``edgekit deploy --bundle`` (a trained
  ShuffleNetV2's int8 ONNX); ``--smoke`` runs the image's entrypoint (``runner.py predict``) on the bundle's samples
  inside the image's files and compares the outputs with the host's (recorded in the manifest by this machine's
  ONNX Runtime): same argmax, max |diff| within the bundle's atol;
- the fallback where binfmt cannot be registered: an arm64 base made without maintainer scripts (``--no-binfmt``),
  ``runtime-cross`` on it (no RUN step for arm64), and the same smoke test under ``qemu-aarch64 -L``;
- the ``toolkit`` image (linux/amd64, ``.[all]``: torch, ~7.7 GB): edgekit runs in it, and its ONNX Runtime gives
  the host's logits on the bundle's samples.

Needs root, podman, mmdebstrap and qemu-user-static (skipped with the reason otherwise); the toolkit build needs
about 35 GB free in podman's storage and is skipped with the figures when there is less. Build times and image sizes
are printed (``pytest -s``). The images it built are removed afterwards, with the dangling build layers it left; the
bases stay (a rerun reuses them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.xdist_group("containers")]

REPO = Path(__file__).resolve().parents[1]
RUNTIME_TAG = "localhost/edgekit-test-runtime:rpi4"
CROSS_TAG = "localhost/edgekit-test-runtime:rpi4-extract"
TOOLKIT_TAG = "localhost/edgekit-test:toolkit"
EXTRACT_PREFIX = "localhost/edgekit-base-extract"
RECIPE = ("description: container test recipe\ntrain: {epochs: 1}\nvariants:\n  - {format: onnx, precision: fp32}\n"
          "  - {format: onnx, precision: int8, options: {num_calib: 64, search: none}}\naccuracy_budget_pp: 5.0\n")


def missing() -> list:
    """What this machine lacks for the image builds, in words."""
    why = []
    if os.geteuid() != 0:
        why.append("root (mmdebstrap, podman build --isolation chroot, chroot into the images)")
    for tool, package in (("podman", "podman"), ("mmdebstrap", "mmdebstrap"),
                          ("qemu-aarch64-static", "qemu-user-static")):
        if shutil.which(tool) is None:
            why.append(f"{tool} (apt-get install {package})")
    return why


def podman(*args: str) -> str:
    p = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def edgekit(*args: str, env=None, timeout: float = 1800) -> dict:
    """``python -m edgekit ARGS --json`` as a user runs it, from the repository root; its JSON result."""
    p = subprocess.run([sys.executable, "-m", "edgekit", *args, "--json"], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, **(env or {})}, timeout=timeout)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def size_mb(image: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", image)) / 1e6


@pytest.fixture(scope="module")
def storage():
    """Removes what the module built (its tags and the dangling layers its builds left); the bases stay."""
    if missing():
        pytest.skip("the image builds need " + "; ".join(missing()))
    before = set(podman("images", "-q", "--no-trunc", "--filter", "dangling=true").split())
    yield
    for tag in (RUNTIME_TAG, CROSS_TAG, TOOLKIT_TAG):
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)
    for image in set(podman("images", "-q", "--no-trunc", "--filter", "dangling=true").split()) - before:
        subprocess.run(["podman", "rmi", image], capture_output=True)


@pytest.fixture(scope="module")
def bases(storage):
    """docker/make-bases.sh --binfmt: {arch: (image, mode)}, and how long it took."""
    t0 = time.perf_counter()
    p = subprocess.run(["sh", "docker/make-bases.sh", "--arch", "amd64", "--arch", "arm64", "--binfmt"],
                       capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    made = {a: (image, mode) for a, image, mode in (ln.split() for ln in p.stdout.splitlines())}
    seconds = time.perf_counter() - t0
    print(f"\nbases in {seconds:.0f} s: " + ", ".join(f"{image} ({mode}, {size_mb(image):.0f} MB)"
                                                   for image, mode in made.values()))
    print(" | ".join(ln for ln in p.stderr.splitlines() if any(w in ln for w in ("binfmt", "made", "reusing"))))
    return made


@pytest.fixture(scope="module")
def bundle(storage, tmp_path_factory):
    """A real Raspberry Pi bundle: a trained ShuffleNetV2 compressed here, written by ``edgekit deploy --bundle``
    (its aarch64 wheels fetched into a cache of its own, so no other test's pip shares the folder)."""
    from edgekit.pipeline import run

    root = tmp_path_factory.mktemp("containers")
    (root / "deploy.yaml").write_text(RECIPE)
    run("shufflenetv2-x0.5", str(root / "deploy.yaml"), out=root / "run", input_size=32, runs=10)
    res = edgekit("deploy", str(root / "run"), "--device", "rpi4", "--bundle", str(root / "rpi4.tar.gz"),
                  env={"EDGEKIT_CACHE": str(root / "cache")})
    assert res["artifact"] == "model.int8.onnx" and res["device"] == "rpi4", res
    return root / "rpi4.tar.gz"


def test_runtime_image_for_arm64_runs_the_bundle(bases, bundle):
    from edgekit.deployment.containers import binfmt

    emulation, why = binfmt("arm64")
    assert bases["arm64"][1] == ("full" if emulation else "extract"), (bases, why)
    t0 = time.perf_counter()
    res = edgekit("docker", "--device", "rpi4", "--bundle", str(bundle), "--engine", "podman", "--local-bases",
                  "--host-pip", "--tag", RUNTIME_TAG, "--run", "--smoke")
    seconds = time.perf_counter() - t0
    # with qemu binfmt the runtime stage's pip runs emulated; without, the build says so and builds runtime-cross
    assert res["target"] == ("runtime" if emulation else "runtime-cross"), (res["notes"], why)
    assert res["platform"] == "linux/arm64" and res["argv"][:2] == ["podman", "build"]
    if "--isolation" in res["argv"]:  # where podman cannot run containers (here: crun's setrlimit is refused)
        assert any("RUN steps use --isolation chroot" in n for n in res["notes"]), res["notes"]
    assert podman("image", "inspect", "--format", "{{.Architecture}}", RUNTIME_TAG) == "arm64"

    smoke = res["smoke"]
    manifest = json.loads(Path(str(bundle).replace(".tar.gz", ".docker-context"), "manifest.json").read_text())
    assert smoke["model"] == manifest["artifact"]["path"] == "model.int8.onnx"
    assert smoke["launcher"] == ("chroot" if emulation else "qemu")
    assert smoke["matches_host"] and len(smoke["checks"]) == len(manifest["sample"]["inputs"]) > 0, smoke
    import onnxruntime

    assert smoke["expected_by"] == f"onnxruntime {onnxruntime.__version__}"  # the host's outputs, from this machine
    for c in smoke["checks"]:  # the image's own arm64 ONNX Runtime, the version the bundle pins
        assert c["machine"] == "aarch64" and c["runtime"] == f"onnxruntime {manifest['versions']['onnxruntime']}", c
        assert c["argmax"] == c["expected_argmax"] and c["max_abs_diff"] <= smoke["atol"], c
    info = smoke["info"]
    assert info["machine"] == "aarch64" and info["runtimes"]["onnxruntime"] and info["runtimes"]["ai_edge_litert"]
    build = next(s for s in res["steps"] if s["argv"][:2] == ["podman", "build"])
    print(f"\nruntime arm64 ({res['target']}): build {build['seconds']:.0f} s, {size_mb(RUNTIME_TAG):.0f} MB; smoke "
          f"{smoke['seconds']:.0f} s ({smoke['launcher']}), max |diff| "
          f"{max(c['max_abs_diff'] for c in smoke['checks']):.2e}; edgekit docker total {seconds:.0f} s")


def test_arm64_fallback_without_binfmt(bases, bundle):
    """No emulation anywhere: a base of extracted packages, runtime-cross (pip on this machine), qemu -L smoke."""
    from edgekit.deployment import docker_plan
    from edgekit.deployment.containers import run_plan
    from edgekit.deployment.imagecheck import smoke_image

    t0 = time.perf_counter()
    p = subprocess.run(["sh", "docker/make-bases.sh", "--arch", "arm64", "--no-binfmt", "--prefix", EXTRACT_PREFIX],
                       capture_output=True, text=True, cwd=REPO, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["arm64", f"{EXTRACT_PREFIX}:bookworm-arm64", "extract"]
    t_base = time.perf_counter() - t0
    plan = docker_plan("rpi4", bundle=bundle, engine="podman", local_bases=True, host_pip=True, cross=True,
                       tag=CROSS_TAG)
    assert plan.target == "runtime-cross"
    argv = [a.replace("localhost/edgekit-base:bookworm-arm64", f"{EXTRACT_PREFIX}:bookworm-arm64")
            for a in plan.build]
    assert f"PYTHON_BASE={EXTRACT_PREFIX}:bookworm-arm64" in argv
    assert "BUILD_BASE=localhost/edgekit-base:bookworm-amd64" in argv and "BUILDPLATFORM=linux/amd64" in argv
    plan.build = argv
    step, = run_plan(plan, only=[argv])
    assert podman("image", "inspect", "--format", "{{.Architecture}}", CROSS_TAG) == "arm64"
    smoke = smoke_image(CROSS_TAG, launcher="qemu")
    assert smoke["launcher"] == "qemu" and smoke["matches_host"] and len(smoke["checks"]) > 0, smoke
    assert all(c["machine"] == "aarch64" and c["argmax"] == c["expected_argmax"] for c in smoke["checks"])
    print(f"\nfallback: extract base {t_base:.0f} s ({size_mb(EXTRACT_PREFIX + ':bookworm-arm64'):.0f} MB), "
          f"runtime-cross build {step['seconds']:.0f} s ({size_mb(CROSS_TAG):.0f} MB), qemu -L smoke "
          f"{smoke['seconds']:.0f} s")


def test_toolkit_image_for_amd64(bases, bundle, tmp_path):
    from edgekit import __version__
    from edgekit.deployment.bundle import extract_bundle
    from edgekit.deployment.containers import storage_shortfall
    from edgekit.deployment.imagecheck import chroot_argv, mounted

    short = storage_shortfall("podman", "toolkit")
    if short is not None:  # what `edgekit docker --toolkit --run` refuses with (tests/test_docker.py checks that)
        pytest.skip(short)
    res = edgekit("docker", "--toolkit", "--engine", "podman", "--local-bases", "--host-pip", "--tag", TOOLKIT_TAG,
                  "--run", timeout=3000)
    assert res["target"] == "toolkit" and res["platform"] == "linux/amd64"
    assert podman("image", "inspect", "--format", "{{.Architecture}} {{.Config.Entrypoint}}", TOOLKIT_TAG) \
        == "amd64 [edgekit]"
    build = next(s for s in res["steps"] if s["argv"][:2] == ["podman", "build"])
    d = extract_bundle(bundle, tmp_path / "bundle")
    manifest = json.loads((d / "manifest.json").read_text())
    sample = manifest["sample"]
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    with mounted(TOOLKIT_TAG) as root:
        shutil.copytree(d, root / "tmp" / "bundle")
        v = subprocess.run([*chroot_argv(root, True), "edgekit", "version"], capture_output=True, text=True,
                           env=env, timeout=600)
        assert v.returncode == 0 and v.stdout.split() == ["edgekit", __version__], v.stdout + v.stderr
        # the toolkit's own runtime layer (edgekit.runtime, its ONNX Runtime) on the bundle's samples
        code = ("import json, numpy as np\nfrom edgekit.runtime import load_runner\n"
                f"r = load_runner('onnxruntime', '/tmp/bundle/{sample['model']}', threads=1)\n"
                f"outs = [np.asarray(r.run(np.load('/tmp/bundle/' + i))).reshape(-1).tolist() for i in "
                f"{sample['inputs']!r}]\nprint(json.dumps(outs))\n")
        p = subprocess.run([*chroot_argv(root, True), "python3", "-c", code], capture_output=True, text=True,
                           env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
    got = np.asarray(json.loads(p.stdout.strip().splitlines()[-1]), dtype=np.float32)
    want = np.asarray(sample["expected"], dtype=np.float32)
    assert (got.argmax(1) == want.argmax(1)).all() and float(np.abs(got - want).max()) <= 1e-4, (got, want)
    print(f"\ntoolkit amd64: build {build['seconds']:.0f} s, {size_mb(TOOLKIT_TAG) / 1e3:.2f} GB; max |logit diff| "
          f"vs the host {float(np.abs(got - want).max()):.1e}")
