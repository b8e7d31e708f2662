"""One chat engine for every front end: `chat()` for a whole reply, `stream()` for text pieces (`stream_text()` for a
plain-text prompt, no chat template), `cancel()`.

Every request goes through one scheduler (chat/scheduler.py) that owns the model and batches all active requests
in each forward step; this module turns messages into prompt ids (reporting conversations cut to fit the context
window), hands them to the scheduler and gives the caller a `Generation` to read: iterate it in a thread, or
`async for` it when it was created inside an event loop (pieces then arrive through `call_soon_threadsafe`);
`chunks()` / `iter_chunks()` give `Piece`s that carry the pieces' token logprobs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from catdog_glm.chat.constrained import Constraint
from catdog_glm.chat.loading import ChatModel
from catdog_glm.chat.messages import content_text, normalize_messages
from catdog_glm.chat.sampling import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    Sampling,
)
from catdog_glm.chat.scheduler import EngineClosedError, Reply, Request, Scheduler, default_limits
from catdog_glm.chat.streaming import END, LoopInbox, Piece, ThreadInbox, TokenLogprob
from catdog_glm.chat.tools import ContentDelta
from catdog_glm.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_P",
    "ChatEngine",
    "Constraint",
    "EngineClosedError",
    "Generation",
    "Piece",
    "Reply",
    "Sampling",
    "TokenLogprob",
    "load_engine",
    "normalize_messages",
]


class Generation:
    """A reply being generated: iterate it (or `async for` it, when created inside an event loop) for text pieces;
    `cancel()` frees its place in the batch within one step; when the pieces end, `reply` is set (or `error`).

    The text pieces, `text()` and `reply` are the reply as a user reads it: the model's format applied (ChatGLM3's
    metadata line stripped, tool calls taken out into `reply.tool_calls`). `chunks()` / `iter_chunks()` give the
    raw pieces with their logprobs; a reader of those gets the same content and calls by passing each piece's text
    to `deltas()` and ending with `final_deltas()`."""

    def __init__(self, scheduler: Scheduler, request: Request, parser=None):
        self._scheduler, self._request = scheduler, request
        self.parser = parser
        self._fed = False  # whether a reader has passed pieces to the parser
        self._parsed: Reply | None = None

    def cancel(self) -> None:
        self._scheduler.cancel(self._request)

    @property
    def cancelled(self) -> bool:
        return self._request.cancelled

    @property
    def reply(self) -> Reply | None:
        """The finished reply (None before): `text` is its content, `tool_calls` the calls the model made; a call cut
        by the token limit is in neither (finish_reason "length")."""
        raw = self._request.reply
        if raw is None or self.parser is None:
            return raw
        if self._parsed is None:
            if not self._fed:
                self.deltas(raw.text)
            self.final_deltas()
            p = self.parser
            self._parsed = dataclasses.replace(raw, text=p.content or "", tool_calls=list(p.tool_calls))
        return self._parsed

    def deltas(self, text: str) -> list:
        """Content and tool-call deltas (chat/tools.py) that this raw text completes, read in the model's format."""
        if self.parser is None:
            return [ContentDelta(text)] if text else []
        self._fed = True
        return self.parser.feed(text) if text else []

    def final_deltas(self) -> list:
        """What the parser held back, once the raw pieces have ended."""
        if self.parser is None:
            return []
        raw = self._request.reply
        return self.parser.finish(cut=raw is not None and raw.finish_reason == "length")

    @property
    def error(self) -> BaseException | None:
        return self._request.error

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far (live)."""
        return len(self._request.generated)

    def iter_chunks(self) -> Iterator[Piece]:
        """Pieces with their tokens' logprobs (empty unless the request asked), read from a thread; the last may
        have text "" and carry leftover tokens."""
        inbox = self._request.inbox
        if not isinstance(inbox, ThreadInbox):
            raise TypeError("this generation was started inside an event loop: read it with `async for`")
        try:
            while (item := inbox.get()) is not END:
                yield item if isinstance(item, Piece) else Piece(item)
            if self._request.error is not None:
                raise self._request.error
        finally:
            if not self._request.finished:
                self.cancel()  # the reader stopped early (break, Ctrl-C, closed page)

    async def chunks(self) -> AsyncIterator[Piece]:
        """`iter_chunks()` for code in the event loop that created the generation."""
        inbox = self._request.inbox
        if not isinstance(inbox, LoopInbox):
            raise TypeError("this generation was started outside an event loop: iterate it with `for`")
        try:
            while (item := await inbox.get()) is not END:
                yield item if isinstance(item, Piece) else Piece(item)
            if self._request.error is not None:
                raise self._request.error
        finally:
            if not self._request.finished:
                self.cancel()  # a disconnect or timeout lands here: stop generating for nobody

    def __iter__(self) -> Iterator[str]:
        chunks = self.iter_chunks()
        try:
            for piece in chunks:
                yield from _texts(self.deltas(piece.text))
            yield from _texts(self.final_deltas())
        finally:
            chunks.close()  # at once, so a reader that stops early cancels the generation

    async def pieces(self) -> AsyncIterator[str]:
        chunks = self.chunks()
        try:
            async for piece in chunks:
                for text in _texts(self.deltas(piece.text)):
                    yield text
            for text in _texts(self.final_deltas()):
                yield text
        finally:
            await chunks.aclose()  # an async generator left to the loop's finalizer would cancel only later

    def __aiter__(self) -> AsyncIterator[str]:
        return self.pieces()

    def text(self) -> str:
        return "".join(self)


def _texts(deltas) -> list[str]:
    """The content text of parser deltas (a plain reader shows content; tool calls are in `reply.tool_calls`)."""
    return [d.text for d in deltas if isinstance(d, ContentDelta) and d.text]


class ChatEngine:
    """The one engine over a loaded model. `max_batch_size` / `max_batch_tokens` (KV cache tokens reserved by all
    running requests together) default to what `scheduler.default_limits` measures for the model's device."""

    def __init__(
        self, chat_model: ChatModel, *, max_batch_size: int | None = None, max_batch_tokens: int | None = None
    ):
        self.model = chat_model
        size, tokens = default_limits(chat_model) if not (max_batch_size and max_batch_tokens) else (0, 0)
        self._scheduler = Scheduler(
            chat_model, max_batch_size=max_batch_size or size, max_batch_tokens=max_batch_tokens or tokens
        )
        # fast tokenizers are not safe to use from two threads at once: prompts are encoded in the callers'
        # threads and replies decoded in the scheduler's
        self._tokenizer_lock = threading.Lock()

    # ---- public API ---------------------------------------------------------------------------------------------
    def stream(
        self,
        messages,
        *,
        tools: list | None = None,
        continue_final: bool = False,
        constraint: Constraint | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        parallel_tool_calls: bool = True,
        **sampling,
    ) -> Generation:
        """Queue a reply to `messages` and return at once; the scheduler starts it when the batch has room.
        `tools` (OpenAI function specs) go into the prompt in the model's tool format; `continue_final` continues
        the last (assistant) message instead of starting a new one; `constraint` is a grammar the reply must match.
        `parallel_tool_calls=False`: only the reply's first call counts.
        `loop`: the event loop that will read the pieces (`async for`), for a caller that runs this in a worker
        thread (encoding a long conversation or compiling a grammar would block its loop); by default the running
        loop if there is one, else the pieces are read in a thread.
        Anything wrong with the request raises ConfigError here, before it is queued."""
        s = self._sampling(sampling)
        m = self.model
        budget = m.context_window - min(s.max_new_tokens, m.context_window // 2)
        options = {"tools": tools, "continue_final": continue_final} if tools or continue_final else {}
        prompt, dropped = self.fit(normalize_messages(messages), budget, **options)
        parser = m.format.parser(tools, parallel=parallel_tool_calls, continued=continue_final)
        return self._submit(prompt, s, constraint, dropped, loop, parser)

    def stream_text(
        self,
        prompt: str,
        *,
        constraint: Constraint | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        **sampling,
    ) -> Generation:
        """Queue a continuation of plain text `prompt` (no chat template: /v1/completions); `loop` as in stream()."""
        s = self._sampling(sampling)
        m = self.model
        if m.encode_text is None:
            raise ConfigError(f"{m.name} has no plain-text encoder")
        if not isinstance(prompt, str):
            raise ConfigError(f"the prompt must be a string, got {type(prompt).__name__}")
        text = content_text(prompt, "the prompt")
        with self._tokenizer_lock:
            ids = list(m.encode_text(text))
        if not ids:
            raise ConfigError("the prompt is empty")
        budget = m.context_window - min(s.max_new_tokens, m.context_window // 2)
        if len(ids) > budget:
            raise ConfigError(
                f"the prompt is {len(ids)} tokens, more than the {budget} the context window leaves; shorten it "
                "or lower max_tokens"
            )
        return self._submit(ids, s, constraint, 0, loop, decode=self._decode_after(ids[-1]))

    def chat(self, messages, **options) -> Reply:
        """The whole reply (`options`: those of `stream()`)."""
        generation = self.stream(messages, **options)
        generation.text()
        return generation.reply  # the content as a user reads it (the model's format applied)

    def info(self) -> dict:
        m = self.model
        return {
            "name": m.name,
            "source": m.source,
            "kind": m.kind,
            "parameters": m.parameters,
            "dtype": str(m.dtype).replace("torch.", ""),
            "device": str(m.device),
            "quantization": m.quantization,
            "context_window": m.context_window,
            "sampling_defaults": self.sampling_defaults(),
            "weight_mib": round(m.info.get("weight_bytes", 0) / 2**20, 1),
            "max_batch_size": self._scheduler.max_batch_size,
            "max_batch_tokens": self._scheduler.max_batch_tokens,
        }

    def load(self) -> dict:
        """Requests running in the batch and waiting for a place."""
        return self._scheduler.counts()

    def close(self, *, wait: bool = True) -> None:
        """End every queued and running request (their readers get EngineClosedError) and stop the scheduler;
        `wait=False` returns at once (safe in a signal handler), the requests end within one step."""
        self._scheduler.close(timeout=30.0 if wait else 0.0)

    # ---- internals ------------------------------------------------------------------------------------------------
    def sampling_defaults(self) -> dict:
        """What a request that sets nothing samples with: the model's own defaults over chat/sampling.py's."""
        base = Sampling()
        out = {k: getattr(base, k) for k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")}
        return out | self.model.sampling_defaults

    def _sampling(self, options: dict) -> Sampling:
        """The request's options over the model's defaults (an option given as None is not set)."""
        given = {k: v for k, v in options.items() if v is not None}
        try:
            sampling = Sampling(**{**self.model.sampling_defaults, **given})
        except TypeError as e:
            raise ConfigError(f"unknown sampling option: {e}") from None
        return sampling.validate(vocab_size=self._vocab_size())

    def _vocab_size(self) -> int | None:
        """Width of the model's logits rows (the ids logit_bias may name)."""
        config = getattr(self.model.model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            config = config.get_text_config()
        size = getattr(config, "vocab_size", None)
        if size is None:
            tokenizer = self.model.tokenizer
            size = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
        return int(size) if size else None

    def _submit(
        self,
        prompt: list[int],
        s: Sampling,
        constraint: Constraint | None,
        dropped: int,
        loop=None,
        parser=None,
        decode: Callable[[list[int]], str] | None = None,
    ) -> Generation:
        m = self.model
        limit = s.max_new_tokens
        if s.max_length:
            limit = min(limit, s.max_length - len(prompt))
        limit = max(0, min(limit, m.context_window - len(prompt)))
        state = token_bytes = None
        if constraint is not None or s.wants_logprobs:
            from catdog_glm.chat import constrained

            with self._tokenizer_lock:  # reading an HF tokenizer's vocabulary copies its Rust object
                if constraint is not None:
                    state = constrained.compile(m, constraint).start()
                if s.wants_logprobs:
                    token_bytes = constrained.token_bytes_of(m)
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
        inbox = LoopInbox(loop) if loop is not None else ThreadInbox()
        request = Request(
            prompt,
            limit,
            s,
            stop_ids=m.stop_ids,
            decode=decode or self._decode,
            inbox=inbox,
            truncated_messages=dropped,
            constraint=state,
            token_bytes=token_bytes,
        )
        self._scheduler.submit(request)
        return Generation(self._scheduler, request, parser)

    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.model.decode(ids)

    def _decode_after(self, anchor: int) -> Callable[[list[int]], str]:
        """`_decode` for a continuation of text that ends in token `anchor`. SentencePiece drops the leading space of
        a text's first piece ("▁is" alone decodes to "is"), so a continuation decoded alone would lose the space its
        tokens spell; decoded after the prompt's last token, it keeps it (" is"), as the logprobs' tokens show it."""
        head = self._decode([anchor])
        if not head or "\ufffd" in head:
            return self._decode  # half a character: no clean place to cut after it

        def decode(ids: list[int]) -> str:
            text = self._decode([anchor, *ids])
            return text[len(head) :] if text.startswith(head) else self._decode(ids)

        return decode

    def _encode(self, messages: list[dict], **options) -> list[int]:
        with self._tokenizer_lock:
            try:
                return self.model.encode_chat(messages, **options)
            except UnicodeError as e:
                raise ConfigError(f"the conversation cannot be encoded: {e}") from None

    def fit(self, messages: list[dict], budget: int, **options) -> tuple[list[int], int]:
        """Prompt ids within `budget` tokens: drop the oldest turns (never the system message, never the last).
        Returns ids, drops. `options` (tools, continue_final) go to the model's `encode_chat`.
        The fewest turns to drop are found by bisection (a prompt only shrinks as turns go): a few encodes of the
        conversation instead of one per dropped turn, which for 64 long messages took seconds."""
        messages = list(messages)
        if not messages:
            raise ConfigError("there are no messages to reply to")
        ids = self._encode(messages, **options)
        if len(ids) <= budget:
            return ids, 0
        removable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]

        def without(count: int) -> list[dict]:
            gone = set(removable[:count])
            return [m for i, m in enumerate(messages) if i not in gone]

        def too_long(tokens: int) -> ConfigError:
            parts = ["the last message"]
            if any(m["role"] == "system" for m in messages[:-1]):
                parts.append("the system message")
            if options.get("tools"):
                parts.append("the tool definitions")
            what = " alone" if len(parts) == 1 else " with " + " and ".join(parts[1:])
            return ConfigError(
                f"the last message{what} is {tokens} tokens, more than the {budget} the context "
                "window leaves; shorten it or lower max_new_tokens"
            )

        def encoded(count: int) -> list[int] | None:
            try:
                return self._encode(without(count), **options)
            except ConfigError:
                return None  # the template refused this cut (Qwen3's wants a user message)

        if not removable:
            raise too_long(len(ids))
        shortest = encoded(len(removable))
        if shortest is not None and len(shortest) > budget:
            raise too_long(len(shortest))
        # invariant: dropping `high` turns fits and `fitting` is that prompt; dropping fewer than `low` does not fit
        low, high, fitting = 1, len(removable), shortest
        while fitting is not None and low < high:
            middle = (low + high) // 2
            candidate = encoded(middle)
            if candidate is None:
                fitting = None
            elif len(candidate) <= budget:
                high, fitting = middle, candidate
            else:
                low = middle + 1
        if fitting is None:  # a cut was refused: one turn at a time, as before (a refusal on the way is the answer)
            for high in range(1, len(removable) + 1):
                fitting = self._encode(without(high), **options)
                if len(fitting) <= budget:
                    break
            else:
                raise too_long(len(fitting))
        log.warning(
            "conversation too long for the %d-token context: dropped the %d oldest message(s)",
            self.model.context_window,
            high,
        )
        return fitting, high


def load_engine(
    spec: str | None = None,
    *,
    quantize: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    max_batch_size: int | None = None,
    max_batch_tokens: int | None = None,
    use_cache: bool = True,
) -> ChatEngine:
    """The engine factory every front end uses: load `spec` (None = the embedded default) and wrap it.
    `on_progress(done, total)` is called per weight shard, so a caller can draw its own progress; `use_cache=False`
    neither reads nor writes the cache of quantized conversions."""
    from catdog_glm.chat.loading import load_chat_model

    chat_model = load_chat_model(
        spec,
        dtype=dtype,
        device=device,
        quantize=quantize,
        trust_remote_code=trust_remote_code,
        on_progress=on_progress,
        use_cache=use_cache,
    )
    return ChatEngine(chat_model, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens)
