"""Tool calling: OpenAI `tools` checked, written into prompts, and calls read back out of the model's text.

Two formats (`ChatModel.tool_format`):

- "chatglm3": ChatGLM3's own protocol, as THUDM's openai_api_demo and tokenizer write it. The tools go into a first
  system message ("Answer the following questions ... tools:" + json.dumps(functions, indent=4)); an assistant call is
  `<|assistant|>{name}\\n` + "```python\\ntool_call(key=value, ...)\\n```"; results are `<|observation|>` messages.
  A reply's first line is its metadata: empty for a plain answer, else the name of the function it calls.
- "hermes": `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (Qwen2.5 and many others). Templates that
  render `tools` get them as they are; plain ChatML templates (the embedded SmolLM2) get the tools written into the
  system message and calls/results into the turns exactly as Qwen2.5's template writes them.

`ToolCallParser` turns streamed text into content and tool-call deltas; `tool_constraint` builds the llguidance
grammar that makes `tool_choice: "required"` or a named function certain rather than hoped for.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
import secrets
from dataclasses import dataclass

from catdog_glm.chat.constrained import JSON_OPTIONS, Constraint, check_schema_depth
from catdog_glm.errors import ConfigError

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
CHATGLM3_TOOL_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
HERMES_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
HERMES_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call>"
)
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
GLM_TURN = "<|assistant|>"  # ChatGLM3's replies show this special token where a new assistant turn starts
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


def _json_text(value) -> str:
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


def _text(content) -> str:
    return "" if content is None else str(content)


# ---- prompts -----------------------------------------------------------------------------------------------------
def _python_literal(value) -> str:
    """A JSON value written as a Python literal (what ChatGLM3 writes inside tool_call(...))."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{"
            + ", ".join(f"{json.dumps(str(k), ensure_ascii=False)}: {_python_literal(v)}" for k, v in value.items())
            + "}"
        )
    return json.dumps(value, ensure_ascii=False)


def chatglm3_call_code(arguments: dict) -> str:
    """The code block of a ChatGLM3 call: keyword arguments, or `**{...}` for keys that are not identifiers."""
    plain = {k: v for k, v in arguments.items() if str(k).isidentifier()}
    other = {k: v for k, v in arguments.items() if k not in plain}
    parts = [f"{k}={_python_literal(v)}" for k, v in plain.items()]
    if other:
        parts.append("**" + _python_literal(other))
    return "```python\ntool_call(" + ", ".join(parts) + ")\n```"


def chatglm3_messages(messages: list[dict], tools: list[dict] | None = None) -> list[dict]:
    """OpenAI messages -> ChatGLM3's (role, metadata, content) messages, as THUDM's process_chatglm_messages.

    The tools become a first system message carrying the function list (its `tools` key, which build_prompt writes
    after the content); a system message of the caller's own follows it (THUDM's demo drops it; we keep it)."""
    out: list[dict] = []
    if tools:
        out.append({"role": "system", "content": CHATGLM3_TOOL_SYSTEM, "tools": [t["function"] for t in tools]})
    for i, m in enumerate(messages):
        role, content = m["role"], _text(m.get("content"))
        if role == "tool":
            role = "observation"
        if role == "assistant" and m.get("tool_calls"):
            if content.strip():
                out.append({"role": "assistant", "metadata": m.get("metadata") or "", "content": content})
            for call in m["tool_calls"]:
                args = call_arguments(call, f"messages[{i}].tool_calls")
                out.append(
                    {"role": "assistant", "metadata": call["function"]["name"], "content": chatglm3_call_code(args)}
                )
            continue
        item = {"role": role, "content": content}
        if m.get("metadata"):
            item["metadata"] = str(m["metadata"])
        out.append(item)
    return out


def hermes_call_text(name: str, arguments: dict) -> str:
    return f'{CALL_OPEN}\n{{"name": "{name}", "arguments": {json.dumps(arguments, ensure_ascii=False)}}}\n{CALL_CLOSE}'


