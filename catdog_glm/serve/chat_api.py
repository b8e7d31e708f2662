"""The chat HTTP API: the book's `POST /chat`, OpenAI's `/v1/chat/completions`, `/v1/completions` and `/v1/models`.

Thin routes over one ChatEngine kept in `app.state`: each reads like the spec (parse -> admit -> generate -> render).
The wire types and their validation live in `openai_protocol.py`; `ChatService` owns the request slots, the
sampling options and the wait for a generation (timeout, client disconnect); the envelope builders below are the one
place that writes responses and stream chunks. Every error has OpenAI's shape `{"error": {"message", "type", "param",
"code"}}` with the real HTTP status (FastAPI's own 404/405/422 handlers replaced), except on the book's `/chat`,
which keeps its simple `{"error": "..."}`. A stream that fails after it started ends with an error event and
`data: [DONE]`, never a cut connection. Generation runs on the engine's scheduler thread, never on the event loop.
Only imported by the serve commands, so it may import FastAPI at module level.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from catdog_glm.chat.constrained import Constraint
from catdog_glm.chat.engine import ChatEngine, EngineClosedError, Generation
from catdog_glm.chat.messages import normalize_messages
from catdog_glm.chat.sampling import DEFAULT_MAX_NEW_TOKENS, MAX_NEW_TOKENS_CAP, wrap_seed
from catdog_glm.chat.tools import ToolCallDelta, validate_tools
from catdog_glm.errors import CatdogError
from catdog_glm.serve.openai_protocol import (
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
    ParamError,
)

log = logging.getLogger(__name__)

BOOK_PATH = "/chat"
API_PREFIXES = ("/v1/", BOOK_PATH)
DOCS_ASSETS = "/docs-assets"


@dataclass
class ApiLimits:
    max_body_bytes: int = 1 << 20
    max_messages: int = 64
    max_tokens: int = MAX_NEW_TOKENS_CAP  # the cap on max_tokens / max_new_tokens a client may ask for
    request_timeout_s: float = 300.0
    max_waiting: int = 64  # generations running or queued; beyond: 503 with Retry-After
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self, path: str = "") -> JSONResponse:
        body = {"error": self.message} if path == BOOK_PATH else self.body()
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _error_kind(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )


def _validation_error(exc: RequestValidationError) -> ApiError:
    """Pydantic's first complaint as one line naming the parameter (OpenAI answers 400 for these, as vLLM does)."""
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request")
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if not _is_type_tag(p)]
    if loc and loc[0] == "body":
        loc = loc[1:]
    error = (first.get("ctx") or {}).get("error")
    kind = first.get("type", "")
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the body is not valid JSON ({reason})")
    if isinstance(error, ParamError):
        return ApiError(400, str(error), param=error.param)
    if not loc and kind in ("missing", "model_type", "model_attributes_type", "dict_type"):
        return ApiError(400, "the body must be a JSON object")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if kind == "missing":
        message = "is required"
    message = " ".join((f"'{where}': {message}" if where else message).split())  # one line, whatever the keys
    return ApiError(400, message, param=str(loc[0]) if loc else None)


def _is_type_tag(part) -> bool:
    """pydantic puts the union member it tried into `loc` (str, list[ContentPart], NamedToolChoice, ...)."""
    return isinstance(part, str) and (
        "[" in part or "(" in part or part[:1].isupper() or part in ("str", "int", "float", "bool", "dict", "list")
    )


