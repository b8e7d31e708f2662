"""Hugging Face Hub datasets (`owner/name[@revision]`, also written `hf:owner/name`): parquet shards, read with
pyarrow, downloaded one at a time by `huggingface_hub.hf_hub_download` (repo_type="dataset"; HF_TOKEN, HF_ENDPOINT
and HF_HUB_OFFLINE as the library reads them), so a `--limit` pull stops downloading once it has its images and a
cut shard resumes where it stopped."""

from __future__ import annotations

import re
from pathlib import Path

from catdog_glm.errors import DataError, DatasetOfflineError
from catdog_glm.vision.datahub.base import (
    DataRef,
    Fetched,
    PullProgress,
    Source,
    check_disk_space,
    hub_errors,
    not_cached_message,
)
from catdog_glm.vision.datahub.build import split_of

_NAME = r"\w(?:[\w.-]*\w)?"
_ID = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[^\s@]+))?", re.ASCII)
# datasets whose main branch holds a loading script: the Hub's own parquet conversion lives on this branch
PARQUET_BRANCH = "refs/convert/parquet"
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


class HuggingFaceSource(Source):
    key = "hf"
    hub = "the Hugging Face Hub"
    token_hint = "set HF_TOKEN to a token of an account that can read it"

    @property
    def endpoint(self) -> str:
        from huggingface_hub import constants

        return constants.ENDPOINT

    def parse(self, text: str) -> DataRef | None:
        match = _ID.fullmatch(text.strip())
        return DataRef(self.key, match["repo"], match["revision"]) if match else None

    def fetch(self, ref: DataRef, raw: Path, progress: PullProgress, *, sha256: str | None, cache: Path) -> Fetched:
        from huggingface_hub import HfApi, constants, hf_hub_download

        if constants.HF_HUB_OFFLINE:
            raise DatasetOfflineError(not_cached_message(ref, self.hub, "HF_HUB_OFFLINE=1 is set", cache))
        api = HfApi()
        with hub_errors(ref, self, cache):
            info = api.dataset_info(ref.name, revision=ref.revision, files_metadata=True)
            sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
            shards = _shards(sizes)
            if not shards and ref.revision is None:  # a script dataset: read the Hub's parquet conversion
                converted = api.dataset_info(ref.name, revision=PARQUET_BRANCH, files_metadata=True)
                if _shards({s.rfilename: s.size or 0 for s in converted.siblings or []}):
                    info, sizes = converted, {s.rfilename: s.size or 0 for s in converted.siblings or []}
                    shards = _shards(sizes)
        if not shards:
            raise DataError(f"{ref} has no parquet files on {self.hub}; catdog reads parquet image datasets")
        check_disk_space(ref, 2 * sum(sizes[s] for s in shards), raw)
        card = _card(info)

        def open_shard(name: str) -> Path:
            with hub_errors(ref, self, cache):
                local = hf_hub_download(ref.name, name, repo_type="dataset", revision=info.sha, local_dir=raw)
            return Path(local)

        return Fetched(
            revision=info.sha,
            license=_license(card),
            page=f"{self.endpoint}/datasets/{ref.name}",
            classes=_class_names(card),
            shards=shards,
            open_shard=open_shard,
        )


def _shards(sizes: dict[str, int]) -> list[str]:
    parquet = [f for f in sizes if f.endswith(".parquet")]
    return sorted(parquet, key=lambda f: (_SPLIT_ORDER.get(split_of(f) or "train", 3), f))


def _card(info) -> dict:
    card = getattr(info, "card_data", None) or getattr(info, "cardData", None) or {}
    return card.to_dict() if hasattr(card, "to_dict") else dict(card)


def _license(card: dict) -> str | None:
    value = card.get("license")
    if isinstance(value, list):
        value = ", ".join(map(str, value))
    return str(value) if value else None


def _class_names(card: dict) -> list[str] | None:
    """ClassLabel names from the dataset card's YAML (dataset_info.features[].dtype.class_label.names)."""
    infos = card.get("dataset_info") or []
    for info in infos if isinstance(infos, list) else [infos]:
        for feature in (info or {}).get("features") or []:
            names = ((feature.get("dtype") or {}) if isinstance(feature.get("dtype"), dict) else {}).get("class_label")
            names = (names or {}).get("names")
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names, key=lambda k: int(k))]
            if isinstance(names, list):
                return [str(n) for n in names]
    return None
