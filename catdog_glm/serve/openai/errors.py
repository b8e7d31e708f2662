"""The API's errors: `ApiError` and its OpenAI shape, the body guard, and the handlers that put every failure in it.

Every error reads `{"error": {"message", "type", "param", "code"}}` with the real HTTP status (FastAPI's own
404/405/422 handlers replaced; a validation error is 400 naming the parameter, as OpenAI and vLLM answer), except on
the book's `/chat`, which keeps its simple `{"error": "..."}`. A failure mid-stream becomes the same body as an SSE
event (`error_event`).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from catdog_glm.chat.engine import EngineClosedError
from catdog_glm.errors import CatdogError
from catdog_glm.serve.openai.protocol import BookError, ErrorInfo, ErrorResponse, ParamError

BOOK_PATH = "/chat"
API_PREFIXES = ("/v1/", BOOK_PATH)


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

    @classmethod
    def from_param(cls, error: ParamError) -> ApiError:
        return cls(400, str(error), param=error.param)

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.kind, param=self.param, code=self.code))

    def response(self, path: str = "") -> Response:
        body = BookError(error=self.message) if path == BOOK_PATH else self.body()
        return Response(
            body.model_dump_json(), status_code=self.status, headers=self.headers, media_type="application/json"
        )


class ClientGone(Exception):
    """The client closed the connection before its reply was ready."""


def timed_out(seconds: float) -> ApiError:
    return ApiError(504, f"generation took longer than {seconds:.0f} s", kind="server_error", code="timeout")


def shutting_down() -> ApiError:
    return ApiError(
        503, "the server is shutting down", kind="server_error", code="shutting_down", headers={"Retry-After": "5"}
    )


def error_event(error: BaseException) -> str:
    """The SSE event that ends a stream which failed after it started (then `data: [DONE]`)."""
    if isinstance(error, ApiError):
        return error.body().sse()
    bad = isinstance(error, CatdogError)
    info = ErrorInfo(
        message=str(error) or "generation failed",
        type="invalid_request_error" if bad else "server_error",
        code="shutting_down" if isinstance(error, EngineClosedError) else None,
    )
    return ErrorResponse(error=info).sse()


def is_expected(error: BaseException) -> bool:
    """A failure the client caused or the server announced (not worth a traceback in the log)."""
    return isinstance(error, (EngineClosedError, CatdogError, ApiError))


def _error_kind(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )


def validation_error(exc: RequestValidationError) -> ApiError:
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
        return ApiError.from_param(error)
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


def not_found_or_not_allowed(routes, request: Request) -> ApiError:
    """404, or 405 with `Allow` when one of `routes` serves the path with another method."""
    from starlette.routing import Match

    allowed: set[str] = set()
    for route in routes:
        if getattr(route, "include_in_schema", False) and hasattr(route, "methods"):
            match, _ = route.matches({**request.scope, "method": "__none__"})
            if match != Match.NONE:
                allowed |= set(route.methods)
    if allowed:
        return ApiError(
            405,
            f"method {request.method} is not allowed on {request.url.path}",
            headers={"Allow": ", ".join(sorted(allowed))},
        )
    return ApiError(404, f"no route {request.method} {request.url.path}", kind="not_found_error")


def install_error_handlers(app: FastAPI) -> None:
    """ApiError, validation errors, Starlette's HTTP errors and a client gone, each in the API's shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response(request.url.path)

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
        gone = BookError(error="client closed the request")
        return Response(gone.model_dump_json(), status_code=499, media_type="application/json")


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
