"""The zoo's names, aliases and sizes at 224 px, read without importing torch.

`edgekit zoo list` and every unknown-name error answer from ``index.json`` in well under a second, where building the
registry imports torch, timm and torchvision (6-25 s on a cold 2-core machine). The file is generated from the
registry (``python -m edgekit.zoo.index --write``) and a test fails when it no longer matches.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict, List

from ..errors import EdgekitError, did_you_mean

INDEX_PATH = Path(__file__).with_name("index.json")
STATS_SIZE = 224


@lru_cache(maxsize=1)
def load_index() -> Dict[str, dict]:
    """name -> {aliases, family, source, paper, params, macs (at 224 px; a detector's at its ``input_size``, with
    ``task``: detection)}."""
    return json.loads(INDEX_PATH.read_text())["models"]


def all_names() -> List[str]:
    idx = load_index()
    return sorted({*idx, *(a for e in idx.values() for a in e["aliases"])})


def canonical_name(name: str) -> str:
    """The zoo entry ``name`` (or an alias of it) is; an EdgekitError with close names otherwise."""
    key = name.lower()
    for canon, entry in load_index().items():
        if key == canon or key in entry["aliases"]:
            return canon
    names = all_names()
    raise EdgekitError(f"Unknown model {name!r}.{did_you_mean(name, names)} Known: {', '.join(names)}.")


def build_index() -> dict:
    """The index from the registry (imports torch and builds every model once)."""
    from . import list_models, model_stats

    models = {}
    for spec in list_models(task=None):
        from . import create

        detector = spec.task == "detection"  # sized at its own input: its default boxes are fixed by it
        size = spec.input_size if detector else STATS_SIZE
        st = model_stats(create(spec.name), (3, size, size))
        models[spec.name] = {"aliases": sorted(a.lower() for a in spec.aliases), "family": spec.family,
                             "source": spec.source, "paper": spec.paper, "params": int(st["params"]),
                             "macs": int(st["macs"]), **({"task": spec.task, "input_size": size} if detector else {})}
    return {"stats_input_size": STATS_SIZE, "models": models}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write or check edgekit/zoo/index.json against the registry.")
    ap.add_argument("--write", action="store_true", help="rewrite index.json")
    args = ap.parse_args(argv)
    fresh = build_index()
    if args.write:
        INDEX_PATH.write_text(json.dumps(fresh, indent=1, sort_keys=True) + "\n")
        return 0
    same = json.loads(INDEX_PATH.read_text()) == fresh
    print("index.json matches the registry" if same else "index.json is stale: python -m edgekit.zoo.index --write")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
