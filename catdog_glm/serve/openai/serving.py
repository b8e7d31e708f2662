"""What every endpoint shares (vLLM's `serving_engine.py`): the limits, `ChatService` around the one engine (auth,
request slots, sampling options, starting and waiting for generations), usage, finish reasons, and the SSE stream's
plumbing: one tail for every stream (usage chunk, error event, cleanup, `data: [DONE]`).

Generation runs on the engine's scheduler thread, never on the event loop; starting one (encoding a conversation,
compiling a grammar) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials

from catdog_glm.chat.engine import ChatEngine, EngineClosedError, Generation
from catdog_glm.chat.sampling import MAX_NEW_TOKENS_CAP, wrap_seed
from catdog_glm.errors import CatdogError
from catdog_glm.serve.openai.errors import (
    ApiError,
    ClientGone,
    error_event,
    is_expected,
    shutting_down,
    timed_out,
)
from catdog_glm.serve.openai.protocol import ParamError, ResponseModel, Usage

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = "data: [DONE]\n\n"


@dataclass
class ApiLimits:
    max_body_bytes: int = 1 << 20
    max_messages: int = 64
    max_tokens: int = MAX_NEW_TOKENS_CAP  # the cap on max_tokens / max_new_tokens a client may ask for
    request_timeout_s: float = 300.0
    max_waiting: int = 64  # generations running or queued; beyond: 503 with Retry-After
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)


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
    def sampling(self, req) -> dict:
        """The engine keyword arguments of a request (protocol's `to_sampling`), under this server's token cap."""
        try:
            return req.to_sampling(self.limits.max_tokens)
        except ParamError as e:
            raise ApiError.from_param(e) from None

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
            raise shutting_down() from None

    async def start_n(self, begin, sampling: dict, n: int) -> list[Generation]:
        """n generations of one request (`begin(sampling | {"loop"})` starts one); seeded ones use seed, seed+1, ...
        (so choices differ yet reproduce). If one cannot start, those started are cancelled."""
        gens: list[Generation] = []
        try:
            for i in range(n):
                s = dict(sampling)
                if "seed" in s:
                    s["seed"] = wrap_seed(s["seed"] + i)
                gens.append(await self.start(lambda loop, s=s: begin(s | {"loop": loop})))
        except BaseException:
            for g in gens:
                g.cancel()
            raise
        return gens

    async def wait(self, gens: list[Generation], request: Request, *, slots: int = 0) -> None:
        """Wait until every generation is done, bounded by the timeout; a client that leaves cancels them all.
        `slots`: request slots given back once the wait ends, however it ends."""
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
            raise timed_out(self.limits.request_timeout_s)
        except EngineClosedError:
            raise shutting_down() from None
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
            self.release(slots)

    async def stream(
        self,
        events: AsyncIterator[str],
        *,
        gens: Sequence[Generation] = (),
        slots: int = 0,
        close: Callable[[], Awaitable[None]] | None = None,
        usage: Callable[[], ResponseModel] | None = None,
    ) -> StreamingResponse:
        """The one tail of every stream: `events`, then the usage chunk (`usage()`, with include_usage); a failure
        ends it with an error event instead of a cut connection; however it ends, a client gone included, `close()`
        runs, `gens` are cancelled and `slots` given back; `data: [DONE]` last."""

        async def guarded() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
                if usage is not None:
                    yield usage().sse()
            except TimeoutError:
                yield error_event(timed_out(self.limits.request_timeout_s))
            except Exception as e:
                if not is_expected(e):
                    log.exception("streamed generation failed")
                yield error_event(e)
            finally:
                await events.aclose()
                if close is not None:
                    await close()
                for g in gens:
                    g.cancel()  # a client that went away stops its generations
                self.release(slots)
            yield DONE

        return StreamingResponse(await _primed(guarded()), media_type="text/event-stream", headers=SSE_HEADERS)


@dataclass
class ResponseHead:
    """id, created and model: written once per request, shared by its response or every chunk of its stream."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseHead:
        return cls(f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), model)

    def fields(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model}


def usage_of(replies, per_prompt: int = 1) -> Usage:
    """Usage of a request's replies: `per_prompt` choices share each prompt, counted once."""
    prompt = sum(r.prompt_tokens for r in replies[::per_prompt])
    return Usage.of(prompt, sum(r.completion_tokens for r in replies))


def finish_reason(reason: str, tool_calls: bool = False) -> str:
    """OpenAI's finish_reason: a reply cut by the token limit is "length" even after complete calls (the call it was
    writing is left out); otherwise "tool_calls" when it made any."""
    if reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


def truncation_header(reply) -> dict:
    return {"X-Catdog-Truncated-Messages": str(reply.truncated_messages)} if reply.truncated_messages else {}


def json_response(model: ResponseModel, headers: dict | None = None) -> Response:
    """A response model as the body, written by pydantic."""
    return Response(model.model_dump_json(), media_type="application/json", headers=headers)


def _cancel_started(future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().cancel()


async def _drain(gen: Generation) -> None:
    async for _ in gen.chunks():
        pass


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body was read already: the next message is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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


async def merged(gens: list[Generation], timeout_s: float) -> AsyncIterator[tuple[int, Any]]:
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
                raise timed_out(timeout_s) from None
            if error is not None:
                raise error
            if piece is None:
                left -= 1
            yield i, piece
    finally:
        for t in tasks:
            t.cancel()
