"""Messages: the one place that turns what callers send into the engine's `{"role", "content", ...}` dicts.

- `content_text()` flattens a message's content to text: a string, or OpenAI's content parts (text parts, and an
  assistant's refusal parts) joined; other parts are refused (this is a text model) or, for a page's own history,
  left out. Lone surrogates are refused: no tokenizer can encode them.
- `normalize_messages()` reads OpenAI/ChatGLM3-style message lists and the book's `[[query, answer], ...]` pairs.

The API's protocol, the engine and the pages all call these; nothing else flattens content.
"""

from __future__ import annotations

from catdog_glm.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool", "observation")
EXTRA_KEYS = ("tool_calls", "tool_call_id", "name", "metadata")  # kept as they are, for the prompt builders
TEXT_PARTS = ("text", "refusal")  # the content parts a text model reads: {"type": kind, kind: "..."}


def content_text(content, where: str = "the message", *, strict: bool = True) -> str:
    """A message's content as text: a string, or content parts whose text is joined. With `strict`, a part that is
    not text raises ConfigError naming its type; without (a page's own chat history, which may hold files), such
    parts are left out. Text that UTF-8 cannot encode (a lone surrogate) is refused either way."""
    if content is None:
        return ""
    if isinstance(content, dict):  # one part on its own (Gradio's chatbot may hold a single part or file)
        content = [content]
    if isinstance(content, (list, tuple)):
        texts = []
        for part in content:
            if isinstance(part, str) and not strict:
                texts.append(part)
                continue
            kind = part.get("type", None if strict else "text") if isinstance(part, dict) else type(part).__name__
            text = part.get(kind) if isinstance(part, dict) and kind in TEXT_PARTS else None
            if isinstance(text, str):
                texts.append(text)
            elif strict:
                raise ConfigError(
                    f"{where} has a content part of type {kind!r}; only text parts are supported (a text model)"
                )
        content = "".join(texts)
    text = str(content)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{where} is not valid text ({e.reason}: a lone surrogate {text[e.start]!r})") from None
    return text


def _check_tool_keys(message: dict, where: str) -> None:
    """The extra keys as the prompt builders read them (the book's /chat passes history dicts as they come):
    `tool_calls` a list of {"function": {"name": str, "arguments": JSON text or object}}, the others strings."""
    from catdog_glm.chat.tools import call_arguments

    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise ConfigError(f"{where}: tool_calls must be a list of calls")
        for i, call in enumerate(calls):
            call_arguments(call, f"{where}: tool_calls[{i}]")
    for key in ("tool_call_id", "name"):
        if key in message and not isinstance(message[key], str):
            raise ConfigError(f"{where}: {key} must be a string")


def normalize_messages(history) -> list[dict]:
    """ChatGLM3-style/OpenAI [{"role", "content", ...}] or the book's [[query, answer], ...] pairs -> messages.
    Roles: system, user, assistant, tool, observation; an assistant message with `tool_calls` may have no content;
    `tool_calls`, `tool_call_id`, `name` and `metadata` are kept."""
    messages: list[dict] = []
    for n, item in enumerate(history or []):
        if isinstance(item, dict):
            role = item.get("role")
            if role not in ROLES:
                if "role" not in item:
                    raise ConfigError("each message needs a 'role' and a 'content'")
                raise ConfigError(f"message {n} has unknown role {role!r}; use one of {', '.join(ROLES)}")
            content = item.get("content")
            if content is None:
                if not (role == "assistant" and item.get("tool_calls")):
                    raise ConfigError("each message needs a 'role' and a 'content'")
                content = ""
            message = {"role": role, "content": content_text(content, f"message {n}")}
            message.update((k, item[k]) for k in EXTRA_KEYS if item.get(k) is not None)
            _check_tool_keys(message, f"message {n}")
            messages.append(message)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            query, answer = item
            messages += [
                {"role": "user", "content": content_text(query, f"history item {n}")},
                {"role": "assistant", "content": content_text(answer, f"history item {n}")},
            ]
        else:
            raise ConfigError(f"cannot read history item {item!r}: use {{'role', 'content'}} or [query, answer]")
    return messages
