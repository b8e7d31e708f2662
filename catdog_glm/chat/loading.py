"""Load a chat model for the engine: `load_chat_model(spec)` turns a hub id into a cached folder (chat/hub, which
downloads only what is not cached), lets the first matching model source load it (chat/sources: the embedded
SmolLM2-135M-Instruct, a GGUF file, a ChatGLM3 folder, an HF folder; local files only, never a hub), and wraps the
result as a `ChatModel`: what the engine needs to talk to it, whatever its source."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catdog_glm.chat.formats import ChatFormat, format_for
from catdog_glm.chat.sources import LoadedModel, LoadOptions, find_source, quantization_label
from catdog_glm.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class ChatModel:
    """A loaded model and what the engine needs to talk to it, whatever its source."""

    name: str
    source: str
    kind: str  # which loader read it, for display: chatglm3 | hf | gguf | embedded
    model: Any
    format: ChatFormat  # how prompts are written and replies read (chat/formats/); never a family's name
    stop_ids: set[int]
    context_window: int
    device: Any = None
    dtype: Any = None
    quantization: str = "none"
    load_seconds: float = 0.0
    info: dict = field(default_factory=dict)

    parameters: int = 0  # counted at load, before quantization turns weights into int buffers
    # the model's tokenizer object (HF tokenizer, ChatGLM3Tokenizer, ...): constrained decoding reads its vocabulary
    tokenizer: Any = None
    encode_text: Callable[[str], list[int]] | None = None  # plain text -> ids, no chat template (/v1/completions)
    # the model's own sampling defaults (chat/sampling.py says where they come from); a request's values win
    sampling_defaults: dict = field(default_factory=dict)

    def encode_chat(self, messages: list[dict], **options) -> list[int]:
        """Prompt ids in the model's format (`options`: tools, continue_final)."""
        return self.format.encode(messages, **options)

    def decode(self, ids: list[int]) -> str:
        return self.format.decode(ids)


def resolve_dtype(name: str, device):
    import torch

    from catdog_glm.device import cpu_supports_bf16

    if name not in DTYPES:
        raise ConfigError(f"the precision (--precision) must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_chat_model(spec: str | None = None, **options) -> ChatModel:
    """Load `spec` (None = the embedded default, a .gguf file, a ChatGLM3 folder or an HF folder); the options are
    `_load_chat_model`'s.

    The work runs in a thread of its own, so that the calling (main) thread never starts an OpenMP thread team:
    with libgomp, once two threads lead teams there are more managed threads than this 2-core machine has CPUs,
    every team's workers sleep between parallel regions, and each torch op in the scheduler's thread then waits on a
    wake-up (measured: a small parallel op 8 us from the one team's thread, 80 us once the main thread had had a
    team; 34 -> 78 tok/s decode on the embedded SmolLM2 in int4)."""
    import threading

    result: dict = {}

    def work() -> None:
        try:
            result["model"] = _load_chat_model(spec, **options)
        except BaseException as e:  # noqa: BLE001 - handed to the caller as it was
            result["error"] = e

    # not a daemon: after a Ctrl-C the interpreter waits for it, so a kernel build's lock file is always released
    thread = threading.Thread(target=work, name="catdog-load")
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # in short waits, so Ctrl-C still reaches the main thread
    if "error" in result:
        raise result["error"]
    return result["model"]


def _load_chat_model(
    spec: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    quantize: int | None = None,
    trust_remote_code: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    use_cache: bool = True,
) -> ChatModel:
    """Load `spec` (None = the embedded default, a .gguf file, a ChatGLM3 folder, an HF folder or a hub id).

    A ChatGLM3 folder is quantized while it streams in (never held in full precision) and, unless `use_cache` is
    off, its quantized weights are kept in the conversion cache for the next load."""
    from catdog_glm.chat.hub import resolve_model
    from catdog_glm.chat.quantize import parameter_count, quantize_linear_layers, weight_bytes
    from catdog_glm.device import resolve_device

    # a hub id (owner/name[@rev], modelscope:owner/name) -> its cached or downloaded folder; the only network use
    requested = spec
    spec = resolve_model(spec, trust_remote_code=trust_remote_code)
    display_name = requested if requested != spec else None  # an id names the model better than a snapshot hash
    started = time.perf_counter()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if quantize not in (None, 4, 8):
        raise ConfigError(f"--quantize must be 4 or 8, got {quantize}")
    path = None if spec is None else Path(spec).expanduser()
    options = LoadOptions(torch_dtype, dev, quantize, trust_remote_code, use_cache, on_progress, display_name)
    chat = chat_model_of(find_source(path).load(path, options))

    if display_name:
        chat.name = display_name
    if next(chat.model.parameters()).device != dev:  # quantized-on-GPU models are placed already (and refuse .to)
        chat.model = chat.model.to(dev)
    chat.model.eval()
    chat.device, chat.dtype = dev, torch_dtype
    chat.parameters = parameter_count(chat.model)
    if quantize and chat.quantization == "none":
        quantize_linear_layers(chat.model, bits=quantize)
        chat.quantization = quantization_label(dev, quantize)
    chat.info["weight_bytes"] = weight_bytes(chat.model)
    chat.load_seconds = time.perf_counter() - started
    return chat


def chat_model_of(loaded: LoadedModel) -> ChatModel:
    """The engine's view of what a source loaded: its format picked from the tokenizer (chat/formats)."""
    return ChatModel(
        name=loaded.name,
        source=loaded.source,
        kind=loaded.kind,
        model=loaded.model,
        format=format_for(loaded.tokenizer),
        stop_ids=set(loaded.stop_ids),
        context_window=loaded.context_window,
        quantization=loaded.quantization,
        info=dict(loaded.info),
        tokenizer=loaded.tokenizer,
        encode_text=loaded.encode_text,
        sampling_defaults=dict(loaded.sampling_defaults),
    )
