"""The typed records every stage, command and report shares: one ``Latency``, one status vocabulary.

``to_json()`` gives exactly the dicts report.json has always held, so the report schema only grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
