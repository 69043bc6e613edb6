"""sweep.json, sweep.md and sweep.html: every cell, and per device the accuracy-latency Pareto front and the best
variant under the device's latency target.

A cell's figures come from its own report.json (the same for a cell run now and one a previous run finished), so
the summary never says more than the cells do.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .. import __version__
from ..fsutil import atomic_write_bytes
from .plan import Cell

OK, FAILED, NOT_MEASURED = "ok", "failed", "not-measured"


def metric_of(report: dict) -> str:
    """What a cell's variants are scored by: COCO mAP (detection), accuracy (labels), else agreement with fp32."""
    if (report.get("task") or {}).get("kind") == "detection":
        return "map"
    variants = report.get("variants") or [{}]
    return "accuracy" if variants[0].get("accuracy") is not None else "agreement"


def _score(v: dict, metric: str) -> Optional[float]:
    return v.get("accuracy") if metric == "map" else v.get(metric)


def cell_record(cell: Cell, outcome: dict, resumed: bool = False) -> dict:
    """One row of sweep.json: the cell, its status, its variants' scores and latencies, its best variant."""
    rec: Dict[str, Any] = {"model": cell.model, "recipe": cell.recipe, "device": cell.device_name,
                           "folder": str(cell.folder), "resumed": resumed}
    report = outcome.get("report")
    if report is None:
        rec.update(status=NOT_MEASURED if outcome.get("not_measured") else FAILED, error=outcome.get("error"))
        return rec
    metric = metric_of(report)
    rows = []
    for v in report.get("variants") or []:
        if v.get("status") != "ok":
            continue
        lat = v.get("latency_ms") or {}
        rows.append({"name": v["name"], "format": v["format"], "precision": v["precision"],
                     "score": _score(v, metric), "p50_ms": lat.get("p50"), "p90_ms": lat.get("p90"),
                     "latency_source": lat.get("source"), "speedup": v.get("speedup"), "macs": v.get("macs")})
    best = (report.get("recommended") or {}).get("name")
    best_fmt = (report.get("recommended") or {}).get("format")
    rec.update(status=OK, metric=metric, model_label=report.get("model"), variants=rows,
               best=next((r for r in rows if r["name"] == best and r["format"] == best_fmt), None),
               target_ms=(report.get("target") or {}).get("latency_ms"), board=(report.get("sweep") or {}).get("board"),
               seconds=report.get("seconds"))
    return rec


def _points(cells: List[dict]) -> List[dict]:
    """Each variant of the device's cells once: a model's fp32 reference is in every recipe's cell, kept once."""
    seen, out = set(), []
    for c in cells:
        for v in c.get("variants") or []:
            if v["score"] is None or v["p50_ms"] is None:
                continue
            ident = (c["model"], v["format"], v["precision"]) if v["name"] == "fp32" else \
                (c["model"], c["recipe"], v["name"], v["format"])
            if ident in seen:
                continue
            seen.add(ident)
            model = c["model_label"] or c["model"]
            what = "fp32" if v["name"] == "fp32" else c["recipe"] if v["name"] == c["recipe"] else \
                f"{c['recipe']} ({v['name']})"
            fmt = "" if v["format"] == "onnx" else f" {v['format']}"
            out.append({**v, "model": model, "recipe": c["recipe"], "metric": c["metric"],
                        "label": f"{model} {what}{fmt}"})
    return out


def pareto(points: List[dict]) -> List[dict]:
    """The points no other point beats on both latency (lower) and score (higher), fastest first."""
    front, best = [], None
    for p in sorted(points, key=lambda p: (p["p50_ms"], -p["score"])):
        if best is None or p["score"] > best:
            front.append(p)
            best = p["score"]
    return front


def device_summaries(records: List[dict], targets: Dict[str, Optional[float]]) -> List[dict]:
    """Per device and per score (a sweep may judge one model by accuracy and another, unlabelled, by agreement:
    those are never put on one front): every point, the Pareto front and the best variant under the target."""
    out = []
    for device, target in targets.items():
        pts = _points([r for r in records if r["device"] == device and r["status"] == OK])
        for metric in sorted({p["metric"] for p in pts}) or [None]:
            group = [p for p in pts if p["metric"] == metric]
            under = [p for p in group if target is not None and p["p50_ms"] <= target]
            best = max(under, key=lambda p: (p["score"], -p["p50_ms"])) if under else None
            sources = sorted({p["latency_source"] for p in group if p.get("latency_source")})
            out.append({"device": device, "target_ms": target, "metric": metric, "latency_sources": sources,
                        "points": group, "pareto": pareto(group), "best_under_target": best})
    return out


