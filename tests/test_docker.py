"""The Dockerfile without a Docker engine: it parses, its COPY sources exist, its stages pin the bundle's versions,
and ``edgekit docker`` builds the right ``docker buildx`` command for each device."""

from __future__ import annotations

import glob
import json
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from edgekit.errors import EdgekitError

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
KEYWORDS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER", "WORKDIR",
            "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}


# ----------------------------------------------------------------------------- a small Dockerfile parser


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    flags: Dict[str, str] = field(default_factory=dict)
    words: List[str] = field(default_factory=list)  # args without --flags, shell-split (JSON form decoded)


@dataclass
class Stage:
    name: Optional[str]
    base: str
    index: int
    platform: Optional[str]
    instructions: List[Instruction] = field(default_factory=list)


def parse_dockerfile(text: str):
    """(global ARG instructions, stages, parser directives). Raises ValueError with the line on bad syntax."""
    directives: Dict[str, str] = {}
    logical: List[tuple] = []
    buf, start, in_header = "", 0, True
    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        m = re.match(r"^#\s*(\w+)\s*=\s*(\S+)\s*$", line)
        if in_header and m and not buf:
            directives[m.group(1).lower()] = m.group(2)
            continue
        if line.lstrip().startswith("#"):
            in_header = False
            continue  # comments, also inside continuation lines
        if not line.strip():
            if not buf:
                in_header = False
            continue
        in_header = False
        if not buf:
            start = no
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append((start, buf + line))
        buf = ""
    if buf:
        raise ValueError(f"line {start}: continuation at end of file")
    global_args: List[Instruction] = []
    stages: List[Stage] = []
    for no, text_ in logical:
        keyword, _, args = text_.strip().partition(" ")
        keyword = keyword.upper()
        if keyword not in KEYWORDS:
            raise ValueError(f"line {no}: unknown instruction {keyword}")
        args = args.strip()
        ins = Instruction(keyword, args, no)
        if args.startswith("["):
            try:
                ins.words = json.loads(args)
            except ValueError as exc:
                raise ValueError(f"line {no}: bad JSON form: {exc}") from None
        else:
            words = shlex.split(args, posix=True) if keyword not in ("RUN",) else args.split()
            while words and words[0].startswith("--") and keyword in ("FROM", "COPY", "ADD", "RUN"):
                k, _, v = words.pop(0)[2:].partition("=")
                ins.flags[k] = v
            ins.words = words
        if keyword == "FROM":
            w = ins.words
            if len(w) not in (1, 3) or (len(w) == 3 and w[1].upper() != "AS"):
                raise ValueError(f"line {no}: FROM image [AS name]")
            stages.append(Stage(w[2] if len(w) == 3 else None, w[0], len(stages), ins.flags.get("platform")))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"line {no}: only ARG may come before the first FROM")
            global_args.append(ins)
        else:
            stages[-1].instructions.append(ins)
    if not stages:
        raise ValueError("no FROM")
    return global_args, stages, directives


def arg_defaults(args: List[Instruction], expand: bool = False) -> Dict[str, Optional[str]]:
    """ARG name -> default; ``expand``: with the ${NAME}s of earlier ARGs replaced, as the builders do."""
    out: Dict[str, Optional[str]] = {}
    for a in args:
        name, eq, default = a.args.partition("=")
        value = default.strip().strip('"') if eq else None
        if expand and value is not None:
            value = re.sub(r"\$\{(\w+)\}", lambda m: out.get(m.group(1)) or "", value)
        out[name.strip()] = value
    return out


@pytest.fixture(scope="module")
def parsed():
    return parse_dockerfile(DOCKERFILE.read_text())


# ----------------------------------------------------------------------------- the Dockerfile