def hermes_messages(messages: list[dict], tools: list[dict] | None = None, default_system: str = "") -> list[dict]:
    """OpenAI messages -> plain {role, content} messages for a ChatML template that knows nothing of tools, written
    as Qwen2.5's template writes them: the tools block appended to the system message, calls as <tool_call> blocks in
    the assistant's content, consecutive tool results as <tool_response> blocks in one user turn. Without a system
    message, the tools follow `default_system` (the template's own, which Qwen2.5 keeps too) when there is one."""
    out: list[dict] = []
    rest = list(messages)
    if tools:
        block = HERMES_TOOLS_HEADER + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        block += HERMES_TOOLS_FOOTER
        if rest and rest[0]["role"] == "system":
            out.append({"role": "system", "content": _text(rest[0].get("content")) + "\n\n" + block})
            rest = rest[1:]
        else:
            out.append({"role": "system", "content": f"{default_system}\n\n{block}" if default_system else block})
    for i, m in enumerate(rest):
        role, content = m["role"], _text(m.get("content"))
        if role in ("tool", "observation"):
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "_tool_turn": True})
            continue
        if role == "assistant" and m.get("tool_calls"):
            calls = [
                hermes_call_text(c["function"]["name"], call_arguments(c, f"messages[{i}].tool_calls"))
                for c in m["tool_calls"]
            ]
            content = (content + "\n" if content else "") + "\n".join(calls)
        out.append({"role": role, "content": content})
    for m in out:
        m.pop("_tool_turn", None)
    return out


def native_messages(messages: list[dict]) -> list[dict]:
    """Messages for a template that renders tools itself: call arguments as dicts (templates `tojson` them), tool
    results with role "tool", content never None."""
    out = []
    for i, m in enumerate(messages):
        item = dict(m)
        item["content"] = _text(m.get("content"))
        if item["role"] == "observation":
            item["role"] = "tool"
        if m.get("tool_calls"):
            item["tool_calls"] = [
                {
                    "id": c.get("id", ""),
                    "type": "function",
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": call_arguments(c, f"messages[{i}].tool_calls"),
                    },
                }
                for c in m["tool_calls"]
            ]
        out.append(item)
    return out


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


