"""Chat models by name: `owner/name[@revision]` on the Hugging Face Hub (through `huggingface_hub`) and
`modelscope:owner/name[@revision]` on ModelScope (through the `modelscope` package), each kept in its library's
own cache. A cached model resolves with no network at all; a missing one is downloaded once (only the config,
tokenizer and one weight format; `.py` files only with trust_remote_code), with the libraries' resume and
progress bars. Tokens, mirrors and cache folders come from the libraries' environment variables (HF_TOKEN,
HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE; MODELSCOPE_API_TOKEN, MODELSCOPE_ENDPOINT, MODELSCOPE_CACHE).

Hubs (one class each, registered in `HUBS` by `register_hub`, as vision/datahub registers dataset sources):
`huggingface.HuggingFaceHub` and `modelscope.ModelScopeHub`."""

from catdog_glm.chat.hub.base import HUBS, CachedModel, Hub, ModelRef, register_hub, select_files
from catdog_glm.chat.hub.core import (
    HUGGINGFACE,
    MODELSCOPE,
    PulledModel,
    cached_model_path,
    fetch_model,
    list_cached_models,
    parse_model_ref,
    pull_model,
    resolve_model,
)

__all__ = [
    "HUBS",
    "HUGGINGFACE",
    "MODELSCOPE",
    "CachedModel",
    "Hub",
    "ModelRef",
    "PulledModel",
    "cached_model_path",
    "fetch_model",
    "list_cached_models",
    "parse_model_ref",
    "pull_model",
    "register_hub",
    "resolve_model",
    "select_files",
]
