"""Constrained decoding: a grammar (JSON object, JSON schema, Lark, regex) turned into a token mask per step.

(Stub: the interface other modules build on; compiled and applied by llguidance, filled in next.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Constraint:
    """What a reply must match. kind: "json_object" (any JSON object), "json_schema" (spec: the schema dict),
    "lark" (spec: an llguidance Lark grammar, which may embed JSON schemas with %json{...}), "regex" (spec: str)."""

    kind: str
    spec: Any = None
