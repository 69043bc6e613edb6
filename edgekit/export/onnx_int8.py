"""Static int8 post-training quantization with ONNX Runtime: the ``int8`` precision of the ``onnx`` format.

An export option rather than a torch step, so it lives with the exporters (``tensorrt.py`` reuses its
reader and memo). It never times anything itself: the latency search times layouts with the ``timer``
its caller passes (``ExportContext.timer``, called with ``raw=True`` for per-round times), and only
borrows ``edgekit.measure.local.ratio_interval``, a statistic, to tell a speed-up from noise.

edgekit's defaults differ from ``quantize_static``'s on purpose:
- ``quant_pre_process`` first (shape inference + graph optimisation), as ORT advises (the latency
  search also times the layouts without it);
- per-channel weights (per-tensor loses accuracy on depthwise convolutions);
- the activation type is the device's: U8S8 on x86 without VNNI, where ORT's
  int8 kernels are fastest with unsigned activations; S8S8 on ARM64.
The ORT defaults (QDQ, S8S8, per-tensor, no pre-processing) are kept available
as ``ORT_DEFAULT`` so benchmarks can compare against them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..errors import EdgekitError
from ..evaluate import Fidelity, logits_fidelity
from ..progress import track
from . import Timer
from .ort_calibration import streamed_calibration


@dataclass(frozen=True)
class OrtQuantConfig:
    activation_type: str = "uint8"  # uint8 | int8
    weight_type: str = "int8"
    per_channel: bool = True
    calibration: str = "minmax"  # one of CALIBRATIONS
    quant_format: str = "qdq"  # qdq | qoperator
    preprocess: bool = True
    reduce_range: bool = False
    # With per_channel: per-channel weights on grouped (depthwise) convs only, per-tensor elsewhere. Depthwise
    # filters are where per-tensor scales lose accuracy; dense layers keep the cheaper per-tensor requantization.
    per_channel_grouped_only: bool = False
    op_types: Optional[List[str]] = None  # None: all ORT can quantize
    # Nodes (by name, in the pre-processed graph) ORT leaves in float: the accuracy fallback's (``fallback.py``).
    nodes_to_exclude: Tuple[str, ...] = ()
    # Keep the node that produces the logits in fp32: quantizing logits to 8 bits creates argmax ties,
    # and the classifier is a tiny share of the compute.
    fp32_output_layer: bool = True
    # Keep every node after the last weighted layers in float (a detector's box decoding and score products: one
    # 8-bit scale for pixel boxes and 0-1 scores would leave the scores a few levels); see ``float_tail``.
    fp32_tail: bool = False
    # Data-free quantization aids (edgekit.export.ptq): cross-layer equalization of the fp32 graph before
    # calibration, and empirical bias correction of the quantized convs after it.
    equalize: bool = False
    bias_correction: bool = False
    # AdaRound (edgekit.export.adaround.adaround): the int8 weights' rounding learned per layer on the calibration
    # split, after calibration and before bias correction. Costs minutes on a 224 px model.
    adaround: bool = False
    extra_options: dict = field(default_factory=dict)

    def label(self) -> str:
        a = "U8" if self.activation_type == "uint8" else "S8"
        w = "U8" if self.weight_type == "uint8" else "S8"
        gran = ("per-channel depthwise" if self.per_channel_grouped_only else "per-channel") if self.per_channel \
            else "per-tensor"
        label = f"{self.quant_format.upper()} {a}{w} {gran} {self.calibration}"
        return (label + scope_label(self.op_types) + ("" if self.preprocess else " no-preprocess")
                + ("" if self.fp32_output_layer else " int8-logits") + (" 7-bit-weights" if self.reduce_range else "")
                + (" float-tail" if self.fp32_tail else "")
                + ptq_label(self))


def ptq_label(cfg: OrtQuantConfig) -> str:
    return (" +CLE" if cfg.equalize else "") + (" +AdaRound" if cfg.adaround else "") \
        + (" +bias-correction" if cfg.bias_correction else "")


# Quantize only the layers that carry the compute (their inputs and outputs get Q/DQ); element-wise ops
# (residual Add, SiLU's Mul, squeeze-excite scaling) stay fp32 between them. On SiLU/SE networks such as
# EfficientNetV2 this keeps 2 dB more logits SQNR than quantizing every op (bench/int8_speed.py).
CONV_ONLY = ("Conv", "Gemm", "MatMul")


def candidate_key(cfg: OrtQuantConfig) -> str:
    """A ``calibration: auto`` candidate's name in ``calibration_sqnr_db``: method, op scope, PTQ aids."""
    return cfg.calibration + scope_label(cfg.op_types) + ptq_label(cfg)


