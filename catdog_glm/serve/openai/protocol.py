"""The wire types of the chat API, in the manner of vLLM's `entrypoints/openai/protocol.py`.

Pydantic models for every request body (OpenAI's chat completions and legacy completions, the book's `/chat`), every
response and stream chunk, and the error envelope. Routes take the request models, so validation lives here and
`/docs` shows real schemas. Validation is strict (no "0.5" for a number, no `true` for an integer), NaN/Infinity are
rejected, seeds fit 64 bits, every string must be encodable as UTF-8 (a lone surrogate such as "\\ud800" is refused),
and ranges are OpenAI's. Unknown fields are ignored (clients send extras); documented OpenAI parameters that this
server cannot honour and whose silent ignoring would mislead are refused with 400 by name (`UNSUPPORTED`).
Limits that depend on the running server (the max_tokens cap, the message count) are checked by the routes;
`to_sampling(cap)` (vLLM's `to_sampling_params`) turns a request into the engine's keyword arguments.

The response models are what the routes send (`model_dump_json`), so each shape is written once, here: a field that
OpenAI leaves out when it has no value (a delta's role, a message's tool_calls, a chunk's usage) is listed in its
model's `omitted`; every other one is sent, null included.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from catdog_glm.chat.messages import content_text
from catdog_glm.chat.sampling import DEFAULT_MAX_NEW_TOKENS, MAX_TOP_LOGPROBS, SEED_RANGE, wrap_seed

SEED_MIN, SEED_MAX = SEED_RANGE
MAX_N = 8
MAX_STOP = 4
MAX_COMPLETION_LOGPROBS = 5  # the legacy endpoint's limit
MAX_TOOLS = 128  # OpenAI's limit; each tool's schema is compiled on the event loop

# Documented OpenAI parameters refused with 400: ignoring them would hand back something the client did not ask for.
UNSUPPORTED = {
    "audio": "audio output is not supported: this server generates text only",
    "functions": "'functions' is deprecated and not supported: send 'tools'",
    "function_call": "'function_call' is deprecated and not supported: send 'tool_choice'",
    "web_search_options": "web search is not supported: this server has no web access",
    "suffix": "'suffix' (insertion) is not supported",
}


class ParamError(ValueError):
    """A validation error that names the request parameter it concerns (for body-wide checks)."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def _strings_are_utf8(value: Any) -> None:
    """Raise ParamError naming the first string (or key) that UTF-8 cannot encode (lone surrogates). Iterative:
    JSON nested a few hundred levels deep must not exhaust Python's recursion limit."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = item[e.start : e.end].encode("unicode_escape").decode()
                param = path.split(".")[0].split("[")[0] or None
                message = f"{path or 'a key'} holds {bad}, a lone surrogate that is not valid Unicode"
                raise ParamError(message, param) from None
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                stack.append((child, f"{path}.{key}" if path else str(key)))
                stack.append((key, path))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in reversed(list(enumerate(item))))


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", populate_by_name=True)


class _Request(_Strict):
    tokens_param: ClassVar[str] = "max_tokens"  # the name a too-large token limit is refused under

    @model_validator(mode="before")
    @classmethod
    def _utf8(cls, data: Any) -> Any:
        _strings_are_utf8(data)
        return data

    @property
    def token_limit(self) -> int | None:
        return getattr(self, self.tokens_param)

    def to_sampling(self, max_tokens: int) -> dict[str, Any]:
        """The engine's keyword arguments for this request (vLLM's `to_sampling_params`): only what the client set,
        so the engine keeps the model's defaults for the rest. `max_tokens` is the server's cap (ParamError above)."""
        limit = self.token_limit
        if limit is not None and limit > max_tokens:
            raise ParamError(f"'{self.tokens_param}' must be <= {max_tokens}, got {limit}", self.tokens_param)
        out: dict[str, Any] = {"max_new_tokens": limit or min(DEFAULT_MAX_NEW_TOKENS, max_tokens)}
        for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if getattr(self, name, None) is not None:
                out[name] = getattr(self, name)
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name, 0):
                out[name] = getattr(self, name)
        if getattr(self, "stop", None):
            out["stop"] = list(self.stop)
        if getattr(self, "logit_bias", None):
            out["logit_bias"] = {int(k): v for k, v in self.logit_bias.items()}
        if getattr(self, "seed", None) is not None:
            out["seed"] = wrap_seed(self.seed)
        return out | self._more_sampling()

    def _more_sampling(self) -> dict[str, Any]:
        return {}


Temperature = Annotated[float, Field(ge=0, le=2, description="0 = greedy; OpenAI's range 0..2")]
TopP = Annotated[float, Field(gt=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX, description="a 64-bit integer")]


class _SamplingFields(_Request):
    """What chat and legacy completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="capped by the server's --max-tokens")
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(None, description="up to 4 sequences")
    seed: Seed | None = None
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, description="token id (as a string) -> bias -100..100"
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # extensions (vLLM names them the same)
    repetition_penalty: float | None = Field(None, gt=0, le=10, description="ChatGLM3/HF style, over prompt+reply")
    top_k: int | None = Field(None, ge=0, description="extension: sample among the k most likely (0 = off)")

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options is only allowed with stream: true", "stream_options")
        return self

    @field_validator("stop")
    @classmethod
    def _stop(cls, value):
        if isinstance(value, str):
            if not value:
                raise ValueError("a stop sequence must not be empty")
            return [value]
        if value is not None and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value):
        if value is not None:
            for key in value:
                # ASCII digits only: str.isdigit() also takes "²", which int() refuses (a 500)
                if len(key) > 12 or not re.fullmatch(r"\s*-?[0-9]+\s*", key):
                    raise ValueError(f"logit_bias keys must be token ids (integer strings), got {key!r}")
        return value


