"""Detectors through edgekit's pipeline: exported graphs match torch after the shared NMS, the CLI refuses what it
cannot do in one line, and a short yolox-nano run quantizes to int8 with its mAP scored like fp32's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit import zoo
from edgekit.detect.data import digits_detect_task
from edgekit.detect.evaluate import torch_runner
from edgekit.detect.metrics import NMS, postprocess
from edgekit.detect.train import fit_detector
from edgekit.train import FitConfig

DETECTORS = [s.name for s in zoo.list_models(task="detection")]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_the_zoo_lists_the_detectors():
    assert DETECTORS == ["ssdlite-mobilenetv3", "yolox-nano"]
    assert all(s.task == "classification" for s in zoo.list_models())
    out = _cli("zoo", "list")
    assert out.returncode == 0 and "yolox-nano" in out.stdout and "ssdlite-mobilenetv3" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", DETECTORS)
def test_exports_and_matches_torch_after_nms(name, tmp_path):
    """A briefly trained detector (confident boxes, so NMS has real work) gives the same boxes after the shared NMS
    from its fp32 ONNX graph in ONNX Runtime as in torch."""
    from edgekit.export.onnx import export_onnx
    from edgekit.runtime import load_runner

    task = digits_detect_task(num_train=128, num_calib=8, num_eval=16)
    model = zoo.create(name, num_classes=10, input_size=task.input_size)
    fit_detector(model, task, FitConfig(epochs=4, lr=3e-3, batch_size=32))
    x, _ = task.arrays("eval")
    path = export_onnx(model, tmp_path / f"{name}.onnx", task.input_shape)
    ort = load_runner("onnxruntime", path, threads=2)
    ref, got = torch_runner(model)(x), np.concatenate([ort.run(x[i:i + 1]) for i in range(len(x))])
    assert got.shape == ref.shape == (len(x), ref.shape[1], 4 + 10)
    np.testing.assert_allclose(got[..., 4:], ref[..., 4:], atol=1e-4)
    settings = NMS(score=_floor_in_a_gap(ref[..., 4:]))  # the most confident (anchor, class) pairs
    kept = 0
    for a, b in zip(postprocess(ref, settings), postprocess(got, settings)):
        a, b = _ordered(a), _ordered(b)  # equal scores may leave NMS in either order
        assert a["labels"].tolist() == b["labels"].tolist()
        np.testing.assert_allclose(a["boxes"], b["boxes"], rtol=5e-4, atol=1e-2)  # exp() of log-sizes: relative
        kept += len(a["labels"])
    assert kept > 0


def _floor_in_a_gap(scores: np.ndarray) -> float:
    """A score floor about the top 0.1% of the scores, in the widest gap there, so that a 1e-5 difference between
    runtimes never moves a candidate across it."""
    s = np.sort(scores.ravel())[::-1]
    k = max(4, s.size // 1000)
    window = s[k // 2:2 * k]
    i = int(np.argmax(window[:-1] - window[1:]))
    return float((window[i] + window[i + 1]) / 2)


def _ordered(d):
    order = np.lexsort((np.round(d["boxes"][:, 1], 1), np.round(d["boxes"][:, 0], 1), d["labels"]))
    return {k: v[order] for k, v in d.items()}


def _coco_folder(root: Path, file_name: str = "a.png") -> Path:
    from PIL import Image

    root.mkdir()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(root / "a.png")
    ann = {"images": [{"id": 1, "file_name": file_name, "width": 40, "height": 30},
                      {"id": 2, "file_name": "a.png", "width": 40, "height": 30}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 10], "iscrowd": 0}],
           "categories": [{"id": 3, "name": "cup"}]}
    (root / "annotations.json").write_text(json.dumps(ann))
    return root


@pytest.mark.parametrize("file_name, says", [("missing.png", "missing.png"), ("../outside.png", "outside")])
def test_cli_refuses_a_hostile_coco_folder_in_one_line(tmp_path, file_name, says):
    data = _coco_folder(tmp_path / "coco", file_name)
    out_dir = tmp_path / "out"
    r = _cli("compress", "--recipe", "int8", "yolox-nano", "--data", str(data), "--out", str(out_dir))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not out_dir.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["coco"]


def test_cli_refuses_steps_a_detector_cannot_take(tmp_path):
    r = _cli("compress", "--recipe", "svd", "yolox-nano", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "detectors" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_yolox_nano_int8_pipeline(tmp_path):
    """The pipeline's own stages on a short yolox-nano run: the int8 ONNX is scored with the same NMS and COCO mAP
    as fp32, with its mAP against fp32's detections; report.json carries metrics {map, map50}."""
    from edgekit.config import Recipe, TrainSpec, load_device
    from edgekit.pipeline import VariantSpec, evaluate, export_variants, load_runners

    task = digits_detect_task(num_train=1500, num_calib=64, num_eval=200)
    model = zoo.create("yolox-nano", num_classes=10, input_size=task.input_size)
    torch.manual_seed(0)
    info = fit_detector(model, task, FitConfig(epochs=6, lr=2e-3, batch_size=32))
    assert info["loss_last"] < 0.6 * info["loss_first"], info
    specs = [VariantSpec("baseline", "onnx", "fp32"),
             VariantSpec("baseline", "onnx", "int8", {"num_calib": 64, "search": "none"})]
    variants = export_variants({"baseline": model}, specs, task, load_device("desktop-cpu"), tmp_path,
                               model_label="yolox-nano")
    evaluate(variants, load_runners(variants, threads=2), task)
    fp32, int8 = variants
    assert int8.status == "ok", int8.error
    # 6 epochs land at 0.19-0.25 mAP depending on the CPU's kernels; an untrained head scores ~0
    assert fp32.metrics["map"] >= 0.1 and fp32.metrics["map50"] >= fp32.metrics["map"], fp32.metrics
    assert fp32.agreement == 1.0 and fp32.accuracy == fp32.metrics["map"]
    assert 100 * (fp32.metrics["map"] - int8.metrics["map"]) <= 3.0, (fp32.metrics, int8.metrics)
    assert int8.agreement is not None and int8.agreement >= 0.6, int8.agreement
    assert set(int8.to_json()["metrics"]) == {"map", "map50"}