def _literal(node):
    """A Python literal from its syntax tree, never evaluated; JSON's true/false/null are read too."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, bool, int, float))):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise ValueError("not a finite number")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("a sign before something that is not a number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("** inside a dict")
        keys = [_literal(k) for k in node.keys]
        if not all(isinstance(k, str) for k in keys):
            raise ValueError("dict keys must be strings")
        return dict(zip(keys, (_literal(v) for v in node.values), strict=True))
    if isinstance(node, ast.Name) and node.id in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[node.id]
    raise ValueError(f"not a literal: {type(node).__name__}")


def parse_chatglm3_call(body: str) -> dict:
    """The arguments of ChatGLM3's "```python\\ntool_call(a=1, b='x')\\n```" (ValueError when it is not one)."""
    code = body.strip()
    if code.startswith("```"):
        code = code.split("\n", 1)[1] if "\n" in code else ""
    code = code.rstrip()
    if code.endswith("```"):
        code = code[:-3]
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise ValueError(f"not Python: {e}") from e
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ValueError("not a tool_call(...)")
    if call.args:
        raise ValueError("tool_call takes keyword arguments only")
    arguments: dict = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            extra = _literal(keyword.value)
            if not isinstance(extra, dict):
                raise ValueError("** needs a dict")
            arguments.update(extra)
        else:
            arguments[keyword.arg] = _literal(keyword.value)
    return arguments


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is the start of `marker` (held back: it may become the marker)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class ToolCallParser:
    """Streamed reply text -> content and tool-call deltas, for one choice.

    `feed(text)` returns the deltas that text completes; only a tail that could still start a call (or a whitespace
    run, which may be the gap before a call) is held back. `finish()` flushes; then `.content` (None when empty) and
    `.tool_calls` (OpenAI dicts) equal what the deltas carried. A call to a function not in `tools`, or one that does
    not parse, stays plain content. With `parallel=False` only the first call counts; later ones are dropped.
    `continued=True` (a prefilled assistant message being continued) reads the text as content from its first
    character: there is no metadata line for ChatGLM3 to strip. `finish(cut=True)` (the reply hit its token limit):
    a call still open is incomplete, so it is neither a call in `.tool_calls` nor content (when its name had come,
    a stream has already carried its start and the arguments so far)."""

    def __init__(self, tool_format: str | None, tools, parallel: bool = True, *, continued: bool = False):
        self.tool_format = tool_format
        self.names = _function_names(tools)
        self.parallel = parallel
        self.content: str | None = None
        self.tool_calls: list[dict] = []
        self._parts: list[str] = []
        self._buf = ""
        self._ws = ""  # whitespace held back at the end of content
        self._state = "meta" if tool_format == "chatglm3" and not continued else "content"
        self._lstrip = tool_format == "chatglm3" and not continued
        self._call: dict | None = None  # the hermes call being read: {"name", "start", "sent", "index"} or {}
        self._meta = ""
        self._done = False
        self._cut = False  # finish(cut=True): the reply ended at its token limit
        self.cut_call = False  # a call was open when the reply was cut

    # -- public ----------------------------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Delta]:
        if self._done:
            raise RuntimeError("feed() after finish()")
        if self.tool_format is None:
            return self._content(text, raw=True)
        self._buf += text
        return self._drain(final=False)

    def finish(self, *, cut: bool = False) -> list[Delta]:
        if self._done:
            return []
        self._cut = cut
        out = [] if self.tool_format is None else self._drain(final=True)
        if self._ws and not self.tool_calls and self.tool_format != "chatglm3":
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
            step = self._glm_step(final) if self.tool_format == "chatglm3" else self._hermes_step(final)
            if step is None:
                return out
            out += step

    # -- ChatGLM3 --------------------------------------------------------------------------------------------------
    def _glm_step(self, final: bool) -> list[Delta] | None:
        buf = self._buf
        if self._state == "end":
            return None
        if self._state == "meta":
            line, newline, rest = buf.partition("\n")
            if len(line) > 80 or not re.fullmatch(r"[a-zA-Z0-9_-]*", line.strip()):
                self._state = "content"  # not a metadata line: the whole turn is content
                return []
            if not newline:
                if final:
                    self._state = "content"
                    return []
                return None
            meta, self._buf = line, rest
            self._meta = meta.strip()
            if not self._meta:
                self._state, self._lstrip = "content", True
            elif self._wants_call(self._meta):
                self._state = "call"
            elif self._meta in self.names:
                log.info("dropped a second tool call (%s): parallel tool calls are off", self._meta)
                self._state = "drop"
            else:  # another kind of turn (e.g. ChatGLM3's "interpreter"): shown as it came
                self._state = "content"
                return self._content(meta + "\n")
            return []
        cut = buf.find(GLM_TURN)
        if self._state == "content":
            if cut < 0:
                keep = 0 if final else _partial_suffix(buf, GLM_TURN)
                text, self._buf = buf[: len(buf) - keep], buf[len(buf) - keep :]
                return self._content(text) if text else None
            text, self._buf = buf[:cut], buf[cut + len(GLM_TURN) :]
            self._state = "meta"
            return self._content(text)
        if cut < 0 and not final:
            return None
        body = buf if cut < 0 else buf[:cut]
        self._buf = "" if cut < 0 else buf[cut + len(GLM_TURN) :]
        state, self._state = self._state, "meta"
        if cut < 0:
            self._state = "end"
        if state == "drop":
            return []
        if cut < 0 and self._cut:  # the token limit came before the call's end: not a call
            self.cut_call = True
            return []
        try:
            arguments = parse_chatglm3_call(body)
        except ValueError as e:
            log.info("a ChatGLM3 call to %s did not parse (%s): kept as content", self._meta, e)
            self._lstrip = False
            return self._content(f"{self._meta}\n{body}")
        return self._start_call(self._meta) + self._arguments(_json_text(arguments))

    # -- Hermes ----------------------------------------------------------------------------------------------------
    def _hermes_step(self, final: bool) -> list[Delta] | None:
        buf = self._buf
        if self._state == "content":
            cut = buf.find(CALL_OPEN)
            if cut < 0:
                keep = 0 if final else _partial_suffix(buf, CALL_OPEN)
                text, self._buf = buf[: len(buf) - keep], buf[len(buf) - keep :]
                return self._content(text) if text else None
            text, self._buf = buf[:cut], buf[cut + len(CALL_OPEN) :]
            out = self._content(text)
            self._state, self._call = "call", {}
            return out
        if self._state != "call":
            return None
        call = self._call
        cut = buf.find(CALL_CLOSE)
        if not call and (m := _HERMES_HEAD.match(buf)) and m.end() < len(buf):  # the arguments have begun
            try:
                name = json.loads(f'"{m.group(1)}"')
            except json.JSONDecodeError:
                name = None
            if name is not None and self._wants_call(name):
                call.update(start=m.end(), sent=0)
                return self._start_call(name)
            call["skip"] = True  # decided at the end: dropped or kept as content
        if cut < 0 and not final:
            if call.get("start") is not None:  # stream the arguments, holding back what may close the call
                avail = buf[call["start"] :]
                avail = avail[: len(avail) - _partial_suffix(avail, CALL_CLOSE)].rstrip("} \t\r\n")
                if len(avail) > call["sent"]:
                    text, call["sent"] = avail[call["sent"] :], len(avail)
                    return self._arguments(text)
            return None
        body = buf if cut < 0 else buf[:cut]
        self._buf = "" if cut < 0 else buf[cut + len(CALL_CLOSE) :]
        self._state = "content" if cut >= 0 else "end"
        self._call = None
        if cut < 0 and self._cut:  # the token limit came before </tool_call>: not a call
            self.cut_call = True
            if call.get("start") is not None:
                self.tool_calls.pop()
            return []
        if call.get("start") is not None:
            raw = body[call["start"] :].rstrip()
            if raw.endswith("}"):
                raw = raw[:-1].rstrip()  # the object around name and arguments
            if not raw.startswith(body[call["start"] :][: call["sent"]]):
                raw = body[call["start"] :][: call["sent"]]
            try:
                json.loads(raw)
            except json.JSONDecodeError:
                log.info("tool call arguments are not complete JSON: %r", raw[:200])
            return self._arguments(raw[call["sent"] :])
        try:
            parsed = json.loads(body.strip())
            name, arguments = parsed["name"], parsed.get("arguments", {})
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            if not isinstance(name, str) or not isinstance(arguments, dict):
                raise ValueError("not a call")
        except (ValueError, KeyError, TypeError):
            return self._content(CALL_OPEN + body + (CALL_CLOSE if cut >= 0 else ""))
        if name in self.names and not self._wants_call(name):
            log.info("dropped a second tool call (%s): parallel tool calls are off", name)
            return []
        if not self._wants_call(name):
            return self._content(CALL_OPEN + body + (CALL_CLOSE if cut >= 0 else ""))
        return self._start_call(name) + self._arguments(_json_text(arguments))


