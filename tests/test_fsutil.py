"""--force replaces only folders edgekit wrote, and an interrupted swap is repaired at the next run."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from edgekit.cli import app
from edgekit.errors import EdgekitError
from edgekit.fsutil import MARKER, check_replaceable, make_temp_dir, publish


def _tree(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def test_force_on_a_folder_edgekit_did_not_write_is_exit_2_and_touches_nothing(tmp_path):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("print('my project')\n")
    (proj / "report.json").write_text('{"mine": true}')  # a report.json alone does not make it edgekit's
    before = _tree(proj)
    res = CliRunner().invoke(app, ["compress", "shufflenetv2-x0.5", "--out", str(proj), "--force"])
    assert res.exit_code == 2 and "not a folder edgekit wrote" in res.output, res.output
    assert _tree(proj) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]


def test_publish_marks_and_replaces_its_own_folder_without_a_gap(tmp_path):
    out = tmp_path / "run"
    for i in range(2):
        tmp = make_temp_dir(out)
        (tmp / "report.json").write_text(json.dumps({"i": i}))
        publish(tmp, out)
        assert json.loads((out / "report.json").read_text()) == {"i": i}
        assert json.loads((out / MARKER).read_text())["written_by"] == "edgekit"
        check_replaceable(out, force=True)  # its own folder: replaceable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(EdgekitError, match="--force"):
        check_replaceable(out, force=False)
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(EdgekitError, match="not a folder"):
        check_replaceable(link, force=True)


def test_a_swap_cut_between_its_two_renames_is_undone(tmp_path):
    out = tmp_path / "run"
    tmp = make_temp_dir(out)
    (tmp / "report.json").write_text("{}")
    publish(tmp, out)
    os.replace(out, tmp_path / ".run.old-4242")  # the first rename happened, then the process died
    check_replaceable(out, force=True)
    assert (out / MARKER).is_file() and not (tmp_path / ".run.old-4242").exists()
    # a stray copy that is not edgekit's is never moved or deleted
    (tmp_path / ".run.old-77").mkdir()
    (tmp_path / ".run.old-77" / "x").write_text("keep")
    check_replaceable(out, force=True)
    assert (tmp_path / ".run.old-77" / "x").read_text() == "keep"
