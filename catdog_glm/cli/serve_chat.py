"""`catdog serve-chat`: options -> one loaded model -> the Gradio page and the HTTP API on one port."""

from __future__ import annotations

from typing import Annotated

import typer

from catdog_glm.chat.sampling import MAX_NEW_TOKENS_CAP
from catdog_glm.cli._common import console, user_errors
from catdog_glm.cli.chat import (
    DeviceOption,
    LegacyDtypeOption,
    ModelOption,
    NoCacheOption,
    PrecisionOption,
    QuantizeOption,
    TrustRemoteCodeOption,
    chat_precision,
)


@user_errors
def serve_chat(
    model: ModelOption = None,
    quantize: QuantizeOption = None,
    precision: PrecisionOption = "auto",
    dtype: LegacyDtypeOption = None,
    device: DeviceOption = "auto",
    host: Annotated[
        str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to your network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port for the page and the API (the book's API used 7866).")] = 7860,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="CATDOG_API_KEY",
            help="Require 'Authorization: Bearer KEY' on the API and the password KEY (user catdog) on the page.",
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(help="Allow this browser origin to call the API (repeatable; CORS is off by default)."),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="The most new tokens a request may ask for.")] = MAX_NEW_TOKENS_CAP,
    max_messages: Annotated[int, typer.Option(help="The most messages (history included) in one request.")] = 64,
    max_body: Annotated[
        int | None,
        typer.Option(help="The largest request body in bytes (default: 1 MiB; 32 MiB with --classifier, for photos)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds a request may generate before it is stopped.")] = 300.0,
    queue_size: Annotated[int, typer.Option(help="Requests generating or waiting; beyond it: 503 + Retry-After.")] = 64,
    max_batch_size: Annotated[
        int | None,
        typer.Option(help="Requests generated together in one batch (default: measured per device, 32 on a CPU)."),
    ] = None,
    max_batch_tokens: Annotated[
        int | None,
        typer.Option(
            help="KV-cache tokens (prompt + max new tokens) all batched requests may reserve together "
            "(default: from the memory free after loading)."
        ),
    ] = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    no_cache: NoCacheOption = False,
    ui: Annotated[
        str, typer.Option(help="Web page: gradio (page + API on one port) or streamlit (the book's web_demo2 page).")
    ] = "gradio",
    api_url: Annotated[
        str | None,
        typer.Option(
            help="With --ui streamlit: be a client of a running catdog "
            "serve-chat at this URL instead of loading a model."
        ),
    ] = None,
    classifier: Annotated[
        str | None,
        typer.Option(
            help="A classifier checkpoint (or exported .onnx) from `catdog train`: the chat model gets a built-in "
            "classify_image tool and accepts photos on the page and in the API (image_url data: URLs)."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log more detail.")] = False,
) -> None:
    """Serve a chat model: a Gradio page at / plus POST /chat (the book's API) and OpenAI's /v1 API (chat, tools).

    Example: catdog serve-chat --port 7866   (then: curl http://127.0.0.1:7866/v1/models)
    """
    from catdog_glm.cli.chat import load_engine
    from catdog_glm.errors import ConfigError
    from catdog_glm.serve.chat_server import serve_chat as run_server
    from catdog_glm.serve.openai.serving import ApiLimits

    dtype = chat_precision(precision, dtype)
    if max_body is None:
        max_body = 32 << 20 if classifier else 1 << 20
    batch_limits = [v for v in (max_batch_size, max_batch_tokens) if v is not None]
    if min(max_tokens, max_messages, max_body, queue_size, *batch_limits) < 1 or timeout <= 0:
        raise ConfigError(
            "--max-tokens, --max-messages, --max-body, --queue-size, --max-batch-size, --max-batch-tokens and "
            "--timeout must be positive"
        )
    if ui not in ("gradio", "streamlit"):
        raise ConfigError(f"--ui must be gradio or streamlit, got {ui!r}")
    if api_url and ui != "streamlit":
        raise ConfigError("--api-url makes the Streamlit page a client; use it with --ui streamlit")
    if classifier and ui != "gradio":
        raise ConfigError("--classifier works with the Gradio page and the API; leave out --ui streamlit")
    if ui == "streamlit":
        from catdog_glm.serve.streamlit_runner import run_streamlit

        raise typer.Exit(
            run_streamlit(
                host=host,
                port=port,
                model=model,
                quantize=quantize,
                dtype=dtype,
                device=device,
                api_url=api_url,
                api_key=api_key,
                trust_remote_code=trust_remote_code,
                max_batch_size=max_batch_size,
                max_batch_tokens=max_batch_tokens,
                on_ready=console.print,
            )
        )
    from catdog_glm.device import steady_memory

    steady_memory()  # a server runs for days: before the model's first matmul
    tool = None
    if classifier:  # before the chat model: a wrong path fails in a second, not after minutes of loading
        from catdog_glm.serve.vision_tool import ClassifierTool, attach_classifier

        tool = ClassifierTool.load(classifier, device=device)
    engine = load_engine(
        model,
        quantize,
        dtype,
        device,
        trust_remote_code,
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        use_cache=not no_cache,
    )
    vision = attach_classifier(engine, tool) if tool else None
    limits = ApiLimits(
        max_body_bytes=max_body,
        max_messages=max_messages,
        max_tokens=max_tokens,
        request_timeout_s=timeout,
        max_waiting=queue_size,
        api_key=api_key,
        cors_origins=list(cors_origin or []),
    )

    def ready(url: str) -> None:
        console.print(
            f"Chat page: [bold]{url}[/]\nAPI: POST {url}chat · POST {url}v1/chat/completions · "
            f"POST {url}v1/completions · GET {url}v1/models · docs {url}docs"
            + ("  (API key required)" if api_key else "")
            + (f"\nPhotos: classify_image runs {classifier}" if classifier else ""),
            highlight=False,
        )
        console.print("Press Ctrl+C to stop.")

    run_server(engine, limits, host=host, port=port, page_password=api_key, on_ready=ready, vision=vision)
