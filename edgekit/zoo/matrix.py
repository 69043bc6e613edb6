"""The zoo matrix: which formats and recipes pass for each zoo entry, as the test suite found them.

The test session writes it (tests/conftest.py collects every test marked ``zoo_matrix(column)``,
one per zoo entry and column); the copy shipped in the package, ``edgekit/zoo/matrix.json``,
is what ``edgekit zoo list`` shows and what the README's zoo table is rendered from
(``python -m edgekit.zoo.matrix --readme README.md``). Regenerate it with::

    EDGEKIT_ZOO_MATRIX=edgekit/zoo/matrix.json pytest -m zoo_matrix
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, Optional

MATRIX_PATH = Path(__file__).with_name("matrix.json")

# column -> (what passing means, the test that decides it)
COLUMNS: Dict[str, tuple] = {
    "onnx": ("ONNX fp32 export runs in ONNX Runtime and matches torch (rtol 1e-3)",
             "tests/test_zoo.py::test_builds_exports_and_matches_torch"),
    "int8": ("trains two epochs on 32 px MNIST (top-1 ≥ 0.2, chance 0.1; EfficientNet-B0 and EfficientNetV2-B0 "
             "as edgekit trains them by default, four epochs at 64 px, since a short run leaves their int8 accuracy "
             "to chance), the int8 "
             "recipe's ORT quantization (calibration and op scope auto) within 3 points of fp32; ❌ known: an "
             "xfail that says why",
             "tests/test_zoo_pipeline.py::test_trains_exports_and_quantizes"),
    "prune50": ("the prune50 recipe's prune step (70% of the removable blocks, then channels) to 50% of the MACs, "
                "one shot, exported ONNX matches torch; ⚠️ where the architecture "
                "caps how far it can go", "tests/test_prune.py::test_every_zoo_model_prunes_and_exports"),
    "svd": ("SVD step to 70% of the MACs, exported ONNX matches torch; ⚠️ where few layers can be "
            "factorized profitably", "tests/test_lowrank.py::test_every_zoo_model_factorizes_and_exports"),
}
README_START, README_END = "<!-- zoo-matrix:start -->", "<!-- zoo-matrix:end -->"


def load_matrix(path: Optional[Path] = None) -> dict:
    path = Path(path or MATRIX_PATH)
    if not path.is_file():
        return {"models": {}}
    return json.loads(path.read_text())


def merge(matrix: dict, rows, meta: dict) -> dict:
    """Fold ``(model, column, outcome, facts)`` rows into ``matrix`` (a partial run updates only its cells)."""
    models = matrix.setdefault("models", {})
    for model, column, outcome, facts in rows:
        models.setdefault(model, {})[column] = {"outcome": outcome, **facts}
    matrix.update(meta)
    matrix["models"] = dict(sorted(models.items()))
    return matrix


def cell(entry: Optional[dict], column: str) -> str:
    """One matrix cell as text: ✅/⚠️/❌/— plus the figure that matters for the column."""
    if not entry:
        return "—"
    if entry["outcome"] != "passed":
        return {"failed": "❌", "xfailed": "❌ known"}.get(entry["outcome"], "—")
    if column == "int8" and "top1_fp32" in entry:
        return f"✅ {100 * entry['top1_fp32']:.1f}→{100 * entry['top1_int8']:.1f}"
    if column in ("prune50", "svd") and "macs_ratio" in entry:
        return f"{'✅' if entry.get('reached') else '⚠️'} {entry['macs_ratio']:.2f}"
    return "✅"


def passing(entry: Dict[str, dict]) -> list[str]:
    return [c for c in COLUMNS if entry.get(c, {}).get("outcome") == "passed"]


def to_markdown(matrix: dict, input_size: int = 224) -> str:
    from . import count_macs, count_params, create, list_models

    head = ["model", "source", "params", f"MMACs@{input_size}", *COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec in list_models():
        model = create(spec.name)
        entry = matrix.get("models", {}).get(spec.name, {})
        lines.append("| " + " | ".join([spec.name, spec.source, f"{count_params(model) / 1e6:.2f}M",
                                         f"{count_macs(model, (3, input_size, input_size)) / 1e6:.0f}",
                                         *(cell(entry.get(c), c) for c in COLUMNS)]) + " |")
    legend = [f"- **{c}**: {what} (`{test}`)" for c, (what, test) in COLUMNS.items()]
    when = matrix.get("generated", "never")
    return "\n".join(lines + ["", f"From the test run of {when} ({matrix.get('versions', '')}); int8 shows top-1 "
                              "% fp32→int8 of that short run, prune50/svd the MACs ratio reached.", ""] + legend)


def sync_readme(readme: Path, matrix: dict) -> bool:
    """Rewrite the README's zoo table from ``matrix``; True if it changed."""
    text = readme.read_text()
    pattern = re.compile(re.escape(README_START) + ".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} block")
    new = pattern.sub(lambda _: f"{README_START}\n{to_markdown(matrix)}\n{README_END}", text)
    if new != text:
        readme.write_text(new)
    return new != text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Render the zoo matrix (Markdown) or rewrite the README's zoo table.")
    ap.add_argument("--matrix", type=Path, default=MATRIX_PATH)
    ap.add_argument("--readme", type=Path, help="rewrite this README's zoo-matrix block in place")
    args = ap.parse_args(argv)
    matrix = load_matrix(args.matrix)
    if args.readme:
        print(f"{args.readme}: {'updated' if sync_readme(args.readme, matrix) else 'already up to date'}")
    else:
        print(to_markdown(matrix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
