"""The prune step: real Torch-Pruning on every zoo model, real ONNX Runtime, no mocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgekit import zoo
from edgekit.steps.prune import layer_widths
from edgekit.steps import STEPS, StepContext, build_step
from edgekit.config import DeviceProfile, load_recipe
from edgekit.errors import EdgekitError
from edgekit.export.onnx import export_onnx
from edgekit.runtime import load_runner
from edgekit.train import recalibrate_bn

SPECS = [s.name for s in zoo.list_models()]

# Models whose layers are mostly custom modules or channel permutations that Torch-Pruning maps wrongly, and
# that have no removable block: the step keeps those groups whole (dependency check) and says it could not reach
# the budget. (ShuffleNetV1's channel groups are as limited, but removing its residual units reaches the budget.)
LIMITED = {"condensenet-g4c4", "vgg16-dualconv-g4", "vgg16-hetconv-p4"}


def _ctx(task, model, name, round_to=8):
    return StepContext(task=task, baseline=model, model_name=name, device=DeviceProfile(name="t", prune_round_to=round_to))


def _prune(model, task, name, device_round_to=8, **params):
    ctx = _ctx(task, model, name, device_round_to)
    params = {"macs": 0.5, "finetune_epochs": 0, "recalibrate": False, **params}
    out = build_step("prune", params).apply(model, ctx)
    return out, ctx


def assert_onnx_matches(model, task, tmp_path, n=3):
    x, _ = task.arrays("eval", limit=n)
    path = export_onnx(model, tmp_path / "m.onnx", task.input_shape)
    runner = load_runner("onnxruntime", path, threads=1)
    got = np.concatenate([runner.run(x[i:i + 1]) for i in range(n)])
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape == (n, task.num_classes)
    scale = float(np.abs(ref).max())
    assert scale > 1e-6, "outputs too small to compare meaningfully"
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * max(1.0, scale))


def _fresh(name, task):
    torch.manual_seed(0)
    m = zoo.create(name, num_classes=task.num_classes)
    return recalibrate_bn(m, task, num_batches=1, batch_size=32)  # realistic activations for the comparisons


def test_steps_are_registered_by_importing_the_registry():
    assert {"prune", "distill", "svd"} <= set(STEPS)


@pytest.mark.slow
@pytest.mark.zoo_matrix("prune50")
@pytest.mark.parametrize("name", SPECS)
def test_every_zoo_model_prunes_and_exports(name, small_task, tmp_path, record_property):
    model = _fresh(name, small_task)
    before = layer_widths(model)
    recipe = next(s for s in load_recipe("prune50").steps if s.kind == "prune").params  # blocks, then channels
    pruned, ctx = _prune(model, small_task, name, **{**recipe, "iterations": 1, "finetune_epochs": 0})
    info = ctx.info["prune"]
    record_property("macs_ratio", round(info["macs_ratio"], 3))
    record_property("reached", bool(info["reached"]))
    assert info["macs_after"] <= info["macs_before"]
    if name in LIMITED:
        assert info["reached"] is False and any("could only be pruned" in n for n in ctx.notes)
    else:
        assert info["reached"] and info["macs_ratio"] <= 0.5, info
        assert info["macs_ratio"] >= 0.3  # close to the budget, not far past it
    for layer, (cin, cout) in layer_widths(pruned).items():  # round_to: every pruned output width is a multiple
        if before[layer][1] != cout:
            assert cout % 8 == 0, (layer, before[layer], cout)
    assert_onnx_matches(pruned, small_task, tmp_path)


def test_round_to_follows_the_device_and_can_be_overridden(small_task):
    name = "shufflenetv2-x1.0"  # branch width 58: not a multiple of 8 or 16
    model = _fresh(name, small_task)
    before = layer_widths(model)
    for round_to, override in ((16, None), (8, 32)):
        params = {"round_to": override} if override else {}
        pruned, ctx = _prune(_fresh(name, small_task), small_task, name, device_round_to=round_to, **params)
        want = override or round_to
        assert ctx.info["prune"]["round_to"] == want
        changed = [(n, w) for n, w in layer_widths(pruned).items() if before[n][1] != w[1]]
        assert len(changed) > 10
        assert all(w[1] % want == 0 for _, w in changed), changed


def test_shufflenetv2_keeps_block_widths_and_prunes_branch_internals(small_task, tmp_path):
    name = "shufflenetv2-x1.0"
    model = _fresh(name, small_task)
    before = layer_widths(model)
    pruned, ctx = _prune(model, small_task, name)
    assert ctx.info["prune"]["adapter"] == "shufflenetv2-branches"
    after = layer_widths(pruned)
    for n, w in before.items():
        if ".branch2.0" in n:  # block input -> inner channels
            assert after[n][0] == w[0] and after[n][1] < w[1]
        if ".branch2.5" in n or ".branch1." in n:  # block outputs stay
            assert after[n][1] == w[1]
    assert after["conv5.0"][1] < before["conv5.0"][1] and after["fc"][1] == 10
    assert_onnx_matches(pruned, small_task, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["global", "per-layer"])
@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "taylor"])
def test_criteria_and_scopes(criterion, scope, small_task, tmp_path):
    name = "mobilenetv3-small"  # hard-swish, squeeze-excitation, depthwise
    pruned, ctx = _prune(_fresh(name, small_task), small_task, name, criterion=criterion, scope=scope)
    info = ctx.info["prune"]
    assert info["criterion"] == criterion and info["scope"] == scope
    assert info["reached"] and 0.3 <= info["macs_ratio"] <= 0.5
    assert_onnx_matches(pruned, small_task, tmp_path)


def test_params_budget_and_ignored_layers(small_task):
    name = "mobilenetv2"
    model = _fresh(name, small_task)
    before = layer_widths(model)
    pruned, ctx = _prune(model, small_task, name, macs=None, params=0.6, ignore=["features.2"])
    info = ctx.info["prune"]
    assert info["params_ratio"] <= 0.6 and info["target"] == {"params": 0.6}
    after = layer_widths(pruned)
    assert after["features.2.conv.0.0"][1] == before["features.2.conv.0.0"][1]  # ignored: outputs stay
    assert after["features.3.conv.0.0"][1] < before["features.3.conv.0.0"][1]
    assert after["classifier.1"][1] == 10


def test_dependency_check_keeps_mis_mapped_groups_whole(small_task, tmp_path):
    """A channel permutation (index_select) that Torch-Pruning maps as identity: that group is left whole."""

    class Permuted(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
            self.register_buffer("perm", torch.randperm(32, generator=torch.Generator().manual_seed(0)))
            self.c2, self.b2 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
            self.c3, self.b3 = nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = torch.relu(self.b1(self.c1(x))).index_select(1, self.perm)
            x = torch.relu(self.b2(self.c2(x)))
            return self.fc(torch.relu(self.b3(self.c3(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = recalibrate_bn(Permuted(), small_task, num_batches=1)
    pruned, ctx = _prune(model, small_task, "custom")
    assert ctx.info["prune"]["groups_rejected"] == ["c1"]
    assert pruned.c1.out_channels == 32 and pruned.c2.out_channels < 32
    assert_onnx_matches(pruned, small_task, tmp_path)


def test_grouped_convolutions_prune_in_equal_slices(small_task, tmp_path):
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32)
            self.c2, self.b2 = nn.Conv2d(32, 64, 3, padding=1, groups=4), nn.BatchNorm2d(64)
            self.c3, self.b3 = nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = torch.relu(self.b1(self.c1(x)))
            x = torch.relu(self.b2(self.c2(x)))
            return self.fc(torch.relu(self.b3(self.c3(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = recalibrate_bn(Grouped(), small_task, num_batches=1)
    pruned, ctx = _prune(model, small_task, "custom")
    assert ctx.info["prune"]["reached"]
    assert pruned.c2.groups == 4 and pruned.c2.in_channels % 4 == 0 and pruned.c2.out_channels % 8 == 0
    assert pruned.c2.out_channels < 64 or pruned.c1.out_channels < 32
    assert_onnx_matches(pruned, small_task, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shufflenetv2-x0.5", "mobilenetv2"])
def test_prune_then_svd_and_svd_then_prune(name, small_task, tmp_path):
    for order in (("prune", "svd"), ("svd", "prune")):
        model = _fresh(name, small_task)
        ctx = _ctx(small_task, model, name)
        params = {"prune": {"macs": 0.6, "finetune_epochs": 0, "recalibrate": False}, "svd": {"macs": 0.8}}
        base = zoo.count_macs(model, small_task.input_shape[1:])
        for kind in order:
            model = build_step(kind, params[kind]).apply(model, ctx)
        assert zoo.count_macs(model, small_task.input_shape[1:]) < 0.6 * base
        assert {"prune", "svd"} <= set(ctx.info)
        assert_onnx_matches(model, small_task, tmp_path)


@pytest.mark.parametrize("params, field", [
    ({"macs": 0}, "macs"), ({"macs": 1}, "macs"), ({"macs": 1.5}, "macs"), ({"params": 0}, "params"),
    ({"params": 1.0}, "params"), ({"criterion": "entropy"}, "criterion"), ({"scope": "local"}, "scope"),
    ({"iterations": 0}, "iterations"), ({"round_to": 0}, "round_to"), ({"finetune_epochs": -1}, "finetune_epochs"),
    ({"typo": 1}, "typo"),
])
def test_bad_params_name_the_field(params, field):
    with pytest.raises(EdgekitError, match=f"Invalid prune step in recipe: '{field}'"):
        build_step("prune", params)


def test_both_budgets_is_an_error_and_default_is_half_the_macs():
    with pytest.raises(EdgekitError, match="not both"):
        build_step("prune", {"macs": 0.5, "params": 0.5})
    assert build_step("prune", {}).params.macs == 0.5


def test_unknown_ignore_pattern_is_a_clear_error(small_task):
    with pytest.raises(EdgekitError, match="'ignore' pattern 'featurez.*' matches no layer"):
        _prune(_fresh("mobilenetv2", small_task), small_task, "mobilenetv2", ignore=["featurez.*"])


def test_recipe_file_with_bad_prune_params_fails_on_load(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - prune: {macs: 1.2}\n")
    with pytest.raises(EdgekitError, match=r"bad.yaml.*'macs'.*less than 1"):
        load_recipe(str(bad))
    for name in ("prune50", "svd", "distill", "edge"):
        assert load_recipe(name).steps


@pytest.mark.slow
def test_iterative_pruning_with_finetune_recovers_accuracy(small_task):
    """Half the MACs in two steps with half an epoch of fine-tuning after each, against the same two steps with
    BatchNorm re-estimated only. On this one-epoch baseline (top-1 0.5-0.66) the fine-tuned model came out
    0-17 points below it over six training trajectories (three seeds, NCHW and channels_last), the other at
    chance (0.08-0.16)."""
    import copy

    from edgekit.evaluate import top1
    from edgekit.train import FitConfig, fit, predict

    name = "shufflenetv2-x0.5"
    torch.manual_seed(0)
    model = fit(zoo.create(name, num_classes=10), small_task, FitConfig(epochs=1, lr=1e-2))
    labels = small_task.arrays("eval")[1]
    acc0 = top1(predict(model, small_task), labels)
    untuned, _ = _prune(copy.deepcopy(model), small_task, name, iterations=2, recalibrate=True)
    pruned, ctx = _prune(model, small_task, name, iterations=2, finetune_epochs=0.5)
    info = ctx.info["prune"]
    assert [s["iteration"] for s in info["iterations"]] == [1, 2]
    assert info["iterations"][0]["macs"] > info["iterations"][1]["macs"]
    assert info["macs_ratio"] <= 0.5
    acc1, acc_untuned = top1(predict(pruned, small_task), labels), top1(predict(untuned, small_task), labels)
    assert acc0 > 0.5 and acc1 > acc0 - 0.2 and acc1 > acc_untuned + 0.25, (acc0, acc1, acc_untuned)
