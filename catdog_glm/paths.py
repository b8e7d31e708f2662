"""Where catdog keeps what it makes on a user's machine (converted models, built kernels, pulled models and
datasets): one root, in a leaf module below vision and chat so that either can ask."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$CATDOG_CACHE_DIR, else $XDG_CACHE_HOME/catdog-glm (~/.cache/catdog-glm)."""
    if os.environ.get("CATDOG_CACHE_DIR"):
        return Path(os.environ["CATDOG_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "catdog-glm"
