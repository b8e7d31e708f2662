"""What every chat format does, and the registry that picks one for a tokenizer.

A format is one model family's way of talking (after vLLM's `ToolParserManager.register_module`): it renders
messages, tools and a prefilled assistant turn into prompt ids, reads the reply's ids back as text, and gives the
parser that turns a streamed reply into content and tool calls plus the grammar that forces a call. `ChatModel`
holds one instance; the engine, the API and the pages ask it, never a family's name."""

from __future__ import annotations

import json
from collections.abc import Callable

from catdog_glm.chat.constrained import Constraint
from catdog_glm.chat.tools import NO_TOOL_FORMAT, ToolCallParser, chosen_tools, validate_tools
from catdog_glm.errors import ConfigError

_REGISTRY: list[type[ChatFormat]] = []
_FALLBACK: list[type[ChatFormat]] = []  # asked after every family: the model's plain chat template


def register(cls: type[ChatFormat]) -> type[ChatFormat]:
    """Class decorator: a family registered later is asked first (a plug-in before the built-in families)."""
    _REGISTRY.insert(0, cls)
    return cls


def register_fallback(cls: type[ChatFormat]) -> type[ChatFormat]:
    _FALLBACK.append(cls)
    return cls


def registered() -> list[type[ChatFormat]]:
    return [*_REGISTRY, *_FALLBACK]


def format_for(tokenizer) -> ChatFormat:
    """The format of the first family whose `matches(tokenizer)` holds, else the fallback's."""
    for cls in registered():
        if cls.matches(tokenizer):
            return cls.for_tokenizer(tokenizer)
    raise ConfigError(f"no chat format fits {type(tokenizer).__name__}")


class ChatFormat:
    """One family's prompt and reply format. Subclasses set `name` and override what differs."""

    name = "base"
    calls_tools = False  # whether tools can be written into the prompt and calls read back

    @classmethod
    def matches(cls, tokenizer) -> bool:
        raise NotImplementedError

    @classmethod
    def for_tokenizer(cls, tokenizer) -> ChatFormat:
        return cls(tokenizer)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

    # -- prompts ---------------------------------------------------------------------------------------------------
    def encode(self, messages: list[dict], tools: list | None = None, continue_final: bool = False) -> list[int]:
        """Prompt ids for OpenAI-style messages (already normalised by chat/messages.py), the tools the reply may
        call, and `continue_final`: the last message, the assistant's, is continued rather than answered."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """The text of reply ids as the parser reads it (special tokens never show, unless the format needs one)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- replies ---------------------------------------------------------------------------------------------------
    def parser(self, tools: list | None = None, *, parallel: bool = True, continued: bool = False):
        """The reader of one reply (content and tool-call deltas out of its text), or None where the text is the
        content as it comes. `continued`: the reply continues a prefilled assistant message."""
        if not tools or self.parser_class is None:  # no tools, or a format that cannot call them (refused earlier)
            return None
        return self.parser_class(tools, parallel=parallel, continued=continued)

    parser_class: Callable[..., ToolCallParser] | None = None

    def call_grammar(self, functions: list[dict], *, named: bool, parallel: bool) -> tuple[str, bool]:
        """(the Lark grammar of a reply that calls one of `functions`, whether it may make several calls)."""
        raise ConfigError(NO_TOOL_FORMAT)

    def tool_constraint(self, tools, tool_choice, *, parallel: bool = True) -> Constraint | None:
        """The grammar a reply must follow for `tool_choice` "required" (one call, or with `parallel` several, of
        any of the tools) or a named function (exactly one call of it); None for "auto"/"none"/None."""
        tools = validate_tools(tools)
        chosen = chosen_tools(tools, tool_choice)
        if chosen is None:
            return None
        if not self.calls_tools:
            raise ConfigError(NO_TOOL_FORMAT)
        functions, named = chosen
        grammar, many = self.call_grammar(functions, named=named, parallel=parallel)
        import llguidance

        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            llguidance.grammar_from("lark", grammar)
        )
        if is_error:
            raise ConfigError(f"the tools' schemas cannot be enforced: {(messages or ['invalid'])[0].splitlines()[0]}")
        # with parallel calls the grammar never has to end: end where it may once the model wants no further call
        return Constraint("lark", grammar, end_when_unwanted=many)


def lark_string(text: str) -> str:
    return json.dumps(text)  # a Lark string literal: JSON escapes are Lark's
