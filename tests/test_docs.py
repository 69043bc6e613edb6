"""The worked examples of docs/python-api.md run as written, in order, in one namespace (as a reader would)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"




def blocks(text: str) -> list:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_page_has_examples():
    assert len(blocks(DOC.read_text())) >= 6


@pytest.mark.slow
def test_python_api_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks(DOC.read_text())):
        try:
            exec(compile(code, f"{DOC.name}[block {i}]", "exec"), namespace)
        except Exception as exc:  # say which block broke
            raise AssertionError(f"docs/python-api.md block {i} failed: {type(exc).__name__}: {exc}\n{code}") from exc
    printed = capsys.readouterr().out
    assert "measured" in printed or "int8" in printed
    assert os.path.isdir(tmp_path / "export" / "quick")
