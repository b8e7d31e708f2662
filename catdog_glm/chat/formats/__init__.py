"""One class per chat-model family (chat/formats/base.py says what a format does). Registered in the order they are
asked: ChatGLM3's tokenizer, then templates that carry Hermes tool calls, then any other chat template."""

from catdog_glm.chat.formats.base import ChatFormat, format_for, register, registered
from catdog_glm.chat.formats.chatglm3 import ChatGLM3Format
from catdog_glm.chat.formats.hermes import HermesFormat
from catdog_glm.chat.formats.template import TemplateFormat

register(TemplateFormat)  # last: the fallback for any chat template

__all__ = ["ChatFormat", "ChatGLM3Format", "HermesFormat", "TemplateFormat", "format_for", "register", "registered"]