def scope_label(op_types) -> str:
    if not op_types:
        return ""
    return " conv-only" if tuple(op_types) == CONV_ONLY else f" ops={'+'.join(op_types)}"


ORT_DEFAULT = OrtQuantConfig(activation_type="int8", weight_type="int8", per_channel=False, calibration="minmax",
                             quant_format="qdq", preprocess=False, fp32_output_layer=False)


class _Reader:
    """CalibrationDataReader over a float32 NCHW array, one batch of 1 at a time with a progress bar."""

    def __init__(self, input_name: str, x: np.ndarray, batch_size: int = 1):
        self.input_name, self.x = input_name, x
        self.batches = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
        self._it = iter(track(self.batches, "calibrate", total=len(self.batches)))
        self._fingerprint: Optional[bytes] = None

    def get_next(self):
        b = next(self._it, None)
        return None if b is None else {self.input_name: np.ascontiguousarray(b, dtype=np.float32)}

    def rewind(self, description: Optional[str] = None):
        self._it = iter(track(self.batches, description, total=len(self.batches)) if description else self.batches)

    @property
    def fingerprint(self) -> bytes:
        """What the inputs are, for the ranges memo: their bytes, shape and batching."""
        if self._fingerprint is None:
            h = hashlib.blake2b(np.ascontiguousarray(self.x).tobytes(), digest_size=16)
            h.update(repr((self.input_name, self.x.shape, self.x.dtype.str, len(self.batches))).encode())
            self._fingerprint = h.digest()
        return self._fingerprint


_WEIGHT_PARAMS: dict = {}  # content of one weight channel (or tensor) and settings -> (zero point, scale)
_WEIGHT_PARAMS_MAX = 1_000_000  # entries kept (about 200 MB at most); the memo is emptied beyond it


@contextlib.contextmanager
def memoised_weight_params():
    """ORT's quantizer with its per-channel weight parameters remembered across calls in this process.

    ``QDQQuantizer`` computes the scale and zero point of each weight channel by calling
    ``compute_data_quant_params`` once per channel: about 36 us of NumPy calls each, 25-40% of a
    ``quantize_static`` call (IGCV3: 32,000 channels, 5 of 14 s for the four ``calibration: auto``
    candidates). The candidates, the latency search's layouts and TensorRT's calibrations quantize the same
    weights again and again. Results are keyed by the channel's bytes and every argument and come from
    ORT's own function, so the quantized models are byte-identical (``test_quantize.py``).
    ``EDGEKIT_ORT_PARAMS_MEMO=0`` turns it off.
    """
    try:
        from onnxruntime.quantization import qdq_quantizer as qq
    except ImportError:  # pragma: no cover - onnxruntime is a core dependency
        yield
        return
    original = getattr(qq, "compute_data_quant_params", None)
    if original is None or os.environ.get("EDGEKIT_ORT_PARAMS_MEMO") == "0":
        yield
        return

    def remembered(data, quant_type, symmetric, reduce_range=False, min_real_range=None, rmin_override=None,
                   rmax_override=None):
        args = (quant_type, symmetric, reduce_range, min_real_range, rmin_override, rmax_override)
        if not isinstance(data, np.ndarray) or any(isinstance(a, np.ndarray) for a in args):
            return original(data, *args)
        key = (hashlib.blake2b(np.ascontiguousarray(data).tobytes(), digest_size=16).digest(), data.dtype.str,
               data.shape, *args)
        hit = _WEIGHT_PARAMS.get(key)
        if hit is None:
            hit = original(data, *args)
            if len(_WEIGHT_PARAMS) >= _WEIGHT_PARAMS_MAX:
                _WEIGHT_PARAMS.clear()
            _WEIGHT_PARAMS[key] = hit
        return tuple(a.copy() for a in hit)

    qq.compute_data_quant_params = remembered
    try:
        yield
    finally:
        qq.compute_data_quant_params = original


