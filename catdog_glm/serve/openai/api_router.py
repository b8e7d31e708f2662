"""The chat HTTP API's app and routes: the book's `POST /chat`, OpenAI's `/v1/chat/completions`, `/v1/completions`
and `/v1/models`, `/health`, and `/docs` offline.

Thin routes over one ChatEngine kept in `app.state` (with its `ChatService`): each reads like the spec, parse ->
admit -> generate -> render, the steps written in serving_chat.py, serving_completion.py and book.py. Only imported
by the serve commands, so it may import FastAPI at module level.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.security import HTTPBearer

from catdog_glm.chat.engine import ChatEngine
from catdog_glm.serve.openai import book, serving_chat, serving_completion
from catdog_glm.serve.openai.docs import mount_docs, openapi_without_422
from catdog_glm.serve.openai.errors import (
    BOOK_PATH,
    ApiError,
    BodyGuard,
    install_error_handlers,
    not_found_or_not_allowed,
)
from catdog_glm.serve.openai.protocol import (
    BookChatRequest,
    BookChatResponse,
    BookError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from catdog_glm.serve.openai.serving import ApiLimits, ChatService, json_response

bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it has one")


def _service(request: Request) -> ChatService:
    return request.app.state.service


def auth(request: Request, credentials=Depends(bearer)) -> None:  # noqa: B008 - FastAPI's dependency idiom
    _service(request).check_auth(credentials)


ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}
router = APIRouter()


@router.get("/health")
async def health(request: Request):
    service = _service(request)
    return {
        "status": "ok",
        "model": service.model_id,
        "active_requests": service.active,
        **service.engine.load(),
        "sampling_defaults": service.engine.sampling_defaults(),  # what a request that sets nothing samples with
    }


@router.get("/v1/models", response_model=ModelList, dependencies=[Depends(auth)], responses=ERRORS)
async def models(request: Request):
    return json_response(ModelList(data=[ModelCard(id=_service(request).model_id)]))


@router.get("/v1/models/{model:path}", response_model=ModelCard, dependencies=[Depends(auth)], responses=ERRORS)
async def model_card(model: str, request: Request):
    service = _service(request)
    service.check_model(model or None)
    return json_response(ModelCard(id=service.model_id))


@router.post(
    BOOK_PATH, response_model=BookChatResponse, dependencies=[Depends(auth)], responses={400: {"model": BookError}}
)
async def book_chat(body: BookChatRequest, request: Request):
    """The book's contract: {"query", "history" (list or "")} -> {"response", "history"}."""
    service = _service(request)
    plan = book.parse(service, body)
    service.admit()
    gen = await book.generate(service, plan, request)
    return book.render(plan, gen)


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    dependencies=[Depends(auth)],
    responses={
        **ERRORS,
        200: {
            "description": "a chat.completion, or with stream: an SSE stream of chunks",
            "content": {"text/event-stream": {"schema": ChatCompletionChunk.model_json_schema()}},
        },
    },
)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    service, vision = _service(request), request.app.state.vision
    if vision is not None and vision.handles(body):  # photos: the classifier tool's loop (vision_tool.py)
        return await vision.chat_completions(body, request, service)
    plan = serving_chat.parse(service, body)
    service.admit(plan.n)
    gens = await serving_chat.generate(service, plan)
    return await serving_chat.render(service, plan, gens, request)


@router.post("/v1/completions", response_model=CompletionResponse, dependencies=[Depends(auth)], responses=ERRORS)
async def completions(body: CompletionRequest, request: Request):
    """Legacy text completion: no chat template; a list of prompts gives one choice each (times n)."""
    service = _service(request)
    plan = serving_completion.parse(service, body)
    service.admit(plan.n)
    gens = await serving_completion.generate(service, plan)
    return await serving_completion.render(service, plan, gens, request)


@router.api_route(
    "/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], include_in_schema=False
)
async def unknown_v1(rest: str, request: Request):
    """404/405 in OpenAI's shape here too: the chat page mounted at / would answer in its own shape, and its CORS
    layer would answer a preflight with allow-credentials even while CORS is off."""
    raise not_found_or_not_allowed(router.routes, request)


@router.api_route(BOOK_PATH, methods=["GET", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], include_in_schema=False)
async def book_other_methods(request: Request):
    raise ApiError(
        405, f"method {request.method} is not allowed on {BOOK_PATH}; POST a JSON body", headers={"Allow": "POST"}
    )


def create_api(
    engine: ChatEngine, limits: ApiLimits | None = None, *, model_id: str | None = None, vision=None
) -> FastAPI:
    """The API over `engine`. `vision`: a serve.vision_tool.VisionChat (serve-chat --classifier) that answers chat
    requests with photos."""
    limits = limits or ApiLimits()
    app = FastAPI(
        title="catdog serve-chat",
        summary="The book's POST /chat and an OpenAI-compatible chat API over one local model.",
        docs_url=None,
        redoc_url=None,  # ReDoc's script comes only from a CDN; Swagger UI is served from a local wheel below
        openapi_url="/openapi.json",
    )
    app.state.engine = engine
    app.state.service = ChatService(engine, limits, model_id or engine.model.name)
    app.state.vision = vision
    app.add_middleware(BodyGuard, max_bytes=limits.max_body_bytes)
    if limits.cors_origins:  # Gradio's own CORS layer steps aside when the app it is mounted in has this one
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=limits.cors_origins, allow_methods=["*"], allow_headers=["*"])
    else:
        app.add_middleware(NoCors)
    install_error_handlers(app)
    mount_docs(app)
    openapi_without_422(app)
    app.include_router(router)
    return app


class NoCors:
    """ASGI middleware while CORS is off: no response grants a browser's cross-origin request anything. Gradio's
    page (mounted at /) answers preflights itself, with `allow-credentials: true` and localhost origins reflected;
    here every `Access-Control-*` header is dropped, so the page's routes keep CORS off as the API's do."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def without_cors(message):
            if message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if not k.lower().startswith(b"access-control-")
                ]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, without_cors)
