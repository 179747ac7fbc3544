"""Where cxrcae keeps what it downloads and measures: one home folder, torch-free so every layer can ask."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir

HOME_ENV = "CXRCAE_HOME"


def home_dir() -> Path:
    """``$CXRCAE_HOME``, else the platform's user cache dir for cxrcae (datasets, probe results, caches)."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path(user_cache_dir("cxrcae"))
