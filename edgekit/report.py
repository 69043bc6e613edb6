"""report.json, report.md and report.html (with an accuracy-vs-latency plot) from one report dict.

A run on unlabelled images (``task.labelled`` false) has no accuracy: its tables, plot and sentences say
"agreement with fp32 on N unlabelled images" and show top-5 overlap and logits SQNR instead.

report.html is rendered from ``templates/report.html.j2`` by Jinja2 with autoescaping on: model, device and
variant names, notes and error messages come from the user's files and folders, so none of them is pasted into
markup by hand.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

COLUMNS = ["variant", "format", "precision", "size MB", "params", "MMACs", "accuracy", "agreement",
           "p50 ms", "p90 ms", "speedup", "status"]
# a run on unlabelled images has no accuracy: its variants are judged against fp32 only
UNLABELLED_COLUMNS = ["variant", "format", "precision", "size MB", "params", "MMACs", "agreement",
                      "top-5 overlap", "SQNR dB", "p50 ms", "p90 ms", "speedup", "status"]


def unlabelled(report: dict) -> bool:
    """Whether the run's images had no labels (report.json's task says ``labelled: false``)."""
    return (report.get("task") or {}).get("labelled", True) is False


# a detector: COCO mAP on the labels, and mAP against fp32's own detections in place of top-1 agreement
DETECTION_COLUMNS = ["variant", "format", "precision", "size MB", "params", "MMACs", "mAP", "mAP50",
                     "mAP vs fp32", "p50 ms", "p90 ms", "speedup", "status"]


def detection(report: dict) -> bool:
    return (report.get("task") or {}).get("kind") == "detection"


def columns(report: dict) -> List[str]:
    if detection(report):
        return DETECTION_COLUMNS
    return UNLABELLED_COLUMNS if unlabelled(report) else COLUMNS


def judged_on(report: dict) -> str:
    """What the scores are measured on, for the task line ("N eval images", or "agreement with fp32 on N unlabelled
    images"), and the other splits' sizes: train, calibration and evaluation never share an image."""
    t = report.get("task") or {}
    n = t.get("num_eval", "?")
    head = f"agreement with fp32 on {n} unlabelled images" if unlabelled(report) else f"{n} eval images"
    others = [f"{t[k]} {word}" for k, word in (("num_calib", "calibration"), ("num_train", "training")) if t.get(k)]
    if not others:
        return head
    return f"{head}; {' and '.join(others)} images, none of them evaluated"


def _db(x) -> str:
    if x is None:
        return "—"
    return "∞" if x == float("inf") else f"{x:.1f}"


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _ms(lat: Optional[dict], key: str) -> str:
    if not lat or lat.get(key) is None:
        return "—"
    mark = "" if lat.get("source") == "measured" else " (est.)"
    return f"{lat[key]:.3f}{mark}"


def status_mark(v: dict) -> str:
    return {"ok": "✅", "unavailable": "❎", "failed": "❌"}.get(v.get("status", "ok"), "❌")


def status_text(v: dict) -> str:
    """The mark with its word ("✅ ok"): an emoji alone is lost on screen readers, grep and some fonts."""
    status = v.get("status", "ok")
    return f"{status_mark(v)} {status if status in ('ok', 'unavailable') else 'failed'}"


def latency_basis(lat: Optional[dict]) -> str:
    """How a latency figure was obtained, in words: measured, or estimated and whether its coefficients were
    calibrated. report.json's ``coefficients`` names the host and date a fit was timed on; the shipped starting
    values of a profile carry none (or ``status: uncalibrated ...``), and a reader must not take them for timings."""
    if not lat:
        return "not available"
    if lat.get("source") == "measured":
        return "measured"
    coef = lat.get("coefficients") or {}
    if "uncalibrated" in str(coef.get("status", "")).lower() or not (coef.get("host") or coef.get("date")):
        return "estimated, uncalibrated coefficients"
    where = " on " + str(coef["host"]) if coef.get("host") else ""
    when = f" ({coef['date']})" if coef.get("date") else ""
    return f"estimated, coefficients calibrated{where}{when}"


def _estimated(report: dict) -> List[dict]:
    return [v["latency_ms"] for v in report["variants"]
            if v.get("latency_ms") and v["latency_ms"].get("source") not in (None, "measured")]


def _threads(report: dict) -> str:
    """Threads the latency figures were taken (or estimated) at; the profile's setting when there are none."""
    seen = sorted({str(v["latency_ms"]["threads"]) for v in report["variants"]
                   if v.get("latency_ms") and v["latency_ms"].get("threads") is not None})
    if seen:
        return ", ".join(seen)
    t = (report.get("device_profile") or {}).get("threads")
    return str(t) if t else "all cores"


def machine_line(report: dict) -> str:
    """The machine this run happened on and the latency thread count: a measured figure means little without them."""
    m = report.get("machine") or {}
    where = ", ".join(str(x) for x in (m.get("system"), m.get("machine")) if x)
    py = f", Python {m['python']}" if m.get("python") else ""
    how = "estimated for " if _estimated(report) else "measured on "
    return (f"Machine: {m.get('cpu', 'unknown CPU')}, {m.get('cores', '?')} cores"
            f"{f' ({where}{py})' if where or py else ''}. Latency threads: {_threads(report)} "
            f"({how}{report['device']}).")


def training_line(report: dict) -> Optional[str]:
    """Where the run trained (report.json's ``training``): a figure of seconds means little without it. None for
    reports from before the field."""
    if "training" not in report:
        return None
    t = report["training"]
    if not t:
        return "Training: none in this run (the baseline came from the cache, pretrained weights or a file, and no " \
               "step trains)."
    world = t.get("world_size")
    procs = f"{world} processes, {t.get('backend')}" if isinstance(world, int) and world > 1 else \
        "1 process" if world == 1 else f"processes {world}, {t.get('backend')}"
    where = f"{t.get('device')}" + (f" ({t['gpu']})" if t.get("gpu") else "")
    precision = "AMP float16" if t.get("amp") is True else "float32" if t.get("amp") is False else f"AMP {t.get('amp')}"
    return f"Training: {where}, {procs}, {precision}, {t.get('seconds')} s."


def latency_sentence(report: dict) -> str:
    """What the p50/p90 columns are: timed runs, or the latency model's estimate (never called "timed")."""
    lats = [v["latency_ms"] for v in report["variants"] if v.get("latency_ms")]
    measured = [lat for lat in lats if lat.get("source") == "measured"]
    estimated = _estimated(report)
    parts = []
    if measured:
        runs = sorted({str(lat["runs"]) for lat in measured if lat.get("runs")})
        parts.append(f"Latency: batch 1, p50/p90 over {'/'.join(runs) or 'the'} timed runs after warm-up, all "
                     f"variants interleaved in one run")
    if estimated:
        methods = sorted({str(lat.get("method") or "latency model").split(":")[0] for lat in estimated})
        bases = sorted({latency_basis(lat) for lat in estimated})
        parts.append(f"Latency{' marked (est.)' if measured else ''}: batch 1, p50 {'; '.join(bases)} "
                     f"({', '.join(methods)}) for {report['device']}, not timed on it; no p90")
    if detection(report):
        scores = ("mAP: COCO mAP@[.5:.95] on the eval split's boxes (pycocotools), in percent; mAP50 at IoU 0.5; "
                  "mAP vs fp32: mAP against the fp32 model's own detections scored 0.3 or more. Every runtime's "
                  "output goes through the same NMS (score 0.01, IoU 0.65, 100 per image).")
    elif unlabelled(report):
        n = (report.get("task") or {}).get("num_eval", "?")
        scores = (f"Agreement with fp32 on {n} unlabelled images: share with the same top-1 class as fp32; top-5 "
                  f"overlap: mean share of fp32's five top classes among the variant's; SQNR: logits "
                  f"signal-to-noise ratio against fp32.")
    else:
        scores = ("Accuracy: top-1 on the eval split, in percent; agreement: share of eval images with the same "
                  "top-1 class as fp32.")
    if not parts:
        return "Latency: none measured or estimated. " + scores
    return "; ".join(parts) + ". Speedup is the fp32 p50 over the variant's p50. " + scores


def variant_rows(report: dict, words: bool = False) -> List[List[str]]:
    """The results table as strings, shared by the terminal, Markdown and HTML; ``words`` puts the status word
    beside its mark (the files; the terminal keeps the narrow column)."""
    rows = []
    free = unlabelled(report)
    for v in report["variants"]:
        scores = [_pct(v.get("agreement")), _pct(v.get("top5_overlap")), _db(v.get("sqnr_db"))] if free else \
            [_pct(v.get("accuracy")), _pct(v.get("agreement"))]
        if detection(report):
            m = v.get("metrics") or {}
            scores = [_pct(m.get("map")), _pct(m.get("map50")), _pct(v.get("agreement"))]
        rows.append([
            v["name"], v["format"], v["precision"], f"{v['size_mb']:.2f}" if v.get("size_mb") else "—",
            f"{v['params'] / 1e6:.2f}M", f"{v['macs'] / 1e6:.1f}", *scores,
            _ms(v.get("latency_ms"), "p50"), _ms(v.get("latency_ms"), "p90"),
            "—" if v.get("speedup") is None else f"{v['speedup']:.2f}x",
            (status_text(v) if words else status_mark(v)) + (f" {v['error']}" if v.get("error") else ""),
        ])
    return rows


def summary_lines(report: dict) -> List[str]:
    lines = []
    by_name = {(v["name"], v["format"]): v.get("latency_ms") for v in report["variants"]}
    rec = report.get("recommended")
    if rec:
        how = ""
        if rec.get("latency_source") not in (None, "measured"):
            how = f" by ESTIMATED latency ({latency_basis(by_name.get((rec['name'], rec['format'])))})"
        within = "whose top-1 agreement with fp32 is within the recipe's budget" if unlabelled(report) \
            else "within the recipe's accuracy budget"
        within = "within the recipe's budget of mAP points" if detection(report) else within
        lines.append(f"Recommended for {report['device']}: **{rec['name']}** ({rec['format']}) — the fastest variant "
                     f"{within}{how}.")
    t = report.get("target") or {}
    if t.get("latency_ms") is not None:
        if t.get("met") is None:
            lines.append(f"Latency target {t['latency_ms']} ms: not checked (no latency for {report['device']}).")
        else:
            verdict = "met ✅" if t["met"] else "NOT met ❌"
            lines.append(f"Latency target {t['latency_ms']} ms on {report['device']}: {verdict} by {t['variant']} "
                         f"(p50 {t['p50_ms']:.3f} ms, {t['source']}).")
    estimated = _estimated(report)
    if estimated:
        bases = "; ".join(sorted({latency_basis(lat) for lat in estimated}))
        lines.append(f"Latency marked (est.): {bases} — the latency model's prediction for {report['device']}, "
                     f"not timed on it.")
    lines += [f"Data: {n}." for n in (report.get("task") or {}).get("notes") or []]
    lines += report.get("notes", [])
    return lines


def quantization_sections(report: dict) -> List[Tuple[str, List[str], List[List[str]]]]:
    """(title, columns, rows) per quantized variant: its config, and the layouts timed when it was searched."""
    out = []
    for v in report["variants"]:
        q = (v.get("details") or {}).get("quantization")
        if not q:
            continue
        title = f"{v['name']} ({v['format']} {v['precision']}): {q.get('config') or q.get('scheme', '')}"
        extra = q.get("tool", "")
        scored = "SQNR of the detections" if q.get("scored_by") else "logits SQNR"  # a detector: what ranks it
        if q.get("calibration_sqnr_db"):
            extra += f"; calibration and op scope chosen by {scored} vs fp32 on the calibration split: " + ", ".join(
                f"{k} {val} dB" for k, val in q["calibration_sqnr_db"].items())
        if q.get("scored_by"):
            extra += f" ({q['scored_by']})"
        if q.get("search_decision"):  # how the layout search decided, with the timing interval
            extra += f"; layout: {q['search_decision']}"
        if q.get("failed"):  # candidates ONNX Runtime's calibrator could not quantize with: skipped
            extra += "; skipped (ONNX Runtime failed): " + ", ".join(f"{k} ({why})" for k, why in q["failed"].items())
        rows = [[r["config"], f"{r['sqnr_db']:.1f}", f"{100 * r['calib_agreement']:.1f}%", f"{r['p50_ms']:.3f}",
                 f"{r['final_p50_ms']:.3f}" if "final_p50_ms" in r else "",
                 ("chosen" if r["chosen"] else "") + ("" if r["eligible"] else "not accurate enough")]
                for r in q.get("search", [])]
        agree = "calib mAP vs fp32" if q.get("scored_by") else "calib agreement"
        out.append((title + (f" — {extra}" if extra else ""),
                    ["layout", f"{scored} dB", agree, "p50 ms (here)", "p50 ms (2nd pass)", ""], rows))
    return out


def fallback_sections(report: dict) -> List[Tuple[str, List[str], List[List[str]]]]:
    """(heading, columns, rows) per int8 variant with a fallback: each step's layers kept in float, what they bought
    on the calibration split and what they cost in ms. Unlabelled runs speak of agreement only."""
    out = []
    for v in report["variants"]:
        fb = ((v.get("details") or {}).get("quantization") or {}).get("fallback")
        if not fb or not fb.get("steps"):
            continue
        accuracy = fb.get("metric") == "accuracy" and not unlabelled(report)
        score = "accuracy" if accuracy else "agreement"
        source = fb.get("latency_source")
        head = (f"{v['name']} ({v['format']} {v['precision']}) fallback: budget {fb.get('budget_text')}, judged on "
                f"{fb.get('num_calib')} images of {fb.get('judged_on')}; at most {fb.get('max_steps')} steps. "
                f"Outcome: {fb.get('outcome')}.")
        if source is not None:
            how = "timed here, round-robin with fp32" if source == "measured" else \
                "ESTIMATED by the latency model, not measured"
            head += f" Latency {how}: fp32 p50 {fb['fp32_p50_ms']:.3f} ms."
        cols = ["step", "kept in float (layers added)", f"calib {score}", f"bought ({score}, points)",
                "calib SQNR dB", "p50 ms", "cost ms", "fp32/step", ""]
        rows, prev = [], None
        for st in fb["steps"]:
            layers = ", ".join(x["node"] for x in st.get("layers", [])) or "none (int8 as made)"
            extra = len(st.get("added", [])) - len(st.get("layers", []))
            if extra > 0:
                layers += f" (+{extra} nodes around them)"
            bought = "" if prev is None else f"{100 * (st[score] - prev[score]):+.2f}"
            cost = "" if prev is None or "p50_ms" not in st else f"{st['p50_ms'] - prev['p50_ms']:+.3f}"
            mark = ("budget met" if fb.get("met_at_step") == st["step"] else "") + \
                ("; shipped" if fb.get("shipped_step") == st["step"] else "")
            rows.append([str(st["step"]), layers, _pct(st.get(score)), bought, _db(st.get("sqnr_db")),
                         f"{st['p50_ms']:.3f}" + ("" if source == "measured" else " (est.)") if "p50_ms" in st else "—",
                         cost, f"{st['vs_fp32'][0]:.2f}x" if st.get("vs_fp32") else "—", mark.strip("; ")])
            prev = st
        out.append((head, cols, rows))
    return out


def to_markdown(report: dict) -> str:
    task = report["task"]
    base = report["model_info"]["baseline"]
    out = [f"# {report['model']} · recipe `{report['recipe']}` · device `{report['device']}`", "",
           f"Task: {task['name']} ({judged_on(report)}; input {'x'.join(map(str, task['input_shape']))}); "
           f"baseline: {base['source']}; seed {report['seed']}.", "",
           *([training_line(report), ""] if training_line(report) else []),
           "| " + " | ".join(columns(report)) + " |", "|" + "---|" * len(columns(report))]
    out += ["| " + " | ".join(r) + " |" for r in variant_rows(report, words=True)]
    out += ["", latency_sentence(report), ""]
    out += [f"- {line}" for line in summary_lines(report)]
    quant = quantization_sections(report)
    if quant:
        out += ["", "## Quantization", ""]
        for title, cols, rows in quant:
            out += [f"- {title}"]
            if rows:
                out += ["", "  | " + " | ".join(cols) + " |", "  |" + "---|" * len(cols)]
                out += ["  | " + " | ".join(r) + " |" for r in rows]
                out += [""]
    fallback = fallback_sections(report)
    if fallback:
        out += ["", "## int8 fallback", ""]
        for head, cols, rows in fallback:
            out += [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            out += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    if report.get("steps"):
        out += ["", "## Steps", ""] + [f"- `{s['kind']}` {json.dumps(s['params'])} ({s['seconds']} s)"
                                       for s in report["steps"]]
    out += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
            "", machine_line(report)]
    return "\n".join(out) + "\n"


def plot_frame(pts: List[Tuple[float, float, str]], width: int, height: int, extra_y: Tuple[float, ...] = ()):
    """Axes from 0 ms and around the scores (and ``extra_y``): (sx, sy, ticks) for a plot's coordinates."""
    pad = 56
    xs, ys = [p[0] for p in pts], [p[1] for p in pts] + list(extra_y)
    x0, x1 = 0.0, max(max(xs) * 1.15, 1e-9)
    y0, y1 = min(ys) - 0.01, min(1.0, max(ys) + 0.005)
    if y1 <= y0:
        y1 = y0 + 0.01

    def sx(x):
        return round(pad + (x - x0) / (x1 - x0) * (width - 2 * pad), 1)

    def sy(y):
        return round(height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad), 1)

    ticks = [{"x": sx(x0 + (x1 - x0) * i / 4), "y": sy(y0 + (y1 - y0) * i / 4),
              "xlabel": f"{x0 + (x1 - x0) * i / 4:.2f}", "ylabel": f"{100 * (y0 + (y1 - y0) * i / 4):.1f}%"}
             for i in range(5)]
    return sx, sy, ticks, (x0, x1), pad


