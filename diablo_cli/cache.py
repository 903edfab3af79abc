"""Where diablo-cli keeps what it builds for itself (converted models, logs): stdlib only, so the CLI can find
it before torch is imported."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where diablo-cli keeps converted models and logs: $DIABLO_CACHE, else $XDG_CACHE_HOME/diablo-cli."""
    if os.environ.get("DIABLO_CACHE"):
        return Path(os.environ["DIABLO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diablo-cli"
