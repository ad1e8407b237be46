"""Where thermokd keeps what it derives once (teachers, tokenised text, encoder features); the files themselves
are written and checked by :mod:`thermokd.files`."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$THERMOKD_CACHE``, else ``~/.cache/thermokd``."""
    return Path(os.environ.get("THERMOKD_CACHE", Path.home() / ".cache" / "thermokd"))
