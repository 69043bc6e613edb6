"""Kernel tables: the gzip JSON files of kernel timings a device profile ships per thread count
(``latency_model.kernel_tables``), read, written and found."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

from ..config import LatencyModel
from ..errors import EdgekitError
from .kernels.features import FEATURES

TABLE_VERSION = 1
DEVICES_DIR = Path(__file__).resolve().parent.parent / "devices"  # edgekit's built-in profiles and their tables


def kernel_table_for(lm: LatencyModel, threads: int) -> Optional[Path]:
    """The kernel-timing table for ``threads``, when the profile has one and ONNX Runtime is importable."""
    name = lm.kernel_tables.get(int(threads))
    if not name:
        return None
    try:
        import onnxruntime  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        return None
    p = Path(name).expanduser()
    if not p.is_absolute() and not p.is_file():
        p = DEVICES_DIR / name
    if not p.is_file():
        raise EdgekitError(f"Kernel latency table {name} (latency_model.kernel_tables[{threads}]) not found")
    return p


def save_table(table: dict, path: Path) -> None:
    """Write a kernel table (gzip JSON when the name ends in .gz); kernel samples as compact rows."""
    import gzip

    keys = sorted({k["key"] for k in table["kernels"]})
    ix = {k: i for i, k in enumerate(keys)}
    out = {**table, "keys": keys, "fields": list(FEATURES),
           "kernels": [[ix[k["key"]], k["us"]] + [k["desc"].get(f, 0) for f in FEATURES] for k in table["kernels"]]}
    data = json.dumps(out, separators=(",", ":")).encode()
    Path(path).write_bytes(gzip.compress(data, mtime=0) if str(path).endswith(".gz") else data)


def load_table(path: Path) -> dict:
    import gzip

    try:
        raw = Path(path).read_bytes()
        table = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
        if table.get("version") != TABLE_VERSION or not {"kernels", "overhead", "keys", "fields"} <= set(table):
            raise ValueError("not a version-%d edgekit kernel table" % TABLE_VERSION)
        keys, fields = table["keys"], table["fields"]
        table["kernels"] = [{"key": keys[int(r[0])], "us": float(r[1]), "desc": dict(zip(fields, r[2:]))}
                            for r in table["kernels"]]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise EdgekitError(f"Kernel latency table {path} is unreadable ({exc}); recalibrate it with "
                           f"`python bench/latency_model.py --calibrate`") from None
    return table


def net_spans(table: dict) -> Optional[List[range]]:
    """Each calibration network's run of samples in ``table["kernels"]`` (they are stored net by net)."""
    spans, i = [], 0
    for r in table.get("nets", []):
        n = int(r.get("samples", r.get("kernels", 0)))
        spans.append(range(i, i + n))
        i += n
    return spans if spans and i == len(table["kernels"]) else None
