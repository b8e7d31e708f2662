"""The chat HTTP API: the book's `POST /chat` contract and an OpenAI-compatible `/v1/chat/completions`.

Thin routes over one ChatEngine kept in `app.state`; bodies are parsed here (the book's client posts JSON with no
Content-Type), validated, and every error has OpenAI's shape `{"error": {"message", "type", "param", "code"}}`
with the real HTTP status. Generation runs on the engine's scheduler thread, never on the event loop; its pieces
arrive here through one `call_soon_threadsafe` each.
Only imported by the serve commands, so it may import FastAPI at module level.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from catdog_glm.chat.engine import ChatEngine, EngineClosedError, Generation, normalize_messages
from catdog_glm.errors import CatdogError

log = logging.getLogger(__name__)


@dataclass
class ApiLimits:
    max_body_bytes: int = 1 << 20
    max_messages: int = 64
    max_tokens: int = 2048  # the cap on max_tokens / max_new_tokens a client may ask for
    request_timeout_s: float = 300.0
    max_waiting: int = 64  # requests generating or queued; beyond: 503 with Retry-After
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

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _number(body: dict, key: str, kind, default, *, low=None, high=None, low_open=False):
    value = body.get(key, default)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (kind is int and not float(value).is_integer())
    ):
        raise ApiError(400, f"'{key}' must be a {'an integer' if kind is int else 'number'}", param=key)
    value = kind(value)
    if low is not None and (value <= low if low_open else value < low):
        raise ApiError(400, f"'{key}' must be {'>' if low_open else '>='} {low}, got {value}", param=key)
    if high is not None and value > high:
        raise ApiError(400, f"'{key}' must be <= {high}, got {value}", param=key)
    return value


class ChatService:
    """Validation, limits and the bounded queue around one engine; the routes below only translate."""

    def __init__(self, engine: ChatEngine, limits: ApiLimits, model_id: str):
        self.engine, self.limits, self.model_id = engine, limits, model_id
        self.active = 0  # requests generating or waiting for the engine (touched on the event loop only)

    def check_auth(self, request: Request) -> None:
        key = self.limits.api_key
        if key and request.headers.get("authorization", "") != f"Bearer {key}":
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer KEY'",
                kind="authentication_error",
                code="invalid_api_key",
            )

    async def read_json(self, request: Request) -> dict:
        declared = int(request.headers.get("content-length") or 0)
        if declared > self.limits.max_body_bytes:
            raise ApiError(413, f"request body over {self.limits.max_body_bytes:,} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.limits.max_body_bytes:
                raise ApiError(413, f"request body over {self.limits.max_body_bytes:,} bytes")
        try:
            data = json.loads(body or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    def sampling(self, body: dict, *, tokens_key: str) -> dict:
        temperature = _number(body, "temperature", float, None, low=0, high=2)
        top_p = _number(body, "top_p", float, None, low=0, high=1, low_open=True)
        max_new = _number(body, tokens_key, int, None, low=1, high=self.limits.max_tokens)
        out = {"max_new_tokens": max_new or min(512, self.limits.max_tokens)}
        if temperature is not None:
            out["temperature"] = temperature
        if top_p is not None:
            out["top_p"] = top_p
        return out

    def check_messages(self, messages: list[dict]) -> None:
        if len(messages) > self.limits.max_messages:
            raise ApiError(
                400, f"too many messages ({len(messages)}); the limit is {self.limits.max_messages}", param="messages"
            )
        if not messages or not messages[-1]["content"].strip():
            raise ApiError(400, "the last message is empty", param="messages")

    def admit(self) -> None:
        """Count a request in, or refuse it with 503 + Retry-After when the wait queue is full."""
        if self.active >= self.limits.max_waiting:
            raise ApiError(
                503,
                "the server is busy; retry shortly",
                kind="server_error",
                code="overloaded",
                headers={"Retry-After": "5"},
            )
        self.active += 1

    def start(self, messages, sampling) -> Generation:
        try:
            return self.engine.stream(messages, **sampling)
        except CatdogError as e:
            raise ApiError(400, str(e)) from None
        except EngineClosedError:
            raise _shutting_down() from None

    async def complete(self, messages, sampling) -> Generation:
        """Run a whole generation, bounded by the request timeout."""
        self.admit()
        try:
            gen = self.start(messages, sampling)
            try:
                await asyncio.wait_for(_drain(gen), timeout=self.limits.request_timeout_s)
            except TimeoutError:
                gen.cancel()
                raise ApiError(
                    504,
                    f"generation took longer than {self.limits.request_timeout_s:.0f} s",
                    kind="server_error",
                    code="timeout",
                ) from None
            except EngineClosedError:
                raise _shutting_down() from None
            except Exception as e:
                log.exception("generation failed")
                raise ApiError(500, f"generation failed: {e}", kind="server_error") from None
            return gen
        finally:
            self.active -= 1


def _shutting_down() -> ApiError:
    return ApiError(
        503, "the server is shutting down", kind="server_error", code="shutting_down", headers={"Retry-After": "5"}
    )


async def _drain(gen: Generation) -> None:
    async for _ in gen.pieces():
        pass


def _messages_from(body: dict) -> list[dict]:
    raw = body.get("messages")
    if not isinstance(raw, list):
        raise ApiError(400, "'messages' must be a list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] needs a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param="messages")
        if m["role"] not in ("system", "user", "assistant", "observation", "developer"):
            raise ApiError(400, f"messages[{i}] has unknown role {m['role']!r}", param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def create_api(engine: ChatEngine, limits: ApiLimits | None = None, *, model_id: str | None = None) -> FastAPI:
    limits = limits or ApiLimits()
    model_id = model_id or engine.model.name
    app = FastAPI(title="catdog serve-chat", docs_url="/docs", openapi_url="/openapi.json")
    service = ChatService(engine, limits, model_id)
    app.state.engine, app.state.service = engine, service
    if limits.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=limits.cors_origins, allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError):
        return exc.response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "active_requests": service.active, **engine.load()}

    @app.get("/v1/models")
    async def models(request: Request):
        service.check_auth(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "catdog"}]}

    @app.post("/chat")
    async def book_chat(request: Request):
        """The book's contract: {"query", "history" (list or "")} -> {"response", "history"}."""
        service.check_auth(request)
        body = await service.read_json(request)
        query = body.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ApiError(400, "'query' must be a non-empty string", param="query")
        history = body.get("history") or []
        if not isinstance(history, list):
            raise ApiError(400, "'history' must be a list (or an empty string for none)", param="history")
        try:
            messages = normalize_messages(history)
        except CatdogError as e:
            raise ApiError(400, str(e), param="history") from None
        messages.append({"role": "user", "content": query})
        service.check_messages(messages)
        sampling = service.sampling(body, tokens_key="max_new_tokens")
        max_length = _number(body, "max_length", int, None, low=1)
        if max_length:
            sampling["max_length"] = max_length
        gen = await service.complete(messages, sampling)
        reply = gen.reply
        history_out = [*messages, {"role": "assistant", "content": reply.text}]
        return JSONResponse(
            {
                "response": reply.text,
                "history": history_out,
                "status": 200,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "truncated_messages": reply.truncated_messages,
            },
            headers=_truncation_header(reply),
        )

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        service.check_auth(request)
        body = await service.read_json(request)
        requested = body.get("model")
        if requested not in (None, "", model_id):
            raise ApiError(
                404,
                f"model {requested!r} is not served here; this server has {model_id!r}",
                param="model",
                code="model_not_found",
            )
        if _number(body, "n", int, 1, low=1, high=1) != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        messages = _messages_from(body)
        service.check_messages(messages)
        tokens_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        sampling = service.sampling(body, tokens_key=tokens_key)
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (
            not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4
        ):
            raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
        sampling["stop"] = stop or []
        seed = _number(body, "seed", int, None)
        if seed is not None:
            sampling["seed"] = seed
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not body.get("stream"):
            gen = await service.complete(messages, sampling)
            reply = gen.reply
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model_id,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply.text},
                            "finish_reason": _finish(reply.finish_reason),
                            "logprobs": None,
                        }
                    ],
                    "usage": _usage(reply),
                    "catdog": {"truncated_messages": reply.truncated_messages},
                },
                headers=_truncation_header(reply),
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        service.admit()
        try:
            gen = service.start(messages, sampling)
        except ApiError:
            service.active -= 1
            raise

        def chunk(delta: dict, finish=None, **extra) -> str:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                **extra,
            }
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                deadline = time.monotonic() + limits.request_timeout_s
                error: BaseException | None = None
                try:
                    async for piece in gen.pieces():
                        yield chunk({"content": piece})
                        if time.monotonic() > deadline:
                            gen.cancel()
                except Exception as e:  # ends the stream with an error event instead of a cut connection
                    error = e
                reply = gen.reply
                if error is not None or reply is None:
                    closing = isinstance(error, EngineClosedError)
                    err = {
                        "message": str(error or "generation failed"),
                        "type": "server_error",
                        "param": None,
                        "code": "shutting_down" if closing else None,
                    }
                    yield f"data: {json.dumps({'error': err})}\n\n"
                else:
                    yield chunk({}, _finish(reply.finish_reason))
                    if include_usage:
                        payload = {
                            "id": completion_id,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model_id,
                            "choices": [],
                            "usage": _usage(reply),
                        }
                        yield f"data: {json.dumps(payload)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                gen.cancel()  # a client that went away stops its generation
                service.active -= 1

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return app


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _usage(reply) -> dict:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


def _truncation_header(reply) -> dict:
    return {"X-Catdog-Truncated-Messages": str(reply.truncated_messages)} if reply.truncated_messages else {}