def test_int8_keeps_a_detectors_decoding_in_float(tmp_path):
    """The nodes after the last convs (box decoding, score products, the concat of pixel boxes with 0-1 scores) stay
    float in the int8 graph; every conv is quantized."""
    import onnx

    from edgekit.export.onnx import export_onnx
    from edgekit.export.onnx_int8 import OrtQuantConfig, quantize_onnx
    from edgekit.export.ptq import float_tail

    model = zoo.create("yolox-nano", num_classes=3, input_size=64)
    fp32 = export_onnx(model, tmp_path / "y.onnx", (1, 3, 64, 64))
    graph = onnx.load(str(fp32)).graph
    tail = set(float_tail(graph))
    ops = {n.op_type for n in graph.node if n.name in tail}
    assert {"Sigmoid", "Exp", "Concat"} <= ops and not ops & {"Conv", "Gemm", "MatMul"}, ops
    calib = np.random.default_rng(0).uniform(0, 1, (4, 3, 64, 64)).astype(np.float32)
    q = onnx.load(str(quantize_onnx(fp32, tmp_path / "q.onnx", calib, OrtQuantConfig(fp32_tail=True))))
    out = q.graph.output[0].name
    made_by = {o: n for n in q.graph.node for o in n.output}
    last = made_by[out]
    assert last.op_type == "Concat" and all(made_by[i].op_type != "DequantizeLinear" for i in last.input)
    convs = [n for n in q.graph.node if n.op_type == "Conv"]
    assert convs and all(made_by[n.input[1]].op_type == "DequantizeLinear" for n in convs if n.input[1] in made_by)


@pytest.mark.slow
def test_tflite_int8_keeps_a_detectors_decoding_in_float(tmp_path):
    """The TFLite int8 file of a detector: int8 convs, the decoding float and a float output (one int8 scale over
    pixel boxes and 0-1 scores would crush the scores), readable by the LiteRT runner."""
    pytest.importorskip("litert_torch")
    from ai_edge_litert.interpreter import Interpreter

    from edgekit.export.tflite import convert_int8
    from edgekit.runtime import load_runner

    model = zoo.create("yolox-nano", num_classes=3, input_size=64)
    calib = np.random.default_rng(0).uniform(0, 1, (8, 3, 64, 64)).astype(np.float32)
    path = tmp_path / "y.tflite"
    convert_int8(model, path, (1, 3, 64, 64), calib, bias_correction=False, keep_tail_float=True)
    it = Interpreter(model_path=str(path))
    assert it.get_output_details()[0]["dtype"] == np.float32
    ops = it._get_ops_details()
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    convs = [o for o in ops if o["op_name"] == "CONV_2D"]
    assert convs and all(tensors[o["inputs"][1]]["dtype"] == np.int8 for o in convs)
    exps = [o for o in ops if o["op_name"] == "EXP"]
    assert exps and all(tensors[o["outputs"][0]]["dtype"] == np.float32 for o in exps)
    out = load_runner("litert", path, threads=1).run(calib[:1])
    assert out.shape == (1, 84, 4 + 3) and np.isfinite(out).all()


