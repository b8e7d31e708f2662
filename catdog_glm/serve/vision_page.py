"""The chat page with photos (`serve-chat --classifier`): a multimodal textbox, each classify_image call shown as a
collapsible step (a Gradio ChatMessage with metadata) before the answer. The loop is vision_tool.converse, as in
the API; this module only turns the page's history into messages and the loop's events into chat bubbles.
"""

# No `from __future__ import annotations` here: Gradio finds `request: gr.Request` by its real annotation.

import json
from pathlib import Path

from catdog_glm.errors import CatdogError
from catdog_glm.serve.vision_tool import Attachment, ToolStep, VisionChat, converse, placeholder, read_file

PLACEHOLDER = "Type a message, or drop a photo and ask about it"


def _parts(content) -> tuple[str, list[str]]:
    """A chatbot message's text and file paths, whatever shape Gradio gives it back in."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    if isinstance(content, dict):
        if content.get("type") == "text":
            return str(content.get("text", "")), []
        file = content.get("file") if isinstance(content.get("file"), dict) else content
        path = file.get("path")
        return ("", [path]) if path else (str(content.get("text", "")), [])
    if isinstance(content, (list, tuple)):
        texts, files = [], []
        for part in content:
            t, f = _parts(part)
            texts.append(t)
            files += f
        return "".join(texts), files
    path = getattr(content, "path", None) or getattr(getattr(content, "value", None), "path", None)
    return ("", [path]) if path else (str(content), [])


def conversation(history: list, system: str, max_bytes: int) -> tuple[list[dict], dict[str, Attachment]]:
    """Chatbot history -> engine messages (photos as placeholders, tool-step bubbles left out) and the photos."""
    messages: list[dict] = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    images: dict[str, Attachment] = {}
    for m in history:
        if m.get("metadata") and (m["metadata"] or {}).get("title"):
            continue  # a tool step shown on the page; its verdict is in the answer after it
        text, files = _parts(m.get("content"))
        for path in files:
            key = f"image_{len(images) + 1}"
            images[key] = read_file(path, key, max_bytes)
            text = (text + "\n" if text else "") + placeholder(key)
        if messages and messages[-1]["role"] == m["role"] == "user":  # a photo and its question: one turn
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": m["role"], "content": text})
    return messages, images


def step_message(step: ToolStep) -> dict:
    """A collapsible bubble: the call and its verdict in the title, the full result inside."""
    args = ", ".join(f"{k}={v}" for k, v in step.arguments.items())
    return {
        "role": "assistant",
        "content": "```json\n" + json.dumps(step.result, indent=2, ensure_ascii=False) + "\n```",
        "metadata": {"title": f"{step.name}({args}) → {step.summary()}", "status": "done"},
    }


def make_respond(engine, vision: VisionChat, *, max_new_tokens: int):
    """The page's submit handler with photos (same inputs and outputs as chat_page's own)."""
    import gradio as gr

    tool = vision.tool

    async def respond(
        message,
        history: list,
        system: str,
        max_length: float,
        top_p: float,
        temperature: float,
        request: gr.Request,
    ):
        if isinstance(message, dict):
            text, files = (message.get("text") or "").strip(), list(message.get("files") or [])
        else:
            text, files = (message or "").strip(), []
        if not text and not files:
            yield None, history
            return
        history = list(history)
        for f in files:
            path = f.get("path") if isinstance(f, dict) else getattr(f, "path", f)
            history.append({"role": "user", "content": {"path": str(path), "alt_text": Path(str(path)).name}})
        if text:
            history.append({"role": "user", "content": text})
        answer = {"role": "assistant", "content": ""}
        yield None, [*history, answer]
        messages, images = conversation(history, system, tool.max_image_bytes)
        sampling = {
            "max_new_tokens": max_new_tokens,
            "max_length": int(max_length),
            "top_p": max(float(top_p), 0.01),
            "temperature": float(temperature),
        }
        try:
            async for item in converse(engine, messages, tool, images, sampling=sampling):
                if isinstance(item, ToolStep):
                    history.append(step_message(item))
                else:
                    answer["content"] += item
                yield None, [*history, answer]
        except CatdogError as e:  # a conversation too long, a tool the model cannot use: said in the chat
            answer["content"] += f"\n⚠️ {e}"
            yield None, [*history, answer]

    return respond


def textbox():
    """The page's message box, taking one photo beside the text."""
    import gradio as gr

    return gr.MultimodalTextbox(
        show_label=False,
        placeholder=PLACEHOLDER,
        file_types=["image"],
        file_count="single",
        submit_btn=False,
        scale=8,
        elem_id="query",
    )
