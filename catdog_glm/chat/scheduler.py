"""The one loop that owns the model: at every step one batched forward for every active request.

Requests wait in a FIFO queue and join the batch between steps while it has room (`max_batch_size` requests,
`max_batch_tokens` tokens of KV cache reserved: prompt + the most new tokens each may make, so a running request
never runs out of cache); each step prefills the newcomers and decodes one token for every running request in the
same forward, samples every row with that request's own settings and hands each request its text pieces.
A cancelled request leaves at the next step; a finished one at once.

Why our own loop and not transformers' `ContinuousBatchingManager` (transformers 5.24, torch 2.14, measured here on
the embedded SmolLM2 with one thread, 32 greedy tokens per request): it runs our int4 layers and its greedy tokens
match this loop's, and it is no faster (fp32: 7.7 tok/s alone, 33.9 tok/s for 16 requests, against 7.5 and 39.4 here;
int4: 9.9 and 32.0 against 14.1 and 35.9). But it samples with one global generation config: only temperature,
top-k and top-p can vary per request; no per-request seed, repetition penalty, or greedy and sampled requests side
by side, and it does not hand out logits, so none of that can be added around it. Those are what the API promises.

How the batch is formed: all new tokens of all requests are packed into one row ([1, total tokens], each token
with its own position id), so every Linear layer (where a CPU spends its time, reading the weights) runs once for
the whole batch. Attention is computed per request, against that request's own KV cache, through transformers'
own SDPA function, registered as an attention implementation. Per-request attention (rather than one left-padded
[batch, length] tensor with a mask) means a request's attention sees exactly the same tensors whatever else is in
the batch, with no padding and no re-padding when requests join or leave; only the Linear layers' matrix
products see a different number of rows, and BLAS kernels may round those differently for different row counts
(measured: differences of a few 1e-6 on fp32 values of size 1), which can flip a greedy choice only where the
two best logits nearly tie.
Models that do not support transformers' attention interface (remote code) are run one request per forward.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from catdog_glm.chat.sampling import Sampling, TokenSampler
from catdog_glm.chat.streaming import END, IncrementalDetokenizer, Piece, StopStrings, TokenLogprob
from catdog_glm.errors import ConfigError

log = logging.getLogger(__name__)

LEAN_DECODER_ENV = "CATDOG_LEAN_DECODER"  # "0": step through transformers' modules (comparisons, a suspected bug)
IDLE_EXIT_S = 10.0  # an idle scheduler's thread ends (and restarts on the next request): a dropped engine is freed
PACKED_ATTENTION = "catdog_packed"


class EngineClosedError(RuntimeError):
    """The engine was shut down (server stopping) before this request finished."""


@dataclass
class Reply:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    truncated_messages: int = 0  # oldest turns dropped to fit the context window
    token_ids: list[int] = field(default_factory=list)  # the completion's ids, stop token excluded
    logprobs: list[TokenLogprob] | None = None  # one per completion token, when the request asked for them
    tool_calls: list[dict] = field(default_factory=list)  # OpenAI-shaped calls (set by the engine's Generation)


LOGPROB_FLOOR = -9999.0  # what -inf logprobs are reported as (vLLM's convention; JSON has no infinity)


class Request:
    """One generation as the scheduler sees it. `inbox` receives text pieces (str; `Piece`s when the request wants
    logprobs), then END (after `reply`/`error`). `constraint`: a ConstraintState (chat/constrained.py) whose mask
    applies to every token; `token_bytes`: id -> bytes, needed for logprobs."""

    def __init__(
        self,
        prompt: list[int],
        limit: int,
        sampling: Sampling,
        *,
        stop_ids,
        decode: Callable[[list[int]], str],
        inbox,
        truncated_messages: int = 0,
        constraint=None,
        token_bytes: Callable[[int], bytes] | None = None,
    ):
        self.prompt, self.limit, self.sampling, self.inbox = prompt, limit, sampling, inbox
        self.constraint = constraint
        self.token_bytes = token_bytes
        self.stop_ids = frozenset(stop_ids)
        self.truncated_messages = truncated_messages
        self.sampler = TokenSampler(sampling, prompt)
        self.detokenizer = IncrementalDetokenizer(decode)
        self.stops = StopStrings(sampling.stop)
        self.generated: list[int] = []
        self.pieces: list[str] = []
        self.cancelled = False
        self.reply: Reply | None = None
        self.error: BaseException | None = None
        self.kv: Any = None  # SequenceKV (packed batches) or a DynamicCache (one request per forward)
        self.wants_logprobs = sampling.wants_logprobs
        if self.wants_logprobs and token_bytes is None:
            raise ValueError("a request that wants logprobs needs token_bytes")
        self.logprobs: list[TokenLogprob] | None = [] if self.wants_logprobs else None
        self._unsent: list[TokenLogprob] = []  # logprobs of tokens whose text has not been sent yet
        # rows that take the batch's shared argmax: greedy, no penalty or bias, no constraint
        self.plain_greedy = self.sampler.plain_greedy and constraint is None

    @property
    def reserved(self) -> int:
        """KV cache tokens this request may need: its prompt and every token it may generate."""
        return len(self.prompt) + self.limit

    @property
    def finished(self) -> bool:
        return self.reply is not None or self.error is not None

    def emit(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            item: str | Piece = piece
            if self.logprobs is not None:
                item, self._unsent = Piece(piece, self._unsent), []
            if not self.inbox.put(item):
                self.cancelled = True  # the reader's event loop is gone

    def add_logprob(self, token: int, logprobs) -> None:
        """Record `token`'s logprob from this step's log_softmax row (and the top alternatives, if asked)."""

        def entry(token: int, value: float) -> tuple[str, float, list[int]]:
            raw = self.token_bytes(token)
            return raw.decode("utf-8", errors="replace"), max(value, LOGPROB_FLOOR), list(raw)

        top = []
        if self.sampling.top_logprobs:
            values, ids = logprobs.topk(self.sampling.top_logprobs)
            top = [entry(i, v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        text, value, raw = entry(token, float(logprobs[token]))
        record = TokenLogprob(text, value, raw, top)
        self.logprobs.append(record)
        self._unsent.append(record)

    def finish(self, reason: str | None = None, error: BaseException | None = None) -> None:
        if self.finished:
            return
        self.kv = None
        if error is not None:
            self.error = error
        else:
            if reason == "length":
                self.emit(self.stops.flush())
            self.reply = Reply(
                text="".join(self.pieces),
                finish_reason=reason or "length",
                prompt_tokens=len(self.prompt),
                completion_tokens=len(self.generated),
                truncated_messages=self.truncated_messages,
                token_ids=list(self.generated),
                logprobs=list(self.logprobs) if self.logprobs is not None else None,
            )
            if self._unsent:  # tokens whose text was held back (a stop string) or never completed
                self.inbox.put(Piece("", self._unsent))
                self._unsent = []
        self.inbox.put(END)


class SequenceKV:
    """One request's keys and values for every layer in one tensor, [layers, 2 (keys, values), kv_heads, capacity,
    head_dim], grown by doubling up to what the request reserved. One tensor per request (not one per layer) lets
    catdog's decode-attention kernel take every request's cache in one call; `length` counts the positions written
    by finished steps (a step writes at `length` in each layer; the scheduler then calls `advance`)."""

    def __init__(self, reserved: int, layers: int):
        self.reserved, self.layers = reserved, layers
        self.data = None
        self.length = 0

    def ensure(self, extra: int, kv_heads: int, head_dim: int, like) -> None:
        """Room for `extra` more positions (allocated like `like`: its dtype and device)."""
        need = self.length + extra
        capacity = 0 if self.data is None else self.data.shape[3]
        if need <= capacity:
            return
        capacity = max(need, min(self.reserved, max(2 * capacity, need + 32)))
        data = like.new_empty((self.layers, 2, kv_heads, capacity, head_dim))
        if self.length:
            data[:, :, :, : self.length] = self.data[:, :, :, : self.length]
        self.data = data

    def write(self, layer: int, keys, values):
        """Put this step's keys/values ([n, kv_heads, head_dim]) after the cached ones; return all of this layer's
        so far as [1, kv_heads, length + n, head_dim] views."""
        n = keys.shape[0]
        if layer == 0:
            self.ensure(n, keys.shape[1], keys.shape[2], keys)
        end = self.length + n
        self.data[layer, 0, :, self.length : end] = keys.transpose(0, 1)
        self.data[layer, 1, :, self.length : end] = values.transpose(0, 1)
        return self.data[layer, 0, :, :end][None], self.data[layer, 1, :, :end][None]

    def advance(self, n: int) -> None:
        self.length += n


@dataclass
class PackedBatch:
    """Where each request's tokens sit in the packed row: (start, count, its KV cache)."""

    segments: list[tuple[int, int, SequenceKV]]