def plot_geometry(report: dict, width: int = 520, height: int = 320) -> Optional[Dict[str, Any]]:
    """Accuracy (agreement with fp32 without labels) vs p50 latency, one labelled point per variant with both:
    coordinates only, the template draws (and escapes) it."""
    score = "agreement" if unlabelled(report) else "accuracy"
    pts = [(v["latency_ms"]["p50"], v[score], f"{v['name']} {v['format']}") for v in report["variants"]
           if v.get("latency_ms") and v["latency_ms"].get("p50") is not None and v.get(score) is not None]
    if not pts:
        return None
    sx, sy, ticks, (x0, x1), pad = plot_frame(pts, width, height)
    target = (report.get("target") or {}).get("latency_ms")
    basis = "estimated" if _estimated(report) else "measured"
    return {"width": width, "height": height, "pad": pad, "ticks": ticks,
            "xlabel": f"p50 latency (ms, {report['device']}, {basis})",
            "ylabel": "COCO mAP@[.5:.95]" if detection(report) else (
                "top-1 agreement with fp32" if score == "agreement" else "top-1 accuracy"),
            "target": sx(target) if target is not None and x0 <= target <= x1 else None,
            "points": [{"x": sx(x), "y": sy(y), "label": label} for x, y, label in pts], "line": None, "marks": []}


