"""`catdog serve-chat`: one process, one loaded model, the page at `/` and the API beside it."""

from __future__ import annotations

from catdog_glm.chat.engine import ChatEngine
from catdog_glm.errors import ConfigError
from catdog_glm.serve.chat_page import build_chat_page
from catdog_glm.serve.net import port_is_free
from catdog_glm.serve.openai.api_router import ApiLimits, create_api

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
GRACE_S = 5


def create_chat_app(engine: ChatEngine, limits: ApiLimits, *, page_password: str | None = None, vision=None):
    """`vision`: a vision_tool.VisionChat (--classifier): photos in the API and on the page."""
    import gradio as gr

    app = create_api(engine, limits, vision=vision)
    page = build_chat_page(engine, max_new_tokens=limits.max_tokens, vision=vision)
    page.queue(max_size=limits.max_waiting, default_concurrency_limit=None)
    auth = ("catdog", page_password) if page_password else None
    return gr.mount_gradio_app(app, page, path="/", auth=auth, show_error=True, ssr_mode=False)


def serve_chat(
    engine: ChatEngine,
    limits: ApiLimits,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    page_password: str | None = None,
    on_ready=None,
    vision=None,
) -> None:
    """Serve until SIGTERM/SIGINT. On either signal every queued and running request ends at once (503, or an
    error event closing its stream), so the server exits and frees the port without waiting for long replies."""
    import os

    import uvicorn

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not port_is_free(host, port):
        raise ConfigError(f"port {port} on {host} is already in use; pass another --port")
    app = create_chat_app(engine, limits, page_password=page_password, vision=vision)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.close(wait=False)
            super().handle_exit(sig, frame)

    # connections still open GRACE_S after the signal (a browser's event stream) are closed
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE_S)
    if on_ready:
        on_ready(f"http://{host}:{port}/")
    try:
        Server(config).run()
    finally:
        engine.close()
