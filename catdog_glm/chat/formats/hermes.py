"""The Hermes tool format: calls as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks (Qwen2.5 and
many others), for two kinds of template:

- templates that render `tools` themselves and speak <tool_call> (Qwen2.5): the tools and tool turns go to the
  template as they are;
- plain ChatML templates that know nothing of tools (the embedded SmolLM2): the tools are written into the system
  message, and calls and results into the turns, exactly as Qwen2.5's template writes them.
"""

from __future__ import annotations

import json
import logging
import re

from catdog_glm.chat.formats.base import register
from catdog_glm.chat.formats.template import TemplateFormat, template_text
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

log = logging.getLogger(__name__)

# ---- prompts -----------------------------------------------------------------------------------------------------
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
            out.append({"role": "system", "content": text_of(rest[0].get("content")) + "\n\n" + block})
            rest = rest[1:]
        else:
            out.append({"role": "system", "content": f"{default_system}\n\n{block}" if default_system else block})
    for i, m in enumerate(rest):
        role, content = m["role"], text_of(m.get("content"))
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
        item["content"] = text_of(m.get("content"))
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


# ---- reading replies ---------------------------------------------------------------------------------------------
_HERMES_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class HermesParser(ToolCallParser):
    """<tool_call> blocks read out of a reply; a call's arguments stream as they come."""

    def _step(self, final: bool) -> list[Delta] | None:
        buf = self._buf
        if self._state == "content":
            cut = buf.find(CALL_OPEN)
            if cut < 0:
                keep = 0 if final else partial_suffix(buf, CALL_OPEN)
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
                avail = avail[: len(avail) - partial_suffix(avail, CALL_CLOSE)].rstrip("} \t\r\n")
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
        return self._start_call(name) + self._arguments(json_text(arguments))


# ---- forcing a call ---------------------------------------------------------------------------------------------
def hermes_grammar(chosen: list[dict], many: bool) -> str:
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": t["function"]["name"]}, "arguments": function_parameters(t["function"])},
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


# ---- the format --------------------------------------------------------------------------------------------------
def _template_renders_tools(tokenizer) -> bool:
    """Whether the chat template writes `tools` into the prompt (rendered with a probe tool, whose name must show)."""
    probe = {"type": "function", "function": {"name": "catdog_probe_tool_3f9a", "parameters": {"type": "object"}}}
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tools=[probe], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # noqa: BLE001 - any template failure means: no tools this way
        return False
    return isinstance(text, str) and "catdog_probe_tool_3f9a" in text


def _default_system(tokenizer) -> str:
    """The system message a ChatML template writes when the conversation has none (SmolLM2: "You are a helpful AI
    assistant named SmolLM, ..."), so a tools block added to the system turn keeps it, as Qwen2.5's template does."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    except Exception:  # noqa: BLE001 - no default then
        return ""
    found = re.match(r"\s*<\|im_start\|>system\n(.*?)<\|im_end\|>", text if isinstance(text, str) else "", re.S)
    return found.group(1) if found else ""


def _renders_tool_calls(tokenizer) -> bool:
    """A template that renders `tools` itself and speaks <tool_call> (Qwen2.5)."""
    return "<tool_call>" in template_text(tokenizer) and _template_renders_tools(tokenizer)


@register
class HermesFormat(TemplateFormat):
    """The model's own template plus Hermes tool calls: `native` when the template renders tools itself, else the
    tools are written into ChatML turns in Qwen2.5's words (after `default_system`, the template's own system
    message, when the conversation has none)."""

    name = "hermes"
    calls_tools = True
    parser_class = HermesParser

    def __init__(self, tokenizer, *, native: bool, default_system: str = ""):
        super().__init__(tokenizer)
        self.native, self.default_system = native, default_system

    @classmethod
    def matches(cls, tokenizer) -> bool:
        return _renders_tool_calls(tokenizer) or "<|im_start|>" in template_text(tokenizer)

    @classmethod
    def for_tokenizer(cls, tokenizer) -> HermesFormat:
        if _renders_tool_calls(tokenizer):
            return cls(tokenizer, native=True)
        return cls(tokenizer, native=False, default_system=_default_system(tokenizer))

    def template_messages(self, messages: list[dict], tools: list | None) -> tuple[list[dict], dict]:
        if not tools and not has_tool_turns(messages):
            return super().template_messages(messages, tools)  # a plain chat: the messages as they came
        if self.native:
            return native_messages(messages), ({"tools": tools} if tools else {})
        return hermes_messages(messages, tools, self.default_system), {}

    def call_grammar(self, functions: list[dict], *, named: bool, parallel: bool) -> tuple[str, bool]:
        many = parallel and not named
        return hermes_grammar(functions, many=many), many