def _packed_attention(fallback, module, query, key, value, attention_mask, catdog_batch=None, **kwargs):
    """Attention for a packed batch: each request's queries against its own cache, with torch's SDPA called as
    transformers' SDPA attention calls it (same results, measured equal in fp32 and bf16) minus its per-call checks,
    which cost more than the kernel at one query per request. Outside the scheduler (a plain forward or generate())
    the model's original implementation runs."""
    if catdog_batch is None:
        return fallback(module, query, key, value, attention_mask, **kwargs)
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    grouped = key.shape[1] != query.shape[1]
    scale = kwargs.get("scaling")
    outputs = []
    for start, count, kv in catdog_batch.segments:
        span = slice(start, start + count)
        k, v = kv.write(module.layer_idx, key[0, :, span].transpose(0, 1), value[0, :, span].transpose(0, 1))
        # a prefill (count > 1) starts from an empty cache, so SDPA's own causal flag is the right mask
        q = query[:, :, start : start + count]
        outputs.append(scaled_dot_product_attention(q, k, v, is_causal=count > 1, scale=scale, enable_gqa=grouped))
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2), None  # [1, tokens, heads, head_dim], as attention implementations return


def enable_packed_attention(model) -> bool:
    """Route the model's attention through `_packed_attention` (its original implementation still serves plain
    forwards). False when the model does not use transformers' attention interface."""
    if not getattr(model, "_supports_attention_backend", False):
        return False
    original = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if original.startswith(PACKED_ATTENTION):
        return True
    if original not in ("sdpa", "eager"):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"{PACKED_ATTENTION}_{original}"
    # "eager" has no shared function (each model file has its own); SDPA computes the same attention
    fallback = ALL_ATTENTION_FUNCTIONS["sdpa"]
    AttentionInterface.register(name, partial(_packed_attention, fallback))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    model.set_attn_implementation(name)
    return True


