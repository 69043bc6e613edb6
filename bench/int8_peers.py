"""int8 of edgekit and its peers side by side, per model, timed round-robin in one run (issue #29, item 4).

    python bench/int8_peers.py [--models efficientnet-lite0,efficientnet-lite1,efficientnet-lite2]
        [--variants fp32,ort-default,nncf,nncf-mixed,litert,edgekit-ptq,edgekit-adaround,edgekit-fallback,edgekit-qat]
        [--threads 2]
        [--rounds 200] [--qat-epochs 4] [--json bench/results/int8_peers/NAME.json] [--markdown]

Models: ``efficientnet-lite0/1/2`` are the pretrained ImageNet networks (offline weight packages) at their native
sizes (224 / 240 / 260 px, their own preprocessing) on the ``photos`` task: natural photographs bundled with
scikit-image, 80 calibration views of 5 photos and 80 eval views of 5 *other* photos, no labels. They are judged by
top-1 agreement with fp32, top-5 overlap and logits SQNR vs fp32 on the eval views: agreement with fp32, not
accuracy. Any other zoo name is the baseline trained on the default task (MNIST at 64 px, cached; ``--epochs``),
judged by top-1 on the 1,000-image eval split as well. Calibration, fallback and QAT only ever see the
calibration split; every score is on the eval split.

Rows (``--variants``), each from the same fp32 model and the same calibration images:
- ``fp32``: the ONNX export every other ONNX row starts from (ONNX Runtime, fp32).
- ``ort-default``: ``quantize_static`` with ORT's defaults (edgekit's ``ORT_DEFAULT``: QDQ S8S8, per-tensor,
  MinMax, no pre-processing, int8 logits layer).
- ``nncf``: ``nncf.quantize`` on the fp32 ONNX model with NNCF's defaults for a CNN: ``preset=PERFORMANCE``
  (symmetric int8 weights per channel and symmetric activations per tensor; NNCF's default for every model type
  but transformers), ``target_device=ANY``, ``fast_bias_correction=True``, no ignored scope, default advanced
  parameters (its min-max range estimators, its first-layer overflow fix), ``subset_size`` = all calibration
  images. A bench-only extra: ``pip install -e .[bench]``; without it the row is left out and says so. Its
  symmetric int8 activations after ReLU6 keep the Clip (its range reaches below 0), so ORT cannot fuse those convs
  into int8 kernels: on EfficientNet-Lite0 it fused 12 of 49 into QLinearConv, the rest run in float between Q/DQ.
- ``nncf-mixed``: the same with ``preset=MIXED`` (asymmetric activations), NNCF's other preset: the one to pick
  where activations are not centred on zero. The goal compares edgekit with whichever NNCF row is closer to fp32.
- ``litert``: edgekit's LiteRT int8 (``edgekit.export.tflite.convert_int8``: litert-torch PT2E, int8 symmetric
  per-channel weights, int8 per-tensor activations, conv+ReLU6 observed after the clip, bias correction where
  it pays on the calibration split, full-integer), run by the LiteRT runner (XNNPACK; the input is
  quantized and the output dequantized in the runner, which the timing includes).
- ``edgekit-ptq``: what ``edgekit compress --recipe int8`` makes for this machine (``desktop-cpu``): the ``onnx``
  exporter with ``calibration: auto`` (MinMax/percentile x op scopes by logits SQNR on the calibration split,
  then CLE / bias correction where they help) and the layout search timed here.
- ``edgekit-adaround``: the same with ``adaround: null``: auto also tries AdaRound on its best candidate and keeps
  it where the calibration SQNR rises (minutes more on a 224 px model).
- ``edgekit-fallback``: the edgekit PTQ model, then the int8 fallback (``edgekit.export.fallback``) with
  ``min_agreement`` (unlabelled) or ``max_drop_pp`` (labelled) on the calibration split, steps timed here. Its
  make time includes the PTQ it starts from.
- ``edgekit-qat``: the ``qat`` step (fake quantizers as the device's int8, initial ranges from the calibration
  images) trained ``--qat-epochs`` epochs on the calibration images only, by distillation from the fp32 model
  (alpha 1: the soft targets alone; unlabelled images get the teacher's argmax as their unused hard labels),
  exported to a QDQ ONNX graph with the learned scales.

Every runner (one session each, ``--threads`` intra-op threads, batch 1) is timed in ONE ``interleaved_latency``
call per model (order shuffled every round), so ratios are fair on a noisy machine; a second session of the edgekit
PTQ file is the A/A control (two sessions of one file drift apart by a few percent). "Slower" below means the
whole 95% bootstrap interval of the p50 ratio is below 1 and below the A/A interval, as in ``bench/int8_speed.py``.
The runners are the library's (ORT's intra-op threads spin after each run, as in a deployed session): interleaved,
one session's spinning threads take cores from the next run, which raises every row's p90 and the p50 of fast models
(MobileNetV2 on MNIST here: fp32 p50 0.48 ms alone, 0.88 ms interleaved with a second ORT session, p90 0.54 -> 4.7
ms). It hits every row, so the ratios stay comparable; the absolute figures are above a lone session's.

Goal (issue #29): edgekit's best int8 is at least as close to fp32 as NNCF's PTQ (agreement or top-1, and SQNR)
at equal or better latency. Per model the bench says which edgekit rows meet it.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
from rich.console import Console
from rich.table import Table

ROWS = ("fp32", "ort-default", "nncf", "nncf-mixed", "litert", "edgekit-ptq", "edgekit-adaround", "edgekit-fallback",
        "edgekit-qat")
EDGEKIT_ROWS = ("edgekit-ptq", "edgekit-adaround", "edgekit-fallback", "edgekit-qat")
PHOTO_MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
QAT_BATCH = 16  # 5 optimizer steps per epoch on the 80 calibration photos, 16 on MNIST's 256
NNCF_MISSING = "nncf is not installed: pip install -e .[bench] (a bench-only extra) to add the NNCF row"


class Unavailable(Exception):
    """A row this machine cannot make (its package is missing); the others still run."""


@dataclass
class Made:
    """One row's artifact: the file, the runtime that runs it, the seconds it took to make, facts about it."""

    path: Path
    runtime: str
    seconds: float
    info: dict = field(default_factory=dict)