def summary(records: List[dict], targets: Dict[str, Optional[float]], engine: Dict[str, Any],
            started: float, grid: dict) -> dict:
    import ray

    return {"edgekit_version": __version__, "engine": "ray", "ray_version": ray.__version__, **engine,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - started, 1),
            "grid": grid, "counts": {s: sum(r["status"] == s for r in records) for s in (OK, FAILED, NOT_MEASURED)}
            | {"resumed": sum(r["resumed"] for r in records)},
            "cells": records, "devices": device_summaries(records, targets)}


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.3g}"


METRIC_WORDS = {"accuracy": "top-1 accuracy", "agreement": "top-1 agreement with the model's own fp32",
                "map": "COCO mAP@[.5:.95]"}


def to_markdown(s: dict) -> str:
    lines = [f"# edgekit sweep: {len(s['cells'])} cells", "",
             f"Ray {s['ray_version']} ({s['address']}); {s['counts']['ok']} finished "
             f"({s['counts']['resumed']} from an earlier run), {s['counts']['failed']} failed, "
             f"{s['counts']['not-measured']} not measured; {s['seconds']} s.", ""]
    for d in s["devices"]:
        words = METRIC_WORDS.get(d["metric"] or "", d["metric"] or "score")
        lines += [f"## {d['device']} ({words})", "",
                  f"Target {d['target_ms']} ms p50; latency {', '.join(d['latency_sources']) or 'none'}; "
                  f"score: {words}.", ""]
        b = d["best_under_target"]
        lines.append(f"**Best under the target:** {b['label']} ({_fmt(b['score'], True)}, {b['p50_ms']:.3g} ms)"
                     if b else "**No variant meets the target.**" if d["target_ms"] else "**No target set.**")
        lines += ["", "| variant | score | p50 ms | p90 ms | source | Pareto |", "|---|---|---|---|---|---|"]
        front = {id(p) for p in d["pareto"]}
        for p in sorted(d["points"], key=lambda p: p["p50_ms"]):
            lines.append(f"| {p['label']} | {_fmt(p['score'], True)} | {_fmt(p['p50_ms'])} | {_fmt(p['p90_ms'])} | "
                         f"{p['latency_source']} | {'●' if id(p) in front else ''} |")
        lines.append("")
    lines += ["## Cells", "", "| model | recipe | device | status | best | score | p50 ms | note |",
              "|---|---|---|---|---|---|---|---|"]
    for r in s["cells"]:
        b = r.get("best") or {}
        note = r.get("error") or ("from an earlier run" if r["resumed"] else "")
        lines.append(f"| {r['model']} | {r['recipe']} | {r['device']} | {r['status']} | {b.get('name', '–')} | "
                     f"{_fmt(b.get('score'), True)} | {_fmt(b.get('p50_ms'))} | {note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def plots(s: dict, width: int = 560, height: int = 340) -> List[dict]:
    """Per device: every variant as a point, the Pareto front as a line, the latency target as a red line."""
    from ..report import plot_frame

    out = []
    for d in s["devices"]:
        pts = [(p["p50_ms"], p["score"], p["label"]) for p in d["points"]]
        if not pts:
            continue
        sx, sy, ticks, (x0, x1), pad = plot_frame(pts, width, height)
        t = d["target_ms"]
        out.append({"device": d["device"], "metric": d["metric"], "plot": {
            "width": width, "height": height, "pad": pad, "ticks": ticks, "marks": [],
            "xlabel": f"p50 latency (ms, {d['device']}, {', '.join(d['latency_sources'])})",
            "ylabel": METRIC_WORDS.get(d["metric"] or "", "score"),
            "target": sx(t) if t is not None and x0 <= t <= x1 else None,
            "points": [{"x": sx(x), "y": sy(y), "label": label} for x, y, label in pts],
            "line": " ".join(f"{sx(p['p50_ms'])},{sy(p['score'])}" for p in d["pareto"])}})
    return out


def write_results(s: dict, out: Path) -> None:
    from ..report import template_env

    atomic_write_bytes(out / "sweep.json", (json.dumps(s, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(out / "sweep.md", to_markdown(s).encode())
    html = template_env().get_template("sweep.html.j2").render(s=s, plots=plots(s), words=METRIC_WORDS)
    atomic_write_bytes(out / "sweep.html", html.encode())
