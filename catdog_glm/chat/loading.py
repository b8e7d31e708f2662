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

from catdog_glm.chat.sources import LoadedModel, LoadOptions, find_source, quantization_label
from catdog_glm.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class ChatModel:
    """A loaded model and what the engine needs to talk to it, whatever its source."""

    name: str
    source: str
    kind: str  # chatglm3 | hf | gguf | embedded
    model: Any
    encode_chat: Callable[[list[dict]], list[int]]
    decode: Callable[[list[int]], str]
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
    tool_format: str | None = None  # how tools are written and parsed: "chatglm3" | "hermes" | None (no tools)
    # the model's own sampling defaults (chat/sampling.py says where they come from); a request's values win
    sampling_defaults: dict = field(default_factory=dict)


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


def _template_renders_tools(tokenizer) -> bool:
    """Whether the chat template writes `tools` into the prompt (rendered with a probe tool, whose name must show)."""
    probe = {"type": "function", "function": {"name": "catdog_probe_tool_3f9a", "parameters": {"type": "object"}}}
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}], tools=[probe], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # noqa: BLE001 - any template failure means: no tools this way
        return False
    return isinstance(text, str) and "catdog_probe_tool_3f9a" in text


def hf_tool_style(tokenizer) -> str | None:
    """How tools reach this template: "native" (it renders `tools` and speaks <tool_call>, as Qwen2.5), "chatml"
    (ChatML without tools, e.g. the embedded SmolLM2: written in Qwen2.5's words by chat/tools.py) or None."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
    if "<tool_call>" in template and _template_renders_tools(tokenizer):
        return "native"
    if "<|im_start|>" in template:
        return "chatml"
    return None


def _default_system(tokenizer) -> str:
    """The system message a ChatML template writes when the conversation has none (SmolLM2: "You are a helpful AI
    assistant named SmolLM, ..."), so a tools block added to the system turn keeps it, as Qwen2.5's template does."""
    import re

    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    except Exception:  # noqa: BLE001 - no default then
        return ""
    found = re.match(r"\s*<\|im_start\|>system\n(.*?)<\|im_end\|>", text if isinstance(text, str) else "", re.S)
    return found.group(1) if found else ""


def _hf_adapter(tokenizer, model, name: str, source: str, kind: str) -> ChatModel:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{source} has no chat template (tokenizer_config.json `chat_template`); catdog chats "
            "only with instruction-tuned models that define one"
        )
    style = hf_tool_style(tokenizer)
    default_system = _default_system(tokenizer) if style == "chatml" else ""

    def encode_chat(messages: list[dict], tools: list | None = None, continue_final: bool = False) -> list[int]:
        from jinja2 import TemplateError

        from catdog_glm.chat import tools as tool_calls

        options: dict = {"add_generation_prompt": not continue_final}
        if tools or tool_calls.has_tool_turns(messages):
            if style is None:
                raise ConfigError(tool_calls.NO_TOOL_FORMAT)
            if style == "native":
                messages = tool_calls.native_messages(messages)
                if tools:
                    options["tools"] = tools
            else:
                messages = tool_calls.hermes_messages(messages, tools, default_system)
        else:
            messages = [{**m, "content": "" if m.get("content") is None else m["content"]} for m in messages]
        if continue_final:
            if not messages or messages[-1]["role"] != "assistant":
                raise ConfigError("only a conversation that ends with an assistant message can be continued")
            options["continue_final_message"] = True
        try:
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **options)
        except (TemplateError, ValueError) as e:
            raise ConfigError(f"the model's chat template refused these messages: {str(e).splitlines()[0]}") from e
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    eos = model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        stop.add(tokenizer.eos_token_id)
    window = getattr(model.config, "max_position_embeddings", None) or 2048
    return ChatModel(
        name=name,
        source=source,
        kind=kind,
        model=model,
        encode_chat=encode_chat,
        decode=decode,
        stop_ids=stop,
        context_window=int(window),
        tokenizer=tokenizer,
        encode_text=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
        tool_format="hermes" if style else None,
    )


def _chatglm3_adapter(model, tokenizer, source: str) -> ChatModel:
    turn = tokenizer.special["<|assistant|>"]

    def decode(ids: list[int]) -> str:
        """Reply text; a new assistant turn inside a reply (before ChatGLM3's tool call) shows as `<|assistant|>`,
        so the tool-call parser can see where the call's metadata line starts. Other special tokens never show."""
        if turn not in ids:
            return tokenizer.decode(ids)
        parts, start = [], 0
        for i, token in enumerate(ids):
            if token == turn:
                parts.append(tokenizer.decode(ids[start:i]))
                start = i + 1
        parts.append(tokenizer.decode(ids[start:]))
        return "<|assistant|>".join(parts)

    return ChatModel(
        name=Path(source).name,
        source=source,
        kind="chatglm3",
        model=model,
        encode_chat=tokenizer.build_prompt,
        decode=decode,
        stop_ids=set(tokenizer.stop_ids),
        context_window=int(model.config.max_position_embeddings),
        tokenizer=tokenizer,
        encode_text=tokenizer.encode,
        tool_format="chatglm3",
    )


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
    chat = _wrap(find_source(path).load(path, options))

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


# How prompts are written, by a source's `chat_format` (chat/formats will own this).
_ADAPTERS: dict[str, Callable[[LoadedModel], ChatModel]] = {
    "chatglm3": lambda m: _chatglm3_adapter(m.model, m.tokenizer, m.source),
    "hf": lambda m: _hf_adapter(m.tokenizer, m.model, m.name, m.source, m.kind),
}


def _wrap(loaded: LoadedModel) -> ChatModel:
    """The engine's view of what a source loaded."""
    chat = _ADAPTERS[loaded.chat_format](loaded)
    chat.kind = loaded.kind  # a plug-in source's own kind, even in ChatGLM3's format
    chat.quantization = loaded.quantization
    chat.info.update(loaded.info)
    chat.sampling_defaults = loaded.sampling_defaults
    return chat