def fallback_plots(report: dict, width: int = 520, height: int = 320) -> List[Tuple[str, Dict[str, Any]]]:
    """(caption, plot) per int8 variant whose fallback took steps: its calibration score against p50 latency, step
    by step, with fp32's latency and the budget marked. Unlabelled runs plot agreement, never accuracy."""
    out = []
    for v in report["variants"]:
        fb = ((v.get("details") or {}).get("quantization") or {}).get("fallback") or {}
        steps = [st for st in fb.get("steps") or [] if st.get("p50_ms") is not None]
        if len(steps) < 2 or fb.get("fp32_p50_ms") is None:
            continue
        score = "accuracy" if fb.get("metric") == "accuracy" and not unlabelled(report) else "agreement"
        pts = [(st["p50_ms"], st[score], f"step {st['step']}") for st in steps]
        fp32 = fb["fp32_p50_ms"]
        budget = fb.get("budget") or {}
        floor = budget.get("min_agreement") if score == "agreement" else None
        sx, sy, ticks, _, pad = plot_frame(pts + [(fp32, pts[0][1], "")], width, height,
                                       (floor,) if floor is not None else ())
        marks = [{"x1": sx(fp32), "y1": pad, "x2": sx(fp32), "y2": height - pad, "label": "fp32",
                  "lx": sx(fp32) + 3, "ly": pad + 10}]
        if floor is not None:
            marks.append({"x1": pad, "y1": sy(floor), "x2": width - pad, "y2": sy(floor), "label": "budget",
                          "lx": width - pad - 44, "ly": sy(floor) - 4})
        source = "measured" if fb.get("latency_source") == "measured" else "estimated"
        plot = {"width": width, "height": height, "pad": pad, "ticks": ticks, "target": None, "marks": marks,
                "xlabel": f"p50 latency (ms, {report['device']}, {source})",
                "ylabel": f"calibration {'top-1 accuracy' if score == 'accuracy' else 'top-1 agreement with fp32'}",
                "points": [{"x": sx(x), "y": sy(y), "label": label} for x, y, label in pts],
                "line": " ".join(f"{sx(x)},{sy(y)}" for x, y, _ in pts)}
        out.append((f"{v['name']} ({v['format']} {v['precision']}): the fallback's steps, each handing more layers "
                    f"back to float; {score} on the calibration split against p50 latency ({source}).", plot))
    return out