# ---- forcing a call -----------------------------------------------------------------------------------------------
def _chosen_tools(tools: list[dict], tool_choice) -> tuple[list[dict], bool] | None:
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


def _parameters(fn: dict) -> dict:
    return fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}


def _hermes_grammar(chosen: list[dict], many: bool) -> str:
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, "arguments": _parameters(t["function"])},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    # Qwen2.5's own spacing (json.dumps defaults), as the calls in its prompt are written
    schema = dict(
        schema, **{"x-guidance": {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}}
    )
    # parallel calls: another call, or the end (a newline may close the last call, as the model writes one)
    start = 'start: call ("\\n" call)* "\\n"?' if many else "start: call"
    return f'{start}\ncall: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"\nbody: %json {json.dumps(schema)}\n'


_PY_STRING = r'/"(?:[^"\\\n]|\\.)*"/'
_PY_INT = r"/-?(?:0|[1-9][0-9]*)/"
_PY_NUMBER = r"/-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/"


def _lark_str(text: str) -> str:
    return json.dumps(text)  # a Lark string literal: JSON escapes are Lark's


def _py_value(schema, rules: list[str], rule: str, root: dict) -> str:
    """A Lark expression for a Python literal of `schema` (the arguments of ChatGLM3's tool_call(...))."""
    if not isinstance(schema, dict):
        schema = {}
    choices = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(choices, list) and choices:
        return "(" + " | ".join(_lark_str(_python_literal(v)) for v in choices) + ")"
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    simple = {
        "string": _PY_STRING,
        "integer": _PY_INT,
        "number": _PY_NUMBER,
        "boolean": '"True" | "False"',
        "null": '"None"',
    }
    if kinds and all(k in simple for k in kinds):
        return "(" + " | ".join(simple[k] for k in kinds) + ")"
    # arrays, objects and anything richer: the JSON text of it (a Python literal once true/false/null are read)
    sub = dict(schema, **{k: root[k] for k in ("$defs", "definitions") if k in root and k not in schema})
    sub["x-guidance"] = JSON_OPTIONS  # bounded whitespace, as in JSON mode
    rules.append(f"{rule}: %json {json.dumps(sub)}")
    _check_grammar_size(rules)
    return rule