def kv_bytes_per_token(model, dtype) -> int:
    """Bytes of keys and values one token takes across all layers."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = getattr(config, "num_hidden_layers", 1)
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


def free_memory_bytes(device) -> int | None:
    """Memory a KV cache could use on `device`: free GPU memory, or MemAvailable of the host."""
    try:
        if device is not None and getattr(device, "type", "cpu") == "cuda":
            import torch

            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, RuntimeError):
        pass
    return None


# Requests per step by device. CPU: measured on the 2-core machine (SmolLM2, one thread, step time at 1/8/16/32/64
# sequences): int4 89/239/321/466/1095 ms, so aggregate tok/s peaks at 32 (69 tok/s; 50 at 16, 58 at 64); bf16
# 234/287/310/442/597 ms, still growing at 64 but each stream already slower than 3 tok/s at 32. GPU: not measured
# (no GPU here); a GPU decode step, bound by reading the weights, costs little more for 64 sequences than for one.
DEFAULT_MAX_BATCH_SIZE = {"cpu": 32, "cuda": 64, "mps": 32}
KV_MEMORY_SHARE = 0.3  # of the memory free after loading, for the KV cache of the whole batch


def default_limits(chat_model) -> tuple[int, int]:
    """(max_batch_size, max_batch_tokens) for this model on its device: batch size from measurement per device
    kind; KV tokens from the memory free now, never less than one full context window."""
    kind = getattr(chat_model.device, "type", "cpu")
    size = DEFAULT_MAX_BATCH_SIZE.get(kind, 32)
    tokens = chat_model.context_window
    free = free_memory_bytes(chat_model.device)
    if free is not None:
        tokens = max(
            tokens, int(free * KV_MEMORY_SHARE / max(1, kv_bytes_per_token(chat_model.model, chat_model.dtype)))
        )
    return size, tokens


def _end_at_exit(scheduler: Scheduler) -> None:
    """Stop the loop's thread before the interpreter shuts down: killed mid-wait while it led an OpenMP team (and
    the main thread led none, as models load in a thread of their own) it aborted the process at exit ('terminate
    called without an active exception', about every other run)."""
    import atexit
    import weakref

    ref = weakref.ref(scheduler)

    def end() -> None:
        live = ref()
        if live is not None:
            live.close(timeout=5.0)

    atexit.register(end)


class Scheduler:
    def __init__(self, chat_model, *, max_batch_size: int, max_batch_tokens: int):
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ConfigError("--max-batch-size and --max-batch-tokens must be positive")
        self.chat_model = chat_model
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # touched by the loop's thread only
        self._thread: threading.Thread | None = None
        self._closed = False
        self._packed: bool | None = None  # decided on the loop's first step
        self._ends_at_exit = False
        self._decoder = None  # the lean decoder (chat/decoder.py) where the model's family has one
        self.steps = 0  # forward steps run
        self.peak_batch = 0  # the most requests one step has served
        self._no_mask = None
        self._layers = 0  # the model's decoder layers (each request's KV cache holds them all)

    # ---- any thread -----------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        if request.reserved > self.max_batch_tokens:
            raise ConfigError(
                f"this request needs {request.reserved} tokens of KV cache (prompt + max new tokens), more than "
                f"the server's --max-batch-tokens {self.max_batch_tokens}; lower max_tokens or shorten the prompt"
            )
        if request.limit <= 0:  # the prompt already fills the context window
            request.finish("length")
            return
        with self._cond:
            if self._closed:
                raise EngineClosedError("the chat engine is shut down")
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="catdog-scheduler", daemon=True)
                self._thread.start()
                if not self._ends_at_exit:
                    _end_at_exit(self)
                    self._ends_at_exit = True
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._cond:
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """End every queued and running request (EngineClosedError) and stop the loop."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify()
        if timeout and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def counts(self) -> dict:
        with self._cond:
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "steps": self.steps,
                "peak_batch": self.peak_batch,
            }

    # ---- the loop's thread ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        ending: list[Request] = []
        new: list[Request] = []
        error: BaseException | None = None
        try:
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not (self._waiting or self._running or self._closed):
                            if not self._cond.wait(IDLE_EXIT_S) and not (self._waiting or self._closed):
                                self._thread = None
                                return
                        if self._closed:
                            break
                        dropped = [r for r in self._waiting if r.cancelled]
                        if dropped:
                            self._waiting = deque(r for r in self._waiting if not r.cancelled)
                        new = self._admit()
                    for request in dropped:
                        request.finish("cancelled")
                    for request in self._running:
                        if request.cancelled:
                            request.finish("cancelled")
                    self._running = [r for r in self._running if not r.finished]
                    if new or self._running:
                        self._step(new)
        except BaseException as e:  # a bug in the loop itself: fail every request rather than leave them hanging
            log.exception("the scheduler loop failed")
            error = e
        finally:
            with self._cond:
                if self._closed or error is not None:
                    ending = [*self._running, *new, *self._waiting]  # finish() ignores a second call
                    self._running, self._waiting = [], deque()
                    self._thread = None
            for request in ending:
                request.finish(error=error or EngineClosedError("the server is shutting down"))

    def _admit(self) -> list[Request]:
        """FIFO: newcomers join while the batch has room; the first that does not fit waits, and so do all after it."""
        new: list[Request] = []
        reserved = sum(r.reserved for r in self._running)
        while self._waiting and len(self._running) + len(new) < self.max_batch_size:
            if reserved + self._waiting[0].reserved > self.max_batch_tokens:
                break
            request = self._waiting.popleft()
            reserved += request.reserved
            new.append(request)
        return new

    def _step(self, new: list[Request]) -> None:
        import torch

        running = self._running
        batch = running + new
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(batch))
        try:
            logits = self._forward(running, new).float()
        except Exception as e:  # the whole step failed: its requests end with the error, the loop goes on
            log.exception("a generation step failed")
            for request in batch:
                request.finish(error=e)
            self._running = []
            return
        tokens: list[int | None] = [None] * len(batch)
        plain = [i for i, r in enumerate(batch) if r.plain_greedy]
        if plain:
            index = torch.tensor(plain, device=logits.device)
            for i, token in zip(plain, logits.index_select(0, index).argmax(-1).tolist(), strict=True):
                tokens[i] = token
        for i, request in enumerate(batch):
            try:
                token = tokens[i]
                # raw logprobs, before penalties, mask and temperature; only for requests that asked
                logprobs = logits[i].log_softmax(-1) if request.wants_logprobs else None
                if token is None:
                    allowed = request.constraint.allowed(logits[i]) if request.constraint is not None else None
                    if allowed is None and request.constraint is not None:
                        request.emit(request.stops.flush())
                        request.finish("stop")  # the matcher failed (logged): end with what matched so far
                        continue
                    token = request.sampler(logits[i], allowed)
                self._advance(request, token, logprobs)
            except Exception as e:  # this request fails alone
                log.exception("a request failed")
                request.finish(error=e)
        self._running = [r for r in batch if not r.finished]

    @staticmethod
    def _advance(request: Request, token: int, logprobs=None) -> None:
        constraint = request.constraint
        if token in request.stop_ids or (constraint is not None and constraint.is_end(token)):
            request.emit(request.stops.flush())  # a held-back tail that never became a stop string
            request.finish("stop")
            return
        request.generated.append(token)
        request.sampler.observe(token)
        if logprobs is not None:
            request.add_logprob(token, logprobs)
        text = request.detokenizer.push(token)
        piece, stopped = request.stops.feed(text) if text else ("", False)
        request.emit(piece)
        if stopped:
            request.finish("stop")
        elif constraint is not None and not constraint.consume(token):
            # the grammar is complete (only a stop token could follow) or the matcher failed: end here
            request.emit(request.stops.flush())
            request.finish("stop")
        elif len(request.generated) >= request.limit:
            request.finish("length")

    def _forward(self, running: list[Request], new: list[Request]):
        """Logits [len(running) + len(new), vocab] for the next token of each request."""
        if self._packed is None:
            self._packed = enable_packed_attention(self.chat_model.model)
            if not self._packed:
                log.info(
                    "%s does not use transformers' attention interface: one request per forward",
                    type(self.chat_model.model).__name__,
                )
            else:
                config = self.chat_model.model.config
                config = config.get_text_config() if hasattr(config, "get_text_config") else config
                self._layers = config.num_hidden_layers
            if self._packed and os.environ.get(LEAN_DECODER_ENV, "1") != "0":
                from catdog_glm.chat.decoder import lean_decoder

                self._decoder = lean_decoder(self.chat_model.model)
        if self._packed:
            return self._forward_packed(running, new)
        return self._forward_each(running, new)

    def _forward_packed(self, running: list[Request], new: list[Request]):
        import torch

        ids: list[int] = []
        positions: list[int] = []
        segments: list[tuple[int, int, SequenceKV]] = []
        last: list[int] = []
        for request in running:
            segments.append((len(ids), 1, request.kv))
            last.append(len(ids))
            ids.append(request.generated[-1])
            positions.append(len(request.prompt) + len(request.generated) - 1)
        for request in new:
            request.kv = SequenceKV(request.reserved, self._layers)
            segments.append((len(ids), len(request.prompt), request.kv))
            ids += request.prompt
            positions += range(len(request.prompt))
            last.append(len(ids) - 1)
        device = self.chat_model.device
        if self._decoder is not None:
            logits = self._decoder(
                torch.tensor(ids, device=device),
                torch.tensor(positions, device=device),
                segments,
                torch.tensor(last, device=device),
            )
        else:
            if self._no_mask is None:
                # an (unused) 4D mask: transformers then skips building a causal mask for the packed row
                self._no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
            logits = self.chat_model.model(
                input_ids=torch.tensor([ids], device=device),
                position_ids=torch.tensor([positions], device=device),
                attention_mask=self._no_mask,
                use_cache=False,
                logits_to_keep=torch.tensor(last, device=device),
                catdog_batch=PackedBatch(segments),
            ).logits[0]
        for _, count, kv in segments:
            kv.advance(count)
        return logits

    def _forward_each(self, running: list[Request], new: list[Request]):
        """One forward per request, each with its own DynamicCache (models without the attention interface)."""
        import inspect

        import torch
        from transformers import DynamicCache

        model, device = self.chat_model.model, self.chat_model.device
        # transformers 5.x renamed forward's `past_key_values` to `cache`; accept either.
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        rows = []
        for request in running + new:
            if request.kv is None:
                request.kv = DynamicCache()
                step = request.prompt
            else:
                step = request.generated[-1:]
            out = model(
                input_ids=torch.tensor([step], device=device),
                use_cache=True,
                logits_to_keep=1,
                **{cache_arg: request.kv},
            )
            rows.append(out.logits[0, -1])
        return torch.stack(rows)