@dataclass
class Bench:
    """One model's fp32 network, its data (calibration and eval splits as arrays) and where its files go."""

    name: str
    model: object  # torch nn.Module
    task: object  # edgekit.data.Task
    calib: np.ndarray
    calib_labels: Optional[np.ndarray]  # None: unlabelled
    x: np.ndarray
    y: Optional[np.ndarray]
    device: object  # edgekit.config.DeviceProfile, threads set to --threads
    work: Path
    cache: dict = field(default_factory=dict)  # the exporters' cache: the fp32 ONNX is exported once
    made: Dict[str, Made] = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return self.y is not None

    @property
    def threads(self) -> int:
        return self.device.resolved_threads()

    def ctx(self, name: str, timer: Optional[Callable] = None):
        from edgekit.export import ExportContext

        return ExportContext(out_dir=self.work, task=self.task, device=self.device,
                             input_shape=tuple(self.task.input_shape), name=name, cache=self.cache,
                             **({"timer": timer} if timer is not None else {}))


def load_bench(name: str, work: Path, threads: int, epochs: float = 4) -> Bench:
    """The pretrained Lite models on the photos task at their native size; zoo baselines on MNIST (trained once,
    cached)."""
    from edgekit.config import Recipe, TrainSpec
    from edgekit.data import load_task

    if name in PHOTO_MODELS:
        from edgekit import zoo
        from edgekit.data import Preprocess

        model = zoo.create(name, pretrained=True).eval()
        task = load_task("photos", preprocess=Preprocess.for_model(model))
    else:
        from edgekit.pipeline import get_baseline

        task = load_task("mnist")
        model, _ = get_baseline(name, task, recipe=Recipe(name="bench", train=TrainSpec(epochs=epochs)))
        model = model.eval()
    return bench_from(name, model, task, work, threads)


