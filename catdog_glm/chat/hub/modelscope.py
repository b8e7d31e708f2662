"""ModelScope (`modelscope:owner/name[@revision]`), through the optional `modelscope` package and its cache
(MODELSCOPE_CACHE); MODELSCOPE_API_TOKEN and MODELSCOPE_ENDPOINT as the library reads them."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from catdog_glm.chat.hub.base import CachedModel, Hub, ModelRef, exact_patterns, folder_complete
from catdog_glm.errors import ModelError

# no square brackets in messages: the CLI prints them through rich, which reads [...] as markup
MODELSCOPE_HINT = "ModelScope ids need the optional modelscope package: pip install modelscope"
DEFAULT_REVISION = "master"


class ModelScopeHub(Hub):
    source = "modelscope"
    prefix = "modelscope"
    name = "ModelScope"
    token_variable = "MODELSCOPE_API_TOKEN"
    cache_variable = "MODELSCOPE_CACHE"

    def endpoint(self) -> str:
        return os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or "https://modelscope.cn"

    def cache_dir(self) -> Path:
        return Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope").expanduser()

    def cache_entry(self, ref: ModelRef) -> str:
        return "models/" + ref.repo_id.replace("/", "--")

    def cached(self, ref: ModelRef, *, trust_remote_code: bool = False) -> Path | None:
        snapshot_download, _ = _modelscope()
        with contextlib.suppress(Exception):  # its cache misses raise CacheNotFound and friends
            # local_files_only: this call alone is offline
            folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True))
            return folder if folder_complete(folder) else None
        return None

    def remote_files(self, ref: ModelRef) -> tuple[dict[str, int], Path]:
        _, HubApi = _modelscope()
        listing = HubApi().get_model_files(ref.repo_id, revision=ref.revision, recursive=True)
        sizes = {f["Path"]: int(f.get("Size") or 0) for f in listing if f.get("Type", "blob") != "tree"}
        return sizes, self.cache_dir() / self.cache_entry(ref) / "snapshots" / (ref.revision or DEFAULT_REVISION)

    def fetch(self, ref: ModelRef, files: list[str]) -> Path:
        snapshot_download, _ = _modelscope()
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=exact_patterns(files)))

    def list_cached(self) -> list[CachedModel]:
        models = []
        for snapshot in sorted((self.cache_dir() / "models").glob("*/snapshots/*")):
            if not snapshot.is_dir() or not folder_complete(snapshot):
                continue
            repo_id = snapshot.parent.parent.name.replace("--", "/", 1)
            revision = snapshot.name
            models.append(
                CachedModel(
                    id=f"{self.prefix}:{repo_id}" + ("" if revision == DEFAULT_REVISION else f"@{revision}"),
                    source=self.source,
                    revision=revision,
                    size=sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file()),
                    path=str(snapshot),
                )
            )
        return models


def _modelscope():
    """(snapshot_download, HubApi) of the optional modelscope package, or a one-line hint to install it."""
    try:
        from modelscope.hub.api import HubApi
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError as e:
        raise ModelError(f"{MODELSCOPE_HINT} ({e})") from e
    return snapshot_download, HubApi
