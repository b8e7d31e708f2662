"""`/v1/chat/completions` (vLLM's `serving_chat.py`): a request -> the engine's messages, tools and sampling ->
generations -> a `chat.completion`, or its stream of `chat.completion.chunk`s (a role chunk, content and tool-call
deltas, a chunk with `finish_reason`, the usage chunk when asked, `data: [DONE]`), all built as protocol models.

`vision_tool.py` (photos through the classifier tool) builds on the same helpers (messages, tools, chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from catdog_glm.chat.constrained import Constraint
from catdog_glm.chat.engine import Generation
from catdog_glm.chat.tools import ToolCallDelta, validate_tools
from catdog_glm.errors import CatdogError
from catdog_glm.serve.openai.errors import ApiError
from catdog_glm.serve.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    TokenLogprobOut,
    ToolCallDeltaFunction,
    ToolCallDeltaOut,
    TopLogprob,
)
from catdog_glm.serve.openai.serving import (
    ChatService,
    ResponseHead,
    finish_reason,
    json_response,
    merged,
    truncation_header,
    usage_of,
)


@dataclass
class ChatPlan:
    """A parsed chat request: what engine.stream gets, besides the sampling options."""

    body: ChatCompletionRequest
    messages: list[dict]
    options: dict[str, Any]  # tools, constraint, continue_final, parallel_tool_calls
    sampling: dict[str, Any]

    @property
    def n(self) -> int:
        return self.body.n


def parse(service: ChatService, body: ChatCompletionRequest) -> ChatPlan:
    """Every 400 a chat request can earn before it takes a slot: model, messages, token cap, tools, formats."""
    service.check_model(body.model)
    messages, prefill = engine_messages(body, service.limits.max_messages)
    sampling = service.sampling(body)
    tools, constraint = tools_and_constraint(body, service.engine.model.format)
    options: dict[str, Any] = {"parallel_tool_calls": body.parallel_tool_calls}
    if tools:
        options["tools"] = tools
    if prefill:
        options["continue_final"] = True
    if constraint is not None:
        options["constraint"] = constraint
    return ChatPlan(body, messages, options, sampling)


async def generate(service: ChatService, plan: ChatPlan) -> list[Generation]:
    """Start the request's n generations (its slots admitted: given back if they cannot start)."""
    engine, messages, options = service.engine, plan.messages, plan.options
    try:
        return await service.start_n(lambda s: engine.stream(messages, **options, **s), plan.sampling, plan.n)
    except BaseException:
        service.release(plan.n)
        raise


async def render(service: ChatService, plan: ChatPlan, gens: list[Generation], request: Request):
    """The finished `chat.completion`, or the stream of chunks as the generations write."""
    body, n = plan.body, plan.n
    head = ResponseHead.new("chatcmpl", service.model_id)
    if not body.stream:
        await service.wait(gens, request, slots=n)
        replies = [g.reply for g in gens]  # content and calls as the model's format reads them
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(
                    content=reply.text or (None if reply.tool_calls else ""), tool_calls=reply.tool_calls or None
                ),
                finish_reason=finish_reason(reply.finish_reason, bool(reply.tool_calls)),
                logprobs=_logprobs(body, reply.logprobs or []),
            )
            for i, reply in enumerate(replies)
        ]
        response = ChatCompletionResponse(
            **head.fields(),
            choices=choices,
            usage=usage_of(replies, n),  # one prompt for the n choices
            catdog={"truncated_messages": replies[0].truncated_messages},
        )
        return json_response(response, truncation_header(replies[0]))

    async def events():
        for i in range(n):
            yield chunk(head, i, ChunkDelta(role="assistant", content=""))
        pending: list[list] = [[] for _ in range(n)]  # logprobs of tokens whose text a parser holds back
        async for i, piece in merged(gens, service.limits.request_timeout_s):
            if piece is None:
                reply = gens[i].reply
                finish = finish_reason(reply.finish_reason, bool(reply.tool_calls))
                lp_tokens = pending[i]
                for delta in render_deltas(gens[i].final_deltas()):
                    yield chunk(head, i, delta, logprobs=_logprobs(body, lp_tokens))
                    lp_tokens = []
                yield chunk(head, i, ChunkDelta(), finish, logprobs=_logprobs(body, lp_tokens) if lp_tokens else None)
                continue
            pending[i] += piece.logprobs or []
            for delta in render_deltas(gens[i].deltas(piece.text)):
                yield chunk(head, i, delta, logprobs=_logprobs(body, pending[i]))
                pending[i] = []

    def usage() -> ChatCompletionChunk:
        return ChatCompletionChunk(**head.fields(), choices=[], usage=usage_of([g.reply for g in gens], n))

    wants_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await service.stream(events(), gens=gens, slots=n, usage=usage if wants_usage else None)


def chunk(
    head: ResponseHead,
    index: int,
    delta: ChunkDelta,
    finish: str | None = None,
    logprobs: ChoiceLogprobs | None = None,
) -> str:
    """One choice's `chat.completion.chunk` as an SSE event."""
    choice = ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
    return ChatCompletionChunk(**head.fields(), choices=[choice]).sse()


def render_deltas(deltas) -> list[ChunkDelta]:
    """Parser deltas -> OpenAI stream deltas: content text, or a tool call (first: index, id, type, name)."""
    out = []
    for d in deltas:
        if isinstance(d, ToolCallDelta):
            first = d.id is not None
            call = ToolCallDeltaOut(
                index=d.index,
                id=d.id,
                type="function" if first else None,
                function=ToolCallDeltaFunction(name=d.name if first else None, arguments=d.arguments),
            )
            out.append(ChunkDelta(tool_calls=[call]))
        elif d.text:
            out.append(ChunkDelta(content=d.text))
    return out


def _logprobs(body: ChatCompletionRequest, tokens) -> ChoiceLogprobs | None:
    """TokenLogprobs -> OpenAI's `choices[].logprobs` (content[]: token, logprob, bytes, top_logprobs[])."""
    if not body.logprobs:
        return None
    top = body.top_logprobs or 0
    content = [
        TokenLogprobOut(
            token=t.token,
            logprob=t.logprob,
            bytes=list(t.bytes),
            top_logprobs=[TopLogprob(token=s, logprob=v, bytes=list(b)) for s, v, b in t.top[:top]],
        )
        for t in tokens
    ]
    return ChoiceLogprobs(content=content, refusal=None)


# ---- messages -----------------------------------------------------------------------------------------------------
def engine_messages(req: ChatCompletionRequest, max_messages: int) -> tuple[list[dict], bool]:
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


# ---- tools and response formats -----------------------------------------------------------------------------------
def tools_and_constraint(req: ChatCompletionRequest, chat_format) -> tuple[list | None, Any]:
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
