"""The Gradio chat page: streamed replies, Stop, Retry, Clear History, system prompt and ChatGLM3's sliders.

Front end only: it submits to the same ChatEngine (and so the same batching scheduler) as the API, loaded once per
process; Gradio runs `respond` in a worker thread, which reads the generation's pieces as they come.
"""

# No `from __future__ import annotations` here: Gradio finds `request: gr.Request` by its real annotation.

from catdog_glm.chat.engine import ChatEngine, Generation
from catdog_glm.chat.messages import content_text
from catdog_glm.chat.sampling import DEFAULT_MAX_LENGTH, DEFAULT_MAX_NEW_TOKENS

EXAMPLES = ["What is the capital of France?", "Write a haiku about a cat.", "Give me three tips for learning Python."]


def build_chat_page(engine: ChatEngine, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, vision=None):
    """`vision` (serve-chat --classifier): a photo may go with the message; see vision_page.py."""
    import gradio as gr

    info = engine.info()
    defaults = info["sampling_defaults"]  # the model's own, where it has them (chat/sampling.py)
    running: dict[str, Generation] = {}  # session -> its generation, so Stop can cancel it for real

    def respond(
        message: str,
        history: list,
        system: str,
        max_length: float,
        top_p: float,
        temperature: float,
        request: gr.Request,
    ):
        message = (message or "").strip()
        if not message:
            yield "", history
            return
        history = [*history, {"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield "", history
        messages = ([{"role": "system", "content": system.strip()}] if system and system.strip() else []) + [
            {"role": m["role"], "content": _text(m["content"])} for m in history[:-1]
        ]
        gen = engine.stream(
            messages,
            max_new_tokens=max_new_tokens,
            max_length=int(max_length),
            top_p=max(float(top_p), 0.01),
            temperature=float(temperature),
        )
        running[request.session_hash] = gen
        try:
            for piece in gen:
                history[-1]["content"] += piece
                yield "", history
        finally:
            gen.cancel()
            running.pop(request.session_hash, None)

    def stop(request: gr.Request) -> None:
        gen = running.pop(request.session_hash, None)
        if gen is not None:
            gen.cancel()

    def retry(history: list):
        """Drop the last answer and ask its question again."""
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        if not history:
            return "", history
        return _text(history[-1]["content"]), history[:-1]

    if vision is not None:  # photos with the message: the classifier tool's loop (vision_page.py)
        from catdog_glm.serve import vision_page

        respond = vision_page.make_respond(engine, vision, max_new_tokens=max_new_tokens)  # noqa: F811

    with gr.Blocks(title=f"catdog chat · {info['name']}", analytics_enabled=False) as page:
        gr.Markdown(
            f"# catdog chat\n**Model** {info['name']} ({info['kind']}) · **quantization** "
            f"{info['quantization']} · **{info['dtype']}** on {info['device']}",
            elem_id="model-info",
        )
        chatbot = gr.Chatbot(label="Chat", height=460, elem_id="chatbot")
        with gr.Row():
            query = (
                gr.Textbox(show_label=False, placeholder="Type a message and press Enter", scale=8, elem_id="query")
                if vision is None
                else vision_page.textbox()
            )
            submit = gr.Button("Submit", variant="primary", scale=1)
            stop_button = gr.Button("Stop", variant="stop", scale=1)
        with gr.Row():
            retry_button = gr.Button("Retry")
            clear = gr.Button("Clear History")
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox(label="System prompt", lines=2)
            max_length = gr.Slider(
                16,
                info["context_window"],
                value=min(DEFAULT_MAX_LENGTH, info["context_window"]),
                step=1,
                label="Maximum length",
            )
            top_p = gr.Slider(0.01, 1, value=defaults["top_p"], step=0.01, label="Top P")
            temperature = gr.Slider(0, 1.5, value=defaults["temperature"], step=0.01, label="Temperature")
        gr.Examples(EXAMPLES, inputs=query, label="Examples")
        inputs = [query, chatbot, system, max_length, top_p, temperature]
        events = [
            submit.click(respond, inputs, [query, chatbot], api_name="chat", concurrency_limit=None),
            query.submit(respond, inputs, [query, chatbot], api_visibility="private", concurrency_limit=None),
        ]
        stop_button.click(stop, None, None, cancels=events, queue=False, api_visibility="private")
        retry_button.click(retry, chatbot, [query, chatbot], api_visibility="private", queue=False).then(
            respond, inputs, [query, chatbot], api_visibility="private"
        )
        clear.click(lambda: ("", []), None, [query, chatbot], queue=False, api_visibility="private")
    return page


def _text(content) -> str:
    """A chatbot message's text (its content may be a string, parts or a file: files are left out)."""
    return content_text(content, "a chat message", strict=False)
