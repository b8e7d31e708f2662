"""The classifier as the chat model's eyes: `catdog serve-chat --classifier CHECKPOINT`.

A photo sent with a chat message (an OpenAI `image_url` part holding a `data:` URL, or a file on the Gradio page)
is never shown to the text model. It sees a placeholder (`[photo image_1]`) and a built-in tool, `classify_image`,
written into its prompt in its own tool format (ChatGLM3's protocol, Hermes for ChatML models). The server runs the
model's call with the same predictor as `catdog predict` (its pixel limit, EXIF, odd formats; PyTorch or ONNX),
feeds the verdict back as the tool/observation message, for at most MAX_TOOL_ROUNDS rounds, then the model answers.

A new photo in the last user message is always looked at first: unless the client chose a `tool_choice`, the first
round is held by a grammar to one `classify_image` call (a 135M model would otherwise often answer without looking).
Input that cannot be classified (not an image, a decompression bomb, a file over the size limit) becomes a one-line
tool error the model reads and the user sees; only a remote URL or a malformed part is refused with 400.

`converse()` is the loop, shared by the API route (`VisionChat.chat_completions`) and the Gradio page.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from catdog_glm.chat.engine import EngineClosedError
from catdog_glm.chat.tools import ContentDelta, call_arguments
from catdog_glm.errors import CatdogError, ConfigError
from catdog_glm.serve import chat_api as api
from catdog_glm.serve.openai_protocol import ChatMessage

log = logging.getLogger(__name__)

TOOL_NAME = "classify_image"
MAX_TOOL_ROUNDS = 3  # rounds that may call the classifier; the round after them must answer
DEFAULT_MAX_IMAGE_BYTES = 10 * 1024 * 1024  # one photo, decoded; as serve-classifier's uploads
MIN_CALL_TOKENS = 64  # a forced classify_image call fits in this many tokens, whatever max_tokens the client set
IMAGE_PART_TYPES = ("image_url", "input_image")


@dataclass
class Attachment:
    """One photo of the conversation: its bytes, or why they could not be read (reported by the tool)."""

    key: str  # image_1, image_2, ... in the order they appear
    data: bytes | None = None
    error: str | None = None


@dataclass
class ToolStep:
    """A classify_image call the server ran and what it returned (a result, or {"error": ...})."""

    id: str
    arguments: dict
    result: dict
    name: str = TOOL_NAME

    @property
    def error(self) -> str | None:
        return self.result.get("error")

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "arguments": self.arguments, "result": self.result}

    def summary(self) -> str:
        """One line for a person: the verdict or the error."""
        if self.error:
            return f"error: {self.error}"
        r = self.result
        return f"{r['label']} ({r['probability']:.1%}) by {r['classifier']}"


def observation(result: dict) -> str:
    """What the model reads back: one plain sentence. A small model tends to repeat its tool's output, and a JSON
    object naming both classes made SmolLM2's answers name both animals (0/10 answers right, 10/10 with this)."""
    if "error" in result:
        return f"The photo could not be classified: {result['error']}"
    return (
        f"The classifier {result['classifier']} says the photo shows a {result['label']} "
        f"({result['probability']:.0%} sure)."
    )


