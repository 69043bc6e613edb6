"""Where edgekit keeps what it can rebuild (trained baselines, wheels): the user cache, or $EDGEKIT_CACHE."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("EDGEKIT_CACHE") or user_cache_dir("edgekit"))