@functools.lru_cache(maxsize=1)
def template_env():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))),
                              autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True, keep_trailing_newline=True)


def svg_plot(report: dict) -> str:
    """The plot as a standalone SVG document ('' when no variant has both accuracy and latency)."""
    plot = plot_geometry(report)
    return template_env().get_template("plot.svg.j2").render(plot=plot) if plot else ""


def _segments(line: str) -> List[Tuple[str, bool]]:
    """'a **b** c' -> [('a ', False), ('b', True), (' c', False)]: Markdown bold kept as bold, as text."""
    return [(part, i % 2 == 1) for i, part in enumerate(line.split("**")) if part]


def to_html(report: dict) -> str:
    task = report["task"]
    return template_env().get_template("report.html.j2").render(
        title=f"{report['model']} · {report['recipe']} · {report['device']}",
        task=task, judged_on=judged_on(report), input_shape="x".join(map(str, task.get("input_shape", []))),
        baseline=(report.get("model_info") or {}).get("baseline", {}).get("source"), seed=report.get("seed"),
        columns=columns(report), rows=variant_rows(report, words=True), latency=latency_sentence(report),
        notes=[_segments(line) for line in summary_lines(report)], plot=plot_geometry(report),
        quantization=quantization_sections(report), fallback=fallback_sections(report),
        fallback_plots=fallback_plots(report),
        steps=[(s["kind"], json.dumps(s["params"]), s["seconds"]) for s in report.get("steps") or []],
        versions=", ".join(f"{k} {v}" for k, v in report["versions"].items()), machine=machine_line(report))


def write_reports(report: dict, folder: Path) -> None:
    folder = Path(folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    (folder / "report.md").write_text(to_markdown(report), encoding="utf-8")
    (folder / "report.html").write_text(to_html(report), encoding="utf-8")