def bench_from(name: str, model, task, work: Path, threads: int, num_calib: Optional[int] = None,
               num_eval: Optional[int] = None) -> Bench:
    """A :class:`Bench` of any torch model and task (the test's tiny ones too)."""
    from edgekit.config import load_device

    device = load_device("desktop-cpu").model_copy(update={"threads": threads})
    calib, calib_y = task.arrays("calib", limit=num_calib)
    x, y = task.arrays("eval", limit=num_eval)
    labelled = getattr(task, "labelled", True)
    return Bench(name, model.eval(), task, calib, calib_y if labelled else None, x, y if labelled else None,
                 device, Path(work))


# ----------------------------------------------------------------------------- the rows


def make_fp32(b: Bench) -> Made:
    """The fp32 ONNX file, exported as the pipeline exports it (and cached for the int8 rows that start from it)."""
    from edgekit.export import export

    t0 = time.perf_counter()
    path = export("onnx", b.model, "fp32", {}, b.ctx("fp32"))
    return Made(path, "onnxruntime", time.perf_counter() - t0)


def _fp32(b: Bench) -> Path:
    if "fp32" not in b.made:
        b.made["fp32"] = make_fp32(b)
    return b.made["fp32"].path


def make_ort_default(b: Bench) -> Made:
    """``quantize_static`` with ORT's own defaults."""
    from edgekit.export.onnx_int8 import ORT_DEFAULT, quantize_onnx

    fp32 = _fp32(b)
    t0 = time.perf_counter()
    path = quantize_onnx(fp32, b.work / "ort-default.onnx", b.calib, ORT_DEFAULT)
    return Made(path, "onnxruntime", time.perf_counter() - t0, {"config": ORT_DEFAULT.label()})


NNCF_ROWS = {"nncf": "PERFORMANCE", "nncf-mixed": "MIXED"}


def make_nncf(b: Bench, preset: str = "PERFORMANCE") -> Made:
    """``nncf.quantize`` on the fp32 ONNX model with NNCF's CNN defaults but ``preset`` (module docstring)."""
    try:
        import nncf
    except ImportError:
        raise Unavailable(NNCF_MISSING) from None
    import onnx

    fp32 = _fp32(b)
    t0 = time.perf_counter()
    model = onnx.load(str(fp32))
    input_name = model.graph.input[0].name
    data = nncf.Dataset([b.calib[i:i + 1] for i in range(len(b.calib))], lambda x: {input_name: x})
    q = nncf.quantize(model, data, preset=getattr(nncf.QuantizationPreset, preset), subset_size=len(b.calib))
    path = b.work / f"nncf-{preset.lower()}.onnx"
    onnx.save(q, str(path))
    return Made(path, "onnxruntime", time.perf_counter() - t0,
                {"config": f"nncf {md.version('nncf')} quantize: preset {preset}, target_device ANY, "
                           f"fast_bias_correction, subset_size {len(b.calib)}"})


def make_litert(b: Bench) -> Made:
    """edgekit's LiteRT int8 (litert-torch PT2E, full-integer)."""
    try:
        from edgekit.export.tflite import convert_int8
        import litert_torch  # noqa: F401
    except ImportError as exc:
        raise Unavailable(f"needs {exc.name or exc}: pip install -e .[tflite]") from None
    t0 = time.perf_counter()
    path = b.work / "litert-int8.tflite"
    rewired = convert_int8(b.model, path, tuple(b.task.input_shape), b.calib)
    return Made(path, "litert", time.perf_counter() - t0,
                {"config": "litert-torch PT2E int8 per-channel, full-integer", "float_edges_rewired": rewired})


def make_edgekit_ptq(b: Bench, adaround: Optional[bool] = False) -> Made:
    """The ``onnx`` int8 variant of the int8 recipe on this machine: calibration auto and the layout search, timed
    here with the pipeline's timer; ``adaround=None`` is the ``adaround: null`` option (auto tries AdaRound on its
    best candidate and keeps it if the calibration SQNR rises)."""
    from edgekit.export import export
    from edgekit.pipeline.stages import local_timer

    _fp32(b)  # in the cache: the exporter quantizes the same fp32 file as every other row
    ctx = b.ctx("edgekit-ptq" if adaround is False else "edgekit-adaround", timer=local_timer(b.device))
    t0 = time.perf_counter()
    path = export("onnx", b.model, "int8", {"calibration": "auto", "num_calib": len(b.calib), "adaround": adaround},
                  ctx)
    q = ctx.info["quantization"]
    return Made(path, "onnxruntime", time.perf_counter() - t0,
                {"config": q["config"], "calibration_sqnr_db": q.get("calibration_sqnr_db"),
                 "search_decision": q.get("search_decision"), "quantization": q})


