"""Accuracy-aware int8 layer fallback, priced in latency: the ``onnx`` options ``min_agreement`` / ``max_drop_pp``.

After the int8 model is made (by whatever calibration and layout search chose), it is scored against the budget
on the calibration split. The eval split is never used here, so the report's scores for the variant stay unseen
ones; the price is that the budget is checked on the images the ranges were calibrated on. If the budget is missed,
layers go back to float, the most rewarding first, each step re-quantized by ORT with ``nodes_to_exclude``
(calibration ranges and weight scales are remembered, so a step costs a graph rewrite and a pass over the
calibration images), until the budget holds or :data:`MAX_STEPS` steps are spent: one layer per step at first,
then half again as many as are in float already. All steps are then priced together: timed here round-robin with
fp32 (the export's timer, where the device is this machine), else estimated by ``edgekit.estimate`` for the device,
and labelled so. A step that holds the budget but is not faster than fp32 beyond the timing noise is no reason to
ship int8: the record then says fp32 is the better choice, and ``pipeline.assemble.recommend`` never picks it.

Ranking, in two passes. First a probe quantization keeps every weight in float behind a QuantizeLinear ->
DequantizeLinear pair (ORT's ``AddQDQPairToWeight``), and a float twin of each quantized Conv/Gemm/MatMul reads the
values its Q/DQ pairs quantize: the twin's output against the node's is the noise that node's own quantization adds
where it sits (its local SQNR), all layers in one forward pass. Local noise is not logits noise (on
EfficientNet-Lite0 the worst local layer, a late projection, wins nothing back), so the :data:`SHORTLIST` worst
are then each re-quantized alone in float, and ranked by the logits SQNR that wins back on :data:`PROBE_IMAGES`
calibration images: exactly what a step does, for a bounded number of re-quantizations. A layer that wins nothing
back alone (or loses: ORT then quantizes a ReLU6 it had folded away) is not handed back.

A layer handed back is a group: ORT quantizes a tensor for all its readers or for none, so a conv reads a float
input only when the tensor's producer and its other readers are excluded with it. The group is the node and the
named nodes around each activation it reads through a Q/DQ pair.

Under AdaRound (``adaround``: minutes per quantization of a 224 px model) the ranking (against a step 0 quantized
again without it) and the steps after step 0 are quantized, scored and priced without it; only the step shipped is
quantized again with it (its record then holds the scores without AdaRound, which it only improves on the
calibration split).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import EdgekitError
from .tensorrt_qdq import _consumers as _readers, _producers  # one graph index for both Q/DQ passes

MAX_STEPS = 8  # re-quantizations at most
GROWTH = 1.5  # each step hands back half as many layers again as are in float already (at least one)
PROBE_IMAGES = 32  # calibration images the ranking is measured on (one at a time)
SHORTLIST = 24  # layers, lowest local SQNR first, re-quantized alone in float to rank them
TIMING_ROUNDS = 50
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")
FOLDED_OPS = ("Relu", "Clip")  # activations ORT's QDQ quantizer may drop into the Q/DQ range before them
CALIB_ONLY = ("the calibration split (the images int8 was calibrated on; the eval split stays unseen, so the "
              "report's scores for this variant are not the ones the fallback chose by)")


@dataclass(frozen=True)
class Budget:
    """What the int8 model must keep on the calibration split: top-1 agreement with fp32 (a fraction) and/or at
    most ``max_drop_pp`` points of top-1 accuracy below fp32's (labelled data only)."""

    min_agreement: Optional[float] = None
    max_drop_pp: Optional[float] = None

    @classmethod
    def from_options(cls, options) -> Optional["Budget"]:
        a, d = getattr(options, "min_agreement", None), getattr(options, "max_drop_pp", None)
        return None if a is None and d is None else cls(a, d)

    @property
    def metric(self) -> str:
        """What the steps are judged and plotted by: accuracy only when the budget is on accuracy alone."""
        return "accuracy" if self.min_agreement is None else "agreement"

    def text(self) -> str:
        parts = []
        if self.min_agreement is not None:
            parts.append(f"top-1 agreement with fp32 >= {100 * self.min_agreement:.2f}%")
        if self.max_drop_pp is not None:
            parts.append(f"top-1 accuracy at most {self.max_drop_pp:g} points below fp32's")
        return " and ".join(parts)

    def holds(self, s: dict) -> bool:
        ok = self.min_agreement is None or s["agreement"] >= self.min_agreement - 1e-9
        return ok and (self.max_drop_pp is None or s["drop_pp"] <= self.max_drop_pp + 1e-9)


