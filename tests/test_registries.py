"""Steps and runtimes register by one convention: a table that imports its modules on the first lookup.

Checking a recipe uses the torch-free parameter schemas (``edgekit.steps.params``), so it never imports torch.
"""

from __future__ import annotations

import subprocess
import sys

import pytest


def _fresh(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_checking_every_builtin_recipe_imports_no_torch():
    out = _fresh("import sys\n"
                 "from edgekit.config import builtin_names, load_recipe\n"
                 "for name in builtin_names('recipes'):\n    load_recipe(name)\n"
                 "import edgekit.steps\n"
                 "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('edgekit.steps.')))")
    assert out == "['edgekit.steps.params', 'edgekit.steps.registry']"


def test_tables_load_their_modules_on_the_first_lookup():
    out = _fresh("import sys\n"
                 "import edgekit.runtime, edgekit.steps\n"
                 "loaded = lambda: sorted(m for m in sys.modules if m.startswith(('edgekit.runtime.', 'edgekit.steps.')))\n"
                 "print(loaded(), 'torch' in sys.modules)\n"
                 "print(sorted(edgekit.runtime.RUNTIMES), loaded())")
    before, after = out.splitlines()
    assert before == "['edgekit.runtime.base', 'edgekit.steps.params', 'edgekit.steps.registry'] False"
    assert after == ("['litert', 'onnxruntime', 'tensorrt'] ['edgekit.runtime.base', 'edgekit.runtime.litert', "
                     "'edgekit.runtime.onnxruntime', 'edgekit.runtime.tensorrt', 'edgekit.steps.params', "
                     "'edgekit.steps.registry']")


def test_steps_and_their_schemas_are_one_table():
    from edgekit.steps import STEP_PARAMS, STEPS, Step
    from edgekit.steps.params import SVDParams

    assert set(STEPS) == set(STEP_PARAMS) >= {"prune", "distill", "svd"}
    assert all(STEPS.get(k).Params is STEP_PARAMS.get(k) for k in STEPS)

    class OtherSvd(Step):
        name = "prune"
        Params = SVDParams

    from edgekit.steps import register_step

    with pytest.raises(ValueError, match="STEP_PARAMS"):
        register_step(OtherSvd)
    assert STEPS.get("prune").Params is STEP_PARAMS.get("prune")


def test_unknown_step_is_one_clear_error(tmp_path):
    from edgekit.config import load_recipe
    from edgekit.errors import EdgekitError

    bad = tmp_path / "r.yaml"
    bad.write_text("steps:\n  - prunee: {macs: 0.5}\nvariants:\n  - {format: onnx, precision: fp32}\n")
    with pytest.raises(EdgekitError, match="Unknown step 'prunee'.*prune"):
        load_recipe(str(bad))