def test_parser_rejects_bad_files():
    with pytest.raises(ValueError, match="unknown instruction"):
        parse_dockerfile("FROM a\nFORM b\n")
    with pytest.raises(ValueError, match="only ARG"):
        parse_dockerfile("RUN x\nFROM a\n")
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM a\nRUN x \\\n")
    with pytest.raises(ValueError, match="FROM image"):
        parse_dockerfile("FROM a b c d\n")
    g, stages, d = parse_dockerfile("# syntax=docker/dockerfile:1\nARG X=1\nFROM a:${X} AS one\n"
                                    "RUN echo \\\n  # a comment\n  hi\nFROM one\n")
    assert d == {"syntax": "docker/dockerfile:1"} and arg_defaults(g) == {"X": "1"}
    assert [s.name for s in stages] == ["one", None] and stages[0].instructions[0].words == ["echo", "hi"]


def test_dockerfile_stages(parsed):
    global_args, stages, directives = parsed
    assert directives.get("syntax", "").startswith("docker/dockerfile:")
    names = [s.name for s in stages]
    assert len(set(names)) == len(names)
    assert {"toolkit", "runtime", "runtime-arm64", "runtime-jetson", "bundle"} <= set(names)
    declared = set(arg_defaults(global_args))
    for s in stages:
        # FROM refers to an earlier stage or to an image whose ${ARGs} are global
        for var in re.findall(r"\$\{?(\w+)", s.base):
            assert var in declared, f"stage {s.name}: FROM uses undeclared {var}"
        if s.base in names:
            assert names.index(s.base) < s.index, f"stage {s.name} uses a later stage {s.base}"
        local = set(arg_defaults([i for i in s.instructions if i.keyword == "ARG"]))
        for ins in s.instructions:
            if "from" in ins.flags:
                src = ins.flags["from"]
                assert src in names[:s.index], f"line {ins.line}: --from={src} is not an earlier stage"
            if ins.keyword in ("RUN", "ENV", "COPY", "WORKDIR"):
                for var in re.findall(r"\$\{(\w+)\}", ins.args):
                    # a global ARG is only visible in a stage that declares it again
                    assert var in local or var in ("TARGETPLATFORM", "TARGETARCH"), \
                        f"line {ins.line}: ${{{var}}} is not declared in stage {s.name}"
    jetson = next(s for s in stages if s.name == "runtime-jetson")
    assert jetson.base == "${L4T_BASE}"
    toolkit = next(s for s in stages if s.name == "toolkit")
    assert [i.words[-1] for i in toolkit.instructions if i.keyword == "ENTRYPOINT"] == ["edgekit"]


def test_every_copy_source_exists(parsed):
    _, stages, _ = parsed
    checked = 0
    for s in stages:
        for ins in s.instructions:
            if ins.keyword not in ("COPY", "ADD") or "from" in ins.flags:
                continue
            *sources, _dest = ins.words
            assert sources, f"line {ins.line}: COPY needs a source and a destination"
            for src in sources:
                assert not src.startswith(("/", "..")), f"line {ins.line}: {src} leaves the build context"
                assert glob.glob(str(REPO / src)), f"line {ins.line}: COPY source {src} is not in the repository"
                checked += 1
    assert checked >= 4


def test_arg_defaults_are_the_bundle_versions(parsed):
    from edgekit.deployment import versions

    global_args, stages, _ = parsed
    defaults = arg_defaults(global_args, expand=True)
    for name, value in versions.DOCKER_ARGS.items():
        assert defaults.get(name) == value, f"Dockerfile ARG {name}={defaults.get(name)} but versions.py says {value}"
    # no stage pins a runtime version by a literal: they all go through the ARGs
    for s in stages:
        for ins in s.instructions:
            if ins.keyword == "ARG":
                assert "=" not in ins.args, f"line {ins.line}: stage {s.name} overrides the default of {ins.args}"
            assert not re.search(r"(onnxruntime|numpy|ai-edge-litert)==\d", ins.args), \
                f"line {ins.line}: a literal version; use the ARG"
    runtime = next(s for s in stages if s.name == "runtime")
    pip = " ".join(i.args for i in runtime.instructions if i.keyword == "RUN" and "pip install" in i.args)
    for pkg, arg in (("numpy", "NUMPY_VERSION"), ("onnxruntime", "ONNXRUNTIME_VERSION"),
                     ("ai-edge-litert", "LITERT_VERSION")):
        assert f"{pkg}==${{{arg}}}" in pip


