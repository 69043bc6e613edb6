"""Training under torchrun (real ``torch.distributed.run`` processes, gloo on this CPU): gradients are averaged, the
ranks agree on pruning, only rank 0 writes, a failing or silent rank 0 does not leave the others waiting, and the
training device is chosen or refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from edgekit.cli import app

ROOT = Path(__file__).resolve().parents[1]


def torchrun(args, cwd: Path, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` with this checkout first on the path."""
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
         "OMP_NUM_THREADS": "1", "EDGEKIT_PROGRESS": "off", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


# Prune (with a short fine-tune) then distill, each rank saving what it ended with and a fingerprint of every
# batch its student trained on.
PRUNE_DISTILL = textwrap.dedent("""
    import copy, hashlib, sys
    from pathlib import Path
    import torch
    from edgekit import distributed, zoo
    from edgekit.data import load_task
    from edgekit.steps import StepContext, build_step
    from edgekit.steps.prune.step import layer_widths
    from edgekit.train import recording

    out = Path(sys.argv[1])
    task = load_task("mnist", input_size=32)
    torch.manual_seed(0)
    teacher = zoo.create("shufflenetv2-x0.5", num_classes=10).eval()
    ctx = StepContext(task=task, baseline=teacher, model_name="shufflenetv2-x0.5", device=None)
    with recording() as log:
        student = build_step("prune", {"macs": 0.7, "blocks": 0, "iterations": 1,
                                       "finetune_epochs": 0.05}).apply(copy.deepcopy(teacher), ctx)
        initial = {k: v.clone() for k, v in student.state_dict().items()}
        seen = []
        student.register_forward_pre_hook(lambda m, a: seen.append(hashlib.sha256(
            a[0].detach().contiguous().numpy().tobytes()).hexdigest()) if m.training else None)
        build_step("distill", {"epochs": 0.05, "alpha": 0.5, "lr": 3e-3, "evaluate": False}).apply(student, ctx)
    torch.save({"widths": layer_widths(student), "initial": initial, "final": student.state_dict(),
                "inputs": seen, "training": log.summary()}, out / f"rank{distributed.rank()}.pt")
    distributed.shutdown()
""")