# Activation range methods. ORT's own: minmax (the extremes over every image), entropy (KL divergence on a histogram;
# at ORT's defaults, 128 bins and 128 quantized bins, its search has one threshold, the whole range, so it gave
# MinMax's SQNR and agreement exactly on EfficientNet-Lite0/1/2; with TensorRT's 2048 bins it clipped them to 1.2-1.5
# dB logits SQNR, so ORT's defaults are kept), percentile (99.999th). edgekit's: mse (per tensor the range of least
# expected squared error on the histogram, ort_calibration.mse_range) and mean-minmax (the mean over images of each
# image's extremes: ORT's MinMax with CalibMovingAverage, which smooths the range against the one outlier image).
CALIBRATIONS = ("minmax", "entropy", "percentile", "mse", "mean-minmax")


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, calib: np.ndarray,
                  cfg: OrtQuantConfig = OrtQuantConfig()) -> Path:
    """Quantize ``fp32_path`` into ``out_path`` with calibration inputs ``calib`` (float32 NCHW)."""
    from onnxruntime.quantization import CalibrationMethod, QuantType

    if len(calib) == 0:
        raise EdgekitError("Calibration needs at least one input; the calibration split is empty")
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile, "mse": CalibrationMethod.Percentile,
               "mean-minmax": CalibrationMethod.MinMax}
    for key, table in (("activation_type", types), ("weight_type", types), ("calibration", methods)):
        if getattr(cfg, key) not in table:
            raise EdgekitError(f"quantize: {key} must be one of {', '.join(table)}, not {getattr(cfg, key)!r}")
    if cfg.adaround and cfg.quant_format != "qdq":
        raise EdgekitError("adaround learns the int8 weights of the QDQ graph: use quant_format qdq")
    out_path = Path(out_path)
    logging.disable(logging.WARNING)  # ORT's quantizer logs per-tensor warnings on the root logger
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # ... and its histogram calibrators print()
            _quantize(fp32_path, out_path, calib, cfg, types, methods)
    finally:
        logging.disable(logging.NOTSET)
    return out_path