def fallback_budget(b: Bench, min_agreement: float = 0.99, max_drop_pp: float = 0.5):
    from edgekit.export.fallback import Budget

    return Budget(max_drop_pp=max_drop_pp) if b.labelled else Budget(min_agreement=min_agreement)


def make_edgekit_fallback(b: Bench, min_agreement: float = 0.99, max_drop_pp: float = 0.5) -> Made:
    """The edgekit PTQ model handed layers back to float until the budget holds on the calibration split, each
    step timed here (``int8_fallback`` with ``timed_pricer``, as ``min_agreement`` / ``max_drop_pp`` do)."""
    from edgekit.export.fallback import fallback_label, int8_fallback, timed_pricer
    from edgekit.export.onnx_int8 import OrtQuantConfig
    from edgekit.measure.local import interleaved_latency

    if "edgekit-ptq" not in b.made:
        b.made["edgekit-ptq"] = make_edgekit_ptq(b)
    ptq = b.made["edgekit-ptq"]
    q = ptq.info["quantization"]  # the exporter records every field of the config it chose
    cfg = OrtQuantConfig(**{f.name: q[f.name] for f in fields(OrtQuantConfig) if f.name in q})
    path = b.work / "edgekit-fallback.onnx"
    shutil.copyfile(ptq.path, path)
    budget = fallback_budget(b, min_agreement, max_drop_pp)
    t0 = time.perf_counter()
    path, cfg, record = int8_fallback(_fp32(b), path, b.calib, b.calib_labels, cfg, budget,
                                      timed_pricer(interleaved_latency, b.threads, b.calib[:1]))
    return Made(path, "onnxruntime", ptq.seconds + time.perf_counter() - t0,
                {"config": cfg.label() + fallback_label(cfg), "budget": budget.text(), "outcome": record["outcome"],
                 "met": record.get("met"), "float_nodes": len(cfg.nodes_to_exclude),
                 "recommend_fp32": record.get("recommend_fp32"), "fallback_s": record.get("seconds"),
                 "ptq_s": round(ptq.seconds, 1)})


def calib_task(b: Bench):
    """The calibration images as a training split (QAT trains on them only): their labels where the task has
    them, else the fp32 model's argmax (the loss gives hard labels no weight at alpha 1)."""
    import torch
    from torch.utils.data import Subset, TensorDataset

    from edgekit.data.tasks import Task

    labels = b.calib_labels
    if labels is None:
        with torch.no_grad():
            labels = np.concatenate([b.model(torch.from_numpy(b.calib[i:i + 64])).argmax(1).numpy()
                                     for i in range(0, len(b.calib), 64)])
    ds = TensorDataset(torch.from_numpy(np.ascontiguousarray(b.calib)), torch.from_numpy(labels.astype(np.int64)))
    t = b.task
    return Task(f"{t.name}-calib", t.num_classes, t.in_chans, t.input_size,
                {"train": ds, "calib": ds, "eval": Subset(ds, [])}, source=f"{t.name} calibration split",
                labelled=b.labelled, preprocess=t.preprocess)


