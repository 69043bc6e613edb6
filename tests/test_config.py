"""Recipe and device profile loading, with errors that name the file, field and line."""

from __future__ import annotations

import pytest

from edgekit.config import builtin_names, load_device, load_recipe
from edgekit.errors import EdgekitError


def test_builtin_recipes_and_devices_load():
    assert "int8" in builtin_names("recipes")
    for name in builtin_names("recipes"):
        assert load_recipe(name).name == name
    names = builtin_names("devices")
    for required in ("rpi4", "rpi5", "jetson-nano", "jetson-orin-nano", "desktop-cpu", "desktop-gpu"):
        assert required in names
    for name in names:
        assert load_device(name).name == name


def test_int8_recipe_content():
    r = load_recipe("int8")
    assert [(v.format, v.precision) for v in r.variants] == [("onnx", "fp32"), ("onnx", "int8")]
    assert r.accuracy_budget_pp == 0.5


def test_unknown_recipe_suggests():
    with pytest.raises(EdgekitError, match="Unknown recipe 'int9'.*Did you mean: int8"):
        load_recipe("int9")


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\nvariants:\n  - format: onnx\n    precision: [int8\n")
    with pytest.raises(EdgekitError, match=r"Malformed YAML in .*bad.yaml line \d+"):
        load_recipe(str(p))


def test_invalid_field_names_field_and_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("description: x\nvariants:\n  - format: onnx\n    precision: int4\n")
    with pytest.raises(EdgekitError, match=r"field 'variants.0.precision' \(line 4\)"):
        load_recipe(str(p))


def test_unknown_key_is_rejected(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("varients: []\n")
    with pytest.raises(EdgekitError, match="varients"):
        load_recipe(str(p))


def test_unknown_format_and_step(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("variants:\n  - format: coreml\n")
    with pytest.raises(EdgekitError, match="Unknown format 'coreml'"):
        load_recipe(str(p))
    p.write_text("steps:\n  - sparsify: {ratio: 0.5}\n")
    with pytest.raises(EdgekitError, match="Unknown step 'sparsify'"):
        load_recipe(str(p))


def test_missing_recipe_file():
    with pytest.raises(EdgekitError, match="not found"):
        load_recipe("/nonexistent/recipe.yaml")


def test_device_profile_validation(tmp_path):
    p = tmp_path / "dev.yaml"
    p.write_text("kind: tpu\n")
    with pytest.raises(EdgekitError, match="field 'kind'"):
        load_device(str(p))
    p.write_text("- just a list\n")
    with pytest.raises(EdgekitError, match="mapping"):
        load_device(str(p))
    p.write_text("kind: cpu\narch: aarch64\ncores: 4\nprecisions: [fp32, int8]\n")
    d = load_device(str(p))
    assert d.name == "dev" and d.cores == 4 and not d.local


# ----------------------------------------------------------------------------- numbers are finite and bounded

# (YAML, where the error points: "field 'F' (line N)" or a step's "'F' (line N)", the allowed range and value)
BAD_RECIPES = [
    ("train: {epochs: .inf}\n", "field 'train.epochs' (line 1)", "a finite number > 0 and <= 10000, got inf"),
    ("train: {epochs: 10001}\n", "field 'train.epochs' (line 1)", "a finite number > 0 and <= 10000, got 10001"),
    ("train:\n  batch_size: 1e11\n", "field 'train.batch_size' (line 2)", "an integer from 1 to 65536, got '1e11'"),
    ("train: {batch_size: 1.0e+11}\n", "field 'train.batch_size' (line 1)", "an integer from 1 to 65536, got 1e+11"),
    ("train: {batch_size: 0}\n", "field 'train.batch_size' (line 1)", "an integer from 1 to 65536, got 0"),
    ("train: {lr: .nan}\n", "field 'train.lr' (line 1)", "a finite number > 0 and <= 10, got nan"),
    ("train: {lr: 100}\n", "field 'train.lr' (line 1)", "a finite number > 0 and <= 10, got 100"),
    ("accuracy_budget_pp: .inf\n", "field 'accuracy_budget_pp' (line 1)", "a finite number from 0 to 100, got inf"),
    ("accuracy_budget_pp: 101\n", "field 'accuracy_budget_pp' (line 1)", "a finite number from 0 to 100, got 101"),
    ("steps:\n  - prune: {macs: .nan}\n", "prune step in {p}: 'macs' (line 2)", "a finite number > 0 and < 1, got nan"),
    ("steps:\n  - prune:\n      finetune_epochs: .inf\n", "prune step in {p}: 'finetune_epochs' (line 3)",
     "a finite number from 0 to 10000, got inf"),
    ("steps:\n  - kind: distill\n    params:\n      lr: .nan\n", "distill step in {p}: 'lr' (line 4)",
     "a finite number > 0 and <= 10, got nan"),
    ("steps:\n  - distill: {batch_size: 1.0e+9}\n", "distill step in {p}: 'batch_size' (line 2)",
     "an integer from 1 to 65536, got 1e+09"),
    ("steps:\n  - svd: {round_to: 1.0e+9}\n", "svd step in {p}: 'round_to' (line 2)",
     "an integer from 1 to 1024, got 1e+09"),
]

BAD_DEVICES = [
    ("threads: 1.0e+9\n", "threads", 1, "an integer from 1 to 1024, got 1e+09"),
    ("threads: .inf\n", "threads", 1, "an integer from 1 to 1024, got inf"),
    ("cores: 0\n", "cores", 1, "an integer from 1 to 1024, got 0"),
    ("latency_target_ms: .nan\n", "latency_target_ms", 1, "a finite number > 0 and <= 1e+06, got nan"),
    ("latency_target_ms: -5\n", "latency_target_ms", 1, "a finite number > 0 and <= 1e+06, got -5"),
    ("peak_gops: {fp32: .inf}\n", "peak_gops.fp32", 1, "a finite number > 0 and <= 1e+08, got inf"),
    ("memory_bandwidth_gbs: .inf\n", "memory_bandwidth_gbs", 1, "a finite number > 0 and <= 100000, got inf"),
    ("latency_model:\n  efficiency: {conv: .nan}\n", "latency_model.efficiency.conv", 2,
     "a finite number > 0 and <= 1000, got nan"),
    ("latency_model:\n  session_overhead_us: .inf\n", "latency_model.session_overhead_us", 2,
     "a finite number from 0 to 1e+06, got inf"),
    ("latency_model:\n  threads: 5000\n", "latency_model.threads", 2, "an integer from 1 to 1024, got 5000"),
    ("latency_model:\n  kernel_tables: {0: t.json.gz}\n", "latency_model.kernel_tables.0.[key]", 2,
     "an integer from 1 to 1024, got 0"),
    ("ssh: {host: pi, command_timeout: .inf}\n", "ssh.command_timeout", 1,
     "a finite number > 0 and <= 86400, got inf"),
]


@pytest.mark.parametrize("text, where, allowed", BAD_RECIPES,
                         ids=[f"{i}-{b[1][:24]}" for i, b in enumerate(BAD_RECIPES)])
def test_bad_recipe_numbers_name_file_field_and_range(tmp_path, text, where, allowed):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(EdgekitError) as info:
        load_recipe(str(p))
    msg = str(info.value)
    head = f"Invalid {where.format(p=p)}: " if "{p}" in where else f"Invalid recipe {p}: {where}: "
    assert msg.startswith(head) and msg.endswith(f"; allowed: {allowed}"), msg
    assert "\n" not in msg


@pytest.mark.parametrize("text, field, line, allowed", BAD_DEVICES,
                         ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD_DEVICES)])
def test_bad_device_numbers_name_file_field_and_range(tmp_path, text, field, line, allowed):
    p = tmp_path / "dev.yaml"
    p.write_text(text)
    with pytest.raises(EdgekitError) as info:
        load_device(str(p))
    msg = str(info.value)
    assert msg.startswith(f"Invalid device profile {p}: field '{field}' (line {line}): "), msg
    assert msg.endswith(f"; allowed: {allowed}"), msg


@pytest.mark.parametrize("options, got", [("{num_calib: 1.0e+11}", "1e+11"), ("{num_calib: .nan}", "nan"),
                                          ("{num_calib: 0}", "0"), ("{opset: 99}", "99")])
def test_bad_numeric_variant_options(tmp_path, options, got):
    p = tmp_path / "r.yaml"
    p.write_text(f"variants:\n  - format: onnx\n    precision: int8\n    options: {options}\n")
    key = options[1:options.index(":")]
    with pytest.raises(EdgekitError) as info:
        load_recipe(str(p))
    assert str(info.value) == (f"Invalid recipe {p}: field 'variants.0.options' (line 4): {key} must be an integer "
                               f"from {1 if key == 'num_calib' else 7} to {100000 if key == 'num_calib' else 30}, "
                               f"got {got}")


def test_numbers_at_the_bounds_are_accepted(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train: {epochs: 10000, batch_size: 65536, lr: 10}\naccuracy_budget_pp: 100\n"
                 "steps:\n  - prune: {finetune_epochs: 0, round_to: 1024}\n"
                 "variants:\n  - {format: onnx, precision: int8, options: {num_calib: 100000}}\n")
    r = load_recipe(str(p))
    assert r.train.batch_size == 65536 and r.accuracy_budget_pp == 100
    d = tmp_path / "dev.yaml"
    d.write_text("threads: 1024\ncores: 1024\nlatency_model: {threads: 1, kernel_tables: {1024: t.json.gz}}\n")
    assert load_device(str(d)).threads == 1024


@pytest.mark.parametrize("flag, name, text, field", [
    ("--recipe", "r.yaml", "train: {epochs: .inf}\n", "train.epochs"),
    ("--device", "dev.yaml", "threads: 1.0e+9\n", "threads"),
])
def test_cli_bad_number_exits_2_with_one_stderr_line(tmp_path, flag, name, text, field):
    from typer.testing import CliRunner

    from edgekit.cli import app

    p = tmp_path / name
    p.write_text(text)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["compress", "shufflenetv2-x0.5", flag, str(p), "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: Invalid ") and f"field '{field}'" in lines[0] and "allowed: " in lines[0]
    assert "Traceback" not in res.output and not out.exists()


# ----------------------------------------------------------------------------- variant options: schemas per format

ONNX_KNOWN = ("activation_type, adaround, bias_correction, calibration, equalize, max_drop_pp, min_agreement, "
              "num_calib, op_types, opset, per_channel, quant_format, reduce_range, search, weight_type")
BAD_OPTIONS = [  # (format, precision, options as YAML lines, line of the key, message after the location)
    ("onnx", "int8", "num_calb: 64", 5,
     f"Unknown onnx option 'num_calb'. Did you mean: num_calib? Known onnx options: {ONNX_KNOWN}"),
    ("tensorrt", "int8", "num_calib: 8\n      workspace: 512", 6,
     "Unknown tensorrt option 'workspace'. Did you mean: workspace_mb? Known tensorrt options: calibration, "
     "num_calib, opset, workspace_mb"),
    ("tflite", "fp32", "layout: nhwc", 5, "Unknown tflite option 'layout'. Known tflite options: bias_correction, "
                                          "nhwc, num_calib, per_channel"),
    ("onnx", "int8", "per_channel: 'yes'", 5, "per_channel must be true or false, got 'yes'"),
    ("tflite", "int8", "nhwc: 1", 5, "nhwc must be true or false, got 1"),
    ("onnx", "int8", "calibration: magic", 5,
     "calibration must be 'auto', 'minmax', 'entropy', 'percentile', 'mse' or 'mean-minmax', got 'magic'"),
    ("onnx", "int8", "search: fast", 5, "search must be 'latency' or 'none', got 'fast'"),
    ("onnx", "int8", "adaround: 'yes'", 5, "adaround must be true or false, got 'yes'"),
    ("tflite", "int8", "bias_correction: '$(touch pwned)'", 5,
     "bias_correction must be true or false, got '$(touch pwned)'"),
    ("tensorrt", "int8", "calibration: mse", 5,
     "calibration must be 'auto', 'minmax', 'entropy' or 'percentile', got 'mse'"),
    ("onnx", "int8", "num_calib: '64'", 5, "num_calib must be an integer from 1 to 100000, got '64'"),
    ("onnx", "int8", "num_calib: true", 5, "num_calib must be an integer from 1 to 100000, got True"),
    ("tensorrt", "fp16", "workspace_mb: 0", 5, "workspace_mb must be an integer from 1 to 1048576, got 0"),
    ("tensorrt", "int8", "opset: 6.5", 5, "opset must be an integer from 7 to 30, got 6.5"),
]


@pytest.mark.parametrize("fmt, precision, options, line, problem", BAD_OPTIONS,
                         ids=[f"{b[0]}-{b[2].split(':')[0]}" for b in BAD_OPTIONS])
def test_bad_variant_options_name_file_variant_key_and_line(tmp_path, fmt, precision, options, line, problem):
    p = tmp_path / "r.yaml"
    p.write_text(f"variants:\n  - format: onnx\n  - format: {fmt}\n    precision: {precision}\n    options:\n"
                 f"      {options}\n")
    with pytest.raises(EdgekitError) as info:
        load_recipe(str(p))
    assert str(info.value) == f"Invalid recipe {p}: field 'variants.1.options' (line {line + 1}): {problem}"


def test_variant_options_are_checked_before_steps_and_torch(tmp_path):
    """A bad option is reported by load_recipe without importing torch (the steps' check needs it; this does not)."""
    import subprocess
    import sys

    p = tmp_path / "r.yaml"
    p.write_text("steps:\n  - prune: {macs: 0.5}\n"
                 "variants:\n  - {format: onnx, precision: int8, options: {nhwc: true}}\n")
    code = ("import sys\nfrom edgekit.config import load_recipe\nfrom edgekit.errors import EdgekitError\n"
            f"try:\n    load_recipe({str(p)!r})\nexcept EdgekitError as e:\n    print(e)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Unknown onnx option 'nhwc'" in proc.stdout


def test_good_variant_options_load_and_validate_to_their_schema(tmp_path):
    from edgekit.formats import FORMATS, OnnxOptions, validate_options

    p = tmp_path / "r.yaml"
    p.write_text("variants:\n  - format: onnx\n    precision: int8\n    options: {num_calib: 64.0, per_channel: false, "
                 "op_types: [Conv], search: none, opset: 13}\n"
                 "  - {format: tflite, precision: int8, options: {nhwc: true, num_calib: 32}}\n"
                 "  - {format: tensorrt, precision: int8, options: {calibration: percentile, workspace_mb: 2048}}\n")
    r = load_recipe(str(p))
    assert r.variants[0].options["num_calib"] == 64.0  # the recipe keeps the options as written (report.json)
    o = validate_options(FORMATS.get("onnx"), r.variants[0].options)
    assert isinstance(o, OnnxOptions) and o.num_calib == 64 and o.per_channel is False and o.op_types == ["Conv"]
    assert o.activation_type is None and o.calibration == "auto"  # None: the device profile's
    assert validate_options(FORMATS.get("onnx"), o) is o
    with pytest.raises(EdgekitError, match="Unknown onnx option 'num_calb'"):
        validate_options(FORMATS.get("onnx"), {"num_calb": 1})


def test_formats_table_imports_no_torch_and_names_real_exporters():
    """The CLI reads the formats table before torch loads; each row's exporter is a function a reader can follow."""
    import inspect
    import subprocess
    import sys

    code = ("import sys, edgekit.formats as f\n"
            "[f.FORMATS.get(n).options.model_validate({}) for n in ('onnx', 'tflite', 'tensorrt')]\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from edgekit.formats import FORMATS

    for name, target in (("onnx", "export_variant"), ("tflite", "export_tflite"), ("tensorrt", "export_tensorrt")):
        exporter = FORMATS.get(name).exporter
        assert callable(exporter) and exporter.__module__ == "edgekit.formats"
        assert f"import {target}" in inspect.getsource(exporter)


def test_cli_bad_option_exits_2_before_training(tmp_path, monkeypatch):
    import sys
    import time

    from typer.testing import CliRunner

    import edgekit.train as train
    from edgekit.cli import app

    real = train.fit

    def no_training(*a, **k):
        raise AssertionError("training started although the recipe is invalid")

    for mod in [train] + [m for n, m in list(sys.modules.items()) if n.startswith("edgekit")]:
        if getattr(mod, "fit", None) is real:
            monkeypatch.setattr(mod, "fit", no_training)
    p = tmp_path / "r.yaml"
    p.write_text("variants:\n  - {format: onnx, precision: int8, options: {num_calb: 64}}\n")
    out = tmp_path / "run"
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["compress", "shufflenetv2-x0.5", "--recipe", str(p), "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Unknown onnx option 'num_calb'. Did you mean: num_calib?" in lines[0], res.stderr
    assert "Traceback" not in res.output and not out.exists()
    assert time.perf_counter() - t0 < 60  # seconds: imports only, no training (which the patch above would stop)


def test_variant_options_are_checked_when_a_recipe_is_made_in_python():
    """The public API takes Recipe objects too: their variants' options meet the same schema, before any work."""
    from pydantic import ValidationError

    from edgekit.config import Recipe

    with pytest.raises(ValidationError, match="Unknown tflite option 'nhcw'. Did you mean: nhwc?"):
        Recipe(name="x", variants=[{"format": "tflite", "precision": "int8", "options": {"nhcw": True}}])
    assert Recipe(name="x", variants=[{"format": "onnx", "precision": "int8", "options": {"search": "none"}}])
