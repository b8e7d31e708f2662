"""From token ids to the text pieces a client sees, and from the model thread to whoever reads them.

- `IncrementalDetokenizer` decodes a short window per token (the approach of TGI and vLLM), not the whole reply
  again at every token: constant work per token instead of quadratic, and never half of a UTF-8 character.
- `StopStrings` finds stop strings across piece boundaries and holds back any tail that could start one, so a stop
  string is never emitted in part; its work per piece is bounded by the longest stop string.
- `Piece` and `TokenLogprob`: for requests that asked for logprobs, each piece carries the tokens whose text it holds.
- `ThreadInbox` and `LoopInbox` carry pieces from the scheduler's thread to a reader: a blocking queue for a plain
  thread, or one `loop.call_soon_threadsafe` per piece into an `asyncio.Queue` for async code; nothing polls.
"""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Callable
from dataclasses import dataclass, field

END = object()  # the last item of every inbox: the reply (or error) is set before it is sent


@dataclass
class TokenLogprob:
    """One completion token's log-probability under the model's raw distribution (log_softmax of its logits, before
    penalties, masks and temperature: vLLM's default "raw" mode), and the `top` most likely tokens at that step as
    (text, logprob, bytes). `token` is the token's own text (its bytes decoded with errors="replace")."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]] = field(default_factory=list)


@dataclass
class Piece:
    """A piece of text and the tokens whose text is in it (tokens held back by a stop string or half a UTF-8
    character ride with the next piece; the last piece may have text "" and carry the leftovers)."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # window start: a few tokens of context so spaces and merges decode as in the full text
        self._read = 0  # tokens already turned into text

    def push(self, token: int) -> str:
        """The new text that `token` completes ('' while it only adds part of a character)."""
        self.ids.append(token)
        done = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(done) :]
        return ""


class StopStrings:
    def __init__(self, stops: list[str]):
        self._stops = list(stops)
        self._pending = ""  # decoded text not yet shown: it may be the start of a stop string

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to show, whether a stop string was reached). After a stop, the rest is dropped."""
        if not self._stops:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(stop[:n]):
                    hold = n
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        """At the end of a reply that did not stop on a stop string: what was held back."""
        out, self._pending = self._pending, ""
        return out


class ThreadInbox:
    """Pieces for a reader in a plain thread (the terminal chat, the Gradio and Streamlit pages)."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, item) -> bool:
        self._queue.put(item)
        return True

    def get(self):
        return self._queue.get()


class LoopInbox:
    """Pieces for a coroutine on `loop`: one thread-safe hop per piece, the reader awaits an asyncio.Queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> bool:
        """False when the loop is gone (server shutting down): nobody is listening any more."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            return False
        return True

    async def get(self):
        return await self._queue.get()