def make_edgekit_qat(b: Bench, epochs: float, lr: Optional[float] = None) -> Made:
    """The ``qat`` step on the calibration images (distillation from fp32), exported by the ``onnx`` exporter.
    ``lr``: None is the step's default (a tenth of the model's fine-tune lr)."""
    from edgekit.export import export
    from edgekit.steps import StepContext
    from edgekit.steps.params import QatParams
    from edgekit.steps.qat import Qat

    t0 = time.perf_counter()
    ctx = StepContext(task=calib_task(b), baseline=b.model, model_name=b.name, device=b.device)
    step = Qat(QatParams(epochs=epochs, lr=lr, batch_size=QAT_BATCH, num_calib=len(b.calib), evaluate=False))
    qm = step.apply(b.model, ctx)
    ectx = b.ctx("edgekit-qat")
    path = export("onnx", qm, "int8", {}, ectx)
    info = ctx.info.get("qat", {})
    return Made(path, "onnxruntime", time.perf_counter() - t0,
                {"config": ectx.info["quantization"]["config"] + f" (QAT {epochs:g} epochs on "
                           f"{len(b.calib)} calibration images, lr {info.get('lr')})",
                 "epochs": epochs, "lr": info.get("lr"), "alpha": info.get("alpha"), "batch_size": QAT_BATCH})


def make_row(b: Bench, row: str, qat_epochs: float, min_agreement: float = 0.99, max_drop_pp: float = 0.5,
             qat_lr: Optional[float] = None) -> Made:
    """Row ``row`` of ``b``; the fp32 and edgekit PTQ files are made once (other rows start from them)."""
    if row in ("fp32", "edgekit-ptq"):
        if row not in b.made:
            b.made[row] = make_fp32(b) if row == "fp32" else make_edgekit_ptq(b)
        return b.made[row]
    if row == "ort-default":
        return make_ort_default(b)
    if row in NNCF_ROWS:
        return make_nncf(b, NNCF_ROWS[row])
    if row == "litert":
        return make_litert(b)
    if row == "edgekit-adaround":
        return make_edgekit_ptq(b, adaround=None)
    if row == "edgekit-fallback":
        return make_edgekit_fallback(b, min_agreement, max_drop_pp)
    if row == "edgekit-qat":
        return make_edgekit_qat(b, qat_epochs, qat_lr)
    raise ValueError(f"unknown row {row!r}; rows: {', '.join(ROWS)}")


# ----------------------------------------------------------------------------- scoring and timing


def _finite(v: float) -> Optional[float]:
    return None if v is None or not math.isfinite(v) else v


def score_rows(b: Bench, made: Dict[str, Made]) -> Dict[str, dict]:
    """Eval-split logits of every row (batch 1, ``--threads``), scored against the fp32 ONNX logits."""
    from edgekit.evaluate import agreement, predict_arrays, sqnr_db, top1, topk_overlap
    from edgekit.runtime import load_runner

    logits = {k: predict_arrays(load_runner(m.runtime, m.path, threads=b.threads).run, b.x, batch_size=1,
                                description=f"evaluate {k}") for k, m in made.items()}
    ref = logits["fp32"]
    out = {}
    for k, v in logits.items():
        s = {"agreement": round(agreement(ref, v), 4), "top5_overlap": _round(topk_overlap(ref, v), 4),
             "sqnr_db": _round(_finite(sqnr_db(ref, v)), 2)}
        if b.labelled:
            s["top1"] = round(top1(v, b.y), 4)
        out[k] = s
    return out


def _round(v, n):
    return None if v is None else round(v, n)


def time_rows(b: Bench, made: Dict[str, Made], rounds: int, warmup: int = 20) -> Dict[str, dict]:
    """All rows in ONE round-robin loop, batch 1; the first edgekit row again in a second session (A/A control)."""
    from edgekit.measure.local import interleaved_latency
    from edgekit.runtime import load_runner

    runs = {k: load_runner(m.runtime, m.path, threads=b.threads).run for k, m in made.items()}
    aa = next((k for k in EDGEKIT_ROWS if k in made), None)
    if aa is not None:
        runs[aa + " (2nd session)"] = load_runner("onnxruntime", made[aa].path, threads=b.threads).run
    return interleaved_latency(runs, np.ascontiguousarray(b.x[:1]), warmup=warmup, rounds=rounds,
                               description=f"time {b.name}", raw=True)


