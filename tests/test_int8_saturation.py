"""int8 on x86 CPUs without VNNI: full-range weights saturate ONNX Runtime's u8 x s8 kernels, 7-bit weights do not.

This is why five accuracy tests failed on a fresh AVX2-only machine and passed on VNNI hosts (the same model, other
kernels). The emulated test runs the same two int8 models on this machine's CPU and on a Haswell (AVX2, no VNNI)
under qemu-user, which CI installs for the arm64 test.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
import sys
from pathlib import Path

import numpy as np
import pytest

from edgekit.config import load_device
from edgekit.evaluate import sqnr_db
from edgekit.export.onnx import device_quant_config, int8_reduce_range
from edgekit.hostinfo import x86_int8_saturates

QEMU = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")


def test_which_cpus_get_7_bit_weights(monkeypatch):
    assert x86_int8_saturates({"avx2", "fma"}) is True
    assert x86_int8_saturates({"avx2", "avx512_vnni"}) is False and x86_int8_saturates({"avx2", "avx_vnni"}) is False
    desktop = load_device("desktop-cpu")
    import edgekit.hostinfo as hostinfo

    monkeypatch.setattr(hostinfo, "cpu_flags", lambda: {"avx2", "fma"})
    assert int8_reduce_range(desktop) is True and device_quant_config(desktop).reduce_range is True
    monkeypatch.setattr(hostinfo, "cpu_flags", lambda: {"avx2", "avx512_vnni"})
    assert int8_reduce_range(desktop) is False
    assert int8_reduce_range(load_device("rpi4")) is False  # ARM kernels accumulate in 32 bits
    remote_x86 = desktop.model_copy(update={"local": False, "isa": ["avx2"]})
    assert int8_reduce_range(remote_x86) is True
    assert int8_reduce_range(remote_x86.model_copy(update={"isa": ["avx2", "avx512_vnni"]})) is False
    pinned = desktop.model_copy(update={"quantization": desktop.quantization.model_copy(update={"reduce_range": False})})
    assert int8_reduce_range(pinned) is False
    assert "7-bit-weights" in device_quant_config(remote_x86).label()


RUN = """
import sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[1]); out = {}
for p in sys.argv[3:]:
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    s = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]); n = s.get_inputs()[0].name
    out[p.rsplit("/", 1)[-1]] = np.concatenate([s.run(None, {n: x[i:i + 1]})[0] for i in range(len(x))])
np.savez(sys.argv[2], **out)
"""


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="needs qemu-user-static (apt-get install qemu-user-static)")
def test_full_range_int8_saturates_without_vnni_and_7_bit_weights_do_not(small_task, tmp_path):
    from edgekit.config import Recipe, TrainSpec
    from edgekit.export.onnx import export_onnx
    from edgekit.export.onnx_int8 import quantize_onnx
    from edgekit.pipeline import get_baseline

    model, _ = get_baseline("shufflenetv2-x0.5", small_task, recipe=Recipe(name="t", train=TrainSpec(epochs=3)))
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", small_task.input_shape)
    calib, _ = small_task.arrays("calib")
    cfg = device_quant_config(load_device("desktop-cpu").model_copy(update={"local": False, "isa": ["avx2"]}))
    assert cfg.reduce_range and cfg.activation_type == "uint8"
    full = quantize_onnx(fp32, tmp_path / "full.onnx", calib, replace(cfg, reduce_range=False))
    seven = quantize_onnx(fp32, tmp_path / "seven.onnx", calib, cfg)
    x, _ = small_task.arrays("eval", limit=40)
    np.save(tmp_path / "x.npy", x)
    models = [str(p) for p in (fp32, full, seven)]
    site = [p for p in sys.path if p.endswith("site-packages")]
    code = f"import sys; sys.path[:0] = {site!r}\n" + RUN
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npy"), str(tmp_path / "here.npz"), *models],
                   check=True, timeout=300)
    proc = subprocess.run([QEMU, "-cpu", "Haswell-noTSX", str(Path(sys.executable).resolve()), "-c", code,
                           str(tmp_path / "x.npy"), str(tmp_path / "haswell.npz"), *models],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    here, haswell = np.load(tmp_path / "here.npz"), np.load(tmp_path / "haswell.npz")
    db = {(cpu, k): sqnr_db(r["fp32.onnx"], r[k]) for cpu, r in (("here", here), ("haswell", haswell))
          for k in ("full.onnx", "seven.onnx")}
    print("\nlogits SQNR vs fp32 (dB):", {f"{c} {k}": round(v, 1) for (c, k), v in db.items()})
    # 7-bit weights: the same logits on both CPUs (no saturation anywhere), and close to fp32
    assert np.array_equal(here["seven.onnx"], haswell["seven.onnx"]) and db[("haswell", "seven.onnx")] > 20
    # full range on AVX2 without VNNI loses what 7-bit weights keep (measured: 33 -> 16 dB on a 64 px ShuffleNetV2)
    assert db[("haswell", "full.onnx")] < db[("haswell", "seven.onnx")] - 3


@pytest.mark.parametrize("value", ["maybe", "1", "[true]", "$(touch x)"])
def test_a_bad_reduce_range_in_a_device_profile_is_refused(tmp_path, value):
    from edgekit.errors import EdgekitError

    text = (Path(__file__).resolve().parents[1] / "edgekit" / "devices" / "rpi4.yaml").read_text()
    bad = tmp_path / "mine.yaml"
    bad.write_text(text.replace("quantization: {activation_type: int8, weight_type: int8}",
                                f"quantization: {{activation_type: int8, weight_type: int8, reduce_range: {value}}}"))
    assert f"reduce_range: {value}" in bad.read_text()
    with pytest.raises(EdgekitError, match="reduce_range"):
        load_device(str(bad))
