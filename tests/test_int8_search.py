"""The int8 latency search decides within the timing noise: a faster layout wins only beyond it, else the most
accurate one stays and the report says it was a tie, with the interval. And ``benchmark`` makes int8 as ``compress``
does."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.export.onnx_int8 import choose_within_noise


def _times(p50: float, n: int = 200, seed: int = 0, sigma: float = 0.3) -> np.ndarray:
    """Per-round times: the machine's noise, shared by every candidate in a round (heavy right tail: p90 several
    times p50, as on a busy machine), times each candidate's own noise (``seed``)."""
    shared = np.exp(np.random.default_rng(0).normal(0, 1.0, n) ** 2)
    return p50 * shared * np.random.default_rng(seed + 1).lognormal(0, sigma, n)


def _final(**p50s) -> dict:
    """A raw timer result (``interleaved_latency(..., raw=True)``) for candidates of these p50s."""
    out = {}
    for i, (k, v) in enumerate(p50s.items()):
        t = _times(v, seed=i) / np.median(_times(1.0, seed=i))  # exactly this p50; the noise stays
        out[k] = {"p50": float(np.median(t)), "p90": float(np.percentile(t, 90)), "times": list(t)}
    return out


def test_a_candidate_within_the_noise_leaves_the_most_accurate_and_says_tie():
    final = _final(accurate=1.0, fast=0.98)
    assert final["accurate"]["p90"] > 3 * final["accurate"]["p50"]
    label, decision, vs_top = choose_within_noise(["accurate", "fast"], final)
    r, lo, hi = vs_top["fast"]
    assert lo < 1 < hi and r == pytest.approx(1 / 0.98)
    assert label == "accurate"
    assert decision.startswith(f"tie within noise: ratio {r:.2f} [{lo:.2f}, {hi:.2f}]")
    assert "kept the most accurate" in decision


def test_a_clearly_faster_candidate_wins():
    final = _final(accurate=1.0, middle=0.99, fast=0.6)
    label, decision, vs_top = choose_within_noise(["accurate", "middle", "fast"], final)
    assert label == "fast" and vs_top["fast"][1] > 1
    assert decision.startswith("faster beyond noise: ratio 1.67") and decision.endswith("the most accurate, accurate")


def test_among_clearly_faster_ones_the_more_accurate_unless_another_is_faster_beyond_noise():
    final = _final(accurate=1.0, fast_a=0.6, fast_b=0.59, fastest=0.3)
    assert choose_within_noise(["accurate", "fast_a", "fast_b"], final)[0] == "fast_a"  # 0.6 vs 0.59: a tie
    assert choose_within_noise(["accurate", "fast_a", "fastest"], final)[0] == "fastest"
    assert choose_within_noise(["accurate", "fast_b", "fast_a"], final)[0] == "fast_b"  # accuracy order decides


def test_the_most_accurate_faster_beyond_noise_says_so():
    label, decision, _ = choose_within_noise(["accurate", "slow"], _final(accurate=1.0, slow=1.5))
    assert label == "accurate" and decision.startswith("the most accurate is also the fastest: ratio 0.67")


def test_without_per_round_times_p50_decides_and_says_so():
    final = {"a": {"p50": 1.0}, "b": {"p50": 0.9}}
    label, decision, _ = choose_within_noise(["a", "b"], final)
    assert label == "b" and "no per-round times" in decision
    assert choose_within_noise(["a"], final)[:2] == ("a", "the only eligible layout")


@pytest.fixture(scope="module")
def untrained(small_task, tmp_path_factory):
    """An untrained ShuffleNetV2 in ONNX: the layouts' SQNRs differ and are the same on every call."""
    from edgekit import zoo
    from edgekit.export.onnx import export_onnx

    d = tmp_path_factory.mktemp("search")
    model = zoo.create("shufflenetv2-x0.5", num_classes=10, in_chans=3).eval()
    return export_onnx(model, d / "fp32.onnx", small_task.input_shape), small_task.arrays("calib", limit=8)[0], d


def _search(untrained, name, timer):
    from edgekit.export.onnx_int8 import OrtQuantConfig, quantize_onnx_auto

    fp32, calib, d = untrained
    _, cfg, details = quantize_onnx_auto(fp32, d / f"{name}.onnx", calib, OrtQuantConfig(calibration="minmax"),
                                         candidates=("minmax",), scopes=(None,), latency_threads=1, rounds=50,
                                         timer=timer)
    return cfg, details