def goal_check(rows: Dict[str, dict], lat: Dict[str, dict], labelled: bool) -> dict:
    """Which edgekit rows are at least as close to fp32 as NNCF (top-1 or agreement, and SQNR) and not slower than
    it beyond the noise (the whole interval of p50(NNCF) / p50(edgekit) below 1 and below the A/A interval).
    With both presets made, NNCF is the row closer to fp32 (SQNR, then the metric)."""
    from edgekit.measure.local import ratio_interval

    metric = "top1" if labelled else "agreement"
    ok = [k for k in NNCF_ROWS if rows.get(k, {}).get("status") == "ok"]
    if not ok:
        return {"holds": None, "why": "no NNCF row to compare with"}
    nk = max(ok, key=lambda k: (math.inf if rows[k]["sqnr_db"] is None else rows[k]["sqnr_db"], rows[k][metric]))
    n = rows[nk]
    aa_key = next((k for k in lat if k.endswith("(2nd session)")), None)
    aa = ratio_interval(lat[aa_key]["times"], lat[aa_key.split(" ")[0]]["times"]) if aa_key else (1.0, 1.0, 1.0)
    checks = {}
    for k in EDGEKIT_ROWS:
        r = rows.get(k)
        if not r or r.get("status") != "ok":
            continue
        ratio, lo, hi = ratio_interval(lat[nk]["times"], lat[k]["times"])
        sq, nsq = r["sqnr_db"], n["sqnr_db"]
        closer = r[metric] >= n[metric] - 1e-9 and (sq is None or (nsq is not None and sq >= nsq))
        slower = hi < min(1.0, aa[1])
        faster = lo > max(1.0, aa[2])
        checks[k] = {"closer_or_equal": closer, "metric": metric, "value": r[metric], "nncf": n[metric],
                     "sqnr_db": sq, "nncf_sqnr_db": nsq, "nncf_over_edgekit_p50": [round(ratio, 3), round(lo, 3),
                                                                                     round(hi, 3)],
                     "slower": slower, "faster": faster, "meets": closer and not slower}
    meeting = [k for k, c in checks.items() if c["meets"]]
    # the closest to fp32 of those: logits SQNR first (a top-1 above fp32's is not closer to it), then agreement
    best = max(meeting, key=lambda k: (math.inf if checks[k]["sqnr_db"] is None else checks[k]["sqnr_db"],
                                       rows[k]["agreement"])) if meeting else None
    return {"holds": bool(meeting) if checks else None, "best": best, "meeting": meeting, "rows": checks, "nncf": nk,
            "aa": [round(v, 3) for v in aa]}


# ----------------------------------------------------------------------------- one model


def bench_model(name: str, args, console: Console, work: Path) -> dict:
    b = load_bench(name, work, args.threads, args.epochs)
    variants = [v for v in args.variants.split(",") if v]
    rows: Dict[str, dict] = {}
    made: Dict[str, Made] = {}
    console.print(f"[bold]{name}[/]: {b.task.name}, input {b.task.input_size} px, {len(b.calib)} calibration / "
                  f"{len(b.x)} eval images")
    for v in ["fp32", *[v for v in variants if v != "fp32"]]:
        if v == "edgekit-qat" and name in args.skip_qat_models:
            rows[v] = {"status": "skipped", "reason": args.skip_qat_reason}
            console.print(f"  {v}: skipped ({args.skip_qat_reason})")
            continue
        try:
            m = make_row(b, v, args.qat_epochs, args.min_agreement, args.max_drop_pp, args.qat_lr)
        except Unavailable as exc:
            rows[v] = {"status": "unavailable", "reason": str(exc)}
            console.print(f"  {v}: [yellow]not made[/] ({exc})")
            continue
        except Exception as exc:  # noqa: BLE001 - one row failing never stops the others
            if v == "fp32":
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            rows[v] = {"status": "failed", "reason": f"{type(exc).__name__}: {first}"}
            console.print(f"  {v}: [red]failed[/] ({rows[v]['reason']})")
            continue
        made[v] = m
        rows[v] = {"status": "ok", "make_s": round(m.seconds, 1), "config": m.info.get("config", ""),
                   "info": {k: x for k, x in m.info.items() if k not in ("config", "quantization")}}
        console.print(f"  {v}: made in {m.seconds:.1f} s" + (f" ({rows[v]['config']})" if rows[v]["config"] else ""))
    scores = score_rows(b, made)
    load = [round(v, 2) for v in os.getloadavg()]  # the machine just before timing (other jobs show here)
    lat = time_rows(b, made, args.rounds)
    from edgekit.measure.local import ratio_interval

    for k in made:
        r, lo, hi = ratio_interval(lat["fp32"]["times"], lat[k]["times"])
        rows[k].update(scores[k], p50_ms=round(lat[k]["p50"], 3), p90_ms=round(lat[k]["p90"], 3),
                       vs_fp32=[round(r, 3), round(lo, 3), round(hi, 3)])
    aa_key = next((k for k in lat if k.endswith("(2nd session)")), None)
    result = {"model": name, "task": b.task.name, "labelled": b.labelled, "input": list(b.task.input_shape[1:]),
              "calib_images": len(b.calib), "eval_images": len(b.x), "load_before_timing": load, "rows": rows,
              "aa_control": None if aa_key is None else {
                  "row": aa_key, "p50_ms": round(lat[aa_key]["p50"], 3),
                  "first_over_second": [round(v, 3) for v in ratio_interval(lat[aa_key]["times"],
                                                                          lat[aa_key.split(" ")[0]]["times"])]},
              "goal": goal_check(rows, lat, b.labelled),
              "round_times_ms": {k: [round(t, 4) for t in v["times"]] for k, v in lat.items()}}
    if b.labelled:
        result["fp32_top1"] = rows["fp32"]["top1"]
    return result


