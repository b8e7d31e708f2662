"""ChatGLM3's format, as THUDM's tokenizer and openai_api_demo write it.

The prompt is `[gMASK] sop`, then `<|role|>` + "{metadata}\\n" + content per message and `<|assistant|>`
(`ChatGLM3Tokenizer.build_prompt`). Tools go into a first system message ("Answer the following questions ... tools:"
+ json.dumps(functions, indent=4)); an assistant call is `<|assistant|>{name}\\n` + "```python\\ntool_call(key=value,
...)\\n```"; results are `<|observation|>` messages. Every reply's first line is its metadata: empty for a plain
answer (THUDM's `process_response` strips it too), else the name of the function it calls. ChatGLM3 makes one call per
turn (its protocol answers each with an observation), so a forced call is one call.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re

from catdog_glm.chat.constrained import JSON_OPTIONS
from catdog_glm.chat.formats.base import ChatFormat, lark_string, register
from catdog_glm.chat.tools import (
    Delta,
    ToolCallParser,
    call_arguments,
    function_parameters,
    has_tool_turns,
    json_text,
    partial_suffix,
    text_of,
)
from catdog_glm.errors import ConfigError

log = logging.getLogger(__name__)

CHATGLM3_TOOL_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
GLM_TURN = "<|assistant|>"  # ChatGLM3's replies show this special token where a new assistant turn starts


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
        role, content = m["role"], text_of(m.get("content"))
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


# ---- reading replies ---------------------------------------------------------------------------------------------
class ChatGLM3Parser(ToolCallParser):
    """A ChatGLM3 reply: its metadata line read (and stripped), a call's code block parsed without running it."""

    metadata_line = True
    keeps_trailing_space = False

    def _step(self, final: bool) -> list[Delta] | None:
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
                keep = 0 if final else partial_suffix(buf, GLM_TURN)
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
        return self._start_call(self._meta) + self._arguments(json_text(arguments))


# ---- forcing a call ---------------------------------------------------------------------------------------------
_PY_STRING = r'/"(?:[^"\\\n]|\\.)*"/'
_PY_INT = r"/-?(?:0|[1-9][0-9]*)/"
_PY_NUMBER = r"/-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/"


def _py_value(schema, rules: list[str], rule: str, root: dict) -> str:
    """A Lark expression for a Python literal of `schema` (the arguments of ChatGLM3's tool_call(...))."""
    if not isinstance(schema, dict):
        schema = {}
    choices = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(choices, list) and choices:
        return "(" + " | ".join(lark_string(_python_literal(v)) for v in choices) + ")"
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


def chatglm3_grammar(chosen: list[dict]) -> str:
    rules: list[str] = []
    calls = []
    for f, tool in enumerate(chosen):
        fn = tool["function"]
        params = function_parameters(fn)
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
        name = lark_string(fn["name"])
        calls.append(f'c{f}: {name} "\\n" " "? "```python\\ntool_call(" {args} ")\\n```"')
    # the reply starts with the metadata line; SentencePiece may put a space before it and before the code
    start = 'start: " "? (' + " | ".join(f"c{f}" for f in range(len(chosen))) + ")"
    return "\n".join([start, *calls, *rules]) + "\n"


# ---- the format --------------------------------------------------------------------------------------------------
@register
class ChatGLM3Format(ChatFormat):
    name = "chatglm3"
    calls_tools = True
    parser_class = ChatGLM3Parser

    @classmethod
    def matches(cls, tokenizer) -> bool:
        from catdog_glm.chat.chatglm3 import ChatGLM3Tokenizer

        return isinstance(tokenizer, ChatGLM3Tokenizer)

    def encode(self, messages: list[dict], tools: list | None = None, continue_final: bool = False) -> list[int]:
        if tools or has_tool_turns(messages):
            messages = chatglm3_messages(messages, tools)
        return self.tokenizer.build_prompt(messages, continue_final=continue_final)

    def decode(self, ids: list[int]) -> str:
        """Reply text; a new assistant turn inside a reply (before ChatGLM3's tool call) shows as `<|assistant|>`,
        so the parser can see where the call's metadata line starts. Other special tokens never show."""
        turn = self.tokenizer.special[GLM_TURN]
        if turn not in ids:
            return self.tokenizer.decode(ids)
        parts, start = [], 0
        for i, token in enumerate(ids):
            if token == turn:
                parts.append(self.tokenizer.decode(ids[start:i]))
                start = i + 1
        parts.append(self.tokenizer.decode(ids[start:]))
        return GLM_TURN.join(parts)

    def parser(self, tools: list | None = None, *, parallel: bool = True, continued: bool = False):
        # always: even a plain reply opens with the metadata line
        return ChatGLM3Parser(tools or [], parallel=parallel, continued=continued)

    def call_grammar(self, functions: list[dict], *, named: bool, parallel: bool) -> tuple[str, bool]:
        return chatglm3_grammar(functions), False
