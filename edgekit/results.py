"""The typed records every stage, command and report shares: one ``Latency``, one status vocabulary.

``to_json()`` gives exactly the dicts report.json has always held, so the report schema only grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

# One status vocabulary for variants, benchmark rows and the report's marks.
OK, UNAVAILABLE, FAILED = "ok", "unavailable", "failed"
STATUSES = (OK, UNAVAILABLE, FAILED)
STATUS_MARK = {OK: "✅", UNAVAILABLE: "❎", FAILED: "❌"}

# Where a latency figure comes from. "measured" is this machine (report.json's historical word for it).
MEASURED, MEASURED_SSH, ESTIMATED = "measured", "measured-ssh", "estimated"


@dataclass
class Latency:
    """A latency figure and where it comes from: measured (here or over SSH) or estimated, with its context."""

    p50: float
    source: str
    device: Optional[str] = None
    p90: Optional[float] = None
    threads: Optional[int] = None
    runtime: Optional[str] = None
    runtime_version: Optional[str] = None
    batch: int = 1
    runs: Optional[int] = None
    method: Optional[str] = None  # estimates: "kernel-regression" | "roofline"
    extra: Dict[str, Any] = field(default_factory=dict)  # mean, min, coefficients, times ...

    @property
    def measured(self) -> bool:
        return self.source.startswith("measured")

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"p50": self.p50, "p90": self.p90, **self.extra, "source": self.source,
                               "device": self.device, "threads": self.threads, "batch": self.batch}
        for k in ("runtime", "runtime_version", "runs", "method"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Latency":
        known = {"p50", "p90", "source", "device", "threads", "runtime", "runtime_version", "batch", "runs", "method"}
        return cls(**{k: d[k] for k in known if k in d and d[k] is not None},
                   extra={k: v for k, v in d.items() if k not in known})


@dataclass
class Variant:
    """One exported model of a run (or one benchmark row): how it was made, what it scores, what it costs.

    ``to_json()`` is the variant's entry in report.json; benchmark rows are the same records.
    """

    name: str
    format: str
    precision: str
    path: Optional[Path]
    stage: str = "baseline"  # "baseline" | the recipe's step tag
    params: Optional[int] = None
    macs: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)
    size_mb: Optional[float] = None
    accuracy: Optional[float] = None
    agreement: Optional[float] = None  # top-1 agreement with the run's fp32 reference
    top5_overlap: Optional[float] = None  # mean share of the reference's top-5 classes in this variant's top 5
    sqnr_db: Optional[float] = None  # logits SQNR against the reference (None for the reference itself)
    metrics: Optional[Dict[str, float]] = None  # detection: COCO map / map50 (``accuracy`` is the map)
    latency: Optional[Latency] = None
    speedup: Optional[float] = None
    status: str = OK
    error: Optional[str] = None
    runtime: Optional[str] = None  # the runtime that ran it here, with its version
    export_s: Optional[float] = None

    @property
    def key(self) -> str:
        """Unique within a run: a name may exist in several formats."""
        return f"{self.name}:{self.format}"

    @property
    def latency_ms(self) -> Optional[Dict[str, Any]]:
        return self.latency.to_json() if self.latency is not None else None

    def fail(self, status: str, error: str) -> None:
        self.status, self.error = status, error
        self.accuracy = self.agreement = self.top5_overlap = self.sqnr_db = self.latency = self.speedup = None
        self.metrics = None

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "format": self.format, "precision": self.precision, "stage": self.stage,
                "path": self.path.name if self.status == OK and self.path is not None else None,
                "size_mb": self.size_mb, "accuracy": self.accuracy, "agreement": self.agreement,
                **{k: getattr(self, k) for k in ("top5_overlap", "sqnr_db", "metrics") if getattr(self, k) is not None},
                "latency_ms": self.latency_ms, "speedup": self.speedup, "params": self.params, "macs": self.macs,
                "status": self.status, "error": self.error, **({"runtime": self.runtime} if self.runtime else {}),
                **({"export_s": self.export_s} if self.export_s is not None else {}),
                **({"details": self.info} if self.info else {})}