def test_a_detectors_report_speaks_map():
    """The results table, the sentence under it and the quantization section of a detection run say mAP, never
    top-1 accuracy."""
    from edgekit.report import columns, latency_sentence, variant_rows

    v = {"name": "int8", "format": "onnx", "precision": "int8", "size_mb": 1.4, "params": 9e5, "macs": 4.8e7,
         "accuracy": 0.60, "agreement": 0.83, "metrics": {"map": 0.60, "map50": 0.88}, "status": "ok",
         "latency_ms": {"p50": 2.5, "p90": 3.0, "source": "measured", "runs": 100}, "speedup": 1.1}
    report = {"task": {"kind": "detection", "num_eval": 500}, "variants": [v], "device": "desktop-cpu"}
    assert columns(report)[6:9] == ["mAP", "mAP50", "mAP vs fp32"]
    assert variant_rows(report)[0][6:9] == ["60.00%", "88.00%", "83.00%"]
    text = latency_sentence(report)
    assert "COCO mAP" in text and "top-1" not in text


def test_the_device_runner_prints_the_boxes_the_host_keeps(tmp_path):
    """runner.py predict --detections on an exported detector: boxes, scores and classes per image in its JSON,
    the same as the host's post-processing of the same output (one function, run standalone as on a device)."""
    from edgekit.device import runner
    from edgekit.export.onnx import export_onnx

    model = zoo.create("ssdlite-mobilenetv3", num_classes=3, input_size=64)
    with torch.no_grad():  # confident, distinct scores without training: a strong class-1 logit per anchor
        model.net.head.classification_head.module_list[0][-1].bias.data[1::4] += 6.0
    path = export_onnx(model, tmp_path / "d.onnx", (1, 3, 64, 64))
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    r = subprocess.run([sys.executable, runner.__file__, "predict", str(path), str(tmp_path / "x.npy"),
                        str(tmp_path / "y.npy"), "--detections", "--score", "0.3"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (got,) = json.loads(r.stdout)["detections"]
    (want,) = postprocess(np.load(tmp_path / "y.npy"), NMS(score=0.3))
    assert got and [d["class"] for d in got] == want["labels"].tolist()
    np.testing.assert_allclose([d["box"] for d in got], want["boxes"], atol=0.01)
    bad = subprocess.run([sys.executable, runner.__file__, "predict", str(path), str(tmp_path / "x.npy"),
                          str(tmp_path / "z.npy"), "--detections", "--iou", "oops"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and json.loads(bad.stdout)["exit_code"] == 2
    for flag, value in (("--iou", "7"), ("--score", "-1"), ("--max-det", "0")):
        out = subprocess.run([sys.executable, runner.__file__, "predict", str(path), str(tmp_path / "x.npy"),
                              str(tmp_path / "w.npy"), "--detections", flag, value], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and "--max-det" in json.loads(out.stdout)["error"], out.stdout
        assert not (tmp_path / "w.npy").exists()


@pytest.mark.slow
def test_compress_trains_a_detector_on_a_coco_folder(tmp_path):
    """A user's COCO folder (images of any size, boxes in their pixels) through compress: letterboxed, trained,
    exported and scored with mAP; report.json has metrics per variant."""
    from edgekit.config import Recipe, TrainSpec, VariantSpec
    from edgekit.pipeline.main import compress

    root = coco_folder(tmp_path / "coco", 60)
    rec = Recipe(name="coco-smoke", train=TrainSpec(epochs=2, batch_size=16),
                 variants=[VariantSpec(format="onnx", precision="fp32"),
                           VariantSpec(format="onnx", precision="int8", options={"search": "none", "num_calib": 8})])
    r = compress("yolox-nano", recipe=rec, data=str(root), input_size=96, out=tmp_path / "out", runs=5)
    task_info = r.report["task"]
    assert task_info["kind"] == "detection" and task_info["input_shape"] == [1, 3, 96, 96]
    fp32, int8 = r.report["variants"]
    assert fp32["status"] == int8["status"] == "ok"
    assert set(fp32["metrics"]) == {"map", "map50"} and 0 <= fp32["metrics"]["map"] <= 1
    assert int8["agreement"] is None or 0 <= int8["agreement"] <= 1
    assert (tmp_path / "out" / "report.html").is_file()


def coco_folder(root: Path, n: int) -> Path:
    """``n`` digits-detect images as a user's COCO folder: 160x128 PNGs, boxes in their pixels, category ids 10+."""
    from PIL import Image

    task = digits_detect_task(num_train=n, num_calib=8, num_eval=16)
    root.mkdir()
    images, anns = [], []
    for i in range(n):
        x, t = task.splits["train"][i]
        w, h = 160, 128  # wider than tall: the letterbox pads the bottom
        im = Image.fromarray((x.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)).resize((w, h))
        im.save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        for b, c in zip(t["boxes"].numpy() * [w / 128, h / 128, w / 128, h / 128], t["labels"].tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 10 + c, "iscrowd": 0,
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    (root / "annotations.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": [{"id": 10 + c, "name": str(c)} for c in range(10)]}))
    return root


def test_compare_scores_a_detectors_files_by_their_detections(tmp_path):
    """edgekit compare on a detector's fp32 and int8 files: the digits-detect images at the files' size, mAP of
    each on the labels, mAP of b against a's detections, the Q/DQ simulated row and the per-layer table."""
    from edgekit.comparison import compare_artifacts, render_comparison
    from edgekit.export.onnx import export_onnx
    from edgekit.export.onnx_int8 import OrtQuantConfig, quantize_onnx

    model = zoo.create("yolox-nano", num_classes=10, input_size=64)
    fp32 = export_onnx(model, tmp_path / "f.onnx", (1, 3, 64, 64))
    calib = digits_detect_task(input_size=64, num_train=1, num_calib=4, num_eval=1).arrays("calib")[0]
    q = quantize_onnx(fp32, tmp_path / "q.onnx", calib, OrtQuantConfig(fp32_tail=True))
    r = compare_artifacts(fp32, q, limit=8, layer_inputs=4)
    real, simulated = r["outputs"]
    assert real["output"].startswith("detections") and simulated["simulated"]
    assert {"accuracy_a", "accuracy_b"} <= set(real) and "digits-detect" in r["inputs"] and r["num_inputs"] == 8
    assert r["layers"] and r["layer_inputs"] == 4
    assert render_comparison(r)  # the CLI's tables render


@pytest.mark.slow
def test_compress_prunes_and_distills_a_detector(tmp_path):
    """prune then distill on a detector through compress: the MACs fall to the budget, the prediction convs keep
    their channels, both steps are in report.json (the distill step with its mimic error) and the pruned model
    exports and scores."""
    from edgekit.config import Recipe, StepSpec, TrainSpec, VariantSpec
    from edgekit.pipeline.main import compress

    root = coco_folder(tmp_path / "coco", 48)
    rec = Recipe(name="prune-smoke", train=TrainSpec(epochs=1, batch_size=16),
                 steps=[StepSpec(kind="prune", params={"macs": 0.6, "finetune_epochs": 0.5}),
                        StepSpec(kind="distill", params={"epochs": 0.5, "batch_size": 16})],
                 variants=[VariantSpec(format="onnx", precision="fp32")], accuracy_budget_pp=100)
    r = compress("yolox-nano", recipe=rec, data=str(root), input_size=64, out=tmp_path / "out", runs=5)
    prune, distill = r.report["steps"]
    assert prune["kind"] == "prune" and prune["macs_ratio"] <= 0.62 and prune["reached"], prune
    assert distill["teacher_source"] == "baseline" and distill["fit"]["mimic_first"] > 0, distill
    assert all(v["status"] == "ok" and set(v["metrics"]) == {"map", "map50"} for v in r.report["variants"])
    assert any(v["macs"] <= 0.62 * r.report["variants"][0]["macs"] for v in r.report["variants"][1:]), \
        [(v["name"], v["macs"]) for v in r.report["variants"]]
