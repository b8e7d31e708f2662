"""One chat engine for every front end: `chat()` for a whole reply, `stream()` for text pieces, `cancel()`.

Every request goes through one scheduler (chat/scheduler.py) that owns the model and batches all active requests
in each forward step; this module turns messages into prompt ids (reporting conversations cut to fit the context
window), hands them to the scheduler and gives the caller a `Generation` to read: iterate it in a thread, or
`async for` it when it was created inside an event loop (pieces then arrive through `call_soon_threadsafe`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from catdog_glm.chat.loading import ChatModel
from catdog_glm.chat.sampling import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    Sampling,
)
from catdog_glm.chat.scheduler import EngineClosedError, Reply, Request, Scheduler, default_limits
from catdog_glm.chat.streaming import END, LoopInbox, ThreadInbox
from catdog_glm.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_P",
    "ChatEngine",
    "EngineClosedError",
    "Generation",
    "Reply",
    "Sampling",
    "load_engine",
    "normalize_messages",
]


def normalize_messages(history) -> list[dict]:
    """ChatGLM3-style [{"role", "content"}] or the book's [[query, answer], ...] pairs -> messages."""
    messages: list[dict] = []
    for item in history or []:
        if isinstance(item, dict):
            if "role" not in item or "content" not in item:
                raise ConfigError("each message needs a 'role' and a 'content'")
            messages.append({"role": str(item["role"]), "content": str(item["content"])})
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            query, answer = item
            messages += [{"role": "user", "content": str(query)}, {"role": "assistant", "content": str(answer)}]
        else:
            raise ConfigError(f"cannot read history item {item!r}: use {{'role', 'content'}} or [query, answer]")
    return messages


class Generation:
    """A reply being generated: iterate it (or `async for` it, when created inside an event loop) for text pieces;
    `cancel()` frees its place in the batch within one step; when the pieces end, `reply` is set (or `error`)."""

    def __init__(self, scheduler: Scheduler, request: Request):
        self._scheduler, self._request = scheduler, request

    def cancel(self) -> None:
        self._scheduler.cancel(self._request)

    @property
    def cancelled(self) -> bool:
        return self._request.cancelled

    @property
    def reply(self) -> Reply | None:
        return self._request.reply

    @property
    def error(self) -> BaseException | None:
        return self._request.error

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far (live)."""
        return len(self._request.generated)

    def __iter__(self) -> Iterator[str]:
        inbox = self._request.inbox
        if not isinstance(inbox, ThreadInbox):
            raise TypeError("this generation was started inside an event loop: read it with `async for`")
        try:
            while (item := inbox.get()) is not END:
                yield item
            if self._request.error is not None:
                raise self._request.error
        finally:
            if not self._request.finished:
                self.cancel()  # the reader stopped early (break, Ctrl-C, closed page)

    async def pieces(self) -> AsyncIterator[str]:
        inbox = self._request.inbox
        if not isinstance(inbox, LoopInbox):
            raise TypeError("this generation was started outside an event loop: iterate it with `for`")
        try:
            while (item := await inbox.get()) is not END:
                yield item
            if self._request.error is not None:
                raise self._request.error
        finally:
            if not self._request.finished:
                self.cancel()  # a disconnect or timeout lands here: stop generating for nobody

    def __aiter__(self) -> AsyncIterator[str]:
        return self.pieces()

    def text(self) -> str:
        return "".join(self)


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
    def stream(self, messages, **sampling) -> Generation:
        """Queue a reply to `messages` and return at once; the scheduler starts it when the batch has room."""
        s = Sampling(**sampling).validate()
        m = self.model
        budget = m.context_window - min(s.max_new_tokens, m.context_window // 2)
        prompt, dropped = self.fit(normalize_messages(messages), budget)
        limit = s.max_new_tokens
        if s.max_length:
            limit = min(limit, s.max_length - len(prompt))
        limit = max(0, min(limit, m.context_window - len(prompt)))
        try:
            inbox = LoopInbox(asyncio.get_running_loop())
        except RuntimeError:
            inbox = ThreadInbox()
        request = Request(
            prompt, limit, s, stop_ids=m.stop_ids, decode=self._decode, inbox=inbox, truncated_messages=dropped
        )
        self._scheduler.submit(request)
        return Generation(self._scheduler, request)

    def chat(self, messages, **sampling) -> Reply:
        generation = self.stream(messages, **sampling)
        generation.text()
        return generation.reply

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
    def _decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.model.decode(ids)

    def _encode(self, messages: list[dict]) -> list[int]:
        with self._tokenizer_lock:
            return self.model.encode_chat(messages)

    def fit(self, messages: list[dict], budget: int) -> tuple[list[int], int]:
        """Prompt ids within `budget` tokens: drop the oldest turns (never the system message). Returns ids, drops."""
        messages = list(messages)
        dropped = 0
        ids = self._encode(messages)
        while len(ids) > budget:
            removable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
            if not removable:
                raise ConfigError(
                    f"the last message alone is {len(ids)} tokens, more than the {budget} the context "
                    "window leaves; shorten it or lower max_new_tokens"
                )
            del messages[removable[0]]
            dropped += 1
            ids = self._encode(messages)
        if dropped:
            log.warning(
                "conversation too long for the %d-token context: dropped the %d oldest message(s)",
                self.model.context_window,
                dropped,
            )
        return ids, dropped


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
