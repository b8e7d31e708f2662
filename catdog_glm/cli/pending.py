"""Commands whose issues have not landed yet: they answer clearly instead of crashing."""

from __future__ import annotations

from catdog_glm.cli._common import fail


def _not_yet(what: str):
    return fail(f"`catdog {what}` is not implemented yet in this version of catdog-glm", code=2)


def serve_chat() -> None:
    """Serve a chat model as a Gradio page and an OpenAI-compatible HTTP API (not implemented yet)."""
    raise _not_yet("serve-chat")
