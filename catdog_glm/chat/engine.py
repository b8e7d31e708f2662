"""One chat engine for every front end: `chat()` for a whole reply, `stream()` for text pieces.

The decoding loop is written here rather than delegated to `generate()` because every front end needs the same
things generate() does not give together: ChatGLM3's stop ids and multi-token stop strings never emitted in part,
a cancel handle checked between tokens, truncation of over-long conversations that is reported, and exact token
counts for the OpenAI API. The model forward, KV cache and chat templates are transformers' own.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from catdog_glm.chat.loading import ChatModel
from catdog_glm.errors import ConfigError

log = logging.getLogger(__name__)

# ChatGLM3's demos sample with top_p 0.8, temperature 0.8.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.8
DEFAULT_MAX_NEW_TOKENS = 512


@dataclass
class Sampling:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_length: int | None = None  # ChatGLM style: prompt + new tokens
    temperature: float = DEFAULT_TEMPERATURE  # 0 = greedy
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> Sampling:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ConfigError("top_k must be >= 0 and repetition_penalty > 0")
        return self


@dataclass
class Reply:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    truncated_messages: int = 0  # oldest turns dropped to fit the context window
    token_ids: list[int] = field(default_factory=list)  # the completion's ids, stop token excluded


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
    """An in-progress reply: iterate it for text pieces; `cancel()` stops it within a token; then read `reply`."""

    def __init__(self, engine: ChatEngine, messages: list[dict], sampling: Sampling):
        self._engine, self._messages, self._sampling = engine, messages, sampling
        self._cancel = threading.Event()
        self.reply: Reply | None = None

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[str]:
        return self._engine._run(self)

    def text(self) -> str:
        return "".join(self)


class ChatEngine:
    def __init__(self, chat_model: ChatModel):
        self.model = chat_model
        self._lock = threading.Lock()  # one generation at a time; concurrent callers queue here

    # ---- public API ---------------------------------------------------------------------------------------------
    def stream(self, messages, **sampling) -> Generation:
        return Generation(self, normalize_messages(messages), Sampling(**sampling).validate())

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
        }

    # ---- internals ------------------------------------------------------------------------------------------------
    def fit(self, messages: list[dict], budget: int) -> tuple[list[int], int]:
        """Prompt ids within `budget` tokens: drop the oldest turns (never the system message). Returns ids, drops."""
        messages = list(messages)
        dropped = 0
        ids = self.model.encode_chat(messages)
        while len(ids) > budget:
            removable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
            if not removable:
                raise ConfigError(
                    f"the last message alone is {len(ids)} tokens, more than the {budget} the context "
                    "window leaves; shorten it or lower max_new_tokens"
                )
            del messages[removable[0]]
            dropped += 1
            ids = self.model.encode_chat(messages)
        if dropped:
            log.warning(
                "conversation too long for the %d-token context: dropped the %d oldest message(s)",
                self.model.context_window,
                dropped,
            )
        return ids, dropped

    def _sample(self, logits, history_ids, s: Sampling, generator):
        import torch

        logits = logits.float()
        if s.repetition_penalty != 1.0 and history_ids:
            seen = torch.tensor(sorted(set(history_ids)), dtype=torch.long)
            values = logits[seen]
            logits[seen] = torch.where(values > 0, values / s.repetition_penalty, values * s.repetition_penalty)
        if s.temperature == 0:
            return int(logits.argmax())
        logits = logits / s.temperature
        if s.top_k:
            kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
            logits[logits < kth] = float("-inf")
        probs = logits.softmax(-1)
        if s.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < s.top_p  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=generator))

    def _run(self, generation: Generation) -> Iterator[str]:
        import torch

        s, m = generation._sampling, self.model
        with self._lock:
            budget = m.context_window - min(s.max_new_tokens, m.context_window // 2)
            prompt, dropped = self.fit(generation._messages, budget)
            limit = s.max_new_tokens
            if s.max_length:
                limit = min(limit, s.max_length - len(prompt))
            limit = max(0, min(limit, m.context_window - len(prompt)))
            generator = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
            generated: list[int] = []
            emitted = ""
            finish = "length"
            with torch.inference_mode():
                from transformers import DynamicCache

                cache = DynamicCache()
                # transformers 5.x renamed forward's `past_key_values` to `cache`; accept either.
                cache_arg = "cache" if "cache" in inspect.signature(m.model.forward).parameters else "past_key_values"
                step_input = torch.tensor([prompt], device=m.device)
                for _ in range(limit):
                    if generation.cancelled:
                        finish = "cancelled"
                        break
                    out = m.model(input_ids=step_input, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
                    token = self._sample(out.logits[0, -1], prompt + generated, s, generator)
                    if token in m.stop_ids:
                        finish = "stop"
                        break
                    generated.append(token)
                    step_input = torch.tensor([[token]], device=m.device)
                    text = m.decode(generated)
                    hit = min((i for i in (text.find(x) for x in s.stop) if i >= 0), default=-1)
                    if hit >= 0:
                        text, finish = text[:hit], "stop"
                    safe = len(text) if finish == "stop" else _safe_length(text, s.stop)
                    if safe > len(emitted):
                        piece, emitted = text[len(emitted) : safe], text[:safe]
                        yield piece
                    if finish == "stop":
                        break
            if finish == "length":  # flush what a stop-string prefix held back
                text = m.decode(generated)
                if len(text) > len(emitted) and not text.endswith("\ufffd"):
                    yield text[len(emitted) :]
                    emitted = text
        generation.reply = Reply(
            text=emitted,
            finish_reason=finish,
            prompt_tokens=len(prompt),
            completion_tokens=len(generated),
            truncated_messages=dropped,
            token_ids=generated,
        )


def load_engine(
    spec: str | None = None,
    *,
    quantize: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> ChatEngine:
    """The engine factory every front end uses: load `spec` (None = the embedded default) and wrap it.
    `on_progress(done, total)` is called per weight shard, so a caller can draw its own progress."""
    from catdog_glm.chat.loading import load_chat_model

    chat_model = load_chat_model(
        spec,
        dtype=dtype,
        device=device,
        quantize=quantize,
        trust_remote_code=trust_remote_code,
        on_progress=on_progress,
    )
    return ChatEngine(chat_model)


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of `text` can be shown: hold back a partial UTF-8 character and any tail that could start a stop
    string, so a stop string is never emitted in part."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for stop in stops:
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:n]):
                end = min(end, len(text[:end]) - n)
                break
    return end
