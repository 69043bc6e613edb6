"""Result tables: a report, a benchmark, the variants of a run; sized to the terminal (or 180 columns)."""

from __future__ import annotations

from typing import List, Optional

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .base import out


def _plain(cell) -> str:
    """A cell's text as shown (rich reads str cells as markup)."""
    from rich.errors import MarkupError

    try:
        return Text.from_markup(cell).plain if isinstance(cell, str) else str(cell)
    except MarkupError:
        return str(cell)


def fit_table(table: Table, console: Optional[Console] = None):
    """``table`` if ``console`` is wide enough for every cell's longest word, else one block per row of "header: value"
    pairs: rich would otherwise cut numbers to '1.…' in an 80-column terminal. Wrapping columns to fit, widest first,
    never below a column's longest word."""
    from rich.cells import cell_len

    console = console or out
    cols = table.columns
    texts = [[_plain(c.header)] + [_plain(x) for x in c.cells] for c in cols]
    hi = [max((cell_len(line) for t in ts for line in t.splitlines()), default=0) for ts in texts]
    lo = [max((cell_len(w) for t in ts for w in t.split()), default=0) for ts in texts]
    left, right = table.padding[3], table.padding[1]
    overhead = (left + right) * len(cols) + (len(cols) + 1 if table.box and table.show_edge else len(cols) - 1)
    room = console.width - overhead
    if sum(hi) <= room:
        return table
    if sum(lo) <= room:
        widths = list(hi)
        while sum(widths) > room:  # narrow the widest column that can still wrap
            i = max((j for j in range(len(cols)) if widths[j] > lo[j]), key=lambda j: widths[j])
            widths[i] -= 1
        for c, w in zip(cols, widths):
            c.width, c.no_wrap, c.overflow = w, False, "fold"
        return table
    return _blocks(table, texts, console.width)


def _blocks(table: Table, texts: List[List[str]], width: int) -> Group:
    """The narrow layout: per row its first cell as a heading, then "header: value" pairs packed into lines."""
    from rich.cells import cell_len

    heads = [" ".join(ts[0].split()) for ts in texts]
    # the heading: the first cell and the left-aligned names after it (variant · format · precision)
    n = 1
    while n < len(texts) and table.columns[n].justify == "left":
        n += 1
    lines: List[Text] = []
    if table.title:
        lines.append(Text(_plain(table.title), style="bold"))
    for r in range(len(texts[0]) - 1 if texts else 0):
        lines.append(Text(" · ".join(ts[r + 1] for ts in texts[:n] if ts[r + 1]) or "—", style="bold"))
        row, cur = [], ""
        for h, ts in zip(heads[n:], texts[n:]):
            value = " ".join(ts[r + 1].split())
            if not value:
                continue
            pair = f"{h}: {value}"
            if cur and cell_len(cur) + 3 + cell_len(pair) > width - 2:
                row.append(cur)
                cur = pair
            else:
                cur = f"{cur} · {pair}" if cur else pair
        if cur:
            row.append(cur)
        lines += [Text("  " + x) for x in row]
    if table.caption:
        lines.append(Text(_plain(table.caption), style="dim"))
    return Group(*lines)


def show_report(report: dict, console: Optional[Console] = None) -> None:
    """compress's terminal output: the results table (blocks when the terminal is narrow) and the summary."""
    from ..report import summary_lines

    console = console or out
    console.print(fit_table(results_table(report, title=f"{report['model']} · {report['recipe']} · "
                                                        f"{report['device']}"), console))
    for line in summary_lines(report):
        flag = any(w in line for w in ("SLOWER", "loses", "disagrees", "failed", "uncalibrated", "Data: "))
        console.print(("[bold yellow]! [/]" if flag else "• ") + escape(line.replace("**", "")), highlight=False)


def show_benchmark(rows, table: Table, device: str, console: Optional[Console] = None) -> None:
    """benchmark's terminal output: its table (blocks when narrow) and what its estimated latencies are."""
    console = console or out
    console.print(fit_table(table, console))
    estimated = [v.latency for v in rows if v.latency is not None and not v.latency.measured]
    if estimated:
        from ..report import latency_basis

        bases = "; ".join(sorted({latency_basis(lat.to_json()) for lat in estimated}))
        console.print(f"[bold yellow]! [/]Latency noted 'latency estimated' is {escape(bases)}: the latency model's "
                      f"prediction for {escape(device)}, not timed on it.", highlight=False)


def results_table(report: dict, title: Optional[str] = None) -> Table:
    from ..report import columns, judged_on, unlabelled, variant_rows

    caption = f"Task {report['task'].get('name')}: {judged_on(report)}." if unlabelled(report) else None
    table = Table(title=title, header_style="bold", caption=caption)
    for c in columns(report):
        table.add_column(c, justify="left" if c in ("variant", "format", "precision", "status") else "right")
    for row in variant_rows(report):
        table.add_row(*row)
    return table


def show_sweep(s: dict, console: Optional[Console] = None) -> None:
    """sweep's terminal output: per device every variant, its Pareto mark and the best under the target."""
    from ..sweep.results import METRIC_WORDS

    console = console or out

    for d in s["devices"]:
        words = METRIC_WORDS.get(d["metric"] or "", "score")
        t = Table(title=f"{d['device']}: target {d['target_ms']} ms, latency {', '.join(d['latency_sources'])}",
                  header_style="bold", caption=f"score: {words}; ● on the accuracy-latency Pareto front")
        for c in ("variant", "score", "p50 ms", "p90 ms", "Pareto", "under target"):
            t.add_column(c, justify="left" if c == "variant" else "right")
        front = {(p["label"], p["p50_ms"]) for p in d["pareto"]}
        best = d["best_under_target"]
        for p in sorted(d["points"], key=lambda p: p["p50_ms"]):
            under = d["target_ms"] is not None and p["p50_ms"] <= d["target_ms"]
            name = escape(p["label"])
            t.add_row(f"[bold]{name}[/]" if best is not None and p["label"] == best["label"] else name,
                      f"{100 * p['score']:.1f}%", f"{p['p50_ms']:.3g}",
                      "–" if p["p90_ms"] is None else f"{p['p90_ms']:.3g}",
                      "●" if (p["label"], p["p50_ms"]) in front else "", "yes" if under else "no")
        console.print(fit_table(t, console))
        console.print(f"Best under the target: [bold]{escape(best['label'])}[/]" if best else
                  "[bold yellow]! [/]No variant meets the target.", highlight=False)
    bad = [c for c in s["cells"] if c["status"] != "ok"]
    for c in bad:
        console.print(f"[bold yellow]! [/]{escape(c['model'])} · {escape(c['recipe'])} · {escape(c['device'])}: "
                  f"{c['status']}: {escape(c.get('error') or '')}", highlight=False)
    n = s["counts"]
    console.print(f"{n['ok']} cells finished ({n['resumed']} from an earlier run), {n['failed']} failed, "
              f"{n['not-measured']} not measured, in {s['seconds']} s on Ray {s['ray_version']}.")