def _refuse(value, info):
    """A documented OpenAI parameter this server cannot honour: 400 naming it, never silently ignored."""
    if value not in (None, "", [], {}):
        raise ValueError(UNSUPPORTED[info.field_name])
    return value


class StreamOptions(_Strict):
    include_usage: bool = False


# ---- chat completions -----------------------------------------------------------------------------------------------
class ContentPart(_Strict):
    """A content part; only text (and an assistant's refusal) can be read by a text model."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
    type: str
    text: str | None = None
    refusal: str | None = None


class FunctionCall(_Strict):
    name: str
    arguments: str = Field("", description="the arguments as a JSON string")


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "observation"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant's calls, sent back in follow-up turns")
    tool_call_id: str | None = Field(None, description="a tool message: the call it answers")

    def text(self) -> str | None:
        """The content as text (chat/messages.py flattens the parts); ConfigError for a part that is not text."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        return content_text([p.model_dump(exclude_none=True) for p in self.content], "the content")


class FunctionDefinition(_Strict):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON schema for the arguments")
    strict: bool | None = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(_Strict):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _needs_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ParamError(
                "response_format of type json_schema needs a 'json_schema' object with a 'schema'", "response_format"
            )
        return self


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(description="the conversation; an assistant message last is continued")
    max_completion_tokens: int | None = Field(None, ge=1, description="preferred over max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS, description="at most 128, as OpenAI allows")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    modalities: list[str] | None = None
    # accepted and ignored, as vLLM does (no effect a client could rely on here): store, metadata, service_tier,
    # prediction, reasoning_effort, verbosity, prompt_cache_key, safety_identifier, user
    audio: dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    web_search_options: dict[str, Any] | None = None

    _unsupported = field_validator("audio", "functions", "function_call", "web_search_options", mode="before")(_refuse)

    @field_validator("modalities")
    @classmethod
    def _text_only(cls, value):
        if value and any(m != "text" for m in value):
            raise ValueError("only the 'text' modality is supported")
        return value

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value):
        if not value:
            raise ValueError("must hold at least one message")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs needs logprobs: true", "top_logprobs")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ParamError("tool_choice asks for a tool call but no 'tools' were given", "tool_choice")
        return self

    @property
    def tokens_param(self) -> str:  # type: ignore[override]
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def _more_sampling(self) -> dict[str, Any]:
        return {"logprobs": True, "top_logprobs": self.top_logprobs or 0} if self.logprobs else {}


