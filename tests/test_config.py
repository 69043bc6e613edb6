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
