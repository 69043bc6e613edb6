"""index.json (what the CLI answers from without torch) matches the registry; listings and name errors are fast."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from edgekit import zoo
from edgekit.errors import EdgekitError
from edgekit.zoo.index import canonical_name, load_index


def test_index_names_match_the_registry():
    idx = load_index()
    specs = {s.name: s for s in zoo.list_models(task=None)}
    assert set(idx) == set(specs), "stale index.json: python -m edgekit.zoo.index --write"
    for name, spec in specs.items():
        e = idx[name]
        assert (e["aliases"], e["source"], e["paper"], e["family"]) == (
            sorted(a.lower() for a in spec.aliases), spec.source, spec.paper, spec.family), name


@pytest.mark.parametrize("name", ["shufflenetv2-x0.5", "mobilenetv3-small", "squeezenet1.1"])
def test_index_sizes_match_the_models(name):
    st = zoo.model_stats(zoo.create(name), (3, 224, 224))
    assert (load_index()[name]["params"], load_index()[name]["macs"]) == (st["params"], st["macs"])


def test_canonical_name_and_the_registry_agree_on_errors():
    assert canonical_name("ShuffleNetV2") == zoo.get_spec("shufflenetv2").name
    with pytest.raises(EdgekitError) as fast:
        canonical_name("shufflenetv3")
    with pytest.raises(EdgekitError) as slow:
        zoo.get_spec("shufflenetv3")
    assert str(fast.value) == str(slow.value) and "Did you mean: shufflenetv2" in str(fast.value)


def test_name_errors_do_not_import_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom edgekit.cli import app\n"
            "r = CliRunner().invoke(app, ['compress', 'shufflenetv3'])\nassert r.exit_code == 2, r.output\n"
            "r = CliRunner().invoke(app, ['compress', 'shufflenetv2', '--recipe', 'int9'])\nassert r.exit_code == 2\n"
            "r = CliRunner().invoke(app, ['zoo', 'list'])\nassert r.exit_code == 0, r.output\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    print(f"\nthree CLI answers without torch: {time.perf_counter() - t0:.2f} s")
