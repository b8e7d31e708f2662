"""Tool calling, whatever the model's format: OpenAI `tools` checked, the deltas a reply's parser gives, and the
parser's machinery. How a family writes tools into its prompt, how its calls look and the grammar that forces one
live in chat/formats/ (ChatGLM3's protocol, Hermes' <tool_call> blocks).

`ToolCallParser` turns streamed text into content and tool-call deltas; a format's subclass reads its own calls.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from catdog_glm.chat.constrained import check_schema_depth
from catdog_glm.errors import ConfigError

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
NO_TOOL_FORMAT = "this model has no tool-calling format (its chat template neither renders tools nor is ChatML)"


# ---- checking what a client sends -------------------------------------------------------------------------------
def _check_schema(schema, where: str) -> None:
    """A JSON schema llguidance can compile (what a forced call's arguments are held to)."""
    import llguidance

    check_schema_depth(schema, where)  # before llguidance, whose stack a deep $ref chain overflows
    try:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            llguidance.LLMatcher.grammar_from_json_schema(schema)
        )
    except (TypeError, ValueError) as e:  # not serializable, not a schema
        is_error, messages = True, [str(e)]
    if is_error:
        raise ConfigError(f"{where} is not a usable JSON schema: {(messages or ['invalid'])[0].splitlines()[0]}")


def validate_tools(tools) -> list[dict]:
    """OpenAI tools -> clean `{"type": "function", "function": {name, description?, parameters?, strict?}}` dicts."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ConfigError("tools must be a list of {'type': 'function', 'function': {'name': ...}}")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ConfigError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ConfigError(f"tools[{i}].function.name must match ^[a-zA-Z0-9_-]{{1,64}}$, got {name!r}")
        if name in seen:
            raise ConfigError(f"tools[{i}]: there is already a function named {name!r}")
        seen.add(name)
        clean: dict = {"name": name}
        if fn.get("description") is not None:
            if not isinstance(fn["description"], str):
                raise ConfigError(f"tools[{i}].function.description must be a string")
            clean["description"] = fn["description"]
        if fn.get("parameters") is not None:
            params = fn["parameters"]
            if not isinstance(params, dict) or params.get("type", "object") != "object":
                raise ConfigError(f"tools[{i}].function.parameters must be a JSON schema of type 'object'")
            _check_schema(params, f"tools[{i}].function.parameters")
            clean["parameters"] = params
        if fn.get("strict") is not None:
            clean["strict"] = bool(fn["strict"])
        out.append({"type": "function", "function": clean})
    return out


def json_text(value) -> str:
    """JSON text that UTF-8 can carry: a model may write "\\ud800" (a lone surrogate once parsed), which only the
    escaped form can put on the wire (JSON responses and SSE events are UTF-8)."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value)
    return text


def _function_names(tools) -> set[str]:
    return {t["function"]["name"] for t in tools or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)}


