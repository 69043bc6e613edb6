"""report.json, report.md and report.html (with an accuracy-vs-latency plot) from one report dict."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import List, Optional, Tuple

COLUMNS = ["variant", "format", "precision", "size MB", "params", "MMACs", "accuracy", "agreement",
           "p50 ms", "p90 ms", "speedup", "status"]


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _ms(lat: Optional[dict], key: str) -> str:
    if not lat or lat.get(key) is None:
        return "—"
    mark = "" if lat.get("source") == "measured" else " (est.)"
    return f"{lat[key]:.3f}{mark}"


def status_mark(v: dict) -> str:
    return {"ok": "✅", "unavailable": "❎", "failed": "❌"}.get(v.get("status", "ok"), "❌")


def variant_rows(report: dict) -> List[List[str]]:
    """The results table as strings, shared by the terminal, Markdown and HTML."""
    rows = []
    for v in report["variants"]:
        rows.append([
            v["name"], v["format"], v["precision"], f"{v['size_mb']:.2f}" if v.get("size_mb") else "—",
            f"{v['params'] / 1e6:.2f}M", f"{v['macs'] / 1e6:.1f}", _pct(v.get("accuracy")), _pct(v.get("agreement")),
            _ms(v.get("latency_ms"), "p50"), _ms(v.get("latency_ms"), "p90"),
            "—" if v.get("speedup") is None else f"{v['speedup']:.2f}x",
            status_mark(v) + (f" {v['error']}" if v.get("error") else ""),
        ])
    return rows


def summary_lines(report: dict) -> List[str]:
    lines = []
    rec = report.get("recommended")
    if rec:
        how = " by ESTIMATED latency" if rec.get("latency_source") == "estimated" else ""
        lines.append(f"Recommended for {report['device']}: **{rec['name']}** ({rec['format']}) — the fastest variant "
                     f"within the recipe's accuracy budget{how}.")
    t = report.get("target") or {}
    if t.get("latency_ms") is not None:
        if t.get("met") is None:
            lines.append(f"Latency target {t['latency_ms']} ms: not checked (no latency for {report['device']}).")
        else:
            verdict = "met ✅" if t["met"] else "NOT met ❌"
            lines.append(f"Latency target {t['latency_ms']} ms on {report['device']}: {verdict} by {t['variant']} "
                         f"(p50 {t['p50_ms']:.3f} ms, {t['source']}).")
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
        if q.get("calibration_sqnr_db"):
            extra += "; calibration and op scope chosen by logits SQNR vs fp32 on the calibration split: " + ", ".join(
                f"{k} {val} dB" for k, val in q["calibration_sqnr_db"].items())
        if q.get("failed"):  # candidates ONNX Runtime's calibrator could not quantize with: skipped
            extra += "; skipped (ONNX Runtime failed): " + ", ".join(f"{k} ({why})" for k, why in q["failed"].items())
        rows = [[r["config"], f"{r['sqnr_db']:.1f}", f"{100 * r['calib_agreement']:.1f}%", f"{r['p50_ms']:.3f}",
                 f"{r['final_p50_ms']:.3f}" if "final_p50_ms" in r else "",
                 ("chosen" if r["chosen"] else "") + ("" if r["eligible"] else "not accurate enough")]
                for r in q.get("search", [])]
        out.append((title + (f" — {extra}" if extra else ""),
                    ["layout", "logits SQNR dB", "calib agreement", "p50 ms (here)", "p50 ms (2nd pass)", ""], rows))
    return out


def to_markdown(report: dict) -> str:
    task = report["task"]
    base = report["model_info"]["baseline"]
    out = [f"# {report['model']} · recipe `{report['recipe']}` · device `{report['device']}`", "",
           f"Task: {task['name']} ({task['num_eval']} eval images, input {'x'.join(map(str, task['input_shape']))}); "
           f"baseline: {base['source']}; seed {report['seed']}.", "",
           "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(r) + " |" for r in variant_rows(report)]
    out += ["", "Latency: batch 1, p50/p90 over timed runs after warm-up, all variants interleaved in one run; "
            "speedup is the fp32 p50 over the variant's p50. Accuracy: top-1 on the eval split; agreement: "
            "share of eval images with the same top-1 class as fp32.", ""]
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
    if report.get("steps"):
        out += ["", "## Steps", ""] + [f"- `{s['kind']}` {json.dumps(s['params'])} ({s['seconds']} s)"
                                       for s in report["steps"]]
    out += ["", "## Versions", "", ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
            "", f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores."]
    return "\n".join(out) + "\n"


def svg_plot(report: dict, width: int = 520, height: int = 320) -> str:
    """Accuracy vs p50 latency, one labelled point per measured variant."""
    pts = [(v["latency_ms"]["p50"], v["accuracy"], f"{v['name']} {v['format']}") for v in report["variants"]
           if v.get("latency_ms") and v["latency_ms"].get("p50") is not None and v.get("accuracy") is not None]
    if not pts:
        return ""
    pad = 56
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = 0.0, max(xs) * 1.15
    y0, y1 = min(ys) - 0.01, min(1.0, max(ys) + 0.005)
    if y1 <= y0:
        y1 = y0 + 0.01

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 16}" text-anchor="middle">p50 latency (ms, {report["device"]})</text>',
             f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
             f'top-1 accuracy</text>']
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        yv = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{sx(xv)}" y="{height - pad + 14}" text-anchor="middle">{xv:.2f}</text>')
        parts.append(f'<text x="{pad - 4}" y="{sy(yv) + 4}" text-anchor="end">{100 * yv:.1f}%</text>')
    target = (report.get("target") or {}).get("latency_ms")
    if target is not None and x0 <= target <= x1:
        parts.append(f'<line x1="{sx(target)}" y1="{pad}" x2="{sx(target)}" y2="{height - pad}" stroke="red" '
                     f'stroke-dasharray="4 3"/><text x="{sx(target) + 3}" y="{pad + 10}" fill="red">target</text>')
    for x, y, label in pts:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="#1f77b4"/>'
                     f'<text x="{sx(x) + 7:.1f}" y="{sy(y) - 6:.1f}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(report: dict) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in variant_rows(report))
    notes = "".join(f"<li>{html.escape(line).replace('**', '')}</li>" for line in summary_lines(report))
    title = f"{report['model']} · {report['recipe']} · {report['device']}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
            "</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Task {html.escape(report['task']['name'])}, "
            f"{report['task']['num_eval']} eval images. Latency batch 1, interleaved runs; speedup vs fp32.</p>"
            f"<table><tr>{head}</tr>{body}</table><ul>{notes}</ul>{svg_plot(report)}{_quant_html(report)}"
            f"<p>Versions: {html.escape(', '.join(f'{k} {v}' for k, v in report['versions'].items()))}</p>"
            "</body></html>\n")


def _quant_html(report: dict) -> str:
    parts = []
    for title, cols, rows in quantization_sections(report):
        parts.append(f"<p>{html.escape(title)}</p>")
        if rows:
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
    return ("<h2>Quantization</h2>" + "".join(parts)) if parts else ""


def write_reports(report: dict, folder: Path) -> None:
    folder = Path(folder)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (folder / "report.md").write_text(to_markdown(report))
    (folder / "report.html").write_text(to_html(report))