MAX_GRAMMAR_CHARS = 1 << 21  # a forced ChatGLM3 call's grammar text; beyond, the tools are refused (400)
MAX_CALL_ARGUMENTS = 256  # keyword arguments a forced ChatGLM3 call's grammar spells out (llguidance overflows its
# stack on rule chains some thousands deep: a segfault, not an error)


def _check_grammar_size(rules: list[str]) -> None:
    """Stop building a grammar that outgrows MAX_GRAMMAR_CHARS (each rich argument copies the schema's $defs: a
    small body could otherwise ask for gigabytes before llguidance's own limits see it)."""
    if sum(map(len, rules)) > MAX_GRAMMAR_CHARS:
        raise ConfigError("the tools' schemas are too large to enforce as a ChatGLM3 call; simplify the parameters")


def _chatglm3_grammar(chosen: list[dict]) -> str:
    rules: list[str] = []
    calls = []
    for f, tool in enumerate(chosen):
        fn = tool["function"]
        params = _parameters(fn)
        props = [(k, v) for k, v in (params.get("properties") or {}).items() if str(k).isidentifier()]
        if len(props) > MAX_CALL_ARGUMENTS:
            raise ConfigError(
                f"{fn['name']} has {len(props)} parameters; a forced ChatGLM3 call takes at most {MAX_CALL_ARGUMENTS}"
            )
        required = set(params.get("required") or [])
        items = [f'"{k}=" {_py_value(v, rules, f"v{f}_{i}", params)}' for i, (k, v) in enumerate(props)]
        # keyword arguments in the schema's order, the required ones always, the others optional, comma-separated
        for i, item in enumerate(items):
            rules.append(f'p{f}_{i}: ", " {item}')
        after = [f"p{f}_{j}" if props[j][0] in required else f"p{f}_{j}?" for j in range(len(items))]
        # t{f}_{j}: the arguments from j on, as a chain of rules (linear in the number of arguments, not quadratic)
        for j in range(len(items) - 1, 0, -1):
            rules.append(f"t{f}_{j}: {after[j]}" + (f" t{f}_{j + 1}" if j + 1 < len(items) else ""))
        _check_grammar_size(rules)
        heads = []
        for i, item in enumerate(items):  # the first argument written: one of those up to the first required one
            heads.append(item + (f" t{f}_{i + 1}" if i + 1 < len(items) else ""))
            if props[i][0] in required:
                break
        args = ""
        if heads:
            rules.append(f"a{f}: " + " | ".join(heads))
            args = f"a{f}" if any(k in required for k, _ in props) else f"a{f}?"
        name = _lark_str(fn["name"])
        calls.append(f'c{f}: {name} "\\n" " "? "```python\\ntool_call(" {args} ")\\n```"')
    # the reply starts with the metadata line; SentencePiece may put a space before it and before the code
    start = 'start: " "? (' + " | ".join(f"c{f}" for f in range(len(chosen))) + ")"
    return "\n".join([start, *calls, *rules]) + "\n"


def tool_constraint(tools, tool_choice, tool_format: str | None, parallel: bool = True) -> Constraint | None:
    """The grammar a reply must follow for `tool_choice` "required" (one or, with `parallel`, more calls of any of
    the tools) or a named function (exactly one call of it); None for "auto"/"none"/None.
    ChatGLM3 makes one call per turn (its protocol answers each with an observation), so it is forced to one."""
    tools = validate_tools(tools)
    chosen = _chosen_tools(tools, tool_choice)
    if chosen is None:
        return None
    if tool_format is None:
        raise ConfigError(NO_TOOL_FORMAT)
    functions, named = chosen
    many = False
    if tool_format == "chatglm3":
        grammar = _chatglm3_grammar(functions)
    elif tool_format == "hermes":
        many = parallel and not named
        grammar = _hermes_grammar(functions, many=many)
    else:
        raise ConfigError(f"unknown tool format {tool_format!r}")
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(llguidance.grammar_from("lark", grammar))
    if is_error:
        raise ConfigError(f"the tools' schemas cannot be enforced: {(messages or ['invalid'])[0].splitlines()[0]}")
    # with parallel calls the grammar never has to end: end where it may once the model wants no further call
    return Constraint("lark", grammar, end_when_unwanted=many)