def _quantize(fp32_path, out_path: Path, calib: np.ndarray, cfg: OrtQuantConfig, types, methods) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="edgekit-q-") as tmp:
        src = Path(fp32_path)
        if cfg.equalize:
            from .ptq import equalize

            equalize(src, Path(tmp) / "cle.onnx")
            src = Path(tmp) / "cle.onnx"
        if cfg.preprocess:
            pre = Path(tmp) / "pre.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            src = pre
        graph = onnx.load(str(src), load_external_data=False).graph
        input_name = graph.input[0].name
        outputs = {o.name for o in graph.output}
        exclude = [n.name for n in graph.node if set(n.output) & outputs] if cfg.fp32_output_layer else []
        exclude += [n for n in cfg.nodes_to_exclude if n not in exclude]
        if cfg.fp32_tail:
            from .ptq import float_tail

            exclude += [n for n in float_tail(graph) if n not in exclude]
        extra = {"ActivationSymmetric": False, "WeightSymmetric": True,
                 **({"CalibMovingAverage": True} if cfg.calibration == "mean-minmax" else {}), **cfg.extra_options}
        per_channel = cfg.per_channel
        if per_channel and cfg.per_channel_grouped_only:
            per_channel = False  # ... and per-channel overrides (axis 0) for the grouped convs' weights
            inits = {i.name for i in graph.initializer}
            grouped = {n.input[1]: [{"axis": 0}] for n in graph.node if n.op_type == "Conv" and n.input[1] in inits
                       and next((a.i for a in n.attribute if a.name == "group"), 1) > 1}
            extra["TensorQuantOverrides"] = {**grouped, **extra.get("TensorQuantOverrides", {})}
        tmp_out = Path(tmp) / "q.onnx"
        with memoised_weight_params(), streamed_calibration("mse" if cfg.calibration == "mse" else None):
            quantize_static(
                str(src), str(tmp_out), _Reader(input_name, calib),
                quant_format=QuantFormat.QDQ if cfg.quant_format == "qdq" else QuantFormat.QOperator,
                activation_type=types[cfg.activation_type], weight_type=types[cfg.weight_type],
                per_channel=per_channel, reduce_range=cfg.reduce_range, calibrate_method=methods[cfg.calibration],
                op_types_to_quantize=cfg.op_types, nodes_to_exclude=exclude, extra_options=extra,
            )
        if cfg.adaround:  # on ORT's weights and scales; bias correction then corrects the learned weights
            from .adaround import adaround

            adaround(src, tmp_out, calib)
        if cfg.bias_correction:
            from .ptq import correct_bias

            correct_bias(src, tmp_out, calib)
        shutil.move(str(tmp_out), out_path)


def config_dict(cfg: OrtQuantConfig) -> dict:
    return asdict(cfg)


AUTO_CANDIDATES = ("minmax", "percentile")
AUTO_SCOPES = (None, CONV_ONLY)  # op_types candidates: every op ORT quantizes, or the compute layers only
# Layouts (activation type, per-channel weights, quant_pre_process) tried when the device is this machine: which
# one ORT runs fastest depends on the CPU's int8 kernels (U8S8 vs S8S8, VNNI or not) and on the network, and
# cannot be read off a spec sheet. Pre-processing is usually neutral, but it splits HardSwish into
# HardSigmoid + Mul, which costs MicroNet-M1 about 15% in int8 (1.84 vs 1.57 ms), so both are timed.
LAYOUT_CANDIDATES = tuple((act, pc, grouped, pre) for pre in (True, False) for act in ("uint8", "int8")
                          for pc, grouped in ((True, False), (True, True), (False, False)))
SEARCH_SQNR_TOLERANCE_DB = 1.0  # a faster layout may cost at most this much logits SQNR (noise power x1.26) ...
SEARCH_AGREEMENT_TOLERANCE = 0.005  # ... and at most half a point of top-1 agreement on the calibration split,
# or up to this much SQNR if it flips no more calibration predictions than the most accurate layout. This admits
# per-channel-depthwise MobileNetV1 (-1.9 dB, same agreement, eval top-1 94.6 = fp32, as fast as ORT's default)
# but not EfficientNetV2-B0 with every op quantized (-1.9 dB, 0.8 points less agreement, -1.1 pp on eval).
SEARCH_SQNR_TOLERANCE_SAME_AGREEMENT_DB = 2.0
FINALISTS = 3  # the most accurate layout and the fastest other eligible ones of the first pass, timed again
SEARCH_NEEDS_TIMER = "no timer was given to time the int8 layouts with (ExportContext.timer); search: none used"


