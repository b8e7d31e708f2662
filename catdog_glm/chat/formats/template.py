"""The model's own Hugging Face chat template, with no tool format: messages rendered by `apply_chat_template`.
Tools and tool turns are refused (NO_TOOL_FORMAT); `HermesFormat` extends this for templates that can carry them."""

from __future__ import annotations

from catdog_glm.chat.formats.base import ChatFormat
from catdog_glm.chat.tools import NO_TOOL_FORMAT, has_tool_turns
from catdog_glm.errors import ConfigError


def template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else str(template or "")


class TemplateFormat(ChatFormat):
    name = "template"

    @classmethod
    def matches(cls, tokenizer) -> bool:
        return bool(getattr(tokenizer, "chat_template", None))

    def template_messages(self, messages: list[dict], tools: list | None) -> tuple[list[dict], dict]:
        """The messages as this template takes them, and extra apply_chat_template options."""
        if tools or has_tool_turns(messages):
            raise ConfigError(NO_TOOL_FORMAT)
        return [{**m, "content": "" if m.get("content") is None else m["content"]} for m in messages], {}

    def encode(self, messages: list[dict], tools: list | None = None, continue_final: bool = False) -> list[int]:
        from jinja2 import TemplateError

        messages, options = self.template_messages(messages, tools)
        options["add_generation_prompt"] = not continue_final
        if continue_final:
            if not messages or messages[-1]["role"] != "assistant":
                raise ConfigError("only a conversation that ends with an assistant message can be continued")
            options["continue_final_message"] = True
        try:
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **options)
        except (TemplateError, ValueError) as e:
            raise ConfigError(f"the model's chat template refused these messages: {str(e).splitlines()[0]}") from e
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