def call_arguments(call: dict, where: str = "a tool call") -> dict:
    """The arguments of an OpenAI tool call in a message (a JSON string, or already a dict) as a dict."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ConfigError(f"{where} needs a function with a name")
    args = fn.get("arguments")
    if args is None or args == "":
        return {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: arguments are not JSON ({e.msg})") from e
    if not isinstance(args, dict):
        raise ConfigError(f"{where}: arguments must be a JSON object")
    return args


def has_tool_turns(messages: list[dict]) -> bool:
    return any(m.get("tool_calls") or m.get("role") in ("tool", "observation") for m in messages)


def text_of(content) -> str:
    return "" if content is None else str(content)


# ---- reading calls out of replies -------------------------------------------------------------------------------
@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallDelta:
    index: int
    id: str | None
    name: str | None
    arguments: str


Delta = ContentDelta | ToolCallDelta


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is the start of `marker` (held back: it may become the marker)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolCallParser:
    """Streamed reply text -> content and tool-call deltas, for one choice. A format's subclass reads its own calls
    in `_step()` and says whether its replies open with a metadata line (ChatGLM3's) and keep trailing whitespace.

    `feed(text)` returns the deltas that text completes; only a tail that could still start a call (or a whitespace
    run, which may be the gap before a call) is held back. `finish()` flushes; then `.content` (None when empty) and
    `.tool_calls` (OpenAI dicts) equal what the deltas carried. A call to a function not in `tools`, or one that does
    not parse, stays plain content. With `parallel=False` only the first call counts; later ones are dropped.
    `continued=True` (a prefilled assistant message being continued) reads the text as content from its first
    character: there is no metadata line to strip. `finish(cut=True)` (the reply hit its token limit):
    a call still open is incomplete, so it is neither a call in `.tool_calls` nor content (when its name had come,
    a stream has already carried its start and the arguments so far)."""

    metadata_line = False  # every reply starts with a line that names the call it makes (empty: plain text)
    keeps_trailing_space = True  # whitespace at a reply's end is content (ChatGLM3's replies are stripped)

    def __init__(self, tools, parallel: bool = True, *, continued: bool = False):
        self.names = _function_names(tools)
        self.parallel = parallel
        self.content: str | None = None
        self.tool_calls: list[dict] = []
        self._parts: list[str] = []
        self._buf = ""
        self._ws = ""  # whitespace held back at the end of content
        self._state = "meta" if self.metadata_line and not continued else "content"
        self._lstrip = self.metadata_line and not continued
        self._call: dict | None = None  # the call being read (each format keeps its own notes in it)
        self._meta = ""
        self._done = False
        self._cut = False  # finish(cut=True): the reply ended at its token limit
        self.cut_call = False  # a call was open when the reply was cut

    # -- public ----------------------------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Delta]:
        if self._done:
            raise RuntimeError("feed() after finish()")
        self._buf += text
        return self._drain(final=False)

    def finish(self, *, cut: bool = False) -> list[Delta]:
        if self._done:
            return []
        self._cut = cut
        out = self._drain(final=True)
        if self._ws and not self.tool_calls and self.keeps_trailing_space:
            out += self._content(self._ws, raw=True)
        self._ws = ""
        self._done = True
        text = "".join(self._parts)
        self.content = text if text else None
        return out

    # -- content and calls -----------------------------------------------------------------------------------------
    def _content(self, text: str, raw: bool = False) -> list[Delta]:
        if raw:
            if not text:
                return []
            self._parts.append(text)
            return [ContentDelta(text)]
        if self._lstrip:
            text = text.lstrip()
            if not text:
                return []
            self._lstrip = False
        text = self._ws + text
        kept = text.rstrip()
        self._ws = text[len(kept) :]
        return self._content(kept, raw=True)

    def _start_call(self, name: str) -> list[Delta]:
        self._ws = ""
        call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
        self.tool_calls.append(call)
        return [ToolCallDelta(len(self.tool_calls) - 1, call["id"], name, "")]

    def _arguments(self, text: str) -> list[Delta]:
        if not text:
            return []
        self.tool_calls[-1]["function"]["arguments"] += text
        return [ToolCallDelta(len(self.tool_calls) - 1, None, None, text)]

    def _wants_call(self, name: str) -> bool:
        return name in self.names and (self.parallel or not self.tool_calls)

    def _drain(self, final: bool) -> list[Delta]:
        out: list[Delta] = []
        while True:
            step = self._step(final)
            if step is None:
                return out
            out += step

    def _step(self, final: bool) -> list[Delta] | None:
        """Read what `_buf` holds: the deltas of one piece of it, [] to be asked again, None when it must wait for
        more text (or, with `final`, when it is done)."""
        raise NotImplementedError


# ---- forcing a call -----------------------------------------------------------------------------------------------
def chosen_tools(tools: list[dict], tool_choice) -> tuple[list[dict], bool] | None:
    """(the functions a reply must call one of, whether it is one named function); None: nothing is forced."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        if not tools:
            raise ConfigError("tool_choice 'required' needs at least one tool in tools")
        return tools, False
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise ConfigError(f"tool_choice names the function {name!r}, which is not among the tools")
        return chosen, True
    raise ConfigError(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


def function_parameters(fn: dict) -> dict:
    return fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
