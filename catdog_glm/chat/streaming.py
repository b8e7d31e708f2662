"""Running a generation on a worker thread and reading its pieces from async code.

The engine is synchronous (it holds a lock and decodes token by token); servers must not block their event loop
on it. A worker thread drives the generation and hands pieces over through a queue; whoever stops listening
(a client that disconnects, a timeout, a Stop button) calls `cancel()`, and the worker ends within a token and
releases the engine for the next request.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator

from catdog_glm.chat.engine import ChatEngine, Generation

_DONE = object()


class BackgroundGeneration:
    """Created inside a running event loop, it feeds `pieces()` (async); created elsewhere, plain iteration."""

    def __init__(self, engine: ChatEngine, messages, **sampling):
        self.generation: Generation = engine.stream(messages, **sampling)  # validates sampling here
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._aqueue: asyncio.Queue = asyncio.Queue()  # no executor thread parked per waiting client
        except RuntimeError:
            self._loop = None
        self._queue: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _emit(self, item) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aqueue.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
                self.cancel()
        else:
            self._queue.put(item)

    def _work(self) -> None:
        try:
            for piece in self.generation:
                self._emit(piece)
        except BaseException as e:  # handed to the reader, which raises it
            self.error = e
        finally:
            self._emit(_DONE)

    @property
    def reply(self):
        return self.generation.reply

    def cancel(self) -> None:
        self.generation.cancel()

    def __iter__(self) -> Iterator[str]:
        try:
            while (item := self._queue.get()) is not _DONE:
                yield item
            if self.error:
                raise self.error
        finally:
            self.cancel()

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces as they come; when it ends, `reply` is set (the worker sets it before signalling the end)."""
        try:
            while (item := await self._aqueue.get()) is not _DONE:
                yield item
            if self.error:
                raise self.error
        finally:
            self.cancel()  # a disconnect or timeout lands here: stop generating for nobody