@pytest.mark.slow
def test_prune_and_distill_under_torchrun_average_gradients(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(PRUNE_DISTILL)
    res = torchrun([script, tmp_path], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["widths"] == r1["widths"]  # same seed: both ranks pruned the same channels
    assert r0["training"]["world_size"] == 2 and r0["training"]["backend"] == "gloo"
    assert r0["training"]["device"] == "cpu" and r0["training"]["amp"] is False
    steps = r0["training"]["fits"][-1]["steps"]
    assert steps >= 2
    # each rank trained on its own share (DistributedSampler) ...
    assert len(r1["inputs"]) == steps and not set(r0["inputs"][:steps]) & set(r1["inputs"])
    # ... and still ended with the same weights, which moved: the gradients were averaged
    final0, final1, initial = r0["final"], r1["final"], r0["initial"]
    assert final0.keys() == final1.keys()
    assert all(torch.equal(final0[k], final1[k]) for k in final0)
    convs = [k for k in final0 if k.endswith("weight") and final0[k].dim() == 4]
    assert convs and all(not torch.equal(final0[k], initial[k]) for k in convs)


TINY_RECIPE = """description: prune + distill in a few steps, for the torchrun test
train: {epochs: 0.05}
steps:
  - prune: {macs: 0.7, blocks: 0, iterations: 1, finetune_epochs: 0.05}
  - distill: {epochs: 0.05, evaluate: false}
variants:
  - {format: onnx, precision: fp32}
accuracy_budget_pp: 100
"""


@pytest.mark.slow
def test_compress_under_torchrun_writes_once_on_rank_0(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    res = torchrun(["-m", "edgekit", "compress", "shufflenetv2-x0.5", "--recipe", tmp_path / "tiny.yaml",
                    "--input-size", 32, "--out", work / "run", "--runs", 10], cwd=tmp_path,
                   env={"EDGEKIT_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("Wrote ") == 1 and res.stdout.count("prune-distill-fp32") >= 1  # rank 1 says nothing
    assert [p.name for p in work.iterdir()] == ["run"]  # no temp folder of another rank beside it
    r = json.loads((work / "run" / "report.json").read_text())
    t = r["training"]
    assert (t["device"], t["world_size"], t["backend"], t["amp"]) == ("cpu", 2, "gloo", False) and t["seconds"] > 0
    assert [f["description"] for f in t["fits"]] == ["train shufflenetv2-x0.5", "prune fine-tune 1/1", "distill"]
    assert "Training: cpu, 2 processes, gloo, float32" in (work / "run" / "report.md").read_text()
    assert len(list((cache / "baselines").iterdir())) == 1  # written once, by rank 0

    # the cached baseline reaches both ranks; an existing folder stops both ranks before any training
    res = torchrun(["-m", "edgekit", "compress", "shufflenetv2-x0.5", "--recipe", tmp_path / "tiny.yaml",
                    "--input-size", 32, "--out", work / "run", "--runs", 10], cwd=tmp_path,
                   env={"EDGEKIT_CACHE": str(cache)})
    assert res.returncode != 0 and res.stderr.count("already exists; pass --force") == 2, res.stderr[-3000:]
    res = torchrun(["-m", "edgekit", "compress", "shufflenetv2-x0.5", "--recipe", tmp_path / "tiny.yaml",
                    "--input-size", 32, "--out", work / "run", "--runs", 10, "--force"], cwd=tmp_path,
                   env={"EDGEKIT_CACHE": str(cache)})
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((work / "run" / "report.json").read_text())
    assert r["model_info"]["baseline"]["cached"] is True
    assert [f["description"] for f in r["training"]["fits"]] == ["prune fine-tune 1/1", "distill"]
    assert [p.name for p in work.iterdir()] == ["run"]


# Rank 0 fails (or never answers) in its own part; the script prints errors as the CLI does.
RANK0_FAILS = textwrap.dedent("""
    import sys, time
    from edgekit.distributed import Session
    from edgekit.errors import EdgekitError

    def rank0_part(how):
        if how == "error":
            raise EdgekitError("the export failed on rank 0")
        time.sleep(120)

    s = Session("cpu")
    try:
        s.on_main(rank0_part, sys.argv[1])
    except EdgekitError as exc:
        print(f"rank {s.rank} error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        s.close()
""")


@pytest.mark.parametrize("how", ["error", "silent"])
def test_other_ranks_stop_when_rank_0_fails_or_hangs(tmp_path, how):
    script = tmp_path / "job.py"
    script.write_text(RANK0_FAILS)
    t0 = time.monotonic()
    res = torchrun([script, how], cwd=tmp_path, env={"EDGEKIT_DIST_TIMEOUT": "3"}, timeout=110)
    assert res.returncode != 0
    assert time.monotonic() - t0 < 100  # rank 0 sleeps 120 s when silent: rank 1 gave up, torchrun stopped rank 0
    if how == "error":
        assert "rank 1 error: the export failed on rank 0" in res.stderr, res.stderr[-3000:]
    else:
        assert "rank 1 error: rank 1: no result from rank 0" in res.stderr and "EDGEKIT_DIST_TIMEOUT" in res.stderr, \
            res.stderr[-3000:]


DIFFERENT_MODELS = textwrap.dedent("""
    import sys
    from edgekit import distributed, zoo
    from edgekit.data import load_task
    from edgekit.errors import EdgekitError
    from edgekit.train import FitConfig, fit

    name = "shufflenetv2-x0.5" if distributed.env_rank() == 0 else "shufflenetv2-x1.0"
    try:
        fit(zoo.create(name, num_classes=10), load_task("mnist", input_size=32), FitConfig(epochs=0.05))
    except EdgekitError as exc:
        print(f"rank {distributed.rank()} error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        distributed.shutdown()
""")


@pytest.mark.slow
def test_ranks_whose_models_differ_are_stopped_before_training(tmp_path):
    """Pruning runs on every rank with the same seed; were its decisions to differ, fit says so on every rank
    instead of failing inside DistributedDataParallel."""
    script = tmp_path / "job.py"
    script.write_text(DIFFERENT_MODELS)
    res = torchrun([script], cwd=tmp_path, timeout=200)
    assert res.returncode != 0
    for r in (0, 1):
        assert f"rank {r} error: the 2 processes hold differently shaped models" in res.stderr, res.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_train_cuda_without_a_gpu_is_one_line_exit_2(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["compress", "shufflenetv2-x0.5", "--device-train", "cuda", "--out", str(out)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device-train cuda:") and "no CUDA GPU" in lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())
    res = CliRunner().invoke(app, ["compress", "shufflenetv2-x0.5", "--device-train", "gpu", "--out", str(out)])
    assert res.exit_code == 2 and "must be one of auto, cpu, cuda" in res.stderr


def test_sync_batchnorm_shares_the_tensors_and_gives_the_originals_back():
    """What CUDA training under torchrun does to BatchNorm, checked on the CPU (without a process group
    SyncBatchNorm normalises like BatchNorm)."""
    from edgekit import zoo
    from edgekit.train import restore_batchnorm, sync_batchnorm

    class Act(nn.BatchNorm2d):  # an unknown subclass keeps its class
        pass

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Sequential(nn.Conv2d(8, 4, 1), Act(4)))
    originals = [model[1], model[2][1]]
    calls = []
    originals[0].register_forward_hook(lambda *a: calls.append("hook"))  # distillation's feature taps
    swaps = sync_batchnorm(model)
    assert isinstance(model[1], nn.SyncBatchNorm) and model[2][1] is originals[1] and len(swaps) == 1
    assert model[1].running_mean is originals[0].running_mean and model[1].weight is originals[0].weight
    model.train()(torch.randn(4, 3, 8, 8))  # no process group: SyncBatchNorm normalises like BatchNorm
    assert calls == ["hook"]
    restore_batchnorm(swaps)
    assert model[1] is originals[0] and type(model[1]) is nn.BatchNorm2d
    assert originals[0].num_batches_tracked.item() == 1 and originals[0].running_mean.abs().sum() > 0

    torch.manual_seed(0)
    timm_net = zoo.create("mobilenetv1", num_classes=10).eval()  # timm: BatchNormAct2d (normalise, then ReLU)
    x = torch.randn(2, 3, 32, 32)
    before = timm_net(x)
    bns = [m for m in timm_net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    swaps = sync_batchnorm(timm_net)
    assert len(swaps) == len(bns) and all(isinstance(s[3], nn.SyncBatchNorm) for s in swaps)
    assert torch.equal(timm_net(x), before)  # the activation is still applied
    restore_batchnorm(swaps)
    assert [m for m in timm_net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == bns
