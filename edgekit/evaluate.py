"""Accuracy and fidelity metrics between a variant and its fp32 reference."""

from __future__ import annotations

from typing import Callable, Dict

import numpy as np

from .data.tasks import iter_batches
from .progress import track


def predict_arrays(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch_size: int = 64,
                   description: str = "evaluate") -> np.ndarray:
    chunks = list(iter_batches(x, batch_size))
    return np.concatenate([run(b) for b in track(chunks, description, total=len(chunks))])


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of inputs whose top-1 class is the same in both."""
    return float((a.argmax(1) == b.argmax(1)).mean())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).mean())


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is closer)."""
    ref = reference.astype(np.float64)
    noise = ((ref - test.astype(np.float64)) ** 2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * np.log10((ref ** 2).sum() / noise))


def compare(reference: np.ndarray, test: np.ndarray) -> Dict[str, float]:
    return {"agreement": agreement(reference, test), "cosine": cosine(reference, test),
            "max_abs": float(np.abs(reference - test).max()), "sqnr_db": sqnr_db(reference, test)}
