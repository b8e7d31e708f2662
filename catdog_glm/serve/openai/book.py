"""The book's `POST /chat`: {"query", "history" (a list of {role, content} or [query, answer] pairs, or "")} ->
{"response", "history", "status", "time"}; its errors keep the book's simple `{"error": "..."}` (errors.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Request

from catdog_glm.chat.engine import Generation
from catdog_glm.chat.messages import normalize_messages
from catdog_glm.errors import CatdogError
from catdog_glm.serve.openai.errors import ApiError
from catdog_glm.serve.openai.protocol import BookChatRequest, BookChatResponse
from catdog_glm.serve.openai.serving import ChatService, json_response, truncation_header


@dataclass
class BookPlan:
    body: BookChatRequest
    messages: list[dict]
    sampling: dict


def parse(service: ChatService, body: BookChatRequest) -> BookPlan:
    """The history normalised (either of the book's shapes), the query appended, the limits checked."""
    try:
        messages = normalize_messages(body.history or [])
    except CatdogError as e:
        raise ApiError(400, str(e), param="history") from None
    messages.append({"role": "user", "content": body.query})
    if len(messages) > service.limits.max_messages:
        raise ApiError(400, f"too many messages ({len(messages)}); the limit is {service.limits.max_messages}")
    return BookPlan(body, messages, service.sampling(body))


async def generate(service: ChatService, plan: BookPlan, request: Request) -> Generation:
    """One reply, waited for (the slot admitted: given back however it ends)."""
    engine, messages, sampling = service.engine, plan.messages, plan.sampling
    try:
        gen = await service.start(lambda loop: engine.stream(messages, loop=loop, **sampling))
    except BaseException:
        service.release()
        raise
    await service.wait([gen], request, slots=1)
    return gen


def render(plan: BookPlan, gen: Generation):
    reply, max_length = gen.reply, plan.body.max_length
    if max_length and reply.prompt_tokens >= max_length:
        raise ApiError(
            400,
            f"max_length {max_length} leaves no room: the prompt alone is {reply.prompt_tokens} tokens",
            param="max_length",
        )
    text = reply.text  # the content as the model's format reads it (ChatGLM3: no metadata line)
    response = BookChatResponse(
        response=text,
        history=[*plan.messages, {"role": "assistant", "content": text}],
        time=time.strftime("%Y-%m-%d %H:%M:%S"),
        truncated_messages=reply.truncated_messages,
    )
    return json_response(response, truncation_header(reply))
