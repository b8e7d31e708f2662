"""The chat modules' name for catdog's cache root; `catdog_glm.paths` owns it (datasets live there too)."""

from __future__ import annotations

from catdog_glm.paths import cache_dir

__all__ = ["cache_dir"]
