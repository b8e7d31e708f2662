"""What every dataset source shares: the id (`DataRef`), what a source hands the builder (`Fetched`), the `Source`
interface, and the one-line errors for what hubs answer (404, 401/403, offline, a cut, a full disk): read from the
exception by catdog_glm.hub_errors, which chat/hub shares, and worded here for a dataset."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from catdog_glm.errors import (
    CatdogError,
    DataError,
    DatasetAccessError,
    DatasetHubError,
    DatasetNotFoundError,
    DatasetOfflineError,
)
from catdog_glm.hub_errors import HubErrorTypes, HubTarget
from catdog_glm.hub_errors import hub_error as shared_hub_error

_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class DataRef:
    """A dataset id: its source (a key of SOURCES), the name there, and a revision (None = the default)."""

    source: str
    name: str
    revision: str | None = None

    def __str__(self) -> str:
        if self.source == "url":
            return self.name
        prefix = "" if self.source == "hf" else f"{self.source}:"
        return prefix + self.name + (f"@{self.revision}" if self.revision else "")

    @property
    def slug(self) -> str:
        """A folder name for this id in the dataset cache."""
        text = self.name.split("://", 1)[-1] if self.source == "url" else self.name
        base = f"{self.source}--{_SLUG.sub('--', text).strip('-')}"
        return base + (f"@{_SLUG.sub('-', self.revision)}" if self.revision else "")


@dataclass
class Fetched:
    """What a source downloaded (or will download shard by shard) for the builder to turn into an ImageFolder."""

    revision: str | None = None  # the commit or version actually fetched
    license: str | None = None
    page: str | None = None  # where a person can read about the dataset
    classes: list[str] | None = None  # class names the source's metadata states (parquet ClassLabel)
    shards: list[str] = field(default_factory=list)  # parquet files, read in this order
    open_shard: Callable[[str], Path] | None = None  # downloads one shard (resumably) and returns its local path
    folder: Path | None = None  # downloaded archives and/or image files


class Source:
    """One place datasets come from. `fetch` downloads into `raw` (kept across attempts so a cut download resumes)."""

    key: str = ""
    hub: str = ""  # as a person names it: "the Hugging Face Hub"
    token_hint: str = ""  # how to give credentials
    endpoint: str = ""

    def parse(self, text: str) -> DataRef | None:
        raise NotImplementedError

    def page(self, ref: DataRef) -> str | None:
        """Where a person reads about the dataset (and requests access to it)."""
        return f"{self.endpoint}/datasets/{ref.name}"

    def fetch(self, ref: DataRef, raw: Path, progress: PullProgress, *, sha256: str | None, cache: Path) -> Fetched:
        """Download what `ref` needs into `raw` (or arrange to, shard by shard); `cache` is the folder the finished
        dataset will have, named in the offline message."""
        raise NotImplementedError


class PullProgress:
    """Callbacks a front end implements to show a pull: bytes downloaded and images written. No-ops by default."""

    def on_bytes(self, total: int | None, done: int) -> None: ...

    def on_images(self, n: int) -> None: ...

    def on_message(self, text: str) -> None: ...


def not_cached_message(ref: DataRef, hub: str, reason: str, folder: Path) -> str:
    return (
        f"{ref} is not in the dataset cache and {hub} cannot be reached ({reason}): connect and run "
        f"`catdog data pull {ref}`, or copy its images in as train/<class>/*.jpg and val/<class>/*.jpg under "
        f"{folder} (or pass that folder to --data)"
    )


def check_disk_space(ref: DataRef, need: int, folder: Path) -> None:
    """Raise a DataError when the disk under `folder` has less than `need` bytes free (plus 5% and 100 MB)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need and free < need * 1.05 + 100e6:
        raise DataError(
            f"not enough disk space for {ref}: it needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB are free "
            f"under {probe}; free some space, or set CATDOG_CACHE_DIR (or --out) to a bigger disk"
        )


def disk_full_message(ref: DataRef, folder: Path) -> str:
    return (
        f"the disk filled up while writing {ref} under {folder}; nothing was kept as complete: free some space, "
        "or set CATDOG_CACHE_DIR (or --out) to a bigger disk, and pull again"
    )


DATASET_ERRORS = HubErrorTypes(
    access=DatasetAccessError,
    not_found=DatasetNotFoundError,
    offline=DatasetOfflineError,
    failed=DatasetHubError,
    disk_full=DataError,
)


def hub_error(ref: DataRef, source: Source, error: BaseException, cache: Path) -> CatdogError:
    """One line for what a hub client raised (catdog_glm.hub_errors reads it), in a dataset's words."""
    target = HubTarget(
        ref=str(ref),
        name=ref.name,
        revision=ref.revision,
        what="dataset",
        hub=source.hub,
        endpoint=source.endpoint,
        page=source.page(ref),
        token_hint=source.token_hint,
        pull=f"catdog data pull {ref}",
        errors=DATASET_ERRORS,
        not_cached=lambda reason: not_cached_message(ref, source.hub, reason, cache),
        disk_full=lambda: disk_full_message(ref, cache),
        id_hint="the URL" if ref.source == "url" else "the id",
    )
    return shared_hub_error(target, error)


@contextlib.contextmanager
def hub_errors(ref: DataRef, source: Source, cache: Path) -> Iterator[None]:
    """Turn whatever a client raises into one of our one-line errors."""
    try:
        yield
    except CatdogError:
        raise
    except Exception as e:
        raise hub_error(ref, source, e, cache) from e


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
