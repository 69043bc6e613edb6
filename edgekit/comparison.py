"""Compare two artifacts of one model across runtimes, output by output and (for ONNX) layer by layer.

``compare_artifacts(a, b)`` takes any two of: a PyTorch checkpoint (.pt / .pth, with
``model=`` naming its zoo architecture), an ONNX model, a TFLite model (and a
TensorRT engine where TensorRT runs). Both get the same inputs; for each output it
reports top-1 agreement, cosine similarity, max abs error and SQNR, plus each
artifact's accuracy when the inputs have labels.

For two ONNX models it also compares intermediate tensors, as ONNX Runtime's
``qdq_loss_debug`` and Polygraphy do: every float tensor of ``a`` that ``b`` also
computes (same name; ONNX Runtime's quantizer keeps the fp32 names, and a tensor that
``b`` quantizes is also compared after its QuantizeLinear -> DequantizeLinear) is
made a graph output of both models, and the rows name the first layer whose SQNR
falls below a threshold: where int8 starts to diverge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import EdgekitError
from .evaluate import agreement, cosine, energy_db, predict_stream, sqnr_db, top1

KINDS = {".onnx": "onnx", ".tflite": "tflite", ".pt": "torch", ".pth": "torch", ".engine": "tensorrt"}
RUNTIME_OF = {"onnx": "onnxruntime", "tflite": "litert", "tensorrt": "tensorrt"}
DEFAULT_THRESHOLD_DB = 20.0


@dataclass
class Artifact:
    path: Path
    kind: str  # onnx | tflite | torch | tensorrt
    run: Callable[[np.ndarray], np.ndarray]
    input_shape: Tuple[Optional[int], ...]  # NCHW; None where any size goes
    runtime: str
    version: str
    classes: Optional[int] = None  # the output's class count where the file says it
    detector: bool = False  # one [batch, anchors, 4 + classes] output: compared by its detections

    def describe(self) -> dict:
        return {"path": str(self.path), "format": self.kind, "runtime": f"{self.runtime} {self.version}",
                "input_shape": list(self.input_shape)}


def _torch_artifact(path: Path, model: Optional[str]) -> Artifact:
    import torch

    from . import zoo
    from .zoo.registry import first_conv, load_checkpoint

    if not model:
        raise EdgekitError(f"{path} is a PyTorch checkpoint: name its architecture with --model "
                           f"(e.g. --model shufflenetv2, --model timm:lcnet_050, --model mynet.py:MyNet)")
    from .sources import parse_source
    from .zoo.external import spec_for

    spec = spec_for(parse_source(model))
    state = load_checkpoint(path)
    head = state.get(f"{spec.classifier}.weight")
    if head is None:
        raise EdgekitError(f"{path} does not hold a {spec.name} state dict (no {spec.classifier}.weight)")
    stem_name, _ = first_conv(spec.build(int(head.shape[0])))
    stem = state.get(f"{stem_name}.weight")
    in_chans = int(stem.shape[1]) if stem is not None else 3
    net = zoo.create(spec.name, num_classes=int(head.shape[0]), in_chans=in_chans, weights=str(path)).eval()

    def run(x: np.ndarray) -> np.ndarray:
        if x.ndim != 4 or x.shape[1] != in_chans:
            raise EdgekitError(f"Input shape {tuple(x.shape)} does not match {path.name}, "
                               f"which expects (N, {in_chans}, H, W)")
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return Artifact(path, "torch", run, (None, in_chans, None, None), "torch", torch.__version__, int(head.shape[0]))


def load_artifact(path: str | Path, model: Optional[str] = None, threads: Optional[int] = None) -> Artifact:
    """An artifact ready to run float32 NCHW batches, whatever its format."""
    from .runtime import load_runner

    p = Path(path)
    kind = KINDS.get(p.suffix.lower())
    if kind is None:
        raise EdgekitError(f"Unknown artifact format {p.suffix or '(no suffix)'!r} for {p}: compare takes "
                           f"{', '.join(sorted(KINDS))} files")
    if not p.is_file():
        raise EdgekitError(f"Artifact not found: {p}")
    if kind == "torch":
        return _torch_artifact(p, model)
    runner = load_runner(RUNTIME_OF[kind], p, threads=threads)
    dims = runner.output_shape if kind in ("onnx", "tflite") else ()  # an engine's output stays compared raw
    classes = dims[1] if kind == "onnx" and len(dims) == 2 else None
    detector = len(dims) == 3 and dims[2] is not None and dims[2] >= 5
    return Artifact(p, kind, runner.run, tuple(runner.input_shape), runner.runtime, runner.version, classes,
                    detector)


def _common_shape(a: Artifact, b: Artifact) -> Tuple[Optional[int], ...]:
    """The (C, H, W) both accept, or EdgekitError naming the mismatch."""
    if len(a.input_shape) != len(b.input_shape):
        raise EdgekitError(f"Input ranks differ: {a.path.name} {tuple(a.input_shape)}, "
                           f"{b.path.name} {tuple(b.input_shape)}")
    out = []
    for da, db in zip(a.input_shape[1:], b.input_shape[1:]):
        if da is not None and db is not None and da != db:
            raise EdgekitError(f"Input shapes differ: {a.path.name} expects {tuple(a.input_shape)}, "
                               f"{b.path.name} expects {tuple(b.input_shape)} (NCHW); they are not the same model")
        out.append(da if da is not None else db)
    return tuple(out)


REPORT_MAX_BYTES = 16 * 2**20


def run_preprocess(*paths: Path):
    """The eval transform recorded in the report.json of the run folder the artifacts sit in (a pretrained model's
    own normalisation), or None: the same photos through another transform would be other inputs."""
    import json

    from .data import Preprocess

    for folder in {Path(p).resolve().parent for p in paths}:
        rep = folder / "report.json"
        try:
            if not rep.is_file() or rep.stat().st_size > REPORT_MAX_BYTES:
                continue
            pre = json.loads(rep.read_text()).get("task", {}).get("preprocess")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(pre, dict):
            return Preprocess.from_json(pre)
    return None


def _inputs(shape: Sequence[Optional[int]], task: Any, data: Any, limit: Optional[int],
            classes: Optional[int] = None, preprocess: Any = None, detector: bool = False):
    """(batches of (x, labels or None), number of inputs, source): a task's split is streamed, never held.

    Without a task or data: the MNIST digits for a 10-class model (what edgekit trains), the unlabelled photos for
    any other RGB classifier (a pretrained ImageNet head would score 0% on digit labels)."""
    from .data import Task, load_task

    c, h, w = (list(shape) + [None, None, None])[:3]
    if isinstance(data, np.ndarray):
        x = np.ascontiguousarray(data, dtype=np.float32)
        if x.ndim != 4:
            raise EdgekitError(f"data must be a float32 NCHW array, got shape {x.shape}")
        x = x[:limit]
        return ((x[i:i + 64], None) for i in range(0, len(x), 64)), len(x), f"array {tuple(data.shape)}"
    if h is not None and w is not None and h != w:
        raise EdgekitError(f"Non-square inputs ({h}x{w}) need data=<array>: edgekit's tasks are square")
    size = h or w
    kw = {"input_size": size} if size else {}
    if isinstance(task, Task) or getattr(task, "kind", "") == "detection":
        t = task
    elif detector:  # a detector's files: the detection task, or the user's COCO folder
        from .detect.data import load_detection_task

        t = load_detection_task(data=str(data) if data is not None else None, **kw)
    elif data is not None:
        t = load_task(data=str(data), **kw)
    else:
        if task is None:
            task = "photos" if classes not in (None, 10) and c in (None, 3) else "mnist"
        if task == "photos" and preprocess is not None:
            kw["preprocess"] = preprocess
        t = load_task(task, **kw, **({"in_chans": c} if c and task == "mnist" else {}))
    n = t.size("eval") if limit is None else min(limit, t.size("eval"))
    batches = t.batches("eval", batch_size=64, limit=n)
    if not t.labelled:  # label -1 everywhere: no accuracy to report, only the comparison
        return ((x, None) for x, _ in batches), n, f"task {t.name} (eval split, {n} unlabelled inputs)"
    return batches, n, f"task {t.name} (eval split, {n} inputs)"


def compare_artifacts(a: str | Path, b: str | Path, task: Any = None, data: Any = None, per_layer: bool = True,
                      model: Optional[str] = None, limit: Optional[int] = 500, layer_inputs: int = 16,
                      threshold_db: float = DEFAULT_THRESHOLD_DB, threads: Optional[int] = None) -> dict:
    """Run ``a`` and ``b`` on the same inputs and compare them.

    ``task``: a Task or task name (default: the embedded MNIST task at the artifacts'
    input size); ``data``: an ImageFolder path or a float32 NCHW array instead.
    ``model``: the zoo name for .pt/.pth checkpoints. Returns a dict with ``outputs``
    (one row per output), and for two ONNX models ``layers`` (one row per matched
    tensor, in graph order) and ``first_divergence`` (first row below ``threshold_db``).
    Inputs are streamed in batches; only the first ``layer_inputs`` are kept for the layers.
    """
    import itertools

    art_a = load_artifact(a, model, threads)
    art_b = load_artifact(b, model, threads)
    shape = _common_shape(art_a, art_b)
    known = {art.classes for art in (art_a, art_b)} - {None}
    detector = art_a.detector and art_b.detector
    batches, n, source = _inputs(shape, task, data, limit, known.pop() if len(known) == 1 else None,
                                 run_preprocess(art_a.path, art_b.path), detector)
    first = next(iter(batches), None) if n else None
    if first is None:
        raise EdgekitError("No inputs to compare on")
    for art in (art_a, art_b):
        want = tuple(art.input_shape[1:])
        if any(d is not None and d != s for d, s in zip(want, first[0].shape[1:])):
            raise EdgekitError(f"Input shape {tuple(first[0].shape[1:])} of the data does not match {art.path.name}, "
                               f"which expects {tuple(art.input_shape)}")
    batch_a = art_a.input_shape[0] if isinstance(art_a.input_shape[0], int) else 64
    batch_b = art_b.input_shape[0] if isinstance(art_b.input_shape[0], int) else 64
    if detector:
        row, count, x = _compare_detections(art_a, art_b, itertools.chain([first], batches), n, layer_inputs)
        return _with_layers(art_a, art_b, source, count, row, x, per_layer, layer_inputs, threshold_db, threads)
    pred = predict_stream({"a": (art_a.run, batch_a), "b": (art_b.run, batch_b)},
                          itertools.chain([first], batches), total=-(-n // 64),
                          description=f"run {art_a.path.name}, {art_b.path.name}", keep_first=layer_inputs)
    for k in ("a", "b"):
        if k in pred.errors:
            raise pred.errors[k]
    la, lb, y, x = pred.logits["a"], pred.logits["b"], pred.labels, pred.first
    if la.shape != lb.shape:
        raise EdgekitError(f"Output shapes differ: {art_a.path.name} gives {la.shape[1:]}, "
                           f"{art_b.path.name} gives {lb.shape[1:]}")
    row = {"output": "logits (this machine's kernels)", "agreement": agreement(la, lb), "cosine": cosine(la, lb),
           "max_abs": float(np.abs(la - lb).max()), "sqnr_db": sqnr_db(la, lb)}
    if y is not None:
        row.update({"accuracy_a": top1(la, y), "accuracy_b": top1(lb, y)})
    return _with_layers(art_a, art_b, source, int(pred.count), row, x, per_layer, layer_inputs, threshold_db,
                        threads)


def _detection_row(ra: np.ndarray, rb: np.ndarray, label: str) -> dict:
    """The outputs-table row of two detectors' raw outputs: ``agreement`` is b's mAP against a's detections,
    SQNR that of the detections (:func:`edgekit.detect.metrics.detection_energy`)."""
    from .detect.metrics import detection_agreement, detection_energy, postprocess

    size, classes = ra.shape[1], ra.shape[2] - 4
    signal, noise = detection_energy(ra, rb, size)
    return {"output": label, "agreement": detection_agreement(postprocess(ra), postprocess(rb), classes, size),
            "cosine": cosine(ra, rb), "max_abs": float(np.abs(ra - rb).max()),
            "sqnr_db": energy_db(signal, noise)}


def _compare_detections(art_a: Artifact, art_b: Artifact, batches, n: int, layer_inputs: int):
    """(row, inputs, first inputs) for two detectors, one streamed pass: COCO mAP of each on the labels, b's mAP
    against a's detections as agreement, and the SQNR of the detections; memory holds detections, not outputs."""
    from .detect.metrics import coco_map, detection_agreement, detection_energy, postprocess
    from .progress import track

    def run(art: Artifact, x: np.ndarray) -> np.ndarray:
        b = art.input_shape[0] if isinstance(art.input_shape[0], int) else len(x)
        return np.concatenate([art.run(x[i:i + b]) for i in range(0, len(x), b)])

    dets: Dict[str, list] = {"a": [], "b": []}
    gts, first, signal, noise, count, size, classes, max_abs = [], [], 0.0, 0.0, 0, 0, 0, 0.0
    for x, targets in track(batches, f"run {art_a.path.name}, {art_b.path.name}", total=-(-n // 64)):
        ra, rb = run(art_a, x), run(art_b, x)
        if ra.shape != rb.shape:
            raise EdgekitError(f"Output shapes differ: {art_a.path.name} gives {ra.shape[1:]}, "
                               f"{art_b.path.name} gives {rb.shape[1:]}")
        size, classes = x.shape[-1], ra.shape[2] - 4
        e = detection_energy(ra, rb, size)
        signal, noise, max_abs = signal + e[0], noise + e[1], max(max_abs, float(np.abs(ra - rb).max()))
        dets["a"] += postprocess(ra)
        dets["b"] += postprocess(rb)
        gts += list(targets) if targets is not None else []
        first += [x[:max(0, layer_inputs - count)]]
        count += len(x)
    row = {"output": "detections (this machine's kernels; agreement: mAP of b against a's detections)",
           "agreement": detection_agreement(dets["a"], dets["b"], classes, size), "cosine": None, "max_abs": max_abs,
           "sqnr_db": energy_db(signal, noise)}
    if gts and any(len(t["labels"]) for t in gts):
        row.update({f"accuracy_{k}": coco_map(dets[k], gts, classes, size)["map"] for k in ("a", "b")})
    return row, count, np.ascontiguousarray(np.concatenate(first))


def _with_layers(art_a: Artifact, art_b: Artifact, source: str, count: int, row: dict, x: np.ndarray,
                 per_layer: bool, layer_inputs: int, threshold_db: float, threads: Optional[int]) -> dict:
    result: Dict[str, Any] = {"a": art_a.describe(), "b": art_b.describe(), "inputs": source,
                              "num_inputs": count, "outputs": [row], "layers": None,
                              "first_divergence": None, "threshold_db": threshold_db}
    if art_a.kind == "onnx" and art_b.kind == "onnx" and (_has_qdq(art_a.path) or _has_qdq(art_b.path)):
        result["outputs"].append(_simulated_row(art_a.path, art_b.path, x[:layer_inputs], row, threads))
    if per_layer:
        if art_a.kind == "onnx" and art_b.kind == "onnx":
            layers = compare_onnx_layers(art_a.path, art_b.path, x[:layer_inputs], threads=threads)
            result["layers"] = layers
            result["first_divergence"] = next((r for r in layers if r["sqnr_db"] < threshold_db), None)
            result["layer_inputs"] = int(min(count, layer_inputs))
        else:
            result["layers_note"] = "per-layer comparison needs two ONNX models"
    return result


# ----------------------------------------------------------------------------- per-layer (ONNX)


def _float_tensors(model) -> Tuple[List[Tuple[str, str, str]], Dict[str, int]]:
    """[(tensor, node name, op type)] of float outputs in graph order (graph input first), and their elem types."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference is best effort
        inferred = model
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    inits = {i.name for i in g.initializer}
    out = [(i.name, "(input)", "Input") for i in g.input if i.name not in inits and types.get(i.name) in floats]
    for n in g.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
            continue
        for o in n.output:
            if o and types.get(o) in floats:
                out.append((o, n.name or o, n.op_type))
    return out, types


def _with_outputs(model, names: Sequence[str], types: Dict[str, int]) -> bytes:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT),
                                                                     None))
    return m.SerializeToString()


def _run_all(model_bytes: bytes, names: Sequence[str], x: np.ndarray, threads: Optional[int]) -> Dict[str, np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    opts.intra_op_num_threads = int(threads or 1)
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    n = inp.shape[0] if isinstance(inp.shape[0], int) else len(x)
    chunks: Dict[str, List[np.ndarray]] = {k: [] for k in names}
    for i in range(0, len(x) - n + 1, n):
        outs = sess.run(list(names), {inp.name: np.ascontiguousarray(x[i:i + n], dtype=np.float32)})
        for k, v in zip(names, outs):
            chunks[k].append(np.asarray(v, dtype=np.float32))
    return {k: np.concatenate(v) for k, v in chunks.items()}


def compare_onnx_layers(a: str | Path, b: str | Path, x: np.ndarray, threads: Optional[int] = None) -> List[dict]:
    """One row per float tensor of ``a`` that ``b`` computes too, in ``a``'s graph order.

    ``sqnr_db``/``cosine``/``max_abs``: ``a``'s tensor against what ``b``'s next layers
    read under the same name: its QuantizeLinear -> DequantizeLinear output where ``b``
    quantizes the tensor, else the tensor itself (the error accumulated up to that layer;
    ``qdq_loss_debug``'s ``xmodel_err``). ``qdq_sqnr_db``: ``b``'s tensor against its
    dequantized version (the error this one quantization adds; ``qdq_err``).
    """
    import onnx

    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    tensors_a, types_a = _float_tensors(ma)
    _, types_b = _float_tensors(mb)
    produced_b = {o for n in mb.graph.node for o in n.output} | {i.name for i in mb.graph.input}
    producers_b = {o: n for n in mb.graph.node for o in n.output}
    dq_of: Dict[str, str] = {}  # tensor -> the DequantizeLinear output that carries its quantized value in b
    for n in mb.graph.node:
        if n.op_type == "DequantizeLinear":
            q = producers_b.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                dq_of.setdefault(q.input[0], n.output[0])
    rows_spec = [(t, node, op) for t, node, op in tensors_a if t in produced_b]
    io = {i.name for i in ma.graph.input} | {o.name for o in ma.graph.output}
    if not [t for t, _, _ in rows_spec if t not in io]:
        raise EdgekitError(f"{Path(a).name} and {Path(b).name} share no tensor names: per-layer comparison needs "
                           "models exported from the same graph (e.g. fp32 and its int8 QDQ version)")
    names = [t for t, _, _ in rows_spec]
    dq_names = [dq_of[t] for t in names if t in dq_of]
    va = _run_all(_with_outputs(ma, names, types_a), names, x, threads)
    vb = _run_all(_with_outputs(mb, names + dq_names, {**types_b, **{d: onnx.TensorProto.FLOAT for d in dq_names}}),
                  names + dq_names, x, threads)
    producer_op_b = {o: n.op_type for n in mb.graph.node for o in n.output}
    rows = []
    for i, (t, node, op) in enumerate(rows_spec):
        ref = va[t]
        # What b's next layers read: the dequantized tensor where b quantizes it (the quantizer may
        # also have dropped a Clip/Relu and let the Q/DQ range do the clipping), else the tensor itself.
        test = vb[dq_of[t]] if t in dq_of else vb[t]
        if ref.shape != test.shape:
            continue
        op_b = producer_op_b.get(t, "Input")
        # When b's quantizer folded this op away (e.g. a Clip replaced by the Q/DQ range), b's tensor of
        # that name is the pre-activation value: its Q/DQ error would measure the clipping, not quantization.
        folded = op_b != op
        rows.append({"index": i, "node": node, "op": op, "tensor": t, "sqnr_db": sqnr_db(ref, test),
                     "cosine": cosine(ref, test), "max_abs": float(np.abs(ref - test).max()) if ref.size else 0.0,
                     "compared": "dequantized" if t in dq_of else "same name",
                     "op_b": op_b, "note": f"{op} folded into {op_b}'s Q/DQ range in b" if folded else "",
                     "qdq_sqnr_db": sqnr_db(vb[t], vb[dq_of[t]]) if t in dq_of and not folded else None})
    return rows


# ----------------------------------------------------------------------------- tables


def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not np.isfinite(v):
        return "inf" if v > 0 else str(v)
    return format(v, spec)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


KERNEL_GAP_DB = 3.0  # the int8 kernels losing this much more than the Q/DQ arithmetic is worth a warning


def _has_qdq(path: Path) -> bool:
    import onnx

    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul")
               for n in onnx.load(str(path), load_external_data=False).graph.node)


def _simulated_row(a: Path, b: Path, x: np.ndarray, real: dict, threads: Optional[int]) -> dict:
    """The logits with every Q/DQ pair computed as written, in float (no fused int8 kernels), beside the real
    session's: the per-layer table is this simulation, and a gap between the two rows is the CPU's int8 arithmetic
    (saturating u8 x s8 kernels on x86 without VNNI), not the quantization itself."""
    from .runtime.onnxruntime import OrtRunner

    la, lb = (np.concatenate([OrtRunner(p, threads=threads, simulate_qdq=True).run(x[i:i + 1]) for i in range(len(x))])
              for p in (a, b))
    if la.ndim == 3:  # a detector's [batch, anchors, 4 + classes]
        row = {**_detection_row(la, lb, f"detections, Q/DQ simulated ({len(x)} inputs)"), "simulated": True}
    else:
        row = {"output": f"logits, Q/DQ simulated ({len(x)} inputs)", "agreement": agreement(la, lb),
               "cosine": cosine(la, lb), "max_abs": float(np.abs(la - lb).max()), "sqnr_db": sqnr_db(la, lb),
               "simulated": True}
    gap = row["sqnr_db"] - real["sqnr_db"]
    if np.isfinite(gap) and gap > KERNEL_GAP_DB:
        row["note"] = (f"the real int8 kernels lose {gap:.1f} dB more than the Q/DQ arithmetic: on x86 without VNNI "
                       f"ONNX Runtime's u8 x s8 kernels can saturate; quantize with reduce_range (7-bit weights)")
    return row


def render_comparison(result: dict, max_layers: int = 40):
    """Rich renderables for the CLI: the outputs table, then the per-layer table around the divergence."""
    from rich.table import Table

    out = Table(title=f"{Path(result['a']['path']).name} vs {Path(result['b']['path']).name} "
                      f"({result['num_inputs']} inputs: {result['inputs']})")
    det = result["outputs"][0]["output"].startswith("detections")  # agreement and accuracy are mAP there
    cols = ["output", "mAP vs a %" if det else "agreement %", "cosine", "max abs", "SQNR dB"]
    has_acc = "accuracy_a" in result["outputs"][0]
    if has_acc:
        cols += ["mAP a %", "mAP b %"] if det else ["accuracy a %", "accuracy b %"]
    for c in cols:
        out.add_column(c, justify="left" if c == "output" else "right")
    for r in result["outputs"]:
        cells = [r["output"], _pct(r["agreement"]), _fmt(r["cosine"], ".6f"), _fmt(r["max_abs"], ".3g"),
                 _fmt(r["sqnr_db"], ".1f")]
        if has_acc:
            cells += [_pct(r.get("accuracy_a")), _pct(r.get("accuracy_b"))]
        out.add_row(*cells)
    tables = [out]
    for r in result["outputs"]:
        if r.get("note"):
            tables.append(f"[bold yellow]warning:[/] {r['note']}")
    layers = result.get("layers")
    if layers:
        first = result.get("first_divergence")
        t = Table(title=f"per layer ({result.get('layer_inputs')} inputs); first below {result['threshold_db']} dB: "
                        + (f"{first['node']} ({first['op']})" if first else "none"))
        for c in ("#", "node", "op", "SQNR dB", "cosine", "max abs", "Q/DQ SQNR dB"):
            t.add_column(c, justify="left" if c in ("node", "op") else "right")
        t.add_column("note", justify="left")
        start = max(0, (first["index"] if first else 0) - max_layers // 2)
        for r in [r for r in layers if r["index"] >= start][:max_layers]:
            style = "bold red" if first is not None and r["index"] == first["index"] else None
            t.add_row(str(r["index"]), r["node"], r["op"], _fmt(r["sqnr_db"], ".1f"), _fmt(r["cosine"], ".5f"),
                      _fmt(r["max_abs"], ".3g"), _fmt(r["qdq_sqnr_db"], ".1f"), r.get("note", ""), style=style)
        tables.append(t)
    return tables
