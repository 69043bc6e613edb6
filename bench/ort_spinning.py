"""Five ONNX Runtime sessions of one model, timed round-robin as the pipeline times variants: with ONNX Runtime's
default intra-op thread spinning, with it off, and with spinning stopped when each Run ends (what edgekit's runner
sets), then one session alone.

    python bench/ort_spinning.py

Identical sessions should give identical p50s. On a 2-core machine they did not with spinning on (the idle
sessions' spinning threads take the cores from the one being timed), which is why side-by-side speedups from runs
with many live sessions can be wrong (README, "Detectors"). Measured 7 December 2026 on this repository's 2-core
AMD EPYC machine, yolox-nano at 128 px, 2 threads, 200 rounds:

    spin 1  p50 5.76 5.85 5.79 2.24 4.61 ms (p90 10.3-10.7)
    spin 0  p50 2.32 2.28 2.24 2.24 2.15 ms (p90 2.4-2.6)
    alone   p50 1.07 ms (p90 1.14), spinning on, the spin-0 sessions idle beside it

and, in a later run of the same comparison, ``session.force_spinning_stop`` 1: p50 1.51-1.60 ms (p90 1.65-1.78)
where the default gave 5.9-6.1 ms (p90 10.4-10.8); one session alone with it, 1.10 ms.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgekit import zoo
from edgekit.export.onnx import export_onnx
from edgekit.measure.local import interleaved_latency


def session(path: Path, spin: str):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    if spin == "stop":
        so.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda a: s.run(None, {name: a})


def main() -> None:
    model = zoo.create("yolox-nano", num_classes=10, input_size=128).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "yolox.onnx", (1, 3, 128, 128))
        x = np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32)
        for spin in ("stop", "1", "0"):  # each set is freed when the next replaces it
            runs = {f"s{i}": session(path, spin) for i in range(5)}
            r = interleaved_latency(runs, x, rounds=200)
            print(f"spin {spin}  p50", " ".join(f"{v['p50']:.2f}" for v in r.values()),
                  "ms  p90", " ".join(f"{v['p90']:.2f}" for v in r.values()))
        r = interleaved_latency({"alone": session(path, "1")}, x, rounds=200)["alone"]  # the spin-0 ones idle
        print(f"alone   p50 {r['p50']:.2f} ms  p90 {r['p90']:.2f}")


if __name__ == "__main__":
    main()
