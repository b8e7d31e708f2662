"""The Hugging Face Hub (`owner/name[@revision]`, also written `hf:owner/name`), through `huggingface_hub` and
its cache (HF_HOME, HF_HUB_CACHE); HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE as the library reads them."""

from __future__ import annotations

from pathlib import Path

from catdog_glm.chat.hub.base import CachedModel, Hub, ModelRef, exact_patterns, folder_complete, select_files
from catdog_glm.errors import ModelError


class HuggingFaceHub(Hub):
    source = "huggingface"
    prefix = "hf"
    name = "the Hugging Face Hub"
    token_variable = "HF_TOKEN"
    cache_variable = "HF_HOME"

    def endpoint(self) -> str:
        from huggingface_hub import constants

        return constants.ENDPOINT

    def cache_dir(self) -> Path:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)

    def cache_entry(self, ref: ModelRef) -> str:
        return "models--" + ref.repo_id.replace("/", "--")

    def offline_reason(self) -> str | None:
        from huggingface_hub import constants

        return "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else None

    def cached(self, ref: ModelRef, *, trust_remote_code: bool = False) -> Path | None:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        files = _cached_file_list(ref)
        try:
            patterns = (
                exact_patterns(select_files(files, trust_remote_code=trust_remote_code)) if files is not None else None
            )
            # local_files_only: this call alone is offline, whatever HF_HUB_OFFLINE says
            folder = Path(
                snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True, allow_patterns=patterns)
            )
        except (LocalEntryNotFoundError, ModelError):
            return None
        # with the cached file list, snapshot_download checked every file; without it, check the folder ourselves
        return folder if files is not None or folder_complete(folder) else None

    def remote_files(self, ref: ModelRef) -> tuple[dict[str, int], Path]:
        from huggingface_hub import HfApi

        info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        return sizes, self.cache_dir() / self.cache_entry(ref) / "snapshots" / str(info.sha)

    def fetch(self, ref: ModelRef, files: list[str]) -> Path:
        from huggingface_hub import snapshot_download

        # the branch or tag itself (not the commit), so the library records refs/<revision> for offline look-ups
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=exact_patterns(files)))

    def list_cached(self) -> list[CachedModel]:
        from huggingface_hub import scan_cache_dir
        from huggingface_hub.errors import CacheNotFound

        try:
            info = scan_cache_dir(self.cache_dir())
        except CacheNotFound:
            return []
        models = []
        for repo in info.repos:
            if repo.repo_type != "model":
                continue
            for revision in repo.revisions:
                for name in sorted(revision.refs) or [revision.commit_hash]:
                    models.append(
                        CachedModel(
                            id=repo.repo_id if name == "main" else f"{repo.repo_id}@{name}",
                            source=self.source,
                            revision=name,
                            size=revision.size_on_disk,
                            path=str(revision.snapshot_path),
                        )
                    )
        return models


def _cached_file_list(ref: ModelRef) -> list[str] | None:
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:  # huggingface_hub before the cached tree listing
        return None
    try:
        return [f.path for f in get_cached_repo_tree(ref.repo_id, revision=ref.revision)]
    except CachedRepoTreeNotFoundError:
        return None