def read_data_url(url: str, key: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Attachment:
    """A `data:` URL -> its bytes. A remote or non-data URL raises ConfigError (the request is refused); bad base64
    or a photo over `max_bytes` gives an Attachment with an error (the tool reports it, the model reads it)."""
    if re.match(r"(?i)\s*(https?|ftp|file):", url):
        raise ConfigError(
            f"{key}: remote image URLs are not fetched; send the photo inline as data:image/jpeg;base64,..."
        )
    if not url[:5].lower() == "data:":
        raise ConfigError(f"{key}: image_url.url must be a data: URL (data:image/jpeg;base64,...)")
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        return Attachment(key, error=f"{key}: not a base64 data: URL (data:image/jpeg;base64,...)")
    size = len(payload) * 3 // 4  # before decoding: a 20 MB URL is refused without making 15 MB of bytes
    if size > max_bytes:
        return Attachment(key, error=f"{key}: the photo is {size / 2**20:.1f} MiB; the limit is {_mib(max_bytes)}")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        return Attachment(key, error=f"{key}: the data: URL is not valid base64")
    if not data:
        return Attachment(key, error=f"{key}: empty file (0 bytes)")
    return Attachment(key, data=data)


def read_file(path: str | Path, key: str, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Attachment:
    """A photo the page received as a file -> an Attachment (an error when it is too large or unreadable)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return Attachment(key, error=f"{key}: the photo is {size / 2**20:.1f} MiB; the limit is {_mib(max_bytes)}")
        return Attachment(key, data=path.read_bytes())
    except OSError as e:
        return Attachment(key, error=f"{key}: cannot read the file ({e.strerror or e})")


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


class ClassifierTool:
    """The `classify_image` tool over one predictor (a checkpoint or an exported .onnx, as `catdog predict`)."""

    def __init__(self, predictor, *, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES):
        self.predictor = predictor
        self.max_image_bytes = max_image_bytes
        info = predictor.info()
        self.classes = list(info["classes"])
        self.name = Path(str(info.get("checkpoint") or "classifier")).name

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto", **options) -> ClassifierTool:
        from catdog_glm.vision.predictor import load_predictor

        return cls(load_predictor(path, device=device), **options)

    def spec(self, keys: list[str]) -> dict:
        """The tool as OpenAI writes one; `image` may only name a photo of this conversation."""
        classes = " or ".join(self.classes)
        return {
            "type": "function",
            "function": {
                "name": TOOL_NAME,
                "description": f"Look at a photo the user attached: the image classifier {self.name} says whether "
                f"it shows a {classes}, with its probability.",
                "parameters": {
                    "type": "object",
                    "properties": {"image": {"type": "string", "enum": keys, "description": "the photo to look at"}},
                    "required": ["image"],
                    "additionalProperties": False,
                },
            },
        }

    def run(self, arguments: dict, images: dict[str, Attachment]) -> dict:
        """The verdict for the photo `arguments["image"]` names (the latest when it names none), or {"error"}."""
        key = arguments.get("image") or (list(images)[-1] if images else None)
        if key not in images:
            return {"error": f"no photo named {key!r}; attached: {', '.join(images) or 'none'}"}
        image = images[key]
        if image.error:
            return {"error": image.error}
        try:
            [prediction] = self.predictor.predict_sources([image.data], [key])
        except Exception as e:  # a tool failure is the model's to read, never the server's to die of
            log.exception("classify_image failed on %s", key)
            return {"error": f"{key}: the classifier failed ({type(e).__name__})"}
        if not prediction.ok:
            return {"error": prediction.error}
        probabilities = {k: round(v, 4) for k, v in prediction.top(None).items()}
        return {
            "label": prediction.label,
            "probability": probabilities[prediction.label],
            "probabilities": probabilities,
            "classifier": self.name,
        }


# ---- the conversation: photos out, placeholders in ----------------------------------------------------------------
def placeholder(key: str) -> str:
    return f"[photo {key}]"


def has_images(messages) -> bool:
    """Whether OpenAI-shaped messages (dicts or pydantic) carry an image part."""
    return any(_image_url(p) is not None for m in messages for p in _parts(m))


def _parts(message) -> list:
    content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
    return content if isinstance(content, list) else []


def _get(part, name: str):
    return part.get(name) if isinstance(part, dict) else getattr(part, name, None)


def _image_url(part) -> str | None:
    """The URL of an image part ({"type": "image_url", "image_url": {"url"}} or "input_image"), else None."""
    kind = _get(part, "type")
    if kind not in IMAGE_PART_TYPES:
        return None
    value = _get(part, "image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise ConfigError(f"an {kind} part needs image_url.url, a data: URL")
    return url


def split_images(
    messages: list[dict], max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> tuple[list[dict], dict[str, Attachment]]:
    """OpenAI messages (dicts) -> the same with each image part replaced by a text placeholder, and the photos."""
    images: dict[str, Attachment] = {}
    out = []
    for m in messages:
        parts = _parts(m)
        if not any(_image_url(p) is not None for p in parts):
            out.append(m)
            continue
        content = []
        for p in parts:
            url = _image_url(p)
            if url is None:
                content.append(p)
                continue
            key = f"image_{len(images) + 1}"
            images[key] = read_data_url(url, key, max_bytes)
            content.append({"type": "text", "text": f"\n{placeholder(key)}\n"})
        out.append({**m, "content": content})
    return out, images


def new_photos(messages: list[dict], images: dict[str, Attachment]) -> list[str]:
    """The photos the last message shows, when it is the user's: to be looked at before answering."""
    last = messages[-1] if messages else {}
    if last.get("role") != "user":
        return []
    return [key for key in images if placeholder(key) in str(last.get("content"))]


# ---- the loop ----------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What a conversation turn came to: the answer, the client's tool calls (if any) and the steps run."""

    content: str = ""
    client_calls: list[dict] = field(default_factory=list)
    steps: list[ToolStep] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated_messages: int = 0


Start = Callable[[Callable], Awaitable[Any]]  # start(begin) -> Generation; begin(loop) calls engine.stream


async def _default_start(begin):
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, begin, loop)


async def converse(
    engine,
    messages: list[dict],
    tool: ClassifierTool,
    images: dict[str, Attachment],
    *,
    client_tools: list[dict] | None = None,
    tool_choice: Any = None,
    parallel: bool = True,
    sampling: dict | None = None,
    start: Start | None = None,
    outcome: Outcome | None = None,
    timeout_s: float | None = None,
) -> AsyncIterator[str | ToolStep]:
    """Answer `messages` (photos already split out as `images`): yields content text as it streams and a ToolStep
    for each classify_image call run; `outcome` (pass one in) holds the end state. `start` runs engine.stream off the
    event loop (the API passes its ChatService.start: 400/503 mapping, cancellation); past `timeout_s` in all, the
    generation is cancelled and TimeoutError raised."""
    fmt = engine.model.format
    if not fmt.calls_tools:
        raise ConfigError(f"{engine.model.name} has no tool-calling format, so it cannot call the classifier")
    start = start or _default_start
    out = outcome if outcome is not None else Outcome()
    client_tools = list(client_tools or [])
    builtin = [tool.spec(list(images))] if images and tool_choice != "none" else []
    history = list(messages)
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    for round_ in range(MAX_TOOL_ROUNDS + 1):
        offered = (builtin if round_ < MAX_TOOL_ROUNDS else []) + (client_tools if tool_choice != "none" else [])
        constraint = None
        if round_ == 0 and offered:
            choice = tool_choice
            fresh = new_photos(history, images) if builtin else []
            if choice in (None, "auto") and fresh:  # a call of the new photo (or one of them), by grammar
                choice = {"type": "function", "function": {"name": TOOL_NAME}}
                constraint = fmt.tool_constraint([tool.spec(fresh)], choice, parallel=parallel)
            else:
                constraint = fmt.tool_constraint(offered, choice, parallel=parallel)
        options = dict(sampling or {})
        if constraint is not None and "max_new_tokens" in options:  # a forced call is never cut by a short answer's
            options["max_new_tokens"] = max(options["max_new_tokens"], MIN_CALL_TOKENS)  # token budget
        if offered:
            options["tools"] = offered
            options["parallel_tool_calls"] = parallel
        if constraint is not None:
            options["constraint"] = constraint
        gen = await start(lambda loop, o=options, h=list(history): engine.stream(h, loop=loop, **o))
        pieces = gen.chunks()  # raw pieces, read through the generation's own parser (the model's format)
        try:
            while True:
                try:
                    wait = None if deadline is None else max(0.0, deadline - loop.time())
                    piece = await asyncio.wait_for(pieces.__anext__(), wait)
                except StopAsyncIteration:
                    break
                for delta in gen.deltas(piece.text):
                    if isinstance(delta, ContentDelta) and delta.text:
                        yield delta.text
            for delta in gen.final_deltas():
                if isinstance(delta, ContentDelta) and delta.text:
                    yield delta.text
        finally:
            await pieces.aclose()
            gen.cancel()
        reply = gen.reply
        out.prompt_tokens += reply.prompt_tokens
        out.completion_tokens += reply.completion_tokens
        out.truncated_messages = max(out.truncated_messages, reply.truncated_messages)
        out.content += reply.text or ""
        ours = [c for c in reply.tool_calls if c["function"]["name"] == TOOL_NAME]
        theirs = [c for c in reply.tool_calls if c["function"]["name"] != TOOL_NAME]
        if theirs:  # the client's own tools: handed back to it, as without a classifier
            out.client_calls, out.finish_reason = theirs, "tool_calls"
            return
        if not ours:
            out.finish_reason = "length" if reply.finish_reason == "length" else "stop"
            return
        history.append({"role": "assistant", "content": reply.text or "", "tool_calls": ours})
        for call in ours:
            try:
                arguments = call_arguments(call)
            except CatdogError as e:
                arguments, result = {}, {"error": str(e)}
            else:
                result = await loop.run_in_executor(None, tool.run, arguments, images)
            step = ToolStep(call["id"], arguments, result)
            out.steps.append(step)
            yield step
            history.append(
                {
                    "role": "tool",
                    "tool_call_id": call["id"],
                    "name": TOOL_NAME,
                    "content": observation(result),
                }
            )


# ---- the API: /v1/chat/completions with photos -------------------------------------------------------------------
class VisionChat:
    """The route's photo path: `create_api(..., vision=VisionChat(tool))` sends every chat request that carries an
    image part here; the answer is OpenAI's, with the steps run in `catdog.tool_steps` (streamed: a chunk with no
    choices and `catdog.tool_step`, as each step ends)."""

    def __init__(self, tool: ClassifierTool):
        self.tool = tool

    def handles(self, body) -> bool:
        try:
            return has_images(body.messages)
        except ConfigError:
            return True  # a malformed image part: refused (400) by chat_completions

    async def chat_completions(self, body, request, service):
        service.check_model(body.model)
        engine, limits = service.engine, service.limits
        for name, refused in (
            ("n", body.n != 1),
            ("logprobs", body.logprobs),
            ("response_format", body.response_format is not None and body.response_format.type != "text"),
        ):
            if refused:
                raise api.ApiError(400, f"'{name}' is not supported with photos (image parts) yet", param=name)
        try:
            dicts, images = split_images(
                [m.model_dump(exclude_none=True, by_alias=True) for m in body.messages], self.tool.max_image_bytes
            )
        except ConfigError as e:
            raise api.ApiError(400, str(e), param="messages") from None
        text_body = body.model_copy(update={"messages": [ChatMessage.model_validate(d) for d in dicts]})
        messages, prefill = api._engine_messages(text_body, limits.max_messages)
        if prefill:
            raise api.ApiError(400, "continuing an assistant message is not supported with photos", param="messages")
        tokens_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        sampling = service.sampling(body, tokens_param=tokens_param)
        plain = text_body.model_copy(update={"tool_choice": None, "response_format": None})
        client_tools, _ = api._tools_and_constraint(plain, engine.model.format)
        if any(t["function"]["name"] == TOOL_NAME for t in client_tools or []):
            raise api.ApiError(400, f"'{TOOL_NAME}' is this server's built-in tool; rename yours", param="tools")
        choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
        if isinstance(choice, dict):
            named = choice["function"]["name"]
            if named != TOOL_NAME and named not in {t["function"]["name"] for t in client_tools or []}:
                raise api.ApiError(400, f"tool_choice names {named!r}, not among the tools", param="tool_choice")
        outcome = Outcome()
        service.admit()
        try:
            steps = converse(
                engine,
                messages,
                self.tool,
                images,
                client_tools=client_tools,
                tool_choice=choice,
                parallel=body.parallel_tool_calls,
                sampling=sampling,
                start=service.start,
                outcome=outcome,
                timeout_s=limits.request_timeout_s,
            )
        except BaseException:
            service.release()
            raise
        env = api.Envelope("chatcmpl", service.model_id)

        def usage() -> dict:
            return api._usage(outcome.prompt_tokens, outcome.completion_tokens)

        if not body.stream:
            try:
                async for _ in steps:
                    pass
            except TimeoutError:
                raise api._timed_out(limits.request_timeout_s) from None
            except EngineClosedError:
                raise api._shutting_down() from None
            except CatdogError as e:
                raise api.ApiError(400, str(e)) from None
            finally:
                service.release()
            message: dict[str, Any] = {"role": "assistant", "content": outcome.content, "refusal": None}
            if outcome.client_calls:
                message["tool_calls"] = outcome.client_calls
            choice0 = {"index": 0, "message": message, "finish_reason": outcome.finish_reason, "logprobs": None}
            extension = {
                "tool_steps": [s.to_dict() for s in outcome.steps],
                "truncated_messages": outcome.truncated_messages,
            }
            return JSONResponse(env.chat([choice0], usage()) | {"catdog": extension})
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            try:
                yield env.chat_chunk(0, {"role": "assistant", "content": ""})
                async for item in steps:
                    if isinstance(item, ToolStep):
                        step = {"catdog": {"tool_step": item.to_dict()}}
                        yield api.sse({**env.head("chat.completion.chunk"), "choices": [], **step})
                    else:
                        yield env.chat_chunk(0, {"content": item})
                for i, call in enumerate(outcome.client_calls):
                    yield env.chat_chunk(0, {"tool_calls": [{"index": i, **call}]})
                yield env.chat_chunk(0, {}, outcome.finish_reason)
                if include_usage:
                    yield env.usage_chunk("chat.completion.chunk", usage())
            except TimeoutError:
                yield api.sse_error(api._timed_out(limits.request_timeout_s))
            except Exception as e:  # an error event closes the stream instead of a cut connection
                if not isinstance(e, (EngineClosedError, CatdogError, api.ApiError)):
                    log.exception("streamed generation with photos failed")
                yield api.sse_error(e)
            finally:
                await steps.aclose()
                service.release()
            yield api.DONE

        return StreamingResponse(await api._primed(events()), media_type="text/event-stream", headers=api.SSE_HEADERS)


def attach_classifier(engine, tool: ClassifierTool) -> VisionChat:
    """`serve-chat --classifier`: the classifier tool for `engine`'s model (which must have a tool format)."""
    if not engine.model.format.calls_tools:
        raise ConfigError(
            f"--classifier needs a chat model that can call tools; {engine.model.name} has no tool-calling format "
            "(use a ChatGLM3, a ChatML model such as the embedded SmolLM2, or one whose template renders tools)"
        )
    return VisionChat(tool)
