"""Chat models by id: parse an id to its hub, find it in that hub's cache with no network, else download it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from catdog_glm.chat.hub.base import HUBS, CachedModel, ModelRef, default_hub, hub_by_prefix, register_hub
from catdog_glm.chat.hub.huggingface import HuggingFaceHub
from catdog_glm.chat.hub.modelscope import ModelScopeHub
from catdog_glm.errors import ModelAccessError, ModelError, ModelNotFoundError, ModelOfflineError

log = logging.getLogger(__name__)

# the first one registered takes ids written without a prefix
for _hub in (HuggingFaceHub(), ModelScopeHub()):
    register_hub(_hub)
HUGGINGFACE, MODELSCOPE = HuggingFaceHub.source, ModelScopeHub.source


@dataclass
class PulledModel:
    """What `pull_model` fetched: the id, the local folder, how many files and bytes, and how long it took."""

    ref: ModelRef
    path: Path
    files: int
    bytes: int
    seconds: float
    downloaded: bool = True  # False when the hub was unreachable and the cached copy was kept


def _explicit_hub(text: str):
    prefix, colon, _ = text.strip().partition(":")
    return hub_by_prefix(prefix) if colon else None


def parse_model_ref(text: str) -> ModelRef | None:
    """`owner/name[@rev]`, `hf:owner/name[@rev]` or `modelscope:owner/name[@rev]` -> ModelRef; None otherwise."""
    text = text.strip()
    prefix, colon, rest = text.partition(":")
    if colon:
        hub = hub_by_prefix(prefix)
        return hub.parse(rest) if hub else None
    return default_hub().parse(text)


def resolve_model(spec: str | None, *, trust_remote_code: bool = False) -> str | None:
    """Turn a --model value into a local path: None and existing paths pass through (a path always wins over an
    id, unless the id is written hf:... or modelscope:...); an id comes from the cache, else is downloaded."""
    if spec is None:
        return None
    explicit = _explicit_hub(spec) is not None
    if not explicit and Path(spec).expanduser().exists():
        return spec
    ref = parse_model_ref(spec)
    if ref is None:
        raise ModelError(
            f"model {spec} does not exist, and it is not a model id either: pass a ChatGLM3 or Hugging Face model "
            "folder, a .gguf file, a Hugging Face Hub id (owner/name or owner/name@revision) or a ModelScope id "
            "(modelscope:owner/name)"
        )
    try:
        return str(fetch_model(ref, trust_remote_code=trust_remote_code))
    except (ModelNotFoundError, ModelAccessError) as e:
        if explicit or ref.revision:  # only a bare owner/name may have been meant as a relative folder
            raise
        raise type(e)(f"there is no local folder {spec}, and {e}") from e


def cached_model_path(ref: ModelRef, *, trust_remote_code: bool = False) -> Path | None:
    """The complete cached folder of `ref`, found without any network request; None if not (fully) cached."""
    return ref.hub.cached(ref, trust_remote_code=trust_remote_code)


def fetch_model(ref: ModelRef, *, trust_remote_code: bool = False) -> Path:
    """The local folder of `ref`: the cached copy with no network at all, else a download."""
    cached = cached_model_path(ref, trust_remote_code=trust_remote_code)
    if cached is not None:
        log.info("%s found in the cache at %s", ref, cached)
        return cached
    return ref.hub.download(ref, trust_remote_code=trust_remote_code, announce=True)


def pull_model(spec: str, *, trust_remote_code: bool = False) -> PulledModel:
    """Download (or update) a model by id ahead of time, like `ollama pull`; keeps a cached copy when offline."""
    ref = parse_model_ref(spec)
    if ref is None:
        raise ModelError(
            f"{spec} is not a model id: pass owner/name, owner/name@revision or modelscope:owner/name (a local folder "
            "needs no pull: pass it to --model)"
        )
    started = time.perf_counter()
    downloaded = True
    try:
        path = ref.hub.download(ref, trust_remote_code=trust_remote_code, announce=False)
    except ModelOfflineError:
        path = cached_model_path(ref, trust_remote_code=trust_remote_code)
        if path is None:
            raise
        log.warning("%s cannot be reached; keeping the cached copy of %s", ref.hub.name, ref)
        downloaded = False
    files = [p for p in path.iterdir() if p.is_file()]
    return PulledModel(
        ref=ref,
        path=path,
        files=len(files),
        bytes=sum(p.stat().st_size for p in files),
        seconds=time.perf_counter() - started,
        downloaded=downloaded,
    )


def list_cached_models() -> list[CachedModel]:
    """Every cached model revision of every hub, sorted by id (like `ollama list`)."""
    return sorted((m for hub in HUBS.values() for m in hub.list_cached()), key=lambda m: (m.id, m.source))