@pytest.mark.parametrize("device, platform, target", [
    ("rpi4", "linux/arm64", "runtime"),
    ("rpi5", "linux/arm64", "runtime"),
    ("jetson-orin-nano", "linux/arm64", "runtime-jetson"),
    ("jetson-nano", "linux/arm64", "runtime-jetson"),
    ("desktop-cpu", "linux/amd64", "runtime"),
])
def test_docker_command_per_device(parsed, device, platform, target):
    from edgekit.deployment import docker_cmd, docker_command, versions

    argv = docker_command(device)
    assert argv[:3] == ["docker", "buildx", "build"]
    assert argv[argv.index("--platform") + 1] == platform and argv[argv.index("--target") + 1] == target
    assert target in [s.name for s in parsed[1]]
    build_args = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--build-arg")
    assert build_args["ONNXRUNTIME_VERSION"] == versions.ONNXRUNTIME_VERSION
    assert set(build_args) <= set(arg_defaults(parsed[0]))
    assert argv[argv.index("-t") + 1] == f"edgekit-runtime:{device}" and argv[-1] == "."
    out = docker_cmd(device)
    assert out["ran"] is False and shlex.split(out["command"]) == argv


@pytest.fixture()
def tiny_run(tmp_path):
    """A real (tiny) run folder: an ONNX classifier made with onnx.helper and its report.json."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((12, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], [w])
    run = tmp_path / "run"
    run.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), run / "model.fp32.onnx")
    report = {"model": "tiny", "recipe": "fp32", "device": "desktop-cpu", "task": {"name": "synthetic"},
              "versions": {"onnxruntime": "1.32.0"}, "recommended": {"name": "fp32", "format": "onnx"},
              "recipe_spec": {"accuracy_budget_pp": 0.5},
              "variants": [{"name": "fp32", "format": "onnx", "precision": "fp32", "path": "model.fp32.onnx",
                            "status": "ok", "accuracy": 0.5, "latency_ms": {"p50": 0.1}}]}
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_docker_command_with_a_bundle(tiny_run, tmp_path):
    from edgekit.deployment import docker_command
    from edgekit.deployment.bundle import build_bundle

    tar = build_bundle(tiny_run, "rpi4", tmp_path / "rpi4.tar.gz", fetch_wheels=False)
    argv = docker_command("rpi4", bundle=tar)
    ctx = argv[argv.index("--build-context") + 1]
    assert ctx.startswith("bundle=")
    ctx_dir = Path(ctx.split("=", 1)[1])
    assert ctx_dir == (tmp_path / "rpi4.docker-context").resolve()
    assert (ctx_dir / "manifest.json").is_file() and (ctx_dir / "model.fp32.onnx").is_file()
    manifest = json.loads((ctx_dir / "manifest.json").read_text())
    assert manifest["sample"]["source"] == "seeded random inputs" and manifest["sample"]["expected"]
    assert "ONNXRUNTIME_VERSION=1.32.0" in argv
    assert docker_command("rpi4", bundle=ctx_dir) == argv  # an extracted folder works the same
    with pytest.raises(EdgekitError, match="bundle for rpi4 .aarch64., not desktop-cpu"):
        docker_command("desktop-cpu", bundle=ctx_dir)
    with pytest.raises(EdgekitError, match="Bundle not found"):
        docker_command("rpi4", bundle=tmp_path / "nope.tar.gz")
    with pytest.raises(EdgekitError, match="Unknown device"):
        docker_command("rpi44")


# ----------------------------------------------------------------------------- engines (no build runs here)


@pytest.fixture()
def machine(monkeypatch):
    """Decide what this 'machine' allows: qemu binfmt for foreign arches, and whether podman runs containers."""
    from edgekit.deployment import containers

    state = {"binfmt": True, "run": False}
    monkeypatch.setattr(containers, "binfmt", lambda arch: (state["binfmt"] or arch == containers.host_arch(),
                                                             "qemu-aarch64 is not registered with binfmt_misc"))
    monkeypatch.setattr(containers, "containers_run",
                        lambda image: (state["run"], "crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted"))
    return state


def build_args_of(argv):
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--build-arg")


def test_dockerfile_cross_stage_runs_nothing_on_the_target(parsed):
    _, stages, _ = parsed
    by_name = {s.name: s for s in stages}
    packages, cross = by_name["runtime-packages"], by_name["runtime-cross"]
    assert packages.platform == "$BUILDPLATFORM" and cross.platform == "$TARGETPLATFORM"
    assert not [i for i in cross.instructions if i.keyword == "RUN"]
    assert [i.words[-1] for i in cross.instructions if i.keyword == "ENTRYPOINT"] == ["/opt/edgekit/runner.py"]
    for s in ("toolkit", "runtime", "runtime-cross"):
        assert "${" in by_name[s].base  # every Python stage builds FROM a base build arg


@pytest.mark.parametrize("emulation", [True, False])
def test_podman_plan_from_local_bases(machine, emulation):
    from edgekit.deployment import docker_plan

    machine["binfmt"] = emulation
    plan = docker_plan("rpi4", engine="podman", local_bases=True)
    assert plan.before == [["sh", "docker/make-bases.sh", "--arch", "arm64", "--arch", "amd64", "--binfmt"]]
    argv = plan.build
    assert argv[:4] == ["podman", "build", "--isolation", "chroot"] and "--pull=never" in argv
    assert "crun: setrlimit" in " ".join(plan.notes)
    args = build_args_of(argv)
    assert args["PYTHON_BASE"] == "localhost/edgekit-base:bookworm-arm64"
    assert argv[argv.index("--platform") + 1] == "linux/arm64" and argv[-3:] == ["-t", "edgekit-runtime:rpi4", "."]
    if emulation:
        assert plan.target == "runtime" and "BUILDPLATFORM" not in args
    else:  # no qemu binfmt: the stage whose RUN step runs on this machine, said so
        assert plan.target == "runtime-cross" and argv[argv.index("--target") + 1] == "runtime-cross"
        assert args["BUILDPLATFORM"] == "linux/amd64" and args["BUILD_BASE"] == "localhost/edgekit-base:bookworm-amd64"
        assert any("qemu-aarch64 is not registered" in n and "runtime-cross" in n for n in plan.notes)


def test_podman_runs_containers_where_it_can(machine):
    from edgekit.deployment import docker_plan

    machine["run"] = True
    plan = docker_plan(None, toolkit=True, engine="podman")
    assert plan.build[:4] == ["podman", "build", "--platform", "linux/amd64"] and "--isolation" not in plan.build
    assert plan.target == "toolkit" and plan.tag == "edgekit:toolkit" and plan.before == [] and plan.notes == []
    assert "--pull=never" not in plan.build and build_args_of(plan.build) == {}  # the public base, pulled
    pushed = docker_plan(None, toolkit=True, engine="podman", push=True, tag="registry.example/edgekit:1")
    assert pushed.after == [["podman", "push", "registry.example/edgekit:1"]]


def test_docker_engine_plans_stay_buildx(machine):
    from edgekit.deployment import docker_plan

    plan = docker_plan(None, toolkit=True, engine="docker")
    assert plan.build == ["docker", "buildx", "build", "--platform", "linux/amd64", "--target", "toolkit",
                          "-t", "edgekit:toolkit", "--load", "."]
    cross = docker_plan("rpi5", engine="docker", cross=True)
    assert cross.target == "runtime-cross" and "BUILDPLATFORM" not in build_args_of(cross.build)  # buildx sets it
    machine["binfmt"] = False  # a docker builder's binfmt is its own: the target stays runtime
    assert docker_plan("rpi4", engine="docker").target == "runtime"


@pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (apt-get install podman)")
def test_podman_build_refused_before_it_starts_when_storage_is_short(machine, monkeypatch):
    """podman's real storage folder and its real free space; only the need is raised past it. The plan's first
    command (make-bases) must not have run: nothing is started that the disk cannot finish."""
    from edgekit.deployment import containers, docker_plan

    root, free = containers.storage_free("podman")
    assert root and free is not None and free >= 0
    assert containers.storage_shortfall("podman", "toolkit") is None or free < containers.STORAGE_GB["toolkit"]
    monkeypatch.setitem(containers.STORAGE_GB, "toolkit", free + 1000)
    plan = docker_plan(None, toolkit=True, engine="podman")
    plan.before.insert(0, ["sh", "-c", "exit 7"])  # would fail the run loudly if it were reached
    with pytest.raises(EdgekitError, match=r"toolkit image needs about \d+ GB free in podman's storage .*GB is free"):
        containers.run_plan(plan)
    assert containers.storage_free("docker") == (None, None)


def test_engine_options_refused_with_reasons(machine):
    from edgekit.deployment import docker_cmd, docker_plan

    with pytest.raises(EdgekitError, match="--local-bases needs --engine podman"):
        docker_plan("rpi4", engine="docker", local_bases=True)
    with pytest.raises(EdgekitError, match="No local base for Jetson"):
        docker_plan("jetson-orin-nano", engine="podman", local_bases=True)
    with pytest.raises(EdgekitError, match="takes no --device"):
        docker_plan("rpi4", toolkit=True)
    with pytest.raises(EdgekitError, match="--device DEVICE .* or --toolkit"):
        docker_plan(None)
    with pytest.raises(EdgekitError, match="runtime-jetson has no cross variant"):
        docker_plan("jetson-orin-nano", engine="podman", cross=True)
    with pytest.raises(EdgekitError, match="Unknown engine"):
        docker_plan("rpi4", engine="containerd")
    with pytest.raises(EdgekitError, match="--smoke .* pass --run and --bundle"):
        docker_cmd("rpi4", smoke=True)
    with pytest.raises(EdgekitError, match="--smoke mounts the built image with podman"):
        docker_cmd("rpi4", bundle="rpi4.tar.gz", smoke=True, run=True, engine="docker")


def test_pip_settings_become_build_args_and_read_only_mounts(tmp_path):
    from edgekit.deployment.containers import pip_settings

    (tmp_path / "pypi" / "simple").mkdir(parents=True)
    (tmp_path / "wheels").mkdir()
    listing = (f":env:.find-links='{tmp_path}/wheels'\n"
               f"global.find-links='/elsewhere'\n"
               f"global.extra-index-url='file://{tmp_path}/pypi/simple https://mirror.example/simple'\n"
               f"global.cert='{tmp_path}/ca.pem'\n"
               f"global.timeout='60'\n"
               f"download.index-url='https://ignored.example/simple'\n")
    (tmp_path / "ca.pem").write_text("x")
    args, paths = pip_settings(listing)
    assert args == {"PIP_EXTRA_INDEX_URL": f"file://{tmp_path}/pypi/simple https://mirror.example/simple",
                    "PIP_FIND_LINKS": f"{tmp_path}/wheels", "PIP_CERT": f"{tmp_path}/ca.pem"}
    # the folder index's parent (its ../../files links), the find-links folder the environment names, the cert
    assert paths == [str(tmp_path / "pypi"), str(tmp_path / "wheels"), str(tmp_path / "ca.pem")]
    assert pip_settings("") == ({}, [])


def test_cli_prints_every_command_for_the_engine(machine, monkeypatch):
    from edgekit.cli import app
    from edgekit.deployment import containers
    from typer.testing import CliRunner

    monkeypatch.setattr(containers, "host_pip", lambda: ({"PIP_FIND_LINKS": "/opt/wheels"}, ["/opt/wheels"]))
    res = CliRunner().invoke(app, ["docker", "--device", "rpi4", "--engine", "podman", "--local-bases",
                                   "--host-pip"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stdout.splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "sh docker/make-bases.sh --arch arm64 --arch amd64 --binfmt"
    assert shlex.split(lines[1])[:4] == ["podman", "build", "--isolation", "chroot"]
    assert "--volume /opt/wheels:/opt/wheels:ro" in lines[1] and "PIP_FIND_LINKS=/opt/wheels" in lines[1]