def quantize_onnx_auto(fp32_path: str | Path, out_path: str | Path, calib: np.ndarray, cfg: OrtQuantConfig,
                       candidates=AUTO_CANDIDATES, scopes=AUTO_SCOPES, latency_threads: Optional[int] = None,
                       rounds: int = 100, timer: Optional[Timer] = None, equalize: Optional[bool] = False,
                       bias_correction: Optional[bool] = False, adaround: Optional[bool] = False,
                       fidelity: Optional[Fidelity] = None) -> tuple[Path, OrtQuantConfig, dict]:
    """Quantize with each calibration method and op scope; keep the one whose logits are closest to fp32.

    Closeness is the SQNR of the logits on the calibration split (never the eval
    split, which must stay unseen). MinMax is exact on outliers but wastes range;
    percentile clips them — which wins depends on the network (SiLU/SE nets like
    EfficientNetV2 prefer percentile). ``scopes`` are ``op_types`` candidates (None: all
    ops; ``CONV_ONLY``: element-wise ops stay fp32); a config that pins ``op_types``
    keeps its own.

    With ``latency_threads`` (the device is this machine) and a ``timer``, the other
    weight/activation layouts are quantized too with the chosen calibration, timed round-robin
    here, and a faster one whose SQNR and calibration agreement stay within tolerance of the
    most accurate one wins when it is faster beyond the timing noise (else the most accurate
    stays, and ``details["search_decision"]`` says it was a tie, with the interval).
    Without a timer the search is skipped and ``details["search_skipped"]`` says why.

    ``equalize`` / ``bias_correction`` (``edgekit.export.ptq``): True or False pins them for every candidate;
    None tries them as one extra family on the best method and scope only (not a product with them): that
    candidate + bias correction, + CLE, + both, kept only when their SQNR is higher.
    ``adaround`` (minutes per candidate on a 224 px model, so never a product either): True or None quantizes the
    best candidate once more with AdaRound, kept always (True) or only when its SQNR is higher (None).
    ``fidelity(ref, out) -> (SQNR dB, agreement)`` scores a candidate's outputs against fp32's (default: logits
    SQNR and top-1 agreement; a detector's compares its detections, :func:`edgekit.detect.metrics.fidelity`).
    Returns the path, the config used and ``{"calibration_sqnr_db": ..., "search": [...]}``.
    """
    from dataclasses import replace

    from ..runtime import load_runner

    fidelity = fidelity or logits_fidelity

    out_path = Path(out_path)

    def logits(path: Path) -> np.ndarray:
        run = load_runner("onnxruntime", path, threads=1).run
        return np.concatenate([run(calib[i:i + 1]) for i in range(len(calib))])

    ref = logits(Path(fp32_path))
    scopes = (cfg.op_types,) if cfg.op_types else scopes
    scores, tried, failed = {}, [], {}  # tried: (cfg, path, sqnr, agreement)
    base = replace(cfg, equalize=bool(equalize), bias_correction=bool(bias_correction), adaround=False)
    with tempfile.TemporaryDirectory(prefix="edgekit-qa-") as tmp:
        def attempt(c: OrtQuantConfig) -> None:
            key = candidate_key(c)
            try:
                p = quantize_onnx(fp32_path, Path(tmp) / f"cand{len(scores) + len(failed)}.onnx", calib, c)
            except (ValueError, RuntimeError, AssertionError) as exc:
                # ORT's calibrators can fail on one method and not another (the percentile histogram of a
                # tensor whose range is a few float steps: "Too many bins for data range"): the others still count.
                failed[key] = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                return
            sqnr, agree = fidelity(ref, logits(p))
            scores[key] = round(sqnr, 2)
            tried.append((c, p, scores[key], agree))

        for method, ops in ((m, o) for m in candidates for o in scopes):
            attempt(replace(base, calibration=method, op_types=list(ops) if ops else None))
        if not tried:
            raise EdgekitError("ONNX Runtime could not quantize this model with any calibration candidate: "
                               + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        best = max(tried, key=lambda t: t[2])
        started = time.perf_counter()
        for e, b in (((False, True), (True, False), (True, True)) if equalize is None and bias_correction is None
                     else ((True, base.bias_correction),) if equalize is None
                     else ((base.equalize, True),) if bias_correction is None else ()):
            attempt(replace(best[0], equalize=e, bias_correction=b))
        best = max(tried, key=lambda t: t[2])  # the first of equals: the plainer candidate
        if adaround is not False:
            attempt(replace(best[0], adaround=True))
            if tried[-1][0].adaround and (adaround or tried[-1][2] > best[2]):
                best = tried[-1]
        ptq_seconds = time.perf_counter() - started
        details: dict = {"calibration_sqnr_db": scores, **({"failed": failed} if failed else {})}
        if equalize is None or bias_correction is None or adaround is not False:
            details["ptq_search_seconds"] = round(ptq_seconds, 2)
        if latency_threads and timer is None:
            details["search_skipped"] = SEARCH_NEEDS_TIMER
        elif latency_threads:
            same_calibration = [t for t in tried if t is not best and t[0].calibration == best[0].calibration
                                and ptq_label(t[0]) == ptq_label(best[0])]
            best, details["search"], details["search_decision"] = _fastest_layout(
                fp32_path, Path(tmp), calib, [best, *same_calibration], ref, logits, latency_threads, rounds, timer,
                fidelity)
        shutil.move(str(best[1]), out_path)
    return out_path, best[0], details


def search_eligible(sqnr: float, agree: float, top_sqnr: float, top_agree: float) -> bool:
    """Whether a layout is accurate enough, next to the most accurate one, to be chosen for its speed."""
    if agree >= top_agree - 1e-9:
        return sqnr >= top_sqnr - SEARCH_SQNR_TOLERANCE_SAME_AGREEMENT_DB
    return sqnr >= top_sqnr - SEARCH_SQNR_TOLERANCE_DB and agree >= top_agree - SEARCH_AGREEMENT_TOLERANCE - 1e-9


def _fastest_layout(fp32_path, tmp: Path, calib, quantized: list, ref, logits, threads: int, rounds: int,
                    timer: Timer, fidelity: Optional[Fidelity] = None):
    """Quantize the other layouts with the best one's calibration, time all round-robin, keep the fastest eligible
    one only when it is faster than the most accurate beyond the timing noise (:func:`choose_within_noise`).

    ``quantized``: (cfg, path, sqnr, agreement) already made with that calibration, the most accurate first
    (its other op scopes are timed too: fp32 element-wise ops between int8 convs can cost Q/DQ time).
    Returns (the chosen candidate, the table of every layout, the decision in words).
    """
    from dataclasses import replace

    from ..runtime import load_runner

    fidelity = fidelity or logits_fidelity
    best = quantized[0]
    cands = list(quantized)
    # Without AdaRound (minutes each; the integers do not change the speed): the chosen layout gets it at the end.
    layouts = [replace(best[0], activation_type=act, per_channel=pc, per_channel_grouped_only=grouped, preprocess=pre,
                       adaround=False) for act, pc, grouped, pre in LAYOUT_CANDIDATES]
    # ... and ORT's own defaults, so edgekit never ships an int8 slower than plain quantize_static when that is
    # accurate enough.
    layouts.append(replace(ORT_DEFAULT, calibration=best[0].calibration))
    for i, c in enumerate(layouts):
        if any(c == q[0] for q in cands):
            continue
        p = quantize_onnx(fp32_path, tmp / f"layout{i}.onnx", calib, c)
        sqnr, agree = fidelity(ref, logits(p))
        cands.append((c, p, round(sqnr, 2), agree))
    # Tolerances are relative to the most accurate candidate (highest SQNR, then agreement), always eligible.
    top = max(cands, key=lambda c: (c[2], c[3]))
    eligible = [c for c in cands if search_eligible(c[2], c[3], top[2], top[3])]
    runners = {c[0].label(): load_runner("onnxruntime", c[1], threads=threads).run for c in cands}
    x1 = np.ascontiguousarray(calib[:1])
    lat = timer(runners, x1, warmup=10, rounds=rounds, description="time int8 layouts", raw=True)
    # The most accurate layout and the fastest other eligible ones of the first pass are timed again, longer and
    # among fewer; the second pass's per-round times decide, within their noise.
    others = sorted((c for c in eligible if c is not top), key=lambda c: lat[c[0].label()]["p50"])[:FINALISTS - 1]
    finalists = sorted([top, *others], key=lambda c: (-c[2], -c[3]))  # most accurate first
    final = timer({c[0].label(): runners[c[0].label()] for c in finalists}, x1, warmup=10, rounds=2 * rounds,
                  description="time the fastest again", raw=True) if others else {}
    label, decision, vs_top = choose_within_noise([c[0].label() for c in finalists], final)
    chosen = next(c for c in finalists if c[0].label() == label)
    table = []
    for c in cands:
        k = c[0].label()
        row = {"config": k, "sqnr_db": c[2], "calib_agreement": round(c[3], 4), "p50_ms": round(lat[k]["p50"], 4),
               "eligible": c in eligible, "chosen": c is chosen}
        if k in final:
            row["final_p50_ms"] = round(final[k]["p50"], 4)
        if c is top:
            row["most_accurate"] = True
        if k in vs_top:  # p50(most accurate) / p50(this) and its 95% interval: above 1 is faster beyond noise
            row["ratio_vs_most_accurate"] = [round(v, 3) for v in vs_top[k]]
        if c is chosen:
            row["decision"] = decision
        table.append(row)
    if best[0].adaround and not chosen[0].adaround:
        c = replace(chosen[0], adaround=True)
        p = quantize_onnx(fp32_path, tmp / "chosen-adaround.onnx", calib, c)
        sqnr, agree = fidelity(ref, logits(p))
        chosen, decision = (c, p, round(sqnr, 2), agree), decision + "; then AdaRound on it"
    return chosen, table, decision


def choose_within_noise(ranked: List[str], final: dict) -> tuple[str, str, dict]:
    """The layout to keep among ``ranked`` (labels, most accurate first) from the timer's per-round times.

    A less accurate layout replaces the current choice (at first the most accurate) only when the whole 95%
    interval of p50(current) / p50(it) (``edgekit.measure.local.ratio_interval``: paired rounds, bootstrap) is
    above 1; among several, the most accurate of them. Within the noise the more accurate layout is kept, so two
    identical runs choose the same. Returns (label, the decision in words, {label: (ratio, lo, hi) vs the most
    accurate}).
    """
    from ..measure.local import ratio_interval

    top = ranked[0]
    if len(ranked) == 1 or not final:
        return top, "the only eligible layout", {}
    if all(final[k].get("times") for k in ranked):
        def interval(slow: str, fast: str) -> tuple:
            return ratio_interval(final[slow]["times"], final[fast]["times"])
        note = ""
    else:  # a timer without per-round times: p50 alone, as it was
        def interval(slow: str, fast: str) -> tuple:
            r = final[slow]["p50"] / final[fast]["p50"]
            return r, r, r
        note = " (the timer gave no per-round times: ranked by p50 alone)"
    vs_top = {k: interval(top, k) for k in ranked[1:]}
    current, rest = top, list(ranked[1:])
    while True:
        faster = [k for k in rest if interval(current, k)[1] > 1]
        if not faster:
            break
        current, rest = faster[0], faster[1:]
    if current != top:
        r, lo, hi = vs_top[current]
        return current, f"faster beyond noise: ratio {r:.2f} [{lo:.2f}, {hi:.2f}] vs the most accurate, {top}" + note, \
            vs_top
    k = max(vs_top, key=lambda k: vs_top[k][2])  # the one most likely to be faster
    r, lo, hi = vs_top[k]
    if hi > 1:  # its interval holds 1 (lo > 1 would have chosen it): within the noise
        return top, (f"tie within noise: ratio {r:.2f} [{lo:.2f}, {hi:.2f}] (p50 of the most accurate / p50 of {k}); "
                     f"kept the most accurate") + note, vs_top
    return top, f"the most accurate is also the fastest: ratio {r:.2f} [{lo:.2f}, {hi:.2f}] vs {k}" + note, vs_top
