"""The svd step: exact factorizations, every zoo model, rank rules, real ONNX Runtime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgekit import zoo
from edgekit.steps.lowrank import factorize
from edgekit.steps import StepContext, build_step
from edgekit.config import DeviceProfile
from edgekit.errors import EdgekitError
from test_prune import _fresh, assert_onnx_matches

SPECS = [s.name for s in zoo.list_models()]
# Grouped/depthwise convolutions or custom layers leave too few factorizable MACs for a 70% budget.
LIMITED = {"igcv3", "shufflenetv1-g3", "shufflenetv1-g8", "condensenet-g4c4", "vgg16-dualconv-g4",
           "vgg16-hetconv-p4"}


def _svd(model, task, name, round_to=8, **params):
    ctx = StepContext(task=task, baseline=model, model_name=name, device=DeviceProfile(name="t", prune_round_to=round_to))
    return build_step("svd", params).apply(model, ctx), ctx


@pytest.mark.parametrize("layer, shape, kind, rank", [
    (nn.Conv2d(16, 24, 3, stride=2, padding=1), (2, 16, 17, 19), "spatial", 48),
    (nn.Conv2d(16, 24, (3, 5), stride=(1, 2), padding=(1, 2)), (2, 16, 9, 11), "spatial", 48),
    (nn.Conv2d(8, 12, 3, padding=2, dilation=2, bias=False), (1, 8, 10, 10), "spatial", 24),
    (nn.Conv2d(16, 24, 1, stride=2), (2, 16, 9, 9), "pointwise", 16),
    (nn.Linear(30, 20), (4, 30), "linear", 20),
])
def test_full_rank_factorization_is_exact(layer, shape, kind, rank):
    torch.manual_seed(0)
    x = torch.randn(shape)
    pair = factorize(layer, kind, rank)
    with torch.no_grad():
        torch.testing.assert_close(pair(x), layer(x), rtol=1e-4, atol=1e-5)
    if kind == "spatial":  # k x 1 then 1 x k, as AIMET's spatial SVD
        assert pair[0].kernel_size[1] == 1 and pair[1].kernel_size[0] == 1


@pytest.mark.slow
@pytest.mark.zoo_matrix("svd")
@pytest.mark.parametrize("name", SPECS)
def test_every_zoo_model_factorizes_and_exports(name, small_task, tmp_path, record_property):
    model = _fresh(name, small_task)
    out, ctx = _svd(model, small_task, name, macs=0.7)
    info = ctx.info["svd"]
    record_property("macs_ratio", round(info["macs_ratio"], 3))
    record_property("reached", bool(info["reached"]))
    assert info["macs_after"] <= info["macs_before"]
    assert zoo.count_macs(out, small_task.input_shape[1:]) == info["macs_after"]
    if name in LIMITED:
        assert not info["reached"] and any("reaches only" in n for n in ctx.notes)
    else:
        assert info["reached"] and 0.6 <= info["macs_ratio"] <= 0.7, info
    for d in info["layers"]:
        assert d["rank"] % 8 == 0 and d["rank"] < d["full_rank"] and d["macs_ratio"] < 0.9
    assert_onnx_matches(out, small_task, tmp_path)


class _TwoLayer(nn.Module):
    def __init__(self, rank_of_pw: int):
        super().__init__()
        self.c1 = nn.Conv2d(3, 64, 3, padding=1)
        self.pw = nn.Conv2d(64, 64, 1)
        self.pw2 = nn.Conv2d(64, 64, 1)  # full rank: not worth factorizing
        self.fc = nn.Linear(64, 10)
        with torch.no_grad():  # an exactly low-rank 1x1 weight
            a, b = torch.randn(64, rank_of_pw), torch.randn(rank_of_pw, 64)
            self.pw.weight.copy_((a @ b / 8).reshape(64, 64, 1, 1))

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.pw2(torch.relu(self.pw(x))))
        return self.fc(x.mean((2, 3)))


def test_energy_rule_finds_the_rank_and_skips_layers_that_would_cost_more(small_task):
    torch.manual_seed(0)
    model = _TwoLayer(rank_of_pw=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    out, ctx = _svd(model, small_task, "custom", energy=0.999)
    ranks = {d["layer"]: d["rank"] for d in ctx.info["svd"]["layers"]}
    assert ranks == {"pw": 8}  # rank 5 rounded up to round_to; pw2 (full rank) and the classifier untouched
    assert isinstance(out.pw, nn.Sequential) and isinstance(out.pw2, nn.Conv2d) and isinstance(out.fc, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref, rtol=1e-3, atol=1e-4)


def test_round_to_sets_rank_granularity(small_task):
    torch.manual_seed(0)
    out, ctx = _svd(_TwoLayer(rank_of_pw=5).eval(), small_task, "custom", energy=0.999, round_to=16)
    assert [d["rank"] for d in ctx.info["svd"]["layers"]] == [16]
    out, ctx = _svd(_TwoLayer(rank_of_pw=5).eval(), small_task, "custom", energy=0.999, round_to=1)
    assert [d["rank"] for d in ctx.info["svd"]["layers"]] == [5]


def test_macs_budget_is_met_greedily(small_task):
    name = "mobilenetv2"
    model = _fresh(name, small_task)
    out, ctx = _svd(model, small_task, name, macs=0.8)
    info = ctx.info["svd"]
    assert info["reached"] and 0.7 < info["macs_ratio"] <= 0.8
    kinds = {d["kind"] for d in info["layers"]}
    assert kinds <= {"pointwise", "spatial", "linear"}
    _, ctx2 = _svd(_fresh(name, small_task), small_task, name, macs=0.8, layers=["spatial"])
    assert {d["kind"] for d in ctx2.info["svd"]["layers"]} <= {"spatial"}


@pytest.mark.parametrize("params, field", [
    ({"energy": 0}, "energy"), ({"energy": 1}, "energy"), ({"macs": 0}, "macs"), ({"macs": 1.0}, "macs"),
    ({"macs": 2}, "macs"), ({"layers": ["depthwise"]}, "layers.0"), ({"round_to": 0}, "round_to"),
])
def test_bad_params_name_the_field(params, field):
    with pytest.raises(EdgekitError, match=f"Invalid svd step in recipe: '{field}'"):
        build_step("svd", params)


def test_one_rank_rule_only():
    with pytest.raises(EdgekitError, match="not both"):
        build_step("svd", {"energy": 0.9, "macs": 0.7})
    assert build_step("svd", {}).params.energy == 0.9
