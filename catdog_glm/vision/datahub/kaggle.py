"""Kaggle (`kaggle:dogs-vs-cats`: a competition's train.zip; `kaggle:owner/dataset`: a dataset), through
`kagglehub` with the user's credentials (KAGGLE_USERNAME + KAGGLE_KEY, KAGGLE_API_TOKEN, or kaggle.json).

Why kagglehub and not the `kaggle` package: kagglehub keeps a cache with completion markers, and when Kaggle
cannot be reached it returns a cached file instead of failing (offline works); it resumes a partial download
with an HTTP Range request and checks the MD5 Kaggle sends; it needs no credentials to be imported. The `kaggle`
package authenticates (and exits) on import, writes where it is told with no cache or offline fallback, and
brings the notebook stack (jupytext, nbformat) along. kagglehub's `output_dir` refuses a partial file instead of
resuming it, so downloads stay in its own cache (KAGGLEHUB_CACHE) and are hard-linked into our download folder."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from catdog_glm.errors import DataError, DatasetAccessError
from catdog_glm.vision.datahub.base import DataRef, Fetched, PullProgress, Source, hub_errors

KAGGLE_HINT = "Kaggle ids need the optional kagglehub package: pip install kagglehub"
COMPETITION_FILE = "train.zip"  # a competition's labelled images; test files have no labels
_COMPETITION = re.compile(r"[a-z0-9][a-z0-9-]*", re.ASCII)
_DATASET = re.compile(r"[\w-]+/[\w.-]+(?:/versions/\d+)?", re.ASCII)


class KaggleSource(Source):
    key = "kaggle"
    hub = "Kaggle"
    token_hint = (
        "set KAGGLE_USERNAME and KAGGLE_KEY (kaggle.com, Settings, API, Create New Token) or put kaggle.json in "
        "~/.kaggle/; for a competition, also accept its rules on its page"
    )
    endpoint = "https://www.kaggle.com"

    def parse(self, text: str) -> DataRef | None:
        text = text.strip()
        if _COMPETITION.fullmatch(text) or _DATASET.fullmatch(text):
            return DataRef(self.key, text)
        return None

    def fetch(self, ref: DataRef, raw: Path, progress: PullProgress, *, sha256: str | None, cache: Path) -> Fetched:
        try:
            import kagglehub
            from kagglehub.config import get_kaggle_credentials
        except ImportError as e:
            raise DataError(f"{KAGGLE_HINT} ({e})") from e
        if not get_kaggle_credentials() and not _cached(ref):
            raise DatasetAccessError(f"{ref} needs Kaggle credentials: {self.token_hint}")
        competition = "/" not in ref.name
        with hub_errors(ref, self, cache):
            if competition:
                local = Path(kagglehub.competition_download(ref.name, path=COMPETITION_FILE))
            else:
                local = Path(kagglehub.dataset_download(ref.name))
        files = raw / "files"
        shutil.rmtree(files, ignore_errors=True)
        if local.is_dir():  # never change kagglehub's cache: the builder moves and unpacks files in its folder
            shutil.copytree(local, files, copy_function=_link_or_copy)
        else:
            files.mkdir(parents=True)
            _link_or_copy(local, files / local.name)
        return Fetched(page=self.page(ref), folder=files, license=None)

    def page(self, ref: DataRef) -> str:
        return f"{self.endpoint}/{'datasets/' if '/' in ref.name else 'competitions/'}{ref.name}"


def _cached(ref: DataRef) -> bool:
    """kagglehub serves a completed download from its cache without credentials."""
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_competition_handle, parse_dataset_handle

    if "/" not in ref.name:
        return Cache().load_from_cache(parse_competition_handle(ref.name), COMPETITION_FILE) is not None
    return Cache().load_from_cache(parse_dataset_handle(ref.name)) is not None


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