class BodyGuard:
    """ASGI middleware for the API routes: a body over the limit -> 413 before any parsing, and the body is read as
    JSON whatever its Content-Type (the book's client sends none, `curl -d` sends a form type)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or scope.get("method") != "POST" or not path.startswith(API_PREFIXES):
            return await self.app(scope, receive, send)
        too_big = ApiError(413, f"request body over {self.max_bytes:,} bytes", code="request_too_large")
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type",)]
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await too_big.response(path)(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await too_big.response(path)(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the client's disconnect

        scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        await self.app(scope, replay, send)


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


class ClientGone(Exception):
    """The client closed the connection before its reply was ready."""


class ChatService:
    """Auth, request slots, sampling options and the wait for generations around one engine."""

    def __init__(self, engine: ChatEngine, limits: ApiLimits, model_id: str):
        self.engine, self.limits, self.model_id = engine, limits, model_id
        self.active = 0  # generations running or waiting for the engine (touched on the event loop only)

    def check_auth(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        key = self.limits.api_key
        if key and (credentials is None or credentials.credentials != key):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                kind="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},  # RFC 6750: the scheme a 401 asks for
            )

    def check_model(self, requested: str | None) -> None:
        if requested not in (None, "", self.model_id):
            raise ApiError(
                404,
                f"model {requested!r} is not served here; this server has {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    # ---- the one place that counts request slots -----------------------------------------------------------------
    def admit(self, n: int = 1) -> None:
        """Count `n` generations in, or refuse them with 503 + Retry-After when the wait queue is full."""
        if self.active + n > self.limits.max_waiting:
            raise ApiError(
                503,
                "the server is busy; retry shortly",
                kind="server_error",
                code="overloaded",
                headers={"Retry-After": "5"},
            )
        self.active += n

    def release(self, n: int = 1) -> None:
        self.active -= n

    # ---- options ------------------------------------------------------------------------------------------------
    def sampling(self, req, *, tokens_param: str = "max_tokens") -> dict:
        """Engine keyword arguments from a request; only what the client set (the engine keeps its defaults)."""
        limit = req.token_limit
        if limit is not None and limit > self.limits.max_tokens:
            raise ApiError(
                400, f"'{tokens_param}' must be <= {self.limits.max_tokens}, got {limit}", param=tokens_param
            )
        out: dict[str, Any] = {"max_new_tokens": limit or min(DEFAULT_MAX_NEW_TOKENS, self.limits.max_tokens)}
        for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if getattr(req, name, None) is not None:
                out[name] = getattr(req, name)
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(req, name, 0):
                out[name] = getattr(req, name)
        if getattr(req, "stop", None):
            out["stop"] = list(req.stop)
        if getattr(req, "logit_bias", None):
            out["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
        if req.seed is not None:
            out["seed"] = wrap_seed(req.seed)
        return out

    # ---- generation ---------------------------------------------------------------------------------------------
    async def start(self, begin) -> Generation:
        """Run `begin(loop)` (engine.stream / stream_text, told which loop reads the pieces) in a worker thread:
        encoding a long conversation or compiling a grammar must not stall every other stream on the event loop.
        A bad request becomes 400, a closed engine 503; a client gone meanwhile cancels what was started."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, begin, loop)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_cancel_started)
            raise
        except CatdogError as e:
            raise ApiError(400, str(e)) from None
        except EngineClosedError:
            raise _shutting_down() from None

    async def wait(self, gens: list[Generation], request: Request) -> None:
        """Wait until every generation is done, bounded by the timeout; a client that leaves cancels them all."""
        work = asyncio.ensure_future(asyncio.gather(*(_drain(g) for g in gens)))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait(
                {work, gone}, timeout=self.limits.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if work in done:
                work.result()
                return
            if gone in done:
                raise ClientGone
            raise _timed_out(self.limits.request_timeout_s)
        except EngineClosedError:
            raise _shutting_down() from None
        except CatdogError as e:  # a request the engine could only refuse once it ran
            raise ApiError(400, str(e)) from None
        except (ApiError, ClientGone):
            raise
        except Exception as e:
            log.exception("generation failed")
            raise ApiError(500, f"generation failed: {e}", kind="server_error") from None
        finally:
            gone.cancel()
            work.cancel()
            for g in gens:
                g.cancel()  # no-op for finished ones; a timeout or a disconnect stops the rest


def _timed_out(seconds: float) -> ApiError:
    return ApiError(504, f"generation took longer than {seconds:.0f} s", kind="server_error", code="timeout")


def _shutting_down() -> ApiError:
    return ApiError(
        503, "the server is shutting down", kind="server_error", code="shutting_down", headers={"Retry-After": "5"}
    )


async def _drain(gen: Generation) -> None:
    async for _ in gen.chunks():
        pass


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body was read already: the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- messages -----------------------------------------------------------------------------------------------------
def _engine_messages(req: ChatCompletionRequest, max_messages: int) -> tuple[list[dict], bool]:
    """OpenAI messages -> the engine's dicts, and whether the last (assistant) message is continued (prefill)."""
    if len(req.messages) > max_messages:
        raise ApiError(400, f"too many messages ({len(req.messages)}); the limit is {max_messages}", param="messages")
    out: list[dict] = []
    call_names: dict[str, str] = {}
    answerable: set[str] | None = None  # ids of the calls the latest assistant message made (None: no calls)
    for i, m in enumerate(req.messages):
        try:
            content = m.text()
        except CatdogError as e:
            raise ApiError(400, f"messages[{i}]: {e}", param="messages") from None
        item: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.role != "tool":
            answerable = None
        if m.role == "assistant" and m.tool_calls:
            item["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            call_names |= {c.id: c.function.name for c in m.tool_calls if c.id}
            answerable = {c.id for c in m.tool_calls if c.id}
        elif m.tool_calls is not None and m.role != "assistant":
            raise ApiError(400, f"messages[{i}]: only assistant messages carry tool_calls", param="messages")
        if m.role == "tool":
            _check_tool_answer(i, m.tool_call_id, answerable)
            item["tool_call_id"] = m.tool_call_id
            name = m.name or call_names.get(m.tool_call_id or "")
            if name:
                item["name"] = name
            item["content"] = content or ""
        elif m.name:
            item["name"] = m.name
        if content is None and not item.get("tool_calls"):
            if m.role != "assistant":
                raise ApiError(400, f"messages[{i}] ({m.role}) needs a 'content'", param="messages")
            item["content"] = ""
        out.append(item)
    last = out[-1]
    prefill = last["role"] == "assistant" and not last.get("tool_calls")
    if last["role"] not in ("tool", "observation") and not (last.get("content") or "").strip():
        raise ApiError(400, "the last message has no text", param="messages")
    return out, prefill


def _check_tool_answer(i: int, call_id: str | None, answerable: set[str] | None) -> None:
    """A `tool` message answers a call of the assistant message before it, named by its id (OpenAI answers 400)."""
    if not call_id:
        raise ApiError(
            400, f"messages[{i}]: a tool message needs 'tool_call_id', the id of the call it answers", param="messages"
        )
    if answerable is None:
        raise ApiError(
            400,
            f"messages[{i}]: a tool message must follow an assistant message with 'tool_calls' (the calls it answers)",
            param="messages",
        )
    if answerable and call_id not in answerable:
        raise ApiError(
            400,
            f"messages[{i}]: tool_call_id {call_id!r} names no call of the assistant message before it",
            param="messages",
        )


# ---- envelopes: the one place that writes responses and chunks ---------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finish(reason: str, tool_calls: bool = False) -> str:
    """OpenAI's finish_reason: a reply cut by the token limit is "length" even after complete calls (the call it was
    writing is left out); otherwise "tool_calls" when it made any."""
    if reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def _chat_logprobs(tokens, top: int) -> dict:
    """TokenLogprobs -> OpenAI's `choices[].logprobs` (content[]: token, logprob, bytes, top_logprobs[])."""
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.bytes),
                "top_logprobs": [{"token": s, "logprob": v, "bytes": list(b)} for s, v, b in t.top[:top]],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def _legacy_token(text: str, data) -> str:
    """A token as the legacy shape names it: its text, or, for part of a UTF-8 character (which decodes to "\ufffd",
    so several such tokens would share one top_logprobs key), "bytes:\\xNN..." as OpenAI writes it."""
    try:
        bytes(data).decode("utf-8")
        return text
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def _legacy_logprobs(tokens, top: int, offset: int) -> dict:
    """TokenLogprobs -> the legacy completions shape (tokens, token_logprobs, top_logprobs, text_offset)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    # offsets count the text's characters: the bytes of one character add one, once it is complete
    text_of = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    for t in tokens:
        token = _legacy_token(t.token, t.bytes)
        out["tokens"].append(token)
        out["token_logprobs"].append(t.logprob)
        best = {_legacy_token(s, b): v for s, v, b in t.top[:top]}
        best.setdefault(token, t.logprob)
        out["top_logprobs"].append(best)
        out["text_offset"].append(offset)
        offset += len(text_of(bytes(t.bytes)))
    return out


class Envelope:
    """Response and chunk bodies for one request: id, created and model written once."""

    def __init__(self, prefix: str, model: str):
        self.id, self.created, self.model = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), model

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chat(self, choices: list[dict], usage: dict) -> dict:
        return {**self.head("chat.completion"), "choices": choices, "usage": usage}

    def chat_chunk(self, index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        return sse({**self.head("chat.completion.chunk"), "choices": [choice]})

    def completion(self, choices: list[dict], usage: dict | None) -> dict:
        return {**self.head("text_completion"), "choices": choices, "usage": usage}

    def completion_chunk(self, index: int, text: str, finish: str | None = None, logprobs=None) -> str:
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        return sse({**self.head("text_completion"), "choices": [choice]})

    def usage_chunk(self, obj: str, usage: dict) -> str:
        return sse({**self.head(obj), "choices": [], "usage": usage})


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_error(error: BaseException | ApiError) -> str:
    if isinstance(error, ApiError):
        return sse(error.body())
    closing = isinstance(error, EngineClosedError)
    bad = isinstance(error, CatdogError)
    return sse(
        {
            "error": {
                "message": str(error) or "generation failed",
                "type": "invalid_request_error" if bad else "server_error",
                "param": None,
                "code": "shutting_down" if closing else None,
            }
        }
    )


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


async def _primed(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Start the event generator before the response does: a started async generator that is dropped unfinished
    (a client gone before the first byte) is closed by asyncio, so its `finally` frees the slots and cancels the
    generations; one never started would just vanish."""
    first = await events.__anext__()

    async def rest():
        try:
            yield first
            async for item in events:
                yield item
        finally:
            await events.aclose()

    return rest()


async def _merged(gens: list[Generation], timeout_s: float) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, Piece) from several generations as they come, then (index, None) when each ends.
    An error in any generation is raised here; so is a 504 once `timeout_s` has passed."""
    queue: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s

    async def pump(i: int, gen: Generation):
        try:
            async for piece in gen.chunks():
                await queue.put((i, piece, None))
            await queue.put((i, None, None))
        except Exception as e:  # handed to the reader, which ends the stream with an error event
            await queue.put((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            try:
                i, piece, error = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise _timed_out(timeout_s) from None
            if error is not None:
                raise error
            if piece is None:
                left -= 1
            yield i, piece
    finally:
        for t in tasks:
            t.cancel()


# ---- tools and response formats -----------------------------------------------------------------------------------
def _tools_and_constraint(req: ChatCompletionRequest, chat_format) -> tuple[list | None, Any]:
    """(tools for the prompt or None, Constraint or None) from tools / tool_choice / response_format."""
    tools = None
    constraint = None
    choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice
    if req.tools and choice != "none":
        if not chat_format.calls_tools:
            raise ApiError(
                400, "this model has no tool-calling format; send the request without 'tools'", param="tools"
            )
        try:
            tools = validate_tools([t.model_dump(exclude_none=True) for t in req.tools])
        except CatdogError as e:
            raise ApiError(400, str(e), param="tools") from None
        if isinstance(choice, dict) and choice["function"]["name"] not in {t["function"]["name"] for t in tools}:
            raise ApiError(
                400, f"tool_choice names {choice['function']['name']!r}, not among the tools", param="tool_choice"
            )
        try:
            constraint = chat_format.tool_constraint(tools, choice or "auto", parallel=req.parallel_tool_calls)
        except CatdogError as e:
            raise ApiError(400, str(e), param="tool_choice") from None
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if constraint is not None:
            raise ApiError(400, "response_format cannot be combined with a forced tool_choice", param="response_format")
        if fmt.type == "json_object":
            constraint = Constraint("json_object")
        else:
            constraint = Constraint("json_schema", fmt.json_schema.schema_)
    return tools, constraint


def create_api(
    engine: ChatEngine, limits: ApiLimits | None = None, *, model_id: str | None = None, vision=None
) -> FastAPI:
    """`vision`: a serve.vision_tool.VisionChat (serve-chat --classifier) that answers chat requests with photos."""
    limits = limits or ApiLimits()
    model_id = model_id or engine.model.name
    app = FastAPI(
        title="catdog serve-chat",
        summary="The book's POST /chat and an OpenAI-compatible chat API over one local model.",
        docs_url=None,
        redoc_url=None,  # ReDoc's script comes only from a CDN; Swagger UI is served from a local wheel below
        openapi_url="/openapi.json",
    )
    service = ChatService(engine, limits, model_id)
    app.state.engine, app.state.service = engine, service
    app.state.vision = vision
    app.add_middleware(BodyGuard, max_bytes=limits.max_body_bytes)
    if limits.cors_origins:  # Gradio's own CORS layer steps aside when the app it is mounted in has this one
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=limits.cors_origins, allow_methods=["*"], allow_headers=["*"])
    else:
        app.add_middleware(NoCors)
    _mount_docs(app)
    _openapi_without_422(app)
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it has one")

    def auth(credentials=Depends(bearer)) -> None:  # noqa: B008 - FastAPI's dependency idiom
        service.check_auth(credentials)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = "the body could not be read as JSON (nested too deeply, or a number too long?)"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        error = ApiError(exc.status_code, detail, kind=_error_kind(exc.status_code), headers=exc.headers)
        return error.response(request.url.path)

    @app.exception_handler(ClientGone)
    async def client_gone(_request: Request, _exc: ClientGone):
        return JSONResponse({"error": "client closed the request"}, status_code=499)

    errors = {
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        413: {"model": ErrorResponse},
        503: {"model": ErrorResponse},
    }

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": model_id,
            "active_requests": service.active,
            **engine.load(),
            "sampling_defaults": engine.sampling_defaults(),  # what a request that sets nothing samples with
        }

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(auth)], responses=errors)
    async def models():
        return {"object": "list", "data": [ModelCard(id=model_id).model_dump()]}

    @app.get("/v1/models/{model:path}", response_model=ModelCard, dependencies=[Depends(auth)], responses=errors)
    async def model_card(model: str):
        service.check_model(model or None)
        return ModelCard(id=model_id).model_dump()

    @app.post(
        BOOK_PATH, response_model=BookChatResponse, dependencies=[Depends(auth)], responses={400: {"model": BookError}}
    )
    async def book_chat(body: BookChatRequest, request: Request):
        """The book's contract: {"query", "history" (list or "")} -> {"response", "history"}."""
        try:
            messages = normalize_messages(body.history or [])
        except CatdogError as e:
            raise ApiError(400, str(e), param="history") from None
        messages.append({"role": "user", "content": body.query})
        if len(messages) > limits.max_messages:
            raise ApiError(400, f"too many messages ({len(messages)}); the limit is {limits.max_messages}")
        sampling = service.sampling(body, tokens_param="max_new_tokens")
        if body.max_length:
            sampling["max_length"] = body.max_length
        service.admit()
        try:
            gen = await service.start(lambda loop: engine.stream(messages, loop=loop, **sampling))
            await service.wait([gen], request)
        finally:
            service.release()
        reply = gen.reply
        if body.max_length and reply.prompt_tokens >= body.max_length:
            raise ApiError(
                400,
                f"max_length {body.max_length} leaves no room: the prompt alone is {reply.prompt_tokens} tokens",
                param="max_length",
            )
        text = reply.text  # the content as the model's format reads it (ChatGLM3: no metadata line)
        return JSONResponse(
            {
                "response": text,
                "history": [*messages, {"role": "assistant", "content": text}],
                "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "truncated_messages": reply.truncated_messages,
            },
            headers=_truncation_header(reply),
        )

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        dependencies=[Depends(auth)],
        responses={
            **errors,
            200: {
                "description": "a chat.completion, or with stream: an SSE stream of chunks",
                "content": {"text/event-stream": {"schema": ChatCompletionChunk.model_json_schema()}},
            },
        },
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if vision is not None and vision.handles(body):  # photos: the classifier tool's loop (vision_tool.py)
            return await vision.chat_completions(body, request, service)
        service.check_model(body.model)
        tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        messages, prefill = _engine_messages(body, limits.max_messages)
        sampling = service.sampling(body, tokens_param=tokens_param)
        tools, constraint = _tools_and_constraint(body, engine.model.format)
        if body.logprobs:
            sampling |= {"logprobs": True, "top_logprobs": body.top_logprobs or 0}
        extra: dict[str, Any] = {"parallel_tool_calls": body.parallel_tool_calls}
        if tools:
            extra["tools"] = tools
        if prefill:
            extra["continue_final"] = True
        if constraint is not None:
            extra["constraint"] = constraint
        n = body.n
        service.admit(n)
        try:
            gens = await _start_n(service, lambda s: engine.stream(messages, **extra, **s), sampling, n)
        except BaseException:
            service.release(n)
            raise
        env = Envelope("chatcmpl", model_id)
        if not body.stream:
            try:
                await service.wait(gens, request)
            finally:
                service.release(n)
            choices = []
            for i, gen in enumerate(gens):
                reply = gen.reply  # content and calls as the model's format reads them
                content = reply.text or (None if reply.tool_calls else "")
                message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
                if reply.tool_calls:
                    message["tool_calls"] = reply.tool_calls
                lp = _chat_logprobs(reply.logprobs or [], body.top_logprobs or 0) if body.logprobs else None
                finish = _finish(reply.finish_reason, bool(reply.tool_calls))
                choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": lp})
            replies = [g.reply for g in gens]
            usage = _usage(replies[0].prompt_tokens, sum(r.completion_tokens for r in replies))
            out = env.chat(choices, usage) | {"catdog": {"truncated_messages": replies[0].truncated_messages}}
            return JSONResponse(out, headers=_truncation_header(replies[0]))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            try:
                for i in range(n):
                    yield env.chat_chunk(i, {"role": "assistant", "content": ""})
                pending: list[list] = [[] for _ in range(n)]  # logprobs of tokens whose text a parser holds back
                async for i, piece in _merged(gens, limits.request_timeout_s):
                    if piece is None:
                        deltas = _render_deltas(gens[i].final_deltas())
                        reply = gens[i].reply
                        finish = _finish(reply.finish_reason, bool(reply.tool_calls))
                        lp_tokens = pending[i]
                        for delta in deltas:
                            yield env.chat_chunk(i, delta, logprobs=_maybe_lp(body, lp_tokens))
                            lp_tokens = []
                        yield env.chat_chunk(i, {}, finish, logprobs=_maybe_lp(body, lp_tokens) if lp_tokens else None)
                        continue
                    pending[i] += piece.logprobs or []
                    deltas = _render_deltas(gens[i].deltas(piece.text))
                    for delta in deltas:
                        yield env.chat_chunk(i, delta, logprobs=_maybe_lp(body, pending[i]))
                        pending[i] = []
                if include_usage:
                    replies = [g.reply for g in gens]
                    usage = _usage(replies[0].prompt_tokens, sum(r.completion_tokens for r in replies))
                    yield env.usage_chunk("chat.completion.chunk", usage)
            except Exception as e:  # an error event closes the stream instead of a cut connection
                if not isinstance(e, (EngineClosedError, CatdogError)):
                    log.exception("streamed generation failed")
                yield sse_error(e)
            finally:
                for g in gens:
                    g.cancel()  # a client that went away stops its generations
                service.release(n)
            yield DONE

        return StreamingResponse(await _primed(events()), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        dependencies=[Depends(auth)],
        responses=errors,
    )
    async def completions(body: CompletionRequest, request: Request):
        """Legacy text completion: no chat template; a list of prompts gives one choice each (times n)."""
        service.check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        sampling = service.sampling(body)
        if body.logprobs is not None:
            if body.echo:
                raise ApiError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
            sampling |= {"logprobs": True, "top_logprobs": body.logprobs}
        count = len(prompts) * body.n
        if count > limits.max_waiting:
            raise ApiError(400, f"{count} completions in one request; the limit is {limits.max_waiting}", param="n")
        service.admit(count)
        try:
            gens = []
            for p in prompts:
                gens += await _start_n(service, lambda s, p=p: engine.stream_text(p, **s), sampling, body.n)
        except BaseException:
            for g in gens:
                g.cancel()
            service.release(count)
            raise
        env = Envelope("cmpl", model_id)
        prefix = [prompts[i // body.n] if body.echo else "" for i in range(count)]
        if not body.stream:
            try:
                await service.wait(gens, request)
            finally:
                service.release(count)
            choices = []
            for i, gen in enumerate(gens):
                reply = gen.reply
                lp = None
                if body.logprobs is not None:
                    lp = _legacy_logprobs(reply.logprobs or [], body.logprobs, len(prefix[i]))
                finish = _finish(reply.finish_reason)
                choices.append({"index": i, "text": prefix[i] + reply.text, "finish_reason": finish, "logprobs": lp})
            replies = [g.reply for g in gens]
            usage = _usage(sum(r.prompt_tokens for r in replies[:: body.n]), sum(r.completion_tokens for r in replies))
            return JSONResponse(env.completion(choices, usage))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            try:
                offsets = [len(p) for p in prefix]
                for i, text in enumerate(prefix):
                    if text:
                        yield env.completion_chunk(i, text)
                async for i, piece in _merged(gens, limits.request_timeout_s):
                    if piece is None:
                        yield env.completion_chunk(i, "", _finish(gens[i].reply.finish_reason))
                        continue
                    lp = None
                    if body.logprobs is not None:
                        lp = _legacy_logprobs(piece.logprobs or [], body.logprobs, offsets[i])
                    offsets[i] += len(piece.text)
                    if piece.text or lp:
                        yield env.completion_chunk(i, piece.text, logprobs=lp)
                if include_usage:
                    replies = [g.reply for g in gens]
                    usage = _usage(
                        sum(r.prompt_tokens for r in replies[:: body.n]), sum(r.completion_tokens for r in replies)
                    )
                    yield env.usage_chunk("text_completion", usage)
            except Exception as e:
                if not isinstance(e, (EngineClosedError, CatdogError)):
                    log.exception("streamed completion failed")
                yield sse_error(e)
            finally:
                for g in gens:
                    g.cancel()
                service.release(count)
            yield DONE

        return StreamingResponse(await _primed(events()), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.api_route(
        "/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], include_in_schema=False
    )
    async def unknown_v1(rest: str, request: Request):
        """404/405 in OpenAI's shape here too: the chat page mounted at / would answer in its own shape, and its CORS
        layer would answer a preflight with allow-credentials even while CORS is off."""
        _not_found_or_not_allowed(app, request)

    @app.api_route(BOOK_PATH, methods=["GET", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], include_in_schema=False)
    async def book_other_methods(request: Request):
        raise ApiError(
            405, f"method {request.method} is not allowed on {BOOK_PATH}; POST a JSON body", headers={"Allow": "POST"}
        )

    return app


def _not_found_or_not_allowed(app: FastAPI, request: Request):
    from starlette.routing import Match

    allowed: set[str] = set()
    for route in app.router.routes:
        if getattr(route, "include_in_schema", False) and hasattr(route, "methods"):
            match, _ = route.matches({**request.scope, "method": "__none__"})
            if match != Match.NONE:
                allowed |= set(route.methods)
    if allowed:
        raise ApiError(
            405,
            f"method {request.method} is not allowed on {request.url.path}",
            headers={"Allow": ", ".join(sorted(allowed))},
        )
    raise ApiError(404, f"no route {request.method} {request.url.path}", kind="not_found_error")


def _cancel_started(future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().cancel()


async def _start_n(service: ChatService, begin, sampling: dict, n: int) -> list[Generation]:
    """n generations of one request; seeded ones use seed, seed+1, ... (so choices differ yet reproduce)."""
    gens: list[Generation] = []
    try:
        for i in range(n):
            s = dict(sampling)
            if "seed" in s:
                s["seed"] = wrap_seed(s["seed"] + i)
            gens.append(await service.start(lambda loop, s=s: begin(s | {"loop": loop})))
    except BaseException:
        for g in gens:
            g.cancel()
        raise
    return gens


def _render_deltas(deltas) -> list[dict]:
    """Parser deltas -> OpenAI stream deltas: content text, or a tool call (first: index, id, type, name)."""
    out = []
    for d in deltas:
        if isinstance(d, ToolCallDelta):
            call: dict[str, Any] = {"index": d.index, "function": {"arguments": d.arguments}}
            if d.id is not None:
                call = {
                    "index": d.index,
                    "id": d.id,
                    "type": "function",
                    "function": {"name": d.name, "arguments": d.arguments},
                }
            out.append({"tool_calls": [call]})
        elif d.text:
            out.append({"content": d.text})
    return out


def _maybe_lp(body: ChatCompletionRequest, tokens) -> dict | None:
    return _chat_logprobs(tokens, body.top_logprobs or 0) if body.logprobs else None


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI from the swagger-ui-bundle wheel (FastAPI's self-hosting recipe), so /docs works offline.
    The wheel's Swagger UI (4.15) reads OpenAPI 3.0 only, so the page loads the schema written down to 3.0;
    /openapi.json stays FastAPI's 3.1 for tools."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs/openapi-3.0.json", include_in_schema=False)
    async def openapi_30():
        return JSONResponse(_as_openapi_30(app.openapi()))

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url="/docs/openapi-3.0.json",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )


def _openapi_without_422(app: FastAPI) -> None:
    """Validation errors are answered 400 in OpenAI's shape (ErrorResponse): drop FastAPI's 422 from the schema."""
    build = app.openapi

    def openapi() -> dict:
        doc = build()
        for path in doc.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            doc.get("components", {}).get("schemas", {}).pop(name, None)
        return doc

    app.openapi = openapi


def _as_openapi_30(doc: dict) -> dict:
    """FastAPI's OpenAPI 3.1 -> 3.0 for Swagger UI 4: `anyOf [X, null]` -> X + nullable, `const` -> enum,
    `examples` -> example."""

    def down(node):
        if isinstance(node, list):
            return [down(x) for x in node]
        if not isinstance(node, dict):
            return node
        node = {k: down(v) for k, v in node.items()}
        if "anyOf" in node:
            kept = [x for x in node["anyOf"] if x != {"type": "null"}]
            if len(kept) < len(node["anyOf"]):
                node["nullable"] = True
                if len(kept) == 1:
                    del node["anyOf"]
                    inner = kept[0]
                    node = {**inner, **node} if "$ref" not in inner else {"allOf": [inner], **node}
                else:
                    node["anyOf"] = kept
        if "const" in node:
            node["enum"] = [node.pop("const")]
        if isinstance(node.get("examples"), list) and "schema" not in node:
            examples = node.pop("examples")
            if examples:
                node["example"] = examples[0]
        return node

    out = down({k: v for k, v in doc.items() if k != "openapi"})
    return {"openapi": "3.0.3", **out}


def _truncation_header(reply) -> dict:
    return {"X-Catdog-Truncated-Messages": str(reply.truncated_messages)} if reply.truncated_messages else {}