# ---- legacy completions ---------------------------------------------------------------------------------------------
class CompletionRequest(_SamplingFields):
    prompt: str | list[str] = Field(description="a string, or a list of strings (one choice each)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None

    _unsupported = field_validator("suffix", mode="before")(_refuse)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("the prompt list is empty")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ParamError("best_of other than n is not supported", "best_of")
        return self

    def _more_sampling(self) -> dict[str, Any]:
        return {"logprobs": True, "top_logprobs": self.logprobs} if self.logprobs is not None else {}


# ---- the book's /chat ------------------------------------------------------------------------------------------------
class BookChatRequest(_Request):
    """The book's contract: {"query", "history" (a list of {role, content} or [query, answer] pairs, or "")}."""

    query: str = Field(min_length=1)
    history: list[dict[str, Any] | list[Any]] | Literal[""] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    max_length: int | None = Field(None, ge=1, description="ChatGLM style: prompt + new tokens")
    seed: Seed | None = None

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str):
        if not value.strip():
            raise ValueError("'query' must be a non-empty string")
        return value

    tokens_param: ClassVar[str] = "max_new_tokens"

    def _more_sampling(self) -> dict[str, Any]:
        return {"max_length": self.max_length} if self.max_length else {}


# ---- responses: what the routes send ---------------------------------------------------------------------------------
class ResponseModel(BaseModel):
    """A response model: the fields named in `omitted` are left out of the JSON while None (OpenAI omits them)."""

    omitted: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        data = handler(self)
        for name in self.omitted:
            if data.get(name, 0) is None:
                del data[name]
        return data

    def sse(self) -> str:
        """This model as one server-sent event."""
        return f"data: {self.model_dump_json()}\n\n"


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(ResponseModel):
    content: list[TokenLogprobOut] | None = None
    refusal: list[TokenLogprobOut] | None = None


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(ResponseModel):
    omitted = frozenset({"tool_calls"})
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(ResponseModel):
    omitted = frozenset({"catdog"})
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    catdog: dict[str, Any] | None = Field(
        None, description="extension: truncated_messages (older turns left out to fit), tool_steps (--classifier)"
    )


class ToolCallDeltaFunction(ResponseModel):
    omitted = frozenset({"name", "arguments"})
    name: str | None = None
    arguments: str | None = None


class ToolCallDeltaOut(ResponseModel):
    omitted = frozenset({"id", "type"})
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ToolCallDeltaFunction


class ChunkDelta(ResponseModel):
    omitted = frozenset({"role", "content", "tool_calls"})
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaOut] | None = None


class ChunkChoice(ResponseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(ResponseModel):
    """One `data:` event of a stream (then `data: [DONE]`); an error mid-stream is `data: {"error": {...}}`."""

    omitted = frozenset({"usage", "catdog"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, description="only in the last chunk, with stream_options.include_usage")
    catdog: dict[str, Any] | None = Field(None, description="extension: tool_step, a classify_image step run")


class CompletionLogprobs(ResponseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(ResponseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(ResponseModel):
    """A text_completion; streamed, each chunk is one too (usage only in the last, with include_usage)."""

    omitted = frozenset({"usage"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "catdog"


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class BookChatResponse(ResponseModel):
    response: str
    history: list[dict[str, Any]]
    status: int = 200
    time: str
    truncated_messages: int = 0


class BookError(ResponseModel):
    error: str


_SamplingFields.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
