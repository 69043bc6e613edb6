"""Model sources: a timm model outside the zoo, the user's .py factory with a checkpoint, an ONNX file, through
compress, benchmark and profile; every malformed source is one line and exit 2, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.errors import EdgekitError
from edgekit.sources import parse_source

runner = CliRunner()

MYNET = '''
import torch
from torch import nn


class MyNet(nn.Module):
    """A user's network: not in any library, with its own head size."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def make_tiny():
    return MyNet(num_classes=10)


def not_a_model():
    return 3


def broken():
    raise RuntimeError("the user's factory failed")
'''
FAST = ("train: {epochs: 0.3}\nvariants:\n  - {format: onnx, precision: fp32}\n"
        "  - {format: onnx, precision: int8, options: {num_calib: 32, search: none}}\naccuracy_budget_pp: 50\n")


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
    """mynet.py, a checkpoint of MyNet, and that model as ONNX with a static and with a dynamic input."""
    d = tmp_path_factory.mktemp("user")
    (d / "mynet.py").write_text(MYNET)
    ns: dict = {}
    exec(compile(MYNET, "mynet", "exec"), ns)
    torch.manual_seed(0)
    net = ns["MyNet"]().eval()
    torch.save(net.state_dict(), d / "mynet.pth")
    x = torch.randn(1, 3, 64, 64)
    torch.onnx.export(net, (x,), str(d / "user.onnx"), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    torch.onnx.export(net, (x,), str(d / "dynamic.onnx"), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n"}})
    recipe = d / "fast.yaml"
    recipe.write_text(FAST)
    (d / "garbage.onnx").write_bytes(b"$(touch pwned)\x00\xff not protobuf" * 40)
    (d / "truncated.onnx").write_bytes((d / "user.onnx").read_bytes()[:500])
    return d


def test_parse_forms(tmp_path):
    (tmp_path / "net.py").write_text("")
    (tmp_path / "m.onnx").write_bytes(b"")
    assert parse_source("shufflenetv2").name == "shufflenetv2-x1.0"
    for ref in ("timm:lcnet_050", "timm/lcnet_050"):
        s = parse_source(ref)
        assert (s.kind, s.arch, s.name, s.slug) == ("timm", "lcnet_050", "timm:lcnet_050", "timm-lcnet_050")
    assert parse_source("torchvision:mobilenet_v3_small").kind == "torchvision"
    s = parse_source(f"{tmp_path}/net.py:MyNet")
    assert (s.kind, s.arch, s.path) == ("python", "MyNet", (tmp_path / "net.py").resolve())
    s = parse_source("mypkg.models:build")
    assert (s.kind, s.module, s.arch) == ("python", "mypkg.models", "build")
    assert parse_source(str(tmp_path / "m.onnx")).kind == "onnx"


@pytest.mark.parametrize("ref, words", [
    ("lcnet_050", "timm:lcnet_050"),  # not in the zoo: the error says how to name it
    ("missing.onnx", "ONNX file not found"),
    ("nowhere/net.py:MyNet", "Python file not found"),
    ("net.py", "name the class or function"),
    ("timm:", "timm:<model name>"),
    ("pkg.mod:1abc", "after ':'"),
])
def test_parse_errors(ref, words):
    with pytest.raises(EdgekitError, match=words):
        parse_source(ref)


def _one_line_exit_2(res, words: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in res.output, res.output


@pytest.mark.parametrize("ref, words", [
    ("{d}/mynet.py:Nope", "has no class or function 'Nope'"),
    ("{d}/mynet.py:not_a_model", "returned a int, not a torch.nn.Module"),
    ("{d}/mynet.py:broken", "RuntimeError: the user's factory failed"),
    ("{d}/missing.py:MyNet", "Python file not found"),
    ("{d}/dynamic.onnx", "give --input-size"),
    ("{d}/garbage.onnx", "as ONNX"),
    ("{d}/truncated.onnx", "as ONNX"),
    ("timm:not_a_timm_model", "timm has no model"),
])
def test_bad_sources_are_one_line(user_files, tmp_path, ref, words):
    out = tmp_path / "run"
    res = runner.invoke(app, ["compress", ref.format(d=user_files), "--out", str(out)])
    _one_line_exit_2(res, words)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_onnx_refuses_torch_steps(user_files, tmp_path):
    res = runner.invoke(app, ["compress", str(user_files / "user.onnx"), "--recipe", "prune50",
                              "--out", str(tmp_path / "run")])
    _one_line_exit_2(res, "need the PyTorch model")
    res = runner.invoke(app, ["compress", str(user_files / "user.onnx"), "--weights", str(user_files / "mynet.pth"),
                              "--out", str(tmp_path / "run")])
    _one_line_exit_2(res, "an ONNX file carries its weights")


@pytest.mark.slow
def test_timm_model_outside_the_zoo_compresses(user_files, tmp_path):
    res = runner.invoke(app, ["compress", "timm:lcnet_035", "--recipe", str(user_files / "fast.yaml"),
                              "--input-size", "32", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["model"] == "timm:lcnet_035"
    origin = rep["model_info"]["origin"]
    assert origin["kind"] == "timm" and origin["arch"] == "lcnet_035" and origin["package"].startswith("timm ")
    assert [v["status"] for v in rep["variants"]] == ["ok", "ok"]
    assert rep["variants"][1]["precision"] == "int8" and rep["variants"][1]["accuracy"] is not None


def test_user_factory_with_checkpoint(user_files, tmp_path):
    """The user's own file and weights: no training; the report hashes both files."""
    res = runner.invoke(app, ["compress", f"{user_files}/mynet.py:MyNet", "--weights", str(user_files / "mynet.pth"),
                              "--recipe", str(user_files / "fast.yaml"), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    origin = rep["model_info"]["origin"]
    import hashlib

    assert origin["file_sha256"] == hashlib.sha256((user_files / "mynet.py").read_bytes()).hexdigest()
    assert origin["weights_sha256"] == hashlib.sha256((user_files / "mynet.pth").read_bytes()).hexdigest()
    assert rep["model_info"]["baseline"]["source"] == "file"
    assert all(v["status"] == "ok" for v in rep["variants"])
    # its own trained head, no --data: judged on the photos by agreement with fp32, nothing trained on digits
    assert rep["task"]["name"] == "photos" and rep["task"]["labelled"] is False
    assert all(v["accuracy"] is None for v in rep["variants"]) and rep["variants"][1]["sqnr_db"] is not None
    assert "unlabelled images" in (tmp_path / "run" / "report.md").read_text()


def test_what_has_no_labels_trains_nothing(user_files, tmp_path):
    """A folder of loose images cannot train a head; a recipe that fine-tunes is refused on the photos."""
    from PIL import Image

    loose = tmp_path / "loose"
    loose.mkdir()
    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 20, 90)).save(loose / f"{i}.png")
    res = runner.invoke(app, ["compress", "shufflenetv2-x0.5", "--data", str(loose), "--out", str(tmp_path / "a")])
    _one_line_exit_2(res, "nothing to train")
    res = runner.invoke(app, ["compress", f"{user_files}/mynet.py:MyNet", "--weights", str(user_files / "mynet.pth"),
                              "--recipe", "prune50", "--out", str(tmp_path / "b")])
    _one_line_exit_2(res, "has no labelled training images")
    labelled = tmp_path / "labelled"
    for c in ("a", "b", "c"):
        (labelled / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (80 * i, 30, 50)).save(labelled / c / f"{i}.png")
    res = runner.invoke(app, ["compress", str(user_files / "user.onnx"), "--data", str(labelled),
                              "--out", str(tmp_path / "c")])
    _one_line_exit_2(res, "outputs 10 classes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled", "loose"]


def test_onnx_file_compresses_and_benchmarks(user_files, tmp_path):
    """An ONNX file: int8 and evaluation work on it; TFLite says why it cannot be made from ONNX."""
    res = runner.invoke(app, ["compress", str(user_files / "user.onnx"), "--recipe", str(user_files / "fast.yaml"),
                              "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["model"] == "user" and rep["model_info"]["source"] == "onnx"
    assert rep["model_info"]["origin"]["file_sha256"]
    fp32, int8 = rep["variants"]
    assert (fp32["status"], int8["status"]) == ("ok", "ok") and int8["agreement"] > 0.5
    assert fp32["params"] > 0 and fp32["macs"] > 0

    from edgekit.pipeline.benchmark import benchmark

    result = benchmark(str(user_files / "user.onnx"), formats=["onnx", "tflite"], runs=5, num_eval=64)
    assert result.row("onnx", "int8").status == "ok"
    tfl = result.row("tflite", "fp32")
    assert tfl.status == "unavailable" and "onnx2tf" in tfl.error


def test_dynamic_onnx_runs_at_the_given_size(user_files):
    from edgekit.export.onnx_source import OnnxModel

    m = OnnxModel.load(user_files / "dynamic.onnx", input_size=48)
    assert m.input_shape == (1, 3, 48, 48) and m.num_classes == 10
    with pytest.raises(EdgekitError, match="takes 64x64"):
        OnnxModel.load(user_files / "user.onnx", input_size=48)


def test_profile_takes_a_source(user_files):
    from edgekit.api import profile

    lat = profile(f"{user_files}/mynet.py:make_tiny", "rpi4", input_size=96)
    assert lat.source == "estimated" and lat.p50 > 0
    assert lat.extra["model"]["exported"] == "fp32 ONNX at (1, 3, 96, 96)"
    assert lat.extra["model"]["source"]["factory"] == "make_tiny"


PRUNE = ("train: {epochs: 0.3}\nsteps:\n  - prune: {macs: 0.6, blocks: 0, iterations: 1, finetune_epochs: 0.1}\n"
         "variants:\n  - {format: onnx, precision: fp32}\naccuracy_budget_pp: 50\n")


@pytest.mark.slow
def test_prune_a_timm_model_outside_the_zoo(user_files, tmp_path):
    """Channel pruning on a library model edgekit has no entry for: its classifier comes from timm's config."""
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(PRUNE)
    res = runner.invoke(app, ["compress", "timm:lcnet_035", "--recipe", str(recipe), "--input-size", "32",
                              "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    base, pruned = rep["variants"]
    assert pruned["status"] == "ok" and pruned["macs"] < 0.75 * base["macs"]
    assert rep["steps"][0]["kind"] == "prune"


@pytest.mark.slow
def test_benchmark_timm_and_user_sources(user_files):
    from edgekit.pipeline.benchmark import benchmark

    for ref, kw in (("timm:lcnet_035", {"input_size": 32}),
                    (f"{user_files}/mynet.py:MyNet", {"weights": str(user_files / "mynet.pth")})):
        result = benchmark(ref, recipe=str(user_files / "fast.yaml"), formats=["onnx"], runs=5, num_eval=64, **kw)
        assert result.model == parse_source(ref).name
        assert [v.status for v in result] == ["ok", "ok"], [v.error for v in result]