def scores(ref: np.ndarray, out: np.ndarray, labels: Optional[np.ndarray]) -> dict:
    """Calibration-split scores of ``out`` against the fp32 logits ``ref`` (and the labels where there are any)."""
    from ..evaluate import agreement, sqnr_db, top1

    s = {"agreement": round(agreement(ref, out), 4), "sqnr_db": round(sqnr_db(ref, out), 2)}
    if labels is not None:
        acc, acc_fp32 = top1(out, labels), top1(ref, labels)
        s.update(accuracy=round(acc, 4), drop_pp=round(100 * (acc_fp32 - acc), 2))
    return s


def quantized_layers(model) -> List[str]:
    """Names of the Conv/Gemm/MatMul nodes of an int8 QDQ graph whose weights (second input) are dequantized, in
    graph order: those ORT quantized, not a float layer that only reads a quantized activation."""
    made_by = _producers(model.graph)
    return [n.name for n in model.graph.node if n.op_type in COMPUTE_OPS and n.name and len(n.input) > 1
            and getattr(made_by.get(n.input[1]), "op_type", None) == "DequantizeLinear"]


def layer_group(model, name: str, depth: int = 4) -> Tuple[str, ...]:
    """``name`` and the named nodes that must go to float with it for its activation inputs to be float: the
    producer and every reader of each tensor it reads through a QuantizeLinear -> DequantizeLinear pair, and, where
    that producer is a one-input op that is not quantized itself (a ReLU between two convs quantized conv-only),
    the same again for its input, up to ``depth`` ops back."""
    g = model.graph
    made_by, read_by = _producers(g), _readers(g)
    by_name = {n.name: n for n in g.node if n.name}
    group = [name]

    def through_qdq(node) -> list:  # the QuantizeLinear nodes of the activations ``node`` reads
        out = []
        for i in node.input:
            dq = made_by.get(i)
            q = made_by.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":  # else a weight (DQ of an initializer) or float
                out.append(q)
        return out

    def close(node, left: int) -> None:
        for q in through_qdq(node):
            src = made_by.get(q.input[0])
            around = [src] if src is not None else []
            for d in read_by.get(q.output[0], []):
                around += list(read_by.get(d.output[0], [])) if d.op_type == "DequantizeLinear" else []
            for n in around:
                if n.name and n.op_type not in ("QuantizeLinear", "DequantizeLinear") and n.name not in group:
                    group.append(n.name)
            if src is not None and left > 0 and src.op_type not in COMPUTE_OPS and len(through_qdq(src)) == 1 \
                    and sum(1 for i in src.input if i and i in made_by) == 1:
                close(src, left - 1)

    close(by_name[name], depth)
    return tuple(group)


