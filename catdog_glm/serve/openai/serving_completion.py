"""`/v1/completions`, the legacy text completion (vLLM's `serving_completion.py`): no chat template; a list of prompts
gives one choice each (times n); `echo` prefixes the prompt; logprobs in the legacy shape (tokens, token_logprobs,
top_logprobs, text_offset). Responses and chunks are `CompletionResponse`s.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from fastapi import Request

from catdog_glm.chat.engine import Generation
from catdog_glm.serve.openai.errors import ApiError
from catdog_glm.serve.openai.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse
from catdog_glm.serve.openai.serving import (
    ChatService,
    ResponseHead,
    finish_reason,
    json_response,
    merged,
    usage_of,
)


@dataclass
class CompletionPlan:
    body: CompletionRequest
    prompts: list[str]
    sampling: dict

    @property
    def n(self) -> int:
        """Generations in all: n per prompt."""
        return len(self.prompts) * self.body.n


def parse(service: ChatService, body: CompletionRequest) -> CompletionPlan:
    """Every 400 a completion request can earn before it takes a slot."""
    service.check_model(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    sampling = service.sampling(body)
    if body.logprobs is not None and body.echo:
        raise ApiError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
    plan = CompletionPlan(body, prompts, sampling)
    if plan.n > service.limits.max_waiting:
        raise ApiError(
            400, f"{plan.n} completions in one request; the limit is {service.limits.max_waiting}", param="n"
        )
    return plan


async def generate(service: ChatService, plan: CompletionPlan) -> list[Generation]:
    """Start n generations per prompt (the request's slots admitted: given back if they cannot all start)."""
    engine, gens = service.engine, []
    try:
        for p in plan.prompts:
            gens += await service.start_n(lambda s, p=p: engine.stream_text(p, **s), plan.sampling, plan.body.n)
    except BaseException:
        for g in gens:
            g.cancel()
        service.release(plan.n)
        raise
    return gens


async def render(service: ChatService, plan: CompletionPlan, gens: list[Generation], request: Request):
    """The finished `text_completion`, or its stream of chunks."""
    body, count = plan.body, plan.n
    head = ResponseHead.new("cmpl", service.model_id)
    prefix = [plan.prompts[i // body.n] if body.echo else "" for i in range(count)]
    if not body.stream:
        await service.wait(gens, request, slots=count)
        replies = [g.reply for g in gens]
        choices = [
            CompletionChoice(
                index=i,
                text=prefix[i] + reply.text,
                finish_reason=finish_reason(reply.finish_reason),
                logprobs=_logprobs(body, reply.logprobs or [], len(prefix[i])),
            )
            for i, reply in enumerate(replies)
        ]
        response = CompletionResponse(**head.fields(), choices=choices, usage=usage_of(replies, body.n))
        return json_response(response)

    def chunk(index: int, text: str, finish: str | None = None, logprobs: CompletionLogprobs | None = None) -> str:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)
        return CompletionResponse(**head.fields(), choices=[choice]).sse()

    async def events():
        offsets = [len(p) for p in prefix]
        for i, text in enumerate(prefix):
            if text:
                yield chunk(i, text)
        async for i, piece in merged(gens, service.limits.request_timeout_s):
            if piece is None:
                yield chunk(i, "", finish_reason(gens[i].reply.finish_reason))
                continue
            lp = _logprobs(body, piece.logprobs or [], offsets[i])
            offsets[i] += len(piece.text)
            if piece.text or lp:
                yield chunk(i, piece.text, logprobs=lp)

    def usage() -> CompletionResponse:
        return CompletionResponse(**head.fields(), choices=[], usage=usage_of([g.reply for g in gens], body.n))

    wants_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await service.stream(events(), gens=gens, slots=count, usage=usage if wants_usage else None)


def _logprobs(body: CompletionRequest, tokens, offset: int) -> CompletionLogprobs | None:
    """TokenLogprobs -> the legacy completions shape (tokens, token_logprobs, top_logprobs, text_offset)."""
    if body.logprobs is None:
        return None
    top = body.logprobs
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    # offsets count the text's characters: the bytes of one character add one, once it is complete
    text_of = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    for t in tokens:
        token = _legacy_token(t.token, t.bytes)
        out.tokens.append(token)
        out.token_logprobs.append(t.logprob)
        best = {_legacy_token(s, b): v for s, v, b in t.top[:top]}
        best.setdefault(token, t.logprob)
        out.top_logprobs.append(best)
        out.text_offset.append(offset)
        offset += len(text_of(bytes(t.bytes)))
    return out


def _legacy_token(text: str, data) -> str:
    """A token as the legacy shape names it: its text, or, for part of a UTF-8 character (which decodes to "\ufffd",
    so several such tokens would share one top_logprobs key), "bytes:\\xNN..." as OpenAI writes it."""
    try:
        bytes(data).decode("utf-8")
        return text
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)