# ----------------------------------------------------------------------------- output


def header() -> dict:
    from edgekit.hostinfo import cpu_name

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "load_avg": [round(v, 2) for v in os.getloadavg()],
            "versions": {d: version(d) for d in ("onnxruntime", "ai-edge-litert", "litert-torch", "nncf", "torch")}}


def header_line(h: dict, threads: int, rounds: int) -> str:
    v = h["versions"]
    return (f"{h['cpu']}, {h['cores']} cores, load {' '.join(f'{x:.2f}' for x in h['load_avg'])}; onnxruntime "
            f"{v['onnxruntime']}, ai-edge-litert {v['ai-edge-litert']}, litert-torch {v['litert-torch']}, nncf "
            f"{v['nncf']}, torch {v['torch']}; {threads} threads, batch 1, {rounds} interleaved rounds")


COLUMNS = ("model", "row", "top-1", "agreement w/ fp32", "top-5 overlap", "SQNR dB", "p50 ms", "p90 ms",
           "speed vs fp32 [95% CI]", "make s", "config / note")


def _cells(res: dict, row: str) -> List[str]:
    r = res["rows"][row]
    if r["status"] != "ok":
        return [res["model"], row, "", "", "", "", "", "", "", "", f"{r['status']}: {r['reason']}"]
    pct = lambda v: "" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    ratio, lo, hi = r["vs_fp32"]
    note = r["config"]
    if row == "edgekit-fallback":
        note += f"; {r['info'].get('outcome', '')}"
    return [res["model"], row, pct(r.get("top1")) if res["labelled"] else "n/a (no labels)", pct(r["agreement"]),
            pct(r["top5_overlap"]), "inf" if r["sqnr_db"] is None else f"{r['sqnr_db']:.2f}", f"{r['p50_ms']:.3f}",
            f"{r['p90_ms']:.3f}", f"{ratio:.2f}x [{lo:.2f}-{hi:.2f}]", f"{r['make_s']:.1f}", note]


def goal_text(res: dict) -> str:
    g = res["goal"]
    if g["holds"] is None:
        return f"{res['model']}: goal not checked ({g.get('why', 'no edgekit row')})"
    parts = []
    for k, c in g["rows"].items():
        ratio, lo, hi = c["nncf_over_edgekit_p50"]
        speed = "slower" if c["slower"] else "faster" if c["faster"] else "equal within noise"
        parts.append(f"{k} {c['metric']} {100 * c['value']:.1f}% vs {g.get('nncf', 'nncf')} "
                     f"{100 * c['nncf']:.1f}%, SQNR "
                     f"{c['sqnr_db']} vs {c['nncf_sqnr_db']} dB, {speed} (p50 NNCF/edgekit {ratio:.2f} "
                     f"[{lo:.2f}-{hi:.2f}]) -> {'meets' if c['meets'] else 'misses'}")
    verdict = f"HOLDS (closest of those that meet it: {g['best']})" if g["holds"] else "does NOT hold"
    load = res.get("load_before_timing")
    aa = "{:.2f} [{:.2f}-{:.2f}]".format(*g["aa"])
    return f"{res['model']}: goal {verdict}; load before timing {load}; A/A {aa}; " + "; ".join(parts)


