"""ModelScope datasets (`modelscope:owner/name[@revision]`), through ModelScope's own client
(`dataset_snapshot_download`, as chat models come through `snapshot_download`): parquet shards, archives or image
files, downloaded into our download folder (the client skips files it already has, so a second attempt continues).
MODELSCOPE_ENDPOINT and MODELSCOPE_API_TOKEN as the client reads them."""

from __future__ import annotations

import os
from pathlib import Path

from catdog_glm.errors import DataError
from catdog_glm.vision.datahub.base import DataRef, Fetched, PullProgress, Source, hub_errors
from catdog_glm.vision.datahub.build import ARCHIVES
from catdog_glm.vision.datahub.huggingface import HuggingFaceSource
from catdog_glm.vision.images import IMAGE_EXTENSIONS

MODELSCOPE_HINT = "ModelScope ids need the optional modelscope package: pip install modelscope"
# what the builder reads: parquet shards, archives, image files and the CSV/class lists beside them
PATTERNS = ["*.parquet", *(f"*{ext}" for ext in ARCHIVES), *(f"*{ext}" for ext in IMAGE_EXTENSIONS), "*.csv", "*.txt"]


class ModelScopeSource(Source):
    key = "modelscope"
    hub = "ModelScope"
    token_hint = "set MODELSCOPE_API_TOKEN to a token of an account that can read it"

    @property
    def endpoint(self) -> str:
        return os.environ.get("MODELSCOPE_ENDPOINT") or "https://www.modelscope.cn"

    def parse(self, text: str) -> DataRef | None:
        ref = HuggingFaceSource().parse(text)  # the same owner/name[@revision] shape
        return DataRef(self.key, ref.name, ref.revision) if ref else None

    def fetch(self, ref: DataRef, raw: Path, progress: PullProgress, *, sha256: str | None, cache: Path) -> Fetched:
        try:
            from modelscope.hub.snapshot_download import dataset_snapshot_download
        except ImportError as e:
            raise DataError(f"{MODELSCOPE_HINT} ({e})") from e
        files = raw / "files"
        with hub_errors(ref, self, cache):
            dataset_snapshot_download(
                ref.name,
                revision=ref.revision,
                local_dir=str(files),
                allow_patterns=PATTERNS,
                token=os.environ.get("MODELSCOPE_API_TOKEN") or None,
            )
        if not files.is_dir() or not any(p.is_file() for p in files.rglob("*")):
            raise DataError(f"{ref} has no parquet, archive or image files on {self.hub}")
        return Fetched(revision=ref.revision or "master", page=f"{self.endpoint}/datasets/{ref.name}", folder=files)
