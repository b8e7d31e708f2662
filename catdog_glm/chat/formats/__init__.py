"""One class per chat-model family (chat/formats/base.py says what a format does), registered with `register`:
ChatGLM3's tokenizer, templates that carry Hermes tool calls; any other chat template falls back to its own
rendering with no tool format."""

from catdog_glm.chat.formats.base import ChatFormat, format_for, register, register_fallback, registered
from catdog_glm.chat.formats.chatglm3 import ChatGLM3Format
from catdog_glm.chat.formats.hermes import HermesFormat
from catdog_glm.chat.formats.template import TemplateFormat

register_fallback(TemplateFormat)

__all__ = [
    "ChatFormat",
    "ChatGLM3Format",
    "HermesFormat",
    "TemplateFormat",
    "format_for",
    "register",
    "register_fallback",
    "registered",
]
