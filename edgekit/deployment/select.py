"""Which artifact of a run folder a device gets (``select_variants``), and the checks on values read from it.

A run folder may come from someone else: every file name, version and Python version read from its report.json
is checked here (plain names and release numbers only) before it reaches a file, a script or a pip command.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..errors import EdgekitError

PRECISION_RANK = {"int8": 0, "fp16": 1, "fp32": 2}

# What may reach a generated file or a pip command: a plain PEP 440 release (no markers, no spaces, no shell),
# a plain file name, a CPython "3.N". Anything else in a run folder or on the command line is refused.
_VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+){0,3}((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?$")
_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$")
_PYTHON_RE = re.compile(r"^3\.[0-9]{1,2}$")


def safe_version(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _VERSION_RE.match(value):
        raise EdgekitError(f"Refusing {what} {value!r}: not a plain version number (like 1.22.1)")
    return value


def safe_file_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _FILE_RE.match(value) or value in (".", ".."):
        raise EdgekitError(f"Refusing {what} {value!r}: not a plain file name (letters, digits, . _ + -)")
    return value


def safe_python_version(value: Any) -> str:
    if not isinstance(value, str) or not _PYTHON_RE.match(value):
        raise EdgekitError(f"python_version must look like 3.11, not {value!r}")
    return value


def load_run(run_dir: str | Path) -> Tuple[Path, dict]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise EdgekitError(f"Run folder not found: {run_dir}")
    rp = run_dir / "report.json"
    if not rp.is_file():
        raise EdgekitError(f"{run_dir} is not an edgekit run folder: it has no report.json "
                           f"(make one with `edgekit compress`)")
    try:
        report = json.loads(rp.read_text())
    except ValueError as exc:
        raise EdgekitError(f"{rp} is not valid JSON: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("variants"), list):
        raise EdgekitError(f"{rp} is not an edgekit report (no variants)")
    return run_dir, report


def _available(run_dir: Path, report: dict) -> List[dict]:
    """Variants whose artifact file is in the run folder."""
    out = []
    for v in report["variants"]:
        p = v.get("path")
        if v.get("status", "ok") != "ok" or not p:
            continue
        safe_file_name(p, "variant file name in report.json")  # a shared run folder may be hostile
        if (run_dir / p).is_file() and not (run_dir / p).is_symlink():
            out.append(v)
    return out


def select_variants(run_dir: str | Path, report: dict, dev) -> Tuple[dict, Optional[dict], str]:
    """(the variant to ship, the fp32 ONNX fallback or None when it is the same, why it was chosen)."""
    run_dir = Path(run_dir)
    avail = _available(run_dir, report)
    if not avail:
        raise EdgekitError(f"{run_dir} has no artifacts to deploy: none of the report's variant files "
                           f"({', '.join(str(v.get('path')) for v in report['variants']) or 'none'}) is in the folder")
    fallback = next((v for v in avail if v["format"] == "onnx" and v["precision"] == "fp32"), None)
    deployable = [v for v in avail if v["format"] in ("onnx", "tflite")]  # engines are built on the device
    rec = report.get("recommended") or {}
    chosen, why = None, ""
    if report.get("device") == dev.name and rec:
        chosen = next((v for v in deployable if v["name"] == rec.get("name") and v["format"] == rec.get("format")),
                      None)
        how = "by estimated latency" if rec.get("latency_source") == "estimated" else "measured"
        why = f"the report's recommendation for {dev.name} (fastest {how} within the accuracy budget)"
    if chosen is None:
        budget = (report.get("recipe_spec") or {}).get("accuracy_budget_pp", 0.5) / 100
        # a run without labels has agreement with fp32 only: the budget holds on it (as the recommendation does)
        score = "accuracy" if report["variants"][0].get("accuracy") is not None else "agreement"
        ref = report["variants"][0].get(score)
        ok = [v for v in deployable if v["format"] in dev.formats and v["precision"] in dev.precisions
              and (ref is None or v.get(score) is None or v[score] >= ref - budget - 1e-9)]
        if dev.kind == "cpu":  # lower precision first on CPUs that have the kernels for it (ARM: int8 pays off)
            ok.sort(key=lambda v: (dev.formats.index(v["format"]), PRECISION_RANK.get(v["precision"], 9)))
        else:  # GPUs run the engine built from ONNX; the CPU fallback is fp32
            ok.sort(key=lambda v: (PRECISION_RANK.get(v["precision"], 9) != 2, dev.formats.index(v["format"])))
        if ok:
            chosen = ok[0]
            why = (f"not measured on {dev.name}: the first of its formats ({', '.join(dev.formats)}) at the lowest "
                   f"precision it runs, within the recipe's {score} budget" if dev.kind == "cpu" else
                   f"{dev.name} builds a TensorRT engine from the ONNX on the device")
        elif fallback is not None:
            chosen, why = fallback, f"no variant of the run fits {dev.name}'s formats and precisions; fp32 ONNX"
        else:
            raise EdgekitError(f"{run_dir} has no artifact {dev.name} can run (it runs "
                               f"{', '.join(dev.formats)} at {', '.join(dev.precisions)}; the run has "
                               f"{', '.join(v['format'] + ' ' + v['precision'] for v in avail)})")
    if fallback is not None and fallback["path"] == chosen["path"]:
        fallback = None
    return chosen, fallback, why


def _variant_block(v: Optional[dict]) -> Optional[dict]:
    if v is None:
        return None
    # latency is not copied: the run's figure is of the run's device (the manifest's run_latency says which)
    keys = ("name", "format", "precision", "path", "size_mb", "accuracy", "agreement")
    return {k: v.get(k) for k in keys}


def _engine_source(run_dir: Path, report: dict, dev, chosen: dict) -> Optional[dict]:
    """For TensorRT devices: which ONNX the device builds its engine from, at which precision."""
    if "tensorrt" not in dev.formats:
        return None
    for v in report["variants"]:  # a tensorrt variant of the run left its (fp16 or QDQ int8) ONNX beside it
        if v.get("format") != "tensorrt" or v.get("precision") not in dev.precisions:
            continue
        files = (v.get("details") or {}).get("files") or []
        src = next((f for f in files if isinstance(f, str) and f.endswith(".onnx") and _FILE_RE.match(f)
                    and (run_dir / f).is_file() and not (run_dir / f).is_symlink()), None)
        if src:
            return {"name": v["name"], "onnx": src, "precision": v["precision"], "from": "the run's tensorrt variant"}
    precision = "fp16" if "fp16" in dev.precisions else "fp32"
    return {"name": f"{chosen['name']}-{precision}", "onnx": chosen["path"], "precision": precision,
            "from": f"{chosen['path']} with TensorRT's {precision} builder flag"}
