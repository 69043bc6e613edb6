"""Accuracy (with labels) and fidelity to the fp32 reference (with or without labels): top-1 agreement, top-5
overlap, logits SQNR."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np

from .data.tasks import iter_batches
from .progress import track


def predict_arrays(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int = 64,
                   description: str = "evaluate") -> np.ndarray:
    chunks = list(iter_batches(x, batch_size))
    return np.concatenate([run(b) for b in track(chunks, description, total=len(chunks))])


class _Feed:
    """Re-cuts a stream of batches to one runner's batch size: the same slices as cutting the whole array."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], batch_size: int):
        self.run, self.batch = run, max(1, int(batch_size))
        self.carry: Optional[np.ndarray] = None
        self.out: list = []

    def push(self, x: np.ndarray) -> None:
        if self.carry is not None:
            x = np.concatenate([self.carry, x])
        full = len(x) - len(x) % self.batch
        for i in range(0, full, self.batch):
            self.out.append(self.run(x[i:i + self.batch]))
        self.carry = x[full:].copy() if full < len(x) else None

    def close(self) -> Optional[np.ndarray]:
        if self.carry is not None:
            self.out.append(self.run(self.carry))
            self.carry = None
        return np.concatenate(self.out) if self.out else None


@dataclass
class Predictions:
    """Logits of several runners over one pass of the data, and the labels (None where the data has none)."""

    logits: Dict[str, np.ndarray] = field(default_factory=dict)
    labels: Optional[np.ndarray] = None
    errors: Dict[str, Exception] = field(default_factory=dict)  # runner -> what stopped it
    first: Optional[np.ndarray] = None  # the first ``keep_first`` inputs (latency is timed on one)
    count: int = 0


def predict_stream(runners: Dict[str, Tuple[Callable[[np.ndarray], np.ndarray], int]],
                   batches: Iterable[Tuple[np.ndarray, Optional[np.ndarray]]], total: Optional[int] = None,
                   description: str = "evaluate", keep_first: int = 1) -> Predictions:
    """Run every ``(run, batch_size)`` of ``runners`` over one pass of ``batches``.

    Each input is decoded once for all variants and dropped after its batch: memory holds
    the logits (inputs x classes), never the split. A runner that raises stops alone; its
    exception is in ``errors``. Each runner sees exactly the slices ``predict_arrays`` would cut.
    """
    feeds = {k: _Feed(run, b) for k, (run, b) in runners.items()}
    pred, labels, first = Predictions(), [], []
    for x, y in track(batches, description, total=total):
        if pred.count < keep_first:
            first.append(x[:keep_first - pred.count].copy())
        pred.count += len(x)
        labels = None if y is None or labels is None else labels + [y]
        for k, feed in list(feeds.items()):
            try:
                feed.push(x)
            except Exception as exc:  # noqa: BLE001 - one runner failing never stops the others
                pred.errors[k] = exc
                del feeds[k]
    for k, feed in feeds.items():
        try:
            out = feed.close()
        except Exception as exc:  # noqa: BLE001
            pred.errors[k] = exc
            continue
        if out is not None:
            pred.logits[k] = out
    pred.labels = np.concatenate(labels) if labels else (None if labels is None else np.zeros(0, np.int64))
    pred.first = np.ascontiguousarray(np.concatenate(first)) if first else None
    return pred


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of inputs whose top-1 class is the same in both."""
    return float((a.argmax(1) == b.argmax(1)).mean())


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int = 5) -> Optional[float]:
    """Mean share of ``a``'s top-``k`` classes that are also in ``b``'s top ``k`` (order ignored).

    Finer than top-1 agreement for a model without labels: a variant that swaps the 2nd and 3rd class keeps it.
    None with ``k`` classes or fewer, where every top-k holds every class and the figure says nothing.
    """
    if a.ndim != 2 or a.shape[1] <= k or len(a) == 0:
        return None
    ta = np.argpartition(-a, k - 1, axis=1)[:, :k]
    tb = np.argpartition(-b, k - 1, axis=1)[:, :k]
    return float((ta[:, :, None] == tb[:, None, :]).any(2).sum(1).mean() / k)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).mean())


def energy_db(signal: float, noise: float) -> float:
    """``signal`` over ``noise`` energy in dB; infinite when there is no noise (sums over batches give one SQNR)."""
    return float(10 * np.log10(signal / noise)) if noise > 0 else float("inf")


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is closer)."""
    ref = reference.astype(np.float64)
    return energy_db((ref ** 2).sum(), ((ref - test.astype(np.float64)) ** 2).sum())


def compare(reference: np.ndarray, test: np.ndarray) -> Dict[str, float]:
    return {"agreement": agreement(reference, test), "top5_overlap": topk_overlap(reference, test),
            "cosine": cosine(reference, test),
            "max_abs": float(np.abs(reference - test).max()), "sqnr_db": sqnr_db(reference, test)}


Fidelity = Callable[[np.ndarray, np.ndarray], Tuple[float, float]]  # (reference, outputs) -> (SQNR dB, agreement)


def logits_fidelity(reference: np.ndarray, test: np.ndarray) -> Tuple[float, float]:
    """How close a classifier's int8 candidate is to fp32 on the calibration split: logits SQNR, top-1 agreement."""
    return sqnr_db(reference, test), agreement(reference, test)