def render(results: List[dict], head: str, markdown: bool) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=260, record=False)
    table = Table(title=f"int8 peers: {head}", caption="scores on the eval split only (calibration never sees it); "
                  "'agreement w/ fp32' is top-1 agreement with the fp32 ONNX model, not accuracy")
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("model", "row", "config / note") else "right",
                         overflow="fold", max_width=90 if c == "config / note" else None)
    md_lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for res in results:
        keys = [k for k in ROWS if k in res["rows"]]
        for i, k in enumerate(keys):
            cells = _cells(res, k)
            table.add_row(*cells, end_section=i == len(keys) - 1)
            md_lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    console.print(table)
    for res in results:
        console.print(goal_text(res))
    text = buf.getvalue()
    if markdown:
        text += "\n" + "\n".join(md_lines) + "\n"
    return text


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(PHOTO_MODELS))
    ap.add_argument("--variants", default=",".join(ROWS), help=f"rows to make (fp32 always): {', '.join(ROWS)}")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every runner")
    ap.add_argument("--rounds", type=int, default=200, help="interleaved timing rounds per model")
    ap.add_argument("--qat-epochs", type=float, default=4,
                    help="QAT epochs over the calibration images (default 4: 20 steps of 16 photos; measured here, "
                         "EfficientNet-Lite0's training took about 1 minute on 2 cores, and Lite2 has about 2.2x its "
                         "MACs, so a Lite model's QAT row stays under about 5 minutes)")
    ap.add_argument("--qat-lr", type=float, help="QAT learning rate (default: the qat step's, a tenth of the "
                    "model's fine-tune lr)")
    ap.add_argument("--skip-qat", default="", help="comma-separated models whose QAT row is left out (say why with "
                    "--skip-qat-reason)")
    ap.add_argument("--skip-qat-reason", default="", help="the reason printed for --skip-qat")
    ap.add_argument("--min-agreement", type=float, default=0.99, help="fallback budget on unlabelled data")
    ap.add_argument("--max-drop-pp", type=float, default=0.5, help="fallback budget on labelled data")
    ap.add_argument("--epochs", type=float, default=4, help="training epochs of MNIST baselines (cached)")
    ap.add_argument("--json", type=Path, help="write the results here (and the printed table beside it, .txt)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table too")
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v and v not in ROWS]
    if unknown:
        ap.error(f"unknown variants {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    args.skip_qat_models = {m for m in args.skip_qat.split(",") if m}
    args.skip_qat_reason = args.skip_qat_reason or "left out with --skip-qat"
    if set(NNCF_ROWS) & set(args.variants.split(",")):
        try:
            import nncf  # noqa: F401
        except ImportError:
            print(NNCF_MISSING)
    console = Console(width=260)
    h = header()
    started = time.time()
    results = []
    for name in [n for n in args.models.split(",") if n]:
        with tempfile.TemporaryDirectory(prefix="edgekit-peers-") as d:
            results.append(bench_model(name, args, console, Path(d)))
    h["load_avg_after"] = [round(v, 2) for v in os.getloadavg()]
    head = header_line(h, args.threads, args.rounds)
    text = render(results, head, args.markdown)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"header": h, "header_line": head, "threads": args.threads, "rounds": args.rounds,
               "qat_epochs": args.qat_epochs, "qat_lr": args.qat_lr, "qat_batch": QAT_BATCH,
               "min_agreement": args.min_agreement, "max_drop_pp": args.max_drop_pp,
               "seconds": round(time.time() - started), "results": results}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        args.json.with_suffix(".txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