def local_sqnr(fp32_path: Path, calib: np.ndarray, cfg, layers: Sequence[str], tmp: Path) -> Dict[str, float]:
    """Each layer's local SQNR in dB (module docstring), on the first :data:`PROBE_IMAGES` calibration images.

    A ReLU/Clip that ORT folded away is copied from ``fp32_path``; under ``equalize`` (CLE rescales the graph before
    quantization, and may turn a ReLU6 into a ReLU) that copy is approximate, which only shifts the shortlist."""
    import onnx
    import onnxruntime as ort

    from .onnx_int8 import quantize_onnx

    probe = quantize_onnx(fp32_path, tmp / "probe.onnx", calib,
                          replace(cfg, extra_options={**cfg.extra_options, "AddQDQPairToWeight": True}))
    m = onnx.load(str(probe))
    made_by = _producers(m.graph)
    fp32 = onnx.load(str(fp32_path), load_external_data=False)
    fp32_made_by, fp32_inits = _producers(fp32.graph), {i.name: i for i in fp32.graph.initializer}
    have = {i.name for i in m.graph.initializer}
    activations: Dict[str, str] = {}

    def unfolded(t: str) -> str:
        """``t`` as fp32 computes it. Where ORT folded a ReLU/Clip into the Q/DQ range before it (the tensor keeps
        the activation's name but holds the conv's output), a copy of that activation, else ``t`` itself."""
        orig, now = fp32_made_by.get(t), made_by.get(t)
        if orig is None or now is None or orig.op_type == now.op_type or orig.op_type not in FOLDED_OPS:
            return t
        if t not in activations:
            act = onnx.NodeProto()
            act.CopyFrom(orig)
            act.name, act.input[0], act.output[0] = orig.name + "__edgekit_act", t, t + "__edgekit_act"
            m.graph.node.append(act)
            for i in act.input[1:]:
                if i and i in fp32_inits and i not in have:
                    m.graph.initializer.append(fp32_inits[i])
                    have.add(i)
            activations[t] = act.output[0]
        return activations[t]

    def float_of(t: str) -> str:  # the value a Q/DQ pair quantizes, else the tensor itself
        dq = made_by.get(t)
        q = made_by.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        return unfolded(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else t

    wanted, pairs = set(layers), {}
    for n in list(m.graph.node):
        if n.name in wanted:
            twin = onnx.NodeProto()
            twin.CopyFrom(n)
            twin.name = n.name + "__edgekit_float"
            del twin.input[:], twin.output[:]
            twin.input.extend(float_of(i) for i in n.input)
            twin.output.append(n.output[0] + "__edgekit_float")
            m.graph.node.append(twin)
            pairs[n.name] = (n.output[0], twin.output[0])
    for a, b in pairs.values():
        for t in (a, b):
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the Q/DQ pairs as written
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del m
    names = [t for ab in pairs.values() for t in ab]
    signal = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    inp = sess.get_inputs()[0].name
    for x in calib[:PROBE_IMAGES]:
        outs = dict(zip(names, sess.run(names, {inp: np.ascontiguousarray(x[None], dtype=np.float32)})))
        for k, (a, b) in pairs.items():
            ref = outs[b].astype(np.float64)
            signal[k] += float((ref ** 2).sum())
            noise[k] += float(((ref - outs[a]) ** 2).sum())
    return {k: float("inf") if noise[k] == 0 else round(10 * np.log10(max(signal[k], 1e-30) / noise[k]), 2)
            for k in pairs}


Pricer = Callable[[Dict[str, Path]], Tuple[Dict[str, dict], str]]


def timed_pricer(timer, threads: int, x1: np.ndarray) -> Pricer:
    """Prices models by timing them here, round-robin (``ExportContext.timer``), with per-round times."""
    def price(paths: Dict[str, Path]) -> Tuple[Dict[str, dict], str]:
        from ..runtime import load_runner

        runners = {k: load_runner("onnxruntime", p, threads=threads).run for k, p in paths.items()}
        lat = timer(runners, x1, warmup=10, rounds=TIMING_ROUNDS, description="time the fallback steps", raw=True)
        return {k: {"p50": v["p50"], "times": v.get("times")} for k, v in lat.items()}, "measured"
    return price


def estimated_pricer(device, threads: int) -> Pricer:
    """Prices models with edgekit's latency model for ``device`` (it is not this machine): labelled estimated."""
    def price(paths: Dict[str, Path]) -> Tuple[Dict[str, dict], str]:
        from ..estimate import estimate

        return {k: {"p50": estimate(p, device, threads=threads).p50} for k, p in paths.items()}, "estimated"
    return price


def _vs_fp32(fp32: dict, step: dict) -> Tuple[float, float, float]:
    """p50(fp32) / p50(step) and its 95% interval where there are per-round times (above 1: faster)."""
    if fp32.get("times") and step.get("times"):
        from ..measure.local import ratio_interval

        return ratio_interval(fp32["times"], step["times"])
    r = fp32["p50"] / step["p50"]
    return r, r, r


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def rank_layers(fp32_path: Path, int8_path: Path, calib: np.ndarray, cfg, ref: np.ndarray, base_sqnr: float,
                logits: Callable[[Path, int], np.ndarray], tmp: Path, shortlist: int = SHORTLIST) -> List[dict]:
    """The quantized layers worth handing back, most rewarding first (module docstring): the ``shortlist`` lowest
    by local SQNR, each re-quantized alone in float (with its group) and kept when that wins back logits SQNR on
    the first :data:`PROBE_IMAGES` calibration images. Rows: node, op, local SQNR, gain alone, group."""
    import onnx

    from ..evaluate import sqnr_db
    from .onnx_int8 import quantize_onnx

    model = onnx.load(str(int8_path), load_external_data=False)
    local = local_sqnr(fp32_path, calib, cfg, quantized_layers(model), tmp)
    ops = {n.name: n.op_type for n in model.graph.node}
    rows = [{"node": k, "op": ops[k], "local_sqnr_db": v, "group": list(layer_group(model, k))}
            for k, v in sorted(local.items(), key=lambda kv: kv[1])[:shortlist]]
    del model
    for r in rows:
        try:
            p = quantize_onnx(fp32_path, tmp / "alone.onnx", calib,
                              replace(cfg, nodes_to_exclude=tuple(dict.fromkeys([*cfg.nodes_to_exclude, *r["group"]]))))
        except (ValueError, RuntimeError, AssertionError) as exc:  # ORT refuses this exclusion: not a candidate
            r.update(gain_alone_db=None, error=_first_line(exc))
            continue
        r["gain_alone_db"] = round(sqnr_db(ref[:PROBE_IMAGES], logits(p, PROBE_IMAGES)) - base_sqnr, 2)
    return sorted(rows, key=lambda r: -(r["gain_alone_db"] if r["gain_alone_db"] is not None else -np.inf))


def int8_fallback(fp32_path: Path, int8_path: Path, calib: np.ndarray, labels: Optional[np.ndarray], cfg,
                  budget: Budget, price: Pricer, max_steps: Optional[int] = None):
    """Hand layers of ``int8_path`` back to float until ``budget`` holds on ``calib`` (module docstring).

    ``labels``: the calibration labels (None without). ``max_steps``: re-quantizations at most (default
    :data:`MAX_STEPS`). Returns (the model to ship, written over ``int8_path``; its config, ``nodes_to_exclude``
    filled; report.json's ``fallback`` record).
    """
    from ..evaluate import sqnr_db
    from ..runtime import load_runner
    from .onnx_int8 import quantize_onnx

    max_steps = MAX_STEPS if max_steps is None else max_steps
    started = time.perf_counter()
    if budget.max_drop_pp is not None and labels is None:
        raise EdgekitError("int8 option max_drop_pp is top-1 points on the calibration labels, and this data has "
                           "none: use min_agreement (top-1 agreement with fp32) instead")

    def logits(path: Path, n: Optional[int] = None) -> np.ndarray:
        run = load_runner("onnxruntime", path, threads=1).run
        return np.concatenate([run(calib[i:i + 1]) for i in range(len(calib) if n is None else min(n, len(calib)))])

    ref, out0 = logits(fp32_path), logits(int8_path)
    steps = [{"step": 0, "added": [], "float_nodes": list(cfg.nodes_to_exclude), **scores(ref, out0, labels)}]
    info = {"budget": {"min_agreement": budget.min_agreement, "max_drop_pp": budget.max_drop_pp},
            "budget_text": budget.text(), "metric": budget.metric, "judged_on": CALIB_ONLY,
            "num_calib": len(calib), "max_steps": max_steps, "steps": steps}
    if budget.holds(steps[0]):
        info.update(met=True, met_at_step=0, shipped_step=0, recommend_fp32=False,
                    outcome="met without fallback: the int8 model holds the budget as it is")
        return int8_path, cfg, info
    shipped_cfg, cfg = cfg, replace(cfg, adaround=False)  # the search without AdaRound (module docstring)
    with tempfile.TemporaryDirectory(prefix="edgekit-fb-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        start = int8_path
        if shipped_cfg.adaround:
            start = quantize_onnx(fp32_path, tmp / "step0.onnx", calib, cfg)
            out0 = logits(start)
        ranking = rank_layers(fp32_path, start, calib, cfg, ref, sqnr_db(ref[:PROBE_IMAGES], out0[:PROBE_IMAGES]),
                              logits, tmp)
        info.update(ranking=ranking, ranking_seconds=round(time.perf_counter() - t0, 1))
        del out0
        paths = {"0": int8_path}
        excluded, handed = list(cfg.nodes_to_exclude), 0
        queue = [r for r in ranking if (r["gain_alone_db"] or 0) > 0]  # a layer that wins nothing back stays int8
        while queue and len(steps) <= max_steps and not budget.holds(steps[-1]):
            batch: List[Tuple[dict, List[str]]] = []
            want = max(1, round(handed * (GROWTH - 1)))  # 1, 1, 1, 2, 2, 4, 6, 8 layers: 25 by step 8
            while queue and len(batch) < want:
                r = queue.pop(0)
                added = [n for n in r["group"] if n not in excluded and all(n not in a for _, a in batch)]
                if added:
                    batch.append((r, added))
            if not batch:
                break
            added = [n for _, a in batch for n in a]
            p = tmp / f"step{len(steps)}.onnx"
            try:
                quantize_onnx(fp32_path, p, calib, replace(cfg, nodes_to_exclude=tuple(excluded + added)))
            except (ValueError, RuntimeError, AssertionError) as exc:  # ORT refuses these exclusions: stop here
                info["failed"] = {"layers": [r["node"] for r, _ in batch], "error": _first_line(exc)}
                break
            excluded += added
            handed += len(batch)
            paths[str(len(steps))] = p
            steps.append({"step": len(steps), "added": added, "float_nodes": list(excluded),
                          "layers": [{k: r[k] for k in ("node", "op", "local_sqnr_db", "gain_alone_db")}
                                     for r, _ in batch], **scores(ref, logits(p), labels)})
        useful = sum(1 for r in ranking if (r["gain_alone_db"] or 0) > 0)
        stopped = ("as ONNX Runtime could not quantize with the next layers in float" if "failed" in info else
                   f"within {max_steps} steps (the limit; {handed} layers in float)" if len(steps) > max_steps else
                   f"with every layer that wins SQNR back alone in float ({useful} of the {len(ranking)} worst "
                   f"by local SQNR)")
        prices, source = price({"fp32": fp32_path, **paths})
        fp32 = prices["fp32"]
        info.update(latency_source=source, fp32_p50_ms=round(fp32["p50"], 4))
        for st in steps:
            pr = prices[str(st["step"])]
            r, lo, hi = _vs_fp32(fp32, pr)
            st.update(p50_ms=round(pr["p50"], 4), latency_source=source,
                      vs_fp32=[round(r, 3), round(lo, 3), round(hi, 3)], faster_than_fp32=bool(lo > 1))
        met = next((st["step"] for st in steps if budget.holds(st)), None)
        key = "agreement" if budget.metric == "agreement" else "accuracy"
        ship = met if met is not None else max(steps, key=lambda st: (st[key], st["sqnr_db"], -st["step"]))["step"]
        chosen = steps[ship]
        info.update(met=met is not None, met_at_step=met, shipped_step=ship,
                    recommend_fp32=met is None or not chosen["faster_than_fp32"],
                    outcome=_outcome(met, chosen, fp32["p50"], source, stopped))
        if ship and shipped_cfg.adaround:
            quantize_onnx(fp32_path, int8_path, calib,
                          replace(shipped_cfg, nodes_to_exclude=tuple(chosen["float_nodes"])))
        elif ship:
            shutil.copyfile(paths[str(ship)], int8_path)
        info["seconds"] = round(time.perf_counter() - started, 1)
    return int8_path, replace(shipped_cfg, nodes_to_exclude=tuple(chosen["float_nodes"])), info


def _outcome(met: Optional[int], chosen: dict, fp32_ms: float, source: str, stopped: str) -> str:
    n = len(chosen["float_nodes"])
    r, lo, hi = chosen["vs_fp32"]
    speed = f"p50 {chosen['p50_ms']:.3f} ms vs fp32 {fp32_ms:.3f} ms, {source}; fp32/step {r:.2f}" + (
        f", 95% interval [{lo:.2f}, {hi:.2f}]" if lo != hi else "")
    if met is not None and chosen["faster_than_fp32"]:
        return f"met at step {met} with {n} nodes in float ({speed})"
    if met is not None:
        return (f"met only at step {met} ({n} nodes in float), which is not faster than fp32 ({speed}): "
                f"use fp32 on this device")
    return (f"not met {stopped}; the closest, step {chosen['step']} ({n} nodes in float, {speed}), is shipped as this "
            f"variant, and fp32 is recommended over it")


def fallback_label(cfg) -> str:
    """The config label's tail: how many nodes the fallback left in float."""
    return f" +{len(cfg.nodes_to_exclude)} nodes fp32" if cfg.nodes_to_exclude else ""