@pytest.mark.slow  # quantizes every layout three times (about 20 s on 2 cores); the decision's unit tests stay fast
def test_search_keeps_the_most_accurate_on_a_tie_and_the_faster_beyond_noise(untrained):
    """Through quantize_onnx_auto with a fake timer (interleaved_latency's signature, raw=True): timings that
    straddle 1 keep the most accurate layout and record the tie; a clearly faster eligible layout is chosen."""
    calls = []

    def timer_for(speed, noise=0.3):
        def timer(runs_by_name, x, warmup=10, rounds=100, description="", raw=False):
            calls.append(raw)
            out = {}
            for i, k in enumerate(sorted(runs_by_name)):
                t = _times(speed(k), rounds, seed=i, sigma=noise)
                out[k] = {"p50": float(np.median(t)), "p90": float(np.percentile(t, 90)), "times": list(t)}
            return out
        return timer

    _, details = _search(untrained, "same", timer_for(lambda k: 1.0, noise=0.0))  # every ratio exactly 1
    rows = details["search"]
    top = next(r for r in rows if r.get("most_accurate"))
    assert top["sqnr_db"] == max(r["sqnr_db"] for r in rows) and calls and all(calls)  # raw=True every time
    others = [r for r in rows if r["eligible"] and r is not top]
    if not others:
        pytest.skip("only one layout is accurate enough on this untrained model")
    assert top["chosen"] and top["decision"] == details["search_decision"]

    # every other layout 2% faster at p50, well inside the noise: still the most accurate, and a tie is recorded
    cfg, details = _search(untrained, "tie", timer_for(lambda k: 1.0 if k == top["config"] else 0.98))
    chosen = next(r for r in details["search"] if r["chosen"])
    assert chosen["config"] == top["config"] == cfg.label()
    assert details["search_decision"].startswith("tie within noise: ratio ")
    r, lo, hi = max((row["ratio_vs_most_accurate"] for row in details["search"] if "ratio_vs_most_accurate" in row),
                    key=lambda v: v[0])
    assert lo < 1 < hi and f"ratio {r:.2f} [{lo:.2f}, {hi:.2f}]" in details["search_decision"]

    # one eligible layout twice as fast: beyond the noise, it wins
    fast = others[-1]["config"]
    cfg, details = _search(untrained, "fast", timer_for(lambda k: 0.5 if k == fast else 1.0))
    assert cfg.label() == fast and details["search_decision"].startswith("faster beyond noise")
    row = next(r for r in details["search"] if r["chosen"])
    assert row["config"] == fast and row["ratio_vs_most_accurate"][1] > 1


@pytest.mark.slow
def test_benchmark_and_compress_make_the_same_int8(tmp_path):
    """The ONNX int8 row of ``benchmark`` and the int8 variant of ``compress`` (both export_variants with the local
    timer and the recipe's options) have the same quantization for the same model and task, search none."""
    from edgekit.pipeline import run
    from edgekit.pipeline.benchmark import benchmark

    recipe = tmp_path / "q.yaml"
    recipe.write_text("description: same int8\ntrain: {epochs: 1}\nvariants:\n  - {format: onnx, precision: fp32}\n"
                      "  - {format: onnx, precision: int8, options: {num_calib: 32, search: none}}\n")
    report = run("shufflenetv2-x0.5", str(recipe), out=tmp_path / "run", input_size=32, runs=10)
    compress_q = next(v for v in report["variants"] if v["precision"] == "int8")["details"]["quantization"]
    rows = benchmark("shufflenetv2-x0.5", recipe=str(recipe), formats=["onnx"], input_size=32, runs=5)
    bench_q = rows.row("onnx", "int8").info["quantization"]
    assert bench_q == compress_q
    assert bench_q["config"] == compress_q["config"] and "search" not in bench_q


def test_the_pipeline_timer_gives_per_round_times():
    """compress and benchmark both hand export_variants ``local_timer(device)``: interleaved_latency, which the
    search calls with ``raw=True``."""
    import inspect

    from edgekit.config import load_device
    from edgekit.measure.local import interleaved_latency
    from edgekit.pipeline.stages import local_timer

    timer = local_timer(load_device("desktop-cpu"))
    assert timer is interleaved_latency and "raw" in inspect.signature(timer).parameters
    out = timer({"a": lambda x: x, "b": lambda x: x}, np.zeros(1, np.float32), warmup=0, rounds=5, raw=True)
    assert len(out["a"]["times"]) == len(out["b"]["times"]) == 5
